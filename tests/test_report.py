"""Sweep reports: one row per run with the varied settings and the numbers of its workdir."""

import csv
import json
import math
import pathlib

import matplotlib.image
import numpy as np
import pytest
import scipy.stats

from mlmjax import report, run_dirs, schema, sweep, train


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
  return [r for r in run_dirs.read_metrics(run_dir / 'metrics.jsonl') if 'eval/loss' in r]


def _num(text: str) -> float:
  return float(text) if text else math.nan


@pytest.mark.slow
def test_report_rows_match_the_workdirs(runs, tmp_path):
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
  table = [l for l in md.split('## Runs', 1)[1].splitlines() if l.startswith('| ')]
  assert len(table) == 1 + len(summaries)  # the heading, then one row per run
  assert '1 run(s) have not finished' in md
  assert any(l.startswith('| seed1/rate=0.3 | 0.3 | 1 | no | 35/60 |') for l in table), table
  # The two rate=0.3 runs differ only in their seed: one group of two.
  with open(paths['groups_csv']) as f:
    groups = {row['group']: row for row in csv.DictReader(f)}
  assert set(groups) == {'rate=0.15', 'rate=0.3'} and groups['rate=0.3']['seeds'] == '0 1'
  assert groups['rate=0.3']['eval/loss/n'] == '2' and groups['rate=0.15']['eval/loss/sd'] == ''
  # At equal FLOPs: the stopped run's last evaluation (step 30) is as far as every run reaches;
  # the finished rate=0.3 run, with the same FLOPs per step, is compared at its step 30 too.
  flops = report.write_report(root, tmp_path, align='flops')
  with open(flops['csv']) as f:
    aligned = {row['run']: row for row in csv.DictReader(f)}
  at_30 = {name: next(e for e in _evals(root / name) if e['step'] == 30)['eval/loss']
           for name in ('rate=0.3', 'seed1/rate=0.3')}
  for name, loss in at_30.items():
    assert _num(aligned[name]['eval/loss@flops']) == pytest.approx(loss, rel=1e-9)

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
  assert run_dirs.varied_keys(runs) == ['masking.rate', 'model.remat']
  assert run_dirs.varied_keys(runs[:2]) == ['masking.rate']


# ---------------------------------------------------------------------------------------------
# Groups over seeds, paired differences and alignment, on hand-written workdirs (no training).


def _write_run(root: pathlib.Path, name: str, config: dict, evals: dict, *, flops_per_step=1e9,
               predictions_per_step=10.0, num_steps=40, log_every=10, downstream=None,
               counters=True, finished=True) -> pathlib.Path:
  """Writes a run directory: config.json, metrics.jsonl (train records with counters, evals),
  summary.json and downstream.json; evals: {step: acc@[MASK]} (loss and accuracy follow it)."""
  d = root / name
  d.mkdir(parents=True)
  full = schema.defaults()  # a complete config.json, as a run writes it
  full.update_from_flattened_dict({**schema.flatten(config), 'train.num_steps': num_steps})
  (d / 'config.json').write_text(full.to_json_best_effort())
  records = []
  last = max(evals) if not finished else num_steps
  for step in range(log_every, last + 1, log_every):
    rec = {'step': step, 'train/loss': 5.0}
    if counters:
      rec.update({'train/cum_tokens': 64.0 * step, 'train/cum_flops': flops_per_step * step,
                  'train/cum_predictions': predictions_per_step * step})
    records.append(rec)
  for step, acc in evals.items():
    records.append({'step': step, 'eval/loss': 6.0 - 10 * acc, 'eval/accuracy': acc / 2,
                    'eval/accuracy_at_mask': acc, 'baseline/unigram_accuracy_at_mask': 0.05})
  records.sort(key=lambda r: (r['step'], 'eval/loss' in r))
  (d / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  (d / 'summary.json').write_text(json.dumps(
      {'finished': finished, 'step': last, 'num_steps': num_steps, 'tokens_seen': 64.0 * last,
       'wall_time_s': 1.0}))
  if downstream is not None:
    (d / 'downstream.json').write_text(json.dumps(downstream))
  return d


def _csv(path: pathlib.Path) -> dict[str, dict]:
  with open(path) as f:
    rows = list(csv.DictReader(f))
  return {row.get('group', row.get('run')): row for row in rows}


def _section(md: str, title: str) -> list[str]:
  """Returns the table lines of report.md's `### title` section."""
  lines = md.split(f'### {title}', 1)[1].split('\n### ', 1)[0].split('\n## ', 1)[0]
  return [l for l in lines.splitlines() if l.startswith('| ') and not l.startswith('| group |')]


# Final acc@[MASK] per (rate, seed); rate 0.3 gains ~0.03 on every seed, 0.4 moves either way.
FINAL = {0.15: {0: 0.10, 1: 0.12, 2: 0.11}, 0.3: {0: 0.13, 1: 0.16, 2: 0.14},
         0.4: {0: 0.11, 1: 0.115}, 0.5: {7: 0.2, 8: 0.21}}


@pytest.fixture
def seeded(tmp_path):
  """A sweep of rates x seeds as mlmjax.sweep --seeds names it, with a downstream task."""
  root = tmp_path / 'abl'
  for rate, by_seed in FINAL.items():
    for seed, acc in by_seed.items():
      _write_run(root, f'rate={rate},seed={seed}',
                 {'seed': seed, 'masking': {'rate': rate, 'strategy': 'token'}},
                 {20: acc / 2, 40: acc}, downstream={'bbc': {'accuracy': 0.5 + acc + seed / 100}})
  return root


def test_groups_give_t_intervals_and_paired_differences(seeded):
  paths = report.write_report(seeded, baseline='rate=0.15')
  runs, groups = _csv(paths['csv']), _csv(paths['groups_csv'])
  assert len(runs) == 10  # the per-run table stays, one row per run
  assert list(groups) == ['rate=0.15', 'rate=0.3', 'rate=0.4', 'rate=0.5']
  assert groups['rate=0.3']['seeds'] == '0 1 2' and groups['rate=0.3']['runs'] == '3'
  for rate, label in ((0.15, 'rate=0.15'), (0.3, 'rate=0.3'), (0.4, 'rate=0.4')):
    values = np.array(list(FINAL[rate].values()))
    g, n = groups[label], len(values)
    low, high = scipy.stats.t.interval(0.95, n - 1, loc=values.mean(),
                                       scale=scipy.stats.sem(values))
    assert int(g['eval/accuracy_at_mask/n']) == n
    assert float(g['eval/accuracy_at_mask/mean']) == pytest.approx(values.mean())
    assert float(g['eval/accuracy_at_mask/sd']) == pytest.approx(values.std(ddof=1))
    assert float(g['eval/accuracy_at_mask/ci_low']) == pytest.approx(low)
    assert float(g['eval/accuracy_at_mask/ci_high']) == pytest.approx(high)
    # The loss and the downstream column are aggregated the same way.
    assert float(g['eval/loss/mean']) == pytest.approx(np.mean(6.0 - 10 * values))
    bbc = [0.5 + acc + seed / 100 for seed, acc in FINAL[rate].items()]
    assert float(g['bbc/accuracy/mean']) == pytest.approx(np.mean(bbc))
  # Paired differences, seed by seed, as scipy's paired t-test; significant when 0 is outside.
  for label, rate, significant in (('rate=0.3', 0.3, True), ('rate=0.4', 0.4, False)):
    seeds = sorted(FINAL[rate])
    test = scipy.stats.ttest_rel([FINAL[rate][s] for s in seeds], [FINAL[0.15][s] for s in seeds])
    ci, g = test.confidence_interval(0.95), groups[label]
    assert int(g['eval/accuracy_at_mask/diff_n']) == len(seeds)
    assert float(g['eval/accuracy_at_mask/diff_low']) == pytest.approx(ci.low)
    assert float(g['eval/accuracy_at_mask/diff_high']) == pytest.approx(ci.high)
    assert g['eval/accuracy_at_mask/significant'] == str(significant)
  assert groups['rate=0.5']['eval/accuracy_at_mask/diff_n'] == '0'  # seeds 7, 8: none in common
  assert groups['rate=0.15']['eval/accuracy_at_mask/diff_mean'] == ''  # the baseline itself

  md = paths['md'].read_text()
  assert 'Student t with n−1 degrees of freedom' in md and 'baseline `rate=0.15`' in md
  rows = {l.split(' | ')[0][2:]: l for l in _section(md, 'acc@[MASK]')}
  assert list(rows) == ['rate=0.15', 'rate=0.3', 'rate=0.4', 'rate=0.5']
  assert '| baseline |' in rows['rate=0.15'] and ' *' in rows['rate=0.3']
  assert '+0.0333 * | [' in rows['rate=0.3'] and ' *' not in rows['rate=0.4']
  assert 'no common seed' in rows['rate=0.5']
  assert [l.split(' | ')[0][2:] for l in _section(md, '`bbc/accuracy`')] == list(rows)
  # The per-run table follows, one line per run.
  runs_table = [l for l in md.split('## Runs', 1)[1].splitlines() if l.startswith('| ')]
  assert len(runs_table) == 1 + 10
  for key in ('curves', 'final_vs_rate'):
    assert paths[key].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _load(root: pathlib.Path) -> list[dict]:
  return [run_dirs.load_run(p, root) for p in run_dirs.find_runs(root)]


def test_baseline_by_group_run_or_settings_and_errors(seeded, tmp_path, capsys):
  runs = _load(seeded)
  groups = report.group_runs(runs, report.build_table(runs)[1])
  for spec in ('rate=0.15', 'masking.rate=0.15', 'rate=0.150', 'rate=0.15,seed=2'):
    assert report.find_baseline(spec, groups)['label'] == 'rate=0.15', spec
  report.main([str(seeded), '--out', str(tmp_path / 'r'), '--baseline', 'rate=0.15,seed=2'])
  assert 'wrote' in capsys.readouterr().out
  assert 'baseline `rate=0.15`' in (tmp_path / 'r' / 'report.md').read_text()
  for spec, needle in (('rate=0.2', 'matches no group'), ('lr=0.1', "'lr' is not a varied setting"),
                       ('nonsense', "'nonsense' is not a varied setting")):
    with pytest.raises(SystemExit) as e:
      report.main([str(seeded), '--out', str(tmp_path / 'r'), '--baseline', spec])
    assert needle in str(e.value.code) and 'rate=0.3' in str(e.value.code), e.value.code


def test_one_seed_per_group_shows_dashes(tmp_path):
  root = tmp_path / 'abl'
  for rate, acc in ((0.15, 0.1), (0.3, 0.13)):
    _write_run(root, f'rate={rate}', {'masking': {'rate': rate}}, {20: acc / 2, 40: acc})
  paths = report.write_report(root, baseline='rate=0.15')
  groups = _csv(paths['groups_csv'])
  assert groups['rate=0.3']['eval/accuracy_at_mask/n'] == '1'
  assert groups['rate=0.3']['eval/accuracy_at_mask/sd'] == ''
  assert float(groups['rate=0.3']['eval/accuracy_at_mask/diff_mean']) == pytest.approx(0.03)
  assert groups['rate=0.3']['eval/accuracy_at_mask/significant'] == 'False'
  row = _section(paths['md'].read_text(), 'acc@[MASK]')[1]
  assert row == '| rate=0.3 | 1 | 0.1300 | – | – | +0.0300 | – |'


def test_align_flops_and_predictions_interpolate_at_the_common_x(tmp_path):
  root = tmp_path / 'abl'
  # Run a: 1e9 FLOPs and 30 predictions per step, evaluated at steps 20 and 40 (x up to 4e10).
  # Run b: 2e9 FLOPs and 10 predictions per step, evaluated at steps 10, 25 (between its train
  # records at 20 and 30) and 40.
  _write_run(root, 'a', {'model': {'hidden_size': 64}}, {20: 0.1, 40: 0.2}, flops_per_step=1e9,
             predictions_per_step=30.0)
  _write_run(root, 'b', {'model': {'hidden_size': 128}}, {10: 0.3, 25: 0.5, 40: 0.6},
             flops_per_step=2e9, predictions_per_step=10.0)
  runs = {r['name']: r for r in _load(root)}
  assert run_dirs.eval_positions(runs['b'], 'flops') == [2e10, 5e10, 8e10]
  assert run_dirs.eval_positions(runs['b'], 'predictions') == [100.0, 250.0, 400.0]

  paths = report.write_report(root, align='flops')
  rows = _csv(paths['csv'])
  # Every run reaches 4e10 FLOPs (a's end); b is there between its evaluations at 2e10 and 5e10.
  assert float(rows['a']['eval/accuracy_at_mask@flops']) == pytest.approx(0.2)
  assert float(rows['b']['eval/accuracy_at_mask@flops']) == pytest.approx(0.3 + 0.2 * 2 / 3)
  assert float(rows['b']['eval/accuracy_at_mask']) == 0.6  # the final value stays beside it
  assert float(rows['b']['train/cum_flops']) == 8e10
  md = paths['md'].read_text()
  assert 'Compared at equal training FLOPs (`--align flops`): 4e+10 train/cum_flops' in md
  groups = _csv(paths['groups_csv'])
  assert groups['hidden_size=128']['align_x'] == '40000000000.0'
  assert float(groups['hidden_size=128']['eval/accuracy_at_mask@flops/mean']) == pytest.approx(
      0.3 + 0.2 * 2 / 3)

  # b ends at 400 predictions; a has 400 at step 13.3, before its first evaluation (no value).
  x = run_dirs.common_x(list(runs.values()), 'predictions')
  rows = {r['run']: r for r in report.build_table(list(runs.values()), axis='predictions', x=x)[1]}
  assert x == 400.0 and rows['b']['eval/accuracy_at_mask@predictions'] == pytest.approx(0.6)
  assert rows['a']['eval/accuracy_at_mask@predictions'] is None
  assert 'predictions seen (`--align predictions`): 400 train/cum_predictions' in \
      report._align_line('predictions', x)
  # With an evaluation at step 0 (0 predictions) it has one, between that and step 20.
  metrics = runs['a']['path'] / 'metrics.jsonl'
  metrics.write_text(json.dumps({'step': 0, 'eval/loss': 7.0, 'eval/accuracy': 0.0,
                                 'eval/accuracy_at_mask': 0.0}) + '\n' + metrics.read_text())
  rows = report.build_table(_load(root), axis='predictions', x=x)[1]
  assert rows[0]['run'] == 'a'
  assert rows[0]['eval/accuracy_at_mask@predictions'] == pytest.approx(0.1 * 400 / 600)

  # Runs trained before the counters existed cannot be aligned: a one-line error says so.
  _write_run(root, 'old', {'model': {'hidden_size': 32}}, {40: 0.2}, counters=False)
  with pytest.raises(SystemExit) as e:
    report.main([str(root), '--align', 'flops'])
  assert 'old log no train/cum_flops' in str(e.value.code) and '--align step' in str(e.value.code)
  assert run_dirs.common_x(_load(root), 'step') is None  # at step, old runs compare as before
