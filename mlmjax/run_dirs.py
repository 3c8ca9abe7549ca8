"""Run directories as data: find them, read their config, metrics and downstream results, and place
their evaluations on a step, training-FLOPs or predictions-seen axis (mlmjax.report, sweep, evalsuite).
"""

import json
import pathlib
from typing import Any

from mlmjax import schema, stats

# Keys that say where files go or how often things are written, never what a run computes: they
# neither make runs differ in a report nor stop a sweep from reusing a finished run.
BOOKKEEPING_KEYS = frozenset((
    'data.cache_dir', 'data.prefetch', 'data.tfds_data_dir', 'data.tfds_download',
    'ckpt.every_steps', 'ckpt.max_to_keep', 'ckpt.async_save',
    'train.log_every_steps', 'train.max_wall_minutes'))

LOSS = 'eval/loss'
ACCURACY = 'eval/accuracy'
DEFAULT_METRIC = 'eval/accuracy_at_mask'
UNIGRAM = 'baseline/unigram_accuracy_at_mask'
RATE_KEY, STRATEGY_KEY, SEED_KEY = 'masking.rate', 'masking.strategy', 'seed'
# The cumulative counters of a training record (mlmjax/train.py), and the x axes they give.
COUNTERS = ('train/cum_tokens', 'train/cum_flops', 'train/cum_predictions')
AXES = {'step': 'step', 'flops': 'train/cum_flops', 'predictions': 'train/cum_predictions'}
AXIS_TITLES = {'step': 'step', 'flops': 'training FLOPs (analytic)',
               'predictions': 'predictions seen (training targets)'}


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """Returns {dotted key: leaf} for a nested dict; lists become tuples (as in the config)."""
  return {k: _freeze(v) for k, v in schema.flatten(tree, prefix).items()}


def _freeze(v):
  return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from None


def read_metrics(path: pathlib.Path) -> list[dict]:
  """Returns the records of a metrics.jsonl, skipping a last line cut short by a crash."""
  records = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def is_run_dir(path: pathlib.Path) -> bool:
  """Returns True for a training workdir: config.json beside metrics.jsonl or summary.json."""
  return (path / 'config.json').is_file() and (
      (path / 'metrics.jsonl').is_file() or (path / 'summary.json').is_file())


def find_runs(root: pathlib.Path) -> list[pathlib.Path]:
  """Returns the run directories at or under root; a run's own subdirectories are not searched."""
  if is_run_dir(root):
    return [root]
  found = []
  for child in sorted(p for p in root.iterdir() if p.is_dir()):
    if child.name not in ('checkpoints', 'tensorboard'):
      found += find_runs(child)
  return found


def load_run(path: pathlib.Path, root: pathlib.Path) -> dict:
  """Returns one run's config, summary, eval and counter records and downstream results."""
  summary = _read_json(path / 'summary.json') if (path / 'summary.json').is_file() else {}
  records = read_metrics(path / 'metrics.jsonl')
  evals = sorted((r for r in records if LOSS in r), key=lambda r: r['step'])
  counts = sorted(({'step': r['step'], **{k: r[k] for k in COUNTERS if k in r}}
                   for r in records if any(k in r for k in COUNTERS)), key=lambda r: r['step'])
  last_step = max((r.get('step', 0) for r in records), default=0)
  return {'name': path.relative_to(root).as_posix() if path != root else path.name,
          'path': path, 'summary': summary,
          'config': flatten(schema.upgrade(_read_json(path / 'config.json')).to_dict()),
          'evals': evals, 'counts': counts, 'step': max(int(summary.get('step', 0)), last_step),
          'downstream': read_downstream(path)}


def read_downstream(run_dir: pathlib.Path) -> dict[str, float]:
  """Returns the columns named by run_dir/downstream.json ({} if absent).

  Its entries are `name: number`, `name: {nested numbers}` or `name: path` to a fine-tuned workdir
  (relative to the run), whose summary.json's numeric `eval/...` entries become `name/...` columns
  and its `test/...` entries (a fine-tuning run's test split) `name/test_...` columns.
  """
  path = run_dir / 'downstream.json'
  if not path.exists():
    return {}
  data = _read_json(path)
  if not isinstance(data, dict):
    raise ValueError(f'{path}: expected a JSON object of metric name -> value or workdir')
  out = {}
  for name, value in data.items():
    if isinstance(value, bool) or value is None:
      raise ValueError(f'{path}: {name!r} must be a number, an object or a workdir path')
    if isinstance(value, (int, float)):
      out[name] = float(value)
    elif isinstance(value, dict):
      for k, v in flatten(value, f'{name}/').items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          out[k.replace('.', '/')] = float(v)
    elif isinstance(value, str):
      target = run_dir / value
      summary_path = target if target.suffix == '.json' else target / 'summary.json'
      if not summary_path.is_file():
        raise ValueError(f'{path}: {name!r} names {value!r}, which holds no summary.json')
      for k, v in _read_json(summary_path).items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
          continue
        if k.startswith('eval/'):
          out[f'{name}/{k[len("eval/"):]}'] = float(v)
        elif k.startswith('test/'):  # a fine-tuning run's test split, best parameters
          out[f'{name}/test_{k[len("test/"):]}'] = float(v)
    else:
      raise ValueError(f'{path}: {name!r} must be a number, an object or a workdir path')
  return out


def varied_keys(runs: list[dict]) -> list[str]:
  """Returns the config keys whose values differ across runs, bookkeeping keys left out.

  A key missing from some runs' configs (added to the code after they were written; a resumed run
  rewrites its config.json) counts only when the runs that have it disagree.
  """
  keys = sorted(set().union(*(r['config'] for r in runs)) - BOOKKEEPING_KEYS)
  return [k for k in keys
          if len({repr(r['config'][k]) for r in runs if k in r['config']}) > 1]


def format_setting(value: Any) -> str:
  """Returns a setting as run names write it: 0.15, true, 0.8-0.1-0.1."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, (tuple, list)):
    return '-'.join(format_setting(v) for v in value)
  return repr(value) if isinstance(value, float) else str(value)


def settings_label(settings: dict[str, Any]) -> str:
  """Returns `rate=0.15,strategy=token` for dotted-key settings (full keys where leaves clash)."""
  leaves = [k.rsplit('.', 1)[-1] for k in settings]
  return ','.join(f'{leaf if leaves.count(leaf) == 1 else key}={format_setting(v)}'
                  for key, leaf, v in zip(settings, leaves, settings.values()))


def sort_key(value) -> tuple:
  """Returns a key that orders settings of mixed types (None last)."""
  return (value is None, str(type(value)), value if value is not None else 0)


# ---------------------------------------------------------------------------------------------
# Axes: where each evaluation lies in steps, training FLOPs or predictions seen.


def eval_positions(run: dict, axis: str) -> list[float | None]:
  """Returns each evaluation's x on axis (None where unknown).

  flops/predictions: the run's counter at the evaluation's step, linear in step between the
  training records around it (exact for FLOPs within a phase), 0 at step 0.
  """
  if axis == 'step':
    return [float(e['step']) for e in run['evals']]
  key = AXES[axis]
  points = [(0, 0.0)] + [(c['step'], c[key]) for c in run['counts'] if stats.is_number(c.get(key))]
  steps, values = [p[0] for p in points], [p[1] for p in points]
  return [stats.interpolate(steps, values, e['step']) for e in run['evals']]


def curve(run: dict, axis: str, metric: str) -> tuple[list[float], list[float]]:
  """Returns (xs, values) of metric over run's evaluations with a known x, xs ascending."""
  points = sorted((x, e[metric]) for x, e in zip(eval_positions(run, axis), run['evals'])
                  if x is not None and stats.is_number(e.get(metric)))
  return [p[0] for p in points], [p[1] for p in points]


def common_x(runs: list[dict], axis: str) -> float | None:
  """Returns the largest x on axis that every run with evaluations reaches (None for step)."""
  if axis == 'step':
    return None
  lacking = [r['name'] for r in runs if any(e['step'] > 0 for e in r['evals'])
             and not any(stats.is_number(c.get(AXES[axis])) for c in r['counts'])]
  if lacking:
    raise ValueError(f'--align {axis}: {", ".join(lacking)} log no {AXES[axis]} (trained before '
                     'mlmjax counted it); use --align step')
  ends = [max(x for x in xs if x is not None) for xs in (eval_positions(r, axis) for r in runs)
          if any(x is not None for x in xs)]
  return min(ends) if ends else None
