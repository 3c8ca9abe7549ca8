"""MLM masking on the accelerator: select units (tokens, words, spans, PMI n-grams), corrupt them,
report a prediction buffer; masking-rate schedules."""

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KIND_MASK, KIND_RANDOM, KIND_KEEP = 0, 1, 2  # what a selected position was turned into

SELECTIONS = ('exact', 'bernoulli')
STRATEGIES = ('token', 'whole_word', 'span', 'pmi')
RATE_SCHEDULES = ('constant', 'linear', 'cosine', 'step')
PMI_MAX_N = 5  # longest PMI n-gram
# fold_in(rng, c) equals split(rng, n)[c] for every c < n (partitionable threefry, STACK.md), so
# the span-length stream takes a constant far beyond any split width: split(rng, 3) gives the
# selection, corruption and replacement keys, and the span lengths must not reuse the corruption
# uniforms (fold_in(rng, 1) did, tying a span's kind to its length).
_SPAN_LENGTH_STREAM = 0x5350414E  # 'SPAN'


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """Static masking settings; hashable, so jitted step factories can close over it."""
  vocab_size: int
  rate: float = 0.15
  split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # mask / random / keep
  max_predictions: int = 20  # size of the prediction buffer per row
  selection: str = 'exact'  # 'exact' or 'bernoulli'
  first_regular_id: int = 5  # ids below are special: never selected, never drawn as replacements
  mask_id: int = 4
  pad_id: int = 0
  special_ids: tuple[int, ...] = ()  # further special ids >= first_regular_id (WordPiece vocabs)
  strategy: str = 'token'  # unit of selection: 'token', 'whole_word', 'span' or 'pmi'
  span_p: float = 0.2  # span lengths ~ Geometric(span_p) truncated to [1, span_max] (SpanBERT)
  span_max: int = 10
  span_words: bool = True  # span lengths count whole words (SpanBERT) instead of tokens
  static_patterns: int = 0  # 0: fresh masks every step; K: each row has K fixed masks (mask_batch)

  def __post_init__(self):
    _check_rate(self.rate, 'masking.rate')
    if (isinstance(self.static_patterns, bool) or not isinstance(self.static_patterns, int)
        or self.static_patterns < 0):
      raise ValueError(f'static_patterns must be an integer >= 0 (0: dynamic masking); '
                       f'got {self.static_patterns!r}.')
    if self.strategy not in STRATEGIES:
      raise ValueError(f'masking.strategy must be one of {STRATEGIES}; got {self.strategy!r}.')
    if isinstance(self.span_p, bool) or not isinstance(self.span_p, numbers.Real) or not 0 < self.span_p <= 1:
      raise ValueError(f'masking.span.p must be a number in (0, 1]; got {self.span_p!r}.')
    if isinstance(self.span_max, bool) or not isinstance(self.span_max, int) or self.span_max < 1:
      raise ValueError(f'masking.span.max must be an integer >= 1; got {self.span_max!r}.')
    object.__setattr__(self, 'span_p', float(self.span_p))
    try:
      split = tuple(float(s) for s in self.split)
    except (TypeError, ValueError):
      split = ()
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
      raise ValueError(
          f'masking.split must be 3 non-negative fractions ([MASK], random, keep) summing to 1; '
          f'got {self.split!r}. Use e.g. (0.8, 0.1, 0.1).')
    # Lists (from overrides) become tuples so the spec stays hashable.
    object.__setattr__(self, 'split', split)
    object.__setattr__(self, 'rate', float(self.rate))
    if self.selection not in SELECTIONS:
      raise ValueError(
          f'masking.selection must be one of {SELECTIONS}; got {self.selection!r}.')
    if not isinstance(self.max_predictions, int) or self.max_predictions < 1:
      raise ValueError(
          f'masking.max_predictions must be an integer >= 1 (0 in the config derives it from '
          f'rate and seq_len); got {self.max_predictions!r}.')
    object.__setattr__(self, 'special_ids', tuple(sorted({int(i) for i in self.special_ids})))
    num_special = self.first_regular_id + sum(i >= self.first_regular_id for i in self.special_ids)
    if self.vocab_size <= num_special:
      raise ValueError(
          f'tokenizer.vocab_size must exceed the {num_special} special ids so that '
          f'random replacements exist; got {self.vocab_size}.')


class MaskedBatch(NamedTuple):
  """Corrupted inputs plus a fixed-size buffer of the selected positions per row."""
  inputs: jax.Array  # (B, L) int32 corrupted tokens fed to the encoder
  positions: jax.Array  # (B, P) int32 positions of selected tokens, ascending, padded with 0
  labels: jax.Array  # (B, P) int32 original ids at those positions, 0 in padding slots
  weights: jax.Array  # (B, P) float32 1.0 for real slots, 0.0 for padding slots
  kinds: jax.Array  # (B, P) int32 KIND_* per slot (padding slots: KIND_KEEP, weight 0)
  selected: jax.Array  # (B, L) bool, True where a position was selected (and fits the buffer)
  units: jax.Array  # (B, L) int32 position of the first token of each position's unit


class MaskingTables(NamedTuple):
  """Vocabulary-sized data the unit strategies need; jnp arrays, passed next to the spec."""
  word_start: Any = None  # (V,) bool: the id begins a word (whole_word, span with words, pmi)
  pmi_hash1: Any = None  # (K,) uint32 sorted first hashes of the PMI n-gram vocabulary
  pmi_hash2: Any = None  # (K,) uint32 second hashes, aligned with pmi_hash1


def _check_rate(rate: Any, key: str) -> None:
  """Returns None; raises ValueError naming `key` unless rate is a number in (0, 1)."""
  if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 < rate < 1.0:
    raise ValueError(f'{key} must be a number in (0, 1), exclusive; got {rate!r}. Use e.g. 0.15.')


def truncated_geometric_mean(p: float, max_len: int) -> float:
  """Returns the mean of Geometric(p) on {1, 2, ...} truncated to [1, max_len] and renormalized."""
  lengths = np.arange(1, max_len + 1, dtype=np.float64)
  weights = p * (1.0 - p) ** (lengths - 1)
  return float((lengths * weights).sum() / weights.sum())


def _unit_length_bounds(strategy: str, span_p: float, span_max: int, span_words: bool) -> tuple[float, int]:
  """Returns (typical mean, allowance for the longest) unit length in tokens, for buffer sizing."""
  if strategy == 'token':
    return 1.0, 1
  if strategy == 'span':
    words = 1.5 if span_words else 1.0  # subword tokens per word, roughly
    return truncated_geometric_mean(span_p, span_max) * words, span_max * (2 if span_words else 1)
  if strategy == 'pmi':
    return 1.5, max(PMI_MAX_N, 10)  # n-grams, else whole words
  return 1.5, 10  # whole words


def default_max_predictions(rate: float, seq_len: int, selection: str, strategy: str = 'token', *,
                            span_p: float = 0.2, span_max: int = 10, span_words: bool = True) -> int:
  """Returns a prediction buffer size that holds (almost) every selection at this rate."""
  _check_rate(rate, 'masking.rate')
  mean_len, max_len = _unit_length_bounds(strategy, span_p, span_max, span_words)
  if selection == 'exact':
    # round(rate * n) <= ceil(rate * seq_len); the epsilon keeps 0.1 * 130 = 13.000000000000002
    # from asking for a 14th slot. A unit that crosses the budget may add max_len - 1 more.
    size = math.ceil(rate * seq_len - 1e-9) + max_len - 1
  elif selection == 'bernoulli':
    # Units of mean length m: the token count has variance ~ m * n * rate * (1 - rate); the
    # buffer holds mean + 4 sd (exceeded with probability ~3e-5 for tokens).
    size = math.ceil(seq_len * rate + 4.0 * math.sqrt(mean_len * seq_len * rate * (1.0 - rate)))
    size += max_len - 1
  else:
    raise ValueError(f'masking.selection must be one of {SELECTIONS}; got {selection!r}.')
  return max(1, min(size, seq_len))


def special_fields(special_mask: Any, *, mask_id: int, pad_id: int) -> dict[str, Any]:
  """Returns MaskingSpec keywords (first_regular_id, special_ids, mask_id, pad_id) for a bool table."""
  special = np.asarray(special_mask, dtype=bool)
  regular = np.flatnonzero(~special)
  first = int(regular[0]) if len(regular) else len(special)
  later = tuple(int(i) for i in np.flatnonzero(special[first:]) + first)
  return dict(first_regular_id=first, special_ids=later, mask_id=int(mask_id), pad_id=int(pad_id))


def spec_from_config(masking_cfg: Any, *, vocab_size: int, seq_len: int,
                     tokenizer: Any = None, num_steps: int = 0) -> MaskingSpec:
  """Returns the MaskingSpec for a `masking` config section (max_predictions 0 = derived).

  tokenizer: when given, its special ids (special_mask, mask_id, pad_id) replace the defaults.
  num_steps: train.num_steps; with a rate schedule the derived buffer holds its highest rate.
  """
  max_predictions = masking_cfg.max_predictions
  if (isinstance(max_predictions, bool) or not isinstance(max_predictions, int)
      or max_predictions < 0):
    raise ValueError(
        f'masking.max_predictions must be an integer >= 0 (0 derives it from rate and seq_len); '
        f'got {max_predictions!r}.')
  span = masking_cfg.span
  unit = dict(strategy=masking_cfg.strategy, span_p=span.p, span_max=span.max, span_words=span.words)
  if max_predictions == 0:
    peak = rate_schedule_from_config(masking_cfg, max(num_steps, 1)).max_rate
    max_predictions = default_max_predictions(peak, seq_len, masking_cfg.selection, **unit)
  specials = {} if tokenizer is None else special_fields(
      tokenizer.special_mask, mask_id=tokenizer.mask_id, pad_id=tokenizer.pad_id)
  if not isinstance(masking_cfg.dynamic, bool):
    raise ValueError(f'masking.dynamic must be True or False; got {masking_cfg.dynamic!r}.')
  patterns = masking_cfg.static_patterns
  if isinstance(patterns, bool) or not isinstance(patterns, int) or patterns < 1:
    raise ValueError(f'masking.static_patterns must be an integer >= 1 (the fixed masks per row '
                     f'when masking.dynamic=False); got {patterns!r}.')
  return MaskingSpec(
      vocab_size=vocab_size, rate=masking_cfg.rate, split=tuple(masking_cfg.split),
      max_predictions=max_predictions, selection=masking_cfg.selection, **unit, **specials,
      static_patterns=0 if masking_cfg.dynamic else patterns)


def needs_word_starts(spec: MaskingSpec) -> bool:
  """Returns whether `spec.strategy` reads MaskingTables.word_start (pmi: its fallback units)."""
  return spec.strategy in ('whole_word', 'pmi') or (spec.strategy == 'span' and spec.span_words)


def tables_for(spec: MaskingSpec, tokenizer: Any = None, pmi_vocab: Any = None) -> MaskingTables:
  """Returns the MaskingTables `spec.strategy` needs (word starts from the tokenizer, PMI hashes)."""
  word_start = pmi1 = pmi2 = None
  if needs_word_starts(spec):
    if tokenizer is None:
      raise ValueError(f'masking.strategy={spec.strategy!r} needs the tokenizer\'s word-start flags')
    word_start = jnp.asarray(tokenizer.word_start_table, dtype=bool)
  if spec.strategy == 'pmi':
    if pmi_vocab is None or len(pmi_vocab['hash1']) == 0:
      raise ValueError("masking.strategy='pmi' needs a non-empty PMI n-gram vocabulary "
                       '(mlmjax.pmi.load_or_build_pmi_vocab)')
    pmi1 = jnp.asarray(pmi_vocab['hash1'], jnp.uint32)
    pmi2 = jnp.asarray(pmi_vocab['hash2'], jnp.uint32)
  return MaskingTables(word_start=word_start, pmi_hash1=pmi1, pmi_hash2=pmi2)


# ---------------------------------------------------------------------------------------------
# Rate schedules: the training rate as a function of the step (evaluation keeps eval.rate).


@dataclasses.dataclass(frozen=True)
class RateSchedule:
  """The masking rate in force at each step; call with a (traced) step, or `at` for a host float."""
  kind: str = 'constant'
  start: float = 0.15
  end: float = 0.15
  steps: int = 1  # linear/cosine reach `end` at this step and stay there
  boundaries: tuple[int, ...] = ()  # step: values[i] from boundaries[i - 1] (inclusive) on
  values: tuple[float, ...] = ()

  @property
  def max_rate(self) -> float:
    """Returns the highest rate the schedule reaches."""
    return max((self.start, self.end) if self.kind != 'step' else self.values)

  def at(self, step: int) -> float:
    """Returns the rate at `step` as a Python float (the same numbers the step uses, in float64)."""
    return float(self._rate(np, np.float64(step), np.float64))

  def __call__(self, step: jax.Array) -> jax.Array:
    """Returns the float32 rate at a (traced) integer step."""
    return self._rate(jnp, jnp.asarray(step, jnp.float32), jnp.float32)

  def _rate(self, xp, step, dtype):
    if self.kind == 'constant':
      return xp.asarray(self.start, dtype)
    if self.kind == 'step':
      index = xp.searchsorted(xp.asarray(self.boundaries, dtype), step, side='right')
      return xp.asarray(self.values, dtype)[index]
    frac = xp.clip(step / self.steps, 0.0, 1.0)
    start, end = xp.asarray(self.start, dtype), xp.asarray(self.end, dtype)
    if self.kind == 'linear':
      rate = start + (end - start) * frac
    else:
      rate = end + (start - end) * 0.5 * (1.0 + xp.cos(np.pi * frac))
    # Exact end points, whatever the rounding in between.
    return xp.where(step <= 0, start, xp.where(step >= self.steps, end, rate)).astype(dtype)


def rate_schedule_from_config(masking_cfg: Any, num_steps: int) -> RateSchedule:
  """Returns the RateSchedule of a `masking` section (masking.rate is the start rate).

  Reads masking.schedule.kind, and only the keys of that kind: end and steps (linear, cosine),
  boundaries and values (step).
  """
  sched = masking_cfg.schedule
  kind = sched.kind
  if kind not in RATE_SCHEDULES:
    raise ValueError(f'masking.schedule.kind must be one of {RATE_SCHEDULES}; got {kind!r}.')
  start = masking_cfg.rate
  _check_rate(start, 'masking.rate')
  if kind == 'constant':
    return RateSchedule('constant', float(start), float(start))
  if kind in ('linear', 'cosine'):
    end = sched.end
    _check_rate(end, 'masking.schedule.end')
    steps = int(sched.steps or num_steps)
    if steps < 1:
      raise ValueError(f'masking.schedule.steps must be >= 1 (0 = train.num_steps); got {steps}.')
    return RateSchedule(kind, float(start), float(end), steps)
  boundaries = tuple(int(b) for b in sched.boundaries)
  values = tuple(sched.rates)
  if len(values) != len(boundaries) + 1 or list(boundaries) != sorted(set(boundaries)):
    raise ValueError(
        "masking.schedule.kind='step' needs ascending masking.schedule.boundaries (steps) and one "
        f'more masking.schedule.rates than boundaries; got {boundaries} and {values}.')
  for v in values:
    _check_rate(v, 'masking.schedule.rates')
  return RateSchedule('step', float(values[0]), float(values[-1]), 1, boundaries,
                      tuple(float(v) for v in values))


# ---------------------------------------------------------------------------------------------
# Selection and corruption.


def _regular_draws(rng: jax.Array, shape: tuple[int, ...], spec: MaskingSpec) -> jax.Array:
  """Returns int32 ids drawn uniformly from the non-special ids of the vocabulary."""
  if not spec.special_ids:
    return jax.random.randint(rng, shape, spec.first_regular_id, spec.vocab_size, dtype=jnp.int32)
  special = np.zeros(spec.vocab_size, dtype=bool)
  special[:spec.first_regular_id] = True
  special[list(spec.special_ids)] = True
  regular = jnp.asarray(np.flatnonzero(~special), dtype=jnp.int32)
  return regular[jax.random.randint(rng, shape, 0, regular.shape[0], dtype=jnp.int32)]


def _selection_counts(candidates: jax.Array, scores: jax.Array, rate: jax.Array,
                      spec: MaskingSpec) -> jax.Array:
  """Returns (B,) int32: how many of the lowest-score candidates each row selects."""
  n_cand = candidates.sum(axis=1, dtype=jnp.int32)
  if spec.selection == 'exact':
    # BERT's rule: max(1, round(rate * n)), rounded half to even in float32.
    k = jnp.round(rate * n_cand.astype(jnp.float32)).astype(jnp.int32)
    k = jnp.where(n_cand > 0, jnp.maximum(k, 1), 0)
  else:
    k = (candidates & (scores < rate)).sum(axis=1, dtype=jnp.int32)
  return jnp.minimum(k, spec.max_predictions)


def _corruption_kinds(rng: jax.Array, shape: tuple[int, ...], spec: MaskingSpec) -> jax.Array:
  """Returns int32 KIND_* per position, drawn with probabilities spec.split."""
  p_mask, p_random, p_keep = spec.split
  u = jax.random.uniform(rng, shape)  # in [0, 1)
  # Exact edges: u < 0 never holds, and u < 1 always does (p_mask + p_random may be 0.9999999).
  t_random = 1.0 if p_keep == 0 else p_mask + p_random
  return jnp.where(u < p_mask, KIND_MASK,
                   jnp.where(u < t_random, KIND_RANDOM, KIND_KEEP)).astype(jnp.int32)


# Two independent 32-bit hashes identify an n-gram (a false match needs both to collide).
_HASHES = ((0x811C9DC5, 0x01000193), (0x9E3779B9, 0x85EBCA6B))  # (offset, multiplier)


def ngram_hashes(columns: list, xp=jnp) -> tuple[Any, Any]:
  """Returns two uint32 hashes of the n-grams whose i-th tokens are columns[i] (numpy or jnp)."""
  out = []
  for offset, mult in _HASHES:
    mult = xp.asarray(mult, xp.uint32)
    h = xp.full(xp.shape(columns[0]), offset, xp.uint32)
    for col in (*columns, xp.full(xp.shape(columns[0]), len(columns), xp.uint32)):
      h = (h ^ xp.asarray(col).astype(xp.uint32)) * mult
    out.append(h ^ (h >> 15))
  return out[0], out[1]


def _shift(x: jax.Array, k: int, fill) -> jax.Array:
  """Returns x shifted along axis 1: x[:, i - k] at i (k > 0: right; k < 0: left), `fill` outside."""
  pad = jnp.full_like(x[:, :abs(k)], fill)
  return jnp.concatenate([pad, x[:, :-k]], 1) if k > 0 else jnp.concatenate([x[:, -k:], pad], 1)


def _span_lengths(rng: jax.Array, shape: tuple[int, ...], p: float, max_len: int) -> jax.Array:
  """Returns int32 draws of Geometric(p) truncated to [1, max_len], by inverting the CDF."""
  if p >= 1.0 or max_len == 1:
    return jnp.ones(shape, jnp.int32)
  q = 1.0 - p
  u = jax.random.uniform(rng, shape)
  # P(l <= n) = (1 - q^n) / (1 - q^max_len); the smallest n with P >= u.
  n = jnp.ceil(jnp.log1p(-u * (1.0 - q ** max_len)) / math.log(q))
  return jnp.clip(n, 1, max_len).astype(jnp.int32)


def _pmi_match_lengths(tokens: jax.Array, candidates: jax.Array, tables: MaskingTables,
                       fallback: jax.Array) -> jax.Array:
  """Returns (B, L) int32: the longest PMI n-gram's length at each position, else `fallback`."""
  match = fallback
  size = tables.pmi_hash1.shape[0]
  for n in range(2, min(PMI_MAX_N, tokens.shape[1]) + 1):  # longer matches overwrite shorter
    cols = [_shift(tokens, -i, 0) for i in range(n)]
    inside = candidates
    for i in range(1, n):
      inside = inside & _shift(candidates, -i, False)
    h1, h2 = ngram_hashes(cols)
    at = jnp.clip(jnp.searchsorted(tables.pmi_hash1, h1), 0, size - 1)
    hit = inside & (tables.pmi_hash1[at] == h1) & (tables.pmi_hash2[at] == h2)
    match = jnp.where(hit, n, match)
  return match


def _greedy_starts(match: jax.Array) -> jax.Array:
  """Returns (B, L) bool unit starts of the left-to-right longest-match segmentation."""

  def body(remaining, m):
    start = remaining == 0
    return jnp.where(start, m - 1, remaining - 1), start

  _, starts = jax.lax.scan(body, jnp.zeros(match.shape[:1], jnp.int32), match.T)
  return starts.T


def _unit_starts(rng: jax.Array, tokens: jax.Array, candidates: jax.Array, spec: MaskingSpec,
                 tables: MaskingTables) -> jax.Array:
  """Returns (B, L) bool: True where a unit (word, span, n-gram) begins."""
  # Every non-candidate is a unit of its own and never selected; so units never cross them.
  forced = ~candidates | _shift(~candidates, 1, True)
  if needs_word_starts(spec):
    if tables is None or tables.word_start is None:
      raise ValueError(f'masking.strategy={spec.strategy!r} needs MaskingTables.word_start '
                       '(masking.tables_for(spec, tokenizer))')
    words = forced | tables.word_start[tokens]
  else:
    words = jnp.ones_like(candidates)
  if spec.strategy == 'whole_word':
    return words
  if spec.strategy == 'span':
    # Tile the row's words (or tokens) with consecutive spans of i.i.d. truncated-geometric
    # lengths; a span starts at every word whose index is a partial sum of the lengths.
    batch, length = tokens.shape
    index = jnp.cumsum(words, axis=1, dtype=jnp.int32) - 1
    ends = jnp.minimum(jnp.cumsum(_span_lengths(rng, tokens.shape, spec.span_p, spec.span_max),
                                  axis=1, dtype=jnp.int32), length)
    tiles = jnp.zeros((batch, length + 1), bool).at[:, 0].set(True)
    tiles = tiles.at[jnp.arange(batch)[:, None], ends].set(True)
    return forced | (words & jnp.take_along_axis(tiles, index, axis=1))
  if tables is None or tables.pmi_hash1 is None:
    raise ValueError("masking.strategy='pmi' needs MaskingTables.pmi_hash1/pmi_hash2 "
                     '(masking.tables_for(spec, pmi_vocab=...))')
  # Outside the n-grams a unit is the rest of the word (a whole word unless an n-gram ended
  # inside it): up to the next word start.
  pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)
  nxt = jax.lax.cummin(_shift(jnp.where(words, pos, tokens.shape[1]), -1, tokens.shape[1]),
                       axis=1, reverse=True)
  return forced | _greedy_starts(_pmi_match_lengths(tokens, candidates, tables, nxt - pos))


def _select_units(rng: jax.Array, starts: jax.Array, candidates: jax.Array, rate: jax.Array,
                  spec: MaskingSpec) -> tuple[jax.Array, jax.Array]:
  """Returns ((B, L) bool selected tokens, (B, L) int32 unit start of each position)."""
  batch, length = starts.shape
  pos = jnp.arange(length, dtype=jnp.int32)
  first = jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)
  # Each unit's candidate count, stored at its start: counts up to the next start.
  nxt = jax.lax.cummin(_shift(jnp.where(starts, pos, length), -1, length), axis=1, reverse=True)
  csum = jnp.pad(jnp.cumsum(candidates, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))
  ulen = jnp.where(starts, jnp.take_along_axis(csum, nxt, 1) - csum[:, :length], 0)
  valid = starts & (ulen > 0)

  k_order, k_cross = jax.random.split(rng)
  u = jax.random.uniform(k_order, starts.shape)
  order = jnp.argsort(jnp.where(valid, u, 2.0), axis=1, stable=True)  # random unit order
  lens = jnp.take_along_axis(ulen, order, 1)
  if spec.selection == 'exact':
    n_cand = candidates.sum(axis=1, dtype=jnp.int32)
    budget = jnp.round(rate * n_cand.astype(jnp.float32))
    budget = jnp.where(n_cand > 0, jnp.maximum(budget, 1.0), 0.0)[:, None]
    after = jnp.cumsum(lens, axis=1).astype(jnp.float32)
    before = after - lens
    # Units are taken in random order while they fit the token budget; the one that crosses it
    # is taken with probability (budget - before) / length, so the expected count is the budget.
    cross = (before < budget) & (after > budget)
    p_cross = (budget - before) / jnp.maximum(lens, 1)
    take = (lens > 0) & ((after <= budget) | (cross & (jax.random.uniform(k_cross, lens.shape) < p_cross)))
  else:
    take = (lens > 0) & (jnp.take_along_axis(u, order, 1) < rate)
  # Whole units that would overflow the prediction buffer are dropped.
  take &= jnp.cumsum(jnp.where(take, lens, 0), axis=1) <= spec.max_predictions
  taken = jnp.take_along_axis(take, jnp.argsort(order, axis=1), 1)  # back to positions
  return jnp.take_along_axis(taken, first, 1) & candidates, first


def mask_tokens(rng: jax.Array, tokens: jax.Array, spec: MaskingSpec,
                rate: jax.Array | float | None = None,
                tables: MaskingTables | None = None) -> MaskedBatch:
  """Returns the MaskedBatch for packed rows `tokens` (B, L); `rate` may be traced.

  tables: word-start flags and PMI hashes (masking.tables_for) for the unit strategies.
  """
  if isinstance(rate, (int, float)):  # a traced or array rate cannot be checked here
    _check_rate(rate, 'masking rate (masking.rate / eval.rate)')
  if tokens.ndim != 2:
    raise ValueError(f'mask_tokens expects tokens of shape (batch, seq_len); got {tokens.shape}.')
  tokens = jnp.asarray(tokens, jnp.int32)
  length = tokens.shape[1]
  rate = jnp.asarray(spec.rate if rate is None else rate, jnp.float32)
  k_select, k_kind, k_replace = jax.random.split(rng, 3)
  k_units = jax.random.fold_in(rng, _SPAN_LENGTH_STREAM)  # only span draws from it

  candidates = tokens >= spec.first_regular_id
  if spec.special_ids:
    candidates &= ~jnp.isin(tokens, jnp.asarray(spec.special_ids, jnp.int32))
  kinds_full = _corruption_kinds(k_kind, tokens.shape, spec)
  n_slots = min(spec.max_predictions, length)
  if spec.strategy == 'token':
    # Uniforms lie in [0, 1), so a score of 2 never beats a candidate.
    scores = jnp.where(candidates, jax.random.uniform(k_select, tokens.shape), 2.0)
    order = jnp.argsort(scores, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1)  # inverse permutation: exact ranks even when scores tie
    count = _selection_counts(candidates, scores, rate, spec)
    selected = rank < count[:, None]
    units = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    # The selected positions are the `count` lowest-ranked; sort them into ascending order.
    slot_valid = jnp.arange(n_slots)[None, :] < count[:, None]
    positions = jnp.sort(jnp.where(slot_valid, order[:, :n_slots], length), axis=1)
  else:
    starts = _unit_starts(k_units, tokens, candidates, spec, tables)
    selected, units = _select_units(k_select, starts, candidates, rate, spec)
    # One corruption draw per unit: a word or span is [MASK]ed, replaced or kept as a whole.
    kinds_full = jnp.take_along_axis(kinds_full, units, 1)
    count = selected.sum(axis=1, dtype=jnp.int32)
    slot_valid = jnp.arange(n_slots)[None, :] < count[:, None]
    positions = jnp.argsort(~selected, axis=1, stable=True)[:, :n_slots]  # selected, ascending

  replacements = _regular_draws(k_replace, tokens.shape, spec)
  inputs = jnp.where(selected & (kinds_full == KIND_MASK), spec.mask_id, tokens)
  inputs = jnp.where(selected & (kinds_full == KIND_RANDOM), replacements, inputs)

  positions = jnp.where(slot_valid, positions, 0)
  if n_slots < spec.max_predictions:
    pad = ((0, 0), (0, spec.max_predictions - n_slots))
    positions = jnp.pad(positions, pad)
    slot_valid = jnp.pad(slot_valid, pad)
  labels = jnp.where(slot_valid, jnp.take_along_axis(tokens, positions, axis=1), spec.pad_id)
  kinds = jnp.where(slot_valid, jnp.take_along_axis(kinds_full, positions, axis=1), KIND_KEEP)
  return MaskedBatch(
      inputs=inputs, positions=positions.astype(jnp.int32), labels=labels.astype(jnp.int32),
      weights=slot_valid.astype(jnp.float32), kinds=kinds.astype(jnp.int32), selected=selected,
      units=units)


_STATIC_STREAM = 0x53544154  # 'STAT': the key of static masks, apart from every step's key


def row_hashes(tokens: jax.Array) -> jax.Array:
  """Returns a uint32 content hash per row of (B, L) tokens: the row's identity for static masks."""
  length = tokens.shape[1]
  # Random odd multipliers per position make the sum a universal hash; uint32 arithmetic wraps.
  mult = np.random.default_rng(0x5EED).integers(0, 2**31, size=length, dtype=np.uint32) * 2 + 1
  h = jnp.sum((tokens.astype(jnp.uint32) + 1) * jnp.asarray(mult, jnp.uint32), axis=1,
              dtype=jnp.uint32)
  h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)  # finalizer: spread the sum's bits
  return h ^ (h >> 15)


def static_row_keys(seed: int, tokens: jax.Array, rng: jax.Array, patterns: int) -> jax.Array:
  """Returns one key per row: pattern k of the row's `patterns` fixed keys, k drawn from rng.

  A row's keys depend only on (seed, its tokens, k), never on the step: with patterns=1 a row is
  masked the same way every time it is seen; with K, each time it is seen one of its K masks is
  chosen (original BERT's duplication factor K, whose copies a shuffle spreads over the epochs).
  """
  base = jax.random.fold_in(jax.random.key(seed), _STATIC_STREAM)
  hashes = row_hashes(tokens)
  picks = jax.vmap(lambda h: jax.random.randint(jax.random.fold_in(rng, h), (), 0, patterns))(hashes)
  return jax.vmap(lambda h, k: jax.random.fold_in(jax.random.fold_in(base, h), k))(hashes, picks)


def mask_batch(rng: jax.Array, tokens: jax.Array, spec: MaskingSpec, *, seed: int = 0,
               rate: jax.Array | float | None = None,
               tables: MaskingTables | None = None) -> MaskedBatch:
  """Returns the MaskedBatch of training rows: mask_tokens(rng, ...), or static masks per row.

  With spec.static_patterns = K > 0 each row is masked from its own static_row_keys(seed, ...)
  key, so the masks a row can receive are K fixed patterns (rng only picks one of them).
  """
  if not spec.static_patterns:
    return mask_tokens(rng, tokens, spec, rate=rate, tables=tables)
  tokens = jnp.asarray(tokens, jnp.int32)
  keys = static_row_keys(seed, tokens, rng, spec.static_patterns)
  one = jax.vmap(lambda k, row: mask_tokens(k, row[None], spec, rate=rate, tables=tables))
  return jax.tree.map(lambda x: x[:, 0], one(keys, tokens))
