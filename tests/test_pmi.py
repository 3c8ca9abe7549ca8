"""Tests of mlmjax/pmi.py's stored vocabulary: its key names the sample it was counted from."""

import numpy as np

from mlmjax import pmi
from mlmjax import tokenizer as tok

VOCAB = 40


def _rows(seed: int, n: int = 200) -> np.ndarray:
  """Returns rows of regular ids where '7 8 9' recurs, so some n-grams score."""
  rows = np.random.default_rng(seed).integers(tok.NUM_SPECIAL, VOCAB, size=(n, 24)).astype(np.int32)
  rows[:, 3:6] = [7, 8, 9]
  rows[:, 0] = tok.CLS_ID
  return rows


def _special() -> np.ndarray:
  return np.arange(VOCAB) < tok.NUM_SPECIAL


def _sample(rows: int, seed: int, of: int = 1_000) -> dict:
  return {'rows': rows, 'tokens': rows * 23, 'train_rows': of, 'fraction': rows / of, 'seed': seed}


def test_the_vocabulary_is_stored_under_its_samples_size_and_seed(tmp_path):
  rows = _rows(0)
  lines = []

  def build(sample, rows=rows):
    return pmi.load_or_build_pmi_vocab(tmp_path, 'cache-key', rows, _special(), min_count=5,
                                       size=50, sample=sample, log=lines.append)

  vocab = build(_sample(200, 0))
  direct = pmi.build_pmi_vocab(rows, _special(), min_count=5, size=50)
  assert len(vocab['hash1']) > 0
  for k, v in direct.items():
    np.testing.assert_array_equal(vocab[k], v)
  assert 'from 200 of 1,000 train rows (20.0%, 4,600 tokens, seed 0) -> ' in lines[0]
  assert len(list(tmp_path.glob('pmi-*.npz'))) == 1
  build(_sample(200, 0), _rows(1))  # the same sample's key: read back, not counted again
  assert len(lines) == 1
  build(_sample(200, 1), _rows(1))  # another seed
  build(_sample(300, 0), _rows(1, 300))  # another size
  assert len(lines) == 3 and len(list(tmp_path.glob('pmi-*.npz'))) == 3
  # Every row: the key of a vocabulary counted before samples existed (whatever the seed).
  build(_sample(1_000, 5, of=1_000), _rows(2))
  assert len(lines) == 4
  build(None, _rows(2))
  assert len(lines) == 4 and len(list(tmp_path.glob('pmi-*.npz'))) == 4
