"""MLM validation: fixed-key masks at a fixed rate, metrics by kind of position, n-gram baselines (the MLM task's evaluation)."""

import hashlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlmjax import losses, masking
from mlmjax import model as model_lib
from mlmjax import tokenizer as tok

# Loss by the predicted token's position in its unit (how much left context it has), for rows
# longer than the first edge: buckets [0, 128), [128, 512), [512, 2048), [2048, 8192), [8192, ...).
POSITION_EDGES = (128, 512, 2048, 8192)


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
  """Returns the [lo, hi) unit-position buckets a row of seq_len reaches; [] for one bucket."""
  if seq_len <= POSITION_EDGES[0]:
    return []
  edges = [0, *(e for e in POSITION_EDGES if e < seq_len), seq_len]
  return list(zip(edges[:-1], edges[1:]))


def position_bucket_sums(logits, labels, weights, slot_positions,
                         seq_len: int) -> dict[str, jax.Array]:
  """Returns loss sums and weights per unit-position bucket; slot_positions (B, P): in-unit positions."""
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), labels[..., None],
                             axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  sums = {}
  for lo, hi in position_buckets(seq_len):
    inside = weights * ((slot_positions >= lo) & (slot_positions < hi))
    sums[f'position_loss_sum_{lo}-{hi}'] = jnp.sum(nll * inside)
    sums[f'position_weight_{lo}-{hi}'] = jnp.sum(inside)
  return sums


def baseline_tables(train_rows: np.ndarray, vocab_size: int,
                    special_mask: np.ndarray | None = None) -> tuple[int, np.ndarray]:
  """Returns (most frequent regular id, successor table: most frequent next regular id per id or -1).

  Counts every row given (the MLM task passes shards.sample_rows's bounded sample).
  special_mask: (vocab_size,) bool of special ids (the tokenizer's); None means ids < NUM_SPECIAL.
  """
  if special_mask is None:
    special_mask = np.arange(vocab_size) < tok.NUM_SPECIAL
  special_mask = np.asarray(special_mask, dtype=bool)
  rows = np.asarray(train_rows, dtype=np.int64)
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


def row_groups(labels: np.ndarray, *, batch_size: int, num_batches: int = 0) -> list[np.ndarray]:
  """Returns per eval batch the (batch_size,) int32 group of each row; padding rows are -1.

  labels: the group of each validation row, in the order input_pipeline.eval_batches reads them.
  """
  labels = np.asarray(labels, np.int32)
  total = -(-len(labels) // batch_size)
  count = min(total, num_batches) if num_batches else total
  padded = np.full(total * batch_size, -1, np.int32)
  padded[:len(labels)] = labels
  return [padded[b * batch_size:(b + 1) * batch_size] for b in range(count)]


def make_eval_step(graphdef, spec: masking.MaskingSpec, cls_id: int = tok.CLS_ID,
                   extra_sums: Callable | None = None, num_groups: int = 0) -> Callable:
  """Returns jitted (params, tokens, key, unigram, successor, *extra) -> metric sums incl. baselines.

  extra_sums(masked_batch, logits, *extra) -> more sums of the same forward (mlmjax.probe's).
  num_groups > 0: the step also takes groups=(B,) int32 (a group per row, -1 none) and adds the
  sums of each group's rows as 'g<k>/<sum>', from the same forward and masks.
  """

  def step(params, tokens, key, unigram, successor, *extra, groups=None):
    mb = masking.mask_tokens(key, tokens, spec)
    position_ids, doc_ids = model_lib.packed_layout(tokens, cls_id=cls_id, pad_id=spec.pad_id)
    logits = nnx.merge(graphdef, params)(mb.inputs, mb.positions, position_ids=position_ids,
                                          doc_ids=doc_ids)
    prev = jnp.take_along_axis(mb.inputs, jnp.maximum(mb.positions - 1, 0), axis=1)
    bigram = successor[prev]
    bigram = jnp.where(bigram < 0, unigram, bigram)
    slot_positions = jnp.take_along_axis(position_ids, mb.positions, axis=1)

    def sums_of(weights):
      sums = losses.mlm_metric_sums(logits, mb.labels, weights, mb.kinds)
      at_mask = weights * (mb.kinds == masking.KIND_MASK)
      sums['baseline_unigram_correct_mask'] = jnp.sum(at_mask * (mb.labels == unigram))
      sums['baseline_bigram_correct_mask'] = jnp.sum(at_mask * (mb.labels == bigram))
      sums.update(position_bucket_sums(logits, mb.labels, weights, slot_positions,
                                       tokens.shape[-1]))
      return sums

    sums = sums_of(mb.weights)
    for g in range(num_groups if groups is not None else 0):
      mine = jnp.where((groups == g)[:, None], mb.weights, jnp.zeros_like(mb.weights))
      sums.update({f'g{g}/{k}': v for k, v in sums_of(mine).items()})
    if extra_sums is not None:
      sums.update(extra_sums(mb, logits, *extra))
    return sums

  return jax.jit(step)


def sum_batches(eval_step: Callable, params, batches: Sequence, *, seed: int, unigram: int,
                successor: np.ndarray, extra: tuple = (), to_device: Callable = jnp.asarray,
                groups: Sequence[np.ndarray] | None = None):
  """Returns the metric sums over all batches (host arrays), batch i masked by fold_in(seed, i).

  groups: row_groups of the batches, for a step made with num_groups.
  """
  base_key = jax.random.key(seed)
  total = None
  succ = jnp.asarray(successor)
  for i, rows in enumerate(batches):
    more = {} if groups is None else {'groups': to_device(groups[i])}
    sums = eval_step(params, to_device(rows), jax.random.fold_in(base_key, i), unigram, succ,
                     *extra, **more)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    raise ValueError('evaluation has no batches: the validation split is empty '
                     '(raise data.val_fraction or use a larger corpus)')
  return jax.device_get(total)


def evaluate(eval_step: Callable, params, batches: Sequence, *, seed: int, unigram: int,
             successor: np.ndarray, to_device: Callable = jnp.asarray,
             groups: Sequence[np.ndarray] | None = None,
             group_prefixes: Sequence[str] = ()) -> dict[str, float]:
  """Returns validation metrics (loss, accuracy overall and by kind, baselines) over all batches.

  With groups (row_groups; a step made with num_groups), group g's metrics are added as
  '<group_prefixes[g]>/<metric>' ('baseline/x' as 'baseline_x'); the pooled sums are their sums.
  A group with no predictions in the batches gets none.
  """
  total = sum_batches(eval_step, params, batches, seed=seed, unigram=unigram, successor=successor,
                      to_device=to_device, groups=groups)
  total = {k: float(v) for k, v in total.items()}
  out = _finalize({k: v for k, v in total.items() if '/' not in k})
  for g, prefix in enumerate(group_prefixes if groups is not None else ()):
    mine = {k[len(f'g{g}/'):]: v for k, v in total.items() if k.startswith(f'g{g}/')}
    if mine['weight'] > 0:
      out.update({f'{prefix}/{k.replace("baseline/", "baseline_")}': v
                  for k, v in _finalize(mine).items()})
  return out


def _finalize(total: dict[str, float]) -> dict[str, float]:
  """Returns the metrics of evaluate from one set of sums."""
  out = losses.finalize_metrics(total)
  n_mask = total['count_mask']
  out['baseline/unigram_accuracy_at_mask'] = (
      total['baseline_unigram_correct_mask'] / n_mask if n_mask else float('nan'))
  out['baseline/bigram_accuracy_at_mask'] = (
      total['baseline_bigram_correct_mask'] / n_mask if n_mask else float('nan'))
  out['predictions'] = total['weight']
  for key in [k for k in total if k.startswith('position_weight_')]:
    bucket = key[len('position_weight_'):]
    out[f'loss_by_position/{bucket}'] = (total[f'position_loss_sum_{bucket}'] / total[key]
                                         if total[key] else float('nan'))
  return out


# ---------------------------------------------------------------------------------------------
# Whole-word scores: comparable between tokenizations of the same text.


def whole_word_rows(tokenizer, texts: Sequence[str], seq_len: int, *, rate: float = 0.15,
                    seed: int = 0, words_per_row: int = 0,
                    skip: frozenset = frozenset()) -> dict[str, Any]:
  """Returns rows with a fixed set of whole words masked, the same words whatever the tokenizer.

  Each text's whitespace-separated words are cut into windows of words_per_row words (0:
  seq_len // 8, room for 8 pieces per word), one row each ([CLS] pieces [SEP]); a window whose
  pieces do not fit is dropped (listed in `dropped` as (text, first word)), and so is every
  window in `skip` (pass the union of several tokenizers' `dropped` to score the same words).
  Word j of text i is chosen when a blake2b hash of (seed, i, j) read as a uniform number is below
  `rate`, and every piece of a chosen word becomes [MASK]. Returns tokens, inputs, word (chosen
  word index or -1), all (N, L) int32, per chosen word its characters, and `dropped`.
  """
  per_row = words_per_row or max(seq_len // 8, 1)
  rows, words_of, chars, dropped = [], [], [], set()
  for i, text in enumerate(texts):
    words = text.split()
    pieces = tokenizer.encode_batch(words) if words else []
    for lo in range(0, len(words), per_row):
      if (i, lo) in skip:
        continue
      ids = [tokenizer.cls_id]
      marks = [-1]
      window = []
      for j in range(lo, min(lo + per_row, len(words))):
        digest = hashlib.blake2b(f'{seed}:{i}:{j}'.encode(), digest_size=8).digest()
        chosen = int.from_bytes(digest, 'big') / 2.0**64 < rate and bool(pieces[j])
        window.append(len(words[j]) if chosen else 0)
        ids += pieces[j]
        marks += [len(window) - 1 if chosen else -1] * len(pieces[j])
      if len(ids) + 1 > seq_len:
        dropped.add((i, lo))
        continue
      row_chars = [c for c in window if c]
      index = {k: len(chars) + n for n, k in enumerate(k for k, c in enumerate(window) if c)}
      chars += row_chars
      rows.append(ids + [tokenizer.sep_id] + [tokenizer.pad_id] * (seq_len - len(ids) - 1))
      words_of.append([index[m] if m >= 0 else -1 for m in marks] + [-1] * (seq_len - len(marks)))
  tokens = np.array(rows, np.int32).reshape(-1, seq_len)
  word = np.array(words_of, np.int32).reshape(-1, seq_len)
  inputs = np.where(word >= 0, tokenizer.mask_id, tokens).astype(np.int32)
  return {'tokens': tokens, 'inputs': inputs, 'word': word, 'chars': np.array(chars, np.int64),
          'dropped': dropped}


def whole_word_scores(graphdef, params, tokenizer, texts: Sequence[str], *, seq_len: int,
                      rate: float = 0.15, seed: int = 0, batch_size: int = 32,
                      words_per_row: int = 0, skip: frozenset = frozenset()) -> dict[str, float]:
  """Returns nats per character and per word and whole-word accuracy at whole-word masks.

  A chosen word's score is the sum over its pieces of -log p(piece) with all its pieces masked at
  once; it is right when every piece is the argmax. Per character of the chosen words, the figure
  compares models whose tokenizers cut the same words differently.
  """
  data = whole_word_rows(tokenizer, texts, seq_len, rate=rate, seed=seed,
                         words_per_row=words_per_row, skip=skip)

  @jax.jit
  def piece_scores(p, tokens, inputs):
    position_ids, doc_ids = model_lib.packed_layout(tokens, cls_id=tokenizer.cls_id,
                                                    pad_id=tokenizer.pad_id)
    logits = nnx.merge(graphdef, p).dense_logits(inputs, position_ids=position_ids,
                                                 doc_ids=doc_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1) == tokens

  n = len(data['tokens'])
  nll = np.zeros(data['tokens'].shape, np.float64)
  right = np.zeros(data['tokens'].shape, bool)
  for s in range(0, n, batch_size):
    rows = slice(s, min(s + batch_size, n))
    pad = batch_size - (rows.stop - rows.start)
    t = np.pad(data['tokens'][rows], ((0, pad), (0, 0)), constant_values=tokenizer.pad_id)
    x = np.pad(data['inputs'][rows], ((0, pad), (0, 0)), constant_values=tokenizer.pad_id)
    a, b = jax.device_get(piece_scores(params, jnp.asarray(t), jnp.asarray(x)))
    nll[rows], right[rows] = a[:batch_size - pad], b[:batch_size - pad]
  w = data['word']
  chosen = w >= 0
  words = len(data['chars'])
  word_nll = np.bincount(w[chosen], weights=nll[chosen], minlength=words)
  word_wrong = np.bincount(w[chosen], weights=~right[chosen], minlength=words)
  chars = int(data['chars'].sum())
  return {'words': words, 'chars': chars, 'dropped_rows': len(data['dropped']),
          'pieces_per_word': float(chosen.sum() / max(words, 1)),
          'nats_per_char': float(word_nll.sum() / max(chars, 1)),
          'nats_per_word': float(word_nll.sum() / max(words, 1)),
          'word_accuracy': float((word_wrong == 0).mean()) if words else float('nan')}
