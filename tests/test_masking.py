"""Tests for mlmjax.masking: selection counts and rates, corruption split, buffer layout, errors."""

import hashlib
import importlib.util
import math
import pathlib

import jax
import numpy as np
import pytest
from scipy import stats

from mlmjax import masking
from mlmjax.masking import KIND_KEEP, KIND_MASK, KIND_RANDOM, MaskingSpec

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
FIRST_REGULAR = 5
SEQ_LEN = 128
VOCAB = 8000

_jit_mask = jax.jit(masking.mask_tokens, static_argnums=2)


def _packed_rows(seed: int, batch: int, seq_len: int, vocab: int) -> np.ndarray:
  """Returns (batch, seq_len) int32 rows of [CLS] ... [SEP] units, PAD tails; rows 0-1 all PAD."""
  rng = np.random.default_rng(seed)
  rows = np.full((batch, seq_len), PAD, np.int32)
  for b in range(2, batch):  # rows 0 and 1 stay all PAD
    fill = seq_len if rng.random() < 0.25 else int(rng.integers(seq_len // 4, seq_len))
    pos = 0
    while fill - pos >= 3:
      n = int(rng.integers(1, min(fill - pos - 2, 60) + 1))
      text = rng.integers(FIRST_REGULAR, vocab, n)
      # Unknown pieces and a stray literal [MASK] occur in real text; neither may be selected.
      odd = rng.random(n)
      text[odd < 0.03] = UNK
      text[(odd >= 0.03) & (odd < 0.04)] = MASK
      rows[b, pos:pos + n + 2] = np.concatenate([[CLS], text, [SEP]])
      pos += n + 2
  return rows


@pytest.fixture(scope='module')
def tokens() -> np.ndarray:
  """Returns a 2048 x 128 packed batch with well over 10^5 candidate positions."""
  rows = _packed_rows(0, 2048, SEQ_LEN, VOCAB)
  assert (rows >= FIRST_REGULAR).sum() >= 100_000
  assert {PAD, UNK, CLS, SEP, MASK} <= set(np.unique(rows).tolist())
  return rows


def _np(batch: masking.MaskedBatch) -> masking.MaskedBatch:
  """Returns the batch with every field as a numpy array."""
  return masking.MaskedBatch(*(np.asarray(x) for x in batch))


def _run(tokens, rate, key=0, **spec_kw) -> masking.MaskedBatch:
  """Returns the numpy MaskedBatch for a spec built from spec_kw (vocab_size defaults to VOCAB)."""
  spec = MaskingSpec(**{'vocab_size': VOCAB, 'max_predictions': SEQ_LEN, **spec_kw})
  # `rate` goes in as a jit argument, so specs that differ only in rate share one compilation.
  return _np(_jit_mask(jax.random.key(key), tokens, spec, rate))


def _tol(p: float, n: int) -> float:
  """Returns 5 standard errors of a binomial proportion p estimated from n draws."""
  return 5.0 * math.sqrt(p * (1.0 - p) / n)


def _expected_exact_counts(tokens: np.ndarray, rate: float, max_predictions: int) -> np.ndarray:
  """Returns BERT's per-row count min(max(1, round(rate * n)), P), 0 for rows without candidates."""
  n = (tokens >= FIRST_REGULAR).sum(axis=1)
  # Same float32 product and half-to-even rounding as the device computation.
  k = np.round(np.float32(rate) * n.astype(np.float32)).astype(np.int64)
  return np.where(n > 0, np.minimum(np.maximum(k, 1), max_predictions), 0)


@pytest.mark.parametrize('rate,max_predictions,capped', [
    (0.15, SEQ_LEN, False),
    (0.4, SEQ_LEN, False),
    (0.8, SEQ_LEN, False),
    (0.15, 20, False),  # BERT's buffer: always large enough at 15%
    (0.4, 20, True),  # buffer smaller than the count: truncated to 20
])
def test_exact_count_per_row_matches_formula(tokens, rate, max_predictions, capped):
  out = _run(tokens, rate=rate, max_predictions=max_predictions)
  expected = _expected_exact_counts(tokens, rate, max_predictions)
  np.testing.assert_array_equal(out.selected.sum(axis=1), expected)
  np.testing.assert_array_equal(out.weights.sum(axis=1), expected)
  uncapped = _expected_exact_counts(tokens, rate, SEQ_LEN)
  assert (uncapped > max_predictions).any() == capped


@pytest.mark.parametrize('rate', [0.15, 0.4, 0.8])
def test_bernoulli_overall_rate(tokens, rate):
  max_predictions = SEQ_LEN  # no truncation, so the rate is unbiased
  out = _run(tokens, rate=rate, selection='bernoulli')
  n_cand = int((tokens >= FIRST_REGULAR).sum())
  observed = out.selected.sum() / n_cand
  assert abs(observed - rate) < _tol(rate, n_cand), (observed, rate)
  # Counts vary per row (unlike 'exact'), yet never exceed the buffer.
  counts = out.selected.sum(axis=1)
  assert counts.max() <= max_predictions
  assert np.any(counts != _expected_exact_counts(tokens, rate, max_predictions))


def test_bernoulli_truncation_is_random_not_positional(tokens):
  p = 5
  out = _run(tokens, rate=0.5, selection='bernoulli', max_predictions=p)
  cand = tokens >= FIRST_REGULAR
  n_cand = cand.sum(axis=1)
  counts = out.selected.sum(axis=1)
  assert counts.max() <= p
  full = n_cand >= 60  # P(Binomial(60, 0.5) < 5) ~ 1e-12: these rows always overflow the buffer
  assert full.sum() > 200
  np.testing.assert_array_equal(counts[full], p)
  # Where the kept ones fall among a row's candidates, as a fraction: uniform on [0, 1) when the
  # truncation is random, near 0 if the first positions were kept.
  cand_index = np.cumsum(cand, axis=1) - 1
  frac = (cand_index / np.maximum(n_cand, 1)[:, None])[out.selected & full[:, None]]
  sd_uniform = math.sqrt(1.0 / 12.0)
  assert abs(frac.mean() - 0.5) < 5.0 * sd_uniform / math.sqrt(frac.size), frac.mean()


@pytest.mark.parametrize('selection', ['exact', 'bernoulli'])
def test_never_selects_special_tokens_and_all_pad_rows_are_empty(tokens, selection):
  out = _run(tokens, rate=0.8, selection=selection)
  assert (tokens[out.selected] >= FIRST_REGULAR).all()
  for special in (PAD, UNK, CLS, SEP, MASK):
    assert not out.selected[tokens == special].any()
  for row in (0, 1):  # the all-PAD rows
    assert not out.selected[row].any()
    assert (out.weights[row] == 0).all()
    np.testing.assert_array_equal(out.inputs[row], tokens[row])


@pytest.mark.parametrize('split', [(0.8, 0.1, 0.1), (0.5, 0.2, 0.3)])
def test_corruption_split_frequencies(tokens, split):
  out = _run(tokens, rate=0.4, split=split)
  kinds = out.kinds[out.weights > 0]
  n = kinds.size
  assert n > 40_000
  for kind, p in zip((KIND_MASK, KIND_RANDOM, KIND_KEEP), split):
    observed = (kinds == kind).mean()
    assert abs(observed - p) < _tol(p, n), (kind, observed, p)


@pytest.mark.parametrize('split', [
    (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_edge_splits_are_exact(tokens, split):
  out = _run(tokens, rate=0.4, split=split)
  kinds = out.kinds[out.weights > 0]
  for kind, p in zip((KIND_MASK, KIND_RANDOM, KIND_KEEP), split):
    if p == 0:
      assert not (kinds == kind).any(), (kind, split)
    else:
      assert (kinds == kind).any(), (kind, split)
  if split[0] == 0:
    # No [MASK] is introduced: the only MASK ids are the literal ones already in the text.
    np.testing.assert_array_equal(out.inputs == MASK, tokens == MASK)
  if split[2] == 1:
    np.testing.assert_array_equal(out.inputs, tokens)
  if split[0] == 1:
    assert (out.inputs[out.selected] == MASK).all()


def test_random_replacements_in_range_and_uniform(tokens):
  vocab = 50  # 45 regular ids, so each bucket gets thousands of draws
  regular = tokens >= FIRST_REGULAR
  small = np.where(regular, tokens % (vocab - FIRST_REGULAR) + FIRST_REGULAR, tokens)
  out = _run(small, rate=0.8, split=(0.0, 1.0, 0.0), vocab_size=vocab)
  drawn = out.inputs[out.selected]
  assert drawn.size > 50_000
  assert drawn.min() >= FIRST_REGULAR and drawn.max() < vocab
  counts = np.bincount(drawn - FIRST_REGULAR, minlength=vocab - FIRST_REGULAR)
  assert (counts > 0).all()
  assert stats.chisquare(counts).pvalue > 1e-6
  big = _run(tokens, rate=0.8, split=(0.0, 1.0, 0.0))
  drawn = big.inputs[big.selected]
  assert drawn.min() >= FIRST_REGULAR and drawn.max() < VOCAB


@pytest.mark.parametrize('selection,rate,p', [('exact', 0.15, 20), ('bernoulli', 0.5, 5)])
def test_buffer_layout_and_consistency(tokens, selection, rate, p):
  out = _run(tokens, rate=rate, selection=selection, max_predictions=p)
  batch = tokens.shape[0]
  assert out.inputs.shape == tokens.shape and out.inputs.dtype == np.int32
  assert out.selected.shape == tokens.shape and out.selected.dtype == np.bool_
  for field in (out.positions, out.labels, out.kinds):
    assert field.shape == (batch, p) and field.dtype == np.int32
  assert out.weights.shape == (batch, p) and out.weights.dtype == np.float32

  n = out.weights.sum(axis=1).astype(int)
  real = np.arange(p)[None, :] < n[:, None]
  np.testing.assert_array_equal(out.weights, real.astype(np.float32))  # real slots come first
  # Padding slots: position 0, label 0, KIND_KEEP.
  assert (out.positions[~real] == 0).all() and (out.labels[~real] == 0).all()
  assert (out.kinds[~real] == KIND_KEEP).all()
  # Strictly ascending positions among real slots.
  steps = np.diff(out.positions, axis=1)
  assert (steps[real[:, 1:]] > 0).all()
  # Labels are the original tokens; `selected` is exactly the set of reported positions.
  rows = np.arange(batch)[:, None]
  np.testing.assert_array_equal(out.labels[real], tokens[rows, out.positions][real])
  from_slots = np.zeros_like(out.selected)
  from_slots[np.broadcast_to(rows, real.shape)[real], out.positions[real]] = True
  np.testing.assert_array_equal(from_slots, out.selected)
  # Inputs: untouched outside the selection and at KIND_KEEP, [MASK] at KIND_MASK.
  np.testing.assert_array_equal(out.inputs[~out.selected], tokens[~out.selected])
  slot_inputs = out.inputs[rows, out.positions]
  keep = real & (out.kinds == KIND_KEEP)
  mask = real & (out.kinds == KIND_MASK)
  rand = real & (out.kinds == KIND_RANDOM)
  assert keep.any() and mask.any() and rand.any()
  np.testing.assert_array_equal(slot_inputs[keep], out.labels[keep])
  assert (slot_inputs[mask] == MASK).all()
  assert ((slot_inputs[rand] >= FIRST_REGULAR) & (slot_inputs[rand] < VOCAB)).all()


def test_buffer_larger_than_sequence(tokens):
  short = tokens[:, :16]
  out = _run(short, rate=0.8, max_predictions=40)
  assert out.positions.shape == (short.shape[0], 40)
  np.testing.assert_array_equal(out.weights.sum(axis=1), _expected_exact_counts(short, 0.8, 40))
  assert (out.weights[:, 16:] == 0).all()


def test_determinism_and_fresh_masks_per_step(tokens):
  spec = MaskingSpec(vocab_size=VOCAB)
  key = jax.random.key(7)
  first = _np(_jit_mask(key, tokens, spec, 0.15))
  again = _np(_jit_mask(key, tokens, spec, 0.15))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  step1 = _np(_jit_mask(jax.random.fold_in(key, 1), tokens, spec, 0.15))
  step2 = _np(_jit_mask(jax.random.fold_in(key, 2), tokens, spec, 0.15))
  assert (step1.selected != step2.selected).any()
  assert (step1.selected != first.selected).any()
  # Same count per row (exact), different positions.
  np.testing.assert_array_equal(step1.weights.sum(axis=1), step2.weights.sum(axis=1))


def test_typed_and_legacy_keys_agree(tokens):
  spec = MaskingSpec(vocab_size=VOCAB, selection='bernoulli', max_predictions=SEQ_LEN)
  typed = _np(_jit_mask(jax.random.key(3), tokens, spec, 0.15))
  legacy = _np(_jit_mask(jax.random.PRNGKey(3), tokens, spec, 0.15))  # raw uint32 key
  for a, b in zip(typed, legacy):
    np.testing.assert_array_equal(a, b)


def _frozen_tables(rows: np.ndarray) -> dict:
  """Returns MaskingTables per strategy for synthetic rows: random word starts; pmi: n-grams
  copied from the rows and every token a word, so that no fallback unit spans several tokens."""
  rng = np.random.default_rng(5)
  word_start = rng.random(VOCAB) < 0.6
  word_start[:FIRST_REGULAR] = True
  h1, h2 = [], []
  for n in range(2, masking.PMI_MAX_N + 1):
    grams = np.stack([rows[2 + n::4, 10 + n + i] for i in range(n)], axis=1)
    grams = grams[(grams >= FIRST_REGULAR).all(axis=1)]
    a, b = masking.ngram_hashes([grams[:, i] for i in range(n)], xp=np)
    h1.append(a)
    h2.append(b)
  h1, h2 = np.concatenate(h1), np.concatenate(h2)
  order = np.argsort(h1, kind='stable')
  pmi = masking.MaskingTables(np.ones(VOCAB, bool), h1[order], h2[order])
  return {'token': None, 'whole_word': masking.MaskingTables(word_start=word_start), 'pmi': pmi}


def _digest(mb: masking.MaskedBatch) -> str:
  """Returns a short sha256 hex digest of every field of a MaskedBatch."""
  h = hashlib.sha256()
  for field in mb:
    h.update(np.ascontiguousarray(np.asarray(field)).tobytes())
  return h.hexdigest()[:16]


# Digests of the masks that the code at commit 876aac8 drew: token and whole_word masks (and pmi
# ones where no word falls back) must stay bit for bit what they were, so resumed runs and tests
# keep their masks whatever other streams (span lengths) are derived.
_FROZEN_MASKS = {
    ('token', 'exact', 0.15): '6c789e2872ebe14b',
    ('token', 'bernoulli', 0.4): 'f1671713a0c5a83f',
    ('whole_word', 'exact', 0.4): '6efe06794da7e3a2',
    ('whole_word', 'bernoulli', 0.3): '21de5433445a687f',
    ('pmi', 'exact', 0.4): 'e1f246efe223b0b6',
}


def test_token_whole_word_and_pmi_masks_are_frozen():
  rows = _packed_rows(1, 256, SEQ_LEN, VOCAB)
  tables = _frozen_tables(rows)
  assert len(tables['pmi'].pmi_hash1) > 150
  got = {}
  for (strategy, selection, rate), digest in _FROZEN_MASKS.items():
    spec = MaskingSpec(vocab_size=VOCAB, strategy=strategy, selection=selection,
                       max_predictions=SEQ_LEN)
    mb = _np(_jit_mask(jax.random.key(123), rows, spec, rate, tables[strategy]))
    assert mb.selected.sum() > 2000
    if strategy == 'pmi':
      assert (np.diff(mb.units, axis=1) == 0).sum() > 100  # n-grams were units
    got[strategy, selection, rate] = _digest(mb)
  assert got == _FROZEN_MASKS


@pytest.mark.parametrize('selection', ['exact', 'bernoulli'])
def test_traced_rate_matches_python_float(tokens, selection):
  spec = MaskingSpec(vocab_size=VOCAB, rate=0.4, selection=selection, max_predictions=SEQ_LEN)
  key = jax.random.key(11)
  traces = []

  @jax.jit
  def step(rate, toks):
    traces.append(rate)
    return masking.mask_tokens(key, toks, spec, rate)

  traced = _np(step(np.float32(0.4), tokens))
  # rate=None: spec.rate (0.4) enters the computation as a Python constant.
  from_spec = _np(_jit_mask(key, tokens, spec, None))
  for a, b in zip(traced, from_spec):
    np.testing.assert_array_equal(a, b)
  lower = _np(step(np.float32(0.15), tokens))
  assert lower.selected.sum() < traced.selected.sum()
  assert len(traces) == 1  # one compilation serves every rate


def test_spec_is_hashable_and_normalizes_split():
  a = MaskingSpec(vocab_size=100, split=[0.8, 0.1, 0.1])
  b = MaskingSpec(vocab_size=100)
  assert a == b and hash(a) == hash(b)
  assert isinstance(a.split, tuple)


@pytest.mark.parametrize('kwargs,key', [
    (dict(rate=0.0), 'masking.rate'),
    (dict(rate=1.0), 'masking.rate'),
    (dict(rate=-0.1), 'masking.rate'),
    (dict(rate=1.5), 'masking.rate'),
    (dict(split=(0.8, 0.1, 0.2)), 'masking.split'),
    (dict(split=(0.9, 0.2, -0.1)), 'masking.split'),
    (dict(split=(0.5, 0.5)), 'masking.split'),
    (dict(selection='random'), 'masking.selection'),
    (dict(max_predictions=0), 'masking.max_predictions'),
    (dict(vocab_size=5), 'vocab_size'),
])
def test_validation_errors_name_the_key(kwargs, key):
  with pytest.raises(ValueError, match=key) as err:
    MaskingSpec(**{'vocab_size': 100, **kwargs})
  assert len(str(err.value).splitlines()) <= 2
  if key == 'masking.selection':
    assert "'exact'" in str(err.value) and "'bernoulli'" in str(err.value)


def test_python_rate_override_is_validated(tokens):
  with pytest.raises(ValueError, match='rate'):
    masking.mask_tokens(jax.random.key(0), tokens[:4], MaskingSpec(vocab_size=VOCAB), 1.2)


def test_default_max_predictions():
  assert masking.default_max_predictions(0.15, 128, 'exact') == 20  # BERT's published setting
  for seq_len in (16, 64, 128, 512):
    for rate in (0.05, 0.1, 0.15, 0.3, 0.5, 0.8, 0.95):
      exact = masking.default_max_predictions(rate, seq_len, 'exact')
      assert max(1, round(rate * seq_len)) <= exact <= seq_len
      bern = masking.default_max_predictions(rate, seq_len, 'bernoulli')
      assert bern <= seq_len
      if bern < seq_len:
        # P(count > buffer); mean + 4 sd is ~3e-5 for a normal, a little more for a skewed binomial.
        assert stats.binom.sf(bern, seq_len, rate) < 1e-3
  with pytest.raises(ValueError, match='masking.selection'):
    masking.default_max_predictions(0.15, 128, 'poisson')


def _pretrain_config(variant: str):
  """Returns configs/pretrain.py's get_config(variant), loaded from its file."""
  path = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'pretrain.py'
  module_spec = importlib.util.spec_from_file_location('pretrain_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant)


def test_spec_from_config():
  cfg = _pretrain_config('tiny')
  kw = dict(vocab_size=cfg.tokenizer.vocab_size, seq_len=cfg.train.seq_len)
  spec = masking.spec_from_config(cfg.masking, **kw)
  assert spec.max_predictions == masking.default_max_predictions(
      cfg.masking.rate, cfg.train.seq_len, cfg.masking.selection)
  assert (spec.rate, spec.split, spec.selection) == (
      cfg.masking.rate, tuple(cfg.masking.split), cfg.masking.selection)
  assert spec.vocab_size == cfg.tokenizer.vocab_size
  cfg.masking.max_predictions = 7
  assert masking.spec_from_config(cfg.masking, **kw).max_predictions == 7
  cfg.masking.max_predictions = 0
  cfg.masking.selection = 'bernoulli'
  cfg.masking.rate = 0.4
  bern = masking.spec_from_config(cfg.masking, **kw)
  assert bern.max_predictions == masking.default_max_predictions(
      0.4, cfg.train.seq_len, 'bernoulli')
  cfg.masking.selection = 'spans'
  with pytest.raises(ValueError, match='masking.selection'):
    masking.spec_from_config(cfg.masking, **kw)
  cfg.masking.selection = 'exact'
  cfg.masking.max_predictions = -1
  with pytest.raises(ValueError, match='masking.max_predictions'):
    masking.spec_from_config(cfg.masking, **kw)


# ---------------------------------------------------------------------------------------------
# Unit strategies (whole_word, span, pmi) on real text, and rate schedules.

UNIT_LEN = 128


@pytest.fixture(scope='module')
def real():
  """Returns (tokenizer, packed rows, long rows without inner specials, PMI vocab) of pydoc topics."""
  from pydoc_data.topics import topics

  from mlmjax import input_pipeline, pmi
  from mlmjax import tokenizer as tok_lib
  import tempfile
  docs = [topics[k] for k in sorted(topics)]
  with tempfile.TemporaryDirectory() as d:
    tok = tok_lib.train_tokenizer(docs, pathlib.Path(d) / 'u.model', vocab_size=2000)
  ids = [tok.encode(doc) for doc in docs]
  rows = input_pipeline.pack_documents(ids, UNIT_LEN)
  flat = np.concatenate([np.asarray(i, np.int32) for i in ids])
  flat = flat[flat >= FIRST_REGULAR]
  long_rows = flat[:len(flat) // 2048 * 2048].reshape(-1, 2048)
  vocab = pmi.build_pmi_vocab(rows, tok.special_mask, min_count=5, size=3000)
  assert (rows >= FIRST_REGULAR).sum() >= 100_000 and long_rows.size >= 100_000
  return tok, rows, long_rows, vocab


_jit_units = jax.jit(masking.mask_tokens, static_argnums=2)


def _unit_run(real, strategy, rate, key=0, rows=None, **kw):
  """Returns (numpy MaskedBatch, spec) for a unit strategy on the real rows, buffer = row length."""
  tok, packed, _, vocab = real
  rows = packed if rows is None else rows
  spec = MaskingSpec(vocab_size=tok.vocab_size, strategy=strategy,
                     **{'max_predictions': rows.shape[1], **kw})
  tables = masking.tables_for(spec, tok, vocab)
  return _np(_jit_units(jax.random.key(key), rows, spec, rate, tables)), spec


def _unit_lengths(mb):
  """Returns (B, L) int32: at each unit start, its number of selected tokens (0 elsewhere)."""
  out = np.zeros(mb.units.shape, np.int32)
  for b in range(mb.units.shape[0]):
    np.add.at(out[b], mb.units[b][mb.selected[b]], 1)
  return out


def _words(tok, rows):
  """Returns (B, L) int word index per position: a word starts at a '▁' piece or after a special."""
  cand = rows >= FIRST_REGULAR
  prev_special = np.concatenate([np.ones_like(cand[:, :1]), ~cand[:, :-1]], axis=1)
  return np.cumsum(tok.word_starts(rows) | ~cand | prev_special, axis=1)


@pytest.mark.parametrize('strategy', ['whole_word', 'span', 'pmi'])
@pytest.mark.parametrize('rate', [0.15, 0.4, 0.8])
def test_unit_strategy_token_rate_and_whole_units(real, strategy, rate):
  rows = real[1]
  mb, _ = _unit_run(real, strategy, rate)
  cand = rows >= FIRST_REGULAR
  assert not (mb.selected & ~cand).any()  # never [PAD], [CLS], [SEP], [UNK] or [MASK]
  # A unit is selected as a whole: every candidate of a unit shares the unit's selection.
  first_sel = np.take_along_axis(mb.selected, mb.units, 1)
  assert (mb.selected == (first_sel & cand)).all()
  # Units are contiguous: unit starts never decrease and each start is its own unit's start.
  assert (np.diff(mb.units, axis=1) >= 0).all()
  assert (np.take_along_axis(mb.units, mb.units, 1) == mb.units).all()
  # Token budget per row as BERT's exact rule; the unit crossing it is kept with probability
  # (budget - before) / length, a Bernoulli of variance <= length^2 / 4 per row.
  n = cand.sum(1)
  budget = np.where(n > 0, np.maximum(np.round(np.float32(rate) * n.astype(np.float32)), 1), 0)
  lengths = np.zeros(mb.units.shape, np.int32)
  for b in range(len(rows)):
    np.add.at(lengths[b], mb.units[b][cand[b]], 1)
  sd = math.sqrt((lengths.max(1).astype(np.float64) ** 2 / 4).sum())
  assert abs(mb.selected.sum() - budget.sum()) <= 5 * sd + 1, (mb.selected.sum(), budget.sum(), sd)
  assert (mb.weights.sum(1) == mb.selected.sum(1)).all()


@pytest.mark.parametrize('rate', [0.15, 0.4, 0.8])
def test_whole_word_never_splits_a_word(real, rate):
  tok, rows = real[0], real[1]
  mb, _ = _unit_run(real, 'whole_word', rate, key=3)
  words = _words(tok, rows)
  cand = rows >= FIRST_REGULAR
  for b in range(0, len(rows), 7):
    for w in np.unique(words[b][mb.selected[b]]):
      assert mb.selected[b][(words[b] == w) & cand[b]].all()


@pytest.mark.parametrize('span_words', [True, False])
@pytest.mark.parametrize('rate', [0.15, 0.4, 0.8])
def test_span_lengths_match_truncated_geometric(real, rate, span_words):
  tok, long_rows = real[0], real[2]
  mb, spec = _unit_run(real, 'span', rate, key=5, rows=long_rows, span_words=span_words)
  starts = np.unique(mb.units[0][mb.selected[0]])
  # Spans are contiguous runs of whole words (or tokens).
  words = _words(tok, long_rows) if span_words else np.cumsum(np.ones_like(long_rows), axis=1)
  lengths = []
  for b in range(len(long_rows)):
    for s in np.unique(mb.units[b][mb.selected[b]]):
      member = np.flatnonzero(mb.units[b] == s)
      assert (np.diff(member) == 1).all() and mb.selected[b][member].all()
      if member[-1] == long_rows.shape[1] - 1:
        continue  # the last span of a row may be cut by the row's end
      assert words[b][member[0]] != words[b][member[0] - 1] if member[0] else True
      lengths.append(len(np.unique(words[b][member])))
  lengths = np.asarray(lengths)
  p, m = spec.span_p, spec.span_max
  mean = masking.truncated_geometric_mean(p, m)
  support = np.arange(1, m + 1)
  w = p * (1 - p) ** (support - 1)
  sd = math.sqrt((w * (support - mean) ** 2).sum() / w.sum())
  assert lengths.max() <= m and lengths.min() >= 1 and len(starts) > 0
  # Budget rounding keeps one span per row with a size-biased length: far below 4.5 se here.
  assert abs(lengths.mean() - mean) <= 4.5 * sd / math.sqrt(len(lengths)), (lengths.mean(), mean)


# The mean span length, in words, that docs/masking.md and the masking.span.p comment in
# mlmjax/schema.py give for selected spans in 128-token packed rows at rate 0.15 (exact).
REALISED_SPAN_WORDS = 3.5


def test_selected_span_lengths_in_packed_rows_match_the_documented_mean(real):
  tok, rows = real[0], real[1]
  assert rows.shape[1] == 128
  words = _words(tok, rows)
  lengths = []
  for key in range(8):
    mb, _ = _unit_run(real, 'span', 0.15, key=200 + key)
    sel, units = mb.selected, mb.units
    # The last selected position of each selected span; its words run from the span's start.
    same_next = np.zeros_like(sel)
    same_next[:, :-1] = sel[:, 1:] & (units[:, 1:] == units[:, :-1])
    b, i = np.nonzero(sel & ~same_next)
    lengths.append(words[b, i] - words[b, units[b, i]] + 1)
  lengths = np.concatenate(lengths)
  assert len(lengths) > 15_000
  # 4.5 standard errors of the mean of n spans (independent across rows and keys; the budget
  # couples the few spans of one row only weakly), plus 0.05 for the figure's one decimal.
  se = lengths.std() / math.sqrt(len(lengths))
  assert abs(lengths.mean() - REALISED_SPAN_WORDS) <= 4.5 * se + 0.05, (lengths.mean(), se)


def test_span_kind_is_independent_of_its_length(real):
  tok, long_rows = real[0], real[2]
  rows = long_rows.reshape(-1, UNIT_LEN)  # 128-token rows of running text
  last_word = _words(tok, rows)
  n_words, kinds = [], []
  for key in range(16):
    mb, _ = _unit_run(real, 'span', 0.3, key=100 + key, rows=rows)
    # The span at position 0 of each row reads the first length draw and the first kind draw.
    first = mb.selected[:, 0]
    end = (mb.units == 0).sum(1) - 1
    n_words.append((last_word[np.arange(len(rows)), end] - last_word[:, 0] + 1)[first])
    kinds.append(mb.kinds[first, 0])
  n_words, kinds = np.concatenate(n_words), np.concatenate(kinds)
  short = n_words <= 3  # P(L <= 3) = 0.55 for the truncated Geometric(0.2) on [1, 10]
  n1, n2 = short.sum(), (~short).sum()
  assert min(n1, n2) > 1000
  for kind, p in ((KIND_KEEP, 0.1), (KIND_MASK, 0.8)):
    diff = (kinds[short] == kind).mean() - (kinds[~short] == kind).mean()
    # Two independent proportions of the same p: the difference has sd sqrt(p q (1/n1 + 1/n2)).
    # Tolerance 4.5 sd < 0.06 means sd < 0.0134: a 10-point dependence would be observed above
    # 0.10 - 3 sd > 0.06 in 99.9% of draws, so it could not pass.
    tol = 4.5 * math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    assert tol < 0.06 and abs(diff) <= tol, (kind, diff, tol, n1, n2)


def _greedy_reference(row, cand, grams, words):
  """Returns unit starts of the longest-PMI-match segmentation, else rest of word (pure Python)."""
  starts, i = np.zeros(len(row), bool), 0
  while i < len(row):
    starts[i] = True
    step = 1
    while i + step < len(row) and words[i + step] == words[i]:
      step += 1
    for n in range(masking.PMI_MAX_N, 1, -1):
      if i + n <= len(row) and cand[i:i + n].all() and tuple(row[i:i + n]) in grams:
        step = n
        break
    i += step
  return starts


def _pmi_grams(vocab) -> set:
  """Returns the PMI vocabulary's n-grams as a set of token tuples."""
  return {tuple(g[:n]) for g, n in zip(vocab['ngrams'].tolist(), vocab['length'].tolist())}


@pytest.mark.parametrize('rate', [0.15, 0.4, 0.8])
def test_pmi_ngrams_are_masked_whole(real, rate):
  tok, rows, vocab = real[0], real[1], real[3]
  mb, _ = _unit_run(real, 'pmi', rate, key=7)
  grams = _pmi_grams(vocab)
  assert len(grams) == len(vocab['ngrams']) > 1000
  cand = rows >= FIRST_REGULAR
  words = _words(tok, rows)
  multi = 0
  for b in range(0, len(rows), 5):
    ref = _greedy_reference(rows[b], cand[b], grams, words[b]) | ~cand[b]
    ref |= np.concatenate([[True], ~cand[b][:-1]])
    assert (ref == (mb.units[b] == np.arange(rows.shape[1]))).all(), b
    for s in np.flatnonzero(ref):
      unit = mb.units[b] == s
      assert mb.selected[b][unit].all() or not mb.selected[b][unit].any()
      multi += unit.sum() > 1 and mb.selected[b][s]
  assert multi > 50  # n-grams really were selected as units


@pytest.mark.parametrize('rate', [0.15, 0.4])
def test_pmi_falls_back_to_whole_words(real, rate):
  tok, rows, vocab = real[0], real[1], real[3]
  mb, _ = _unit_run(real, 'pmi', rate, key=13)
  grams = _pmi_grams(vocab)
  words = _words(tok, rows)
  cand = rows >= FIRST_REGULAR
  multi_piece = 0
  for b in range(0, len(rows), 3):
    starts = np.unique(mb.units[b])
    ends = np.append(starts[1:], rows.shape[1])
    in_gram = np.zeros(rows.shape[1], bool)
    for s, e in zip(starts, ends):
      if e - s > 1 and tuple(rows[b, s:e].tolist()) in grams:
        in_gram[s:e] = True
    # The pieces of a word that no n-gram covers are selected all together or not at all.
    outside = cand[b] & ~in_gram
    for w in np.unique(words[b][outside]):
      sel = mb.selected[b][outside & (words[b] == w)]
      assert sel.all() or not sel.any(), (b, w, rows[b][words[b] == w])
      multi_piece += len(sel) > 1 and sel.all()
  assert multi_piece > 200  # selected words of several pieces outside the n-grams


@pytest.mark.parametrize('strategy', ['whole_word', 'span', 'pmi'])
def test_unit_corruption_split_per_unit(real, strategy):
  rows = real[1]
  mb, _ = _unit_run(real, strategy, 0.4, key=11)
  kinds_at = np.full(rows.shape, -1)
  np.put_along_axis(kinds_at, mb.positions, np.where(mb.weights > 0, mb.kinds, -1), 1)
  unit_kinds = []
  for b in range(len(rows)):
    for s in np.unique(mb.units[b][mb.selected[b]]):
      k = kinds_at[b][(mb.units[b] == s) & mb.selected[b]]
      assert (k == k[0]).all()  # one draw per unit
      unit_kinds.append(k[0])
  unit_kinds = np.asarray(unit_kinds)
  n = len(unit_kinds)
  for kind, p in zip((KIND_MASK, KIND_RANDOM, KIND_KEEP), (0.8, 0.1, 0.1)):
    assert abs((unit_kinds == kind).mean() - p) <= 4.5 * math.sqrt(p * (1 - p) / n)
  sel = mb.selected
  masked = np.zeros_like(sel)
  np.put_along_axis(masked, mb.positions, (mb.kinds == KIND_MASK) & (mb.weights > 0), 1)
  assert (mb.inputs[masked] == MASK).all()
  keep = np.zeros_like(sel)
  np.put_along_axis(keep, mb.positions, (mb.kinds == KIND_KEEP) & (mb.weights > 0), 1)
  assert (mb.inputs[keep] == rows[keep]).all()
  assert (mb.inputs[~sel] == rows[~sel]).all()


@pytest.mark.parametrize('strategy', ['whole_word', 'span', 'pmi'])
@pytest.mark.parametrize('split', [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0)])
def test_unit_edge_splits(real, strategy, split):
  rows = real[1]
  mb, _ = _unit_run(real, strategy, 0.3, key=2, split=split)
  sel = mb.selected
  assert sel.sum() > 1000
  if split[0] == 1.0:
    assert (mb.inputs[sel] == MASK).all()
  else:
    assert (mb.inputs == rows).all()
  assert (mb.inputs[~sel] == rows[~sel]).all()


@pytest.mark.slow
def test_unit_bernoulli_rate(real):
  rows = real[1]
  cand = rows >= FIRST_REGULAR
  for strategy in ('whole_word', 'span'):
    mb, _ = _unit_run(real, strategy, 0.3, key=4, selection='bernoulli')
    lengths = np.zeros(mb.units.shape, np.int32)
    for b in range(len(rows)):
      np.add.at(lengths[b], mb.units[b][cand[b]], 1)
    # Units enter independently with probability rate: variance sum(len^2) * rate * (1 - rate).
    sd = math.sqrt((lengths.astype(np.float64) ** 2).sum() * 0.3 * 0.7)
    assert abs(mb.selected.sum() - 0.3 * cand.sum()) <= 4.5 * sd


def test_unit_strategies_need_tables(real):
  tok, rows = real[0], real[1]
  for strategy in ('whole_word', 'pmi'):
    spec = MaskingSpec(vocab_size=tok.vocab_size, strategy=strategy, max_predictions=64)
    with pytest.raises(ValueError, match=strategy):
      masking.mask_tokens(jax.random.key(0), rows[:4], spec)
  with pytest.raises(ValueError, match='masking.strategy'):
    MaskingSpec(vocab_size=100, strategy='words')


def test_unit_buffer_overflow_drops_whole_units(real):
  rows = real[1]
  mb, _ = _unit_run(real, 'span', 0.8, key=9, max_predictions=20)
  assert (mb.selected.sum(1) <= 20).all()
  first_sel = np.take_along_axis(mb.selected, mb.units, 1)
  assert (mb.selected == (first_sel & (rows >= FIRST_REGULAR))).all()


@pytest.mark.slow
def test_default_buffer_holds_unit_strategies(real):
  tok, rows = real[0], real[1]
  for strategy in ('whole_word', 'span', 'pmi'):
    size = masking.default_max_predictions(0.15, UNIT_LEN, 'exact', strategy)
    assert math.ceil(0.15 * UNIT_LEN) < size <= UNIT_LEN
    full, _ = _unit_run(real, strategy, 0.15, key=1)
    capped, _ = _unit_run(real, strategy, 0.15, key=1, max_predictions=size)
    # The default buffer drops (almost) nothing.
    assert capped.selected.sum() >= 0.98 * full.selected.sum()


@pytest.mark.parametrize('kind,kw,expected', [
    ('linear', dict(rate=0.3, end=0.15, steps=1000),
     {0: 0.3, 250: 0.2625, 500: 0.225, 1000: 0.15, 5000: 0.15}),
    ('cosine', dict(rate=0.3, end=0.15, steps=1000),
     {0: 0.3, 500: 0.225, 1000: 0.15, 1001: 0.15}),
    ('step', dict(rate=0.15, boundaries=(100, 200), rates=(0.4, 0.3, 0.15)),
     {0: 0.4, 99: 0.4, 100: 0.3, 199: 0.3, 200: 0.15, 10_000: 0.15}),
    ('constant', dict(rate=0.25), {0: 0.25, 123: 0.25}),
])
def test_rate_schedules_exact_at_chosen_steps(kind, kw, expected):
  import ml_collections
  schedule = {'kind': kind, **{k: v for k, v in kw.items() if k != 'rate'}}
  cfg = ml_collections.ConfigDict({'rate': kw['rate'], 'schedule': schedule})
  sched = masking.rate_schedule_from_config(cfg, num_steps=4000)
  jitted = jax.jit(sched.__call__)
  for step, rate in expected.items():
    assert sched.at(step) == pytest.approx(rate, abs=1e-12)
    assert float(jitted(step)) == pytest.approx(rate, abs=2e-8)
    if step == 0 or rate == expected[max(expected)]:  # end points are exact in float32 too
      assert float(jitted(step)) == np.float32(rate)
  assert sched.max_rate == max(expected.values())


def test_rate_schedule_errors():
  import ml_collections
  bad = [dict(kind='exp'), dict(kind='linear', end=1.5, steps=0),
         dict(kind='step', boundaries=(5,), rates=(0.2,)),
         dict(kind='step', boundaries=(5, 3), rates=(0.2, 0.1, 0.3))]
  for kw in bad:
    with pytest.raises(ValueError, match=r'masking\.schedule\.'):
      masking.rate_schedule_from_config(ml_collections.ConfigDict({'rate': 0.2, 'schedule': kw}), 100)


# ---------------------------------------------------------------------------------------------
# Static masking (masking.dynamic=False): a row's masks come from its content, not the step.

_jit_batch = jax.jit(masking.mask_batch, static_argnums=2, static_argnames='seed')


def _selected_sets(mb) -> list[frozenset]:
  """Returns, per row, the set of (position, corruption kind) pairs of a MaskedBatch."""
  pos, w, kinds = (np.asarray(x) for x in (mb.positions, mb.weights, mb.kinds))
  return [frozenset((int(p), int(k)) for p, k, ww in zip(pos[b], kinds[b], w[b]) if ww > 0)
          for b in range(pos.shape[0])]


def test_static_masks_follow_the_row_not_the_step_or_its_place_in_the_batch():
  rows = _packed_rows(11, 16, SEQ_LEN, VOCAB)[2:]
  spec = MaskingSpec(vocab_size=VOCAB, rate=0.15, max_predictions=40, static_patterns=1)
  first = _jit_batch(jax.random.key(1), rows, spec, seed=3)
  # Another step's key and the rows in reverse order: every row gets the same masks.
  second = _jit_batch(jax.random.key(2), rows[::-1], spec, seed=3)
  assert _selected_sets(first) == _selected_sets(second)[::-1]
  np.testing.assert_array_equal(np.asarray(first.inputs), np.asarray(second.inputs)[::-1])
  # Another seed gives other masks; the dynamic spec draws afresh per step.
  other_seed = _jit_batch(jax.random.key(1), rows, spec, seed=4)
  assert sum(a != b for a, b in zip(_selected_sets(first), _selected_sets(other_seed))) >= 12
  dynamic = MaskingSpec(vocab_size=VOCAB, rate=0.15, max_predictions=40)
  d1, d2 = (_selected_sets(_jit_batch(jax.random.key(k), rows, dynamic)) for k in (1, 2))
  assert sum(a != b for a, b in zip(d1, d2)) >= 12


def test_static_masks_with_k_patterns_draw_exactly_k_masks_per_row():
  rows = _packed_rows(12, 6, SEQ_LEN, VOCAB)[2:]
  k = 3
  spec = MaskingSpec(vocab_size=VOCAB, rate=0.15, max_predictions=40, static_patterns=k)
  seen = [set() for _ in rows]
  for step in range(60):
    for b, s in enumerate(_selected_sets(_jit_batch(jax.random.key(step), rows, spec, seed=0))):
      seen[b].add(s)
  # 60 draws from 3 patterns miss one with probability 3 * (2/3)^60 < 1e-10.
  assert [len(s) for s in seen] == [k] * len(rows)


def test_static_masks_keep_the_rate_and_the_corruption_split():
  rows = _packed_rows(13, 256, SEQ_LEN, VOCAB)
  spec = MaskingSpec(vocab_size=VOCAB, rate=0.15, max_predictions=40, static_patterns=10)
  mb = _jit_batch(jax.random.key(0), rows, spec, seed=0)
  eligible = (rows >= FIRST_REGULAR) & (rows != MASK)
  # exact selection: round(rate * n) per row, as in dynamic masking.
  counts = np.asarray(mb.weights).sum(1)
  np.testing.assert_array_equal(counts, np.minimum(np.round(0.15 * eligible.sum(1)), 40))
  kinds = np.asarray(mb.kinds)[np.asarray(mb.weights) > 0]
  n = kinds.size
  share = (kinds == KIND_MASK).mean()
  assert abs(share - 0.8) < 4 * math.sqrt(0.8 * 0.2 / n)
  assert not np.asarray(mb.selected)[~eligible].any()


def test_static_masking_config_keys_are_checked_and_reach_the_spec():
  from mlmjax import schema  # pylint: disable=g-import-not-at-top
  cfg = schema.defaults().masking
  assert masking.spec_from_config(cfg, vocab_size=VOCAB, seq_len=64).static_patterns == 0
  cfg.dynamic, cfg.static_patterns = False, 10
  assert masking.spec_from_config(cfg, vocab_size=VOCAB, seq_len=64).static_patterns == 10
  cfg.static_patterns = 0
  with pytest.raises(ValueError, match='masking.static_patterns'):
    masking.spec_from_config(cfg, vocab_size=VOCAB, seq_len=64)
