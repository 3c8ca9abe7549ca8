"""MLM masking on the accelerator: select positions, corrupt them, report a prediction buffer."""

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KIND_MASK, KIND_RANDOM, KIND_KEEP = 0, 1, 2  # what a selected position was turned into

SELECTIONS = ('exact', 'bernoulli')


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

  def __post_init__(self):
    _check_rate(self.rate, 'masking.rate')
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


def _check_rate(rate: Any, key: str) -> None:
  """Returns None; raises ValueError naming `key` unless rate is a number in (0, 1)."""
  if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 < rate < 1.0:
    raise ValueError(f'{key} must be a number in (0, 1), exclusive; got {rate!r}. Use e.g. 0.15.')


def default_max_predictions(rate: float, seq_len: int, selection: str) -> int:
  """Returns a prediction buffer size that holds (almost) every selection at this rate."""
  _check_rate(rate, 'masking.rate')
  if selection == 'exact':
    # round(rate * n) <= ceil(rate * seq_len); the epsilon keeps 0.1 * 130 = 13.000000000000002
    # from asking for a 14th slot.
    size = math.ceil(rate * seq_len - 1e-9)
  elif selection == 'bernoulli':
    # Binomial(seq_len, rate) exceeds mean + 4 sd with probability ~3e-5.
    size = math.ceil(seq_len * rate + 4.0 * math.sqrt(seq_len * rate * (1.0 - rate)))
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
                     tokenizer: Any = None) -> MaskingSpec:
  """Returns the MaskingSpec for a `masking` config section (max_predictions 0 = derived).

  tokenizer: when given, its special ids (special_mask, mask_id, pad_id) replace the defaults.
  """
  max_predictions = masking_cfg.max_predictions
  if (isinstance(max_predictions, bool) or not isinstance(max_predictions, int)
      or max_predictions < 0):
    raise ValueError(
        f'masking.max_predictions must be an integer >= 0 (0 derives it from rate and seq_len); '
        f'got {max_predictions!r}.')
  if max_predictions == 0:
    max_predictions = default_max_predictions(
        masking_cfg.rate, seq_len, masking_cfg.selection)
  specials = {} if tokenizer is None else special_fields(
      tokenizer.special_mask, mask_id=tokenizer.mask_id, pad_id=tokenizer.pad_id)
  return MaskingSpec(
      vocab_size=vocab_size, rate=masking_cfg.rate, split=tuple(masking_cfg.split),
      max_predictions=max_predictions, selection=masking_cfg.selection, **specials)


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


def mask_tokens(rng: jax.Array, tokens: jax.Array, spec: MaskingSpec,
                rate: jax.Array | float | None = None) -> MaskedBatch:
  """Returns the MaskedBatch for packed rows `tokens` (B, L); `rate` may be traced."""
  if isinstance(rate, (int, float)):  # a traced or array rate cannot be checked here
    _check_rate(rate, 'masking rate (masking.rate / eval.rate)')
  if tokens.ndim != 2:
    raise ValueError(f'mask_tokens expects tokens of shape (batch, seq_len); got {tokens.shape}.')
  tokens = jnp.asarray(tokens, jnp.int32)
  length = tokens.shape[1]
  rate = jnp.asarray(spec.rate if rate is None else rate, jnp.float32)
  k_select, k_kind, k_replace = jax.random.split(rng, 3)

  candidates = tokens >= spec.first_regular_id
  if spec.special_ids:
    candidates &= ~jnp.isin(tokens, jnp.asarray(spec.special_ids, jnp.int32))
  # Uniforms lie in [0, 1), so a score of 2 never beats a candidate.
  scores = jnp.where(candidates, jax.random.uniform(k_select, tokens.shape), 2.0)
  order = jnp.argsort(scores, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1)  # inverse permutation: exact ranks even when scores tie
  count = _selection_counts(candidates, scores, rate, spec)
  selected = rank < count[:, None]

  kinds_full = _corruption_kinds(k_kind, tokens.shape, spec)
  replacements = _regular_draws(k_replace, tokens.shape, spec)
  inputs = jnp.where(selected & (kinds_full == KIND_MASK), spec.mask_id, tokens)
  inputs = jnp.where(selected & (kinds_full == KIND_RANDOM), replacements, inputs)

  # The selected positions are the `count` lowest-ranked; sort them into ascending order.
  n_slots = min(spec.max_predictions, length)
  slot_valid = jnp.arange(n_slots)[None, :] < count[:, None]
  positions = jnp.sort(jnp.where(slot_valid, order[:, :n_slots], length), axis=1)
  positions = jnp.where(slot_valid, positions, 0)
  if n_slots < spec.max_predictions:
    pad = ((0, 0), (0, spec.max_predictions - n_slots))
    positions = jnp.pad(positions, pad)
    slot_valid = jnp.pad(slot_valid, pad)
  labels = jnp.where(slot_valid, jnp.take_along_axis(tokens, positions, axis=1), spec.pad_id)
  kinds = jnp.where(slot_valid, jnp.take_along_axis(kinds_full, positions, axis=1), KIND_KEEP)
  return MaskedBatch(
      inputs=inputs, positions=positions.astype(jnp.int32), labels=labels.astype(jnp.int32),
      weights=slot_valid.astype(jnp.float32), kinds=kinds.astype(jnp.int32), selected=selected)
