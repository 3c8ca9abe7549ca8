"""Near-duplicate documents: word n-gram shingles, MinHash, LSH candidates, groups, containment.

A document's shingles are its word n-grams (`data.near_dups.ngram`, 8 by default). Words are runs
of Unicode letters, digits and underscores, lowercased, so edits of whitespace, punctuation and case
do not change them; a document of fewer than n words is one shingle of all its words, and one
without words has none (it is never grouped).

Grouping (before the train/validation split, so a group lands in one split): two documents are
near-duplicates when the MinHash estimate J of the Jaccard similarity of their shingle sets is at
least `data.near_dups.threshold` (0.7), or when the smaller set lies mostly inside the larger one:
|A & B| / min(|A|, |B|), computed from J and the exact set sizes, at least
`data.near_dups.containment` (0.9; a docstring repeated inside a longer one), trusted only where J
is at least half the threshold. Groups are the connected components of that relation.

datasketch's MinHashLSH proposes the candidate pairs from 32 bands of 4 rows and every candidate
is checked on the whole signature: a pair at J = 0.82 is a candidate with probability 1 - 1e-9, at
J = 0.5 with 0.87. Why 0.7: a document sharing 90% of its shingles with another of the same length
has J = 0.9 / 1.1 = 0.82; with 128 permutations the estimate's standard deviation is
sqrt(J (1 - J) / 128) = 0.034, so such a pair is grouped with probability above 0.9999, while a pair
sharing half its shingles (J = 0.33) is 11 deviations below.

Overlap with fine-tuning data (`data.decontaminate`): an evaluation text is contained in a
pretraining document when at least `min_share` of its shingles occur there verbatim; exact sets,
no sketch, because evaluation texts (a verse, a sentence) are short beside pretraining documents
and Jaccard would hide a short text inside a long one.
"""

import dataclasses
import functools
import re
from collections.abc import Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

_WORD = re.compile(r'\w+')
_SEED = 1  # the MinHash permutations: fixed, so groups are a function of the text alone
_ROWS = 4  # rows per LSH band (the module docstring gives the candidate probabilities)
_SCHEME = 'affine32'  # datasketch 2's default: 32-bit values, collision-free permutations


def words(text: str) -> list[str]:
  """Returns the lowercased words of text (runs of letters, digits, underscores)."""
  return _WORD.findall(text.lower())


def shingles(text: str, ngram: int) -> set[str]:
  """Returns the set of word n-grams of text (all its words as one when it has fewer than n)."""
  w = words(text)
  if len(w) < ngram:
    return {' '.join(w)} if w else set()
  return {' '.join(w[i:i + ngram]) for i in range(len(w) - ngram + 1)}


def check(data_cfg) -> None:
  """Raises ValueError naming the data.near_dups / data.decontaminate key that is out of range."""
  for key, value in (('near_dups.threshold', data_cfg.near_dups.threshold),
                     ('decontaminate.min_share', data_cfg.decontaminate.min_share)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
      raise ValueError(f'data.{key}={value!r} must be in [0, 1]'
                       + (' (0 turns grouping off)' if key == 'near_dups.threshold' else ''))
  value = data_cfg.near_dups.containment
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
    raise ValueError(f'data.near_dups.containment={value!r} must be in (0, 1]')
  for key, low in (('ngram', 1), ('num_perm', 16)):
    value = data_cfg.near_dups[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f'data.near_dups.{key}={value!r} must be an integer >= {low}')


def options(cfg) -> dict:
  """Returns group()'s keyword arguments from the data.near_dups section."""
  return {'threshold': float(cfg.threshold), 'containment': float(cfg.containment),
          'ngram': int(cfg.ngram), 'num_perm': int(cfg.num_perm)}


@functools.cache
def _permutations(num_perm: int):
  """Returns the MinHash permutations of (num_perm, _SEED): drawn once, not once per document."""
  return MinHash(num_perm=num_perm, seed=_SEED, scheme=_SCHEME).permutations


def signatures(documents: Sequence[str], ngram: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (N, num_perm) uint32 MinHash signatures and the (N,) shingle counts of documents."""
  sigs = np.zeros((len(documents), num_perm), np.uint32)
  sizes = np.zeros(len(documents), np.int64)
  perms = _permutations(num_perm)
  for i, doc in enumerate(documents):
    s = shingles(doc, ngram)
    if s:
      m = MinHash(num_perm=num_perm, seed=_SEED, scheme=_SCHEME, permutations=perms)
      m.update_batch([x.encode('utf-8') for x in s])
      sigs[i], sizes[i] = m.hashvalues, len(s)
  return sigs, sizes


def _root(parent: np.ndarray, i: int) -> int:
  """Returns the root of i in the union-find forest `parent`, halving the path on the way."""
  while parent[i] != i:
    parent[i] = parent[parent[i]]
    i = parent[i]
  return i


@dataclasses.dataclass
class Groups:
  """Near-duplicate groups of a document list: `of[i]` is the smallest index in i's group."""
  of: np.ndarray
  pairs: int  # candidate pairs judged near-duplicate (a group of k needs k - 1 or more)

  @property
  def sizes(self) -> dict[int, int]:
    """Returns {group id: size} of the groups of two or more documents."""
    ids, counts = np.unique(self.of, return_counts=True)
    return {int(g): int(c) for g, c in zip(ids, counts) if c > 1}

  def stats(self) -> dict:
    """Returns JSON-able counts: groups of 2+, documents in them, the largest group."""
    sizes = self.sizes
    return {'groups': len(sizes), 'documents_in_groups': sum(sizes.values()),
            'largest_group': max(sizes.values(), default=1), 'pairs': self.pairs}


def group(documents: Sequence[str], *, threshold: float, ngram: int = 8, num_perm: int = 128,
          containment: float = 0.9) -> Groups:
  """Returns the near-duplicate groups of documents (every document alone when threshold is 0)."""
  n = len(documents)
  parent = np.arange(n)
  if threshold <= 0 or n < 2:
    return Groups(parent, 0)
  sigs, sizes = signatures(documents, ngram, num_perm)
  perms = _permutations(num_perm)
  lsh = MinHashLSH(num_perm=num_perm, params=(num_perm // _ROWS, _ROWS))
  pairs = 0
  for i in np.flatnonzero(sizes).tolist():
    m = MinHash(seed=_SEED, hashvalues=sigs[i], permutations=perms, scheme=_SCHEME)
    cands = np.fromiter(lsh.query(m), np.int64)  # documents before i whose bands collide with i's
    if cands.size:
      jaccard = np.mean(sigs[cands] == sigs[i], axis=1)
      for j in cands[_near(jaccard, sizes[i], sizes[cands], threshold, containment)].tolist():
        pairs += 1
        a, b = _root(parent, i), _root(parent, j)
        parent[max(a, b)] = min(a, b)
    lsh.insert(i, m, check_duplication=False)
  of = np.array([_root(parent, i) for i in range(n)])
  return Groups(of, pairs)


def _near(jaccard: np.ndarray, size: int, sizes: np.ndarray, threshold: float,
          containment: float) -> np.ndarray:
  """Returns which pairs are near-duplicates: Jaccard, or the smaller set mostly inside the larger."""
  # |A & B| = J (|A| + |B|) / (1 + J); trusted where J is at least half the threshold.
  share = jaccard * (size + sizes) / ((1 + jaccard) * np.minimum(size, sizes))
  return (jaccard >= threshold) | ((jaccard >= threshold / 2) & (share >= containment))


@dataclasses.dataclass
class Containment:
  """Which pretraining documents contain which evaluation texts (share >= min_share)."""
  pairs: np.ndarray  # (K, 2) int64 (document, text) pairs
  num_documents: int
  num_texts: int

  @property
  def documents(self) -> np.ndarray:
    """Returns the (N,) mask of documents that contain some text."""
    mask = np.zeros(self.num_documents, bool)
    mask[self.pairs[:, 0]] = True
    return mask

  def stats(self, texts: slice = slice(None)) -> dict:
    """Returns JSON-able counts, over the texts in the slice `texts` (all by default)."""
    lo, hi, _ = texts.indices(self.num_texts)
    mine = self.pairs[(self.pairs[:, 1] >= lo) & (self.pairs[:, 1] < hi)]
    return {'documents': len(np.unique(mine[:, 0])), 'of_documents': self.num_documents,
            'texts': len(np.unique(mine[:, 1])), 'of_texts': hi - lo}


def contained(documents: Sequence[str], texts: Sequence[str], *, ngram: int = 8,
              min_share: float = 0.5) -> Containment:
  """Returns the (document, text) pairs where the document holds >= min_share of the text's shingles."""
  owners: dict[str, list[int]] = {}
  size = np.zeros(len(texts), np.int64)
  for t, text in enumerate(texts):
    s = shingles(text, ngram)
    size[t] = len(s)
    for x in s:
      owners.setdefault(x, []).append(t)
  pairs = []
  for d, doc in enumerate(documents):
    counts: dict[int, int] = {}
    for x in shingles(doc, ngram):
      for t in owners.get(x, ()):
        counts[t] = counts.get(t, 0) + 1
    pairs += [(d, t) for t, c in sorted(counts.items()) if c >= min_share * size[t]]
  return Containment(np.array(pairs, np.int64).reshape(-1, 2), len(documents), len(texts))


def shared_shingles(train: Sequence[str], val: Sequence[str], ngram: int = 8) -> dict:
  """Returns how much of val's text occurs in train: shingles, and documents >= 90% inside."""
  seen: set[str] = set()
  for doc in train:
    seen.update(shingles(doc, ngram))
  total = inside = mostly = 0
  for doc in val:
    s = shingles(doc, ngram)
    k = len(s & seen)
    total, inside = total + len(s), inside + k
    mostly += bool(s) and k >= 0.9 * len(s)
  return {'val_shingles': total, 'in_train': inside, 'share': inside / total if total else 0.0,
          'val_documents': len(val), 'documents_90pct_in_train': mostly}
