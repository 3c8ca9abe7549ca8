r"""Downstream suites: `python -m mlmjax.evalsuite RUN_DIRS... --suite local --seeds 3`.

  python -m mlmjax.evalsuite runs/abl --suite local --seeds 3 [--tasks bbc,bible] \
      [--set train.num_steps=100]

Every pretrained run (a workdir, or every run under a sweep directory) is fine-tuned on every task
of the suite (the presets of configs/finetune.py) once per seed, in RUN/downstream/TASK/seedS.
Finished pairs are skipped and interrupted ones resume. As soon as a run's pairs are done,
RUN/downstream.json holds, per task, the mean over seeds of the task's test metrics;
`mlmjax.report` joins them as `task/metric` columns. RUN/downstream/results.json keeps every
seed's value and the spread.
"""

import argparse
import json
import pathlib
import shutil
import statistics
from typing import Any, Callable, Sequence

from mlmjax import cli, run_dirs, run_files, sweep, train
from mlmjax.configs import finetune

RESULTS = 'results.json'
REQUEST = 'evalsuite.json'  # in each fine-tune's workdir: its task and --set values
_NOT_METRICS = ('test/examples', 'test/loss')  # counts and the training objective, not scores


def suite_tasks(suite: str, tasks: Sequence[str] = ()) -> list[str]:
  """Returns the presets of a suite, or its listed subset (ValueError naming an unknown one)."""
  if suite not in finetune.SUITES:
    raise ValueError(f'--suite {suite!r}: choose one of {sorted(finetune.SUITES)}')
  names = list(finetune.SUITES[suite])
  unknown = [t for t in tasks if t not in names]
  if unknown:
    raise ValueError(f'--tasks {unknown[0]!r} is not in suite {suite!r} ({", ".join(names)})')
  return [t for t in names if t in tasks] if tasks else names


def task_metrics(summary: dict, task: str = '') -> dict[str, float]:
  """Returns a finished fine-tune's test metrics {metric: value}: the preset's METRICS, in order.

  A preset without METRICS reports every number under test/ except the example count and loss.
  """
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  keys = finetune.METRICS.get(task) or [k for k in summary if k.startswith('test/')
                                        and k not in _NOT_METRICS]
  return {k[len('test/'):]: float(summary[k]) for k in keys if number(summary.get(k))}


def pretrained_runs(paths: Sequence[str]) -> list[pathlib.Path]:
  """Returns the pretraining workdirs at or under each path (fine-tuning runs are left out)."""
  runs = []
  for p in map(pathlib.Path, paths):
    if not p.is_dir():
      raise FileNotFoundError(f'{p}: no such directory')
    found = [r for r in run_dirs.find_runs(p)
             if json.loads((r / 'config.json').read_text()).get('task', 'mlm') == 'mlm']
    if not found:
      raise FileNotFoundError(f'{p}: holds no pretraining run (config.json with task mlm)')
    runs += [r for r in found if r not in runs]
  return runs


def task_config(task: str, run_dir: pathlib.Path, seed: int, sets: Sequence[str]):
  """Returns the fine-tuning config of preset `task` from run_dir at `seed`, with --set applied."""
  config = finetune.get_config(task)
  overrides = dict(sweep.parse_assignment(config, s, '--set', many=False) for s in sets)
  overrides = {k: v[0] for k, v in overrides.items()}
  if 'seed' in overrides or 'init_from' in overrides:
    raise ValueError('--set seed / init_from: the suite sets them (use --seeds and the run dirs)')
  return sweep.apply(config, {**overrides, 'init_from': str(run_dir), 'seed': seed})


def _check_request(workdir: pathlib.Path, request: dict) -> None:
  """Raises ValueError if workdir was started by a suite with another task or other --set values.

  The request, not config.json, is compared: a run records the defaults it adapted to its budget
  and the architecture it adopted from init_from, which a fresh config does not have.
  """
  path = workdir / REQUEST
  if path.is_file():
    old = json.loads(path.read_text())
    if old != request:
      raise ValueError(f'{workdir} was started with --set {" ".join(old["set"]) or "(none)"}; this '
                       f'suite gives --set {" ".join(request["set"]) or "(none)"}: use the same '
                       'values or delete that directory')


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, Any]]:
  """Returns {metric: {mean, sd, n, values}} over seeds (sd None for one seed)."""
  out = {}
  for metric in sorted(set().union(*per_seed.values())):
    values = [per_seed[s][metric] for s in sorted(per_seed) if metric in per_seed[s]]
    out[metric] = {'mean': statistics.fmean(values),
                   'sd': statistics.stdev(values) if len(values) > 1 else None,
                   'n': len(values), 'values': values}
  return out


def write_downstream(run_dir: pathlib.Path, results: dict[str, dict]) -> None:
  """Merges {task: {metric: mean}} into run_dir/downstream.json; other entries are kept."""
  path = run_dir / 'downstream.json'
  merged = json.loads(path.read_text()) if path.is_file() else {}
  for task, metrics in results.items():
    merged[task] = {m: a['mean'] for m, a in metrics.items()}
  run_files.atomic_write_json(path, merged)


def run_suite(run_paths: Sequence[str], suite: str, seeds: int, *, tasks: Sequence[str] = (),
              sets: Sequence[str] = (), keep_checkpoints: bool = False, dry_run: bool = False,
              log: Callable[[str], None] = print) -> dict[str, dict]:
  """Fine-tunes every run on every task for `seeds` seeds; returns {run: {task: aggregates}}."""
  if seeds < 1:
    raise ValueError(f'--seeds {seeds}: must be >= 1')
  names = suite_tasks(suite, tasks)
  runs = pretrained_runs(run_paths)
  for task in names:  # bad --set values fail before anything trains
    task_config(task, runs[0], 0, sets)
  pairs = len(runs) * len(names) * seeds
  log(f'evalsuite {suite}: {len(runs)} run(s) x {len(names)} task(s) x {seeds} seed(s) = '
      f'{pairs} fine-tunes')
  out, k = {}, 0
  for run_dir in runs:  # each run's downstream.json is written once its pairs are done
    done = {}
    for task, seed in [(t, s) for t in names for s in range(seeds)]:
      k += 1
      workdir = run_dir / 'downstream' / task / f'seed{seed}'
      state, step = sweep.disk_state(workdir)
      prefix = f'[{k}/{pairs}] {run_dir} {task} seed {seed}'
      if not (run_dir / 'summary.json').is_file() or not json.loads(
          (run_dir / 'summary.json').read_text()).get('finished'):
        log(f'{prefix}: pretraining has not finished; skipped')
        continue
      config = task_config(task, run_dir, seed, sets)
      _check_request(workdir, {'task': task, 'set': sorted(sets)})
      if state == 'finished':
        log(f'{prefix}: finished before, skipped')
      elif dry_run:
        log(f'{prefix}: ' + (f'resume from step {step}' if state == 'partial' else 'train'))
        continue
      else:
        log(f'{prefix}: ' + (f'resuming from step {step}' if state == 'partial' else 'training'))
        workdir.mkdir(parents=True, exist_ok=True)
        run_files.atomic_write_json(workdir / REQUEST, {'task': task, 'set': sorted(sets)})
        summary = train.run(config, workdir)
        if summary.get('preempted') or not summary.get('finished'):
          log(f'evalsuite stopped: {workdir} did not finish (step {summary["step"]}); '
              'rerun to resume')
          return out
        if not keep_checkpoints:  # the metrics are in summary.json; weights of a suite add up
          for sub in ('checkpoints', 'best'):
            shutil.rmtree(workdir / sub, ignore_errors=True)
      summary = json.loads((workdir / 'summary.json').read_text())
      done.setdefault(task, {})[seed] = task_metrics(summary, task)
    results = {t: aggregate(per_seed) for t, per_seed in done.items() if len(per_seed) == seeds}
    if results:
      out[str(run_dir)] = results
      write_downstream(run_dir, results)
      path = run_dir / 'downstream' / RESULTS
      old = json.loads(path.read_text()) if path.is_file() else {}
      run_files.atomic_write_json(path, {**old, **results})
      log(f'{run_dir}: ' + '; '.join(
          f'{t} ' + ', '.join(f'{m} {a["mean"]:.4f}' + (f' ± {a["sd"]:.4f}' if a['sd'] else '')
                              for m, a in ms.items()) for t, ms in results.items()))
  if not dry_run:
    log(f'report: python -m mlmjax.report {" ".join(map(str, run_paths))}')
  return out


def main(argv=None) -> None:
  """Parses the command line and runs the suite."""
  p = argparse.ArgumentParser(prog='python -m mlmjax.evalsuite', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('runs', nargs='+', help='pretraining workdirs or sweep directories')
  p.add_argument('--suite', default='local', help=f'one of {sorted(finetune.SUITES)}')
  p.add_argument('--seeds', type=int, default=3, help='fine-tuning seeds per task: 0..K-1')
  p.add_argument('--tasks', default='', help='comma-separated subset of the suite')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='override for every fine-tune, e.g. train.num_steps=100 (repeatable)')
  p.add_argument('--keep_checkpoints', action='store_true',
                 help='keep each fine-tune\'s checkpoints (default: removed once it has finished)')
  p.add_argument('--dry_run', action='store_true', help='print what would run, then exit')
  args = p.parse_args(argv)
  tasks = [t for t in args.tasks.split(',') if t]
  try:
    with cli.user_errors():
      run_suite(args.runs, args.suite, args.seeds, tasks=tasks, sets=args.set,
                keep_checkpoints=args.keep_checkpoints, dry_run=args.dry_run)
  except KeyError as e:
    cli.fail(f'error: {e.args[0]}')


if __name__ == '__main__':
  main()
