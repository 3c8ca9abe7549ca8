r"""Grid sweeps on one host: `python -m mlmjax.sweep --config C --grid KEY=V1,V2 --workdir runs/abl`.

  python -m mlmjax.sweep --config configs/pretrain.py:tiny --grid masking.rate=0.15,0.3 \
      --grid masking.strategy=token,whole_word --workdir runs/abl [--set train.num_steps=4000] \
      [--seeds 0,1,2]

Every combination trains with the same seed and data order in `<workdir>/<name>`, named by its
values (`rate=0.15,strategy=token`). With --seeds, every combination trains once per seed (config
key `seed`: data order, initial weights, masks), named `rate=0.15,strategy=token,seed=1`. Finished
runs are skipped, interrupted ones resume from their checkpoint; `--shard i/n` keeps the runs with
index % n == i (one share per VM).
"""

import copy
import dataclasses
import hashlib
import itertools
import json
import pathlib
import re
import shlex
import signal
import sys
import threading
from typing import Any, Callable, Sequence

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser

from mlmjax import cli, experiment, run_dirs, run_files, schema, train

_MAX_NAME = 120  # longer names are cut and made unique by a hash (file names stop at 255 bytes)
SEED_KEY = run_dirs.SEED_KEY  # the config key that --seeds sets


@dataclasses.dataclass
class Run:
  """One run of the sweep: its index in the product, directory name, overrides and config."""
  index: int
  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict


class SweepInterrupted(BaseException):
  """Raised by SIGTERM/SIGINT while no training loop is there to save and stop cleanly."""


# ---------------------------------------------------------------------------------------------
# Parsing grid values and overrides the way ml_collections parses `--config.KEY=VALUE`.


def split_values(text: str) -> list[str]:
  """Returns the comma-separated items of text; commas inside (), [], {} or quotes do not split."""
  items, depth, quote, cur = [], 0, None, ''
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      items.append(cur.strip())
      cur = ''
      continue
    cur += ch
  items.append(cur.strip())
  return items


def lookup(config: ml_collections.ConfigDict, key: str, where: str) -> Any:
  """Returns config's value at a dotted key; KeyError naming the key (and where it came from)."""
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise KeyError(f'unknown config key {key} ({where}); see the config file for the keys')
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise KeyError(f'{key} is a config section, not a value ({where})')
  return node


def parse_value(config: ml_collections.ConfigDict, key: str, text: str, where: str) -> Any:
  """Returns text parsed with the type of the config's default at key (bool/int/float/tuple/str)."""
  default = lookup(config, key, where)
  parsers = ((bool, flags.BooleanParser()), (int, flags.IntegerParser()), (float, flags.FloatParser()),
             (tuple, tuple_parser.TupleParser()))
  try:
    for kind, parser in parsers:
      if isinstance(default, kind):
        return parser.parse(text)
    if isinstance(default, str):
      return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"' else text
    return text if default is None else type(default)(text)
  except (ValueError, TypeError, SyntaxError):
    raise ValueError(f'{where}: {text!r} is not a valid {type(default).__name__} '
                     f'(the type of {key}, default {default!r})') from None


def parse_assignment(config, spec: str, flag: str, many: bool) -> tuple[str, list[Any]]:
  """Returns (key, parsed values) of `KEY=V` (or `KEY=V1,V2,...` when many)."""
  key, sep, text = spec.partition('=')
  key = key.strip()
  if not sep or not key:
    raise ValueError(f'{flag} {spec!r}: expected KEY=VALUE' + (',VALUE...' if many else ''))
  texts = split_values(text) if many else [text.strip()]
  if any(t == '' for t in texts):
    raise ValueError(f'{flag} {spec}: empty value')
  values = [parse_value(config, key, t, f'{flag} {spec}') for t in texts]
  if len({repr(v) for v in values}) < len(values):
    raise ValueError(f'{flag} {spec}: a value is repeated')
  return key, values


# ---------------------------------------------------------------------------------------------
# The plan: the cartesian product in a stable order, one named directory per combination.


def run_name(overrides: dict[str, Any]) -> str:
  """Returns the file-system-safe directory name of a combination, e.g. `rate=0.15,strategy=token`."""
  if not overrides:
    return 'base'
  name = re.sub(r'[^A-Za-z0-9._=,+-]+', '_', run_dirs.settings_label(overrides)).lstrip('.')
  if len(name) > _MAX_NAME:
    name = name[:_MAX_NAME - 9] + '-' + hashlib.sha1(name.encode()).hexdigest()[:8]
  return name


def apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Returns a copy of config with dotted-key overrides set (the lock and types kept)."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    lookup(config, key, 'override')
    try:
      config.update_from_flattened_dict({key: value})
    except (TypeError, ValueError) as e:
      raise ValueError(f'{key}={value!r}: {e}') from None
  return config


def plan(base: ml_collections.ConfigDict, grid: Sequence[tuple[str, Sequence[Any]]],
         seeds: Sequence[int] | None = None) -> list[Run]:
  """Returns every combination of grid (first key outermost, values in the given order) as Runs.

  seeds: each combination once per seed, the seed outermost (every combination at the first seed
  comes first) and last in the name; None keeps the base config's seed and today's names.
  """
  keys = [k for k, _ in grid]
  repeated = sorted({k for k in keys if keys.count(k) > 1})
  if repeated:
    raise ValueError(f'--grid {repeated[0]} is given twice; list all its values in one --grid')
  if seeds is not None:
    if SEED_KEY in keys:
      raise ValueError(f'{SEED_KEY} is given to both --grid and --seeds; keep --seeds')
    if not seeds or len(set(seeds)) < len(seeds):
      raise ValueError(f'--seeds {",".join(map(str, seeds))}: give distinct seeds')
  runs = []
  combos = list(itertools.product(*(vals for _, vals in grid)))
  for seed in ([None] if seeds is None else seeds):
    for values in combos:
      overrides = dict(zip(keys, values), **({} if seed is None else {SEED_KEY: int(seed)}))
      runs.append(Run(len(runs), run_name(overrides), overrides, apply(base, overrides)))
  names = [r.name for r in runs]
  for name in names:
    if names.count(name) > 1:
      raise ValueError(f'two combinations share the directory name {name!r}; give distinct values')
  return runs


def parse_seeds(text: str) -> list[int]:
  """Returns the seeds of `--seeds 0,1,2` (distinct integers)."""
  try:
    seeds = [int(t) for t in split_values(text)]
  except ValueError:
    raise ValueError(f'--seeds {text!r}: expected distinct integers, e.g. 0,1,2') from None
  if len(set(seeds)) < len(seeds):
    raise ValueError(f'--seeds {text!r}: a seed is repeated')
  return seeds


def parse_shard(text: str) -> tuple[int, int]:
  """Returns (i, n) from `i/n` with 0 <= i < n."""
  m = re.fullmatch(r'\s*(\d+)\s*/\s*(\d+)\s*', text or '')
  if not m or not int(m[1]) < int(m[2]):
    raise ValueError(f'--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4')
  return int(m[1]), int(m[2])


# ---------------------------------------------------------------------------------------------
# What is on disk for a run, and whether it is the run this sweep would train.


def disk_state(run_dir: pathlib.Path) -> tuple[str, int]:
  """Returns ('finished' | 'partial' | 'pending', last step saved) for a run directory."""
  summary = run_dir / 'summary.json'
  if summary.is_file():
    try:
      s = json.loads(summary.read_text())
      if s.get('finished'):
        return 'finished', int(s.get('step', 0))
    except json.JSONDecodeError:
      pass
  steps = [int(p.name) for p in (run_dir / 'checkpoints').glob('*') if p.is_dir() and p.name.isdigit()]
  return ('partial', max(steps)) if steps else ('pending', 0)


def config_differences(run_dir: pathlib.Path, config: ml_collections.ConfigDict) -> list[str]:
  """Returns `key: old -> new` for settings where run_dir/config.json differs from config.

  Bookkeeping keys (paths, cadences) are ignored, and so are keys only one side has (a config
  file that gained or lost a key since the run started).
  """
  path = run_dir / 'config.json'
  if not path.is_file():
    return []
  try:
    old = run_dirs.flatten(schema.upgrade(json.loads(path.read_text())).to_dict())
  except json.JSONDecodeError:
    return [f'{path} is not valid JSON']
  new = run_dirs.flatten(json.loads(config.to_json_best_effort()))
  keys = sorted((set(old) & set(new)) - run_dirs.BOOKKEEPING_KEYS)
  return [f'{k}: {old[k]!r} -> {new[k]!r}' for k in keys if old[k] != new[k]]


# ---------------------------------------------------------------------------------------------
# Running the sweep.


class _StopOutsideTraining:
  """Turns SIGTERM/SIGINT into SweepInterrupted while no training loop owns them.

  train.run installs its own handlers for its loop (save, then return preempted) and puts these
  back afterwards, so a signal between runs or during a run's setup ends the sweep at once; both are
  safe to cut: the token cache, tokenizer and checkpoints are written atomically.
  """

  def __init__(self):
    self._previous = {}
    self.signum: int | None = None

  def __enter__(self):
    # jax.distributed runs leave SIGTERM to JAX's preemption notifier, as train.run does.
    if threading.current_thread() is threading.main_thread() and not jax.distributed.is_initialized():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    # Once a run has brought jax.distributed up, its hosts must stop together: only note the signal.
    if not jax.distributed.is_initialized():
      raise SweepInterrupted(signal.Signals(signum).name)

  def check(self) -> None:
    """Raises SweepInterrupted if a signal was noted while it could not be raised."""
    if self.signum is not None:
      raise SweepInterrupted(signal.Signals(self.signum).name)

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)


def _record_path(workdir: pathlib.Path, shard: tuple[int, int]) -> pathlib.Path:
  # Shards sharing one workdir (one file system for all VMs) must not overwrite each other's record.
  return workdir / ('sweep.json' if shard[1] == 1 else f'sweep.shard-{shard[0]}-of-{shard[1]}.json')


def _write_record(path: pathlib.Path, record: dict) -> None:
  """Writes the record atomically; records of other grids in the same file move to `other_sweeps`."""
  mine = lambda r: (r.get('grid'), r.get('seeds'), r.get('base_overrides'), r.get('config'))
  others = []
  if path.is_file():
    try:
      old = json.loads(path.read_text())
      for r in [old, *old.get('other_sweeps', [])]:
        r = {k: v for k, v in r.items() if k != 'other_sweeps'}
        if mine(r) != mine(json.loads(json.dumps(record, default=repr))) and r not in others:
          others.append(r)
    except (json.JSONDecodeError, AttributeError):
      pass
  run_files.atomic_write_json(path, {**record, 'other_sweeps': others}, sort_keys=False, default=repr)


def run_sweep(base: ml_collections.ConfigDict, grid: Sequence[tuple[str, Sequence[Any]]], workdir,
              *, seeds: Sequence[int] | None = None, shard: tuple[int, int] = (0, 1),
              dry_run: bool = False, config_path: str = '',
              base_overrides: dict[str, Any] | None = None, command: str = '',
              log: Callable[[str], None] = print) -> dict:
  """Trains every combination of grid over base (per seed) in workdir/<name>; returns the record.

  The record (also written to workdir/sweep.json) lists each run's name, overrides and status:
  finished, skipped (finished before), partial, pending, preempted, stopped (train.max_wall_minutes),
  failed (non-finite loss), or other shard. After a preempted run the sweep starts no other run and
  the record says `stopped_early`.
  """
  workdir = pathlib.Path(workdir)
  runs = plan(base, grid, seeds)
  i, n = shard
  mine = [r for r in runs if r.index % n == i]
  for r in runs:
    try:
      experiment.validate_config(r.config)
    except ValueError as e:
      raise ValueError(f'run {r.name}: {e}') from None
  mismatched = [(r, d) for r in mine for d in [config_differences(workdir / r.name, r.config)] if d]

  status = {}
  for r in runs:
    state, step = disk_state(workdir / r.name)
    status[r.name] = {'status': state if r.index % n == i else 'other shard', 'step': step}
  record = {'config': config_path, 'base_overrides': base_overrides or {},
            'grid': {k: list(v) for k, v in grid}, 'shard': f'{i}/{n}', 'command': command,
            'stopped_early': False, 'runs': []}
  if seeds is not None:  # absent otherwise, so that a seedless sweep's record stays as it was
    record['seeds'] = [int(s) for s in seeds]

  def update_record():
    record['runs'] = [{'index': r.index, 'name': r.name, 'overrides': r.overrides, **status[r.name]}
                      for r in runs]
    return record

  def save_record():
    _write_record(_record_path(workdir, shard), update_record())

  log(f'sweep {workdir}: {len(runs)} runs' + (f', {len(mine)} in shard {i}/{n}' if n > 1 else '')
      + (f' from {config_path}' if config_path else ''))
  if dry_run:
    for r in runs:
      s = status[r.name]
      what = {'finished': 'finished: skip', 'partial': f'resume from step {s["step"]}',
              'pending': 'train', 'other shard': 'other shard'}[s['status']]
      if any(r is m for m, _ in mismatched):
        what = 'ERROR: config differs from the run on disk'
      log(f'  [{r.index}] {r.name}: {what}')
    return update_record()
  if mismatched:
    r, diffs = mismatched[0]
    raise ValueError(f'{workdir / r.name} holds a run whose config differs from this sweep\'s '
                     f'({"; ".join(diffs)}); use another --workdir or delete that run directory')

  workdir.mkdir(parents=True, exist_ok=True)
  save_record()
  current = None
  try:
    with _StopOutsideTraining() as stop:
      for k, r in enumerate(mine):
        stop.check()
        current, run_dir = r, workdir / r.name
        prefix = f'[{k + 1}/{len(mine)}] {r.name}'
        if status[r.name]['status'] == 'finished':
          status[r.name]['status'] = 'skipped'
          log(f'{prefix}: finished before, skipped')
          continue
        log(f'{prefix}: ' + (f'resuming from step {status[r.name]["step"]}'
                             if status[r.name]['status'] == 'partial' else 'training'))
        try:
          summary = train.run(r.config, run_dir)
        except FloatingPointError as e:  # a diverged combination is a result; the others still run
          status[r.name] = {'status': 'failed', 'step': disk_state(run_dir)[1], 'error': str(e)}
          log(f'{prefix}: failed: {e}')
          save_record()
          continue
        except Exception as e:
          status[r.name] = {'status': 'failed', 'step': disk_state(run_dir)[1], 'error': str(e)}
          raise
        state = 'finished' if summary['finished'] else 'preempted' if summary['preempted'] else 'stopped'
        status[r.name] = {'status': state, 'step': summary['step']}
        if summary['preempted']:
          record['stopped_early'] = True
          log(f'sweep stopped: {r.name} was preempted at step {summary["step"]} (checkpoint saved); '
              f'{len(mine) - k - 1} more run(s) not started. Rerun the same command to resume.')
          return record
        save_record()
  except SweepInterrupted as e:
    record['stopped_early'] = True
    if current is not None and status[current.name]['status'] not in ('skipped', 'finished'):
      status[current.name] = dict(zip(('status', 'step'), disk_state(workdir / current.name)))
    log(f'sweep stopped by {e} outside a training loop'
        + (f' (at {current.name})' if current is not None else '') + '; rerun the same command to continue')
    return record
  finally:
    save_record()
  done = sum(status[r.name]['status'] in ('finished', 'skipped') for r in mine)
  failed = [r.name for r in mine if status[r.name]['status'] == 'failed']
  log(f'sweep {workdir}: {done}/{len(mine)} runs finished'
      + (f'; failed: {", ".join(failed)}' if failed else '')
      + f'. Report: python -m mlmjax.report {workdir}')
  return record


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv=None) -> None:
  """Parses --config/--grid/--set/--seeds/--workdir/--shard/--dry_run and runs the sweep."""
  argv = list(sys.argv if argv is None else argv)

  def define(flags_, flag_values):
    flags_.DEFINE_multi_string('grid', [], 'KEY=V1,V2,...: values of one config key to sweep '
                               '(repeatable).', flag_values=flag_values)
    flags_.DEFINE_multi_string('set', [], 'KEY=VALUE: override of the base config for every run.',
                               flag_values=flag_values)
    flags_.DEFINE_string('seeds', '', 'S1,S2,...: train every combination once per seed '
                         '(config key seed), named NAME,seed=S.', flag_values=flag_values)
    flags_.DEFINE_string('workdir', None, 'Sweep directory; each run trains in WORKDIR/NAME.',
                         flag_values=flag_values)
    flags_.DEFINE_string('shard', '0/1', 'i/n: run only the combinations with index % n == i.',
                         flag_values=flag_values)
    flags_.DEFINE_bool('dry_run', False, 'Print the runs and what would happen to each, then exit.',
                       flag_values=flag_values)

  fv = cli.parse_flags(argv, define, prog='mlmjax.sweep',
                       config_help='Base config file, e.g. configs/pretrain.py:tiny.')
  if fv.config is None or fv.workdir is None or not (fv.grid or fv.set or fv.seeds):
    cli.fail('usage: python -m mlmjax.sweep --config configs/pretrain.py:tiny --workdir runs/abl '
             '--grid KEY=V1,V2 [--grid ...] [--set KEY=VALUE ...] [--seeds 0,1,2] [--shard i/n] '
             '[--dry_run]')
  try:
    base_overrides = dict(config_flags.get_override_values(fv['config']))
    sets = {}
    for spec in fv.set:
      key, (value,) = parse_assignment(fv.config, spec, '--set', many=False)
      sets[key] = value
    base_overrides.update(sets)
    grid = [parse_assignment(fv.config, g, '--grid', many=True) for g in fv.grid]
    both = sorted(set(sets) & {k for k, _ in grid})
    if both:
      raise ValueError(f'{both[0]} is given to both --set and --grid; keep one')
    seeds = parse_seeds(fv.seeds) if fv.seeds else None
    if seeds is not None and SEED_KEY in base_overrides:
      raise ValueError(f'{SEED_KEY} is set for every run (--set or --config.{SEED_KEY}) and '
                       'given to --seeds; keep --seeds')
    record = run_sweep(apply(fv.config, sets), grid, fv.workdir, seeds=seeds,
                       shard=parse_shard(fv.shard), dry_run=fv.dry_run,
                       config_path=config_flags.get_config_filename(fv['config']),
                       base_overrides=base_overrides,
                       command=shlex.join(['python', '-m', 'mlmjax.sweep', *argv[1:]]))
  except KeyError as e:
    cli.fail(f'error: {e.args[0]}')
  except (ValueError, FileNotFoundError, PermissionError) as e:
    cli.fail(f'error: {e}')
  failed = [r['name'] for r in record['runs'] if r['status'] == 'failed']
  if failed:
    cli.fail(f'error: {len(failed)} run(s) failed: {", ".join(failed)} (see their log.txt)')


if __name__ == '__main__':
  main()
