"""Tests for mlmjax.shards: training rows from prepared builds (order, resume, processes), mixtures."""

import collections
import json
import math
import shutil

import jax
import numpy as np
import pytest

from configs import pretrain
from mlmjax import adapt as adapt_lib
from mlmjax import config_check, predict, prepare, shards, train
from mlmjax import input_pipeline as ip
from mlmjax import tokenizer as tok_lib

SEQ_LEN = 64
SHARD_CHARS = 40_000  # the help topics make about 8 train shards


def _quiet(_):
  pass


def _take(it, k):
  return [next(it) for _ in range(k)]


def _id_table(directory, counts, seq_len=4, first=0, name='train') -> shards.ShardRows:
  """Returns a ShardRows over shard files whose rows hold first + their index in the table."""
  directory.mkdir(parents=True, exist_ok=True)
  files, start = [], first
  for k, n in enumerate(counts):
    path = directory / f'{name}-{k:05d}.npy'
    np.save(path, np.repeat(np.arange(start, start + n, dtype=np.uint16)[:, None], seq_len, 1))
    files.append(path)
    start += n
  return shards.ShardRows(files, counts, seq_len)


def _config(corpus_path, tokenizer_path='', **data):
  """Returns the tiny pretraining config over a small corpus, in small shards of short rows."""
  c = pretrain.get_config('tiny_classic')
  c.data.corpus = str(corpus_path)
  c.data.shard_chars = SHARD_CHARS
  c.data.near_dups.threshold = 0.0
  for key, value in data.items():
    c.data[key] = value
  c.tokenizer.path = str(tokenizer_path)
  c.tokenizer.vocab_size = 1000
  c.train.seq_len = SEQ_LEN
  return c


@pytest.fixture(scope='module')
def build(tmp_path_factory, topics_corpus, topics_tokenizer):
  """Returns (config, directory, manifest) of a build of the help topics (about 1 s)."""
  config = _config(topics_corpus, topics_tokenizer.model_path)
  out = tmp_path_factory.mktemp('build')
  manifest = prepare.build(config, out, workers=1, log=_quiet)
  config.data.prepared = str(out)
  config.tokenizer.path = ''  # the build brings its tokenizer
  return config, out, manifest


# ---------------------------------------------------------------------------------------------
# ShardRows and the batch stream over it


def test_shard_rows_read_like_one_array(tmp_path, monkeypatch):
  table = _id_table(tmp_path, [5, 0, 7, 3])  # an empty shard too
  whole = np.repeat(np.arange(15, dtype=np.int32)[:, None], 4, 1)
  assert len(table) == 15 and table.shape == (15, 4) and table.ndim == 2
  idx = np.random.default_rng(0).integers(0, 15, 40)  # unsorted, repeated
  got = table[idx]
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, whole[idx])
  np.testing.assert_array_equal(table[3:13:2], whole[3:13:2])
  np.testing.assert_array_equal(table[-1], whole[-1])
  np.testing.assert_array_equal(np.asarray(table), whole)
  assert table[np.zeros(0, np.int64)].shape == (0, 4)
  with pytest.raises(IndexError):
    table[[15]]
  monkeypatch.setattr(shards, '_MAX_OPEN', 2)  # files are mapped again after they were dropped
  small = _id_table(tmp_path / 'small', [2] * 6)
  for _ in range(2):
    np.testing.assert_array_equal(small[::-1][:, 0], np.arange(12)[::-1])
    assert len(small._open) <= 2  # pylint: disable=protected-access
  np.save(small.files[3], np.zeros((3, 4), np.uint16))  # not what the manifest says
  with pytest.raises(ValueError, match=r'train-00003\.npy: holds uint16 rows of shape \(3, 4\)'):
    shards.ShardRows(small.files, small.counts, 4)[[7]]


def test_batches_from_shards_are_the_in_memory_batches(tmp_path):
  table = _id_table(tmp_path, [13, 40, 7, 41])
  kw = dict(global_batch=8, seed=3)
  for s, (x, y) in enumerate(zip(_take(ip.train_batches(table, **kw), 30),
                                 _take(ip.train_batches(np.asarray(table), **kw), 30))):
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(x, ip.global_batch_rows(np.asarray(table), s, **kw))


@pytest.mark.parametrize('start', [1, 12, 25])
def test_a_stream_started_at_s_gives_the_batches_of_one_started_at_0(tmp_path, start):
  table = _id_table(tmp_path, [30, 31, 40])  # 12 steps per epoch: starts inside and past one
  full = _take(ip.train_batches(table, global_batch=8, seed=5), start + 10)
  resumed = _take(ip.train_batches(table, global_batch=8, seed=5, start_step=start), 10)
  for x, y in zip(full[start:], resumed):
    np.testing.assert_array_equal(x, y)


def test_two_processes_halves_concatenate_to_the_one_process_batch(tmp_path):
  table = _id_table(tmp_path, [30, 31, 40])
  one = _take(ip.train_batches(table, global_batch=12, seed=1, start_step=4), 12)
  halves = [_take(ip.train_batches(table, global_batch=12, seed=1, start_step=4, process_index=p,
                                   process_count=2), 12) for p in range(2)]
  for k in range(12):
    assert halves[0][k].shape == (6, 4)
    np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), one[k])


def test_every_row_of_the_shards_once_per_epoch(tmp_path):
  table = _id_table(tmp_path, [20, 33, 43])  # 96 rows: 12 steps of 8
  stream = ip.train_batches(table, global_batch=8, seed=0)
  epochs = [np.concatenate(_take(stream, 12))[:, 0] for _ in range(2)]
  for seen in epochs:
    np.testing.assert_array_equal(np.sort(seen), np.arange(96))
  assert not np.array_equal(epochs[0], epochs[1])


# ---------------------------------------------------------------------------------------------
# Opening a build


def test_a_build_opens_as_its_shards_in_order(build):
  _, out, manifest = build
  opened = shards.open_build(out, SEQ_LEN)
  for split, rows in (('train', opened.train_rows), ('val', opened.val_rows)):
    files = [out / s['file'] for s in manifest['shards'] if s['split'] == split]
    assert len(rows.files) == len(files) and rows.shape[1] == SEQ_LEN
    np.testing.assert_array_equal(np.asarray(rows), np.concatenate([np.load(f) for f in files]))
  assert len(opened.train_rows.files) >= 4
  assert opened.tokenizer.fingerprint == manifest['tokenizer']['fingerprint']
  assert opened.stats['train'] == manifest['splits']['train']
  assert opened.key == shards.open_build(out, SEQ_LEN).key and opened.key.startswith('prepared-')


def test_every_training_row_of_a_build_is_served_once_per_epoch(build):
  _, out, _ = build
  rows = shards.open_build(out, SEQ_LEN).train_rows
  b = 16
  spe = ip.steps_per_epoch(len(rows), b)
  served = np.concatenate(_take(ip.train_batches(rows, global_batch=b, seed=7), spe))
  count = collections.Counter(map(bytes, served))
  every = collections.Counter(map(bytes, np.asarray(rows)))
  assert sum(count.values()) == spe * b == len(rows) - len(rows) % b
  assert all(every[row] >= n for row, n in count.items())  # no row more often than it is there


def _one_line(e: pytest.ExceptionInfo) -> str:
  message = str(e.value)
  assert '\n' not in message
  return message


def test_a_missing_build_is_built_by_the_run_or_named_with_the_command(build, tmp_path):
  config, out, _ = build
  data_prepared = tmp_path / 'new'
  # The same corpus and tokenizer as the fixture's build: the same bytes.
  c = _config(config.data.corpus, out / 'tokenizer.model', prepared=str(data_prepared))
  with pytest.raises(ValueError) as e:
    shards.prepared_data(c, None, log=_quiet, process_count=2)
  message = _one_line(e)
  assert message.startswith(f'data.prepared={data_prepared}: no manifest.json')
  assert f'python -m mlmjax.prepare --config CONFIG --out {data_prepared}' in message
  got = shards.prepared_data(c, None, log=_quiet, process_count=1)
  for name in [s['file'] for s in json.loads((out / 'manifest.json').read_text())['shards']]:
    assert (data_prepared / name).read_bytes() == (out / name).read_bytes()
  assert got.tokenizer.fingerprint == shards.open_build(out, SEQ_LEN).tokenizer.fingerprint
  with pytest.raises(ValueError, match=r'data.prepared=.*: no manifest.json .* --out'):
    shards.open_build(tmp_path / 'nothing', SEQ_LEN)


@pytest.fixture(scope='module')
def other(tmp_path_factory):
  """Returns a small tokenizer that is not the build's."""
  from pydoc_data.topics import topics
  path = tmp_path_factory.mktemp('other') / 'other.model'
  return tok_lib.train_tokenizer([topics[k] for k in sorted(topics)[:40]], path, vocab_size=600)


def test_a_build_that_does_not_fit_the_config_is_a_one_line_error(build, other, tmp_path):
  config, out, _ = build
  with pytest.raises(ValueError) as e:
    shards.open_build(out, 128)
  assert 'holds rows of 64 tokens but train.seq_len=128' in _one_line(e)
  c = config.copy_and_resolve_references()
  c.tokenizer.vocab_size = 800
  with pytest.raises(ValueError) as e:
    shards.prepared_data(c, None, log=_quiet)
  assert _one_line(e).startswith('tokenizer.vocab_size=800, but the tokenizer of the build')
  notes = []
  shards.prepared_data(c, None, log=_quiet, adapt=adapt_lib.Adaptations(log=notes.append))
  assert c.tokenizer.vocab_size == 1000 and 'tokenizer.vocab_size 800 -> 1000' in notes[0]
  c.tokenizer.path = other.model_path
  with pytest.raises(ValueError) as e:
    shards.prepared_data(c, None, log=_quiet)
  assert _one_line(e).startswith(f'tokenizer.path={other.model_path} is not the tokenizer')
  c.tokenizer.path = ''
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  shutil.copy(other.model_path, workdir / 'tokenizer.model')
  with pytest.raises(ValueError, match='use a new --workdir'):
    shards.prepared_data(c, workdir, log=_quiet)
  damaged = tmp_path / 'damaged'
  shutil.copytree(out, damaged)
  with open(damaged / 'train-00001.npy', 'r+b') as f:
    f.truncate(1000)
  with pytest.raises(ValueError) as e:
    shards.open_build(damaged, SEQ_LEN)
  assert 'train-00001.npy is 1,000 bytes, not' in _one_line(e)


def test_config_check_refuses_what_a_prepared_build_cannot_do():
  c = pretrain.get_config('tiny_classic')
  c.data.prepared, c.data.mixture = 'a', 'b:1'
  with pytest.raises(ValueError, match='both name the training data; set one of them'):
    config_check.check_config(c)
  c.data.mixture = ''
  c.data.decontaminate.configs = 'configs/finetune.py:bbc'
  with pytest.raises(ValueError, match=r'data.decontaminate.configs=.* \(data.prepared\)'):
    config_check.check_config(c)


# ---------------------------------------------------------------------------------------------
# Mixtures


def test_quotas_and_the_mixture_spec():
  assert shards.quotas([0.7, 0.3], 10).tolist() == [7, 3]
  assert shards.quotas([1, 1, 1], 10).tolist() == [4, 3, 3]
  q = shards.quotas([0.5, 0.25, 0.2, 0.05], shards.MIX_BLOCK)
  assert q.sum() == shards.MIX_BLOCK
  assert np.abs(q / shards.MIX_BLOCK - [0.5, 0.25, 0.2, 0.05]).max() < 1 / shards.MIX_BLOCK
  assert shards.parse_mixture('a/web:0.7, gs://b/code:3') == [('a/web', 0.7), ('gs://b/code', 3.0)]
  for bad in ('a/web', 'a:0', 'a:x,b:1', 'a:1,a:2', ':1'):
    with pytest.raises(ValueError, match='data.mixture='):
      shards.parse_mixture(bad)


@pytest.fixture
def mix(tmp_path):
  """Returns a 0.7/0.3 Mixture of a 700-row and a 300-row table (the second's ids from 1000)."""
  return shards.Mixture([_id_table(tmp_path / 'a', [300, 400]), _id_table(tmp_path / 'b', [300],
                                                                          first=1000)],
                        [0.7, 0.3], ['a', 'b'])


@pytest.mark.parametrize('first', [0, 123_457])  # the second window crosses a mixing block
def test_a_mixture_realises_its_shares_within_binomial_tolerance(mix, first):
  n, p = 10_000, 0.7
  share = mix.shares(first, n, seed=0)
  # Four binomial standard deviations of the share over n rows (a block's exact quotas make the
  # realised spread smaller still).
  assert abs(share[0] - p) <= 4 * math.sqrt(p * (1 - p) / n)
  assert share.sum() == pytest.approx(1.0)
  per_step = [mix.shares(first + 32 * s, 32, seed=0)[0] for s in range(50)]
  assert len(set(per_step)) > 3  # drawn row by row, not a fixed split of every batch
  rows = np.concatenate([mix.step_rows(s, global_batch=100, seed=0)[:, 0] for s in range(100)])
  assert abs((rows < 1000).mean() - p) <= 4 * math.sqrt(p * (1 - p) / n)


def test_mixture_batches_are_pure_resumable_and_split_by_process(mix):
  kw = dict(global_batch=12, seed=4)
  full = _take(ip.train_batches(mix, **kw), 40)
  resumed = _take(ip.train_batches(mix, start_step=25, **kw), 15)
  for x, y in zip(full[25:], resumed):
    np.testing.assert_array_equal(x, y)
  halves = [_take(ip.train_batches(mix, process_index=p, process_count=2, **kw), 40)
            for p in range(2)]
  for k in range(40):
    np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), full[k])
  np.testing.assert_array_equal(mix.step_rows(39, **kw), full[39])  # no state of earlier steps
  assert not np.array_equal(mix.step_rows(3, global_batch=12, seed=5), full[3])


def test_each_source_serves_every_row_once_per_its_own_epoch(mix):
  labels, rows = mix.row_ids(0, 2_500, seed=2)
  for j, n in enumerate((700, 300)):
    mine = rows[labels == j]
    assert len(mine) >= 2 * n
    first, second = mine[:n], mine[n:2 * n]
    np.testing.assert_array_equal(np.sort(first), np.arange(n))
    np.testing.assert_array_equal(np.sort(second), np.arange(n))
    assert not np.array_equal(first, second)


@pytest.fixture(scope='module')
def small(build, tmp_path_factory, topics_corpus):
  """Returns the directory of a second, smaller build with the build's tokenizer (about 0.5 s)."""
  _, out, _ = build
  directory = tmp_path_factory.mktemp('mix') / 'small'
  config = _config(topics_corpus, out / 'tokenizer.model', max_documents=400)
  prepare.build(config, directory, workers=1, log=_quiet)
  return directory


def test_open_mixture_checks_its_builds(build, small, other, tmp_path):
  _, out, _ = build
  got = shards.open_mixture(f'{out}:3,{small}:1', SEQ_LEN, log=_quiet)
  a, b = shards.open_build(out, SEQ_LEN), shards.open_build(small, SEQ_LEN)
  assert got.train_rows.names == [out.name, 'small'] == shards.mixture_names(f'{out}:3,{small}:1')
  assert got.train_rows.quotas[0] == 3 * got.train_rows.quotas[1]
  assert len(got.train_rows) == len(a.train_rows) + len(b.train_rows)
  # Validation rows alternate a, b, a, b, ... until the smaller build runs out, then the rest.
  va, vb = np.asarray(a.val_rows), np.asarray(b.val_rows)
  n = min(len(va), len(vb))
  assert n > 0 and len(va) != len(vb)
  both = np.stack([va[:n], vb[:n]], axis=1).reshape(2 * n, -1)
  rest = va[n:] if len(va) > n else vb[n:]
  np.testing.assert_array_equal(np.asarray(got.val_rows), np.concatenate([both, rest]))
  np.testing.assert_array_equal(got.val_rows[2 * n - 1:2 * n + 1], np.stack([vb[n - 1], rest[0]]))
  assert got.val_rows.sources.tolist() == [0, 1] * n + [int(len(vb) > n)] * len(rest)
  assert got.key != shards.open_mixture(f'{out}:1,{small}:1', SEQ_LEN, log=_quiet).key
  copy = tmp_path / 'copy'
  shutil.copytree(small, copy)
  shutil.copy(other.model_path, copy / 'tokenizer.model')
  manifest = json.loads((copy / 'manifest.json').read_text())
  manifest['tokenizer']['fingerprint'] = other.fingerprint
  (copy / 'manifest.json').write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match='data.mixture: .* have different tokenizers'):
    shards.open_mixture(f'{out}:1,{copy}:1', SEQ_LEN, log=_quiet)


# ---------------------------------------------------------------------------------------------
# The side tables' sample


class _Reads:
  """A table that records the indices each read asks for."""

  def __init__(self, table):
    self.table, self.shape, self.reads = table, table.shape, []

  def __len__(self):
    return len(self.table)

  def __getitem__(self, idx):
    self.reads.append(np.asarray(idx))
    return self.table[idx]


def test_the_side_table_sample_is_uniform_over_the_shards_and_reads_only_itself(tmp_path):
  counts = [1_000] * 10
  table = _id_table(tmp_path, counts)  # row i holds i
  n, total = 2_000, sum(counts)
  reads = _Reads(table)
  rows, info = shards.sample_rows(reads, n, seed=3, chunk_rows=300)
  ids = rows[:, 0].astype(np.int64)
  assert info == {'rows': n, 'tokens': int((rows != 0).sum()), 'train_rows': total,
                  'fraction': n / total, 'seed': 3}
  assert len(np.unique(ids)) == n and (np.diff(ids) > 0).all()  # sorted, without replacement
  np.testing.assert_array_equal(np.concatenate(reads.reads), ids)  # the sample is all that is read
  assert max(len(r) for r in reads.reads) == 300
  # Rows per shard are hypergeometric: mean n/10, variance n p (1-p) (N-n)/(N-1) with p = 1/10.
  per_shard = np.bincount(ids // 1_000, minlength=10)
  sd = math.sqrt(n * 0.1 * 0.9 * (total - n) / (total - 1))
  assert np.abs(per_shard - n / 10).max() <= 5 * sd
  # So is the count below any cut, whatever the shards.
  for cut in (1_234, 5_000, 8_765):
    p = cut / total
    assert abs((ids < cut).sum() - n * p) <= 5 * math.sqrt(n * p * (1 - p))
  again, _ = shards.sample_rows(table, n, seed=3)
  np.testing.assert_array_equal(again, rows)
  assert not np.array_equal(shards.sample_rows(table, n, seed=4)[0], rows)
  whole, info = shards.sample_rows(table, 0, seed=3)  # 0: every row
  np.testing.assert_array_equal(whole, np.asarray(table))
  assert info['fraction'] == 1.0 and shards.describe_sample(info).startswith('all 10,000')


def test_a_mixtures_side_table_sample_holds_its_weights(tmp_path):
  mix = shards.Mixture([_id_table(tmp_path / 'a', [300, 400]),
                        _id_table(tmp_path / 'b', [300], first=1000)], [0.5, 0.5], ['a', 'b'])
  rows, info = shards.sample_rows(mix, 400, seed=0)
  ids = rows[:, 0]
  assert (ids < 1000).sum() == 200 and info['rows'] == 400  # by weight, not by size (700/300)
  assert len(np.unique(ids)) == 400
  rows, _ = shards.sample_rows(mix, 800, seed=0)  # b holds 300 < 400: all of them
  assert (rows[:, 0] >= 1000).sum() == 300 and (rows[:, 0] < 1000).sum() == 400


def test_side_tables_count_exactly_the_sampled_rows(build, tmp_path):
  """The MLM task's baselines and PMI vocabulary are those of the sample's rows, none other."""
  from mlmjax import pmi  # pylint: disable=g-import-not-at-top
  from mlmjax.tasks import mlm, mlm_eval  # pylint: disable=g-import-not-at-top
  config, out, _ = build
  opened = shards.open_build(out, SEQ_LEN)
  c = config.copy_and_resolve_references()
  c.data.side_table_tokens, c.data.cache_dir = 300 * SEQ_LEN + SEQ_LEN - 1, str(tmp_path / 'cache')
  c.masking.strategy, c.masking.pmi.min_count = 'pmi', 2
  lines = []
  task = mlm.MlmTask(c, opened.tokenizer, lines.append, cache=opened)
  data = task.prepare(tmp_path / 'workdir')
  ids = shards.sample_ids(opened.train_rows, 300, c.seed)
  shard = np.searchsorted(opened.train_rows.starts, ids, side='right') - 1
  assert len(np.unique(shard)) == len(opened.train_rows.files) >= 4  # every shard, not a prefix
  rows = np.asarray(opened.train_rows)[ids]
  unigram, successor = mlm_eval.baseline_tables(rows, opened.tokenizer.vocab_size,
                                                opened.tokenizer.special_mask)
  assert task.unigram == unigram
  np.testing.assert_array_equal(task.successor, successor)
  vocab = pmi.build_pmi_vocab(rows, opened.tokenizer.special_mask, min_count=2,
                              size=c.masking.pmi.vocab_size)
  np.testing.assert_array_equal(np.asarray(task.tables.pmi_hash1), vocab['hash1'])
  side = data.stats['side_tables']
  assert side['rows'] == 300 and side['train_rows'] == len(opened.train_rows)
  assert side['tokens'] == int((rows != 0).sum())
  text = '\n'.join(lines)
  assert 'n-gram baselines and PMI vocabulary: 300 sampled train rows' in text
  assert f'from 300 of {len(opened.train_rows):,} train rows' in text  # the PMI line


# ---------------------------------------------------------------------------------------------
# Training runs


def _params(workdir) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(predict.load_run(workdir).params)]


@pytest.mark.slow
def test_a_resumed_run_from_a_build_ends_bitwise_where_an_uninterrupted_one_does(
    make_tiny_config, tmp_path):
  c = make_tiny_config()
  c.data.prepared = str(tmp_path / 'build')  # missing: the first run builds it
  c.data.shard_chars, c.data.max_documents = SHARD_CHARS, 400  # a small build: faster to prepare
  c.train.num_steps, c.ckpt.every_steps, c.eval.every_steps = 6, 100, 100
  whole = train.run(c, tmp_path / 'whole')
  assert (tmp_path / 'build' / 'manifest.json').is_file() and whole['finished']
  assert whole['data']['prepared'] == str(tmp_path / 'build')
  assert ((tmp_path / 'whole' / 'tokenizer.model').read_bytes()
          == (tmp_path / 'build' / 'tokenizer.model').read_bytes())
  first = train.run(c, tmp_path / 'resumed', stop_after=3)
  assert first['step'] == 3 and not first['finished']
  assert train.run(c, tmp_path / 'resumed')['step'] == 6
  for x, y in zip(_params(tmp_path / 'whole'), _params(tmp_path / 'resumed')):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_a_mixture_run_logs_its_realised_shares_and_each_sources_validation(
    build, small, make_tiny_config, tmp_path):
  _, out, _ = build
  c = make_tiny_config()
  c.data.mixture = f'{out}:0.7,{small}:0.3'
  c.train.num_steps, c.train.log_every_steps = 4, 2
  c.ckpt.every_steps = c.eval.every_steps = 100
  c.eval.num_batches = 1  # one batch reaches both builds: their rows alternate
  summary = train.run(c, tmp_path / 'run')
  lines = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]
  shares = [(r[f'train/mix/{out.name}'], r['train/mix/small']) for r in records
            if 'train/loss' in r]
  assert len(shares) == 2
  opened = shards.open_mixture(c.data.mixture, SEQ_LEN, log=_quiet)
  for k, (a, b) in enumerate(shares):
    assert a + b == pytest.approx(1.0)
    assert a == pytest.approx(opened.train_rows.shares(k * 16, 16, seed=c.seed)[0])  # 2 steps of 8
  # The pooled figures are sums over the sources' rows: predictions add up, and so do the loss,
  # accuracy and baseline sums (each figure times its denominator).
  ev = [r for r in records if 'eval/loss' in r][-1]
  names = (out.name, 'small')
  pred = [ev[f'eval/{n}/predictions'] for n in names]
  assert all(p > 0 for p in pred) and sum(pred) == ev['eval/predictions']
  for metric in ('loss', 'accuracy'):
    pooled = ev[f'eval/{metric}'] * ev['eval/predictions']
    assert sum(ev[f'eval/{n}/{metric}'] * p for n, p in zip(names, pred)) == pytest.approx(
        pooled, rel=1e-5)
  assert all(f'eval/{n}/{k}' in ev for n in names for k in (
      'accuracy_at_mask', 'accuracy_at_random', 'baseline_bigram_accuracy_at_mask'))
  assert summary[f'eval/{out.name}/loss'] == ev[f'eval/{out.name}/loss']
  assert summary['data']['side_tables']['rows'] == len(opened.train_rows)  # under the default
