"""Hard mismatches for paraphrase pairs: per item, the most word-overlapping item of its group.

task_data.paraphrase_pairs ('pairs:FILE') pairs each KJV verse with the WEB text of the verse of
its chapter chosen here. Pure numpy on the texts: no random state.
"""

import collections
import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r'\w+')


def hard_mismatches(groups: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
  """Returns int64 (N,): per item i the index j of its mismatch's b, or -1 when its group has none.

  j is in i's group, j's b shares the largest fraction of words with i's a (Jaccard of the
  lowercased \\w+ word sets), ties going to the nearer item (by position in the group), then the
  earlier one; an item whose a or b text equals i's (a verbatim repeat) is never chosen.
  """
  vocab: dict[str, int] = {}

  def word_ids(text: str) -> np.ndarray:
    return np.array([vocab.setdefault(w, len(vocab)) for w in set(_WORD.findall(text.lower()))],
                    np.int64)

  a_words, b_words = [word_ids(t) for t in a], [word_ids(t) for t in b]
  a_ids, b_ids = np.array(_text_ids(a)), np.array(_text_ids(b))
  partner = np.full(len(groups), -1, np.int64)
  members: dict[str, list[int]] = collections.defaultdict(list)
  for i, g in enumerate(groups):
    members[g].append(i)
  for idx in members.values():
    idx = np.asarray(idx)
    partner[idx] = _hardest_mismatch([a_words[i] for i in idx], [b_words[i] for i in idx],
                                     a_ids[idx], b_ids[idx], idx)
  return partner


def _hardest_mismatch(a_words: list[np.ndarray], b_words: list[np.ndarray], a_ids: np.ndarray,
                      b_ids: np.ndarray, index: np.ndarray) -> np.ndarray:
  """Returns per item of one group the index of its mismatch's b (hard_mismatches), or -1."""
  k = len(index)
  local, inverse = np.unique(np.concatenate(a_words + b_words), return_inverse=True)
  sizes = [len(w) for w in a_words + b_words]
  rows = np.repeat(np.arange(2 * k), sizes)
  onehot = np.zeros((2 * k, len(local)), np.float32)
  onehot[rows, inverse] = 1.0
  inter = (onehot[:k] @ onehot[k:].T).astype(np.float64)  # exact word counts
  la, lb = onehot[:k].sum(1), onehot[k:].sum(1)
  jaccard = inter / np.maximum(la[:, None] + lb[None, :] - inter, 1.0)
  # The item itself and verbatim repeats (equal a or equal b text) are no mismatch.
  jaccard[(a_ids[:, None] == a_ids[None, :]) | (b_ids[:, None] == b_ids[None, :])] = -1.0
  pos = np.arange(k)
  distance = np.abs(pos[:, None] - pos[None, :])
  # Per row: the largest overlap, then the nearest item, then the earlier one.
  best = np.lexsort((np.broadcast_to(pos, (k, k)), distance, -jaccard), axis=-1)[:, 0]
  return np.where(jaccard[pos, best] >= 0, index[best], -1)


def _text_ids(texts: Sequence[str]) -> list[int]:
  """Returns each text's index among the distinct texts (equal texts share one)."""
  ids: dict[str, int] = {}
  return [ids.setdefault(t, len(ids)) for t in texts]
