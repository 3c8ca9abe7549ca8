"""MLM validation: fixed-key masks at a fixed rate, metrics by kind of position, n-gram baselines (the MLM task's evaluation)."""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlmjax import losses, masking
from mlmjax import model as model_lib
from mlmjax import tokenizer as tok

# Rows read for the baseline counts: enough for stable argmaxes, bounded for huge corpora.
_BASELINE_MAX_ROWS = 200_000


def baseline_tables(train_rows: np.ndarray, vocab_size: int,
                    special_mask: np.ndarray | None = None) -> tuple[int, np.ndarray]:
  """Returns (most frequent regular id, successor table: most frequent next regular id per id or -1).

  special_mask: (vocab_size,) bool of special ids (the tokenizer's); None means ids < NUM_SPECIAL.
  """
  if special_mask is None:
    special_mask = np.arange(vocab_size) < tok.NUM_SPECIAL
  special_mask = np.asarray(special_mask, dtype=bool)
  rows = np.asarray(train_rows[:_BASELINE_MAX_ROWS], dtype=np.int64)
  flat = rows.ravel()
  counts = np.bincount(flat[~special_mask[flat]], minlength=vocab_size)
  unigram = int(np.argmax(counts))
  prev, nxt = rows[:, :-1].ravel(), rows[:, 1:].ravel()
  keep = ~special_mask[nxt]
  codes, n = np.unique(prev[keep] * vocab_size + nxt[keep], return_counts=True)
  a, b = codes // vocab_size, codes % vocab_size
  # Sort by (prev, count desc, next asc) so the first row of each prev is its argmax (ties -> lowest id).
  order = np.lexsort((b, -n, a))
  a, b = a[order], b[order]
  first = np.ones(len(a), dtype=bool)
  first[1:] = a[1:] != a[:-1]
  successor = np.full(vocab_size, -1, dtype=np.int32)
  successor[a[first]] = b[first]
  return unigram, successor


def make_eval_step(graphdef, spec: masking.MaskingSpec, cls_id: int = tok.CLS_ID) -> Callable:
  """Returns jitted (params, tokens, key, unigram, successor) -> metric sums incl. baseline hits."""

  def step(params, tokens, key, unigram, successor):
    mb = masking.mask_tokens(key, tokens, spec)
    position_ids, doc_ids = model_lib.packed_layout(tokens, cls_id=cls_id, pad_id=spec.pad_id)
    logits = nnx.merge(graphdef, params)(mb.inputs, mb.positions, position_ids=position_ids,
                                          doc_ids=doc_ids)
    sums = losses.mlm_metric_sums(logits, mb.labels, mb.weights, mb.kinds)
    at_mask = mb.weights * (mb.kinds == masking.KIND_MASK)
    prev = jnp.take_along_axis(mb.inputs, jnp.maximum(mb.positions - 1, 0), axis=1)
    bigram = successor[prev]
    bigram = jnp.where(bigram < 0, unigram, bigram)
    sums['baseline_unigram_correct_mask'] = jnp.sum(at_mask * (mb.labels == unigram))
    sums['baseline_bigram_correct_mask'] = jnp.sum(at_mask * (mb.labels == bigram))
    return sums

  return jax.jit(step)


def evaluate(eval_step: Callable, params, batches: Sequence, *, seed: int, unigram: int,
             successor: np.ndarray, to_device: Callable = jnp.asarray) -> dict[str, float]:
  """Returns validation metrics (loss, accuracy overall and by kind, baselines) over all batches."""
  base_key = jax.random.key(seed)
  total = None
  succ = jnp.asarray(successor)
  for i, rows in enumerate(batches):
    sums = eval_step(params, to_device(rows), jax.random.fold_in(base_key, i), unigram, succ)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    raise ValueError('evaluation has no batches: the validation split is empty '
                     '(raise data.val_fraction or use a larger corpus)')
  total = {k: float(v) for k, v in jax.device_get(total).items()}
  out = losses.finalize_metrics(total)
  n_mask = total['count_mask']
  out['baseline/unigram_accuracy_at_mask'] = (
      total['baseline_unigram_correct_mask'] / n_mask if n_mask else float('nan'))
  out['baseline/bigram_accuracy_at_mask'] = (
      total['baseline_bigram_correct_mask'] / n_mask if n_mask else float('nan'))
  out['predictions'] = total['weight']
  return out
