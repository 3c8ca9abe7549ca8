"""Training from mlmjax.prepare builds (data.prepared) and from mixtures of them (data.mixture).

A split of a build is a ShardRows: one (N, seq_len) int32 table over the split's shard files,
each memory-mapped (np.load(mmap_mode='r')) when a row of it is first read. The token cache's batch
order applies unchanged (input_pipeline.train_batches): the batch of step s is
rows[epoch_permutation(N, seed, e)[i*B:(i+1)*B]] with (e, i) = divmod(s, steps per epoch), and a
process reads only the rows of its slice, from whichever shards hold them.

A Mixture serves each step's rows itself (step_rows). Global row t (t = s * B + r) belongs to
mixing block t // MIX_BLOCK; each block holds every source's quota of its MIX_BLOCK rows
(largest remainder of the weights) in an order drawn from (seed, block). A row drawn from source
j is the next row of j's own stream, which reads j's rows in a fresh permutation each epoch
(seeded by seed, j and the epoch): every row of a source once per epoch of that source, and
all of it a pure function of (seed, t). docs/data.md has the commands.

The side tables (the n-gram baselines, the PMI vocabulary) read sample_rows: a seeded uniform
sample of a bounded number of training rows (a mixture's in its weights), read in chunks.
"""

import collections
import dataclasses
import hashlib
import json
import mmap
import pathlib
import threading
from typing import Callable, Sequence

import numpy as np

from mlmjax import input_pipeline, prepare
from mlmjax import tokenizer as tokenizer_lib

MIX_BLOCK = 1 << 16  # rows per mixing block: its quotas keep each share within 1/MIX_BLOCK


def _max_open() -> int:
  """Returns how many shard files a table keeps mapped: a quarter of the open-file limit."""
  try:
    import resource  # pylint: disable=g-import-not-at-top  (Unix only)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
  except (ImportError, OSError, ValueError):
    soft = 1024
  return int(min(max(soft // 4, 16), 1 << 14)) if soft > 0 else 1 << 14


# Each mapped file holds a file descriptor. A batch reads from up to B files, so tables of more
# files than this re-map some at every step (about 20 us each); the least recently read go.
_MAX_OPEN = _max_open()
_ORDER, _STREAM, _SIDE = 0, 1, 2  # seed words: a block's source order, a source's epochs, samples
SAMPLE_CHUNK = 8192  # rows sample_rows reads at a time


class ShardRows:
  """The rows of shard files as one (N, seq_len) int32 table, each file memory-mapped when read."""

  ndim = 2
  dtype = np.dtype(np.int32)

  def __init__(self, files: Sequence[pathlib.Path], counts: Sequence[int], seq_len: int,
               stored_dtype: str = 'uint16'):
    self.files = [pathlib.Path(f) for f in files]
    self.counts = [int(c) for c in counts]
    self.starts = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
    self.shape = (int(self.starts[-1]), int(seq_len))
    self.stored_dtype = np.dtype(stored_dtype)
    self._open = collections.OrderedDict()
    self._offsets = {}  # shard -> where its rows start in the file (after the .npy header)
    self._lock = threading.Lock()  # the tf.data thread and the main thread both read

  def __len__(self) -> int:
    return self.shape[0]

  def __repr__(self) -> str:
    return f'ShardRows({len(self.files)} files, shape={self.shape})'

  def _shard(self, k: int) -> np.ndarray:
    """Returns shard k memory-mapped, checked against the manifest's rows and dtype."""
    with self._lock:
      if k in self._open:
        self._open.move_to_end(k)
        return self._open[k]
      shape = (self.counts[k], self.shape[1])
      if k not in self._offsets:  # the first time: the header is read and checked
        rows = np.load(self.files[k], mmap_mode='r')
        if rows.shape != shape or rows.dtype != self.stored_dtype or not rows.flags.c_contiguous:
          raise ValueError(f'{self.files[k]}: holds {rows.dtype} rows of shape {rows.shape}, its '
                           f'manifest.json says {self.stored_dtype} {shape}; build it again '
                           '(python -m mlmjax.prepare)')
        self._offsets[k] = rows.offset
      else:  # mapped again without parsing the header (np.load costs about 8x more)
        with open(self.files[k], 'rb') as f:
          buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        rows = np.frombuffer(buffer, self.stored_dtype, shape[0] * shape[1],
                             self._offsets[k]).reshape(shape)
      self._open[k] = rows
      if len(self._open) > _MAX_OPEN:
        self._open.popitem(last=False)
      return rows

  def take(self, idx) -> np.ndarray:
    """Returns rows[idx] as a (len(idx), seq_len) int32 array, reading each shard once."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    out = np.empty((len(idx), self.shape[1]), np.int32)
    if not len(idx):
      return out
    if idx.min() < 0 or idx.max() >= len(self):
      raise IndexError(f'row index out of range [0, {len(self)})')
    shard = np.searchsorted(self.starts, idx, side='right') - 1
    order = np.argsort(shard, kind='stable')
    ks, firsts = np.unique(shard[order], return_index=True)
    for k, part in zip(ks.tolist(), np.split(order, firsts[1:])):
      out[part] = self._shard(k)[idx[part] - self.starts[k]]
    return out

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, slice):
      return self.take(np.arange(*key.indices(len(self))))
    if isinstance(key, (int, np.integer)):
      return self.take([key if key >= 0 else key + len(self)])[0]
    return self.take(key)

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy  # always a new array
    rows = self[:]
    return rows if dtype is None else rows.astype(dtype)


def concat(tables: Sequence[ShardRows]) -> ShardRows:
  """Returns the rows of several tables (of one seq_len and dtype) one after another."""
  return ShardRows([f for t in tables for f in t.files], [c for t in tables for c in t.counts],
                   tables[0].shape[1], str(tables[0].stored_dtype))


# ---------------------------------------------------------------------------------------------
# Opening a build


@dataclasses.dataclass(frozen=True)
class Build:
  """A finished build opened for training (read like input_pipeline.TokenCache)."""
  key: str  # digest of its shards' checksums: what checkpoints record as their data
  directory: pathlib.Path
  manifest: dict
  tokenizer: tokenizer_lib.TokenizerBase
  train_rows: ShardRows
  val_rows: ShardRows
  stats: dict


def _build_hint(directory: pathlib.Path) -> str:
  return f'python -m mlmjax.prepare --config CONFIG --out {directory}'


def _rows(directory: pathlib.Path, manifest: dict, split: str, key: str) -> ShardRows:
  """Returns the rows of one split of a build, each shard file checked for its size."""
  entries = [s for s in manifest['shards'] if s['split'] == split]
  for s in entries:
    path = directory / s['file']
    size = path.stat().st_size if path.is_file() else None
    if size != s['bytes']:
      raise ValueError(f'{key}={directory}: {s["file"]} is '
                       + ('missing' if size is None else f'{size:,} bytes, not {s["bytes"]:,}')
                       + f'; build it again: {_build_hint(directory)}')
  return ShardRows([directory / s['file'] for s in entries], [s['rows'] for s in entries],
                   manifest['seq_len'], manifest['dtype'])


def open_build(directory, seq_len: int, key: str = 'data.prepared') -> Build:
  """Returns the finished build in `directory`; ValueError naming `key` unless one of seq_len."""
  directory = pathlib.Path(directory)
  try:
    manifest = json.loads((directory / prepare.MANIFEST).read_text(encoding='utf-8'))
  except FileNotFoundError:
    raise ValueError(f'{key}={directory}: no {prepare.MANIFEST} (a missing or unfinished build); '
                     f'build it: {_build_hint(directory)}') from None
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise ValueError(f'{key}={directory}: {prepare.MANIFEST} is damaged; build it again: '
                     f'{_build_hint(directory)}') from None
  if manifest.get('format') != prepare.FORMAT:
    raise ValueError(f'{key}={directory}: a build of format {manifest.get("format")}, this '
                     f'mlmjax reads format {prepare.FORMAT}; build it again: '
                     f'{_build_hint(directory)}')
  if manifest['seq_len'] != seq_len:
    raise ValueError(f'{key}={directory} holds rows of {manifest["seq_len"]} tokens but '
                     f'train.seq_len={seq_len}: set train.seq_len={manifest["seq_len"]} or build '
                     f'another with --config.train.seq_len={seq_len}')
  t = manifest['tokenizer']
  path = directory / t['file']
  if prepare.sha256_file(path) != t['fingerprint']:
    raise ValueError(f'{key}={directory}: {t["file"]} is not the tokenizer its manifest names; '
                     f'build it again: {_build_hint(directory)}')
  tokenizer = tokenizer_lib.load_any(path)
  train, val = (_rows(directory, manifest, s, key) for s in prepare.SPLITS)
  checksums = [(s['file'], s['sha256']) for s in manifest['shards']]
  digest = hashlib.sha256(json.dumps([t['fingerprint'], checksums]).encode()).hexdigest()
  stats = {'prepared': str(directory), 'config_digest': manifest['config_digest'],
           'seq_len': manifest['seq_len'], 'tokenizer_fingerprint': t['fingerprint'],
           'vocab_size': t['vocab_size'], **manifest['splits']}
  return Build(f'prepared-L{seq_len}-{digest[:20]}', directory, manifest, tokenizer, train, val,
               stats)


def _checked_tokenizer(config, workdir, tokenizer, key: str, adapt):
  """Returns the build's tokenizer after checking it against the config and the workdir's."""
  stored = tokenizer_lib.stored_path(workdir) if workdir is not None else None
  if stored is not None and tokenizer_lib.load_any(stored).fingerprint != tokenizer.fingerprint:
    raise ValueError(f'{stored} is not the tokenizer of the build {key} names (this workdir '
                     'trained on other data); use a new --workdir')
  t_cfg = config.tokenizer
  if t_cfg.path:
    if tokenizer_lib.load_any(t_cfg.path).fingerprint != tokenizer.fingerprint:
      raise ValueError(f'tokenizer.path={t_cfg.path} is not the tokenizer of the build {key} '
                       'names; clear tokenizer.path (the build brings its own)')
  elif t_cfg.vocab_size != tokenizer.vocab_size:
    if adapt is None or not adapt.allowed('tokenizer.vocab_size'):
      raise ValueError(f'tokenizer.vocab_size={t_cfg.vocab_size}, but the tokenizer of the build '
                       f'{key} names has {tokenizer.vocab_size} pieces; set it to that')
    adapt.change(config, 'tokenizer.vocab_size', tokenizer.vocab_size,
                 f'the size of the tokenizer of the build {key} names')
  return tokenizer


def prepared_data(config, workdir, *, log: Callable[[str], None] = print, adapt=None,
                  process_count: int | None = None) -> input_pipeline.PreparedData:
  """Returns the tokenizer and rows of data.prepared (built when missing) or data.mixture.

  The tokenizer is copied into the workdir, as the token cache's is. A missing build is built in
  this process (workers spawned from a script without a __main__ guard would run the script
  again): `python -m mlmjax.prepare --workers N` builds a large corpus faster.
  process_count: processes of the run (None: JAX's).
  """
  seq_len = int(config.train.seq_len)
  if config.data.mixture:
    build = open_mixture(config.data.mixture, seq_len, log=log)
    key = 'data.mixture'
  else:
    directory = pathlib.Path(config.data.prepared)
    if not (directory / prepare.MANIFEST).is_file():
      if process_count is None:
        import jax  # pylint: disable=g-import-not-at-top  (only a run with a missing build asks)
        process_count = jax.process_count()
      if process_count > 1:
        raise ValueError(f'data.prepared={directory}: no {prepare.MANIFEST} (a missing or '
                         'unfinished build); build it before a multi-process run: '
                         f'{_build_hint(directory)} --process_index=I --process_count=P')
      log(f'data.prepared={directory}: no finished build there; building it in this process '
          f'({_build_hint(directory)} --workers N builds a large corpus faster)')
      prepare.build(config, directory, workers=1, log=log)
    build = open_build(directory, seq_len)
    s = build.stats
    log(f'prepared build {directory}: train {s["train"]["rows"]:,} rows in '
        f'{s["train"]["shards"]} shards, val {s["val"]["rows"]:,} rows')
    key = 'data.prepared'
  tokenizer = _checked_tokenizer(config, workdir, build.tokenizer, key, adapt)
  if workdir is not None:
    tokenizer_lib.store(tokenizer, workdir)
  return input_pipeline.PreparedData(tokenizer, build)


# ---------------------------------------------------------------------------------------------
# Mixtures


def parse_mixture(text: str) -> list[tuple[str, float]]:
  """Returns [(directory, weight)] of data.mixture 'DIR:WEIGHT,DIR:WEIGHT'; ValueError naming it."""
  out = []
  for part in text.split(','):
    directory, _, weight = part.strip().rpartition(':')
    try:
      w = float(weight)
    except ValueError:
      w = None
    if not directory or w is None or not w > 0 or not np.isfinite(w):
      raise ValueError(f'data.mixture={text!r}: write DIR:WEIGHT,DIR:WEIGHT with weights > 0 '
                       f'(not {part.strip()!r})')
    out.append((directory, w))
  if len({d for d, _ in out}) != len(out):
    raise ValueError(f'data.mixture={text!r} names a build twice')
  return out


def quotas(weights: Sequence[float], total: int) -> np.ndarray:
  """Returns int counts that sum to total, in proportion to weights (largest remainder)."""
  w = np.asarray(weights, dtype=np.float64)
  exact = w / w.sum() * total
  counts = np.floor(exact).astype(np.int64)
  short = total - int(counts.sum())
  counts[np.argsort(-(exact - counts), kind='stable')[:short]] += 1
  return counts


class Mixture:
  """Training rows drawn from several builds by weight; step_rows serves the rows of a step.

  Read as a table (rows[i], np.asarray), it is its sources' rows one after another; sample_ids
  draws from it in the weights' proportions.
  """

  ndim = 2

  def __init__(self, sources: Sequence[ShardRows], weights: Sequence[float], names: Sequence[str]):
    self.sources, self.names = list(sources), list(names)
    for name, source in zip(self.names, self.sources):
      if not len(source):
        raise ValueError(f'data.mixture: the build {name} has no training rows')
    self.quotas = quotas(weights, MIX_BLOCK)
    if (self.quotas == 0).any():
      raise ValueError(f'data.mixture: a weight below 1/{MIX_BLOCK} of the total draws no rows')
    self.table = concat(self.sources)
    self.shape = self.table.shape
    self._blocks = {}  # block -> (source of each row, its position in its source's stream)
    self._perms = {}  # (source, epoch) -> that epoch's row order
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key) -> np.ndarray:
    return self.table[key]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    return self.table.__array__(dtype, copy)

  def _block(self, block: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (source, position in that source's stream) of each row of a mixing block."""
    with self._lock:
      if (block, seed) not in self._blocks:
        labels = np.repeat(np.arange(len(self.quotas)), self.quotas)
        labels = np.random.default_rng([seed, _ORDER, block]).permutation(labels)
        position = np.empty(MIX_BLOCK, np.int64)
        for j, quota in enumerate(self.quotas.tolist()):
          position[labels == j] = block * quota + np.arange(quota)
        if len(self._blocks) > 2:
          self._blocks.clear()
        self._blocks[block, seed] = (labels, position)
      return self._blocks[block, seed]

  def sources_of(self, first: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (source, position in its stream) of global rows first .. first + count - 1."""
    labels, positions = [], []
    t, end = int(first), int(first) + int(count)
    while t < end:
      block, offset = divmod(t, MIX_BLOCK)
      take = min(end - t, MIX_BLOCK - offset)
      lab, pos = self._block(block, seed)
      labels.append(lab[offset:offset + take])
      positions.append(pos[offset:offset + take])
      t += take
    if not labels:
      return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(labels), np.concatenate(positions)

  def _perm(self, j: int, epoch: int, seed: int) -> np.ndarray:
    """Returns source j's row order in its epoch `epoch`."""
    with self._lock:
      if (j, epoch, seed) not in self._perms:
        if len(self._perms) > 2 * len(self.sources):
          self._perms.clear()
        n = len(self.sources[j])
        rng = np.random.default_rng([seed, _STREAM, j, epoch])
        self._perms[j, epoch, seed] = rng.permutation(n)
      return self._perms[j, epoch, seed]

  def row_ids(self, first: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (source, row of that source) of global rows first .. first + count - 1."""
    labels, positions = self.sources_of(first, count, seed)
    rows = np.empty_like(positions)
    for j, n in enumerate(len(s) for s in self.sources):
      sel = np.flatnonzero(labels == j)
      epochs, offsets = np.divmod(positions[sel], n)
      for e in np.unique(epochs).tolist():
        at = epochs == e
        rows[sel[at]] = self._perm(j, e, seed)[offsets[at]]
    return labels, rows

  def step_rows(self, step: int, *, global_batch: int, seed: int, process_index: int = 0,
                process_count: int = 1) -> np.ndarray:
    """Returns this process's (global_batch // process_count, L) int32 rows of step `step`."""
    part = input_pipeline.process_slice(global_batch, process_index, process_count)
    first = int(step) * global_batch + part.start
    labels, rows = self.row_ids(first, part.stop - part.start, seed)
    out = np.empty((len(rows), self.shape[1]), np.int32)
    for j, source in enumerate(self.sources):
      sel = np.flatnonzero(labels == j)
      if len(sel):
        out[sel] = source.take(rows[sel])
    return out

  def sample_ids(self, count: int, seed: int) -> np.ndarray:
    """Returns sorted table rows: each source's quota of count, uniform (all of a small source)."""
    starts = np.cumsum([0] + [len(s) for s in self.sources])
    ids = []
    for j, (source, quota) in enumerate(zip(self.sources, quotas(self.quotas, count).tolist())):
      rng = np.random.default_rng([seed, _SIDE, j])
      ids.append(starts[j] + np.sort(_draw(rng, len(source), quota)))
    return np.concatenate(ids)

  def shares(self, first: int, count: int, seed: int) -> np.ndarray:
    """Returns the share of each source among global rows first .. first + count - 1."""
    labels, _ = self.sources_of(first, count, seed)
    return np.bincount(labels, minlength=len(self.sources)) / max(len(labels), 1)


def _names(directories: Sequence[str]) -> list[str]:
  """Returns a short distinct name per build: its directory's name (with its index on a clash)."""
  names = [pathlib.Path(d).name or str(i) for i, d in enumerate(directories)]
  return [n if names.count(n) == 1 else f'{i}_{n}' for i, n in enumerate(names)]


def mixture_names(text: str) -> list[str]:
  """Returns the source names of data.mixture: what train/mix/* and eval/<name>/* are called."""
  return _names([d for d, _ in parse_mixture(text)])


class Interleaved:
  """Several tables' rows interleaved one at a time (a, b, a, b, ..., then the longer one's rest)."""

  ndim = 2
  dtype = np.dtype(np.int32)

  def __init__(self, tables: Sequence[ShardRows]):
    self.base = concat(tables)
    counts = np.array([len(t) for t in tables], np.int64)
    labels = np.repeat(np.arange(len(tables), dtype=np.int32), counts)
    within = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
    self.order = np.lexsort((labels, within))  # by place within its table, then by table
    self.sources = labels[self.order]  # the table of each row
    self.shape = self.base.shape

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
      return self.base.take([self.order[key]])[0]
    return self.base.take(self.order[key])

  __array__ = ShardRows.__array__


@dataclasses.dataclass(frozen=True)
class MixedBuild:
  """The builds of data.mixture opened for training (read like input_pipeline.TokenCache)."""
  key: str
  tokenizer: tokenizer_lib.TokenizerBase
  train_rows: Mixture
  val_rows: Interleaved  # the builds' validation rows, one of each in turn
  stats: dict


def open_mixture(text: str, seq_len: int, *, log: Callable[[str], None] = print) -> MixedBuild:
  """Returns the builds of data.mixture as one mixture; ValueError naming it when they differ."""
  entries = parse_mixture(text)
  builds = [open_build(d, seq_len, 'data.mixture') for d, _ in entries]
  for b in builds[1:]:
    if b.tokenizer.fingerprint != builds[0].tokenizer.fingerprint:
      raise ValueError(f'data.mixture: {b.directory} and {builds[0].directory} have different '
                       'tokenizers; build every source with one tokenizer.path')
  weights = [w for _, w in entries]
  names = _names([d for d, _ in entries])
  mix = Mixture([b.train_rows for b in builds], weights, names)
  total = sum(weights)
  spec = [[b.key, w / total] for b, w in zip(builds, weights)]
  key = 'mixture-' + hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:20]
  sources = {n: {'build': str(b.directory), 'weight': w / total, 'train_rows': len(b.train_rows),
                 'val_rows': len(b.val_rows)} for n, b, w in zip(names, builds, weights)}
  log('mixture: ' + ', '.join(f'{n} {s["weight"]:.3f} of {s["train_rows"]:,} rows ({s["build"]})'
                              for n, s in sources.items()))
  stats = {'mixture': sources, 'seq_len': seq_len,
           'tokenizer_fingerprint': builds[0].tokenizer.fingerprint,
           'vocab_size': builds[0].tokenizer.vocab_size,
           'train': {'rows': len(mix)}, 'val': {'rows': sum(len(b.val_rows) for b in builds)}}
  return MixedBuild(key, builds[0].tokenizer, mix, Interleaved([b.val_rows for b in builds]), stats)


# ---------------------------------------------------------------------------------------------
# Side tables: a bounded sample of the training rows


def _draw(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
  """Returns count of range(n) drawn uniformly without replacement (all of them when count >= n)."""
  if count >= n:
    return np.arange(n, dtype=np.int64)
  return rng.choice(n, size=count, replace=False).astype(np.int64)


def sample_ids(rows, max_rows: int, seed: int) -> np.ndarray:
  """Returns the sorted row indices of sample_rows: all rows when max_rows is 0 or >= len(rows)."""
  n = len(rows)
  if not max_rows or max_rows >= n:
    return np.arange(n, dtype=np.int64)
  if isinstance(rows, Mixture):
    return rows.sample_ids(max_rows, seed)
  return np.sort(_draw(np.random.default_rng([seed, _SIDE]), n, max_rows))


def sample_rows(rows, max_rows: int, seed: int, *, chunk_rows: int = SAMPLE_CHUNK,
                pad_id: int = tokenizer_lib.PAD_ID) -> tuple[np.ndarray, dict]:
  """Returns ((n, L) int32 rows drawn uniformly without replacement, what was drawn).

  rows: a table (ShardRows, a Mixture, an array or memmap); a Mixture's sample holds each source's
  share of its weights (all the rows of a source smaller than its share). Indices are sorted, so
  each shard is read in one sweep, chunk_rows at a time: only the sample is held in memory.
  The dict: rows, tokens (not padding), train_rows, fraction, seed.
  """
  ids = sample_ids(rows, max_rows, seed)
  out = np.empty((len(ids), rows.shape[1]), np.int32)
  for lo in range(0, len(ids), chunk_rows):
    out[lo:lo + chunk_rows] = rows[ids[lo:lo + chunk_rows]]
  n = len(rows)
  info = {'rows': len(ids), 'tokens': int(np.count_nonzero(out != pad_id)),
          'train_rows': n, 'fraction': len(ids) / n if n else 0.0, 'seed': int(seed)}
  return out, info


def describe_sample(info: dict) -> str:
  """Returns the sample of sample_rows in a few words for the log."""
  if info['rows'] == info['train_rows']:
    return f'all {info["rows"]:,} train rows ({info["tokens"]:,} tokens)'
  return (f'{info["rows"]:,} sampled train rows ({100 * info["fraction"]:.1f}% of '
          f'{info["train_rows"]:,}; {info["tokens"]:,} tokens; seed {info["seed"]})')
