"""Weight averaging: a new workdir whose checkpoint is the mean of some of a run's checkpoints.

  python -m mlmjax.average --workdir runs/x --last 5 --out runs/x_avg5
  python -m mlmjax.average --workdir runs/x --steps 3000,4000,5000 --out runs/x_avg

The new workdir holds the run's config.json, task.json and tokenizer, `averaged.json` (the
source and the steps), and one checkpoint at the newest averaged step: the element-wise mean of
the parameters (accumulated in float64, stored as float32) with a fresh optimizer state. It is
meant for evaluation, prediction, `init_from` and export, which read parameters only; milestone
checkpoints (`ckpt.keep_every`) give a run more steps to average over than `ckpt.max_to_keep`.
"""

import argparse
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mlmjax import checkpoint, optim, predict
from mlmjax import tokenizer as tok

AVERAGED_FILE = 'averaged.json'


def choose_steps(available: list[int], *, last: int = 0,
                 steps: list[int] | None = None) -> list[int]:
  """Returns the steps to average: `steps` (each must exist) or the newest `last` of available."""
  if steps:
    missing = sorted(set(steps) - set(available))
    if missing:
      raise ValueError(f'--steps: no checkpoint at step(s) {", ".join(map(str, missing))} '
                       f'(steps there: {", ".join(map(str, available)) or "none"})')
    return sorted(set(steps))
  if last < 1:
    raise ValueError('give --last K (K >= 1) or --steps S1,S2,...')
  if last > len(available):
    raise ValueError(f'--last {last}: the run has {len(available)} checkpoint(s) '
                     f'({", ".join(map(str, available)) or "none"}); keep more with '
                     'ckpt.max_to_keep or ckpt.keep_every')
  return sorted(available)[-last:]


def mean_params(trees: list) -> dict:
  """Returns the element-wise mean of parameter trees (float64 sums, float32 result)."""
  total = jax.tree.map(lambda x: np.asarray(x, np.float64), trees[0])
  for tree in trees[1:]:
    total = jax.tree.map(lambda t, x: t + np.asarray(x, np.float64), total, tree)
  return jax.tree.map(lambda t: (t / len(trees)).astype(np.float32), total)


def average(workdir, out, *, last: int = 0, steps: list[int] | None = None, log=print) -> dict:
  """Writes the averaged workdir `out`; returns what averaged.json records."""
  workdir, out = pathlib.Path(workdir), pathlib.Path(out)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f'--out {out} is not empty: choose a new directory')
  ckpt_dir = workdir / 'checkpoints'
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f'{ckpt_dir} is missing: is {workdir} a workdir written by '
                            'mlmjax.train?')
  reader = checkpoint.Checkpointer(ckpt_dir, log=log, read_only=True)
  try:
    available = reader.all_steps()
  finally:
    reader.close()
  chosen = choose_steps(available, last=last, steps=steps)
  run = predict.load_run(workdir, 'latest', step=chosen[-1])  # config, tokenizer, meta: once
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        run.params)
  trees = [checkpoint.restore_params_in(ckpt_dir, target, what=f'workdir {workdir}', log=log,
                                        step=s)[1] for s in chosen[:-1]]
  params = mean_params(trees + [run.params])
  out.mkdir(parents=True, exist_ok=True)
  # Not summary.json: its numbers are the source's last step, not the mean's (train re-evaluates).
  for name in ('config.json', 'task.json', 'provenance.json'):
    if (workdir / name).is_file():
      shutil.copy2(workdir / name, out / name)
  stored = tok.stored_path(workdir)
  shutil.copy2(stored, out / stored.name)
  tx = optim.make_optimizer(run.config.optim, run.config.train.num_steps)
  params = jax.tree.map(jnp.asarray, params)
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.asarray(run.step, jnp.int32)}
  record = {'source': str(workdir.resolve()), 'steps': chosen}
  writer = checkpoint.Checkpointer(out / 'checkpoints', async_save=False, log=log)
  try:
    # The newest step's meta (progress, data position): the workdir continues as that run would.
    writer.save(run.step, state, {**run.meta, 'averaged': record})
  finally:
    writer.close()
  (out / AVERAGED_FILE).write_text(json.dumps(record, indent=2) + '\n')
  log(f'averaged the parameters of {workdir} at steps {", ".join(map(str, chosen))} into {out} '
      f'(step {run.step})')
  return record


def main(argv=None) -> None:
  """Parses --workdir, --last or --steps, and --out, and writes the averaged workdir."""
  parser = argparse.ArgumentParser(prog='python -m mlmjax.average', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a workdir written by mlmjax.train')
  parser.add_argument('--last', type=int, default=0, help='average the newest K checkpoints')
  parser.add_argument('--steps', default='', help='or these steps, comma-separated')
  parser.add_argument('--out', required=True, help='the new workdir (must not exist or be empty)')
  args = parser.parse_args(argv)
  try:
    steps = [int(s) for s in args.steps.split(',') if s.strip()]
  except ValueError:
    parser.error(f'--steps {args.steps!r}: give step numbers separated by commas')
  try:
    average(args.workdir, args.out, last=args.last, steps=steps)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
