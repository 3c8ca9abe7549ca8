"""Tokenizers: sentencepiece (trained here), WordPiece (BERT) and BPE (ModernBERT), one interface.

`Tokenizer` is a sentencepiece model that mlmjax trains or loads; `WordPieceTokenizer` a tokenizers-
library WordPiece model (a BERT vocab.txt or tokenizer.json); `BpeTokenizer` a tokenizers-library
BPE tokenizer.json (byte-level, as ModernBERT's); `load_any` loads any of them from a file or a
directory. All have encode / encode_batch / encode_with_specials / decode, the special ids
(pad_id ... mask_id), special_mask and word_starts.

Sentencepiece policies (decided here, relied on downstream):
- Special ids are fixed: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4; every other id is a text piece.
- Normalization is whitespace only: every Unicode whitespace character becomes a space, runs of
  spaces collapse, ends are stripped. Unicode normalization (NFC/NFKC) and cleaning belong to
  corpus.py. With byte fallback, `decode(encode(x)) == ' '.join(x.split())` for any text x that does
  not contain the literal strings '[CLS]', '[SEP]' or '[MASK]'.
- '[CLS]', '[SEP]', '[MASK]' are sentencepiece control symbols: `encode` never produces them, so
  a corpus that happens to contain the literal string '[MASK]' is encoded as ordinary text and
  cannot corrupt packed rows. `encode_with_specials` is for text where such literals are meant as
  specials (fill-mask input): it splits on them and inserts their ids.
- Word starts: a piece starts a word when it begins with '▁'; special ids count as word starts;
  byte-fallback pieces <0x..> are continuations, because sentencepiece always emits the word's
  '▁' (alone or in a piece) before them, so the word is already started.

WordPiece policies, matching the sentencepiece ones:
- Special ids come from the vocabulary: [PAD] must be id 0 (BERT's export sets padding_idx 0),
  [UNK], [CLS], [SEP], [MASK] may be anywhere (BERT: 100, 101, 102, 103).
- `special_mask` flags every id masking must never select or draw: the five above, every added
  token marked special, and the reserved '[unusedN]' pieces.
- `encode` never produces [CLS], [SEP], [MASK] or [PAD]: a literal '[MASK]' in corpus text is
  tokenized as the ordinary text '[', 'mask', ']' (added tokens are not matched).
  `encode_with_specials` is for text where such literals are meant as specials (fill-mask input).
- Word starts: a piece starts a word unless it begins with the continuation prefix '##';
  special ids count as word starts.

BPE policies (tokenizer.json with a BPE model):
- Special ids come from the tokenizer: [PAD], [UNK], [CLS], [SEP], [MASK] may be anywhere
  (ModernBERT: 50283, 50280, 50281, 50282, 50284); `special_mask` as for WordPiece.
- `encode` never produces an added token marked special (a literal '[MASK]' is text); added tokens
  not marked special (ModernBERT's whitespace runs) are vocabulary and stay.
  `encode_with_specials` also matches '[CLS]', '[SEP]', '[MASK]' with their own flags (ModernBERT's
  [MASK] takes the space before it), so its ids are the tokenizer's own for such text.
- Word starts: a piece starts a word when it begins with whitespace (byte-level 'Ġ', 'Ċ', ...,
  or '▁'); special ids count as word starts.
"""

import hashlib
import io
import json
import os
import pathlib
import re
import sys
import tempfile
from typing import Iterator, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
NUM_SPECIAL = 5  # ids < NUM_SPECIAL are special
SPECIAL_PIECES = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
MODEL_TYPES = ('unigram', 'bpe')

# The tokenizer file a workdir holds: sentencepiece, or a WordPiece tokenizers-library JSON.
WORKDIR_FILES = ('tokenizer.model', 'tokenizer.json')

_SPECIAL_IDS = {'[CLS]': CLS_ID, '[SEP]': SEP_ID, '[MASK]': MASK_ID}
_SPECIAL_LITERAL = re.compile(r'(\[CLS\]|\[SEP\]|\[MASK\])')
_UNUSED = re.compile(r'^\[unused\d+\]$')  # BERT's reserved pieces
_WORD_START = '\u2581'  # sentencepiece's visible space '▁'
_NUM_BYTE_PIECES = 256
# Training lines longer than this are cut at a space: sentencepiece silently drops sentences over
# max_sentence_length bytes (4192 by default), which would lose every State of the Union address.
_MAX_LINE_CHARS = 2048
_MAX_LINE_BYTES = 4 * _MAX_LINE_CHARS + 64  # UTF-8 takes at most 4 bytes per character


def _whitespace_rules() -> str:
  """Returns a sentencepiece normalization TSV mapping every non-space whitespace to a space."""
  chars = [c for c in range(sys.maxunicode + 1) if chr(c).isspace() and c != 0x20]
  return ''.join(f'{c:X}\t20\n' for c in chars)


def _split_long(line: str, max_chars: int) -> Iterator[str]:
  """Yields pieces of `line` of at most max_chars characters, cut at the last space if any."""
  while len(line) > max_chars:
    cut = line.rfind(' ', 0, max_chars)
    if cut <= 0:
      cut = max_chars
    yield line[:cut]
    line = line[cut:].lstrip()
  if line:
    yield line


def _training_lines(documents: Sequence[str], max_sentences: int, seed: int) -> list[str]:
  """Returns the non-blank lines of the documents, deterministically subsampled to max_sentences."""
  lines = [piece for doc in documents for line in doc.split('\n') if line.strip()
           for piece in _split_long(line.strip(), _MAX_LINE_CHARS)]
  if max_sentences and len(lines) > max_sentences:
    keep = np.sort(np.random.default_rng(seed).choice(len(lines), max_sentences, replace=False))
    lines = [lines[i] for i in keep]
  return lines


class VocabTooLarge(ValueError):
  """tokenizer.vocab_size exceeds what the training text supports; `limit` is the most it does."""

  def __init__(self, message: str, limit: int | None):
    super().__init__(message)
    self.limit = limit


def vocab_error(message: str, vocab_size: int) -> VocabTooLarge:
  """Returns a one-line error naming tokenizer.vocab_size from a sentencepiece trainer message."""
  found = re.search(r'<= (\d+)', message)
  limit = int(found.group(1)) if found else None
  hint = f' (at most {limit} for this text)' if found else ''
  return VocabTooLarge(f'tokenizer.vocab_size={vocab_size} does not fit the training text{hint}: '
                       f'lower tokenizer.vocab_size or train on more text. sentencepiece said: '
                       f'{message.splitlines()[-1]}', limit)


def _without_rule_path(model: bytes) -> bytes:
  """Returns the model without the temporary rule-file path, so equal training gives equal bytes.

  The rules themselves stay compiled into normalizer_spec.precompiled_charsmap.
  """
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model)
  proto.normalizer_spec.ClearField('normalization_rule_tsv')
  return proto.SerializeToString(deterministic=True)


def write_atomically(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to a temporary file next to `path`, then renames it into place."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + '.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def train_tokenizer(documents: Sequence[str], model_path: str | os.PathLike, *,
                    vocab_size: int = 8000, model_type: str = 'unigram',
                    character_coverage: float = 0.9995, max_sentences: int = 2_000_000,
                    seed: int = 0, num_threads: int = 2) -> 'Tokenizer':
  """Trains a sentencepiece model on the documents' lines, writes it to model_path, returns it.

  Deterministic: the same documents and arguments give the same model bytes (the line sample is
  drawn here from `seed`; sentencepiece's own sampling is switched off).
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f'tokenizer.model_type={model_type!r} is not supported; '
                     f'use one of {MODEL_TYPES}')
  min_vocab = NUM_SPECIAL + _NUM_BYTE_PIECES + 1
  if vocab_size < min_vocab:
    raise ValueError(f'tokenizer.vocab_size={vocab_size} is too small: byte fallback and the '
                     f'special ids need at least {min_vocab}; raise tokenizer.vocab_size')
  lines = _training_lines(documents, max_sentences, seed)
  if not lines:
    raise ValueError('train_tokenizer: the documents hold no non-blank line to train on; '
                     'check data.corpus')
  with tempfile.TemporaryDirectory() as tmp:
    rules = pathlib.Path(tmp) / 'whitespace.tsv'
    rules.write_text(_whitespace_rules())
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_writer=model, model_type=model_type,
          vocab_size=vocab_size, character_coverage=character_coverage,
          pad_id=PAD_ID, pad_piece=SPECIAL_PIECES[PAD_ID], unk_id=UNK_ID,
          unk_piece=SPECIAL_PIECES[UNK_ID], bos_id=-1, eos_id=-1,
          control_symbols=list(SPECIAL_PIECES[CLS_ID:]), byte_fallback=True,
          normalization_rule_tsv=str(rules), input_sentence_size=0,
          max_sentence_length=_MAX_LINE_BYTES, num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
      if 'ocabulary size' in str(e):
        raise vocab_error(str(e), vocab_size) from None
      raise
  data = _without_rule_path(model.getvalue())
  path = pathlib.Path(model_path)
  write_atomically(path, data)
  return Tokenizer(data, str(path))


def _check_specials(sp: spm.SentencePieceProcessor, path: str) -> None:
  """Raises ValueError naming `path` unless ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK]."""
  n = sp.get_piece_size()
  found = tuple(sp.id_to_piece(i) for i in range(min(n, NUM_SPECIAL)))
  if found != SPECIAL_PIECES or sp.pad_id() != PAD_ID or sp.unk_id() != UNK_ID:
    raise ValueError(f'{path}: ids 0-4 are {found}, expected {SPECIAL_PIECES}; this model was '
                     'not trained by mlmjax.tokenizer.train_tokenizer: retrain it or clear '
                     'tokenizer.path')


class TokenizerBase:
  """What every mlmjax tokenizer shares: pickling by model bytes, repr, word-start flags."""
  serialized_model: bytes
  model_path: str
  vocab_size: int
  fingerprint: str
  word_start_table: np.ndarray

  def __getstate__(self) -> dict:
    return {'serialized_model': self.serialized_model, 'model_path': self.model_path}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state['serialized_model'], state['model_path'])

  def __repr__(self) -> str:
    return (f'{type(self).__name__}({self.model_path!r}, vocab_size={self.vocab_size}, '
            f'fingerprint={self.fingerprint[:12]})')

  def word_starts(self, ids) -> np.ndarray:
    """Returns bool flags, shaped like `ids`: True where the id begins a word (see module doc)."""
    return self.word_start_table[np.asarray(ids)]


class Tokenizer(TokenizerBase):
  """A loaded sentencepiece model with mlmjax's special ids and word-start flags."""

  def __init__(self, serialized_model: bytes, model_path: str = '<memory>'):
    self.serialized_model = bytes(serialized_model)
    self.model_path = str(model_path)
    self.fingerprint = hashlib.sha256(self.serialized_model).hexdigest()
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self.serialized_model)
    except (RuntimeError, OSError) as e:
      raise ValueError(f'{self.model_path}: not a sentencepiece model ({e}); point tokenizer.path '
                       'at a .model file') from None
    _check_specials(self._sp, self.model_path)
    self.vocab_size = self._sp.get_piece_size()
    self.word_start_table = self._word_start_table()
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)
    self.special_mask = np.arange(self.vocab_size) < NUM_SPECIAL  # ids never selected or drawn
    self.file_name = WORKDIR_FILES[0]  # the name a workdir stores this tokenizer under

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'Tokenizer':
    """Returns the tokenizer stored at `path` (FileNotFoundError / ValueError naming the file)."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'tokenizer model {path} does not exist; set tokenizer.path to an '
                              'existing .model file or leave it empty to train one')
    return cls(path.read_bytes(), str(path))

  def _word_start_table(self) -> np.ndarray:
    """Returns (vocab_size,) bool: special ids and pieces beginning with '▁'."""
    table = np.array([self._sp.id_to_piece(i).startswith(_WORD_START) and not self._sp.is_byte(i)
                      for i in range(self._sp.get_piece_size())], dtype=bool)
    table[:NUM_SPECIAL] = True
    return table

  def encode(self, text: str) -> list[int]:
    """Returns sentencepiece's ids for `text`; never special ids, even for a literal '[MASK]'."""
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """Returns encode() of each text, computed by sentencepiece's threaded batch encoder."""
    return self._sp.encode(list(texts), num_threads=num_threads)

  def encode_with_specials(self, text: str) -> list[int]:
    """Returns ids where the literals '[CLS]', '[SEP]', '[MASK]' in `text` become their special ids."""
    ids = []
    for part in _SPECIAL_LITERAL.split(text):
      if part in _SPECIAL_IDS:
        ids.append(_SPECIAL_IDS[part])
      elif part.strip():
        ids.extend(self._sp.encode(part))
    return ids

  def decode(self, ids) -> str:
    """Returns the text of `ids`: [PAD] dropped, [UNK]/[CLS]/[SEP]/[MASK] written as words."""
    parts, run = [], []
    for i in (int(i) for i in np.asarray(ids).reshape(-1)):
      if i >= NUM_SPECIAL:
        run.append(i)
        continue
      if run:
        parts.append(self._sp.decode(run))
        run = []
      if i != PAD_ID:
        parts.append(SPECIAL_PIECES[i])
    if run:
      parts.append(self._sp.decode(run))
    return ' '.join(parts)

  def id_to_piece(self, i: int) -> str:
    """Returns the piece string of id `i`."""
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, p: str) -> int:
    """Returns the id of piece `p` (UNK_ID when the piece is not in the vocabulary)."""
    return self._sp.piece_to_id(p)


# ---------------------------------------------------------------------------------------------
# WordPiece (Hugging Face BERT vocabularies)


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


def _keeping_added_tokens(serialized: str, keep) -> tokenizers.Tokenizer:
  """Returns the tokenizer of `serialized` with only the added tokens whose entry keep() accepts."""
  spec = json.loads(serialized)
  spec['added_tokens'] = [a for a in spec.get('added_tokens') or [] if keep(a)]
  return tokenizers.Tokenizer.from_str(json.dumps(spec))


def _without_added_tokens(serialized: str) -> tokenizers.Tokenizer:
  """Returns the tokenizer of `serialized` minus its added tokens, so literals stay plain text."""
  return _keeping_added_tokens(serialized, lambda added: False)


class _JsonTokenizer(TokenizerBase):
  """What the tokenizer.json kinds share: parsing, special ids and mask, encoding, decoding."""
  _model_class: type  # the tokenizers model class the file must hold
  _tok: tokenizers.Tokenizer  # the whole tokenizer, added tokens included
  _plain: tokenizers.Tokenizer  # what encode() runs: no added token marked special

  def _parse(self, serialized_model: bytes, model_path: str) -> None:
    self.model_path = str(model_path)
    try:
      self.serialized_model = _canonical(serialized_model)
      self._tok = tokenizers.Tokenizer.from_str(self.serialized_model.decode('utf-8'))
    except Exception as e:  # pylint: disable=broad-except  # tokenizers raises bare Exception
      raise ValueError(f'{self.model_path}: not a tokenizers JSON file ({str(e)[:200]}); point '
                       'tokenizer.path at a tokenizer.json or vocab.txt') from None
    self.fingerprint = hashlib.sha256(self.serialized_model).hexdigest()
    if not isinstance(self._tok.model, self._model_class):
      raise ValueError(f'{self.model_path}: holds a {type(self._tok.model).__name__} model; only '
                       'WordPiece and BPE tokenizer.json files are supported')

  def _special_ids(self, what: str) -> dict[str, int]:
    """Returns {piece: id} of SPECIAL_PIECES; ValueError naming the file when one is missing."""
    ids = {}
    for piece in SPECIAL_PIECES:
      i = self._tok.token_to_id(piece)
      if i is None:
        raise ValueError(f'{self.model_path}: the vocabulary has no {piece} piece; a {what} '
                         f'needs all of {SPECIAL_PIECES}')
      ids[piece] = i
    return ids

  def _set_specials(self, ids: dict[str, int]) -> list[str]:
    """Sets pad_id ... mask_id and special_mask from ids; returns the pieces in id order."""
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        ids[p] for p in SPECIAL_PIECES)
    pieces = [self._tok.id_to_token(i) or '' for i in range(self.vocab_size)]
    special = np.array([bool(_UNUSED.match(p)) for p in pieces], dtype=bool)
    special[list(ids.values())] = True
    for i, added in self._tok.get_added_tokens_decoder().items():
      if added.special and i < self.vocab_size:
        special[i] = True
    self.special_mask = special  # ids never selected or drawn by masking
    return pieces

  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text`; never special ids, even for a literal '[MASK]'."""
    return self._plain.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """Returns encode() of each text, computed by the tokenizers library's parallel encoder."""
    del num_threads  # the tokenizers library sizes its own thread pool
    return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

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


class WordPieceTokenizer(_JsonTokenizer):
  """A tokenizers-library WordPiece model with the methods and attributes of tokenizer.Tokenizer."""
  _model_class = tokenizers.models.WordPiece

  def __init__(self, serialized_model: bytes, model_path: str = '<memory>'):
    self._parse(serialized_model, model_path)
    self._plain = _without_added_tokens(self.serialized_model.decode('utf-8'))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    ids = self._special_ids('BERT vocabulary')
    if ids['[PAD]'] != 0:
      raise ValueError(f'{self.model_path}: [PAD] has id {ids["[PAD]"]}; [PAD] must be the first '
                       'vocabulary entry (the BERT export numbers positions with padding_idx 0)')
    pieces = self._set_specials(ids)
    self._literal_ids = {'[CLS]': self.cls_id, '[SEP]': self.sep_id, '[MASK]': self.mask_id}
    prefix = getattr(self._tok.model, 'continuing_subword_prefix', '##') or '##'
    self.word_start_table = np.array([not p.startswith(prefix) for p in pieces], dtype=bool)
    self.word_start_table[self.special_mask] = True
    self.file_name = WORKDIR_FILES[1]  # the name a workdir stores this tokenizer under

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

  def encode_with_specials(self, text: str) -> list[int]:
    """Returns ids where the literals '[CLS]', '[SEP]', '[MASK]' in `text` become their special ids."""
    ids = []
    for part in _SPECIAL_LITERAL.split(text):
      if part in self._literal_ids:
        ids.append(self._literal_ids[part])
      elif part.strip():
        ids.extend(self.encode(part))
    return ids

  def save_vocab(self, path: str | os.PathLike) -> None:
    """Writes the vocabulary as a vocab.txt (one piece per line, in id order) to `path`."""
    pieces = [self._tok.id_to_token(i) for i in range(self.vocab_size)]
    pathlib.Path(path).write_text(''.join(p + '\n' for p in pieces), encoding='utf-8')


def _id_map(part: tokenizers.Tokenizer, whole: tokenizers.Tokenizer) -> np.ndarray:
  """Returns (n,) int64: whole's id of each id of part, a copy of whole with fewer added tokens."""
  vocab = part.get_vocab(with_added_tokens=True)
  ids = np.zeros(max(vocab.values()) + 1, np.int64)
  for piece, i in vocab.items():
    ids[i] = whole.token_to_id(piece)
  return ids


def _whitespace_marks(spec: dict) -> str:
  """Returns the characters a piece starting a word begins with, for a tokenizer.json spec."""
  marks = _WORD_START
  if '"ByteLevel"' in json.dumps([spec.get('pre_tokenizer'), spec.get('decoder')]):
    # Byte-level pieces spell whitespace bytes as printable stand-ins (' ' is 'Ġ', '\n' is 'Ċ').
    level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    marks += level.pre_tokenize_str(' \t\n\r\x0b\x0c')[0][0]
  return marks


class BpeTokenizer(_JsonTokenizer):
  """A BPE tokenizer.json (byte-level, as ModernBERT's) with the methods and attributes of Tokenizer."""
  _model_class = tokenizers.models.BPE

  def __init__(self, serialized_model: bytes, model_path: str = '<memory>'):
    self._parse(serialized_model, model_path)
    ids = self._special_ids('BPE tokenizer.json')
    text = self.serialized_model.decode('utf-8')
    self._plain = _keeping_added_tokens(text, lambda a: not a.get('special'))
    # The text specials keep their own flags: ModernBERT's [MASK] takes the space before it.
    self._with_specials = _keeping_added_tokens(
        text, lambda a: not a.get('special') or a.get('content') in _SPECIAL_IDS)
    present = {a.content for a in self._with_specials.get_added_tokens_decoder().values()}
    self._with_specials.add_special_tokens([
        tokenizers.AddedToken(p, special=True, normalized=False)
        for p in _SPECIAL_IDS if p not in present])
    # Loading numbers added tokens in list order, so the two above give some of them other ids.
    self._plain_ids, self._specials_ids = (_id_map(t, self._tok)
                                           for t in (self._plain, self._with_specials))
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    pieces = self._set_specials(ids)
    marks = _whitespace_marks(json.loads(text))
    self.word_start_table = np.array([bool(p) and (p[0] in marks or p[0].isspace())
                                      for p in pieces], dtype=bool)
    self.word_start_table[self.special_mask] = True
    self.file_name = WORKDIR_FILES[1]  # the name a workdir stores this tokenizer under

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'BpeTokenizer':
    """Returns the tokenizer of a BPE tokenizer.json (FileNotFoundError / ValueError naming it)."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'tokenizer file {path} does not exist; set tokenizer.path to an '
                              'existing tokenizer.json')
    return cls(path.read_bytes(), str(path))

  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text`; never special ids, even for a literal '[MASK]'."""
    return self._plain_ids[self._plain.encode(text, add_special_tokens=False).ids].tolist()

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """Returns encode() of each text, computed by the tokenizers library's parallel encoder."""
    del num_threads  # the tokenizers library sizes its own thread pool
    return [self._plain_ids[e.ids].tolist()
            for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_specials(self, text: str) -> list[int]:
    """Returns ids where the literals '[CLS]', '[SEP]', '[MASK]' in `text` become their special ids."""
    ids = self._with_specials.encode(text, add_special_tokens=False).ids
    return self._specials_ids[ids].tolist()


def _json_model_type(data: bytes) -> str | None:
  """Returns the model type ('BPE', 'WordPiece', ...) of tokenizer.json bytes, None if unreadable."""
  try:
    return json.loads(data)['model']['type']
  except (ValueError, KeyError, TypeError):
    return None


def load_any(path: str | os.PathLike):
  """Returns the Tokenizer, WordPieceTokenizer or BpeTokenizer stored at path.

  .model is sentencepiece, vocab.txt WordPiece, a .json WordPiece or BPE as its model says. A
  directory (a workdir or a Hugging Face model directory) is searched for tokenizer.model,
  tokenizer.json, then vocab.txt.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    found = [path / n for n in (*WORKDIR_FILES, 'vocab.txt') if (path / n).is_file()]
    if not found:
      raise FileNotFoundError(f'{path} holds no tokenizer.model, tokenizer.json or vocab.txt; '
                              'point tokenizer.path at a tokenizer file')
    path = found[0]
  if path.suffix == '.model':
    return Tokenizer.load(path)
  if path.suffix == '.json' and path.is_file() and _json_model_type(path.read_bytes()) == 'BPE':
    return BpeTokenizer.load(path)
  if path.suffix in ('.json', '.txt'):
    return WordPieceTokenizer.load(path)
  raise ValueError(f'{path}: unknown tokenizer file type; tokenizer.path takes a sentencepiece '
                   '.model, a WordPiece vocab.txt or a tokenizers tokenizer.json')


# ---------------------------------------------------------------------------------------------
# Which tokenizer a run uses: the one resolver (train, tasks, predict, init_from).


def stored_path(workdir) -> pathlib.Path | None:
  """Returns the tokenizer file a workdir holds (tokenizer.model or tokenizer.json), or None."""
  workdir = pathlib.Path(workdir)
  return next((workdir / n for n in WORKDIR_FILES if (workdir / n).is_file()), None)


def resolve(workdir, path: str = ''):
  """Returns the workdir's tokenizer (a resumed run), else tokenizer.path's, else None."""
  stored = stored_path(workdir) if workdir is not None else None
  if stored is not None:
    return load_any(stored)
  return load_any(path) if path else None


def store(tokenizer, workdir) -> None:
  """Copies the tokenizer into the workdir (once, by process 0), where predict and resume find it."""
  import jax  # pylint: disable=g-import-not-at-top  (the tokenizer stage needs no JAX otherwise)
  workdir = pathlib.Path(workdir)
  if stored_path(workdir) is not None or jax.process_index() != 0:
    return
  write_atomically(workdir / tokenizer.file_name, tokenizer.serialized_model)
