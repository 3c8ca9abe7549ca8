"""mlmjax's sentencepiece tokenizer as a Hugging Face tokenizer.json that encodes as it does.

Built with the `tokenizers` library from the model's own pieces, scores and normalization rules:

- Normalization: sentencepiece applies its character map (longest match, per code point here),
  drops leading spaces, collapses space runs, prepends one '▁' (the dummy prefix), writes spaces
  as '▁' and drops trailing '▁'s (literal ones too). The map is decoded from the model's
  precompiled charsmap into Replace rules: the `Precompiled` normalizer of `tokenizers` maps a
  whole grapheme by its first code point's rule (a no-break space followed by a combining accent
  loses the accent), which sentencepiece does not.
- No pre-tokenizer: the model sees the whole normalized text, as sentencepiece's does.
- Unigram: every piece with its score; control, unknown and byte pieces (never produced from text
  by sentencepiece) get a score below any path through single characters, so a literal '<0x41>'
  in text is tokenized as text. The one difference left: where two segmentations have exactly
  equal scores (the same pieces in another order, as in runs like '=========='), sentencepiece's
  float32 sums round one ahead and tokenizers' float64 sums keep the tie, taking the first
  found; `exact_score` shows such pairs are ties. BPE: sentencepiece merges the adjacent pair
  whose joined piece scores highest, leftmost first; the merges list is every pair of pieces
  joining into a piece, ranked by that piece's score (no ties, no difference measured).
- Specials: '[CLS]', '[SEP]', '[MASK]' are matched in raw text as `encode_with_specials` does
  (each text between them is encoded on its own). A text becomes [CLS] ids [SEP], the rows
  mlmjax's tasks and fill-mask build; a pair [CLS] A [SEP] B [SEP], all type id 0 (mlmjax never
  trains type 1). tokenizer.json matches '[PAD]' and '[UNK]' nowhere, but transformers matches
  the declared pad_token in text (see config_files).

Outside the tokenizer, and so outside tokenizer.json: corpus cleaning (`corpus.clean_document`:
ftfy repair, NFC, control characters), which mlmjax applies to text before tokenizing it.
"""

import fractions
import json
import struct

import numpy as np
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import decoders, models, normalizers, processors

from mlmjax import tokenizer as tok

_META = '\u2581'
# sentencepiece ModelProto.SentencePiece.Type and TrainerSpec.ModelType values.
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6
_UNIGRAM, _BPE = 1, 2
# The specials read in text, as encode_with_specials reads them.
TEXT_SPECIALS = ('[CLS]', '[SEP]', '[MASK]')


def _proto(serialized: bytes) -> sentencepiece_model_pb2.ModelProto:
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(serialized)
  return proto


def charsmap_rules(charsmap: bytes) -> dict[str, str]:
  """Returns {source text: replacement} of a sentencepiece precompiled charsmap ({} when empty).

  The blob is a little-endian uint32 trie size, a darts-clone double array of uint32 units whose
  leaf values index the null-terminated replacements that follow it.
  """
  if not charsmap:
    return {}
  (size,) = struct.unpack_from('<I', charsmap, 0)
  units = np.frombuffer(charsmap, '<u4', size // 4, 4).astype(np.int64)
  pool = charsmap[4 + size:]
  labels = np.arange(1, 256)

  def offset(u):
    return (u >> 10) << ((u & (1 << 9)) >> 6)

  rules, stack = {}, [(0, b'')]
  while stack:
    pos, key = stack.pop()
    unit = int(units[pos])
    base = pos ^ offset(unit)
    if (unit >> 8) & 1:  # has a leaf: the value sits at base (label 0)
      value = int(units[base]) & ((1 << 31) - 1)
      rules[key.decode('utf-8')] = pool[value:pool.index(b'\0', value)].decode('utf-8')
    children = base ^ labels
    ok = children < len(units)
    found = labels[ok][(units[children[ok]] & ((1 << 31) | 0xFF)) == labels[ok]]
    stack += [(base ^ int(c), key + bytes([int(c)])) for c in found]
  return rules


def _char_class(chars) -> str:
  """Returns an Oniguruma character class matching exactly the given code points."""
  points = sorted(ord(c) for c in chars)
  ranges, start = [], points[0]
  for prev, cur in zip(points, points[1:] + [None]):
    if cur != prev + 1:
      ranges.append(f'\\x{{{start:X}}}' if start == prev else f'\\x{{{start:X}}}-\\x{{{prev:X}}}')
      start = cur
  return '[' + ''.join(ranges) + ']'


def _normalizer(proto, where: str):
  """Returns the tokenizers normalizer doing what the model's sentencepiece normalizer does."""
  spec = proto.normalizer_spec
  if not (spec.add_dummy_prefix and spec.remove_extra_whitespaces and spec.escape_whitespaces
          and not proto.trainer_spec.treat_whitespace_as_suffix):
    raise ValueError(f'{where}: normalizer_spec differs from mlmjax\'s (dummy prefix, extra '
                     'whitespace removal, escaped spaces): no exact tokenizer.json for it')
  rules = charsmap_rules(spec.precompiled_charsmap)
  by_output: dict[str, list[str]] = {}
  for src, dst in rules.items():
    if len(src) != 1 or '  ' in dst or any(c in rules for c in dst):
      raise ValueError(f'{where}: normalization rule {src!r} -> {dst!r} is not a one-character '
                       'rule without chains; its tokenizer.json would not encode exactly')
    by_output.setdefault(dst, []).append(src)
  steps = [normalizers.Replace(tokenizers.Regex(_char_class(srcs)), dst)
           for dst, srcs in sorted(by_output.items())]
  steps += [normalizers.Replace(tokenizers.Regex(' {2,}'), ' '),
            normalizers.Replace(tokenizers.Regex('\\A '), ''),
            normalizers.Replace(' ', _META),
            normalizers.Prepend(_META),  # leaves an empty text empty
            normalizers.Replace(tokenizers.Regex(_META + '+\\z'), '')]
  return normalizers.Sequence(steps)


def _inexact(proto) -> tuple[list[str], list[str]]:
  """Returns (characters, literal texts) on which a Unigram tokenizer.json may differ (see inexact)."""
  if proto.trainer_spec.model_type != _UNIGRAM:
    return [], []
  singles = {p.piece for p in proto.pieces if p.type == _NORMAL and len(p.piece) == 1}
  chars = sorted({c for p in proto.pieces if p.type == _NORMAL for c in p.piece} - singles)
  literals = [p.piece for p in proto.pieces if p.type != _NORMAL and p.piece not in TEXT_SPECIALS
              and any(c not in singles for c in p.piece)]
  return chars, literals


def inexact(tokenizer) -> tuple[list[str], list[str]]:
  """Returns (characters, literal texts): where tokenizer.json may segment a text otherwise.

  tokenizers scores an unknown character min(scores) - 10, sentencepiece min(text scores) - 10,
  and non-text pieces ('[UNK]', '<0x41>') stay unreachable only while their characters are
  pieces. sentencepiece's trainer keeps every character of its pieces as a piece, so for its
  models both lists are empty but for characters its coverage left out (e.g. a rare capital);
  a vocabulary extension may add pieces holding characters the base lacks.
  """
  return _inexact(_proto(tokenizer.serialized_model))


def _unigram(proto, where: str, log):
  """Returns the Unigram model: sentencepiece's pieces and scores, unreachable non-text pieces."""
  normal = [p for p in proto.pieces if p.type == _NORMAL]
  low = min(p.score for p in normal)
  # Below the sum of any non-text piece's characters' single-piece scores, so that spelling it
  # out always wins over the piece itself.
  longest = max(len(p.piece) for p in proto.pieces if p.type != _NORMAL)
  unreachable = (longest + 1) * low - 10.0
  chars, literals = _inexact(proto)
  parts = ([f'text holding {", ".join(map(repr, chars[:5]))} (in pieces, no piece alone)']
           if chars else []) + ([f'the literal text {", ".join(map(repr, literals[:5]))}']
                                if literals else [])
  if parts:
    log(f'WARNING: {where}: tokenizer.json may segment {" or ".join(parts)} otherwise than '
        'sentencepiece')
  vocab = [(p.piece, p.score if p.type == _NORMAL else unreachable) for p in proto.pieces]
  return models.Unigram(vocab, unk_id=tok.UNK_ID, byte_fallback=proto.trainer_spec.byte_fallback)


def _bpe(proto):
  """Returns the BPE model: merges ranked by the joined piece's score, as sentencepiece merges."""
  ids = {p.piece: i for i, p in enumerate(proto.pieces)}
  score = {p.piece: p.score for p in proto.pieces if p.type == _NORMAL}
  merges = []
  for piece, s in score.items():
    for k in range(1, len(piece)):
      a, b = piece[:k], piece[k:]
      if a in score and b in score:
        merges.append((-s, ids[piece], ids[a], a, b))
  merges.sort()
  return models.BPE({p.piece: i for i, p in enumerate(proto.pieces)}, [(a, b) for *_, a, b in merges],
                    unk_token=tok.SPECIAL_PIECES[tok.UNK_ID],
                    byte_fallback=proto.trainer_spec.byte_fallback)


def sentencepiece_json(tokenizer, where: str = 'tokenizer.model', log=print) -> bytes:
  """Returns the tokenizer.json bytes (sorted keys, deterministic) of an mlmjax sentencepiece Tokenizer."""
  proto = _proto(tokenizer.serialized_model)
  for p in proto.pieces:
    if p.type not in (_NORMAL, _UNKNOWN, _CONTROL, _BYTE):
      raise ValueError(f'{where}: piece {p.piece!r} has sentencepiece type {p.type} '
                       '(user-defined or unused); mlmjax models have none')
  normalizer = _normalizer(proto, where)
  kind = proto.trainer_spec.model_type
  if kind == _UNIGRAM:
    t = tokenizers.Tokenizer(_unigram(proto, where, log))
  elif kind == _BPE:
    t = tokenizers.Tokenizer(_bpe(proto))
  else:
    raise ValueError(f'{where}: sentencepiece model_type {kind} is not unigram or bpe')
  t.normalizer = normalizer
  t.decoder = decoders.Sequence([decoders.Replace(_META, ' '), decoders.ByteFallback(),
                                 decoders.Fuse(), decoders.Strip(' ', 1, 0)])
  t.add_special_tokens([tokenizers.AddedToken(p, special=True, normalized=False)
                        for p in TEXT_SPECIALS])
  cls, sep = tok.SPECIAL_PIECES[tok.CLS_ID], tok.SPECIAL_PIECES[tok.SEP_ID]
  t.post_processor = processors.TemplateProcessing(
      single=f'{cls} $A {sep}', pair=f'{cls} $A {sep} $B:0 {sep}:0',
      special_tokens=[(cls, tok.CLS_ID), (sep, tok.SEP_ID)])
  spec = json.loads(t.to_str())
  return (json.dumps(spec, sort_keys=True, ensure_ascii=False, indent=None) + '\n').encode('utf-8')


def config_files(max_len: int) -> dict[str, dict]:
  """Returns {file name: JSON} of tokenizer_config.json and special_tokens_map.json for tokenizer.json.

  [UNK] is not declared: transformers matches every declared special token in text, and mlmjax
  reads a literal '[UNK]' as text (byte fallback never produces [UNK]). [PAD] is declared for
  padding, so a literal '[PAD]' in text is the one string transformers reads otherwise.
  """
  specials = {'pad_token': '[PAD]', 'cls_token': '[CLS]', 'sep_token': '[SEP]',
              'mask_token': '[MASK]'}
  return {'special_tokens_map.json': specials,
          'tokenizer_config.json': {'tokenizer_class': 'PreTrainedTokenizerFast',
                                    'model_max_length': int(max_len),
                                    'clean_up_tokenization_spaces': False, **specials}}


def describe(tokenizer) -> str:
  """Returns the tokenizer's kind in words: 'sentencepiece unigram' or 'bpe', 'WordPiece' or 'BPE'."""
  if isinstance(tokenizer, tok.BpeTokenizer):
    return 'BPE'
  if not isinstance(tokenizer, tok.Tokenizer):
    return 'WordPiece'
  kind = _proto(tokenizer.serialized_model).trainer_spec.model_type
  return 'sentencepiece ' + {_UNIGRAM: 'unigram', _BPE: 'bpe'}.get(kind, str(kind))


def exact_score(tokenizer, ids) -> fractions.Fraction:
  """Returns the exact sum of the pieces' scores of a sentencepiece segmentation (ties show as equal)."""
  scores = [p.score for p in _proto(tokenizer.serialized_model).pieces]
  return sum((fractions.Fraction(scores[i]) for i in ids), fractions.Fraction(0))
