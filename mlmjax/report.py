"""Sweep reports: `python -m mlmjax.report runs/abl` writes report.md, report.csv and PNG plots."""

import argparse
import csv
import json
import math
import pathlib
import sys
from typing import Any

from mlmjax import schema

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
RATE_KEY, STRATEGY_KEY = 'masking.rate', 'masking.strategy'


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
  """Returns one run's config, summary, eval records and downstream results, read from its workdir."""
  summary = _read_json(path / 'summary.json') if (path / 'summary.json').is_file() else {}
  records = read_metrics(path / 'metrics.jsonl')
  evals = sorted((r for r in records if LOSS in r), key=lambda r: r['step'])
  last_step = max((r.get('step', 0) for r in records), default=0)
  return {'name': path.relative_to(root).as_posix() if path != root else path.name,
          'path': path, 'summary': summary,
          'config': flatten(schema.upgrade(_read_json(path / 'config.json')).to_dict()),
          'evals': evals, 'step': max(int(summary.get('step', 0)), last_step),
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


def _sort_key(value) -> tuple:
  return (value is None, str(type(value)), value if value is not None else 0)


def summarize(run: dict, metric: str) -> dict[str, Any]:
  """Returns one report row (without the varied settings): losses, accuracies, tokens, time."""
  evals, summary = run['evals'], run['summary']
  last = evals[-1] if evals else {}
  best = min(evals, key=lambda r: r[LOSS]) if evals else {}
  row = {'finished': bool(summary.get('finished')) and run['step'] >= summary.get('num_steps', 0),
         'step': run['step'], 'num_steps': summary.get('num_steps', run['config'].get('train.num_steps')),
         'best_eval_loss': best.get(LOSS), 'best_eval_step': best.get('step'),
         'final_eval_step': last.get('step'), LOSS: last.get(LOSS), ACCURACY: last.get(ACCURACY),
         DEFAULT_METRIC: last.get(DEFAULT_METRIC), UNIGRAM: last.get(UNIGRAM)}
  if metric not in row:
    row[metric] = last.get(metric)
  row['tokens_seen'] = summary.get('tokens_seen')
  row['wall_time_s'] = summary.get('wall_time_s')
  return row


def build_table(runs: list[dict], metric: str = DEFAULT_METRIC) -> tuple[list[str], list[dict]]:
  """Returns (columns, rows): run, varied settings, results, then downstream columns."""
  varied = varied_keys(runs)
  runs = sorted(runs, key=lambda r: ([_sort_key(r['config'].get(k)) for k in varied], r['name']))
  downstream = sorted(set().union(*(r['downstream'] for r in runs)))
  rows = []
  for r in runs:
    row = {'run': r['name'], **{k: r['config'].get(k) for k in varied}, **summarize(r, metric)}
    row.update({k: r['downstream'].get(k) for k in downstream})
    rows.append(row)
  columns = list(rows[0]) if rows else ['run']
  return columns, rows


def _fmt(value, column: str) -> str:
  if value is None:
    return '–'
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, tuple):
    return '(' + ', '.join(_fmt(v, '') for v in value) + ')'
  if isinstance(value, float):
    if not math.isfinite(value):
      return str(value)
    if column == 'tokens_seen':
      return f'{value / 1e6:.2f}M'
    if column == 'wall_time_s':
      return f'{value / 60:.1f} min'
    return f'{value:.4f}' if abs(value) >= 1e-3 or value == 0 else f'{value:.3g}'
  return str(value).replace('|', '\\|')


_HEADINGS = {'finished': 'finished', 'step': 'steps', 'best_eval_loss': 'best val loss',
             'best_eval_step': 'at step', 'final_eval_step': 'final eval step', LOSS: 'final val loss',
             ACCURACY: 'acc (all selected)', DEFAULT_METRIC: 'acc@[MASK]', UNIGRAM: 'unigram acc@[MASK]',
             'tokens_seen': 'tokens seen', 'wall_time_s': 'wall time'}


def markdown(root: pathlib.Path, runs: list[dict], columns: list[str], rows: list[dict], metric: str) -> str:
  """Returns report.md: a header saying what was compared, then one table row per run."""
  eval_rates = sorted({r['config'].get('eval.rate') for r in runs}, key=_sort_key)
  if len(eval_rates) == 1 and isinstance(eval_rates[0], (int, float)):
    rate_line = (f'Validation masks a fixed {100 * eval_rates[0]:g}% of tokens '
                 f'(`eval.rate={eval_rates[0]}`) with a fixed key, whatever the training masking rate, so every run answers the same question.')
  else:
    rate_line = '`eval.rate` differs across runs (see its column): their validation numbers do not compare.'
  varied = varied_keys(runs)
  unfinished = sum(not row['finished'] for row in rows)
  lines = [f'# Sweep report: {root}', '',
           f'{len(rows)} runs; varied settings: {", ".join(f"`{k}`" for k in varied) or "none"}.',
           rate_line,
           '`acc@[MASK]` is the accuracy where the input shows [MASK]; `unigram acc@[MASK]` is what '
           'always guessing by training-set frequency scores on the same masks. Losses are mean '
           'cross-entropy (nats) over the selected positions; best and final are over the evaluations '
           'in metrics.jsonl.', '']
  if unfinished:
    lines += [f'{unfinished} run(s) have not finished (`finished` = no): their numbers are from their last '
              'evaluation so far.', '']
  shown = [c for c in columns if c != 'num_steps']  # the step column reads `35/60`
  heads = [_HEADINGS.get(c, c) for c in shown]
  lines += ['| ' + ' | '.join(heads) + ' |', '|' + '---|' * len(heads)]
  for row in rows:
    # Settings as the config writes them (0.15, not 0.1500); results rounded.
    cells = [repr(row[c]) if c in varied and isinstance(row[c], float)
             else f'{row[c]}/{_fmt(row["num_steps"], "")}' if c == 'step' else _fmt(row[c], c) for c in shown]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', f'Plots: `curves.png` ({metric} and eval/loss against step), '
            f'`final_vs_rate.png` (final {metric} against `masking.rate`).', '']
  return '\n'.join(lines)


def write_csv(path: pathlib.Path, columns: list[str], rows: list[dict]) -> None:
  """Writes the table with full precision; tuples as their Python form, missing values empty."""
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(columns)
    for row in rows:
      w.writerow(['' if row[c] is None else row[c] for c in columns])


def _label(run: dict, keys: list[str]) -> str:
  parts = [f'{k.rsplit(".", 1)[-1]}={_fmt(run["config"].get(k), "")}' for k in keys]
  return ', '.join(parts) or run['name']


def plot(out: pathlib.Path, runs: list[dict], rows: list[dict], metric: str) -> list[pathlib.Path]:
  """Writes curves.png and final_vs_rate.png; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  varied = varied_keys(runs)
  by_name = {r['name']: r for r in runs}
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for row in rows:
    run = by_name[row['run']]
    steps = [r['step'] for r in run['evals']]
    style = '-' if row['finished'] else '--'
    label = run['name'] + ('' if row['finished'] else ' (unfinished)')
    axes[0].plot(steps, [r.get(metric, math.nan) for r in run['evals']], style, marker='.', label=label)
    axes[1].plot(steps, [r[LOSS] for r in run['evals']], style, marker='.', label=label)
  unigrams = {row[UNIGRAM] for row in rows if row[UNIGRAM] is not None}
  if metric == DEFAULT_METRIC and len(unigrams) == 1:
    axes[0].axhline(unigrams.pop(), color='gray', lw=1, ls=':', label='unigram baseline')
  for ax, name in zip(axes, (metric, LOSS)):
    ax.set_xlabel('step')
    ax.set_ylabel(f'validation {name}')
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='upper center', bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8)
  fig.tight_layout()
  curves = out / 'curves.png'
  fig.savefig(curves, dpi=120, bbox_inches='tight')
  plt.close(fig)

  # One line per setting of everything varied except the rate (per strategy in a rate x strategy grid).
  groups: dict[str, list] = {}
  others = [k for k in varied if k not in (RATE_KEY, STRATEGY_KEY)]
  if any(STRATEGY_KEY in r['config'] for r in runs):
    others.insert(0, STRATEGY_KEY)
  for row in rows:
    run = by_name[row['run']]
    rate = run['config'].get(RATE_KEY)
    if rate is not None and row[metric] is not None:
      groups.setdefault(_label(run, others) if others else 'all runs', []).append(
          (rate, row[metric], row['finished']))
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for label, points in sorted(groups.items()):
    points.sort()
    line, = ax.plot([p[0] for p in points], [p[1] for p in points], '-', label=label)
    ax.scatter([p[0] for p in points], [p[1] for p in points], color=line.get_color(),
               facecolors=[line.get_color() if p[2] else 'none' for p in points], zorder=3)
  ax.set_xlabel('training masking rate (masking.rate)')
  ax.set_ylabel(f'final validation {metric}')
  if not all(p[2] for points in groups.values() for p in points):
    ax.set_title('hollow markers: unfinished runs', fontsize=8)
  ax.grid(alpha=0.3)
  if groups:
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.15), fontsize=8)
  final = out / 'final_vs_rate.png'
  fig.savefig(final, dpi=120, bbox_inches='tight')
  plt.close(fig)
  return [curves, final]


def write_report(root, out=None, metric: str = DEFAULT_METRIC) -> dict[str, pathlib.Path]:
  """Reads every run under root and writes report.md, report.csv and the plots to out."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f'{root}: no such directory')
  out = pathlib.Path(out) if out else root / 'report'
  paths = find_runs(root)
  if not paths:
    raise FileNotFoundError(f'{root}: no run directories (config.json with metrics.jsonl or summary.json)')
  runs = [load_run(p, root) for p in paths]
  known = set().union(*(set(e) for r in runs for e in r['evals']))
  if known and metric not in known:
    choices = sorted(k for k in known if k.startswith(('eval/', 'baseline/')))
    raise ValueError(f'--metric {metric!r} is in no evaluation record; choose one of {choices}')
  columns, rows = build_table(runs, metric)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'report.md').write_text(markdown(root, runs, columns, rows, metric))
  write_csv(out / 'report.csv', columns, rows)
  curves, final = plot(out, runs, rows, metric)
  return {'md': out / 'report.md', 'csv': out / 'report.csv', 'curves': curves, 'final_vs_rate': final}


def main(argv=None) -> None:
  """Writes the report of the runs under a sweep directory."""
  p = argparse.ArgumentParser(prog='python -m mlmjax.report', description=__doc__)
  p.add_argument('root', help='a sweep workdir (or any directory holding run workdirs)')
  p.add_argument('--out', default='', help='output directory; default ROOT/report')
  p.add_argument('--metric', default=DEFAULT_METRIC, help='validation metric to plot and compare')
  args = p.parse_args(argv)
  try:
    paths = write_report(args.root, args.out or None, args.metric)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  print('\n'.join(f'wrote {path}' for path in paths.values()))


if __name__ == '__main__':
  main()
