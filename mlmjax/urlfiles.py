"""Files named by URL (`gs://B/corpus/*.jsonl`, any scheme the installed library knows).

Read and written through Apache Beam's FileSystems where Beam is installed (mlmjax.prepare_beam's
environment, e.g. on Dataflow), else through tf.io.gfile (the training environment; tensorflow is
imported on first use). Local paths never come here: callers test is_url first.
"""

import contextlib
import gzip
import io
import re
from typing import Any, Iterator, Sequence


def is_url(path: Any) -> bool:
  """Returns whether `path` names a file by URL (scheme://...) rather than a local path."""
  return re.match(r'[A-Za-z][A-Za-z0-9+.-]*://', str(path)) is not None


def join(base: str, name: str) -> str:
  """Returns the URL of `name` inside the folder URL `base`."""
  return f'{base.rstrip("/")}/{name}'


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


def glob(pattern: str) -> list[str]:
  """Returns the files matching a URL glob, sorted."""
  fs = _beam()
  if fs is not None:
    return sorted(m.path for r in fs.match([pattern]) for m in r.metadata_list)
  gfile = _gfile()
  return sorted(p for p in gfile.glob(pattern) if not gfile.isdir(p))


def stat(path: str, *, missing_ok: bool = False) -> tuple[int, int] | None:
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
  if stat(path, missing_ok=True) is None:
    return None
  with open_url(path) as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to the file at a URL, replacing the one there."""
  delete([path])  # TensorFlow's ram:// appends to an existing file instead of replacing it
  with open_url(path, 'wb') as f:
    f.write(data)


def delete(paths: Sequence[str]) -> None:
  """Deletes the files at these URLs that exist."""
  paths = [p for p in paths if stat(p, missing_ok=True) is not None]
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
