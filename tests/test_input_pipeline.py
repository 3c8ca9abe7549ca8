"""Tests for mlmjax.input_pipeline: splits, packing, the token cache, batch order and resume."""

import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from pydoc_data.topics import topics

from mlmjax import input_pipeline as ip
from mlmjax import tokenizer as tok_lib
from mlmjax.tokenizer import CLS_ID, NUM_SPECIAL, PAD_ID, SEP_ID

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paragraphs():
  """Returns the blank-line-separated paragraphs of the Python help topics (real text)."""
  return [p for text in topics.values() for p in text.split('\n\n') if p.strip()]


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  """Returns a small tokenizer trained on the pydoc topics."""
  path = tmp_path_factory.mktemp('tok') / 'pydocs.model'
  return tok_lib.train_tokenizer(list(topics.values()), path, vocab_size=800)


# ---------------------------------------------------------------------------------------------
# split_documents


def test_split_is_deterministic_and_stable_under_additions():
  docs = [f'document {i}: ' + 'word ' * (i % 7) for i in range(3000)]
  train, val = ip.split_documents(docs, 0.1)
  assert (train, val) == ip.split_documents(docs, 0.1)
  assert sorted(train + val) == list(range(len(docs)))
  more = [f'another document {i}' for i in range(500)]
  train2, val2 = ip.split_documents(docs + more, 0.1)
  # Old documents keep their split; the new ones are appended after them.
  assert [i for i in train2 if i < len(docs)] == train
  assert [i for i in val2 if i < len(docs)] == val
  # Same text, same split, wherever it stands.
  shuffled = docs[::-1]
  _, val_rev = ip.split_documents(shuffled, 0.1)
  assert sorted(shuffled[i] for i in val_rev) == sorted(docs[i] for i in val)


@pytest.mark.parametrize('fraction', [0.05, 0.3])
def test_split_fraction_within_binomial_tolerance(fraction):
  n = 20_000
  _, val = ip.split_documents([f'doc number {i}' for i in range(n)], fraction)
  assert abs(len(val) / n - fraction) < 5 * math.sqrt(fraction * (1 - fraction) / n)


def test_split_does_not_use_python_hash():
  docs = _paragraphs()[:400]
  here = ip.split_documents(docs, 0.3)
  code = textwrap.dedent('''
      import json, sys
      from pydoc_data.topics import topics
      from mlmjax import input_pipeline as ip
      docs = [p for t in topics.values() for p in t.split('\\n\\n') if p.strip()][:400]
      print(json.dumps(ip.split_documents(docs, 0.3)))
  ''')
  env = dict(os.environ, PYTHONHASHSEED='12345', PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True, timeout=60)
  assert [list(x) for x in here] == json.loads(out.stdout)


def test_split_edge_fractions():
  docs = [f'd{i}' for i in range(100)]
  assert ip.split_documents(docs, 0.0) == (list(range(100)), [])
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match='data.val_fraction'):
      ip.split_documents(docs, bad)


# ---------------------------------------------------------------------------------------------
# pack_documents


def _units(row):
  """Returns a row's [CLS] ... [SEP] units as (start column, inner tokens), and its pad count."""
  units, col = [], 0
  while col < len(row) and row[col] != PAD_ID:
    assert row[col] == CLS_ID, f'unit does not start with [CLS] at column {col}: {row}'
    end = col + 1 + int(np.argmax(row[col + 1:] == SEP_ID))
    assert row[end] == SEP_ID, row
    inner = row[col + 1:end]
    assert inner.size > 0 and inner.min() >= NUM_SPECIAL, row
    units.append((col, inner))
    col = end + 1
  assert (row[col:] == PAD_ID).all(), 'padding only at the row end'
  return units, len(row) - col


def _random_docs(rng, count, seq_len):
  """Returns token lists with lengths from empty to several rows, ids >= NUM_SPECIAL."""
  lengths = np.concatenate([
      rng.integers(0, 3, count // 4), rng.integers(1, seq_len, count // 2),
      rng.integers(seq_len - 3, seq_len + 2, count // 8),
      rng.integers(seq_len, 5 * seq_len, count // 8)])
  rng.shuffle(lengths)
  return [rng.integers(NUM_SPECIAL, 1000, n).tolist() for n in lengths]


@pytest.mark.parametrize('seq_len,min_chunk', [(16, 4), (128, 8), (64, 0), (5, 8)])
def test_pack_reproduces_every_document(seq_len, min_chunk):
  rng = np.random.default_rng(seq_len)
  docs = _random_docs(rng, 400, seq_len)
  rows = ip.pack_documents(docs, seq_len, min_chunk=min_chunk)
  assert rows.dtype == np.int32 and rows.ndim == 2 and rows.shape[1] == seq_len
  units = []
  for r, row in enumerate(rows):
    row_units, pad = _units(row)
    assert row_units, 'no empty rows'
    units += [(r, col, inner) for col, inner in row_units]
    if r < len(rows) - 1:
      # A row closes early only when fewer than min_chunk tokens (plus [CLS], [SEP]) would fit.
      assert pad <= max(min_chunk + 1, 2), (r, pad)
  # Core property: each document's pieces, in order, are consecutive units that rebuild it exactly.
  k = 0
  for doc in docs:
    if not doc:
      continue
    got = []
    while len(got) < len(doc):
      r, col, inner = units[k]
      if len(got) + len(inner) < len(doc):  # a cut: this piece fills its row to the end
        assert col + len(inner) + 2 == seq_len
        if col > 0:
          assert len(inner) >= min_chunk, 'a piece cut to end a row has at least min_chunk tokens'
      got += inner.tolist()
      k += 1
    assert got == doc
  assert k == len(units)


def test_pack_has_little_padding_on_real_text(tokenizer):
  ids = tokenizer.encode_batch(_paragraphs())
  rows = ip.pack_documents(ids, 128)
  content = (rows >= NUM_SPECIAL).sum()
  assert content == sum(map(len, ids))
  # At most min_chunk + 1 pads per row; most rows end flush.
  assert (rows == PAD_ID).mean() < (ip.MIN_CHUNK + 1) / 128


def test_pack_empty_and_invalid():
  assert ip.pack_documents([], 16).shape == (0, 16)
  assert ip.pack_documents([[], []], 16).shape == (0, 16)
  with pytest.raises(ValueError, match='train.seq_len'):
    ip.pack_documents([[7, 8]], 2)


# ---------------------------------------------------------------------------------------------
# token cache


class CountingDocs:
  """documents_fn that counts its calls."""

  def __init__(self, docs):
    self.docs, self.calls = docs, 0

  def __call__(self):
    self.calls += 1
    return self.docs


def _build(root, key, tokenizer, docs_fn, seq_len=64, val_fraction=0.1, seed=0):
  logs = []
  cache = ip.load_or_build_token_cache(root, key, documents_fn=docs_fn, tokenizer=tokenizer,
                                       seq_len=seq_len, val_fraction=val_fraction, seed=seed,
                                       log=logs.append)
  return cache, logs


def test_token_cache_key():
  base = dict(seq_len=128, val_fraction=0.05, seed=0)
  key = ip.token_cache_key('corpus', 'fp', **base)
  assert key == ip.token_cache_key('corpus', 'fp', **base)
  others = [ip.token_cache_key('corpus2', 'fp', **base), ip.token_cache_key('corpus', 'fp2', **base),
            ip.token_cache_key('corpus', 'fp', **{**base, 'seq_len': 64}),
            ip.token_cache_key('corpus', 'fp', **{**base, 'val_fraction': 0.1}),
            ip.token_cache_key('corpus', 'fp', **{**base, 'seed': 1}),
            ip.token_cache_key('corpus', 'fp', **{**base, 'pad_id': 50283})]
  assert len(set(others + [key])) == 7
  assert ip.token_cache_key('corpus', 'fp', **base, pad_id=PAD_ID) == key  # keys of [PAD] 0 stay


def test_pack_pads_with_the_given_pad_id():
  docs = [[7, 8, 9], [10] * 20, [11, 12]]
  zero, other = ip.pack_documents(docs, 16), ip.pack_documents(docs, 16, pad_id=99)
  assert (zero == PAD_ID).any() and not (zero == 99).any()
  np.testing.assert_array_equal(np.where(zero == PAD_ID, 99, zero), other)
  batches = ip.eval_batches(other, batch_size=4, pad_id=99)
  assert len(other) % 4  # so the last batch has padding rows
  assert (batches[-1][len(other) % 4:] == 99).all()


def test_cache_builds_once_and_holds_the_documents(tokenizer, tmp_path):
  docs = _paragraphs()
  fn = CountingDocs(docs)
  cache, logs = _build(tmp_path, 'k1', tokenizer, fn)
  assert fn.calls == 1 and any('built' in line for line in logs)
  again, logs = _build(tmp_path, 'k1', tokenizer, fn)
  assert fn.calls == 1 and any('reusing' in line for line in logs)
  assert isinstance(again.train_rows, np.memmap)
  np.testing.assert_array_equal(again.train_rows, cache.train_rows)
  np.testing.assert_array_equal(again.val_rows, cache.val_rows)
  assert again.stats == cache.stats
  # The rows hold exactly the tokens of each split's documents (as multisets).
  train_idx, val_idx = ip.split_documents(docs, 0.1)
  for idx, rows, name in ((train_idx, cache.train_rows, 'train'), (val_idx, cache.val_rows, 'val')):
    encoded = tokenizer.encode_batch([docs[i] for i in idx])
    ids = np.concatenate([np.array(t, np.int64) for t in encoded])
    tokens = np.asarray(rows)[np.asarray(rows) >= NUM_SPECIAL]
    np.testing.assert_array_equal(np.bincount(tokens, minlength=tokenizer.vocab_size),
                                  np.bincount(ids, minlength=tokenizer.vocab_size))
    s = cache.stats[name]
    assert s['documents'] == len(idx) and s['tokens'] == ids.size and s['rows'] == len(rows)
    assert s['padding_fraction'] == pytest.approx(float((np.asarray(rows) == PAD_ID).mean()))
  assert cache.stats['seq_len'] == 64 and cache.train_rows.shape[1] == 64
  assert cache.stats['tokenizer_fingerprint'] == tokenizer.fingerprint
  # Document order is shuffled before packing: the first row is not the first documents.
  first = tokenizer.encode(docs[train_idx[0]])
  assert cache.train_rows[0, 1:1 + min(len(first), 62)].tolist() != first[:62]


def test_cache_seed_changes_order_not_content(tokenizer, tmp_path):
  docs = _paragraphs()[:300]
  a, _ = _build(tmp_path, 'a', tokenizer, CountingDocs(docs), seed=0)
  b, _ = _build(tmp_path, 'b', tokenizer, CountingDocs(docs), seed=1)
  assert not np.array_equal(a.train_rows[:5], b.train_rows[:5])
  ca, cb = (np.bincount(np.asarray(c.train_rows).ravel()) for c in (a, b))
  np.testing.assert_array_equal(ca[NUM_SPECIAL:], cb[NUM_SPECIAL:])


def test_cache_without_done_marker_is_rebuilt(tokenizer, tmp_path):
  docs = _paragraphs()[:200]
  good, _ = _build(tmp_path, 'k', tokenizer, CountingDocs(docs))
  expected = np.array(good.train_rows)
  (tmp_path / 'k' / 'DONE').unlink()
  (tmp_path / 'k' / 'train.npy').write_bytes(b'half written')
  fn = CountingDocs(docs)
  cache, logs = _build(tmp_path, 'k', tokenizer, fn)
  assert fn.calls == 1 and any('incomplete' in line for line in logs)
  np.testing.assert_array_equal(cache.train_rows, expected)


def test_crashed_build_leaves_nothing_trusted(tokenizer, tmp_path):
  # A process that dies mid-build (os._exit: no cleanup runs) leaves only a temporary directory.
  code = textwrap.dedent(f'''
      import os
      from mlmjax import input_pipeline as ip, tokenizer as tok_lib
      tok = tok_lib.Tokenizer.load({tokenizer.model_path!r})
      ip.load_or_build_token_cache({str(tmp_path)!r}, 'k', documents_fn=lambda: os._exit(3),
                                   tokenizer=tok, seq_len=64, val_fraction=0.1, seed=0)
  ''')
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, timeout=60)
  assert proc.returncode == 3, proc.stderr
  leftovers = [p.name for p in tmp_path.iterdir()]
  assert len(leftovers) == 1 and leftovers[0].startswith('.k.tmp-'), leftovers
  fn = CountingDocs(_paragraphs()[:200])
  cache, logs = _build(tmp_path, 'k', tokenizer, fn)
  assert fn.calls == 1 and cache.train_rows.shape[0] > 0
  assert [p.name for p in tmp_path.iterdir()] == ['k'], 'the dead build directory is removed'
  assert any('did not finish' in line for line in logs)


def test_cache_error_removes_temporary_directory(tokenizer, tmp_path):
  def broken():
    raise OSError('disk went away')
  with pytest.raises(OSError, match='disk went away'):
    _build(tmp_path, 'k', tokenizer, broken)
  assert list(tmp_path.iterdir()) == []


def test_cache_with_empty_val_split(tokenizer, tmp_path):
  cache, _ = _build(tmp_path, 'k', tokenizer, CountingDocs(_paragraphs()[:100]), val_fraction=0.0)
  assert cache.val_rows.shape == (0, 64)
  assert cache.stats['val']['documents'] == 0
  assert ip.eval_batches(cache.val_rows, batch_size=4) == []


# ---------------------------------------------------------------------------------------------
# batch order


def _id_rows(n, seq_len=4):
  """Returns rows filled with their own index, so batches reveal which rows they took."""
  return np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_steps_and_position():
  assert ip.steps_per_epoch(100, 8) == 12
  assert ip.data_position(0, 100, 8) == {'epoch': 0, 'offset': 0}
  assert ip.data_position(12 * 3 + 5, 100, 8) == {'epoch': 3, 'offset': 5}
  with pytest.raises(ValueError, match='train.batch_size'):
    ip.steps_per_epoch(7, 8)
  with pytest.raises(ValueError, match='train.batch_size'):
    ip.steps_per_epoch(7, 0)


def test_epoch_permutation():
  p0 = ip.epoch_permutation(1000, 0, 0)
  np.testing.assert_array_equal(np.sort(p0), np.arange(1000))
  np.testing.assert_array_equal(p0, ip.epoch_permutation(1000, 0, 0))
  assert not np.array_equal(p0, ip.epoch_permutation(1000, 0, 1))
  assert not np.array_equal(p0, ip.epoch_permutation(1000, 1, 0))


def test_train_batches_order_and_coverage():
  n, b = 100, 8
  spe = ip.steps_per_epoch(n, b)
  rows = _id_rows(n)
  batches = _take(ip.train_batches(rows, global_batch=b, seed=3), 3 * spe)
  again = _take(ip.train_batches(rows, global_batch=b, seed=3), 3 * spe)
  for s, (x, y) in enumerate(zip(batches, again)):
    assert x.shape == (b, 4) and x.dtype == np.int32
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(x, ip.global_batch_rows(rows, s, global_batch=b, seed=3))
  epochs = [np.concatenate(batches[e * spe:(e + 1) * spe])[:, 0] for e in range(3)]
  for seen in epochs:
    # Each row at most once per epoch; N % B rows sit out (different ones each epoch).
    assert len(seen) == spe * b and len(set(seen.tolist())) == spe * b
  assert not np.array_equal(epochs[0], epochs[1])
  assert set(epochs[0].tolist()) != set(epochs[1].tolist())
  other_seed = np.concatenate(_take(ip.train_batches(rows, global_batch=b, seed=4), spe))[:, 0]
  assert not np.array_equal(other_seed, epochs[0])


def test_train_batches_every_row_once_when_divisible():
  rows = _id_rows(96)
  seen = np.concatenate(_take(ip.train_batches(rows, global_batch=8, seed=0), 12))[:, 0]
  np.testing.assert_array_equal(np.sort(seen), np.arange(96))


@pytest.mark.parametrize('start', [1, 11, 12, 29])
def test_train_batches_resume_matches(start):
  rows = _id_rows(100)
  full = _take(ip.train_batches(rows, global_batch=8, seed=5), start + 15)
  resumed = _take(ip.train_batches(rows, global_batch=8, seed=5, start_step=start), 15)
  for x, y in zip(full[start:], resumed):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('prefetch', [0, 3])
def test_train_batches_without_tensorflow_are_the_same(monkeypatch, prefetch):
  rows = _id_rows(101)
  kw = dict(global_batch=12, seed=2, start_step=5, process_index=1, process_count=3)
  with_tf = _take(ip.train_batches(rows, **kw), 25)
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # `import tensorflow` now raises ImportError
  stream = ip.train_batches(rows, prefetch=prefetch, **kw)
  assert type(stream).__name__ == 'generator'  # not a tf.data iterator
  for x, y in zip(with_tf, _take(stream, 25)):
    assert y.dtype == np.int32 and y.shape == (4, 4)
    np.testing.assert_array_equal(x, y)


def test_train_batches_process_slices():
  rows = _id_rows(101)
  global_batch, procs = 12, 3
  per_proc = [_take(ip.train_batches(rows, global_batch=global_batch, seed=0, start_step=7,
                                     process_index=p, process_count=procs), 20)
              for p in range(procs)]
  for k in range(20):
    parts = [per_proc[p][k] for p in range(procs)]
    assert all(part.shape == (global_batch // procs, 4) for part in parts)
    ids = [set(part[:, 0].tolist()) for part in parts]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    expected = ip.global_batch_rows(rows, 7 + k, global_batch=global_batch, seed=0)
    np.testing.assert_array_equal(np.concatenate(parts), expected)
  with pytest.raises(ValueError, match='train.batch_size'):
    ip.train_batches(rows, global_batch=10, seed=0, process_count=3)


def test_train_batches_from_memmap(tmp_path):
  path = tmp_path / 'rows.npy'
  np.save(path, _id_rows(50, seq_len=16))
  rows = np.load(path, mmap_mode='r')
  got = _take(ip.train_batches(rows, global_batch=5, seed=0, start_step=13), 3)
  for k, batch in enumerate(got):
    np.testing.assert_array_equal(batch, ip.global_batch_rows(rows, 13 + k, global_batch=5, seed=0))


# ---------------------------------------------------------------------------------------------
# eval_batches


def test_eval_batches():
  rows = _id_rows(10) + 10  # no row is all PAD
  batches = ip.eval_batches(rows, batch_size=4)
  assert len(batches) == 3 and all(b.shape == (4, 4) and b.dtype == np.int32 for b in batches)
  np.testing.assert_array_equal(np.concatenate(batches)[:10], rows)
  assert (batches[-1][2:] == PAD_ID).all()
  assert len(ip.eval_batches(rows, batch_size=4, num_batches=2)) == 2
  assert len(ip.eval_batches(rows, batch_size=5)) == 2
  assert len(ip.eval_batches(rows, batch_size=4, num_batches=10)) == 3
  with pytest.raises(ValueError, match='eval.batch_size'):
    ip.eval_batches(rows, batch_size=0)


@pytest.mark.slow
def test_runs_started_together_share_the_cleaned_corpus_cache(topics_corpus, tmp_path):
  # Four processes clean the same corpus at once into one cache root; each must finish, and the
  # file they leave must be whole (one temporary file per writer, renamed into place).
  code = textwrap.dedent(f'''
      import json, os, pathlib, sys, time
      from configs import pretrain
      from mlmjax import input_pipeline as ip
      c = pretrain.get_config('tiny_classic')
      c.data.corpus = {str(topics_corpus)!r}
      while not os.path.exists({str(tmp_path / 'go')!r}):
        time.sleep(0.005)
      root = pathlib.Path({str(tmp_path / 'cache')!r})
      docs = ip.cleaned_documents(c.data, root, log=lambda s: None)
      print(json.dumps([len(docs), sum(map(len, docs))]))
  ''')
  env = dict(os.environ, PYTHONPATH=REPO)
  procs = [subprocess.Popen([sys.executable, '-c', code], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(4)]
  time.sleep(3)  # let every process import and reach the wait
  (tmp_path / 'go').touch()
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in outs]
  counts = {out for out, _ in outs}
  assert len(counts) == 1
  files = list((tmp_path / 'cache' / 'corpus').iterdir())
  assert len(files) == 1 and files[0].suffix == '.jsonl', files
  lines = files[0].read_text(encoding='utf-8').splitlines()
  assert json.dumps([len(lines), sum(len(json.loads(x)) for x in lines)]) == counts.pop().strip()
