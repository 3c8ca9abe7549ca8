"""Tests for mlmjax/probe.py: frequency buckets, and a probe of a tiny run's kept checkpoints."""

import csv
import json
import shutil

import numpy as np
import pytest

from mlmjax import probe, train


def test_frequency_buckets_cut_equal_shares_of_occurrences():
  special = np.arange(10) < 2  # ids 0 and 1 are specials
  counts = np.array([500, 9, 40, 30, 10, 10, 5, 3, 2, 0])  # regular total 100
  bucket_of, names, shares = probe.frequency_buckets(counts, special, 4)
  # Ranked: 2 (40), 3 (30), 4 (10), 5 (10), ...; cumulative 40, 70, 80: the cuts at 25, 50, 75%
  # fall in ranks 1, 2 and 3, each bucket holding the id that crosses its cut.
  assert names == ['top1-1', 'top2-2', 'top3-3', 'top4-8']
  assert bucket_of.tolist() == [-1, -1, 0, 1, 2, 3, 3, 3, 3, 3]
  np.testing.assert_allclose(shares, [0.4, 0.3, 0.1, 0.2])
  # A head that covers several shares still leaves one id per bucket; ties rank the lower id first.
  counts, special = np.array([0, 90, 5, 5]), np.array([1, 0, 0, 0], bool)
  bucket_of, names, _ = probe.frequency_buckets(counts, special, 3)
  assert names == ['top1-1', 'top2-2', 'top3-3'] and bucket_of.tolist() == [-1, 0, 1, 2]
  with pytest.raises(ValueError, match='only 3 regular ids'):
    probe.frequency_buckets(counts, special, 4)


def test_token_counts_match_bincount():
  rows = np.random.default_rng(0).integers(0, 50, size=(7, 9)).astype(np.int32)
  np.testing.assert_array_equal(probe.token_counts(rows, 60),
                                np.bincount(rows.ravel(), minlength=60))


# The tests below share one tiny run: about 20-35 s of training on 2 busy cores, hence slow.
@pytest.fixture(scope='module')
def probed(make_tiny_config, tmp_path_factory):
  """Returns (workdir, rows, out): a tiny run with milestones 0 and 4, newest 6 and 8, probed."""
  c = make_tiny_config()
  c.model.size = 'custom'  # one narrow block, as tests/test_predict.py: quick to compile
  c.model.hidden_size, c.model.num_layers = 32, 1
  c.model.num_heads, c.model.intermediate_size = 2, 64
  c.ckpt.every_steps, c.ckpt.max_to_keep, c.ckpt.keep_every = 2, 2, 4  # kept: 0, 4, 6, 8
  c.ckpt.async_save = False
  workdir = tmp_path_factory.mktemp('probe') / 'run'
  train.run(c, workdir)
  out = workdir.parent / 'probe_out'
  rows = probe.probe(workdir, out, buckets=4, log=lambda s: None)
  return workdir, rows, out


@pytest.mark.slow
def test_rows_are_the_kept_steps(probed):
  workdir, rows, _ = probed
  on_disk = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert [r['step'] for r in rows] == on_disk == [0, 4, 6, 8]


@pytest.mark.slow
def test_numbers_equal_the_runs_own_evaluation(probed):
  workdir, rows, _ = probed
  by_step = {r['step']: r for r in rows}
  summary = json.loads((workdir / 'summary.json').read_text())
  evals = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  evals = [e for e in evals if 'eval/loss' in e]
  assert {e['step'] for e in evals} == {4, 8}
  final = by_step[8]
  for col, key in (('loss', 'eval/loss'), ('accuracy', 'eval/accuracy'),
                   ('acc_mask', 'eval/accuracy_at_mask'),
                   ('unigram_acc_mask', 'baseline/unigram_accuracy_at_mask'),
                   ('bigram_acc_mask', 'baseline/bigram_accuracy_at_mask')):
    assert final[col] == pytest.approx(summary[key], rel=1e-5, abs=1e-6), col
  for e in evals:
    row = by_step[e['step']]
    assert row['loss'] == pytest.approx(e['eval/loss'], rel=1e-5)
    assert row['accuracy'] == pytest.approx(e['eval/accuracy'], rel=1e-5, abs=1e-6)
    assert row['acc_mask'] == pytest.approx(e['eval/accuracy_at_mask'], rel=1e-5, abs=1e-6)
  assert final['gap_unigram'] == pytest.approx(final['acc_mask'] - final['unigram_acc_mask'])
  assert final['gap_bigram'] == pytest.approx(final['acc_mask'] - final['bigram_acc_mask'])
  assert rows[0]['loss'] > final['loss']  # training moved the weights between the milestones


@pytest.mark.slow
def test_buckets_recombine_to_the_overall_accuracy_at_mask(probed):
  _, rows, _ = probed
  names = [c[len('n_mask_'):] for c in rows[0] if c.startswith('n_mask_')]
  assert len(names) == 4 and names[0].startswith('top1-')
  for r in rows:
    counts = [r[f'n_mask_{n}'] for n in names]
    assert sum(counts) == r['n_mask'] > 0
    hits = sum(r[f'acc_mask_{n}'] * k for n, k in zip(names, counts) if k)
    assert hits / r['n_mask'] == pytest.approx(r['acc_mask'], rel=1e-6)


@pytest.mark.slow
def test_files_are_written_and_the_csv_parses(probed):
  _, rows, out = probed
  assert all((out / f).is_file() and (out / f).stat().st_size for f in probe.FILES)
  assert (out / 'probe.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with open(out / 'probe.csv', newline='') as f:
    parsed = list(csv.DictReader(f))
  assert [int(r['step']) for r in parsed] == [r['step'] for r in rows]
  assert list(parsed[0]) == list(rows[0])
  assert float(parsed[-1]['loss']) == pytest.approx(rows[-1]['loss'], rel=1e-12)
  md = (out / 'probe.md').read_text().splitlines()
  header = next(l for l in md if l.startswith('| step |'))
  assert header.split(' | ')[1:4] == ['loss', 'accuracy', 'acc_mask']
  assert sum(l.startswith('| ') for l in md) == len(rows) + 1


def test_workdir_without_checkpoints_or_not_mlm_is_a_one_line_error(tiny_config, tmp_path):
  empty = tmp_path / 'empty'
  (empty / 'checkpoints').mkdir(parents=True)
  config = json.loads(json.dumps(tiny_config.to_dict()))  # as train.run writes config.json
  (empty / 'config.json').write_text(json.dumps(config))
  with pytest.raises(FileNotFoundError, match=f'{empty} has no checkpoints'):
    probe.probe(empty, log=lambda s: None)
  with pytest.raises(SystemExit) as e:
    probe.main(['--workdir', str(empty)])
  assert str(e.value).startswith(f'error: {empty} has no checkpoints') and '\n' not in str(e.value)
  with pytest.raises(FileNotFoundError, match=f'{tmp_path / "nothing"} holds no config.json'):
    probe.kept_steps(tmp_path / 'nothing')
  (empty / 'config.json').write_text(json.dumps({**config, 'task': 'classify'}))
  with pytest.raises(ValueError, match=f"{empty} was trained with task 'classify'"):
    probe.kept_steps(empty)


@pytest.mark.slow
def test_a_damaged_milestone_is_skipped(probed, tmp_path):
  workdir, rows, _ = probed
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'checkpoints' / '4' / 'params')
  logged = []
  again = probe.probe(copy, buckets=4, log=logged.append)
  assert [r['step'] for r in again] == [0, 6, 8]
  assert any(l.startswith('WARNING: ') and 'step 4' in l for l in logged), logged
  assert again[-1]['loss'] == pytest.approx(rows[-1]['loss'], rel=1e-6)
  assert (copy / 'probe' / 'probe.csv').is_file()
