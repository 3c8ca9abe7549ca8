"""PMI n-gram vocabulary for PMI masking (Levine et al., 2021), built once from training rows."""

import hashlib
import itertools
import os
import pathlib
from typing import Any, Callable

import numpy as np

from mlmjax import masking

FORMAT = 1  # bump when the vocabulary file layout or the scoring changes


def _ngrams(rows: np.ndarray, regular: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns ((M, n) int32 n-grams of regular tokens inside rows, (M,) uint64 keys)."""
  length = rows.shape[1]
  if n > length:
    return np.zeros((0, n), np.int32), np.zeros(0, np.uint64)
  cols = [rows[:, i:length - n + 1 + i].reshape(-1) for i in range(n)]
  inside = np.ones_like(cols[0], dtype=bool)
  for i in range(n):
    inside &= regular[rows[:, i:length - n + 1 + i].reshape(-1)]
  grams = np.stack([c[inside] for c in cols], axis=1).astype(np.int32)
  return grams, _keys([grams[:, i] for i in range(n)])


def _keys(columns: list[np.ndarray]) -> np.ndarray:
  """Returns uint64 keys joining the two 32-bit hashes that masking matches on."""
  h1, h2 = masking.ngram_hashes(columns, xp=np)
  return (h1.astype(np.uint64) << np.uint64(32)) | h2.astype(np.uint64)


def _compositions(n: int) -> list[tuple[int, ...]]:
  """Returns every split of n into at least 2 ordered positive parts."""
  out = []
  for cuts in itertools.product((False, True), repeat=n - 1):
    if any(cuts):
      parts, size = [], 1
      for cut in cuts:
        if cut:
          parts.append(size)
          size = 1
        else:
          size += 1
      out.append((*parts, size))
  return out


def build_pmi_vocab(rows: np.ndarray, special_mask: np.ndarray, *, max_n: int = masking.PMI_MAX_N,
                    min_count: int = 10, size: int = 10_000) -> dict[str, np.ndarray]:
  """Returns the n-grams (n = 2..max_n) with the highest PMI_n, with their hashes, scores, counts.

  PMI_n(w) = log p(w) - max over splits of w into >= 2 contiguous parts of sum log p(part): an
  n-gram scores high only when no split of it explains its frequency. Counts come from windows of
  regular tokens inside packed rows (never across [CLS]/[SEP]/padding); p = count / regular tokens.
  The vocabulary gives each n an equal share of `size`, passing unused shares on to other n.
  """
  if max_n > masking.PMI_MAX_N:
    raise ValueError(f'PMI n-grams are at most {masking.PMI_MAX_N} tokens; got max_n={max_n}')
  regular = ~np.asarray(special_mask, dtype=bool)
  rows = np.asarray(rows)
  total = float(regular[rows].sum())
  if total == 0:
    raise ValueError('the token cache holds no regular tokens to count n-grams in')
  tables = {}  # n -> (sorted unique keys, counts, first-occurrence n-grams)
  for n in range(1, max_n + 1):
    grams, keys = _ngrams(rows, regular, n)
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    tables[n] = (uniq, counts, grams[first])

  def log_p(n: int, grams: np.ndarray) -> np.ndarray:
    uniq, counts, _ = tables[n]
    at = np.searchsorted(uniq, _keys([grams[:, i] for i in range(n)]))
    return np.log(counts[at] / total)  # every part of a counted n-gram was counted too

  scored = {}
  for n in range(2, max_n + 1):
    uniq, counts, grams = tables[n]
    keep = counts >= min_count
    grams, counts = grams[keep], counts[keep]
    best_split = np.full(len(grams), -np.inf)
    for parts in _compositions(n):
      total_lp, at = np.zeros(len(grams)), 0
      for part in parts:
        total_lp += log_p(part, grams[:, at:at + part])
        at += part
      best_split = np.maximum(best_split, total_lp)
    score = np.log(counts / total) - best_split
    positive = score > 0
    order = np.argsort(-score[positive], kind='stable')
    scored[n] = (grams[positive][order], score[positive][order], counts[positive][order])

  quota, chosen = {n: 0 for n in scored}, 0
  left = size
  while left > 0:  # equal shares; what one n cannot use goes to the others
    open_ns = [n for n in scored if quota[n] < len(scored[n][0])]
    if not open_ns:
      break
    share = max(left // len(open_ns), 1)
    for n in open_ns:
      extra = min(share, len(scored[n][0]) - quota[n], left)
      quota[n] += extra
      left -= extra
  ngrams, scores, counts, lengths = [], [], [], []
  for n, (grams, score, count) in scored.items():
    k = quota[n]
    ngrams.append(np.pad(grams[:k], ((0, 0), (0, masking.PMI_MAX_N - n)), constant_values=-1))
    scores.append(score[:k])
    counts.append(count[:k])
    lengths.append(np.full(k, n, np.int32))
    chosen += k
  ngrams = np.concatenate(ngrams) if ngrams else np.zeros((0, masking.PMI_MAX_N), np.int32)
  lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
  hash1, hash2 = np.zeros(len(ngrams), np.uint32), np.zeros(len(ngrams), np.uint32)
  for n in np.unique(lengths):
    sel = lengths == n
    h1, h2 = masking.ngram_hashes([ngrams[sel, i] for i in range(n)], xp=np)
    hash1[sel], hash2[sel] = h1, h2
  # Sorted by the first hash for searchsorted; of n-grams sharing a first hash, one is kept.
  order = np.argsort(hash1, kind='stable')
  order = order[np.concatenate([[True], np.diff(hash1[order]) != 0])] if len(order) else order
  return {'hash1': hash1[order], 'hash2': hash2[order], 'ngrams': ngrams[order],
          'length': lengths[order], 'score': np.concatenate(scores)[order] if scores else np.zeros(0),
          'count': np.concatenate(counts)[order] if counts else np.zeros(0, np.int64)}


def load_or_build_pmi_vocab(cache_root: str | os.PathLike, cache_key: str, rows: np.ndarray,
                            special_mask: np.ndarray, *, min_count: int, size: int,
                            sample: dict | None = None,
                            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Returns the PMI vocabulary of rows, built once and stored beside the token cache (atomically).

  sample: what rows are (shards.sample_rows's dict); its size and seed are part of the file's key.
  """
  drawn = ''  # every row: the key the vocabulary had before samples
  if sample is not None and sample['rows'] < sample['train_rows']:
    drawn = f'|{sample["rows"]}|{sample["seed"]}'
  digest = hashlib.sha256(f'{FORMAT}|{cache_key}|{min_count}|{size}{drawn}'.encode()).hexdigest()
  path = pathlib.Path(cache_root) / f'pmi-{digest[:16]}.npz'
  if path.exists():
    try:
      with np.load(path) as f:
        return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
      log(f'WARNING: PMI vocabulary {path} is unreadable ({e}); rebuilding it')
  vocab = build_pmi_vocab(rows, special_mask, min_count=min_count, size=size)
  by_n = {int(n): int((vocab['length'] == n).sum()) for n in np.unique(vocab['length'])}
  counted = f'{len(rows):,} rows'
  if sample is not None:
    s = sample
    counted = (f'{s["rows"]:,} of {s["train_rows"]:,} train rows ({100 * s["fraction"]:.1f}%, '
               f'{s["tokens"]:,} tokens, seed {s["seed"]})')
  log(f'PMI vocabulary: {len(vocab["hash1"])} n-grams (by length {by_n}; count >= {min_count}) '
      f'from {counted} -> {path}')
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp.npz')
  np.savez(tmp, **vocab)
  os.replace(tmp, path)
  return vocab
