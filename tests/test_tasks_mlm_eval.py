"""Tests of mlmjax.evaluate: n-gram baseline tables and the fixed-mask evaluation loop."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlmjax import masking, model
from mlmjax.tasks import mlm_eval as evaluate
from mlmjax import tokenizer as tok

VOCAB, SEQ, BATCH, NUM_BATCHES = 64, 32, 16, 20


# ---------------------------------------------------------------------------------------------
# baseline_tables against a plain-Python count


_DEFAULT_SPECIAL = frozenset(range(tok.NUM_SPECIAL))


def _reference_tables(rows: np.ndarray, vocab: int,
                      special: frozenset = _DEFAULT_SPECIAL) -> tuple[int, list[int]]:
  """Returns (unigram, successor) counted with dicts: argmax ties go to the lowest id."""
  uni = collections.Counter(int(t) for t in rows.ravel() if t not in special)
  unigram = min(uni, key=lambda t: (-uni[t], t))
  nxt = collections.defaultdict(collections.Counter)
  for row in rows.tolist():
    for a, b in zip(row[:-1], row[1:]):
      if b not in special:  # a special or PAD never counts as a successor
        nxt[a][b] += 1
  successor = [-1] * vocab
  for a, counts in nxt.items():
    successor[a] = min(counts, key=lambda t: (-counts[t], t))
  return unigram, successor


def _markov_rows(seed: int, n: int, seq: int = SEQ, vocab: int = VOCAB) -> np.ndarray:
  """Returns packed [CLS] unit [SEP] rows; (7 * id + 3) % vocab follows an id 60% of the time."""
  rng = np.random.default_rng(seed)
  rows = np.zeros((n, seq), np.int32)
  for r in range(n):
    pos, end = 0, seq - int(rng.integers(0, 6))
    while end - pos >= 6:
      length = int(rng.integers(3, end - pos - 1))
      unit = [int(rng.integers(tok.NUM_SPECIAL, vocab))]
      for _ in range(length - 1):
        follow = (7 * unit[-1] + 3) % vocab
        if rng.random() < 0.6 and follow >= tok.NUM_SPECIAL:
          unit.append(follow)
        else:
          unit.append(int(rng.integers(tok.NUM_SPECIAL, vocab)))
      rows[r, pos:pos + length + 2] = [tok.CLS_ID, *unit, tok.SEP_ID]
      pos += length + 2
  return rows


def test_baseline_tables_hand_made_ties_and_specials():
  rows = np.array([[2, 7, 9, 3, 0, 0],
                   [2, 7, 8, 3, 0, 0],
                   [2, 9, 7, 4, 1, 3]], np.int32)
  unigram, successor = evaluate.baseline_tables(rows, 12)
  assert unigram == 7  # 7 three times, 9 twice, 8 once
  assert successor[7] == 8  # 7 -> 9 and 7 -> 8 once each: the tie goes to the lower id
  assert successor[2] == 7  # [CLS] may precede: 7 twice against 9 once
  assert successor[9] == 7  # 9 -> [SEP] is not counted
  for never in (3, 0, 4, 1, 8, 10, 11):  # only specials (or nothing) follow these
    assert successor[never] == -1, never
  assert successor.dtype == np.int32 and successor.shape == (12,)


@pytest.mark.parametrize('seed,vocab,ids', [(0, 40, 40), (1, 300, 300), (2, 300, 12)])
def test_baseline_tables_match_a_python_count(seed, vocab, ids):
  rng = np.random.default_rng(seed)
  rows = rng.integers(0, ids, size=(60, 24)).astype(np.int32)  # specials and PAD mixed in
  unigram, successor = evaluate.baseline_tables(rows, vocab)
  ref_unigram, ref_successor = _reference_tables(rows, vocab)
  assert unigram == ref_unigram
  assert successor.tolist() == ref_successor


def test_baseline_tables_with_a_tokenizer_special_mask():
  rng = np.random.default_rng(3)
  rows = rng.integers(0, 20, size=(80, 16)).astype(np.int32)
  special = frozenset({0, 1, 2, 3, 4, 7, 11})  # e.g. a WordPiece vocabulary's extra specials
  mask = np.isin(np.arange(20), sorted(special))
  unigram, successor = evaluate.baseline_tables(rows, 20, mask)
  ref_unigram, ref_successor = _reference_tables(rows, 20, special)
  assert unigram == ref_unigram and unigram not in special
  assert successor.tolist() == ref_successor
  assert not set(successor.tolist()) & special


def test_baseline_tables_learn_the_markov_rule():
  unigram, successor = evaluate.baseline_tables(_markov_rows(0, 400), VOCAB)
  assert unigram >= tok.NUM_SPECIAL
  for a in range(tok.NUM_SPECIAL, VOCAB):
    follow = (7 * a + 3) % VOCAB
    if follow >= tok.NUM_SPECIAL:
      assert successor[a] == follow, a


# ---------------------------------------------------------------------------------------------
# make_eval_step + evaluate on a tiny randomly initialized model


def _eval_spec() -> masking.MaskingSpec:
  """Returns the evaluation MaskingSpec as train.run builds it for the default special ids."""
  return masking.MaskingSpec(
      vocab_size=VOCAB, rate=0.15, split=(0.8, 0.1, 0.1),
      max_predictions=masking.default_max_predictions(0.15, SEQ, 'exact'), selection='exact')


@pytest.fixture(scope='module')
def setup():
  """Returns (eval_step, params, val batches, unigram, successor) for a fresh tiny model."""
  enc_cfg = model.encoder_config('tiny', vocab_size=VOCAB, max_position=SEQ, dropout_rate=0.0,
                                 attention_dropout_rate=0.0)
  graphdef, state = nnx.split(model.BertForMLM(enc_cfg, rngs=nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(state)
  unigram, successor = evaluate.baseline_tables(_markov_rows(0, 400), VOCAB)
  rows = _markov_rows(1, BATCH * NUM_BATCHES)
  batches = [rows[i * BATCH:(i + 1) * BATCH] for i in range(NUM_BATCHES)]
  step = evaluate.make_eval_step(graphdef, _eval_spec())
  return step, params, batches, unigram, successor


@pytest.fixture(scope='module')
def metrics(setup) -> dict:
  step, params, batches, unigram, successor = setup
  return evaluate.evaluate(step, params, batches, seed=1234, unigram=unigram, successor=successor)


@pytest.mark.slow
def test_metrics_are_finite_and_sensible(metrics):
  for key in ('loss', 'accuracy', 'perplexity', 'accuracy_at_mask', 'accuracy_at_random',
              'accuracy_at_keep', 'baseline/unigram_accuracy_at_mask',
              'baseline/bigram_accuracy_at_mask', 'predictions'):
    assert math.isfinite(metrics[key]), key
  assert abs(metrics['loss'] - math.log(VOCAB)) < 1.0  # a fresh model is near-uniform
  assert metrics['perplexity'] == pytest.approx(math.exp(metrics['loss']), rel=1e-6)
  for key in ('accuracy', 'accuracy_at_mask', 'baseline/bigram_accuracy_at_mask'):
    assert 0.0 <= metrics[key] <= 1.0, key


def test_same_seed_same_numbers_other_seed_other_masks(setup, metrics):
  step, params, batches, unigram, successor = setup
  again = evaluate.evaluate(step, params, batches, seed=1234, unigram=unigram, successor=successor)
  assert again == metrics
  other = evaluate.evaluate(step, params, batches, seed=99, unigram=unigram, successor=successor)
  assert other['loss'] != metrics['loss']


def _masks(batches, seed: int) -> list[masking.MaskedBatch]:
  """Returns the MaskedBatch of each batch under evaluate's keys: fold_in(key(seed), index)."""
  base = jax.random.key(seed)
  return [jax.tree.map(np.asarray, masking.mask_tokens(jax.random.fold_in(base, i),
                                                       jnp.asarray(rows), _eval_spec()))
          for i, rows in enumerate(batches)]


def test_mask_share_of_predictions_is_about_the_split(setup, metrics):
  _, _, batches, _, _ = setup
  n = metrics['predictions']
  masks = _masks(batches, 1234)
  assert n == sum(float(m.weights.sum()) for m in masks)
  n_mask = sum(float((m.weights * (m.kinds == masking.KIND_MASK)).sum()) for m in masks)
  assert n > 1000
  assert abs(n_mask / n - 0.8) < 5 * math.sqrt(0.8 * 0.2 / n)
  # The [MASK] slots are exactly where the inputs now hold the [MASK] id.
  for m in masks:
    at = np.take_along_axis(m.inputs, m.positions, axis=1)
    real_mask = (m.weights > 0) & (m.kinds == masking.KIND_MASK)
    assert (at[real_mask] == tok.MASK_ID).all()


def test_baseline_accuracies_match_numpy_on_the_same_masks(setup, metrics):
  _, _, batches, unigram, successor = setup
  hits_uni = hits_bi = count = 0.0
  for m in _masks(batches, 1234):
    real = (m.weights > 0) & (m.kinds == masking.KIND_MASK)
    # The bigram guess reads the (possibly corrupted) input just before each prediction slot.
    prev = np.take_along_axis(m.inputs, np.maximum(m.positions - 1, 0), axis=1)
    guess = successor[prev]
    guess = np.where(guess < 0, unigram, guess)
    hits_uni += float((real & (m.labels == unigram)).sum())
    hits_bi += float((real & (m.labels == guess)).sum())
    count += float(real.sum())
  assert metrics['baseline/unigram_accuracy_at_mask'] == pytest.approx(hits_uni / count, rel=1e-6)
  assert metrics['baseline/bigram_accuracy_at_mask'] == pytest.approx(hits_bi / count, rel=1e-6)
  # On Markov text the bigram baseline knows the rule and beats the unigram one by far.
  assert hits_bi > 3 * max(hits_uni, 1.0)


def test_row_groups_follow_the_eval_batches():
  labels = [0, 2, 0, 2, 0, 2, 0, 0]
  groups = evaluate.row_groups(labels, batch_size=3)
  assert [g.tolist() for g in groups] == [[0, 2, 0], [2, 0, 2], [0, 0, -1]]  # -1: padding rows
  assert len(evaluate.row_groups(labels, batch_size=3, num_batches=2)) == 2
  assert all(g.dtype == np.int32 for g in groups)


def test_each_groups_sums_add_up_to_the_pooled_ones_at_the_same_masks(setup, metrics):
  _, params, batches, unigram, successor = setup
  enc_cfg = model.encoder_config('tiny', vocab_size=VOCAB, max_position=SEQ, dropout_rate=0.0,
                                 attention_dropout_rate=0.0)
  graphdef = nnx.split(nnx.eval_shape(lambda: model.BertForMLM(enc_cfg, rngs=nnx.Rngs(0))),
                       nnx.Param)[0]
  step = evaluate.make_eval_step(graphdef, _eval_spec(), num_groups=3)
  counts = [130, 0, 190]  # group 1 has no rows; group 0 ends inside a batch
  groups = evaluate.row_groups(np.repeat([0, 1, 2], counts), batch_size=BATCH)
  kw = dict(seed=1234, unigram=unigram, successor=successor)
  out = evaluate.evaluate(step, params, batches, groups=groups,
                          group_prefixes=['x/a', 'x/b', 'x/c'], **kw)
  pooled = {k: v for k, v in out.items() if not k.startswith('x/')}
  assert pooled.keys() == metrics.keys()
  assert pooled == metrics  # the pooled numbers are those of the step without groups
  assert 'x/b/loss' not in out and {'x/a/loss', 'x/c/loss', 'x/c/perplexity',
                                    'x/c/baseline_bigram_accuracy_at_mask'} <= out.keys()
  sums = evaluate.sum_batches(step, params, batches, groups=groups, **kw)
  for k in [k for k in sums if '/' not in k]:
    parts = sum(float(sums[f'g{g}/{k}']) for g in range(3))
    assert parts == pytest.approx(float(sums[k]), rel=1e-5, abs=1e-6), k
  # Each group's predictions are the masks' weights on its own rows (rows of group 0 come first).
  weights = np.concatenate([m.weights.sum(axis=1) for m in _masks(batches, 1234)])
  assert out['x/a/predictions'] == weights[:130].sum()
  assert out['x/c/predictions'] == weights[130:].sum()
  loss = (out['x/a/loss'] * out['x/a/predictions'] + out['x/c/loss'] * out['x/c/predictions'])
  assert loss / out['predictions'] == pytest.approx(out['loss'], rel=1e-5)


def test_empty_validation_split_is_a_clear_error(setup):
  step, params, _, unigram, successor = setup
  with pytest.raises(ValueError, match='data.val_fraction'):
    evaluate.evaluate(step, params, [], seed=0, unigram=unigram, successor=successor)


# ---------------------------------------------------------------------------------------------
# Whole-word scores


def _texts(topics_corpus, n=120):
  return [p for p in topics_corpus.read_text().split('\n\n') if len(p.split()) > 20][:n]


def test_whole_word_rows_mask_the_same_words_whatever_the_tokenizer(topics_corpus, topics_tokenizer,
                                                                   tmp_path):
  texts = _texts(topics_corpus)
  other = tok.train_tokenizer(texts, tmp_path / 'small.model', vocab_size=400)
  a = evaluate.whole_word_rows(topics_tokenizer, texts, 128, rate=0.2, seed=3, words_per_row=8)
  b = evaluate.whole_word_rows(other, texts, 128, rate=0.2, seed=3, words_per_row=8)
  assert a['dropped'] == b['dropped'] == set()
  np.testing.assert_array_equal(a['chars'], b['chars'])  # the same words, in the same order
  # Windows one tokenizer cannot fit are skipped by both when passed on.
  wide = evaluate.whole_word_rows(other, texts, 48, rate=0.2, seed=3, words_per_row=8)
  assert wide['dropped']
  narrow = evaluate.whole_word_rows(topics_tokenizer, texts, 48, rate=0.2, seed=3,
                                    words_per_row=8, skip=frozenset(wide['dropped']))
  np.testing.assert_array_equal(narrow['chars'], wide['chars'])
  assert (b['word'] >= 0).sum() > (a['word'] >= 0).sum()  # cut into more pieces by the small one
  for d, cut in ((a, topics_tokenizer), (b, other)):
    masked = d['word'] >= 0
    assert (d["inputs"][masked] == cut.mask_id).all()
    np.testing.assert_array_equal(d['inputs'][~masked], d['tokens'][~masked])
  words = sum(len(t.split()) for t in texts)
  n = len(a['chars'])
  assert abs(n / words - 0.2) < 4 * np.sqrt(0.2 * 0.8 / words)


def test_whole_word_scores_sum_the_pieces_of_each_word(topics_corpus, topics_tokenizer):
  texts = _texts(topics_corpus, 6)
  cfg = model.EncoderConfig(vocab_size=topics_tokenizer.vocab_size, hidden_size=32,
                                num_layers=1, num_heads=2, intermediate_size=64, max_position=128)
  m = model.BertForMLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(m, nnx.Param)
  got = evaluate.whole_word_scores(graphdef, params, topics_tokenizer, texts, seq_len=128,
                                   rate=0.3, seed=1, batch_size=4)
  d = evaluate.whole_word_rows(topics_tokenizer, texts, 128, rate=0.3, seed=1)
  pos, doc = model.packed_layout(d['tokens'], cls_id=topics_tokenizer.cls_id,
                                     pad_id=topics_tokenizer.pad_id)
  logp = np.asarray(jax.nn.log_softmax(m.dense_logits(jnp.asarray(d['inputs']), position_ids=pos,
                                                      doc_ids=doc), axis=-1))
  nll = -np.take_along_axis(logp, d['tokens'][..., None], axis=-1)[..., 0]
  total = sum(nll[d['word'] == k].sum() for k in range(len(d['chars'])))
  assert got['words'] == len(d['chars']) and got['chars'] == d['chars'].sum()
  np.testing.assert_allclose(got['nats_per_char'], total / d['chars'].sum(), rtol=1e-5)
  assert 0 <= got['word_accuracy'] <= 1 and got['pieces_per_word'] >= 1


def test_position_buckets_follow_the_row_length():
  assert evaluate.position_buckets(128) == []
  assert evaluate.position_buckets(1024) == [(0, 128), (128, 512), (512, 1024)]
  assert evaluate.position_buckets(8192) == [(0, 128), (128, 512), (512, 2048), (2048, 8192)]
  assert evaluate.position_buckets(9000)[-1] == (8192, 9000)


def test_loss_by_position_recombines_to_the_loss(metrics):
  assert not [k for k in metrics if k.startswith('loss_by_position/')]  # 32-token rows: one bucket
  length = 300
  enc_cfg = model.EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                                intermediate_size=32, position_embedding='rope', type_vocab_size=0,
                                attention_dropout_rate=0.0)
  graphdef, state = nnx.split(model.BertForMLM(enc_cfg, rngs=nnx.Rngs(0)), nnx.Param)
  rows = _markov_rows(2, 8, seq=length)
  # Half the rows open with a unit of at least 250 tokens, which reaches the second bucket.
  rows[::2, :250] = np.where(rows[::2, :250] == tok.CLS_ID, 5, rows[::2, :250])
  rows[::2, 0], rows[::2, 1:250] = tok.CLS_ID, np.maximum(rows[::2, 1:250], tok.NUM_SPECIAL)
  spec = masking.MaskingSpec(vocab_size=VOCAB, rate=0.15, split=(0.8, 0.1, 0.1),
                             max_predictions=masking.default_max_predictions(0.15, length, 'exact'),
                             selection='exact')
  step = evaluate.make_eval_step(graphdef, spec)
  unigram, successor = evaluate.baseline_tables(rows, VOCAB)
  out = evaluate.evaluate(step, nnx.to_pure_dict(state), [rows[:4], rows[4:]], seed=5,
                          unigram=unigram, successor=successor)
  sums = evaluate.sum_batches(step, nnx.to_pure_dict(state), [rows[:4], rows[4:]], seed=5,
                              unigram=unigram, successor=successor)
  weights = {b: float(sums[f'position_weight_{b}']) for b in ('0-128', '128-300')}
  assert all(w > 0 for w in weights.values())
  assert sum(weights.values()) == float(sums['weight'])
  mixed = sum(out[f'loss_by_position/{b}'] * w for b, w in weights.items()) / sum(weights.values())
  assert mixed == pytest.approx(out['loss'], rel=1e-5)
