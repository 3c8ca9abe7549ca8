"""Cleaning: clean documents, listed (load_documents) or streamed (iter_documents).

`data.corpus` names the source, read by sources.py (files and globs, local or URLs; `tfds:NAME`;
`pydocs`), which also applies `data.bad_input` to bad files, lines and rows.

Cleaning, in order, with per-rule counts in `CleaningReport`: ftfy mojibake / HTML-entity repair,
Unicode normalization, control and zero-width characters, whitespace; then documents that are
empty, shorter than `data.min_chars`, or exact duplicates are dropped, and `data.max_documents`
keeps the first N survivors. Near-duplicates are grouped later, before the split (near_dups.py).
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ftfy
import numpy as np

from mlmjax import sources

CORPUS_BUILDER_VERSION = 1

NORMALIZATIONS = ('NFC', 'NFKC', 'NFD', 'NFKD', '')
_DROP_RULES = ('empty', 'too_short', 'duplicate', 'max_documents')
_CHANGE_RULES = ('fix_text', 'normalization', 'control_chars', 'whitespace')


@dataclasses.dataclass
class CleaningReport:
  """Counts of what each cleaning rule did."""
  documents_in: int = 0
  documents_out: int = 0
  chars_in: int = 0
  chars_out: int = 0
  dropped: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(_DROP_RULES, 0))
  changed: dict[str, int] = dataclasses.field(
      default_factory=lambda: dict.fromkeys(_CHANGE_RULES, 0))
  skipped: dict[str, int] = dataclasses.field(
      default_factory=lambda: dict.fromkeys(sources.BAD_INPUT_KINDS, 0))
  first_skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # kind -> its message

  def summary(self) -> str:
    """Returns a few human-readable lines: totals, drops, changes, skipped bad input and where."""
    counts = lambda d: ', '.join(f'{k} {v:,}' for k, v in d.items())
    return '\n'.join([
        f'documents: {self.documents_in:,} in -> {self.documents_out:,} out; '
        f'characters: {self.chars_in:,} in -> {self.chars_out:,} out',
        f'dropped: {counts(self.dropped)}',
        f'changed: {counts(self.changed)}',
        f'skipped bad input: {counts(self.skipped)}',
        *(f'  first {kind}: {message}' for kind, message in self.first_skipped.items()),
    ])


# ---------------------------------------------------------------------------------------------
# Cleaning

# Control characters (C0, DEL, C1) are deleted except the ones mapped here; zero-width characters
# (incl. the BOM) are deleted; other line separators become '\n' and tabs become spaces.
_CONTROL_TABLE = {c: None for c in [*range(0x20), *range(0x7f, 0xa0)]}
_CONTROL_TABLE.update({ord('\n'): '\n', ord('\t'): ' ', ord('\r'): '\n', 0x0b: '\n', 0x0c: '\n',
                       0x85: '\n', 0x2028: '\n', 0x2029: '\n'})
_CONTROL_TABLE.update({c: None for c in (0x200b, 0x200c, 0x200d, 0x2060, 0xfeff)})
_CONTROL_CHARS = re.compile(
    '[' + ''.join(re.escape(chr(c)) for c in _CONTROL_TABLE if c != ord('\n')) + ']')
_ASCII_NEEDING_FTFY = re.compile(r'[&\x00-\x08\x0b-\x1f\x7f]')
_FTFY_CONFIG = ftfy.TextFixerConfig(normalization=None, explain=False)  # normalization is rule 2


def _plain_ascii(text: str) -> bool:
  return text.isascii() and not _ASCII_NEEDING_FTFY.search(text)


def _fix_text(text: str) -> str:
  """Returns `text` repaired by ftfy (mojibake, HTML entities, curly quotes, ...)."""
  # ftfy runs at ~1 MB/s. ASCII text without '&' or control characters is a fixed point of every
  # ftfy fixer (mojibake and ligatures need non-ASCII, entities need '&'), so skip such text.
  # ftfy.fix_text fixes each line on its own, except that a '<' turns HTML unescaping off for the
  # rest of the text ('auto' mode); doing the same here line by line gives ftfy's exact output
  # (for lines shorter than its 1 M-character segments).
  if _plain_ascii(text):
    return text
  config, out = _FTFY_CONFIG, []
  lines = text.split('\n')
  for i, line in enumerate(lines):
    segment = line + '\n' if i + 1 < len(lines) else line
    if config.unescape_html == 'auto' and '<' in segment:
      config = config._replace(unescape_html=False)
    out.append(segment if _plain_ascii(segment) else ftfy.fix_text(segment, config))
  return ''.join(out)


def _remove_control_chars(text: str) -> str:
  """Returns `text` without control / zero-width characters, with '\\n' line ends and no tabs."""
  if not _CONTROL_CHARS.search(text):
    return text
  return text.replace('\r\n', '\n').translate(_CONTROL_TABLE)


def _clean_whitespace(text: str) -> str:
  """Returns `text` with space runs collapsed, lines right-stripped, at most one blank line."""
  text = re.sub(r' {2,}', ' ', text).replace(' \n', '\n')
  return re.sub(r'\n{3,}', '\n\n', text).strip()


def _clean_steps(text: str, fix_text: bool, normalization: str) -> tuple[str, list[str]]:
  """Returns the cleaned text and the names of the rules that changed it."""
  steps = [('fix_text', _fix_text if fix_text else None),
           ('normalization',
            (lambda t: unicodedata.normalize(normalization, t)) if normalization else None),
           ('control_chars', _remove_control_chars),
           ('whitespace', _clean_whitespace)]
  changed = []
  for name, fn in steps:
    if fn is not None:
      new = fn(text)
      if new != text:
        changed.append(name)
        text = new
  return text, changed


def clean_document(text: str, *, fix_text: bool = True, normalization: str = 'NFC') -> str:
  """Returns `text` after mojibake repair, normalization, control-char and whitespace cleanup."""
  _check_normalization(normalization)
  return _clean_steps(text, fix_text, normalization)[0]


def _check_normalization(normalization: str) -> None:
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'data.normalization={normalization!r} is not one of {NORMALIZATIONS} '
                     "('' turns normalization off)")


def text_digest(text: str) -> int:
  """Returns the 64-bit hash by which exact duplicate documents are found."""
  return int.from_bytes(hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest(), 'little')


class DigestSet:
  """A set of 64-bit digests held in sorted NumPy runs: 8 bytes an entry, not a Python set's ~70.

  New digests wait in a Python set of at most `buffer`; a full buffer becomes a sorted run, and
  runs merge like a binary counter, so a lookup searches at most log2(n / buffer) + 1 runs. A
  2^27-bit filter on the top bits (16 MB, touched as filled) answers most absent digests without a
  search. Two different texts share a digest with probability about n^2 / 2^65 (1e-6 at 6 M).
  """

  def __init__(self, buffer: int = 1 << 18):
    self._buffer, self._new, self._runs = buffer, set(), []  # runs: sorted uint64, longest first
    self._bits = memoryview(np.zeros(1 << 24, np.uint8))  # calloc'd: pages are touched as set

  def __len__(self) -> int:
    return len(self._new) + sum(len(run) for run in self._runs)

  def __contains__(self, digest: int) -> bool:
    top = digest >> 37
    if not self._bits[top >> 3] >> (top & 7) & 1:
      return False
    if digest in self._new:
      return True
    key = np.uint64(digest)
    for run in self._runs:
      i = run.searchsorted(key)
      if i < len(run) and run[i] == key:
        return True
    return False

  def add(self, digest: int) -> bool:
    """Adds `digest` (an int in [0, 2^64)); returns False when it was already there."""
    if digest in self:
      return False
    top = digest >> 37
    self._bits[top >> 3] |= 1 << (top & 7)
    self._new.add(digest)
    if len(self._new) >= self._buffer:
      run = np.fromiter(self._new, np.uint64, len(self._new))
      self._new = set()
      while self._runs and len(self._runs[-1]) <= len(run):
        run = np.concatenate([self._runs.pop(), run])
      run.sort()  # in place: a merge holds the runs and one copy
      self._runs.append(run)
    return True


class _DropRules:
  """The rules that drop cleaned documents, applied in corpus order, counted into a report."""

  def __init__(self, report: CleaningReport, *, min_chars: int, dedup: bool, max_documents: int):
    self.report, self.min_chars, self.dedup, self.max_documents = (report, min_chars, dedup,
                                                                    max_documents)
    self._seen = DigestSet()  # digests of the kept texts: duplicates found without the texts

  def _full(self) -> bool:
    return bool(self.max_documents) and self.report.documents_out >= self.max_documents

  def read(self, raw: str) -> str | None:
    """Counts a raw document in; returns it, or None once max_documents are kept (not cleaned)."""
    self.report.documents_in += 1
    self.report.chars_in += len(raw)
    return None if self._full() else raw

  def keep(self, cleaned: tuple[str, list[str]] | None) -> bool:
    """Returns whether a (text, changed rules) of _clean_steps survives; None: past max_documents."""
    report = self.report
    if cleaned is None or self._full():
      report.dropped['max_documents'] += 1  # counted, not cleaned: truncation is the last rule
      return False
    text, changed = cleaned
    for name in changed:
      report.changed[name] += 1
    if not text:
      report.dropped['empty'] += 1
      return False
    if len(text) < self.min_chars:
      report.dropped['too_short'] += 1
      return False
    if self.dedup:
      if not self._seen.add(text_digest(text)):
        report.dropped['duplicate'] += 1
        return False
    report.documents_out += 1
    report.chars_out += len(text)
    return True


def _map_here(fn: Callable[[str], Any], items: Iterable[str | None]) -> Iterator[Any]:
  """Returns fn(item) for each item, in this process; None for None."""
  return (None if item is None else fn(item) for item in items)


_BREAKS = (re.compile(r'\n\s*\n'), re.compile(r'\n'), re.compile(r'[.!?]["\')\]]*\s'),
           re.compile(r'\s'))


def passages(docs: Iterable[str], max_chars: int) -> list[str]:
  """Returns docs with each one longer than max_chars cut into passages of at most max_chars.

  A cut falls at the last paragraph break in a passage's second half, else the last line break,
  sentence end or space there, else at max_chars; passages are stripped and empty ones dropped.
  """
  out = []
  for doc in docs:
    while len(doc) > max_chars:
      window = doc[:max_chars + 1]
      cut = max_chars
      for pattern in _BREAKS:
        ends = [m.end() for m in pattern.finditer(window, max_chars // 2)]
        if ends:
          cut = min(ends[-1], max_chars)
          break
      head, doc = doc[:cut].strip(), doc[cut:].lstrip()
      if head:
        out.append(head)
    if doc.strip():
      out.append(doc.strip())
  return out


# ---------------------------------------------------------------------------------------------
# Config

def _options(data_cfg: Any) -> dict[str, Any]:
  """Returns the validated cleaning fields of `data_cfg`."""
  opts = {name: getattr(data_cfg, name) for name in
          ('text_field', 'max_documents', 'min_chars', 'fix_text', 'normalization', 'dedup')}
  # Configs written before these keys existed read as the defaults.
  opts['bad_input'] = getattr(data_cfg, 'bad_input', 'skip')
  opts['max_line_chars'] = getattr(data_cfg, 'max_line_chars', 1_000_000)
  _check_normalization(opts['normalization'])
  if opts['bad_input'] not in sources.BAD_INPUT_POLICIES:
    raise ValueError(f'data.bad_input={opts["bad_input"]!r}: choose one of '
                     f'{sources.BAD_INPUT_POLICIES}')
  value = opts['max_line_chars']
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'data.max_line_chars={value!r} must be an integer >= 1')
  for name in ('max_documents', 'min_chars'):
    if isinstance(opts[name], bool) or not isinstance(opts[name], int) or opts[name] < 0:
      raise ValueError(f'data.{name}={opts[name]!r} must be an integer >= 0')
  if not isinstance(opts['text_field'], str) or not opts['text_field']:
    raise ValueError(f'data.text_field={opts["text_field"]!r} must name a field, e.g. "text"')
  return opts


def _spec(data_cfg: Any) -> str:
  spec = data_cfg.corpus
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"data.corpus={spec!r}: set it to 'pydocs', a .txt/.jsonl path or glob "
                     "(comma-separated), or 'tfds:NAME'")
  return spec.strip()


def corpus_key(data_cfg: Any) -> str:
  """Returns a 16-hex-digit fingerprint of the corpus spec and cleaning fields (reads no text)."""
  opts = _options(data_cfg)
  spec = _spec(data_cfg)
  if spec == 'pydocs':
    source = {'pydocs': True, 'python': platform.python_version(),
              'numpy': importlib.metadata.version('numpy'),
              'scipy': importlib.metadata.version('scipy')}
  elif spec.startswith('tfds:'):
    data_dir = data_cfg.tfds_data_dir
    source = {'tfds': spec[len('tfds:'):], 'split': data_cfg.tfds_split,
              'data_dir': os.path.abspath(os.path.expanduser(data_dir)) if data_dir else ''}
  else:
    source = {'files': [(p, *sources.url_stat(p)) if sources.is_url(p) else
                        (os.path.realpath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
                        for p in sources.expand_paths(spec)]}
  payload = {'builder': CORPUS_BUILDER_VERSION, 'source': source, 'cleaning': opts,
             'ftfy': ftfy.__version__, 'unicode': unicodedata.unidata_version}
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def iter_documents(data_cfg: Any, report: CleaningReport, *,
                   map_clean: Callable[..., Iterable[Any]] | None = None,
                   select: Callable[[Iterator[str]], Iterable[str]] | None = None) -> Iterator[str]:
  """Yields the cleaned documents of `data_cfg.corpus` that survive, in order, counting into report.

  Memory is one document plus about 8 bytes per kept document (DigestSet), not the corpus.
  map_clean(fn, raws): an ordered map, e.g. over worker processes, giving fn(raw) or None for None.
  select(raws): the raw documents to clean instead of all of them (e.g. a sample).
  """
  opts = _options(data_cfg)
  spec = _spec(data_cfg)
  bad = sources.BadInput(opts['bad_input'], opts['max_line_chars'])
  raw = sources.read_raw_documents(spec, text_field=opts['text_field'],
                                   tfds_split=data_cfg.tfds_split,
                                   tfds_data_dir=data_cfg.tfds_data_dir,
                                   tfds_download=data_cfg.tfds_download, bad_input=bad)
  if select is not None:
    raw = select(raw)
  rules = _DropRules(report, min_chars=opts['min_chars'], dedup=opts['dedup'],
                     max_documents=opts['max_documents'])
  clean = functools.partial(_clean_steps, fix_text=opts['fix_text'],
                            normalization=opts['normalization'])
  for cleaned in (map_clean or _map_here)(clean, (rules.read(text) for text in raw)):
    if rules.keep(cleaned):
      yield cleaned[0]
  report.skipped, report.first_skipped = dict(bad.counts), dict(bad.first)


def empty_corpus_error(data_cfg: Any, report: CleaningReport) -> ValueError:
  """Returns the error for a corpus with no documents left after cleaning, with the report's counts."""
  counts = ', '.join(f'{k} {v}' for k, v in report.dropped.items() if v)
  skipped = ', '.join(f'{k} {v}' for k, v in report.skipped.items() if v)
  first = next(iter(report.first_skipped.values()), None)
  return ValueError(f'data.corpus={_spec(data_cfg)!r} has no documents left after cleaning '
                    f'({report.documents_in} read; dropped: {counts or "none"}; '
                    f'skipped bad input: {skipped or "none"}); check the source or lower '
                    f'data.min_chars={data_cfg.min_chars}'
                    + (f'\nfirst skipped: {first}' if first else ''))


def load_documents(data_cfg: Any) -> tuple[list[str], CleaningReport]:
  """Returns the cleaned, deduplicated, filtered documents of `data_cfg.corpus` and a report."""
  report = CleaningReport()
  docs = list(iter_documents(data_cfg, report))
  if not docs:
    raise empty_corpus_error(data_cfg, report)
  return docs, report
