"""tokenizer.json of mlmjax's sentencepiece tokenizers: the same ids as sentencepiece, on any text."""

import io
import random
import sys

import pytest
import sentencepiece as spm
import tokenizers

from mlmjax import hf_tokenizer
from mlmjax import tokenizer as tok

# Text that trips tokenizers: Unicode whitespace, combining marks after a no-break space, emoji
# sequences, unknown characters (byte fallback), literal pieces ('<0x41>', '[PAD]', '▁'), specials.
AWKWARD = [
    '', ' ', '   a  b   ', 'café', 'cafe\u0301', '\u00a0\u0301x', 'x\u00a0\u0301y', 'naïve Ünïcödé',
    '😀 emoji 👍🏽 family 👨\u200d👩\u200d👧', '\t tabs\tand\nnewlines\r\n here \u3000 ideographic\u2003em',
    '<0x41> literal bytes <0xE2>', '[PAD] literal', '[PAD] [UNK] literal', '中文字符 日本語 한국어', 'ＦＵＬＬ width',
    'ﬁ ligature', 'Ω Å K', '\x00\x01 control \x7f', '\u200b zero\u200bwidth', 'a[MASK]b',
    ' [MASK] ', '[MASK][MASK]', '[CLS]x[SEP]', 'end with space ', '▁ literal meta ▁▁', '▁', 'a▁b',
    '\u0301 starts combining', '\ufeffbom', 'Ελληνικά', 'العربية', 'unknown \U00010348 gothic',
    'mix ½ ² ℃', '\u2028line sep\u2029para', '\x1c\x1d\x1e\x1f seps', '\u0085 nel', 'a\u180eb',
    '[mask] [MASK', 'x\n', 'Return the [MASK] of the list.']


@pytest.fixture(scope='module')
def bpe_tokenizer(tmp_path_factory):
  """Returns a 1,000-piece BPE tokenizer trained on Python's help topics."""
  from pydoc_data.topics import topics
  path = tmp_path_factory.mktemp('bpe') / 'bpe.model'
  return tok.train_tokenizer([topics[k] for k in sorted(topics)], path, vocab_size=1000,
                             model_type='bpe')


@pytest.fixture(params=['unigram', 'bpe'])
def sp_tokenizer(request, topics_tokenizer, bpe_tokenizer):
  """Returns each kind of mlmjax sentencepiece tokenizer."""
  return topics_tokenizer if request.param == 'unigram' else bpe_tokenizer


def as_hf(t) -> tokenizers.Tokenizer:
  return tokenizers.Tokenizer.from_str(hf_tokenizer.sentencepiece_json(t).decode('utf-8'))


def test_charsmap_decodes_to_the_whitespace_rules(topics_tokenizer):
  rules = hf_tokenizer.charsmap_rules(
      hf_tokenizer._proto(topics_tokenizer.serialized_model).normalizer_spec.precompiled_charsmap)
  spaces = {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace() and c != 0x20}
  assert rules == dict.fromkeys(spaces, ' ')


def test_awkward_text_encodes_as_mlmjax(sp_tokenizer):
  h = as_hf(sp_tokenizer)
  chars, literals = hf_tokenizer.inexact(sp_tokenizer)
  if hf_tokenizer.describe(sp_tokenizer) == 'sentencepiece unigram':
    assert not chars and literals == ['[UNK]']  # 'K' is rare in the help topics: no piece alone
  for text in AWKWARD:
    if any(x in text for x in chars + literals):
      continue
    want = [tok.CLS_ID] + sp_tokenizer.encode_with_specials(text) + [tok.SEP_ID]
    assert h.encode(text).ids == want, text
    if '[' not in text:  # encode() reads no specials; a text without them is the same either way
      assert h.encode(text, add_special_tokens=False).ids == sp_tokenizer.encode(text), text
  pair = h.encode('first text', 'second')
  assert pair.ids == ([2] + sp_tokenizer.encode('first text') + [3] + sp_tokenizer.encode('second')
                      + [3])
  assert set(pair.type_ids) == {0}


def test_corpus_lines_encode_as_mlmjax(sp_tokenizer, pydocs):
  lines = [line for doc in pydocs for line in doc.split('\n') if line.strip()]
  lines = random.Random(0).sample(lines, 3000)
  got = [e.ids for e in as_hf(sp_tokenizer).encode_batch(lines, add_special_tokens=False)]
  want = sp_tokenizer.encode_batch(lines)
  differ = [i for i in range(len(lines)) if got[i] != want[i]]
  print(f'{len(differ)} of {len(lines)} lines segmented differently (equal-score ties)')
  for i in differ:  # only where sentencepiece's float32 sums broke an exact tie
    assert (hf_tokenizer.exact_score(sp_tokenizer, got[i])
            == hf_tokenizer.exact_score(sp_tokenizer, want[i])), lines[i]
  assert len(differ) <= len(lines) // 200
  if hf_tokenizer.describe(sp_tokenizer) == 'sentencepiece bpe':
    assert not differ


def test_json_is_deterministic_and_decodes(sp_tokenizer):
  data = hf_tokenizer.sentencepiece_json(sp_tokenizer)
  assert data == hf_tokenizer.sentencepiece_json(tok.Tokenizer(sp_tokenizer.serialized_model))
  h = tokenizers.Tokenizer.from_str(data.decode('utf-8'))
  assert h.get_vocab_size() == sp_tokenizer.vocab_size
  assert [h.id_to_token(i) for i in range(8)] == [sp_tokenizer.id_to_piece(i) for i in range(8)]
  text = 'Return a new event loop, or raise ValueError. café 😀'
  ids = sp_tokenizer.encode(text)
  assert h.decode(ids) == sp_tokenizer.decode(ids) == text


def test_another_normalization_is_refused(tmp_path):
  """A sentencepiece model with a two-character rule (not mlmjax's) is refused, naming rule and file."""
  rules = tmp_path / 'rules.tsv'
  rules.write_text('41 42\t43\n9\t20\n')  # 'AB' -> 'C', tab -> space
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([f'word{i} AB\tWord{i % 7}' for i in range(300)]), model_writer=model,
      vocab_size=30, pad_id=0, pad_piece='[PAD]', unk_id=1, unk_piece='[UNK]', bos_id=-1,
      eos_id=-1, control_symbols=['[CLS]', '[SEP]', '[MASK]'], normalization_rule_tsv=str(rules),
      minloglevel=2)
  t = tok.Tokenizer(model.getvalue(), str(tmp_path / 'ab.model'))
  assert hf_tokenizer.charsmap_rules(hf_tokenizer._proto(
      t.serialized_model).normalizer_spec.precompiled_charsmap) == {'AB': 'C', '\t': ' '}
  with pytest.raises(ValueError, match=r"ab\.model: normalization rule 'AB' -> 'C'"):
    hf_tokenizer.sentencepiece_json(t, t.model_path)
