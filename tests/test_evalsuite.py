"""Tests for mlmjax.evalsuite: suites, metrics per preset, aggregates, downstream.json, the CLI."""

import csv
import json
import pathlib
import statistics

import pytest

from mlmjax import evalsuite, report, run_dirs, sweep
from mlmjax.configs import finetune


def _run_dir(root: pathlib.Path, name: str, *, task: str = 'mlm', finished: bool = True):
  """Writes the files that make `root/name` a (pretraining or fine-tuning) workdir; returns it."""
  d = root / name
  d.mkdir(parents=True)
  (d / 'config.json').write_text(json.dumps({'task': task, 'seed': 0}))
  (d / 'summary.json').write_text(json.dumps({'finished': finished, 'step': 10}))
  return d


def test_suites_name_presets_that_exist_and_subsets_keep_the_suite_order():
  for suite, names in finetune.SUITES.items():
    assert evalsuite.suite_tasks(suite) == list(names)
    for name in names:
      assert finetune.get_config(name).variant == name and name in finetune.METRICS
  assert evalsuite.suite_tasks('local', ['bible', 'bbc']) == ['bbc', 'bible']
  with pytest.raises(ValueError, match="'nope'.*local"):
    evalsuite.suite_tasks('local', ['nope'])
  with pytest.raises(ValueError, match='--suite'):
    evalsuite.suite_tasks('superglue')


def test_task_metrics_follow_the_presets_list_and_skip_what_is_not_a_score():
  summary = {'test/accuracy': 0.9, 'test/macro_f1': 0.8, 'test/mcc': 0.7, 'test/loss': 0.3,
             'test/examples': 198.0, 'test/parameters': 'best (step 300)', 'eval/accuracy': 0.5,
             'test/per_class': {'a': {'f1': 1.0}}}
  assert evalsuite.task_metrics(summary, 'bbc') == {'accuracy': 0.9, 'macro_f1': 0.8, 'mcc': 0.7}
  # Without a METRICS entry: every number under test/ but the count and the loss.
  assert evalsuite.task_metrics(summary) == {'accuracy': 0.9, 'macro_f1': 0.8, 'mcc': 0.7}
  assert evalsuite.task_metrics({'test/mrr': 0.5}, 'bible') == {'mrr': 0.5}


def test_aggregate_gives_mean_sd_and_every_seed():
  per_seed = {0: {'accuracy': 0.8, 'mcc': 0.5}, 1: {'accuracy': 0.9, 'mcc': 0.7},
              2: {'accuracy': 0.7, 'mcc': 0.6}}
  out = evalsuite.aggregate(per_seed)
  assert out['accuracy']['values'] == [0.8, 0.9, 0.7] and out['accuracy']['n'] == 3
  assert out['accuracy']['mean'] == pytest.approx(0.8)
  assert out['mcc']['sd'] == pytest.approx(statistics.stdev([0.5, 0.7, 0.6]))
  assert evalsuite.aggregate({0: {'accuracy': 0.8}})['accuracy']['sd'] is None


def test_downstream_json_is_merged_and_read_back_by_the_report(tmp_path):
  run = _run_dir(tmp_path, 'rate=0.3')
  (run / 'downstream.json').write_text(json.dumps({'mine': 0.25, 'bbc': {'accuracy': 0.1}}))
  results = {'bbc': evalsuite.aggregate({0: {'accuracy': 0.8}, 1: {'accuracy': 0.6}})}
  evalsuite.write_downstream(run, results)
  assert json.loads((run / 'downstream.json').read_text()) == {
      'mine': 0.25, 'bbc': {'accuracy': pytest.approx(0.7)}}
  assert run_dirs.read_downstream(run) == {'mine': 0.25, 'bbc/accuracy': pytest.approx(0.7)}


def test_only_pretraining_runs_are_fine_tuned(tmp_path):
  sweep_dir = tmp_path / 'abl'
  a, b = _run_dir(sweep_dir, 'rate=0.15'), _run_dir(sweep_dir, 'rate=0.3')
  _run_dir(sweep_dir, 'classifier', task='classify')
  assert evalsuite.pretrained_runs([str(sweep_dir), str(a)]) == [a, b]
  with pytest.raises(FileNotFoundError, match='no pretraining run'):
    evalsuite.pretrained_runs([str(sweep_dir / 'classifier')])
  with pytest.raises(FileNotFoundError, match='no such directory'):
    evalsuite.pretrained_runs([str(tmp_path / 'missing')])


def test_dry_run_lists_every_pair_and_skips_unfinished_pretraining(tmp_path):
  sweep_dir = tmp_path / 'abl'
  _run_dir(sweep_dir, 'rate=0.15')
  _run_dir(sweep_dir, 'rate=0.3', finished=False)
  lines = []
  out = evalsuite.run_suite([str(sweep_dir)], 'local', 2, tasks=['bbc', 'bible'],
                            sets=['train.num_steps=3'], dry_run=True, log=lines.append)
  assert out == {} and lines[0].endswith('2 run(s) x 2 task(s) x 2 seed(s) = 8 fine-tunes')
  assert sum(l.endswith(': train') for l in lines) == 4
  assert sum('pretraining has not finished; skipped' in l for l in lines) == 4
  assert not (sweep_dir / 'rate=0.15' / 'downstream').exists()


def test_bad_arguments_name_the_flag(tmp_path, capsys):
  run = _run_dir(tmp_path, 'run')
  for argv, match in (([str(run), '--seeds', '0'], '--seeds 0'),
                      ([str(run), '--set', 'train.nope=3'], 'train.nope'),
                      ([str(run), '--set', 'seed=3'], '--set seed'),
                      ([str(run), '--suite', 'local', '--tasks', 'cola'], "'cola'")):
    with pytest.raises(SystemExit) as e:
      evalsuite.main(argv + ['--dry_run'])
    assert match in str(e.value) and str(e.value).startswith('error: ')


def _bbc_subset(shared_data: pathlib.Path, path: pathlib.Path, per_label: int) -> pathlib.Path:
  """Writes the first per_label BBC articles of each topic to path (the file is sorted by topic)."""
  kept, counts = [], {}
  for line in (shared_data / 'tasks' / 'bbc_news_topic5.jsonl').read_text().splitlines():
    label = json.loads(line)['label']
    if counts.get(label, 0) < per_label:
      counts[label] = counts.get(label, 0) + 1
      kept.append(line)
  path.write_text('\n'.join(kept) + '\n')
  return path


@pytest.mark.slow
def test_sweep_with_seeds_then_the_suite_then_the_report(make_tiny_config, shared_data, tmp_path):
  base = make_tiny_config()
  base.train.num_steps = base.eval.every_steps = base.ckpt.every_steps = 4
  root = tmp_path / 'abl'
  sweep.run_sweep(base, [('masking.rate', [0.15, 0.3])], root, seeds=[0, 1], log=lambda s: None)
  subset = _bbc_subset(shared_data, tmp_path / 'bbc.jsonl', per_label=16)
  sets = [f'task_data.path={subset}', 'train.num_steps=2', 'train.seq_len=64',
          'train.batch_size=8', 'eval.batch_size=16']
  lines, first = [], root / 'rate=0.15,seed=0' / 'downstream.json'

  def log(line):  # notes whether the first run's results were written before this line
    lines.append((line, first.is_file()))

  out = evalsuite.run_suite([str(root)], 'local', 1, tasks=['bbc'], sets=sets, log=log)
  training = [written for line, written in lines if line.endswith(': training')]
  assert len(out) == 4 and training == [False, True, True, True]  # each run's, once it is done
  for run, results in out.items():
    run = pathlib.Path(run)
    assert set(results['bbc']) == {'accuracy', 'macro_f1', 'mcc'}
    assert run_dirs.read_downstream(run)['bbc/accuracy'] == results['bbc']['accuracy']['mean']
    assert not (run / 'downstream' / 'bbc' / 'seed0' / 'checkpoints').exists()
  # A rerun skips every finished pair; other --set values are refused, naming the key.
  again = []
  assert evalsuite.run_suite([str(root)], 'local', 1, tasks=['bbc'], sets=sets,
                             log=again.append) == out
  assert sum('finished before, skipped' in l for l in again) == 4
  with pytest.raises(ValueError, match='train.num_steps'):
    evalsuite.run_suite([str(root)], 'local', 1, tasks=['bbc'], sets=sets[:1] + sets[2:])

  paths = report.write_report(root, baseline='rate=0.15')
  with open(paths['groups_csv']) as f:
    groups = {row['group']: row for row in csv.DictReader(f)}
  assert list(groups) == ['rate=0.15', 'rate=0.3'] and groups['rate=0.3']['seeds'] == '0 1'
  row = groups['rate=0.3']
  values = [out[str(root / f'rate=0.3,seed={s}')]['bbc']['accuracy']['mean'] for s in (0, 1)]
  assert float(row['bbc/accuracy/mean']) == pytest.approx(statistics.fmean(values))
  assert float(row['bbc/accuracy/ci_low']) <= float(row['bbc/accuracy/mean']) <= float(
      row['bbc/accuracy/ci_high'])
  base_values = [out[str(root / f'rate=0.15,seed={s}')]['bbc']['accuracy']['mean'] for s in (0, 1)]
  assert float(row['bbc/accuracy/diff_mean']) == pytest.approx(
      statistics.fmean(values) - statistics.fmean(base_values))
  assert row['bbc/accuracy/significant'] in ('True', 'False')
  assert 'bbc/accuracy' in paths['md'].read_text()
