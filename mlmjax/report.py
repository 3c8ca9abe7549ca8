"""Sweep reports: `python -m mlmjax.report runs/abl` writes report.md, CSV tables and PNG plots.

Runs that differ only in `seed` form a group; per group and metric the report gives n, the mean,
the standard deviation and a 95% Student-t interval over the seeds (mlmjax/stats.py), and with
--baseline the paired per-seed differences to the baseline group. --align step|flops|predictions
compares runs at their final evaluation, or at the largest training FLOPs or predictions seen
that every run reaches.
"""

import argparse
import csv
import math
import pathlib
import sys
from typing import Any, Sequence

from mlmjax import run_dirs, stats
from mlmjax.run_dirs import (ACCURACY, AXES, AXIS_TITLES, COUNTERS, DEFAULT_METRIC, LOSS, RATE_KEY,
                         SEED_KEY, STRATEGY_KEY, UNIGRAM, curve, sort_key, varied_keys)

def aligned_column(metric: str, axis: str) -> str:
  """Returns the table column of metric at the common x (the final value's column at step)."""
  return metric if axis == 'step' else f'{metric}@{axis}'


# ---------------------------------------------------------------------------------------------
# The per-run table.


def summarize(run: dict, metric: str) -> dict[str, Any]:
  """Returns one report row (without the varied settings): losses, accuracies, tokens, time."""
  evals, summary = run['evals'], run['summary']
  last = evals[-1] if evals else {}
  best = min(evals, key=lambda r: r[LOSS]) if evals else {}
  row = {'finished': bool(summary.get('finished')) and run['step'] >= summary.get('num_steps', 0),
         'step': run['step'],
         'num_steps': summary.get('num_steps', run['config'].get('train.num_steps')),
         'best_eval_loss': best.get(LOSS), 'best_eval_step': best.get('step'),
         'final_eval_step': last.get('step'), LOSS: last.get(LOSS), ACCURACY: last.get(ACCURACY),
         DEFAULT_METRIC: last.get(DEFAULT_METRIC), UNIGRAM: last.get(UNIGRAM)}
  if metric not in row:
    row[metric] = last.get(metric)
  row['tokens_seen'] = summary.get('tokens_seen')
  row['wall_time_s'] = summary.get('wall_time_s')
  for key in COUNTERS[1:]:  # at the last training record
    row[key] = next((c[key] for c in reversed(run['counts']) if key in c), None)
  return row


def compared_metrics(metric: str) -> list[str]:
  """Returns the validation metrics the grouped tables compare: loss, accuracies, metric."""
  return list(dict.fromkeys((LOSS, DEFAULT_METRIC, ACCURACY, metric)))


def build_table(runs: list[dict], metric: str = DEFAULT_METRIC, axis: str = 'step',
                x: float | None = None) -> tuple[list[str], list[dict]]:
  """Returns (columns, rows): run, varied settings, results, values at x, downstream columns."""
  varied = varied_keys(runs)
  runs = sorted(runs, key=lambda r: ([sort_key(r['config'].get(k)) for k in varied], r['name']))
  downstream = sorted(set().union(*(r['downstream'] for r in runs)))
  rows = []
  for r in runs:
    row = {'run': r['name'], **{k: r['config'].get(k) for k in varied}, **summarize(r, metric)}
    if axis != 'step':
      for m in compared_metrics(metric):
        xs, ys = curve(r, axis, m)
        row[aligned_column(m, axis)] = None if x is None else stats.interpolate(xs, ys, x)
    row.update({k: r['downstream'].get(k) for k in downstream})
    rows.append(row)
  columns = list(rows[0]) if rows else ['run']
  return columns, rows


# ---------------------------------------------------------------------------------------------
# Groups over seeds, paired differences against a baseline group.


def group_runs(runs: list[dict], rows: list[dict]) -> list[dict]:
  """Returns the groups of rows whose runs differ only in seed: label, settings, rows, seeds."""
  keys = [k for k in varied_keys(runs) if k != SEED_KEY]
  by_name = {r['name']: r for r in runs}
  groups: dict[str, dict] = {}
  for row in rows:
    config = by_name[row['run']]['config']
    settings = {k: config.get(k) for k in keys}
    g = groups.setdefault(repr(tuple(settings.values())), {
        'label': run_dirs.settings_label(settings) or 'all runs', 'settings': settings, 'rows': [],
        'seeds': []})
    g['rows'].append(row)
    g['seeds'].append(config.get(SEED_KEY))
  return sorted(groups.values(), key=lambda g: [sort_key(v) for v in g['settings'].values()])


def per_seed(group: dict, column: str) -> dict[Any, float]:
  """Returns {seed: value of column}; runs of one seed (e.g. copies) give their mean."""
  values: dict[Any, list[float]] = {}
  for seed, row in zip(group['seeds'], group['rows']):
    if stats.is_number(row.get(column)):
      values.setdefault(seed, []).append(float(row[column]))
  return {s: math.fsum(v) / len(v) for s, v in values.items()}


def find_baseline(spec: str, groups: list[dict]) -> dict:
  """Returns the group that spec names: its label, a run's name, or settings `key=value,...`."""
  for g in groups:
    if g['label'] == spec or any(row['run'] == spec for row in g['rows']):
      return g
  pairs = [part.partition('=') for part in spec.split(',')]
  keys = list(groups[0]['settings']) if groups else []
  matches = []
  for name, sep, text in pairs:
    if not sep or not any(name in (k, k.rsplit('.', 1)[-1]) for k in keys):
      raise ValueError(f'--baseline {spec!r}: {name!r} is not a varied setting; name a group '
                       f'({", ".join(g["label"] for g in groups)}) or a run')

  def same(value, text):
    if run_dirs.format_setting(value) == text:
      return True
    try:
      return stats.is_number(value) and float(text) == value
    except ValueError:
      return False

  for g in groups:
    if all(any(name in (k, k.rsplit('.', 1)[-1]) and same(v, text)
               for k, v in g['settings'].items()) for name, _, text in pairs):
      matches.append(g)
  if len(matches) != 1:
    what = 'no group' if not matches else f'{len(matches)} groups'
    raise ValueError(f'--baseline {spec!r} matches {what}; the groups are '
                     f'{", ".join(g["label"] for g in (matches or groups))}')
  return matches[0]


def group_table(groups: list[dict], columns: list[str], baseline: dict | None,
                align: tuple[str, float | None]) -> tuple[list[str], list[dict]]:
  """Returns (columns, rows) of report_groups.csv: n, mean, sd, interval (and Δ) per column."""
  out = []
  for g in groups:
    row = {'group': g['label'], **g['settings'], 'runs': len(g['rows']),
           'seeds': ' '.join(str(s) for s in sorted(set(g['seeds']), key=sort_key)),
           'align': align[0], 'align_x': align[1]}
    for c in columns:
      e = stats.estimate(per_seed(g, c).values())
      row.update({f'{c}/n': e.n, f'{c}/mean': e.mean, f'{c}/sd': e.sd, f'{c}/ci_low': e.low,
                  f'{c}/ci_high': e.high})
      if baseline is not None:
        d = None if g is baseline else stats.paired(per_seed(g, c), per_seed(baseline, c))
        row.update({f'{c}/diff_n': d and d.n, f'{c}/diff_mean': d and d.mean,
                    f'{c}/diff_low': d and d.low, f'{c}/diff_high': d and d.high,
                    f'{c}/significant': d and d.significant})
    out.append(row)
  return (list(out[0]) if out else ['group']), out


# ---------------------------------------------------------------------------------------------
# report.md and the CSV files.


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
    if column in COUNTERS:
      return f'{value:.3g}'
    return f'{value:.4f}' if abs(value) >= 1e-3 or value == 0 else f'{value:.3g}'
  return str(value).replace('|', '\\|')


_HEADINGS = {'finished': 'finished', 'step': 'steps', 'best_eval_loss': 'best val loss',
             'best_eval_step': 'at step', 'final_eval_step': 'final eval step',
             LOSS: 'final val loss', ACCURACY: 'acc (all selected)', DEFAULT_METRIC: 'acc@[MASK]',
             UNIGRAM: 'unigram acc@[MASK]',
             'tokens_seen': 'tokens seen', 'wall_time_s': 'wall time',
             'train/cum_flops': 'training FLOPs', 'train/cum_predictions': 'predictions seen'}
_NAMES = {LOSS: 'validation loss', ACCURACY: 'accuracy, all selected positions',
          DEFAULT_METRIC: 'acc@[MASK]'}


def _align_line(axis: str, x: float | None) -> str:
  if axis == 'step':
    return ('Compared at each run\'s final evaluation (`--align step`; use `--align flops` or '
            '`--align predictions` to compare at equal compute or equal supervision).')
  what = {'flops': 'training FLOPs', 'predictions': 'predictions seen'}[axis]
  at = '–' if x is None else f'{x:.4g}'
  return (f'Compared at equal {what} (`--align {axis}`): {at} {AXES[axis]}, the largest that every '
          'run reaches. Each run\'s validation metrics are interpolated linearly between its two '
          'evaluations around that point, whose own x comes from the training records '
          '(linear in step between them); the `@' + axis + '` columns hold them. Downstream '
          'columns are of each run\'s final checkpoint.')


def _interval(low, high, column: str) -> str:
  return '–' if low is None else f'[{_fmt(low, column)}, {_fmt(high, column)}]'


def _signed(value, column: str) -> str:
  return _fmt(value, column) if value is None or value < 0 else '+' + _fmt(value, column)


def group_markdown(groups: list[dict], grows: list[dict], columns: list[str],
                   baseline: dict | None, axis: str) -> list[str]:
  """Returns the lines of report.md's grouped section: one table per compared column."""
  lines = ['## Groups over seeds', '',
           f'{len(groups)} group(s) of runs that differ only in `seed`. Per group: n seeds, the '
           'mean, the sample standard deviation (sd) and the 95% confidence interval of the mean, '
           'Student t with n−1 degrees of freedom on the per-seed values (mean ± t·sd/√n); – '
           'where n < 2.']
  if baseline is not None:
    lines.append(f'Δ: the paired difference to the baseline `{baseline["label"]}`, seed by seed '
                 '(same seed: same data order and initial weights), with the 95% t-interval of '
                 'those differences (the paired t-test\'s); `*` marks an interval that excludes '
                 'zero.')
  dupes = [f'`{g["label"]}` has {g["seeds"].count(s)} runs of seed {s}' for g in groups
           for s in sorted(set(g['seeds']), key=sort_key) if g['seeds'].count(s) > 1]
  if dupes:
    lines.append('; '.join(dupes) + ': each seed counts once, as the mean of its runs.')
  lines.append('')
  for c in columns:
    base = c[:-len(f'@{axis}')] if axis != 'step' and c.endswith(f'@{axis}') else c
    title = f'{_NAMES[base]} (`{base}`)' if base in _NAMES else f'`{base}`'
    lines += [f'### {title}' + ('' if c == base else f' at equal {axis}'), '']
    heads = ['group', 'n', 'mean', 'sd', '95% CI']
    if baseline is not None:
      heads += ['Δ vs baseline', '95% CI of Δ']
    lines += ['| ' + ' | '.join(heads) + ' |', '|' + '---|' * len(heads)]
    for g, row in zip(groups, grows):
      cells = [g['label'].replace('|', '\\|'), str(row[f'{c}/n']), _fmt(row[f'{c}/mean'], c),
               _fmt(row[f'{c}/sd'], c), _interval(row[f'{c}/ci_low'], row[f'{c}/ci_high'], c)]
      if baseline is not None:
        if g is baseline:
          cells += ['baseline', '']
        elif not row[f'{c}/diff_n']:
          cells += ['no common seed', '']
        else:
          cells += [_signed(row[f'{c}/diff_mean'], c) + (' *' if row[f'{c}/significant'] else ''),
                    _interval(row[f'{c}/diff_low'], row[f'{c}/diff_high'], c)]
      lines.append('| ' + ' | '.join(cells) + ' |')
    lines.append('')
  return lines


def markdown(root: pathlib.Path, runs: list[dict], columns: list[str], rows: list[dict],
             metric: str, groups_section: Sequence[str] = (), align_line: str = '') -> str:
  """Returns report.md: what was compared, the grouped section, then one table row per run."""
  eval_rates = sorted({r['config'].get('eval.rate') for r in runs}, key=sort_key)
  if len(eval_rates) == 1 and isinstance(eval_rates[0], (int, float)):
    rate_line = (f'Validation masks a fixed {100 * eval_rates[0]:g}% of tokens '
                 f'(`eval.rate={eval_rates[0]}`) with a fixed key, whatever the training masking '
                 'rate, so every run answers the same question.')
  else:
    rate_line = ('`eval.rate` differs across runs (see its column): their validation numbers do '
                 'not compare.')
  varied = varied_keys(runs)
  unfinished = sum(not row['finished'] for row in rows)
  lines = [f'# Sweep report: {root}', '',
           f'{len(rows)} runs; varied settings: {", ".join(f"`{k}`" for k in varied) or "none"}.',
           rate_line,
           '`acc@[MASK]` is the accuracy where the input shows [MASK]; `unigram acc@[MASK]` is '
           'what always guessing by training-set frequency scores on the same masks. Losses are '
           'mean cross-entropy (nats) over the selected positions; best and final are over the '
           'evaluations in metrics.jsonl.', *([align_line] if align_line else []), '']
  if unfinished:
    lines += [f'{unfinished} run(s) have not finished (`finished` = no): their numbers are from '
              'their last evaluation so far.', '']
  lines += list(groups_section)
  shown = [c for c in columns if c != 'num_steps']  # the step column reads `35/60`
  heads = [_HEADINGS.get(c, c) for c in shown]
  lines += ['## Runs', '', '| ' + ' | '.join(heads) + ' |', '|' + '---|' * len(heads)]
  for row in rows:
    # Settings as the config writes them (0.15, not 0.1500); results rounded.
    cells = [repr(row[c]) if c in varied and isinstance(row[c], float)
             else f'{row[c]}/{_fmt(row["num_steps"], "")}' if c == 'step' else _fmt(row[c], c)
             for c in shown]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', f'Plots: `curves.png` ({metric} and eval/loss against the x axis, one line per '
            'group: the mean over its seeds with its 95% interval shaded), `final_vs_rate.png` '
            f'(the compared {metric} against `masking.rate`, error bars: 95% intervals).', '']
  return '\n'.join(lines)


def write_csv(path: pathlib.Path, columns: list[str], rows: list[dict]) -> None:
  """Writes the table with full precision; tuples as their Python form, missing values empty."""
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(columns)
    for row in rows:
      w.writerow(['' if row[c] is None else row[c] for c in columns])


# ---------------------------------------------------------------------------------------------
# Plots.


def _label(run: dict, keys: list[str]) -> str:
  parts = [f'{k.rsplit(".", 1)[-1]}={_fmt(run["config"].get(k), "")}' for k in keys]
  return ', '.join(parts) or run['name']


def plot(out: pathlib.Path, runs: list[dict], groups: list[dict], grows: list[dict], metric: str,
         axis: str = 'step', x: float | None = None) -> list[pathlib.Path]:
  """Writes curves.png and final_vs_rate.png; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  varied = varied_keys(runs)
  by_name = {r['name']: r for r in runs}
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for g in groups:
    members = [by_name[row['run']] for row in g['rows']]
    finished = all(row['finished'] for row in g['rows'])
    style = '-' if finished else '--'
    name = members[0]['name'] if len(members) == 1 else f'{g["label"]} (n={len(members)})'
    label = name + ('' if finished else ' (unfinished)')
    for ax, m in zip(axes, (metric, LOSS)):
      grid, ests = stats.band([curve(r, axis, m) for r in members])
      line, = ax.plot(grid, [e.mean for e in ests], style, marker='.', label=label)
      spread = [(xx, e.low, e.high) for xx, e in zip(grid, ests) if e.low is not None]
      if spread:
        ax.fill_between([p[0] for p in spread], [p[1] for p in spread], [p[2] for p in spread],
                        color=line.get_color(), alpha=0.2, lw=0)
  unigrams = {row[UNIGRAM] for g in groups for row in g['rows'] if row[UNIGRAM] is not None}
  if metric == DEFAULT_METRIC and len(unigrams) == 1:
    axes[0].axhline(unigrams.pop(), color='gray', lw=1, ls=':', label='unigram baseline')
  for ax, name in zip(axes, (metric, LOSS)):
    if x is not None:
      ax.axvline(x, color='gray', lw=1, ls='-.', label=f'compared at equal {axis}')
    ax.set_xlabel(AXIS_TITLES[axis])
    ax.set_ylabel(f'validation {name}')
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='upper center', bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8)
  fig.tight_layout()
  curves = out / 'curves.png'
  fig.savefig(curves, dpi=120, bbox_inches='tight')
  plt.close(fig)

  # One line per setting of everything varied except rate and seed (per strategy in a rate x
  # strategy grid); one point per group, with its interval as error bars.
  lines: dict[str, list] = {}
  others = [k for k in varied if k not in (RATE_KEY, STRATEGY_KEY, SEED_KEY)]
  if any(STRATEGY_KEY in r['config'] for r in runs):
    others.insert(0, STRATEGY_KEY)
  column = aligned_column(metric, axis)
  for g, row in zip(groups, grows):
    first = by_name[g['rows'][0]['run']]
    rate = first['config'].get(RATE_KEY)
    if rate is not None and row[f'{column}/mean'] is not None:
      lines.setdefault(_label(first, others) if others else 'all runs', []).append(
          (rate, row[f'{column}/mean'], row[f'{column}/ci_low'], row[f'{column}/ci_high'],
           all(r['finished'] for r in g['rows'])))
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for label, points in sorted(lines.items()):
    points.sort(key=lambda p: p[0])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    line, = ax.plot(xs, ys, '-', label=label)
    errors = [[y - (p[2] if p[2] is not None else y) for y, p in zip(ys, points)],
              [(p[3] if p[3] is not None else y) - y for y, p in zip(ys, points)]]
    ax.errorbar(xs, ys, yerr=errors, fmt='none', ecolor=line.get_color(), capsize=3)
    ax.scatter(xs, ys, color=line.get_color(),
               facecolors=[line.get_color() if p[4] else 'none' for p in points], zorder=3)
  ax.set_xlabel('training masking rate (masking.rate)')
  ax.set_ylabel(f'validation {metric}' + (' (final)' if axis == 'step' else f' at equal {axis}'))
  if not all(p[4] for points in lines.values() for p in points):
    ax.set_title('hollow markers: unfinished runs', fontsize=8)
  ax.grid(alpha=0.3)
  if lines:
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.15), fontsize=8)
  final = out / 'final_vs_rate.png'
  fig.savefig(final, dpi=120, bbox_inches='tight')
  plt.close(fig)
  return [curves, final]


# ---------------------------------------------------------------------------------------------
# The report.


def write_report(root, out=None, metric: str = DEFAULT_METRIC, align: str = 'step',
                 baseline: str | None = None) -> dict[str, pathlib.Path]:
  """Writes report.md, report.csv, report_groups.csv and the plots of root's runs; returns paths."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f'{root}: no such directory')
  if align not in AXES:
    raise ValueError(f'--align {align!r}: choose one of {", ".join(AXES)}')
  out = pathlib.Path(out) if out else root / 'report'
  paths = run_dirs.find_runs(root)
  if not paths:
    raise FileNotFoundError(f'{root}: no run directories (config.json with metrics.jsonl or '
                            'summary.json)')
  runs = [run_dirs.load_run(p, root) for p in paths]
  known = set().union(*(set(e) for r in runs for e in r['evals']))
  if known and metric not in known:
    choices = sorted(k for k in known if k.startswith(('eval/', 'baseline/')))
    raise ValueError(f'--metric {metric!r} is in no evaluation record; choose one of {choices}')
  x = run_dirs.common_x(runs, align)
  columns, rows = build_table(runs, metric, align, x)
  groups = group_runs(runs, rows)
  base = find_baseline(baseline, groups) if baseline else None
  downstream = sorted(set().union(*(r['downstream'] for r in runs)))
  compared = [aligned_column(m, align) for m in compared_metrics(metric)] + downstream
  gcolumns, grows = group_table(groups, compared, base, (align, x))
  out.mkdir(parents=True, exist_ok=True)
  section = group_markdown(groups, grows, compared, base, align)
  (out / 'report.md').write_text(markdown(root, runs, columns, rows, metric, section,
                                          _align_line(align, x)))
  write_csv(out / 'report.csv', columns, rows)
  write_csv(out / 'report_groups.csv', gcolumns, grows)
  curves, final = plot(out, runs, groups, grows, metric, align, x)
  return {'md': out / 'report.md', 'csv': out / 'report.csv',
          'groups_csv': out / 'report_groups.csv', 'curves': curves, 'final_vs_rate': final}


def main(argv=None) -> None:
  """Writes the report of the runs under a sweep directory."""
  p = argparse.ArgumentParser(prog='python -m mlmjax.report', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('root', help='a sweep workdir (or any directory holding run workdirs)')
  p.add_argument('--out', default='', help='output directory; default ROOT/report')
  p.add_argument('--metric', default=DEFAULT_METRIC, help='validation metric to plot and compare')
  p.add_argument('--align', default='step', choices=tuple(AXES),
                 help='compare at the final evaluation (step), or at the largest training FLOPs '
                 '(flops) or predictions seen (predictions) that every run reaches')
  p.add_argument('--baseline', default='',
                 help='the group (e.g. rate=0.15,strategy=token) or run that paired differences '
                 'compare against, seed by seed')
  args = p.parse_args(argv)
  try:
    paths = write_report(args.root, args.out or None, args.metric, args.align,
                         args.baseline or None)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  print('\n'.join(f'wrote {path}' for path in paths.values()))


if __name__ == '__main__':
  main()
