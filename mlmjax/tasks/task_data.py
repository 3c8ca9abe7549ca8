"""What every fine-tuning task shares: reading examples, hash splits, encoding, metrics, eval batches.

Examples come from a JSON Lines file (one object per line; `.gz` too) or from `embedded:NAME`
(embedded_examples: tasks built from the stdlib's own documentation, walked by pydocs.api_entries).

Splits are deterministic and need no split file: the blake2b hash of a key read as a uniform number
u in [0, 1) puts an example in 'test' when u < test_fraction, in 'val' when u < test_fraction +
val_fraction, else in 'train'. The key is the example's `task_data.group_field` value when set (all
sentences of one Brown document land in one split), else its `task_data.id_field` value, else (id_field
'') the example's whole content. Adding or removing examples never moves the others.

Text is cleaned with corpus.clean_document (ftfy mojibake repair: the BBC articles' 'Â£' becomes
'£'; Unicode NFC; whitespace) before sentencepiece, as the pretraining corpus is. Rows take every
special id ([CLS], [SEP], [PAD], [UNK]) from the tokenizer: a WordPiece vocabulary imported from
Hugging Face has [CLS]=101, not the sentencepiece layout's 2.
"""

import collections
import functools
import gzip
import hashlib
import json
import os
import re
from typing import Any, Iterable, Sequence

import jax
import numpy as np

from mlmjax import corpus, input_pipeline
from mlmjax import pydocs
from mlmjax import tokenizer as tokenizer_lib

# The sentencepiece layout's ids (a sentencepiece tokenizer's own); rows use the tokenizer's ids.
PAD_ID, CLS_ID, SEP_ID, UNK_ID = (tokenizer_lib.PAD_ID, tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID,
                                  tokenizer_lib.UNK_ID)
SPLITS = ('train', 'val', 'test')
EMBEDDED = 'embedded:'


# ---------------------------------------------------------------------------------------------
# Reading examples


def read_examples(path: str, *, max_examples: int = 0) -> list[dict]:
  """Returns the example dicts of a JSON Lines file or of 'embedded:NAME' (the first max_examples > 0)."""
  path = str(path)
  if max_examples < 0:
    raise ValueError(f'task_data.max_examples={max_examples} must be >= 0 (0 keeps all)')
  if path.startswith(EMBEDDED):
    rows = embedded_examples(path[len(EMBEDDED):])
    return rows[:max_examples] if max_examples else rows
  if not path:
    raise ValueError("task_data.path is empty: set it to a JSON Lines file or 'embedded:NAME'")
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
  """Returns the split name of every row under the config's task_data id/group fields and fractions."""
  val, test = float(task_cfg.val_fraction), float(task_cfg.test_fraction)
  check_fractions(val, test)
  return [split_of(split_key(r, i, path, id_field=task_cfg.id_field,
                             group_field=task_cfg.group_field), val, test)
          for i, r in enumerate(rows, 1)]


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
# Metrics (gold and pred are integer class ids)


def confusion(gold, pred, n: int) -> np.ndarray:
  """Returns the (n, n) int64 confusion matrix: rows are gold classes, columns predictions."""
  gold = np.asarray(gold, np.int64).reshape(-1)
  pred = np.asarray(pred, np.int64).reshape(-1)
  if gold.shape != pred.shape:
    raise ValueError(f'confusion: {gold.size} gold labels but {pred.size} predictions')
  return np.bincount(gold * n + pred, minlength=n * n).reshape(n, n)


def accuracy(gold, pred) -> float:
  """Returns the fraction of predictions equal to gold (0.0 when there are none)."""
  gold, pred = np.asarray(gold).reshape(-1), np.asarray(pred).reshape(-1)
  return float(np.mean(gold == pred)) if gold.size else 0.0


def _prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Returns per-class precision, recall, F1, support and 'present' (in gold or predictions)."""
  tp = np.diag(cm).astype(np.float64)
  support, predicted = cm.sum(1), cm.sum(0)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  return precision, recall, f1, support, (support + predicted) > 0


def macro_f1(gold, pred, n: int) -> float:
  """Returns the mean F1 over the classes that occur in gold or in the predictions."""
  *_, f1, _, present = _prf(confusion(gold, pred, n))
  return float(f1[present].mean()) if present.any() else 0.0


def per_class_report(gold, pred, names: Sequence[str]) -> dict[str, dict[str, float]]:
  """Returns {name: precision, recall, f1, support} for the classes in gold or predictions."""
  precision, recall, f1, support, present = _prf(confusion(gold, pred, len(names)))
  return {names[k]: {'precision': float(precision[k]), 'recall': float(recall[k]),
                     'f1': float(f1[k]), 'support': int(support[k])}
          for k in np.flatnonzero(present)}


def class_table(per_class: dict[str, dict[str, float]], indent: str = '  ') -> list[str]:
  """Returns the lines of a precision / recall / F1 / support table."""
  width = max([len('class')] + [len(k) for k in per_class])
  lines = [f'{indent}{"class":<{width}}  precision  recall      f1  support']
  for name, m in per_class.items():
    lines.append(f'{indent}{name:<{width}}  {m["precision"]:9.3f}  {m["recall"]:6.3f}  '
                 f'{m["f1"]:6.3f}  {int(m["support"]):7d}')
  return lines


def final_split(record: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
  """Returns ('test' or 'val', its metrics without prefix) from a summary record, or None."""
  for split, prefix in (('test', 'test/'), ('val', 'eval/')):
    found = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
    if 'accuracy' in found:
      return split, found
  return None


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
