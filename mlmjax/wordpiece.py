"""WordPiece tokenizer (Hugging Face BERT vocabularies) behind the interface of tokenizer.Tokenizer.

Policies, matching the sentencepiece Tokenizer's:
- Special ids come from the vocabulary: [PAD] must be id 0 (packing and the loss pad with 0),
  [UNK], [CLS], [SEP], [MASK] may be anywhere (BERT: 100, 101, 102, 103).
- `special_mask` flags every id masking must never select or draw: the five above, every added
  token marked special, and the reserved '[unusedN]' pieces.
- `encode` never produces [CLS], [SEP], [MASK] or [PAD]: a literal '[MASK]' in corpus text is
  tokenized as the ordinary text '[', 'mask', ']' (added tokens are not matched).
  `encode_with_specials` is for text where such literals are meant as specials (fill-mask input).
- Word starts: a piece starts a word unless it begins with the continuation prefix '##';
  special ids count as word starts.
"""

import hashlib
import json
import os
import pathlib
import re
from typing import Sequence

import numpy as np
import tokenizers

from mlmjax import tokenizer as tokenizer_lib

SPECIAL_PIECES = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
_SPECIAL_LITERAL = re.compile(r'(\[CLS\]|\[SEP\]|\[MASK\])')
_UNUSED = re.compile(r'^\[unused\d+\]$')


def _from_vocab_txt(path: pathlib.Path) -> tokenizers.Tokenizer:
  """Returns BERT's tokenizer pipeline over a vocab.txt (lowercasing per tokenizer_config.json)."""
  lower = True  # BERT's default when no tokenizer_config.json says otherwise
  cfg = path.parent / 'tokenizer_config.json'
  if cfg.is_file():
    lower = bool(json.loads(cfg.read_text()).get('do_lower_case', True))
  t = tokenizers.Tokenizer(tokenizers.models.WordPiece.from_file(str(path), unk_token='[UNK]'))
  t.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=lower, strip_accents=None)
  t.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  t.decoder = tokenizers.decoders.WordPiece()
  present = [p for p in SPECIAL_PIECES if t.token_to_id(p) is not None]
  t.add_special_tokens(present)
  if t.token_to_id('[CLS]') is not None and t.token_to_id('[SEP]') is not None:
    # [CLS] text [SEP], as transformers' BertTokenizer does (mlmjax itself inserts specials in code).
    t.post_processor = tokenizers.processors.BertProcessing(
        ('[SEP]', t.token_to_id('[SEP]')), ('[CLS]', t.token_to_id('[CLS]')))
  return t


def _canonical(serialized: bytes) -> bytes:
  """Returns tokenizer JSON with sorted keys and no padding/truncation, so equal models give equal bytes."""
  spec = json.loads(bytes(serialized).decode('utf-8'))
  # Fixed padding and truncation in a saved tokenizer.json are serving settings: packing decides.
  spec['padding'], spec['truncation'] = None, None
  return json.dumps(spec, sort_keys=True, ensure_ascii=False).encode('utf-8')


def _without_added_tokens(serialized: str) -> tokenizers.Tokenizer:
  """Returns the tokenizer of `serialized` minus its added tokens, so literals stay plain text."""
  spec = json.loads(serialized)
  spec['added_tokens'] = []
  return tokenizers.Tokenizer.from_str(json.dumps(spec))


class WordPieceTokenizer(tokenizer_lib.TokenizerBase):
  """A tokenizers-library WordPiece model with the methods and attributes of tokenizer.Tokenizer."""

  def __init__(self, serialized_model: bytes, model_path: str = '<memory>'):
    self.model_path = str(model_path)
    try:
      self.serialized_model = _canonical(serialized_model)
      self._tok = tokenizers.Tokenizer.from_str(self.serialized_model.decode('utf-8'))
    except Exception as e:  # pylint: disable=broad-except  # tokenizers raises bare Exception
      raise ValueError(f'{self.model_path}: not a tokenizers JSON file ({str(e)[:200]}); point '
                       'tokenizer.path at a tokenizer.json or vocab.txt') from None
    self.fingerprint = hashlib.sha256(self.serialized_model).hexdigest()
    if not isinstance(self._tok.model, tokenizers.models.WordPiece):
      raise ValueError(f'{self.model_path}: holds a {type(self._tok.model).__name__} model; only '
                       'WordPiece tokenizer.json files are supported')
    self._plain = _without_added_tokens(self.serialized_model.decode('utf-8'))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    ids = {}
    for piece in SPECIAL_PIECES:
      i = self._tok.token_to_id(piece)
      if i is None:
        raise ValueError(f'{self.model_path}: the vocabulary has no {piece} piece; a BERT '
                         f'vocabulary needs all of {SPECIAL_PIECES}')
      ids[piece] = i
    if ids['[PAD]'] != 0:
      raise ValueError(f'{self.model_path}: [PAD] has id {ids["[PAD]"]}; mlmjax pads with id 0, '
                       'so [PAD] must be the first vocabulary entry')
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        ids[p] for p in SPECIAL_PIECES)
    self._special_ids = {self.cls_id: '[CLS]', self.sep_id: '[SEP]', self.mask_id: '[MASK]'}
    self._literal_ids = {v: k for k, v in self._special_ids.items()}
    pieces = [self._tok.id_to_token(i) or '' for i in range(self.vocab_size)]
    special = np.array([bool(_UNUSED.match(p)) for p in pieces], dtype=bool)
    special[list(ids.values())] = True
    for i, added in self._tok.get_added_tokens_decoder().items():
      if added.special and i < self.vocab_size:
        special[i] = True
    self.special_mask = special  # ids never selected or drawn by masking
    prefix = getattr(self._tok.model, 'continuing_subword_prefix', '##') or '##'
    self.word_start_table = np.array([not p.startswith(prefix) for p in pieces], dtype=bool)
    self.word_start_table[special] = True
    self.file_name = 'tokenizer.json'  # the name a workdir stores this tokenizer under

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'WordPieceTokenizer':
    """Returns the tokenizer of a tokenizer.json or vocab.txt (FileNotFoundError / ValueError naming it)."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'tokenizer file {path} does not exist; set tokenizer.path to an '
                              'existing tokenizer.json or vocab.txt')
    if path.suffix == '.txt':
      try:
        t = _from_vocab_txt(path)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f'{path}: not a WordPiece vocabulary ({str(e)[:200]})') from None
      return cls(t.to_str().encode('utf-8'), str(path))
    return cls(path.read_bytes(), str(path))

  def encode(self, text: str) -> list[int]:
    """Returns the WordPiece ids of `text`; never special ids, even for a literal '[MASK]'."""
    return self._plain.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """Returns encode() of each text, computed by the tokenizers library's parallel encoder."""
    del num_threads  # the tokenizers library sizes its own thread pool
    return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_specials(self, text: str) -> list[int]:
    """Returns ids where the literals '[CLS]', '[SEP]', '[MASK]' in `text` become their special ids."""
    ids = []
    for part in _SPECIAL_LITERAL.split(text):
      if part in self._literal_ids:
        ids.append(self._literal_ids[part])
      elif part.strip():
        ids.extend(self.encode(part))
    return ids

  def decode(self, ids) -> str:
    """Returns the text of `ids`: [PAD] dropped, other specials written as words."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) != self.pad_id]
    return self._tok.decode(ids, skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    """Returns the piece string of id `i`."""
    return self._tok.id_to_token(int(i))

  def piece_to_id(self, p: str) -> int:
    """Returns the id of piece `p` (unk_id when the piece is not in the vocabulary)."""
    i = self._tok.token_to_id(p)
    return self.unk_id if i is None else i

  def save_vocab(self, path: str | os.PathLike) -> None:
    """Writes the vocabulary as a vocab.txt (one piece per line, in id order) to `path`."""
    pieces = [self._tok.id_to_token(i) for i in range(self.vocab_size)]
    pathlib.Path(path).write_text(''.join(p + '\n' for p in pieces), encoding='utf-8')
