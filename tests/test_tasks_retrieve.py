"""Tests for mlmjax.tasks.retrieve: rows, splits, InfoNCE loss, ranking, evaluation, baseline."""

import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from flax import nnx
from pydoc_data.topics import topics

from configs import finetune
from mlmjax import heads
from mlmjax import model as M
from mlmjax import tokenizer as tok_lib
from mlmjax.tasks import retrieve, task_data

PAD, CLS, SEP = 0, 2, 3
SEQ_LEN = 32
LONG_QUERY = ' '.join(['attribute reference evaluation order'] * 12)


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  """Returns a small unigram tokenizer trained on the pydoc topics."""
  path = tmp_path_factory.mktemp('tok') / 'tok.model'
  return tok_lib.train_tokenizer(list(topics.values()), path, vocab_size=1000, max_sentences=3000)


def sentence_pairs(n: int) -> list[dict]:
  """Returns n distinct (query, document) pairs: consecutive plain sentences of the help topics."""
  sentences = []
  for key in sorted(topics):
    for s in re.split(r'(?<=\.)\s+', ' '.join(topics[key].split())):
      if 20 <= len(s) <= 70 and re.fullmatch(r"[A-Za-z ,.'-]+", s) and s not in sentences:
        sentences.append(s)
  assert len(sentences) >= 2 * n
  return [{'id': f'p{i}', 'query': sentences[2 * i], 'document': sentences[2 * i + 1]}
          for i in range(n)]


def write_jsonl(path, rows) -> str:
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def make_config(path: str, **task_data_overrides):
  c = finetune.get_config('retrieve_tiny')
  c.task_data.path = path
  c.task_data.id_field = 'id'
  for k, v in task_data_overrides.items():
    c.task_data[k] = v
  c.train.seq_len = SEQ_LEN
  c.eval.batch_size = 8
  return c


def enc_config(vocab_size: int, dropout: float = 0.0) -> M.EncoderConfig:
  return M.EncoderConfig(vocab_size=vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                         intermediate_size=64, max_position=SEQ_LEN, dropout_rate=dropout,
                         attention_dropout_rate=dropout)


@pytest.fixture(scope='module')
def pairs_file(tmp_path_factory):
  """Returns (path, rows): 48 sentence pairs, one over-long query, one document repeated."""
  rows = sentence_pairs(48)
  rows[3]['query'] = LONG_QUERY
  rows[7]['document'] = rows[5]['document']
  return write_jsonl(tmp_path_factory.mktemp('data') / 'pairs.jsonl', rows), rows


@pytest.fixture(scope='module')
def dual_model(tok):
  """Returns (graphdef, params) of a small random DualEncoder (mean pooling, no dropout)."""
  m = heads.DualEncoder(enc_config(tok.vocab_size), pooling='mean', rngs=nnx.Rngs(0))
  return nnx.split(m)


@functools.lru_cache(maxsize=None)
def _embed_fn(graphdef):
  return jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))


def embed(graphdef, params, tokens) -> np.ndarray:
  """Returns float64 embeddings of token rows, computed 8 rows at a time (one compiled shape)."""
  tokens = np.asarray(tokens, np.int32)
  out = []
  for start in range(0, len(tokens), 8):
    part = tokens[start:start + 8]
    padded = np.concatenate([part, np.zeros((8 - len(part), tokens.shape[1]), np.int32)])
    out.append(np.asarray(_embed_fn(graphdef)(params, jnp.asarray(padded)))[:len(part)])
  return np.concatenate(out).astype(np.float64)


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def numpy_info_nce(q, d, q_tokens, d_tokens, temperature):
  """Returns (loss_sum, weight, correct, negatives): in-batch-negatives InfoNCE in plain numpy."""
  s = unit(q) @ unit(d).T / temperature
  valid = q_tokens[:, 0] != PAD
  loss, correct, negatives = 0.0, 0, 0
  for i in np.flatnonzero(valid):
    negs = [j for j in np.flatnonzero(valid)
            if j != i and not np.array_equal(d_tokens[j], d_tokens[i])]
    logits = np.array([s[i, i]] + [s[i, j] for j in negs])
    m = logits.max()
    loss += m + math.log(np.exp(logits - m).sum()) - s[i, i]
    correct += int(all(s[i, i] > s[i, j] for j in negs))
    negatives += len(negs)
  return loss, int(valid.sum()), correct, negatives


# ---------------------------------------------------------------------------------------------
# prepare


def test_prepare_layout_splits_and_stats(tok, pairs_file, tmp_path):
  path, rows = pairs_file
  task = retrieve.RetrieveTask(make_config(path), tok, lambda s: None)
  data = task.prepare(tmp_path)
  by_split = {s: getattr(data, s) for s in task_data.SPLITS}
  assert sum(len(r) for r in by_split.values()) == len(rows)
  assert data.stats['counts'] == {s: len(r) for s, r in by_split.items()}
  assert all(r.shape[1] == 2 * SEQ_LEN and r.dtype == np.int32 for r in by_split.values())

  # Row content: each half is [CLS] the text's pieces [SEP] PAD..., cut to fit.
  text_of = {r['id']: r for r in rows}
  for split, r in by_split.items():
    queries, documents = task.texts[split]
    for row, qt, dt in zip(r, queries, documents):
      for half, text in ((row[:SEQ_LEN], qt), (row[SEQ_LEN:], dt)):
        pieces = tok.encode(text)[:SEQ_LEN - 2]
        assert half[0] == CLS and half[1 + len(pieces)] == SEP
        np.testing.assert_array_equal(half[1:1 + len(pieces)], pieces)
        assert (half[2 + len(pieces):] == PAD).all()
  too_long = lambda field: sum(len(tok.encode(r[field])) > SEQ_LEN - 2 for r in rows)
  assert len(tok.encode(LONG_QUERY)) > SEQ_LEN - 2
  assert sum(data.stats['truncated_queries'].values()) == too_long('query') >= 1
  assert sum(data.stats['truncated_documents'].values()) == too_long('document')
  split_of_7 = next(s for s in task_data.SPLITS if text_of['p7']['query'] in task.texts[s][0])
  split_of_5 = next(s for s in task_data.SPLITS if text_of['p5']['query'] in task.texts[s][0])
  for s in task_data.SPLITS:  # rows 5 and 7 share a document: one distinct document fewer
    expected = len(by_split[s]) - (s == split_of_5 == split_of_7)
    assert data.stats['distinct_documents'][s] == expected
  json.dumps(data.stats)

  # Splits follow the id alone: reordered and extended files keep every id in its split.
  again = task.prepare(tmp_path)
  assert again.key == data.key
  for s in task_data.SPLITS:
    np.testing.assert_array_equal(getattr(again, s), by_split[s])
  extra = sentence_pairs(60)[48:]
  shuffled = write_jsonl(tmp_path / 'shuffled.jsonl', list(reversed(rows)) + extra)
  other = retrieve.RetrieveTask(make_config(shuffled), tok, lambda s: None)
  other.prepare(tmp_path)
  for s in task_data.SPLITS:
    assert set(task.texts[s][0]) <= set(other.texts[s][0])
  assert sum(len(other.rows[s]) for s in task_data.SPLITS) == 60


def test_prepare_errors_name_the_config_key(tok, tmp_path):
  path = write_jsonl(tmp_path / 'bad.jsonl', [{'id': 'a', 'query': 'x', 'document': 'y'},
                                              {'id': 'b', 'question': 'x', 'document': 'y'}])
  with pytest.raises(ValueError, match=r"task_data.query_field: 'query' is missing in row 2"):
    retrieve.RetrieveTask(make_config(path), tok, print).prepare(tmp_path)
  c = make_config(path)
  c.retrieve.temperature = 0.0
  with pytest.raises(ValueError, match='retrieve.temperature'):
    retrieve.RetrieveTask(c, tok, print)
  c = make_config(path)
  c.retrieve.pooling = 'max'
  with pytest.raises(ValueError, match='retrieve.pooling'):
    retrieve.RetrieveTask(c, tok, print)


# ---------------------------------------------------------------------------------------------
# The loss


@pytest.mark.slow
def test_batch_loss_equals_numpy_info_nce(tok, pairs_file, dual_model, tmp_path):
  path, _ = pairs_file
  task = retrieve.RetrieveTask(make_config(path), tok, lambda s: None)
  train = task.prepare(tmp_path).train
  rows = np.concatenate([train[:6], np.zeros((2, 2 * SEQ_LEN), np.int32)])  # 2 padding rows
  rows[4, SEQ_LEN:] = rows[1, SEQ_LEN:]  # a repeated document is no negative of its twin
  graphdef, params = dual_model

  @jax.jit
  def loss(params, rows, drop_key):
    return task.batch_loss(nnx.merge(graphdef, params), rows, jax.random.key(0), drop_key, 0)

  loss_sum, weight, sums = loss(params, jnp.asarray(rows), None)
  q = embed(graphdef, params, rows[:, :SEQ_LEN])
  d = embed(graphdef, params, rows[:, SEQ_LEN:])
  ref_loss, ref_weight, ref_correct, ref_negatives = numpy_info_nce(
      q, d, rows[:, :SEQ_LEN], rows[:, SEQ_LEN:], task.temperature)
  assert float(weight) == ref_weight == 6
  np.testing.assert_allclose(float(loss_sum), ref_loss, rtol=1e-4)
  assert float(sums['loss_sum']) == float(loss_sum) and float(sums['weight']) == 6
  assert float(sums['correct']) == ref_correct
  assert float(sums['negatives']) == ref_negatives <= 6 * 5 - 2

  # With dropout (the same parameters in a dropout model) the loss follows the key.
  dropout_model = nnx.eval_shape(lambda: heads.DualEncoder(enc_config(tok.vocab_size, dropout=0.2),
                                                       rngs=nnx.Rngs(0)))
  gd = nnx.split(dropout_model)[0]
  run = jax.jit(lambda k: task.batch_loss(nnx.merge(gd, params), jnp.asarray(rows), None, k, 0)[0])
  a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  assert float(a) == float(b) and float(a) != float(c) and float(a) != float(loss_sum)


def test_temperature_sharpens_on_fixed_embeddings():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(6, 8))
  d = q + 0.3 * rng.normal(size=(6, 8))
  d[5] = -q[5]  # row 5's own document is its worst candidate
  tokens = np.arange(6 * 3).reshape(6, 3) + 5  # distinct, non-padding rows
  s = unit(q) @ unit(d).T
  assert [i for i in range(6) if s[i, i] == s[i].max()] == [0, 1, 2, 3, 4]
  per_row = {}
  sums_fn = jax.jit(retrieve.in_batch_sums)  # temperature traced: one compilation
  for t in (1.0, 0.1, 0.01):
    loss_sum, weight, sums = sums_fn(jnp.asarray(q, jnp.float32), jnp.asarray(d, jnp.float32),
                                     jnp.asarray(tokens), jnp.asarray(tokens), t)
    ref = numpy_info_nce(q, d, tokens, tokens, t)
    np.testing.assert_allclose(float(loss_sum), ref[0], rtol=1e-4)
    assert float(weight) == 6 and float(sums['correct']) == ref[2] == 5
    logits = s / t
    top = logits.max(1)
    per_row[t] = np.log(np.exp(logits - top[:, None]).sum(1)) + top - np.diag(logits)
    np.testing.assert_allclose(per_row[t].sum(), ref[0], rtol=1e-9)
  # Gradients are finite despite the masked (-inf) entries; a padding row (first token PAD) gets 0.
  padded = tokens.copy()
  padded[2, 0] = PAD
  grad_q, grad_d = jax.jit(jax.grad(
      lambda q, d: retrieve.in_batch_sums(q, d, jnp.asarray(padded), jnp.asarray(padded), 0.05)[0],
      argnums=(0, 1)))(jnp.asarray(q, jnp.float32), jnp.asarray(d, jnp.float32))
  assert bool(jnp.isfinite(grad_q).all() & jnp.isfinite(grad_d).all())
  assert not grad_q[2].any() and not grad_d[2].any() and grad_q[0].any()
  # Rows whose own document scores highest: lower temperature, lower loss (towards 0).
  assert (per_row[1.0][:5] > per_row[0.1][:5]).all()
  assert (per_row[0.1][:5] > per_row[0.01][:5]).all()
  assert per_row[0.01][:5].max() < 0.1 * per_row[1.0][:5].min()
  # Row 5: logsumexp is at most log(6) above the max: loss = (max - gold cosine) / t + [0, log 6].
  gap = s[5].max() - s[5, 5]
  for t in (1.0, 0.1, 0.01):
    assert gap / t <= per_row[t][5] <= gap / t + math.log(6)


# ---------------------------------------------------------------------------------------------
# Ranking


def test_gold_ranks_on_a_hand_built_score_matrix():
  scores = np.zeros((4, 12))
  scores[0] = np.linspace(0.9, 0.0, 12)  # gold 0 is the best: rank 1
  scores[1] = np.linspace(0.9, 0.0, 12)  # gold 4: columns 0-3 above: rank 5
  scores[2] = np.linspace(0.0, 0.9, 12)  # gold 0 is the worst of 12: rank 12
  scores[3] = [0.1, 0.5, 0.2, 0.5 + 1e-8, 0.3, 0, 0, 0, 0, 0, 0, 0]  # gold 1 ties column 3: rank 2
  gold = np.array([0, 4, 0, 1])
  ranks = retrieve.gold_ranks(scores, gold)
  np.testing.assert_array_equal(ranks, [1, 5, 12, 2])
  m = retrieve.ranking_metrics(ranks)
  assert m['recall_at_1'] == 0.25 and m['recall_at_10'] == 0.75
  np.testing.assert_allclose(m['mrr'], (1 + 1 / 5 + 1 / 12 + 1 / 2) / 4)
  # A strict tie rule would put query 3 first; the pessimistic rule does not.
  np.testing.assert_array_equal(retrieve.gold_ranks(scores, gold, tol=-1.0)[3], 1)

  # Four candidates: each query's own and the first three (or four, gold among them) others.
  ranks4 = retrieve.gold_ranks(scores, gold, num_candidates=4)
  # q0: 1; q1 (gold 4 >= 4): columns 0-2 above: 4; q2: columns 1-3 above: 4; q3: column 3 ties: 2.
  np.testing.assert_array_equal(ranks4, [1, 4, 4, 2])

  # Everything on one vector: every query ranks last, never first.
  flat = retrieve.gold_ranks(np.ones((5, 5)), np.arange(5))
  np.testing.assert_array_equal(flat, [5] * 5)


def test_rank_queries_in_chunks_dense_and_sparse():
  rng = np.random.default_rng(1)
  q, c = rng.normal(size=(1100, 8)), rng.normal(size=(50, 8))  # more queries than one chunk
  gold = rng.integers(0, 50, size=1100)
  for n in (0, 7):
    ranks, per_query = retrieve.rank_queries(q, c, gold, n)
    np.testing.assert_array_equal(ranks, retrieve.gold_ranks(q @ c.T, gold, n))
    assert per_query == (n or 50) and ranks.max() <= per_query
    csr = scipy.sparse.csr_matrix
    sparse, _ = retrieve.rank_queries(csr(q), csr(c), gold, n)
    np.testing.assert_array_equal(sparse, ranks)


def test_distinct_documents():
  rows = np.array([[2, 7, 3], [2, 8, 3], [2, 7, 3], [2, 9, 3], [2, 8, 3]])
  firsts, gold = retrieve.distinct_documents(rows)
  np.testing.assert_array_equal(firsts, [0, 1, 3])
  np.testing.assert_array_equal(gold, [0, 1, 0, 2, 1])


def test_perfect_embeddings_give_recall_1(tok, dual_model, tmp_path):
  rows = sentence_pairs(24)
  for r in rows:
    r['document'] = r['query']
  rows.append(dict(rows[0], id='twin'))  # the same pair twice: one candidate, found by both
  path = write_jsonl(tmp_path / 'same.jsonl', rows)
  task = retrieve.RetrieveTask(make_config(path, val_fraction=0.5, test_fraction=0.4), tok,
                               lambda s: None)
  task.prepare(tmp_path)
  graphdef, params = dual_model
  for split in ('val', 'test'):
    m = task.evaluate(graphdef, params, split, jnp.asarray)
    assert m['num_queries'] == len(task.rows[split]) > 5
    assert m['recall_at_1'] == m['mrr'] == 1.0
  assert task.baselines()['overlap_recall_at_1'] == 1.0


# ---------------------------------------------------------------------------------------------
# Evaluation


def numpy_ranks(q, c, gold, num_candidates=0):
  """Returns ranks by sorting: position of gold among {gold} + the first N - 1 other candidates."""
  ranks = []
  for i in range(len(q)):
    others = [j for j in range(len(c)) if j != gold[i]]
    if num_candidates:
      others = others[:num_candidates - 1]
    pool = [gold[i]] + others
    s = unit(q[i:i + 1]) @ unit(c[pool]).T
    order = np.argsort(-s[0], kind='stable')
    ranks.append(int(np.flatnonzero(order == 0)[0]) + 1)
  return np.array(ranks)


def test_evaluate_matches_numpy_ranking(tok, pairs_file, dual_model, tmp_path):
  path, _ = pairs_file
  task = retrieve.RetrieveTask(make_config(path, val_fraction=0.4, test_fraction=0.2), tok,
                               lambda s: None)
  task.prepare(tmp_path)
  graphdef, params = dual_model
  rows = task.rows['val']
  assert len(rows) > 8 and len(rows) % 8  # several batches, the last padded
  m = task.evaluate(graphdef, params, 'val', jnp.asarray)

  q = embed(graphdef, params, rows[:, :SEQ_LEN])
  d = embed(graphdef, params, rows[:, SEQ_LEN:])
  firsts, gold = retrieve.distinct_documents(rows[:, SEQ_LEN:])
  ranks = numpy_ranks(q, d[firsts], gold)
  expected = retrieve.ranking_metrics(ranks)
  for k, v in expected.items():
    assert m[k] == pytest.approx(v, abs=1e-12), k
  assert m['num_candidates'] == len(firsts) and m['num_queries'] == len(rows)
  loss_sum, weight = 0.0, 0
  for start in range(0, len(rows), 8):
    b = slice(start, start + 8)
    ls, w, *_ = numpy_info_nce(q[b], d[b], rows[b, :SEQ_LEN], rows[b, SEQ_LEN:], task.temperature)
    loss_sum, weight = loss_sum + ls, weight + w
  assert m['loss'] == pytest.approx(loss_sum / weight, rel=1e-4)
  assert 0 < m['mrr'] < 1  # a random model is neither perfect nor useless on its own pieces

  task.num_candidates = 5
  m5 = task.evaluate(graphdef, params, 'val', jnp.asarray)
  assert m5['num_candidates'] == 5
  assert m5['mrr'] == pytest.approx(np.mean(1 / numpy_ranks(q, d[firsts], gold, 5)), abs=1e-12)
  assert len(task._eval_fns) == 1  # one jitted forward, built once
  assert 'R@1' in task.eval_text(m5)


# ---------------------------------------------------------------------------------------------
# Baseline


def test_tfidf_baseline_on_a_constructed_example():
  queries = ['the red fox jumps high', 'a cat sat on the mat', 'dogs bark loudly',
             'the zebra is here']
  docs = ['red fox jumping high', 'the cat on a mat', 'quiet birds sing', 'the the zebra',
          'the is here the']
  gold = [0, 1, 2, 3]
  ranks, n = retrieve.tfidf_ranks(queries, docs, gold)
  # q2 shares no word with any document: all five score 0, a pessimistic tie: rank 5. q3 shares
  # 'the' and 'zebra' with its document 3, but 'the', 'is' and 'here' (as rare) with document 4.
  np.testing.assert_array_equal(ranks, [1, 1, 5, 2])
  assert n == 5

  # Against a dense numpy TF-IDF of the same definition.
  tokenize = lambda t: re.findall(r'\w+', t.lower())
  vocab = sorted({w for t in docs for w in tokenize(t)})
  def tf(t):
    v = np.zeros(len(vocab))
    for w in set(tokenize(t)):
      if w in vocab:
        v[vocab.index(w)] = 1 + math.log(tokenize(t).count(w))
    return v
  df = np.array([sum(w in tokenize(t) for t in docs) for w in vocab])
  idf = np.log((1 + len(docs)) / (1 + df)) + 1
  weigh = lambda texts: unit(np.stack([tf(t) for t in texts]) * idf)
  scores = weigh(queries) @ weigh(docs).T
  np.testing.assert_array_equal(retrieve.gold_ranks(scores, gold), ranks)


# ---------------------------------------------------------------------------------------------
# The real Bible pairs


@pytest.mark.slow
def test_bible_pairs(tok, shared_data, tmp_path):
  path = str(shared_data / 'tasks' / 'bible_kjv_web_verses.jsonl')
  c = finetune.get_config('bible')
  c.task_data.path = path
  task = retrieve.RetrieveTask(c, tok, lambda s: None)
  data = task.prepare(tmp_path)
  n = 31_095
  assert data.stats['examples'] == n and sum(data.stats['counts'].values()) == n
  # Default fractions 0.1 / 0.1: counts within 5 binomial standard deviations.
  sd = math.sqrt(n * 0.1 * 0.9)
  for s in ('val', 'test'):
    assert abs(data.stats['counts'][s] - 0.1 * n) < 5 * sd
  assert data.stats['distinct_documents']['test'] >= 2000
  # KJV and WEB share most words of a verse: TF-IDF finds the right verse far above chance.
  base = task.baselines()
  assert base['overlap_recall_at_1'] > 0.5 and base['overlap_mrr'] > base['overlap_recall_at_1']
