"""What every fine-tuning task shares: reading examples, hash splits, encoding, metrics, eval batches.

The metrics are in tasks/metrics.py.

Examples come from a JSON Lines file (one object per line; `.gz` too), from `embedded:NAME`
(embedded_examples: tasks built from the stdlib's own documentation, walked by pydocs.api_entries),
from `pairs:FILE` (paraphrase_pairs: aligned text pairs and hard mismatches built from a file of
aligned verses) or from `tfds:NAME` (read_tfds_examples: a prepared TensorFlow Datasets dataset,
e.g. tfds:glue/sst2, read through sources.py's TFDS reader with data.tfds_data_dir and
data.tfds_download).

Splits are deterministic and need no split file: the blake2b hash of a key read as a uniform number
u in [0, 1) puts an example in 'test' when u < test_fraction, in 'val' when u < test_fraction +
val_fraction, else in 'train'. The key is the example's `task_data.group_field` value when set (all
sentences of one Brown document land in one split), else its `task_data.id_field` value, else (id_field
'') the example's whole content. Adding or removing examples never moves the others. A TFDS
example carries its source split under the key SOURCE_SPLIT: TFDS's reported split
(task_data.tfds_test_split, 'validation' by default, since GLUE hides its test labels) is all
'test', and TFDS's 'train' is cut into 'train' and 'val' by the same hash with val_fraction
(test_fraction is not used).

Text is cleaned with corpus.clean_document (ftfy mojibake repair: the BBC articles' 'Â£' becomes
'£'; Unicode NFC; whitespace) before sentencepiece, as the pretraining corpus is. Rows take every
special id ([CLS], [SEP], [PAD], [UNK]) from the tokenizer: a WordPiece vocabulary imported from
Hugging Face has [CLS]=101, not the sentencepiece layout's 2.
"""

import collections
import functools
import gzip
import hashlib
import itertools
import json
import os
import re
from typing import Any, Iterable, Sequence

import jax
import numpy as np

from mlmjax import corpus, input_pipeline, sources
from mlmjax import pydocs
from mlmjax import tokenizer as tokenizer_lib
# Not `from mlmjax.tasks import ...`: that package imports this module (through base).
import mlmjax.tasks.paraphrase as paraphrase

# The sentencepiece layout's ids (a sentencepiece tokenizer's own); rows use the tokenizer's ids.
PAD_ID, CLS_ID, SEP_ID, UNK_ID = (tokenizer_lib.PAD_ID, tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID,
                                  tokenizer_lib.UNK_ID)
SPLITS = ('train', 'val', 'test')
EMBEDDED, PAIRS, TFDS = 'embedded:', 'pairs:', 'tfds:'
SOURCE_SPLIT = '_split'  # a TFDS example's source: 'train' (cut into train/val) or 'test'


# ---------------------------------------------------------------------------------------------
# Reading examples


def read_examples(path: str, *, max_examples: int = 0, fields: Sequence[str] = (),
                  tfds_data_dir: str = '', tfds_download: bool = False,
                  tfds_test_split: str = 'validation') -> list[dict]:
  """Returns the example dicts of a JSON Lines file, 'embedded:NAME', 'pairs:FILE' or 'tfds:NAME'.

  max_examples > 0 keeps the first N examples (of each split for tfds:). fields and tfds_*: the
  arguments of read_tfds_examples (load_examples takes them from a config).
  """
  path = str(path)
  if max_examples < 0:
    raise ValueError(f'task_data.max_examples={max_examples} must be >= 0 (0 keeps all)')
  if path.startswith(EMBEDDED):
    rows = embedded_examples(path[len(EMBEDDED):])
    return rows[:max_examples] if max_examples else rows
  if path.startswith(PAIRS):
    rows = paraphrase_pairs(path[len(PAIRS):])
    return rows[:max_examples] if max_examples else rows
  if path.startswith(TFDS):
    return read_tfds_examples(path[len(TFDS):], fields=fields, data_dir=tfds_data_dir,
                              download=tfds_download, test_split=tfds_test_split,
                              max_examples=max_examples)
  return _read_jsonl(path, max_examples)


def load_examples(config, fields: Sequence[str] = ()) -> list[dict]:
  """Returns read_examples of config.task_data.path with the config's max_examples and TFDS keys."""
  cfg, data = config.task_data, config.data
  return read_examples(str(cfg.path), max_examples=int(cfg.max_examples), fields=fields,
                       tfds_data_dir=str(data.tfds_data_dir),
                       tfds_download=bool(data.tfds_download),
                       tfds_test_split=str(cfg.tfds_test_split))


def _read_jsonl(path: str, max_examples: int) -> list[dict]:
  """Returns the objects of a JSON Lines file (.gz too); a bad line names the file and line."""
  if not path:
    raise ValueError("task_data.path is empty: set it to a JSON Lines file, 'embedded:NAME', "
                     "'pairs:FILE' or 'tfds:NAME'")
  if not os.path.isfile(path):
    raise FileNotFoundError(f'task_data.path: {path} does not exist (or is not a file)')
  rows = []
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    for line_no, raw in enumerate(f, 1):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise ValueError(f'{path} line {line_no}: not UTF-8 ({e.reason} at byte {e.start})') from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path} line {line_no}: not valid JSON ({e.msg} at column {e.colno})'
                         ) from None
      if not isinstance(row, dict):
        raise ValueError(f'{path} line {line_no}: expected a JSON object, found '
                         f'{type(row).__name__}')
      rows.append(row)
      if max_examples and len(rows) >= max_examples:
        break
  if not rows:
    raise ValueError(f'task_data.path: {path} holds no examples')
  return rows


def field(row: dict, name: str, i: int, path: str, *, key: str = '') -> Any:
  """Returns row[name]; a missing field raises one line naming the config key, field, row and file."""
  if name in row:
    return row[name]
  setting = f'task_data.{key}' if key else 'task_data'
  raise ValueError(f'{setting}: {name!r} is missing in row {i} of {path} '
                   f'(it has {sorted(row)[:8]})')


def text_field(row: dict, name: str, i: int, path: str, *, key: str = '') -> str:
  """Returns row[name] as a string (numbers are converted); lists or null raise a clear error."""
  value = field(row, name, i, path, key=key)
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    setting = f'task_data.{key}' if key else 'task_data'
    raise ValueError(f'{setting}: {name!r} in row {i} of {path} is {type(value).__name__}, '
                     'expected a string')
  return str(value)


# ---------------------------------------------------------------------------------------------
# Embedded tasks (task_data.path='embedded:NAME'), built offline from the stdlib's documentation

EMBEDDED_TASKS = ('pydoc_library', 'pydoc_signature')
# pydoc_library's classes: stdlib packages with >= 100 distinct docstrings of >= 40 characters
# in Python 3.11 on Linux and every other platform (curses, also that big, is missing on Windows).
PYDOC_LIBRARIES = ('asyncio', 'decimal', 'email', 'http', 'importlib', 'logging',
                   'multiprocessing', 'unittest', 'xml')
_LIBRARY_CAP = 400  # examples per library at most (none reaches it in 3.11: asyncio has ~230)
_LIBRARY_MIN_CHARS = 40
_QUERY_MIN_CHARS = 20


def embedded_examples(name: str) -> list[dict]:
  """Returns the rows of embedded fine-tuning task `name`, built offline from the stdlib.

  - 'pydoc_library': {'id', 'text', 'label'}: a class, function or method docstring (cleaned,
    >= 40 characters) and the stdlib package that defines the object, one of PYDOC_LIBRARIES.
  - 'pydoc_signature': {'id', 'query', 'document'}: a docstring's first paragraph and the
    object's signature 'Name.method(parameters)' (no self, no annotations).
  id is 'module.qualname'. Rows are sorted by id and the same in every process (a fresh
  interpreter walks the stdlib: pydocs.api_entries); the walk runs once per process (~2 s).
  """
  if name not in EMBEDDED_TASKS:
    raise ValueError(f'task_data.path=embedded:{name}: unknown embedded task; '
                     f'choose one of {", ".join(EMBEDDED_TASKS)}')
  return [dict(row) for row in _embedded_tasks()[name]]  # copies: the cached rows stay intact


@functools.lru_cache(maxsize=1)
def _embedded_tasks() -> dict[str, list[dict]]:
  """Returns both embedded tasks' rows, from pydocs.api_entries with each docstring cleaned."""
  entries = [dict(e, text=corpus.clean_document(e['doc'])) for e in pydocs.api_entries()]
  return {'pydoc_library': _library_rows(entries), 'pydoc_signature': _signature_rows(entries)}


def _by_hash(ident: str) -> bytes:
  return hashlib.blake2b(ident.encode(), digest_size=8).digest()


def _library_rows(entries: Sequence[dict]) -> list[dict]:
  """Returns pydoc_library's rows: docstrings of PYDOC_LIBRARIES, each text once, sorted by id."""
  rows: dict[str, dict] = {}  # text -> row
  ambiguous: set[str] = set()
  ids: set[str] = set()
  for entry in entries:
    label, text = entry['module'].partition('.')[0], entry['text']
    if label not in PYDOC_LIBRARIES or len(text) < _LIBRARY_MIN_CHARS or entry['id'] in ids:
      continue
    ids.add(entry['id'])
    if text in rows:  # a copied docstring: keep the first, unless two libraries share it
      if rows[text]['label'] != label:
        ambiguous.add(text)
      continue
    rows[text] = {'id': entry['id'], 'text': text, 'label': label}
  by_label = collections.defaultdict(list)
  for text, row in rows.items():
    if text not in ambiguous:
      by_label[row['label']].append(row)
  # Capping keeps a hash-chosen sample, so a big library is not cut to its first modules.
  kept = [r for label in sorted(by_label)
          for r in sorted(by_label[label], key=lambda r: _by_hash(r['id']))[:_LIBRARY_CAP]]
  return sorted(kept, key=lambda r: r['id'])


def _first_paragraph(doc: str, name: str) -> str:
  """Returns the docstring's first paragraph on one line, past a leading 'name(...)' line."""
  paragraphs = [p for p in doc.split('\n\n') if p.strip()]
  signature_line = re.compile(rf'^[\w.]*\b{re.escape(name)}\s*\(')
  while paragraphs and signature_line.match(paragraphs[0]):
    _, _, rest = paragraphs[0].partition('\n')
    paragraphs[0:1] = [rest] if rest.strip() else []  # the signature line goes, prose stays
  return ' '.join(paragraphs[0].split()) if paragraphs else ''


def _signature_rows(entries: Sequence[dict]) -> list[dict]:
  """Returns pydoc_signature's rows sorted by id: each query once and each document once."""
  rows, queries, seen_documents = [], set(), set()
  for entry in sorted(entries, key=lambda e: e['id']):
    document, doc = entry['signature'], entry['text']
    if document is None or not doc:
      continue
    query = _first_paragraph(doc, entry['qualname'].rpartition('.')[2])
    if len(query) < _QUERY_MIN_CHARS or query in queries or document in seen_documents:
      continue
    queries.add(query)
    seen_documents.add(document)
    rows.append({'id': entry['id'], 'query': query, 'document': document})
  return rows


# ---------------------------------------------------------------------------------------------
# Paraphrase pairs (task_data.path='pairs:FILE'): aligned pairs against hard mismatches

PARAPHRASE, MISMATCH = 'paraphrase', 'mismatch'


def paraphrase_pairs(path: str) -> list[dict]:
  """Returns labelled text pairs built from a JSON Lines file of aligned verses ('pairs:FILE').

  Each source row has 'ref' ('Book Chapter:Verse'), 'a' and 'b' (one verse in two versions, e.g.
  KJV and WEB). Per verse, in file order: the aligned pair (a, its own b, 'paraphrase') and, when
  its chapter has a candidate, a hard mismatch (a, the b of another verse of the same chapter,
  'mismatch'): paraphrase.hard_mismatches, the verse whose b shares the largest fraction of words
  with this a, never one whose a or b text equals this verse's. Each row: 'id' ('ref/label'), 'ref', 'ref_b' (the verse b
  comes from), 'chapter' ('Book Chapter'), 'a', 'b', 'label'. Negatives stay inside the chapter,
  so splitting on group_field='chapter' keeps every verse's text in one split. A pure function of
  the file (no random state), computed once per file version.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'task_data.path=pairs:{path}: {path} does not exist '
                            '(or is not a file)')
  st = os.stat(path)
  return [dict(r) for r in _paraphrase_pairs(os.path.realpath(path), st.st_size, st.st_mtime_ns)]


@functools.lru_cache(maxsize=2)
def _paraphrase_pairs(path: str, size: int, mtime_ns: int) -> tuple[dict, ...]:
  """Returns paraphrase_pairs' rows of the file version (path, size, mtime_ns)."""
  del size, mtime_ns  # the cache key: a changed file is read again
  source = _read_jsonl(path, 0)
  where = f'pairs:{path}'
  refs = [text_field(r, 'ref', i, where, key='path') for i, r in enumerate(source, 1)]
  a = [text_field(r, 'a', i, where, key='path') for i, r in enumerate(source, 1)]
  b = [text_field(r, 'b', i, where, key='path') for i, r in enumerate(source, 1)]
  chapters = [ref.rpartition(':')[0] or ref for ref in refs]
  partner = paraphrase.hard_mismatches(chapters, a, b)
  rows = []
  for i in range(len(source)):
    rows.append({'id': f'{refs[i]}/{PARAPHRASE}', 'ref': refs[i], 'ref_b': refs[i],
                 'chapter': chapters[i], 'a': a[i], 'b': b[i], 'label': PARAPHRASE})
    j = int(partner[i])
    if j >= 0:
      rows.append({'id': f'{refs[i]}/{MISMATCH}', 'ref': refs[i], 'ref_b': refs[j],
                   'chapter': chapters[i], 'a': a[i], 'b': b[j], 'label': MISMATCH})
  return tuple(rows)


# ---------------------------------------------------------------------------------------------
# TFDS examples (task_data.path='tfds:NAME')


def read_tfds_examples(name: str, *, fields: Sequence[str] = (), data_dir: str = '',
                       download: bool = False, test_split: str = 'validation',
                       max_examples: int = 0) -> list[dict]:
  """Returns the examples of TFDS dataset `name`: its 'train' split, then test_split's.

  Each row holds the features named in `fields` that the dataset has (all its features when
  fields is empty) and SOURCE_SPLIT: 'train' or 'test' (split_rows puts the latter in 'test').
  Features are read through sources.py's TFDS reader, one pass per feature, so a dataset that is
  not prepared fails fast with its one-line message naming data.tfds_data_dir (unless
  download=True, data.tfds_download). Text becomes str, a ClassLabel its label name, any other
  value its str (a float label 3.8 becomes '3.8'). max_examples > 0 keeps each split's first N.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = f'{TFDS}{name}'
  where = f'data.tfds_data_dir={data_dir or "(TFDS default)"}'
  try:
    builder = tfds.builder(name, data_dir=os.path.expanduser(data_dir) if data_dir else None)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f'task_data.path={spec}: TFDS knows no dataset {name!r} and none is prepared '
                     f'in {where}; check the name (e.g. tfds:glue/sst2)') from None
  features = builder.info.features
  names = list(dict.fromkeys(f for f in (fields or sorted(features)) if f in features))
  if not names:
    raise ValueError(f'task_data.path={spec}: none of the configured fields {list(fields)} is a '
                     f'feature (features: {", ".join(sorted(features))}); set task_data.text_field '
                     'and the other *_field keys to its feature names')
  class_names = {f: list(features[f].names) for f in names
                 if isinstance(features[f], tfds.features.ClassLabel)}
  rows = []
  for split, source in (('train', 'train'), (test_split, 'test')):
    columns = {}
    for f in names:
      try:
        # pylint: disable-next=protected-access
        values = sources.read_tfds(name, f, split, data_dir, download)
      except (FileNotFoundError, ValueError) as e:
        message = str(e).replace('data.corpus=', 'task_data.path=')
        if split == test_split:
          message = message.replace('data.tfds_split=', 'task_data.tfds_test_split=')
        raise type(e)(message) from None
      columns[f] = list(itertools.islice(values, max_examples or None))
    for k in range(len(columns[names[0]])):
      row = {f: _tfds_value(columns[f][k], class_names.get(f)) for f in names}
      row[SOURCE_SPLIT] = source
      rows.append(row)
  if not rows:
    raise ValueError(f'task_data.path={spec} holds no examples in {where}')
  return rows


def _tfds_value(value: str, names: list[str] | None) -> str:
  """Returns a ClassLabel id's name (ids outside the names stay: GLUE's hidden -1), else value."""
  if names is not None and value.lstrip('-').isdigit() and 0 <= int(value) < len(names):
    return names[int(value)]
  return value


# ---------------------------------------------------------------------------------------------
# Splits


def check_fractions(val_fraction: float, test_fraction: float) -> None:
  """Raises ValueError naming the config keys unless both fractions are >= 0 and sum below 1."""
  if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
    raise ValueError(f'task_data.val_fraction={val_fraction} and task_data.test_fraction='
                     f'{test_fraction} must be >= 0 and sum to less than 1')


def hash_unit(key_value: str) -> float:
  """Returns the blake2b hash of key_value as a number in [0, 1)."""
  h = hashlib.blake2b(key_value.encode('utf-8'), digest_size=8).digest()
  return int.from_bytes(h, 'big') / 2.0**64


def split_of(key_value: str, val_fraction: float, test_fraction: float) -> str:
  """Returns 'train', 'val' or 'test' for an example (or group) key, deterministically by hash."""
  check_fractions(val_fraction, test_fraction)
  u = hash_unit(str(key_value))
  if u < test_fraction:
    return 'test'
  if u < test_fraction + val_fraction:
    return 'val'
  return 'train'


def split_key(row: dict, i: int, path: str, *, id_field: str = '', group_field: str = '') -> str:
  """Returns what split_of hashes: the group value, else the id value, else the row's content."""
  if group_field:
    return 'group:' + str(field(row, group_field, i, path, key='group_field'))
  if id_field:
    return 'id:' + str(field(row, id_field, i, path, key='id_field'))
  return 'content:' + json.dumps(row, sort_keys=True, ensure_ascii=False)


def split_rows(rows: Sequence[dict], path: str, task_cfg) -> list[str]:
  """Returns the split name of every row under the config's task_data id/group fields and fractions.

  A row with SOURCE_SPLIT 'test' (a TFDS reported split) is 'test'; one with 'train' goes to
  'train' or 'val' by hash (val_fraction; no test_fraction).
  """
  val, test = float(task_cfg.val_fraction), float(task_cfg.test_fraction)
  check_fractions(val, test)
  out = []
  for i, r in enumerate(rows, 1):
    source = r.get(SOURCE_SPLIT)
    if source == 'test':
      out.append('test')
      continue
    key = split_key(r, i, path, id_field=task_cfg.id_field, group_field=task_cfg.group_field)
    out.append(split_of(key, val, 0.0 if source == 'train' else test))
  return out


# ---------------------------------------------------------------------------------------------
# Encoding


def _bump(stats: dict | None, name: str, by: int = 1) -> None:
  if stats is not None:
    stats[name] = stats.get(name, 0) + by


def _check_seq_len(seq_len: int) -> None:
  if seq_len < 3:
    raise ValueError(f'train.seq_len={seq_len} is too short for [CLS] text [SEP]; use >= 3')


def _layout(tokenizer, pieces: Sequence[int], seq_len: int, stats: dict | None) -> np.ndarray:
  """Returns [CLS] pieces [SEP] PAD... (the tokenizer's ids), seq_len long, pieces cut to fit."""
  room = seq_len - 2
  if len(pieces) > room:
    _bump(stats, 'truncated')
    _bump(stats, 'pieces_dropped', len(pieces) - room)
    pieces = pieces[:room]
  row = np.full(seq_len, tokenizer.pad_id, np.int32)
  row[0] = tokenizer.cls_id
  row[1:1 + len(pieces)] = pieces
  row[1 + len(pieces)] = tokenizer.sep_id
  return row


def encode_text(tokenizer, text: str, seq_len: int, *, stats: dict | None = None) -> np.ndarray:
  """Returns int32 (seq_len,): [CLS] pieces of the cleaned text [SEP] then PAD, cut to fit.

  With `stats` (a dict), a cut text adds 1 to stats['truncated'] and its lost pieces to
  stats['pieces_dropped'].
  """
  _check_seq_len(seq_len)
  return _layout(tokenizer, tokenizer.encode(corpus.clean_document(text)), seq_len, stats)


def encode_texts(tokenizer, texts: Iterable[str], seq_len: int, *,
                 stats: dict | None = None) -> np.ndarray:
  """Returns int32 (N, seq_len): encode_text of each text, tokenized by the batch encoder."""
  _check_seq_len(seq_len)
  cleaned = [corpus.clean_document(t) for t in texts]
  if not cleaned:
    return np.zeros((0, seq_len), np.int32)
  pieces = tokenizer.encode_batch(cleaned)
  return np.stack([_layout(tokenizer, p, seq_len, stats) for p in pieces])


def pair_lengths(len_a: int, len_b: int, room: int) -> tuple[int, int]:
  """Returns the pieces of a and b kept in room: the longer loses one at a time (ties: b's)."""
  if len_a + len_b <= room:
    return len_a, len_b
  if len_b <= room // 2:
    return room - len_b, len_b  # only a is cut
  if len_a <= (room + 1) // 2:
    return len_a, room - len_a  # only b is cut
  return (room + 1) // 2, room // 2


def _pair_layout(tokenizer, a: Sequence[int], b: Sequence[int], seq_len: int,
                 stats: dict | None) -> tuple[np.ndarray, np.ndarray]:
  """Returns ([CLS] a [SEP] b [SEP] PAD... ids, their token types 0..0 1..1 0..), seq_len each."""
  keep_a, keep_b = pair_lengths(len(a), len(b), seq_len - 3)
  if (keep_a, keep_b) != (len(a), len(b)):
    _bump(stats, 'truncated')
    _bump(stats, 'pieces_dropped', len(a) + len(b) - keep_a - keep_b)
  ids = np.full(seq_len, tokenizer.pad_id, np.int32)
  types = np.zeros(seq_len, np.int32)
  ids[0] = tokenizer.cls_id
  ids[1:1 + keep_a] = a[:keep_a]
  ids[1 + keep_a] = tokenizer.sep_id
  start = 2 + keep_a
  ids[start:start + keep_b] = b[:keep_b]
  ids[start + keep_b] = tokenizer.sep_id
  types[start:start + keep_b + 1] = 1
  return ids, types


def encode_pairs(tokenizer, texts_a: Sequence[str], texts_b: Sequence[str], seq_len: int, *,
                 stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns int32 (N, seq_len) ids [CLS] a [SEP] b [SEP] PAD... and (N, seq_len) token types.

  Types are 0 for [CLS] a [SEP] (and padding), 1 for b [SEP]. A pair over seq_len - 3 pieces loses
  pieces from the end of its longer text first (pair_lengths), counted as in encode_text.
  """
  if seq_len < 5:
    raise ValueError(f'train.seq_len={seq_len} is too short for [CLS] a [SEP] b [SEP]; use >= 5')
  if len(texts_a) != len(texts_b):
    raise ValueError(f'encode_pairs: {len(texts_a)} first texts but {len(texts_b)} second texts')
  if not len(texts_a):
    return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
  pieces_a = tokenizer.encode_batch([corpus.clean_document(t) for t in texts_a])
  pieces_b = tokenizer.encode_batch([corpus.clean_document(t) for t in texts_b])
  ids, types = zip(*(_pair_layout(tokenizer, a, b, seq_len, stats)
                     for a, b in zip(pieces_a, pieces_b)))
  return np.stack(ids), np.stack(types)


def word_pieces(tokenizer, word: str, cache: dict | None = None) -> list[int]:
  """Returns the pieces of one cleaned word (with its word-start marker); [UNK] when it has none."""
  if cache is not None and word in cache:
    return cache[word]
  clean = corpus.clean_document(word)
  # A leading space keeps the word-start marker for tokenizers that do not add one themselves.
  pieces = list(tokenizer.encode(' ' + clean)) if clean else []
  pieces = pieces or [int(tokenizer.unk_id)]
  if cache is not None:
    cache[word] = pieces
  return pieces


def encode_words(tokenizer, words: Sequence[str], seq_len: int, *, stats: dict | None = None,
                 cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (int32 (seq_len,) ids, int32 (len(words),) index of each word's first piece or -1).

  Each word is encoded on its own, so its first piece starts a word. The row is [CLS] pieces [SEP]
  PAD...; once a word does not fit, it and every later word are dropped (index -1), counted in
  stats['truncated_words'] and stats['truncated'] (examples). `cache` (a dict) memoizes words.
  """
  _check_seq_len(seq_len)
  ids = np.full(seq_len, tokenizer.pad_id, np.int32)
  starts = np.full(len(words), -1, np.int32)
  ids[0] = tokenizer.cls_id
  pos = 1
  for j, word in enumerate(words):
    pieces = word_pieces(tokenizer, str(word), cache)
    if pos + len(pieces) > seq_len - 1:
      _bump(stats, 'truncated')
      _bump(stats, 'truncated_words', len(words) - j)
      break
    starts[j] = pos
    ids[pos:pos + len(pieces)] = pieces
    pos += len(pieces)
  ids[pos] = tokenizer.sep_id
  return ids, starts


def digest(*arrays) -> str:
  """Returns a 16-hex-digit sha256 of the arrays' dtypes, shapes and contents."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f'{a.dtype.str}{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Evaluation batches


def to_host(x: jax.Array) -> np.ndarray:
  """Returns the whole array on this host (gathered from every process when it spans hosts)."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def split_counts(splits: Sequence[str]) -> dict[str, int]:
  """Returns the number of examples per split name."""
  return {s: int(sum(1 for x in splits if x == s)) for s in SPLITS}


def collect(forward, graphdef, params, rows: np.ndarray, batch_size: int,
            to_device) -> tuple[np.ndarray, ...]:
  """Returns forward's per-row outputs over all rows, in order, as host arrays (padding cut off).

  forward(graphdef, params, batch) returns a tuple of arrays whose first axis is the batch.
  """
  parts = []
  for batch in input_pipeline.eval_batches(rows, batch_size=batch_size):
    parts.append(tuple(to_host(o) for o in forward(graphdef, params, to_device(batch))))
  return tuple(np.concatenate(p)[:len(rows)] for p in zip(*parts))
