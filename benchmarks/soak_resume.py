"""Kills a tiny training run with SIGKILL at random points N times, resumes it, and prints whether
its final parameters equal an uninterrupted run's.

  python benchmarks/soak_resume.py                 # 20 kill-and-restart cycles, seed 0
  python benchmarks/soak_resume.py --cycles 5 --seed 3 --keep runs/soak

Each cycle starts `train.run` in a child process on the same workdir and kills it either during
training (a random delay after a random step, so the kill may land inside an asynchronous
checkpoint write) or, sometimes, during start-up (restore, compile). A kill that leaves an
`N.orbax-checkpoint-tmp-*` directory behind is counted as a kill during a save. The corpus is
Python's pydoc topics written to a temporary .txt, so nothing is downloaded.
"""

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = """
import json, sys
from configs import pretrain
from mlmjax import train
c = pretrain.get_config('tiny')
for key, value in json.loads(sys.argv[1]).items():
  section, field = key.split('.')
  setattr(getattr(c, section), field, value)
train.run(c, sys.argv[2])
"""


def tiny_overrides(corpus: pathlib.Path, cache_dir: pathlib.Path, num_steps: int, every: int) -> dict:
  """Returns the dotted config overrides of the soak's tiny run (the tests' tiny shape)."""
  return {'data.corpus': str(corpus), 'data.cache_dir': str(cache_dir),
          'tokenizer.vocab_size': 1000, 'train.seq_len': 64, 'train.batch_size': 8,
          'train.num_steps': num_steps, 'train.log_every_steps': 1, 'optim.warmup_steps': 2,
          'eval.every_steps': 100_000, 'eval.batch_size': 8, 'eval.num_batches': 2,
          'ckpt.every_steps': every, 'ckpt.async_save': True}


def start(overrides: dict, workdir: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
  """Returns the child process training on workdir (output appended to log)."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  with open(log, 'a') as out:
    return subprocess.Popen([sys.executable, '-c', CHILD, json.dumps(overrides), str(workdir)],
                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def last_step(workdir: pathlib.Path) -> int:
  """Returns the newest step in metrics.jsonl, or 0."""
  path, last = workdir / 'metrics.jsonl', 0
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        last = max(last, json.loads(line).get('step', 0))
      except json.JSONDecodeError:
        pass  # the line a kill cut short
  return last


def wait_for_step(proc: subprocess.Popen, workdir: pathlib.Path, step: int, timeout: float) -> bool:
  """Returns True once metrics.jsonl reaches step; False if the child ended first."""
  deadline = time.monotonic() + timeout
  while last_step(workdir) < step:
    if proc.poll() is not None:
      return False
    if time.monotonic() > deadline:
      proc.kill()
      raise TimeoutError(f'child did not reach step {step} in {timeout:.0f} s')
    time.sleep(0.01)
  return True


def checkpoint_dirs(workdir: pathlib.Path, since: float) -> tuple[list[int], list[str]]:
  """Returns (committed steps, uncommitted temporary step directories written after `since`)."""
  root = workdir / 'checkpoints'
  paths = list(root.iterdir()) if root.is_dir() else []
  # A temporary directory left by an earlier kill stays until its step is saved again: skip it.
  return (sorted(int(p.name) for p in paths if p.name.isdigit()),
          sorted(p.name for p in paths if 'tmp' in p.name and p.stat().st_mtime >= since))


def compare(a: pathlib.Path, b: pathlib.Path) -> tuple[int, int, float, bool]:
  """Returns (step a, step b, max abs parameter difference, bitwise equal) of two workdirs."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mlmjax import predict  # pylint: disable=g-import-not-at-top
  ra, rb = predict.load_run(a), predict.load_run(b)
  xs = [np.asarray(x) for x in jax.tree.leaves(ra.params)]
  ys = [np.asarray(y) for y in jax.tree.leaves(rb.params)]
  diff = max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(xs, ys))
  bitwise = all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(xs, ys))
  return ra.step, rb.step, diff, bitwise


def soak(root: pathlib.Path, cycles: int, seed: int, num_steps: int, every: int,
         timeout: float) -> dict:
  """Runs the reference and the killed run under root; returns the result numbers."""
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  corpus = root / 'topics.txt'
  corpus.write_text('\n\n'.join(topics[k] for k in sorted(topics)), encoding='utf-8')
  overrides = tiny_overrides(corpus, root / 'cache', num_steps, every)
  ref_dir, run_dir, log = root / 'uninterrupted', root / 'killed', root / 'children.log'

  t0 = time.perf_counter()
  proc = start(overrides, ref_dir, log)
  if proc.wait(timeout=timeout) != 0:
    raise RuntimeError(f'the uninterrupted run failed; see {log}')
  print(f'uninterrupted run: {num_steps} steps in {time.perf_counter() - t0:.0f} s', flush=True)

  rng = random.Random(seed)
  kills, during_save, during_startup = 0, 0, 0
  for cycle in range(1, cycles + 1):
    before = last_step(run_dir)
    if before >= num_steps - 3:
      print(f'stopping after {kills} kills: the run is {before}/{num_steps} steps along', flush=True)
      break
    wall_start = time.time()
    proc = start(overrides, run_dir, log)
    t_start = time.perf_counter()
    if rng.random() < 0.15:
      where = 'start-up'
      time.sleep(rng.uniform(0.0, 10.0))
    else:
      target = min(before + rng.randint(1, 6), num_steps - 2)
      if not wait_for_step(proc, run_dir, target, timeout):
        raise RuntimeError(f'cycle {cycle}: the child ended before step {target}; see {log}')
      time.sleep(rng.uniform(0.0, 0.25))  # up to ~3 steps: inside a step, a save or its commit
      where = 'training'
    if proc.poll() is not None:
      raise RuntimeError(f'cycle {cycle}: the child ended before the kill; see {log}')
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=timeout)
    kills += 1
    steps, tmp = checkpoint_dirs(run_dir, since=wall_start)
    logged = last_step(run_dir)
    if where == 'start-up' and logged <= before:
      during_startup += 1
    during_save += bool(tmp)
    print(f'cycle {cycle:2d}: SIGKILL after {time.perf_counter() - t_start:5.1f} s ({where}) | '
          f'last logged step {logged} | committed checkpoints {steps} | '
          f'save in flight {tmp if tmp else "none"}', flush=True)

  proc = start(overrides, run_dir, log)
  if proc.wait(timeout=timeout) != 0:
    raise RuntimeError(f'the final resume failed; see {log}')
  step_a, step_b, diff, bitwise = compare(ref_dir, run_dir)
  return {'cycles': kills, 'kills_during_save': during_save, 'kills_during_startup': during_startup,
          'resumes': log.read_text().count('resumed from step'), 'step_uninterrupted': step_a,
          'step_killed': step_b, 'max_abs_diff': diff, 'bitwise_equal': bitwise,
          'wall_s': round(time.perf_counter() - t0, 1)}


def main() -> None:
  """Parses flags, runs the soak and prints the result."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--cycles', type=int, default=20, help='SIGKILL-and-restart cycles')
  p.add_argument('--seed', type=int, default=0, help='seed of the kill points')
  p.add_argument('--num_steps', type=int, default=150, help='training steps of the tiny run')
  p.add_argument('--every', type=int, default=3, help='ckpt.every_steps')
  p.add_argument('--timeout', type=float, default=300, help='seconds before a child counts as hung')
  p.add_argument('--keep', default='', help='new directory to keep the runs in (default: a temp dir)')
  args = p.parse_args()
  if args.keep:
    root = pathlib.Path(args.keep)
    if root.exists() and any(root.iterdir()):
      sys.exit(f'error: --keep {root} is not empty; name a new directory')
    root.mkdir(parents=True, exist_ok=True)
    result = soak(root, args.cycles, args.seed, args.num_steps, args.every, args.timeout)
  else:
    with tempfile.TemporaryDirectory(prefix='mlmjax_soak_') as tmp:
      result = soak(pathlib.Path(tmp), args.cycles, args.seed, args.num_steps, args.every,
                    args.timeout)
  print(json.dumps(result, indent=2))
  verdict = 'bitwise equal' if result['bitwise_equal'] else f'max abs diff {result["max_abs_diff"]:.3g}'
  print(f'{result["cycles"]} SIGKILL cycles ({result["kills_during_save"]} during a save, '
        f'{result["kills_during_startup"]} during start-up): final parameters at step '
        f'{result["step_killed"]} vs uninterrupted: {verdict}')
  sys.exit(0 if result['bitwise_equal'] or result['max_abs_diff'] <= 1e-6 else 1)


if __name__ == '__main__':
  main()
