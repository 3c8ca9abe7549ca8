"""Decay branches: anneal a copy of a run from one of its stable-phase checkpoints.

  python -m mlmjax.branch --workdir runs/x --step 40000 --decay_steps 4000 --out runs/x_d40k

A warmup-stable-decay run (optim.decay_steps) can be annealed from any checkpoint taken while its
learning rate was at the peak: the branch is the run's own config ending at step + decay_steps,
decaying over those last steps (--decay: linear, cosine or 1-sqrt; the run's own shape by
default, 1-sqrt when it had none). The new workdir starts from a copy of that checkpoint, so its
first step reads the source's parameters, optimizer state, data position and masks, and its
metrics.jsonl continues the source's. `branch.json` records where it came from; rerunning the
same command resumes an interrupted branch.
"""

import argparse
import copy
import json
import pathlib
import shutil
import sys

from mlmjax import checkpoint, cli, optim, phases, schema, train
from mlmjax import tokenizer as tok

BRANCH_FILE = 'branch.json'


def branch_config(config, step: int, decay_steps: int, decay: str = ''):
  """Returns the source config as a branch from `step` that decays over `decay_steps` more."""
  o = config.optim
  if decay_steps < 1:
    raise ValueError(f'--decay_steps {decay_steps}: give the number of steps to decay over (>= 1)')
  peak = float(o.learning_rate)
  lr = float(optim.learning_rate_schedule(o, config.train.num_steps)(step))
  if step < o.warmup_steps or abs(lr - peak) > 1e-6 * peak:
    raise ValueError(f'step {step} is not in the stable phase of the run (learning rate {lr:.3g}, '
                     f'peak {peak:.3g}, warmup {o.warmup_steps} steps): branch from a checkpoint '
                     'between the warmup and the decay (optim.decay_steps)')
  new = copy.deepcopy(config)
  new.unlock()
  new.train.num_steps = step + decay_steps
  new.train.budget_tokens, new.train.budget_minutes = 0, 0.0
  new.optim.decay_steps, new.optim.decay_fraction = decay_steps, 0.0
  new.optim.decay = decay or (o.decay if o.decay != 'constant' else '1-sqrt')
  new.lock()
  # The steps up to the branch point must be the source's: phases that end at a fraction of the
  # run would move with the new length.
  before = [(s.start, min(s.end, step), s.overrides) for s in phases.plan(config) if s.start < step]
  after = [(s.start, min(s.end, step), s.overrides) for s in phases.plan(new) if s.start < step]
  if before != after:
    raise ValueError('the phases before the branch point move with the length of the run ('
                     "'until' as a fraction); give those phases steps to branch from this run")
  return new


def branch(workdir, out, *, step: int | None, decay_steps: int, decay: str = '',
           log=print) -> dict:
  """Writes (or resumes) the branch workdir `out` and trains it; returns the branch's summary."""
  workdir, out = pathlib.Path(workdir), pathlib.Path(out)
  if not (workdir / 'config.json').is_file():
    raise FileNotFoundError(f'{workdir / "config.json"} is missing: is {workdir} a workdir '
                            'written by mlmjax.train?')
  config = schema.upgrade(json.loads((workdir / 'config.json').read_text()))
  reader = checkpoint.Checkpointer(workdir / 'checkpoints', log=log, read_only=True)
  try:
    available = reader.all_steps()
  finally:
    reader.close()
  if step is None:
    if not available:
      raise FileNotFoundError(f'{workdir}: no checkpoints to branch from')
    step = max(available)
  if step not in available:
    raise ValueError(f'--step {step}: no checkpoint there (steps in {workdir}: '
                     f'{", ".join(map(str, available)) or "none"}); keep more with ckpt.keep_every')
  new = branch_config(config, step, decay_steps, decay)
  record = {'source': str(workdir.resolve()), 'step': step, 'decay_steps': decay_steps,
            'decay': new.optim.decay}
  if (out / BRANCH_FILE).is_file():
    if json.loads((out / BRANCH_FILE).read_text()) != record:
      raise FileExistsError(f'--out {out} holds another branch ({out / BRANCH_FILE}); choose a '
                            'new directory')
    log(f'resuming the branch in {out}')
  elif out.exists() and any(out.iterdir()):
    raise FileExistsError(f'--out {out} is not empty: choose a new directory')
  else:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(workdir / 'checkpoints' / str(step), out / 'checkpoints' / str(step))
    stored = tok.stored_path(workdir)
    shutil.copy2(stored, out / stored.name)
    if (workdir / 'metrics.jsonl').is_file():  # train truncates it to the step restored
      shutil.copy2(workdir / 'metrics.jsonl', out / 'metrics.jsonl')
    (out / BRANCH_FILE).write_text(json.dumps(record, indent=2) + '\n')
    log(f'branch of {workdir} at step {step}: {new.optim.decay} decay over {decay_steps} steps '
        f'to step {new.train.num_steps}, in {out}')
  return train.run(new, out, explicit={'train.num_steps', 'optim.decay_steps', 'optim.decay'})


def main(argv=None) -> None:
  """Parses --workdir, --step, --decay_steps, --decay and --out, and trains the branch."""
  parser = argparse.ArgumentParser(prog='python -m mlmjax.branch', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a workdir written by mlmjax.train')
  parser.add_argument('--step', type=int, default=None,
                      help="the checkpoint to branch from (default: the run's newest)")
  parser.add_argument('--decay_steps', type=int, required=True, help='steps of the decay')
  parser.add_argument('--decay', default='', choices=('', 'linear', 'cosine', '1-sqrt'),
                      help="the decay's shape (default: the run's own; 1-sqrt for a constant run)")
  parser.add_argument('--out', required=True, help='the branch workdir (new, or a branch to resume)')
  args = parser.parse_args(argv)
  try:
    branch(args.workdir, args.out, step=args.step, decay_steps=args.decay_steps, decay=args.decay)
  except (*cli.USER_ERRORS, FileExistsError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
