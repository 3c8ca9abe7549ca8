"""Sweep reports: one row per run with the varied settings and the numbers of its workdir."""

import csv
import json
import math
import pathlib

import matplotlib.image
import pytest

from mlmjax import report, sweep, train


@pytest.fixture(scope='module')
def runs(tmp_path_factory, make_tiny_config):
  """Three real tiny runs: rates 0.15 and 0.3 finished, a rate-0.3 run with seed 1 stopped early."""
  root = tmp_path_factory.mktemp('abl')
  base = make_tiny_config()
  base.train.num_steps = 60  # the same shapes and steps as tests/test_sweep.py: compiled steps are reused
  base.eval.every_steps = 30
  base.ckpt.every_steps = 30
  summaries = {
      'rate=0.15': train.run(sweep.apply(base, {'masking.rate': 0.15}), root / 'rate=0.15'),
      'rate=0.3': train.run(sweep.apply(base, {'masking.rate': 0.3}), root / 'rate=0.3'),
      # Bookkeeping differs too (log cadence), which must not count as a varied setting.
      'seed1/rate=0.3': train.run(
          sweep.apply(base, {'masking.rate': 0.3, 'seed': 1, 'train.log_every_steps': 5}),
          root / 'seed1' / 'rate=0.3', stop_after=35),
  }
  return root, summaries


def _evals(run_dir: pathlib.Path) -> list[dict]:
  return [r for r in report.read_metrics(run_dir / 'metrics.jsonl') if 'eval/loss' in r]


def _num(text: str) -> float:
  return float(text) if text else math.nan


@pytest.mark.slow
def test_report_rows_match_the_workdirs(runs):
  root, summaries = runs
  paths = report.write_report(root)
  assert paths['md'] == root / 'report' / 'report.md'
  with open(paths['csv']) as f:
    rows = {row['run']: row for row in csv.DictReader(f)}
  assert set(rows) == set(summaries)
  header = list(next(iter(rows.values())))
  # The settings that differ between runs, and nothing else of the config.
  assert header[:3] == ['run', 'masking.rate', 'seed']
  assert not any(k.startswith(('train.', 'data.', 'ckpt.', 'model.')) for k in header)

  for name, summary in summaries.items():
    row, evals = rows[name], _evals(root / name)
    assert _num(row['masking.rate']) == summary['masking']['rate']
    assert row['finished'] == str(summary['finished']) and int(row['step']) == summary['step']
    assert _num(row['tokens_seen']) == summary['tokens_seen']
    assert _num(row['wall_time_s']) == summary['wall_time_s']
    assert _num(row['best_eval_loss']) == min(e['eval/loss'] for e in evals)
    last = evals[-1]
    assert int(row['final_eval_step']) == last['step']
    for key in ('eval/loss', 'eval/accuracy', 'eval/accuracy_at_mask', 'baseline/unigram_accuracy_at_mask'):
      assert _num(row[key]) == last[key]
      if summary['finished']:
        assert last[key] == summary[key]  # the final evaluation is the summary's
  assert rows['seed1/rate=0.3']['finished'] == 'False' and rows['seed1/rate=0.3']['step'] == '35'
  assert rows['seed1/rate=0.3']['final_eval_step'] == '30'  # its last evaluation before stopping

  md = paths['md'].read_text()
  assert 'fixed 15% of tokens (`eval.rate=0.15`)' in md
  table = [l for l in md.splitlines() if l.startswith('| ')]
  assert len(table) == 1 + len(summaries)  # the heading, then one row per run
  assert '1 run(s) have not finished' in md
  assert any(l.startswith('| seed1/rate=0.3 | 0.3 | 1 | no | 35/60 |') for l in table), table

  for key in ('curves', 'final_vs_rate'):
    assert paths[key].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    image = matplotlib.image.imread(paths[key])
    assert image.shape[0] > 200 and image.shape[1] > 300


@pytest.mark.slow
def test_downstream_results_join_the_table(runs, tmp_path):
  root, _ = runs
  flat_and_nested = {'sst2/accuracy': 0.81, 'cola': {'mcc': 0.2}}
  (root / 'rate=0.15' / 'downstream.json').write_text(json.dumps(flat_and_nested))
  finetune = root / 'rate=0.3' / 'ft_sst2'
  finetune.mkdir()
  (finetune / 'summary.json').write_text(json.dumps(
      {'eval/accuracy': 0.74, 'eval/loss': 0.6, 'test/accuracy': 0.7, 'test/per_class': {},
       'test/parameters': 'best (step 8)', 'step': 10}))
  (root / 'rate=0.3' / 'downstream.json').write_text(json.dumps({'sst2': 'ft_sst2'}))
  try:
    paths = report.write_report(root, tmp_path / 'out')
    with open(paths['csv']) as f:
      rows = {row['run']: row for row in csv.DictReader(f)}
    assert rows['rate=0.15']['sst2/accuracy'] == '0.81' and rows['rate=0.15']['cola/mcc'] == '0.2'
    assert rows['rate=0.3']['sst2/accuracy'] == '0.74' and rows['rate=0.3']['sst2/loss'] == '0.6'
    assert rows['rate=0.3']['sst2/test_accuracy'] == '0.7'  # numbers only: no per_class, no text
    assert rows['seed1/rate=0.3']['sst2/accuracy'] == ''
    assert len(rows) == 3  # the fine-tuned workdir inside a run is not a run of the sweep
    (root / 'rate=0.3' / 'downstream.json').write_text(json.dumps({'sst2': 'missing_dir'}))
    with pytest.raises(ValueError, match='downstream.json.*missing_dir'):
      report.write_report(root, tmp_path / 'out')
  finally:
    for path in (root / 'rate=0.15' / 'downstream.json', root / 'rate=0.3' / 'downstream.json'):
      path.unlink()


@pytest.mark.slow
def test_cli_metric_choice_and_errors(runs, tmp_path, capsys):
  root, _ = runs
  report.main([str(root), '--out', str(tmp_path / 'r'), '--metric', 'eval/accuracy_at_random'])
  assert 'report.md' in capsys.readouterr().out
  with open(tmp_path / 'r' / 'report.csv') as f:
    assert 'eval/accuracy_at_random' in next(csv.reader(f))
  with pytest.raises(SystemExit) as e:
    report.main([str(root), '--out', str(tmp_path / 'r'), '--metric', 'eval/nope'])
  assert "'eval/nope' is in no evaluation record" in str(e.value.code)
  with pytest.raises(SystemExit) as e:
    report.main([str(tmp_path / 'r')])
  assert 'no run directories' in str(e.value.code)


def test_keys_added_after_some_runs_count_only_when_the_others_disagree():
  # A resumed run rewrites config.json with keys newer code added; the older runs lack them.
  runs = [{'config': {'masking.rate': 0.15}},
          {'config': {'masking.rate': 0.3, 'model.remat': '', 'train.grad_accum_steps': 1}},
          {'config': {'masking.rate': 0.4, 'model.remat': 'full', 'train.grad_accum_steps': 1}}]
  assert report.varied_keys(runs) == ['masking.rate', 'model.remat']
  assert report.varied_keys(runs[:2]) == ['masking.rate']
