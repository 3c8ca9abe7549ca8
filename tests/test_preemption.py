"""Preemption and crash resume: SIGTERM saves and exits cleanly; SIGKILL anywhere resumes exactly."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import pretrain
from mlmjax import checkpoint, predict, schema, train

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 40
TIMEOUT_S = 180  # a hung child fails the test instead of hanging it

# The training command a scheduler would run, with the test's config passed as JSON overrides.
CHILD = """
import json, sys
from configs import pretrain
from mlmjax import train
c = pretrain.get_config('tiny_classic')
for key, value in json.loads(sys.argv[1]).items():
  section, field = key.rsplit('.', 1)
  setattr(c[section] if section else c, field, value)
print('SUMMARY ' + json.dumps(train.run(c, sys.argv[2])), flush=True)
"""



def _overrides(config) -> dict:
  """Returns {dotted key: value} where config differs from get_config('tiny_classic')."""
  new = schema.flatten(config.to_dict())
  base = schema.flatten(pretrain.get_config('tiny_classic').to_dict())
  return {k: v for k, v in new.items() if base.get(k) != v}


def _config(make_tiny_config, **ckpt):
  c = make_tiny_config()
  c.train.num_steps = NUM_STEPS
  c.eval.every_steps = 1000  # evaluate once, at the end
  for k, v in ckpt.items():
    setattr(c.ckpt, k, v)
  return c


def _start(config, workdir: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=str(REPO))
  with open(log, 'a') as out:
    return subprocess.Popen([sys.executable, '-c', CHILD, json.dumps(_overrides(config)), str(workdir)],
                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _last_step(workdir: pathlib.Path) -> int:
  """Returns the newest step in metrics.jsonl (0 if none), skipping a line still being written."""
  path, last = workdir / 'metrics.jsonl', 0
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        last = max(last, json.loads(line).get('step', 0))
      except json.JSONDecodeError:
        pass
  return last


def _wait_for_step(proc: subprocess.Popen, workdir: pathlib.Path, step: int, log: pathlib.Path) -> None:
  deadline = time.monotonic() + TIMEOUT_S
  while _last_step(workdir) < step:
    if proc.poll() is not None:
      pytest.fail(f'child exited ({proc.returncode}) before step {step}:\n{log.read_text()[-3000:]}')
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'child did not reach step {step} in {TIMEOUT_S} s:\n{log.read_text()[-3000:]}')
    time.sleep(0.01)


def _summary(log: pathlib.Path) -> dict:
  lines = [l for l in log.read_text().splitlines() if l.startswith('SUMMARY ')]
  assert lines, log.read_text()[-3000:]
  return json.loads(lines[-1][len('SUMMARY '):])


def _assert_same_params(a_dir: pathlib.Path, b_dir: pathlib.Path) -> None:
  a, b = predict.load_run(a_dir), predict.load_run(b_dir)
  assert a.step == b.step == NUM_STEPS
  # Same data, masks and updates in the same order on CPU: the parameters agree bit for bit.
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _counters(workdir: pathlib.Path) -> dict[int, tuple]:
  """Returns {step: (train/cum_tokens, train/cum_flops, train/cum_predictions)} of metrics.jsonl."""
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: (r['train/cum_tokens'], r['train/cum_flops'], r['train/cum_predictions'])
          for r in records if 'train/loss' in r}


@pytest.fixture(scope='module')
def reference(tmp_path_factory, make_tiny_config) -> pathlib.Path:
  """Returns the workdir of one uninterrupted run, in this process."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  assert train.run(_config(make_tiny_config), workdir)['finished']
  return workdir


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resumes_exactly(reference, make_tiny_config, tmp_path):
  config = _config(make_tiny_config, every_steps=1000)  # no periodic save before the signal
  workdir, log = tmp_path / 'run', tmp_path / 'child.log'
  proc = _start(config, workdir, log)
  _wait_for_step(proc, workdir, 5, log)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=TIMEOUT_S) == 0, log.read_text()[-3000:]
  summary = _summary(log)
  step = summary['step']
  assert summary['preempted'] and not summary['finished'] and 5 <= step < NUM_STEPS
  assert f'preempted at step {step} (SIGTERM): checkpoint saved to' in log.read_text()
  assert json.loads((workdir / 'summary.json').read_text())['preempted']
  # The step it reached is committed (no half-written temporary left) and restores.
  names = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  assert names == [str(step)], names
  assert predict.load_run(workdir).step == step
  # The child ran the same config as the reference, so rerunning must land on the same parameters.
  assert json.loads((workdir / 'config.json').read_text())['train'] == \
      json.loads((reference / 'config.json').read_text())['train']
  resumed = train.run(config, workdir)
  assert resumed['finished'] and not resumed['preempted']
  _assert_same_params(reference, workdir)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_uninterrupted(reference, make_tiny_config,
                                                                   tmp_path):
  config = _config(make_tiny_config, every_steps=3, async_save=True)
  workdir, log = tmp_path / 'run', tmp_path / 'child.log'
  rng = random.Random(6)
  reached = 0
  for _ in range(2):
    proc = _start(config, workdir, log)
    # Past anything an earlier incarnation logged, then a random delay of up to ~2 steps, so the
    # kill can land inside a step, a checkpoint write or its background commit.
    _wait_for_step(proc, workdir, reached + rng.randint(2, 8), log)
    time.sleep(rng.uniform(0.0, 0.2))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    reached = _last_step(workdir)
    assert reached < NUM_STEPS
  proc = _start(config, workdir, log)
  assert proc.wait(timeout=TIMEOUT_S) == 0, log.read_text()[-3000:]
  assert _summary(log)['finished']
  assert log.read_text().count('resumed from step') == 2
  _assert_same_params(reference, workdir)
  # The cumulative counters continue across both resumes as in the uninterrupted run, exactly.
  assert _counters(workdir) == _counters(reference) and len(_counters(reference)) == NUM_STEPS


def test_stop_request_restores_the_previous_handlers():
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with checkpoint.StopRequest() as stop:
    assert signal.getsignal(signal.SIGTERM) != before[0]
    os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the flag instead of ending pytest
    time.sleep(0.01)
    assert stop.signum == signal.SIGTERM
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
  assert not checkpoint.reached_preemption_sync_point(1)  # single process: no preemption service
