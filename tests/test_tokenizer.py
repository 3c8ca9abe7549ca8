"""Tests for mlmjax.tokenizer: training, special ids, round trips, word starts, errors."""

import hashlib
import io
import pickle

import numpy as np
import pytest
import sentencepiece as spm
from pydoc_data.topics import topics

from mlmjax import tokenizer as tok_lib
from mlmjax.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID, SPECIAL_PIECES

VOCAB = 1000
# Non-ASCII the pydoc text never shows: byte fallback must carry it through unchanged.
UNUSUAL = [
    'Emoji 😀🎉 and CJK 日本語のテキスト 中文 한국어 in one line.',
    'Ünïcödé àçcents, Ελληνικά, русский, العربية, עברית '
    '— “quotes” … ½ ﬁ ™.',
    'Whitespace\tof\u00a0several\u3000kinds\r\nand  runs   of spaces ',
    'Combining marks: e\u0301 a\u0308, zero-width\u200bjoiner, emoji ZWJ 👩\u200d💻.',
]


def normalize_ws(text: str) -> str:
  """Returns text with whitespace normalized the way the tokenizer does."""
  return ' '.join(text.split())


@pytest.fixture(scope='module')
def pydocs():
  """Returns the Python help topics (~460 KB of text every Python ships)."""
  return list(topics.values())


@pytest.fixture(scope='module')
def unigram(pydocs, tmp_path_factory):
  """Returns a small unigram tokenizer trained on the pydoc topics."""
  path = tmp_path_factory.mktemp('tok') / 'unigram.model'
  return tok_lib.train_tokenizer(pydocs, path, vocab_size=VOCAB)


def _lines(docs):
  return [line for doc in docs for line in doc.split('\n') if line.strip()]


def test_special_ids_are_fixed(unigram):
  assert (PAD_ID, tok_lib.UNK_ID, CLS_ID, SEP_ID, MASK_ID) == (0, 1, 2, 3, 4)
  assert unigram.vocab_size == VOCAB
  for i, piece in enumerate(SPECIAL_PIECES):
    assert unigram.id_to_piece(i) == piece
    assert unigram.piece_to_id(piece) == i


def test_model_file_and_fingerprint(unigram):
  data = open(unigram.model_path, 'rb').read()
  assert data == unigram.serialized_model
  assert unigram.fingerprint == hashlib.sha256(data).hexdigest()
  loaded = tok_lib.Tokenizer.load(unigram.model_path)
  assert loaded.fingerprint == unigram.fingerprint
  text = 'Loaded models encode exactly like trained ones.'
  assert loaded.encode(text) == unigram.encode(text)


def test_training_is_deterministic(pydocs, unigram, tmp_path):
  again = tok_lib.train_tokenizer(pydocs, tmp_path / 'again.model', vocab_size=VOCAB)
  assert again.serialized_model == unigram.serialized_model


def test_round_trip_pydocs_and_non_ascii(pydocs, unigram):
  texts = _lines(pydocs)[::7] + UNUSUAL
  for text, ids in zip(texts, unigram.encode_batch(texts)):
    assert unigram.decode(ids) == normalize_ws(text), text


def test_plain_text_never_gives_special_ids(pydocs, unigram):
  ids = np.concatenate([np.array(i, dtype=np.int64) for i in unigram.encode_batch(pydocs + UNUSUAL)])
  assert ids.size > 50_000
  assert ids.min() >= NUM_SPECIAL
  assert ids.max() < VOCAB


def test_encode_batch_matches_encode(pydocs, unigram):
  texts = pydocs[:20]
  assert unigram.encode_batch(texts) == [unigram.encode(t) for t in texts]


def test_literal_specials_policy(unigram):
  text = 'The [MASK] sat on the mat.'
  plain = unigram.encode(text)
  # Control symbols: plain text never yields special ids, the literal is ordinary text.
  assert min(plain) >= NUM_SPECIAL
  assert unigram.decode(plain) == text
  # encode_with_specials: the literal becomes MASK_ID, the words around it encode as on their own.
  special = unigram.encode_with_specials(text)
  assert special == unigram.encode('The') + [MASK_ID] + unigram.encode(' sat on the mat.')
  for literal, i in (('[CLS]', CLS_ID), ('[SEP]', SEP_ID)):
    got = unigram.encode_with_specials(f'{literal} Two words {literal}')
    assert got == [i] + unigram.encode('Two words') + [i]
  glued = unigram.encode_with_specials('un[MASK]able')
  assert glued == unigram.encode('un') + [MASK_ID] + unigram.encode('able')
  assert unigram.encode_with_specials(UNUSUAL[0]) == unigram.encode(UNUSUAL[0])


def test_decode_drops_pad_and_writes_specials(unigram):
  body = unigram.encode('Hello world')
  ids = [CLS_ID] + body + [MASK_ID, SEP_ID] + [PAD_ID] * 5
  assert unigram.decode(ids) == '[CLS] Hello world [MASK] [SEP]'
  assert unigram.decode(np.array(ids, dtype=np.int32)) == unigram.decode(ids)


def test_word_starts_count_words(pydocs, unigram):
  table = unigram.word_start_table
  assert table.shape == (VOCAB,) and table.dtype == bool
  assert table[:NUM_SPECIAL].all()
  for i in range(NUM_SPECIAL, VOCAB):
    piece = unigram.id_to_piece(i)
    if piece.startswith('<0x') and piece.endswith('>') and len(piece) == 6:
      assert not table[i], piece  # byte pieces continue a word
    else:
      assert table[i] == piece.startswith('\u2581'), piece
  # Every whitespace-separated word has exactly one word-start piece, non-ASCII words included.
  for text in _lines(pydocs)[::11] + UNUSUAL:
    ids = unigram.encode(text)
    flags = unigram.word_starts(ids)
    assert flags.shape == (len(ids),)
    assert flags.sum() == len(text.split()), text
    assert flags[0]
  batch = np.array([[CLS_ID, 10, 20], [PAD_ID, MASK_ID, 30]])
  assert unigram.word_starts(batch).shape == batch.shape


def test_long_lines_are_used_for_training(pydocs, tmp_path):
  # One line of ~450 k characters, like a State of the Union address: sentencepiece alone drops
  # lines over 4192 bytes and would then have nothing to learn from.
  one_line = ' '.join(' '.join(pydocs).split())
  tok = tok_lib.train_tokenizer([one_line], tmp_path / 'long.model', vocab_size=VOCAB)
  sample = normalize_ws(pydocs[3])
  ids = tok.encode(sample)
  assert tok.decode(ids) == sample
  # Real subword pieces were learned: far fewer pieces than characters.
  assert len(ids) < 0.5 * len(sample)


def test_max_sentences_subsample_is_seeded(pydocs, tmp_path):
  a = tok_lib.train_tokenizer(pydocs, tmp_path / 'a.model', vocab_size=600, max_sentences=2000,
                              seed=1)
  b = tok_lib.train_tokenizer(pydocs, tmp_path / 'b.model', vocab_size=600, max_sentences=2000,
                              seed=1)
  c = tok_lib.train_tokenizer(pydocs, tmp_path / 'c.model', vocab_size=600, max_sentences=2000,
                              seed=2)
  assert a.fingerprint == b.fingerprint
  assert a.fingerprint != c.fingerprint


def test_bpe(pydocs, tmp_path):
  tok = tok_lib.train_tokenizer(pydocs, tmp_path / 'bpe.model', vocab_size=VOCAB, model_type='bpe')
  assert tuple(tok.id_to_piece(i) for i in range(NUM_SPECIAL)) == SPECIAL_PIECES
  texts = _lines(pydocs)[::13] + UNUSUAL
  for text in texts:
    ids = tok.encode(text)
    assert min(ids) >= NUM_SPECIAL
    assert tok.decode(ids) == normalize_ws(text)
    assert tok.word_starts(ids).sum() == len(text.split())


def test_bad_model_type(pydocs, tmp_path):
  with pytest.raises(ValueError, match='tokenizer.model_type'):
    tok_lib.train_tokenizer(pydocs[:3], tmp_path / 'x.model', model_type='wordpiece')


def test_vocab_too_large_is_clear_and_writes_nothing(pydocs, tmp_path):
  path = tmp_path / 'big.model'
  with pytest.raises(ValueError, match=r'tokenizer\.vocab_size=50000.*at most \d+'):
    tok_lib.train_tokenizer(pydocs[:2], path, vocab_size=50_000)
  assert not path.exists()
  assert list(tmp_path.iterdir()) == []  # no half-written temporary file either
  with pytest.raises(ValueError, match='tokenizer.vocab_size'):
    tok_lib.train_tokenizer(pydocs[:2], path, vocab_size=100)


def test_load_rejects_wrong_special_ids(pydocs, tmp_path):
  # A sentencepiece model with its default ids (<unk>=0, <s>=1, </s>=2).
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_lines(pydocs[:20])), model_writer=buf,
                                 vocab_size=300, minloglevel=2)
  path = tmp_path / 'foreign.model'
  path.write_bytes(buf.getvalue())
  with pytest.raises(ValueError, match='foreign.model'):
    tok_lib.Tokenizer.load(path)


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.model'):
    tok_lib.Tokenizer.load(tmp_path / 'missing.model')
  junk = tmp_path / 'junk.model'
  junk.write_bytes(b'this is not a protobuf')
  with pytest.raises(ValueError, match='junk.model'):
    tok_lib.Tokenizer.load(junk)


def test_pickle_round_trip(unigram):
  again = pickle.loads(pickle.dumps(unigram))
  assert again.fingerprint == unigram.fingerprint
  assert again.model_path == unigram.model_path
  assert again.encode(UNUSUAL[1]) == unigram.encode(UNUSUAL[1])
  np.testing.assert_array_equal(again.word_start_table, unigram.word_start_table)


def _read_head(path, num_bytes, skip=0):
  """Returns num_bytes of UTF-8 text from `path` after skipping `skip` bytes."""
  with open(path, 'rb') as f:
    f.seek(skip)
    return f.read(num_bytes).decode('utf-8', errors='ignore')


@pytest.fixture
def real_text(shared_data):
  """Returns (training documents, held-out lines) from the general pretraining texts."""
  general = shared_data / 'pretrain' / 'general'
  train, held_out = [], []
  for name in ['austen.txt', 'enwiki_106_articles.txt', 'moby_dick.txt', 'sotu.txt']:
    train += [d for d in _read_head(general / name, 350_000).split('\n\n') if d.strip()]
    # 40 KB from far past the training part: whole lines, or whole sentences of one long line.
    chunk = _read_head(general / name, 40_000, skip=1_000_000)
    lines = chunk.split('\n')[1:-1] or chunk.split('. ')[1:-1]
    held_out += [line for line in lines if line.strip()]
  return train, held_out


@pytest.mark.slow
def test_real_text(real_text, tmp_path):
  train, held_out = real_text
  assert sum(map(len, train)) > 1_000_000
  tok = tok_lib.train_tokenizer(train, tmp_path / 'real.model', vocab_size=2000)
  texts = held_out + UNUSUAL
  words = pieces = 0
  for text, ids in zip(texts, tok.encode_batch(texts)):
    assert min(ids) >= NUM_SPECIAL, text
    assert tok.decode(ids) == normalize_ws(text), text
    assert tok.word_starts(ids).sum() == len(text.split()), text
    words += len(text.split())
    pieces += len(ids)
  # A 2000-piece vocabulary on held-out English (punctuation and wiki markup included) needs about
  # 2 pieces per word; characters or byte fallback would need more than 5.
  assert 1.0 < pieces / words < 2.5
