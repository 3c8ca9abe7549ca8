"""Text sources: the raw documents `data.corpus` names, before cleaning (corpus.py).

`data.corpus` names the source:

- `'pydocs'`, the embedded corpus every installation already has (no download): see pydocs.py.
- A path, a glob (`data/*.txt`), or several comma-separated ones, each expanded in sorted order:
  `.txt` (documents separated by blank lines, hard-wrapped lines joined with one space) and
  `.jsonl` (one JSON object per line, text in `data.text_field`), optionally gzipped (`.gz`).
  Paths and globs may be URLs (`gs://B/corpus/*.jsonl`; "Files named by URL" below).
- `'tfds:NAME'` (e.g. `tfds:imdb_reviews`): a prepared TensorFlow Datasets dataset, text from
  `data.text_field` of split `data.tfds_split`. It only downloads with `data.tfds_download=True`;
  otherwise missing data fails at once. `data.max_documents` stops cleaning, not reading: to read
  a part of a large dataset, slice the split (`train[:1%]`).

Bad input in files, with `data.bad_input='skip'` (the default) skipped and counted in
`CleaningReport.skipped` (the first of each kind is quoted in the log), with `'error'` a one-line
error naming the file and line: binary files (a NUL byte in the first 8 KiB: also UTF-16/32 text),
empty files, unreadable gzip files (the rest of a truncated one), lines that are not UTF-8 or longer
than `data.max_line_chars` (in a `.txt` file the whole paragraph holding such a line is dropped,
never spliced), `.jsonl` rows that are not a JSON object and rows without a string in
`data.text_field`. A file named literally in `data.corpus` (not only through a glob) that is
binary, empty or not gzip is an error under either policy: it was asked for by name.
"""

import contextlib
import glob
import gzip
import io
import json
import os
import pathlib
import re
import zlib
from typing import Any, Iterator, Sequence

from mlmjax import pydocs

BAD_INPUT_POLICIES = ('skip', 'error')
_SUFFIXES = ('.txt', '.jsonl', '.txt.gz', '.jsonl.gz')
# What data.bad_input='skip' skips, counted in CleaningReport.skipped.
BAD_INPUT_KINDS = ('binary_files', 'empty_files', 'unreadable_files', 'not_utf8_lines',
                   'long_lines', 'bad_json_rows', 'missing_field_rows')
_SNIFF_BYTES = 8192  # a NUL byte this early marks a file as binary (as git and grep decide)


class BadInput:
  """Applies data.bad_input while files are read: raises in 'error' mode, counts in 'skip' mode."""

  def __init__(self, policy: str = 'error', max_line_chars: int = 1_000_000):
    self.policy = policy
    self.max_line_chars = max_line_chars
    self.counts = dict.fromkeys(BAD_INPUT_KINDS, 0)
    self.first: dict[str, str] = {}

  def __call__(self, kind: str, message: str, *, strict: bool = False) -> None:
    """Raises ValueError(message) in 'error' mode or when strict; otherwise counts `kind`."""
    if strict or self.policy == 'error':
      raise ValueError(message)
    self.counts[kind] += 1
    self.first.setdefault(kind, message)


# ---------------------------------------------------------------------------------------------
# Files, TFDS and pydocs

def read_raw_documents(spec: str, *, text_field: str = 'text', tfds_split: str = 'train',
                       tfds_data_dir: str = '', tfds_download: bool = False,
                       bad_input: BadInput | None = None) -> Iterator[str]:
  """Returns an iterator over the raw (uncleaned) documents of `spec`; bad paths fail here.

  bad_input: what to do with bad files, lines and rows (None: raise at the first, as 'error').
  """
  spec = spec.strip()
  if spec == 'pydocs':
    return iter(pydocs.documents())
  if spec.startswith('tfds:'):
    return read_tfds(spec[len('tfds:'):], text_field, tfds_split, tfds_data_dir, tfds_download)
  return read_files(expand_sources(spec), text_field, bad_input or BadInput('error'))


def expand_paths(spec: str) -> list[str]:
  """Returns the files named by comma-separated paths/globs, each glob sorted, without repeats."""
  return list(expand_sources(spec))


def expand_sources(spec: str) -> dict[str, bool]:
  """Returns {file: named literally (not only matched by a glob)} in expand_paths' order."""
  paths = {}
  for part in (p.strip() for p in spec.split(',')):
    if not part:
      continue
    pattern = os.path.expanduser(part)
    if is_url(pattern):
      if glob.has_magic(pattern):
        matches = url_glob(pattern)
      else:
        matches = [pattern] if url_stat(pattern, missing_ok=True) else []
      if not matches:
        raise FileNotFoundError(f'data.corpus: {part!r} names no file; fix the URL in data.corpus')
    elif glob.has_magic(pattern):
      matches = [p for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
      if not matches:
        raise FileNotFoundError(f'data.corpus: the glob {part!r} matches no files '
                                f'(from {os.getcwd()}); fix the pattern in data.corpus')
    elif os.path.isdir(pattern):
      raise FileNotFoundError(f'data.corpus: {part!r} is a directory; name its files with a '
                              f"glob such as '{part.rstrip('/')}/*.txt'")
    elif not os.path.isfile(pattern):
      raise FileNotFoundError(f'data.corpus: corpus file {part!r} does not exist '
                              f'(from {os.getcwd()}); fix the path in data.corpus')
    else:
      matches = [pattern]
    for path in matches:
      if not path.endswith(_SUFFIXES):
        raise ValueError(f'data.corpus: {path} has an unsupported extension; supported: '
                         f'{", ".join(_SUFFIXES)}')
      paths[path] = paths.get(path, False) or not glob.has_magic(pattern)
  if not paths:
    raise FileNotFoundError(f'data.corpus={spec!r} names no files')
  return paths


def read_files(sources: dict[str, bool], text_field: str, bad: BadInput) -> Iterator[str]:
  for path, literal in sources.items():
    if _bad_file(path, bad, strict=literal):
      continue
    if path.endswith(('.jsonl', '.jsonl.gz')):
      yield from _read_jsonl(path, text_field, bad, literal)
    else:
      yield from _read_txt(path, bad, literal)


def _bad_file(path: str, bad: BadInput, *, strict: bool) -> bool:
  """Returns whether `path` is binary or not gzip (reported to `bad`), from its first bytes."""
  try:
    with open_binary(path) as f:
      head = f.read(_SNIFF_BYTES)
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    bad('unreadable_files', f'corpus file {path} is not a valid gzip file ({e})', strict=strict)
    return True
  nul = head.find(b'\x00')
  if nul >= 0:
    bad('binary_files', f'corpus file {path} looks binary (NUL byte at offset {nul}; UTF-16/32 '
        'text looks the same): name only UTF-8 text files in data.corpus', strict=strict)
    return True
  return False


def _decoded_lines(path: str, bad: BadInput, strict_file: bool) -> Iterator[tuple[int, str | None]]:
  """Yields (line number, line) of a UTF-8 file; the line is None where `bad` skipped it."""
  max_chars = bad.max_line_chars
  limit = 4 * max_chars + 4  # UTF-8 takes at most 4 bytes per character: more is over max_chars
  seen_text = skipped = False
  lineno = 0
  try:
    with open_binary(path) as f:
      while raw := f.readline(limit):
        lineno += 1
        where = f'corpus file {path} line {lineno}'
        too_long = len(raw) == limit and not raw.endswith(b'\n')
        while too_long and (rest := f.readline(1 << 20)) and not rest.endswith(b'\n'):
          pass  # read past the rest of an over-long line without holding it
        line = None
        if not too_long:
          try:
            line = raw.decode('utf-8')
          except UnicodeDecodeError as e:
            bad('not_utf8_lines', f'corpus file {path} is not UTF-8 at line {lineno}: byte '
                f'{raw[e.start:e.start + 1]!r} at column {e.start + 1} ({e.reason}); '
                're-encode it as UTF-8')
            skipped = True
            yield lineno, None
            continue
          if lineno == 1:
            line = line.removeprefix('\ufeff')
          too_long = len(line.rstrip('\r\n')) > max_chars
        if too_long:
          bad('long_lines', f'{where} is longer than data.max_line_chars={max_chars} characters '
              '(minified data or a dump?)')
          skipped = True
          yield lineno, None
          continue
        seen_text = seen_text or not line.isspace()
        yield lineno, line
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    bad('unreadable_files', f'corpus file {path} is not a valid gzip file after line {lineno} '
        f'({e}); the rest of it is skipped', strict=strict_file)
    return
  if not seen_text and not skipped:
    bad('empty_files', f'corpus file {path} is empty (no text)', strict=strict_file)


def _read_txt(path: str, bad: BadInput, strict_file: bool) -> Iterator[str]:
  """Yields the blank-line-separated documents of a text file, wrapped lines joined by spaces."""
  block, spoiled = [], False
  for _, line in _decoded_lines(path, bad, strict_file):
    if line is None:
      spoiled = True  # the paragraph around a skipped line is dropped, never spliced
      continue
    line = line.strip()
    if line:
      block.append(line)
    elif block or spoiled:
      if not spoiled:
        yield ' '.join(block)
      block, spoiled = [], False
  if block and not spoiled:
    yield ' '.join(block)


def _read_jsonl(path: str, text_field: str, bad: BadInput, strict_file: bool) -> Iterator[str]:
  """Yields `text_field` of each JSON object line of a .jsonl file."""
  for lineno, line in _decoded_lines(path, bad, strict_file):
    if line is None or not line.strip():
      continue
    where = f'corpus file {path} line {lineno}'
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      bad('bad_json_rows', f'{where}: not valid JSON ({e.msg} at column {e.colno}); '
          'each line must be one JSON object')
      continue
    if not isinstance(row, dict):
      bad('bad_json_rows', f'{where}: expected a JSON object, got {type(row).__name__}')
    elif text_field not in row:
      bad('missing_field_rows', f'{where} has no field {text_field!r} (fields: '
          f'{", ".join(row)}); set data.text_field to the field that holds the text')
    elif not isinstance(row[text_field], str):
      bad('missing_field_rows', f'{where}: field {text_field!r} is '
          f'{type(row[text_field]).__name__}, not a string')
    else:
      yield row[text_field]


def read_tfds(name: str, text_field: str, split: str, data_dir: str,
               download: bool) -> Iterator[str]:
  """Returns an iterator over `text_field` of a TFDS dataset split; fails fast when absent."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  where = f'data dir {data_dir or "(TFDS default)"}'
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f'data.corpus=tfds:{name}: TFDS knows no dataset {name!r} and none is '
                     f'prepared in {where}; check the name (e.g. tfds:imdb_reviews)') from None
  if not builder.is_prepared():
    if not download:
      raise FileNotFoundError(
          f'data.corpus=tfds:{name}: the dataset is not prepared in {where}; point '
          'data.tfds_data_dir at a prepared copy or set data.tfds_download=True '
          '(needs network access to its source)')
    builder.download_and_prepare()
  features = builder.info.features
  if text_field not in features:
    raise ValueError(f'data.text_field={text_field!r} is not a feature of tfds:{name} '
                     f'(features: {", ".join(sorted(features.keys()))})')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ('GPU', 'TPU'):  # tf.data must not take accelerator memory from JAX
    with contextlib.suppress(RuntimeError, ValueError):
      tf.config.set_visible_devices([], kind)
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except (ValueError, KeyError) as e:
    raise ValueError(f'data.tfds_split={split!r} is not a split of tfds:{name} '
                     f'(splits: {", ".join(builder.info.splits.keys())}): {e}') from None
  ds = ds.map(lambda ex: ex[text_field])
  return (t.decode('utf-8', errors='replace') if isinstance(t, bytes) else str(t)
          for t in ds.as_numpy_iterator())


# ---------------------------------------------------------------------------------------------
# Files named by URL (gs://B/corpus/*.jsonl, any scheme the installed library knows): through
# Apache Beam's FileSystems where Beam is installed (mlmjax.prepare_beam's environment, e.g. on
# Dataflow), else through tf.io.gfile (the training environment; tensorflow is imported on first
# use). Local paths never go through either.

def is_url(path: Any) -> bool:
  """Returns whether `path` names a file by URL (scheme://...) rather than a local path."""
  return re.match(r'[A-Za-z][A-Za-z0-9+.-]*://', str(path)) is not None


def join(base: str, name: str) -> str:
  """Returns the URL of `name` inside the folder URL `base`."""
  return f'{base.rstrip("/")}/{name}'


def in_folder(folder, name: str):
  """Returns the file `name` in a local folder (a Path) or a folder URL (a str)."""
  return join(str(folder), name) if is_url(folder) else pathlib.Path(folder) / name


def _beam():
  """Returns Beam's FileSystems class, or None where apache_beam is not installed."""
  try:
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return FileSystems


def _gfile():
  """Returns tf.io.gfile."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def url_glob(pattern: str) -> list[str]:
  """Returns the files matching a URL glob, sorted."""
  fs = _beam()
  if fs is not None:
    return sorted(m.path for r in fs.match([pattern]) for m in r.metadata_list)
  gfile = _gfile()
  return sorted(p for p in gfile.glob(pattern) if not gfile.isdir(p))


def url_stat(path: str, *, missing_ok: bool = False) -> tuple[int, int] | None:
  """Returns (size in bytes, modification time in ns) of the file at a URL (None: missing_ok)."""
  fs = _beam()
  if fs is not None:
    found = fs.match([path])[0].metadata_list if fs.exists(path) else []
    if found:
      return found[0].size_in_bytes, int(found[0].last_updated_in_seconds * 1e9)
  else:
    gfile = _gfile()
    if gfile.exists(path) and not gfile.isdir(path):
      info = gfile.stat(path)
      return info.length, info.mtime_nsec
  if missing_ok:
    return None
  raise FileNotFoundError(f'{path}: no such file')


class _Reader(io.RawIOBase):
  """A raw stream over any object with read(n), so that io.BufferedReader gives readline(limit)."""

  def __init__(self, f):
    super().__init__()
    self._f = f

  def readable(self) -> bool:
    return True

  def readinto(self, b) -> int:
    data = self._f.read(len(b))
    b[:len(data)] = data
    return len(data)

  def close(self) -> None:
    if not self.closed:
      self._f.close()
    super().close()


def open_url(path: str, mode: str = 'rb'):
  """Returns a binary file object for a URL ('rb' or 'wb'), bytes as stored (no decompression).

  A written object appears whole when the file is closed (object stores write no partial files).
  """
  fs = _beam()
  if fs is None:
    f = _gfile().GFile(path, mode)
  else:
    from apache_beam.io.filesystem import CompressionTypes  # pylint: disable=g-import-not-at-top
    f = (fs.create if mode == 'wb' else fs.open)(
        path, compression_type=CompressionTypes.UNCOMPRESSED)
  return f if mode == 'wb' else io.BufferedReader(_Reader(f), 1 << 20)


def read_bytes(path: str) -> bytes | None:
  """Returns the bytes of the file at a URL, or None when there is none."""
  if url_stat(path, missing_ok=True) is None:
    return None
  with open_url(path) as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to the file at a URL, replacing the one there."""
  if _beam() is None:
    delete([path])  # TensorFlow's ram:// appends to an existing file instead of replacing it
  with open_url(path, 'wb') as f:
    f.write(data)


def delete(paths: Sequence[str]) -> None:
  """Deletes the files at these URLs that exist."""
  paths = [p for p in paths if url_stat(p, missing_ok=True) is not None]
  fs = _beam()
  if fs is not None:
    if paths:
      fs.delete(paths)
    return
  for p in paths:
    _gfile().remove(p)


@contextlib.contextmanager
def open_binary(path: str) -> Iterator[Any]:
  """Opens a local path or a URL for reading bytes, gunzipped when it ends in .gz."""
  with open_url(path) if is_url(path) else open(path, 'rb') as raw:
    if path.endswith('.gz'):
      with gzip.GzipFile(fileobj=raw, mode='rb') as f:
        yield f
    else:
      yield raw
