"""Token cache on disk, packing to [CLS] ... [SEP] rows, and the resumable tf.data batch stream.

Without TensorFlow installed, train_batches yields the same batches from one background thread.

Data order is a pure function of (seed, epoch): the batch of step s is
rows[epoch_permutation(N, seed, e)[i*B:(i+1)*B]] with (e, i) = divmod(s, steps_per_epoch), so a
resumed run needs only its step to continue exactly where it stopped. Each epoch drops the last
N % B rows of its permutation (different rows each epoch).
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import os
import pathlib
import shutil
import socket
import time
import uuid
from typing import Callable, Iterator, Sequence

import numpy as np

from mlmjax import corpus, near_dups, vocab_extension
from mlmjax import tokenizer as tokenizer_lib
from mlmjax.tokenizer import CLS_ID, PAD_ID, SEP_ID

CACHE_FORMAT = 1  # bump when packing or the cache layout changes: old caches get a new key
MIN_CHUNK = 8  # shortest document piece worth starting at the end of a row
_ENCODE_CHUNK = 1024  # documents per encode_batch call
_DONE = 'DONE'


def split_documents(documents: Sequence[str], val_fraction: float,
                    groups: np.ndarray | None = None) -> tuple[list[int], list[int]]:
  """Returns (train indices, val indices), chosen by a blake2b hash of each document's text.

  groups: near_dups.Groups.of (document -> its group's id); a group follows the hash of its
  smallest text, so near-duplicates share a split and a document alone keeps its own.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'data.val_fraction={val_fraction} must satisfy 0 <= data.val_fraction < 1')
  key = list(documents)
  if groups is not None:
    smallest: dict[int, str] = {}
    for doc, g in zip(documents, groups.tolist()):
      if g not in smallest or doc < smallest[g]:
        smallest[g] = doc
    key = [smallest[g] for g in groups.tolist()]
  train, val = [], []
  for i, doc in enumerate(key):
    digest = hashlib.blake2b(doc.encode('utf-8'), digest_size=8).digest()
    # The hash read as a uniform number in [0, 1): a document's split never depends on the others.
    u = int.from_bytes(digest, 'big') / 2.0**64
    (val if u < val_fraction else train).append(i)
  return train, val


@dataclasses.dataclass(frozen=True)
class CorpusSplit:
  """The train/val document indices of a corpus and what near-duplicate grouping did."""
  train: list[int]
  val: list[int]
  groups: near_dups.Groups | None = None  # None: each document was hashed alone
  moved: int = 0  # documents whose split their group changed

  @property
  def stats(self) -> dict:
    """Returns the groups' counts plus 'moved' ({} without grouping)."""
    return {**self.groups.stats(), 'moved': self.moved} if self.groups is not None else {}


def split_corpus(documents: Sequence[str], val_fraction: float, near_dups_cfg) -> CorpusSplit:
  """Returns the split of documents, near-duplicates grouped first (data.near_dups)."""
  found = near_dups.group(documents, **near_dups.options(near_dups_cfg))
  train, val = split_documents(documents, val_fraction, found.of)
  _, alone_val = split_documents(documents, val_fraction)
  return CorpusSplit(train, val, found, len(set(val).symmetric_difference(alone_val)))


def _plan_chunks(lengths: np.ndarray, seq_len: int, min_chunk: int) -> np.ndarray:
  """Returns (K, 4) int64 rows (row, column, source offset, length): one per [CLS] piece [SEP]."""
  plan = []
  row, col, src = 0, 0, 0
  for n in lengths.tolist():
    while n > 0:
      room = seq_len - col - 2  # tokens that fit between a new [CLS] and its [SEP]
      if n <= room or (room >= min_chunk) or (col == 0):
        take = min(n, room)
        plan.append((row, col, src, take))
        col += take + 2
        src += take
        n -= take
        if seq_len - col < 3:  # not even one token fits with its [CLS] and [SEP]
          row, col = row + 1, 0
      else:
        row, col = row + 1, 0
  return np.array(plan, dtype=np.int64).reshape(-1, 4)


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int, *,
                   min_chunk: int = MIN_CHUNK, cls_id: int = CLS_ID, sep_id: int = SEP_ID,
                   pad_id: int = PAD_ID) -> np.ndarray:
  """Returns (N, seq_len) int32 rows of back-to-back [CLS] piece [SEP] units, PAD at row ends.

  Documents keep their order. A document longer than the room left in a row is cut: the part that
  fits ends this row (when at least min_chunk tokens fit; otherwise the row is closed) and the rest
  starts the next row as a new unit. Empty documents are skipped.
  """
  if seq_len < 3:
    raise ValueError(f'train.seq_len={seq_len} must be at least 3 ([CLS], one token, [SEP])')
  lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
  flat = (np.concatenate([np.asarray(t, dtype=np.int32).reshape(-1) for t in token_lists])
          if len(token_lists) else np.zeros(0, np.int32))
  plan = _plan_chunks(lengths, seq_len, min_chunk)
  num_rows = int(plan[-1, 0]) + 1 if len(plan) else 0
  out = np.full(num_rows * seq_len, pad_id, dtype=np.int32)
  if not len(plan):
    return out.reshape(0, seq_len)
  row, col, src, n = plan.T
  start = row * seq_len + col  # flat position of each unit's [CLS]
  out[start] = cls_id
  out[start + n + 1] = sep_id
  # Flat destination of every content token: its unit's start + 1 + its index within the unit.
  unit_of_token = np.repeat(np.arange(len(plan)), n)
  within = np.arange(len(unit_of_token)) - np.repeat(np.cumsum(n) - n, n)
  out[start[unit_of_token] + 1 + within] = flat[src[unit_of_token] + within]
  return out.reshape(num_rows, seq_len)


@dataclasses.dataclass(frozen=True)
class TokenCache:
  """Packed train/val rows on disk (memory-mapped) with their build statistics."""
  key: str
  directory: pathlib.Path
  train_rows: np.ndarray  # (N, L) int32, memory-mapped
  val_rows: np.ndarray  # (M, L) int32, memory-mapped
  stats: dict


def token_cache_key(corpus_key: str, tokenizer_fingerprint: str, *, seq_len: int,
                    val_fraction: float, seed: int, grouping: dict | None = None,
                    pad_id: int = PAD_ID) -> str:
  """Returns the cache directory name for this corpus, tokenizer, packing and split."""
  parts = {'format': CACHE_FORMAT, 'corpus': corpus_key, 'tokenizer': tokenizer_fingerprint,
           'seq_len': int(seq_len), 'val_fraction': float(val_fraction), 'seed': int(seed),
           'min_chunk': MIN_CHUNK, 'near_dups': grouping}
  if pad_id != PAD_ID:  # rows padded with a [PAD] other than 0 (earlier builds padded with 0)
    parts['pad_id'] = int(pad_id)
  spec = json.dumps(parts, sort_keys=True)
  return f'tokens-L{int(seq_len)}-{hashlib.sha256(spec.encode()).hexdigest()[:20]}'


def _is_complete(directory: pathlib.Path) -> bool:
  """Returns whether `directory` holds a finished cache (DONE is written last)."""
  return all((directory / f).is_file() for f in ('train.npy', 'val.npy', 'stats.json', _DONE))


def _load(directory: pathlib.Path, key: str) -> TokenCache:
  """Returns the TokenCache stored in a complete `directory`."""
  stats = json.loads((directory / 'stats.json').read_text())
  return TokenCache(key=key, directory=directory,
                    train_rows=np.load(directory / 'train.npy', mmap_mode='r'),
                    val_rows=np.load(directory / 'val.npy', mmap_mode='r'), stats=stats)


def _matches(stats: dict, tokenizer: tokenizer_lib.Tokenizer, seq_len: int) -> bool:
  """Returns whether cached stats were built with this tokenizer and seq_len."""
  return (stats.get('tokenizer_fingerprint') == tokenizer.fingerprint
          and stats.get('seq_len') == seq_len and stats.get('format') == CACHE_FORMAT)


def _host_tag() -> str:
  """Returns a short filesystem-safe tag of this host's name."""
  return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_dir(cache_root: pathlib.Path, key: str) -> pathlib.Path:
  """Returns a fresh temporary name beside `key` in cache_root that records this host and process."""
  return cache_root / f'.{key}.tmp-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}'


def _remove_dead_temps(cache_root: pathlib.Path, key: str, log: Callable[[str], None]) -> None:
  """Deletes build directories of `key` left by processes of this host that no longer run."""
  for tmp in cache_root.glob(f'.{key}.tmp-{_host_tag()}-*'):
    try:
      os.kill(int(tmp.name.split('-')[-2]), 0)  # raises ProcessLookupError when it is gone
      continue
    except PermissionError:
      continue  # alive, owned by another user
    except (ProcessLookupError, ValueError):
      pass
    log(f'token cache: removing {tmp}, left by a build that did not finish')
    shutil.rmtree(tmp, ignore_errors=True)


def _save_npy(path: pathlib.Path, array: np.ndarray) -> None:
  """Writes `array` to `path` as .npy and flushes it to disk."""
  with open(path, 'wb') as f:
    np.save(f, array)
    f.flush()
    os.fsync(f.fileno())


def _encode_all(tokenizer: tokenizer_lib.Tokenizer, docs: list[str]) -> list[list[int]]:
  """Returns the ids of each document, encoded in batches."""
  ids = []
  for i in range(0, len(docs), _ENCODE_CHUNK):
    ids.extend(tokenizer.encode_batch(docs[i:i + _ENCODE_CHUNK]))
  return ids


def _split_stats(token_lists: list[list[int]], rows: np.ndarray, pad_id: int) -> dict:
  """Returns JSON-able counts for one split."""
  tokens = int(sum(len(t) for t in token_lists))
  return {'documents': len(token_lists), 'empty_documents': sum(1 for t in token_lists if not t),
          'tokens': tokens, 'rows': int(rows.shape[0]),
          'padding_fraction': float((rows == pad_id).mean()) if rows.size else 0.0}


def _build(directory: pathlib.Path, key: str, documents: Sequence[str], split: CorpusSplit,
           tokenizer: tokenizer_lib.Tokenizer, seq_len: int, val_fraction: float,
           seed: int) -> dict:
  """Encodes, shuffles and packs the documents of each split into `directory`; returns the stats."""
  rng = np.random.default_rng(seed)
  stats = {'format': CACHE_FORMAT, 'key': key, 'seq_len': seq_len,
           'tokenizer_fingerprint': tokenizer.fingerprint, 'vocab_size': tokenizer.vocab_size,
           'val_fraction': val_fraction, 'seed': seed, 'min_chunk': MIN_CHUNK,
           'near_duplicates': split.stats}
  for name, idx in (('train', split.train), ('val', split.val)):
    # Shuffled document order, so that one row mixes documents from anywhere in the corpus.
    order = [idx[j] for j in rng.permutation(len(idx))]
    token_lists = _encode_all(tokenizer, [documents[i] for i in order])
    rows = pack_documents(token_lists, seq_len, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
                          pad_id=tokenizer.pad_id)
    _save_npy(directory / f'{name}.npy', rows)
    stats[name] = _split_stats(token_lists, rows, tokenizer.pad_id)
  return stats


def load_or_build_token_cache(cache_root: str | os.PathLike, key: str, *,
                              documents_fn: Callable[[], Sequence[str]],
                              tokenizer: tokenizer_lib.Tokenizer, seq_len: int,
                              val_fraction: float, seed: int,
                              split_fn: Callable[[Sequence[str]], CorpusSplit] | None = None,
                              log: Callable[[str], None] = print) -> TokenCache:
  """Returns the token cache cache_root/key, building it (atomically) only when not complete.

  split_fn(documents) gives the train/val split; None splits by each document's own hash.
  """
  cache_root = pathlib.Path(cache_root)
  final = cache_root / key
  if _is_complete(final):
    cache = _load(final, key)
    if _matches(cache.stats, tokenizer, seq_len):
      log(f'token cache: reusing {final} ({cache.stats["train"]["rows"]} train rows, '
          f'{cache.stats["val"]["rows"]} val rows)')
      return cache
    log(f'token cache: {final} was built with another tokenizer or seq_len; rebuilding it')
  elif final.exists():
    log(f'token cache: {final} is incomplete (no {_DONE} marker); rebuilding it')
  start = time.perf_counter()
  cache_root.mkdir(parents=True, exist_ok=True)
  _remove_dead_temps(cache_root, key, log)
  tmp = _temp_dir(cache_root, key)
  tmp.mkdir()
  try:
    documents = list(documents_fn())
    if split_fn is None:
      split = CorpusSplit(*split_documents(documents, val_fraction))
    else:
      split = split_fn(documents)
    stats = _build(tmp, key, documents, split, tokenizer, seq_len, val_fraction, seed)
    stats['build_seconds'] = round(time.perf_counter() - start, 3)
    (tmp / 'stats.json').write_text(json.dumps(stats, indent=1, sort_keys=True))
    (tmp / _DONE).write_text('')
    if final.exists():
      shutil.rmtree(final)
    try:
      os.rename(tmp, final)
    except OSError:
      if not _is_complete(final):  # another process finished the same cache first: use theirs
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  cache = _load(final, key)
  s = cache.stats
  log(f'token cache: built {final} in {time.perf_counter() - start:.1f}s: '
      f'train {s["train"]["documents"]} docs, {s["train"]["tokens"]} tokens, '
      f'{s["train"]["rows"]} rows ({100 * s["train"]["padding_fraction"]:.1f}% padding); '
      f'val {s["val"]["documents"]} docs, {s["val"]["rows"]} rows'
      + (f'; {near_dup_text(s["near_duplicates"])}' if s.get('near_duplicates') else ''))
  return cache


def near_dup_text(stats: dict) -> str:
  """Returns one line of a CorpusSplit's stats: groups, documents in them, documents moved."""
  return (f'near-duplicates: {stats["groups"]:,} groups of {stats["documents_in_groups"]:,} '
          f'documents (largest {stats["largest_group"]}), {stats["moved"]:,} moved to their '
          "group's split")


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
  """Returns the number of full global batches in one pass over num_rows rows."""
  if global_batch <= 0:
    raise ValueError(f'train.batch_size={global_batch} must be positive')
  steps = num_rows // global_batch
  if steps == 0:
    raise ValueError(f'train.batch_size={global_batch} exceeds the {num_rows} packed training rows: '
                     'lower train.batch_size (or train.seq_len) or use more text')
  return steps


def data_position(step: int, num_rows: int, global_batch: int) -> dict:
  """Returns {'epoch': e, 'offset': i}: step `step` reads batch i of epoch e."""
  epoch, offset = divmod(int(step), steps_per_epoch(num_rows, global_batch))
  return {'epoch': epoch, 'offset': offset}


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
  """Returns the row order of `epoch`, a pure function of (num_rows, seed, epoch)."""
  if seed < 0 or epoch < 0:
    raise ValueError(f'seed={seed} and epoch={epoch} must be non-negative')
  return np.random.default_rng([seed, epoch]).permutation(num_rows)


def process_slice(global_rows: int, process_index: int, process_count: int) -> slice:
  """Returns this process's contiguous part of a global batch of rows (train and eval alike)."""
  local = global_rows // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _batch_indices(perm: np.ndarray, offset: int, global_batch: int, process_index: int,
                   process_count: int) -> np.ndarray:
  """Returns the row indices of this process's slice of batch `offset` of an epoch."""
  batch = perm[offset * global_batch:(offset + 1) * global_batch]
  return batch[process_slice(global_batch, process_index, process_count)]


def _gather(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """Returns rows[idx] as an array, reading a memmap in ascending index order."""
  order = np.argsort(idx, kind='stable')
  out = np.empty((len(idx), rows.shape[1]), dtype=np.int32)
  out[order] = rows[idx[order]]
  return out


def global_batch_rows(rows: np.ndarray, step: int, *, global_batch: int, seed: int) -> np.ndarray:
  """Returns the (global_batch, L) rows of step `step` (the reference for train_batches)."""
  epoch, offset = divmod(int(step), steps_per_epoch(len(rows), global_batch))
  perm = epoch_permutation(len(rows), seed, epoch)
  return _gather(rows, _batch_indices(perm, offset, global_batch, 0, 1))


def _import_tf():
  """Returns tensorflow, hidden from the accelerators JAX owns."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass  # already initialized, or no such device type
  return tf


def _thread_stream(fetch: Callable[[int], np.ndarray], start_step: int,
                   prefetch: int) -> Iterator[np.ndarray]:
  """Yields fetch(s) for s = start_step, start_step + 1, ..., computed `prefetch` steps ahead."""
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='mlmjax-batches') as pool:
    ahead = collections.deque()
    for step in itertools.count(start_step):
      while len(ahead) <= prefetch:
        ahead.append(pool.submit(fetch, step + len(ahead)))
      yield ahead.popleft().result()


def train_batches(rows: np.ndarray, *, global_batch: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  prefetch: int = 2) -> Iterator[np.ndarray]:
  """Returns an endless iterator of this process's (global_batch // process_count, L) batches.

  The batch of step s is the same whatever start_step the iterator began at. rows: an (N, L)
  array, memmap or shards.ShardRows; or an object whose step_rows(step, global_batch=, seed=,
  process_index=, process_count=) serves each step's rows itself (shards.Mixture).
  """
  if global_batch % process_count:
    raise ValueError(f'train.batch_size={global_batch} must be divisible by the number of '
                     f'processes ({process_count})')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, {process_count})')
  if rows.ndim != 2:
    raise ValueError(f'rows must be (num_rows, seq_len), got shape {rows.shape}')
  num_rows, seq_len = rows.shape
  spe = steps_per_epoch(num_rows, global_batch)
  local = global_batch // process_count
  perms = {}  # the current epoch's permutation, computed once per epoch
  step_rows = getattr(rows, 'step_rows', None)

  def fetch(step):
    if step_rows is not None:
      return step_rows(int(step), global_batch=global_batch, seed=seed,
                       process_index=process_index, process_count=process_count)
    epoch, offset = divmod(int(step), spe)
    if epoch not in perms:
      perms.clear()
      perms[epoch] = epoch_permutation(num_rows, seed, epoch)
    idx = _batch_indices(perms[epoch], offset, global_batch, process_index, process_count)
    return _gather(rows, idx)

  try:
    tf = _import_tf()
  except ImportError:  # e.g. a GPU image without TensorFlow: the same batches, one thread ahead
    return _thread_stream(fetch, int(start_step), prefetch)
  ds = tf.data.Dataset.range(int(start_step), 2**62)
  ds = ds.map(lambda s: tf.ensure_shape(tf.numpy_function(fetch, [s], tf.int32),
                                        (local, seq_len)))
  if prefetch > 0:
    ds = ds.prefetch(prefetch)
  return ds.as_numpy_iterator()


def eval_batches(rows: np.ndarray, *, batch_size: int, num_batches: int = 0,
                 pad_id: int = PAD_ID) -> list[np.ndarray]:
  """Returns fixed in-order (batch_size, L) validation batches; the last is padded with pad_id rows."""
  if batch_size <= 0:
    raise ValueError(f'eval.batch_size={batch_size} must be positive')
  if num_batches < 0:
    raise ValueError(f'eval.num_batches={num_batches} must be >= 0 (0 = the whole split)')
  total = -(-len(rows) // batch_size)
  count = min(total, num_batches) if num_batches else total
  batches = []
  for b in range(count):
    part = np.asarray(rows[b * batch_size:(b + 1) * batch_size], dtype=np.int32)
    if len(part) < batch_size:
      part = np.concatenate([part, np.full((batch_size - len(part), rows.shape[1]), pad_id,
                                           np.int32)])
    batches.append(part)
  return batches


# ---------------------------------------------------------------------------------------------
# The whole data stage for a run: corpus -> tokenizer -> token cache, each cached on disk.


@dataclasses.dataclass
class PreparedData:
  """What a run reads: its tokenizer and its token cache."""
  tokenizer: tokenizer_lib.Tokenizer
  cache: TokenCache


def cache_root(data_cfg) -> pathlib.Path:
  """Returns the cache directory: data.cache_dir, else $MLMJAX_CACHE, else ~/.cache/mlmjax."""
  root = data_cfg.cache_dir or os.environ.get('MLMJAX_CACHE') or os.path.expanduser('~/.cache/mlmjax')
  return pathlib.Path(root)


def _digest(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cleaned_documents(data_cfg, root: pathlib.Path, *, log=print) -> list[str]:
  """Returns the cleaned corpus, from root/corpus/<key>.jsonl when an earlier run wrote it."""
  key = corpus.corpus_key(data_cfg)
  path = root / 'corpus' / f'{key}.jsonl'
  if path.exists():
    with open(path, encoding='utf-8') as f:
      return [json.loads(line) for line in f]
  t = time.perf_counter()
  docs, report = corpus.load_documents(data_cfg)
  log(f'corpus {data_cfg.corpus!r}: {len(docs)} documents after cleaning '
      f'({time.perf_counter() - t:.1f} s)\n{report.summary()}')
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _temp_dir(path.parent, path.name)  # one per writer: runs started together each write theirs
  with open(tmp, 'w', encoding='utf-8') as f:
    for d in docs:
      f.write(json.dumps(d, ensure_ascii=False) + '\n')
  os.replace(tmp, path)
  return docs


def decontaminate(docs: list[str], texts: Sequence[str], data_cfg, *, log=print) -> list[str]:
  """Returns docs without those holding >= data.decontaminate.min_share of one of texts' n-grams."""
  cfg = data_cfg.decontaminate
  t = time.perf_counter()
  found = near_dups.contained(docs, texts, ngram=int(data_cfg.near_dups.ngram),
                              min_share=float(cfg.min_share))
  s = found.stats()
  log(f'decontaminate: {s["texts"]:,} of {s["of_texts"]:,} fine-tuning val/test texts are inside '
      f'{s["documents"]:,} of {s["of_documents"]:,} pretraining documents, which are dropped '
      f'({time.perf_counter() - t:.1f} s)')
  return [d for d, hit in zip(docs, found.documents) if not hit]


def _near_dups_key(data_cfg) -> dict | None:
  """Returns the data.near_dups settings that shape the split (None when grouping is off)."""
  near_dups.check(data_cfg)
  cfg = data_cfg.near_dups
  if not cfg.threshold:
    return None
  return {**near_dups.options(cfg), 'datasketch': importlib.metadata.version('datasketch')}


# The longest passage data.passage_chars becomes when a corpus has too few documents to hold any out.
PASSAGE_CHARS = 2000


def _trained_tokenizer(config, root: pathlib.Path, ckey: str, nd_key, documents, split, log,
                       adapt):
  """Returns the tokenizer tokenizer.* trains on the training split (cached by its settings)."""
  t_cfg = config.tokenizer

  def path_of(vocab_size: int) -> pathlib.Path:
    settings = {**t_cfg.to_dict(), 'vocab_size': vocab_size}
    return root / 'tokenizers' / (_digest(ckey, config.data.val_fraction, settings,
                                          *([nd_key] if nd_key else [])) + '.model')

  def train(vocab_size: int):
    path = path_of(vocab_size)
    too_large = path.with_suffix('.too_large')  # remembers a size the text does not support
    if path.exists():
      return tokenizer_lib.Tokenizer.load(path)
    if too_large.exists():
      raise tokenizer_lib.VocabTooLarge(*json.loads(too_large.read_text()))
    docs = documents()
    t = time.perf_counter()
    try:
      tokenizer = tokenizer_lib.train_tokenizer(
          [docs[i] for i in split(docs).train], path, vocab_size=vocab_size,
          model_type=t_cfg.model_type, character_coverage=t_cfg.character_coverage,
          max_sentences=t_cfg.max_sentences, seed=config.seed)
    except tokenizer_lib.VocabTooLarge as e:
      if e.limit is not None:
        tokenizer_lib.write_atomically(too_large, json.dumps([str(e), e.limit]).encode())
      raise
    log(f'trained a {t_cfg.model_type} tokenizer, {tokenizer.vocab_size} pieces '
        f'({time.perf_counter() - t:.1f} s)')
    return tokenizer

  try:
    return train(int(t_cfg.vocab_size))
  except tokenizer_lib.VocabTooLarge as e:
    if adapt is None or e.limit is None or not adapt.allowed('tokenizer.vocab_size'):
      raise
    tokenizer = train(e.limit)
    adapt.change(config, 'tokenizer.vocab_size', tokenizer.vocab_size,
                 f'the training split supports at most {e.limit} pieces')
    return tokenizer


class _TooFewDocuments(Exception):
  """A split is empty: prepare_data retries with documents cut into passages."""

  def __init__(self, docs: Sequence[str]):
    super().__init__()
    self.docs = docs


def prepare_data(config, workdir, *, exclude_texts: Sequence[str] = (), log=print,
                 adapt=None) -> PreparedData:
  """Returns the tokenizer and token cache of a run, building (and caching) whatever is missing.

  Tokenizer order: workdir/tokenizer.model or .json (a resumed run) > tokenizer.path (a .model,
  vocab.txt or tokenizer.json) > cached > trained on the training split. The tokenizer used is
  always copied to workdir/tokenizer.model (sentencepiece) or workdir/tokenizer.json (WordPiece).
  exclude_texts: fine-tuning val/test texts that data.decontaminate checks the corpus against.
  adapt: an adapt.Adaptations; then defaults that do not fit the data are changed in config, each
  with a note, instead of failing: a tokenizer.vocab_size larger than the training split supports
  becomes the largest it does, and a corpus with too few documents for both splits is cut into
  passages (data.passage_chars).
  """
  try:
    return _prepare_data(config, workdir, exclude_texts, log, adapt)
  except _TooFewDocuments as e:
    # About 20 held-out passages expected (val_fraction of them), 200 to 2,000 characters each.
    chars = sum(map(len, e.docs)) * config.data.val_fraction / 20
    size = int(min(max(chars // 100 * 100, 200), PASSAGE_CHARS))
    adapt.change(config, 'data.passage_chars', size,
                 f'{len(e.docs):,} document(s) leave a split empty; documents are cut into '
                 'passages so that some are held out for validation')
    return _prepare_data(config, workdir, exclude_texts, log, adapt)


def _prepare_data(config, workdir, exclude_texts: Sequence[str], log, adapt) -> PreparedData:
  """The body of prepare_data."""
  workdir = pathlib.Path(workdir)
  root = cache_root(config.data)
  ckey = corpus.corpus_key(config.data)
  if exclude_texts:  # the texts and the rule are part of the corpus
    ckey = _digest(ckey, list(exclude_texts), float(config.data.decontaminate.min_share),
                   int(config.data.near_dups.ngram))
  passage_chars = int(config.data.passage_chars)
  if passage_chars:
    ckey = _digest(ckey, 'passages', passage_chars)
  nd_key = _near_dups_key(config.data)
  memo = {}

  def documents():
    if 'docs' not in memo:
      docs = cleaned_documents(config.data, root, log=log)
      if passage_chars:
        n = len(docs)
        docs = corpus.passages(docs, passage_chars)
        log(f'passages: {n:,} documents -> {len(docs):,} passages of at most {passage_chars:,} '
            'characters (data.passage_chars)')
      memo['docs'] = decontaminate(docs, exclude_texts, config.data, log=log) if exclude_texts else docs
    return memo['docs']

  def too_few(docs):  # raises when adapt may cut documents into passages
    if (adapt is not None and config.data.val_fraction > 0 and not passage_chars
        and adapt.allowed('data.passage_chars')):
      raise _TooFewDocuments(docs)

  def split(docs):
    if 'split' not in memo:
      t = time.perf_counter()
      memo['split'] = split_corpus(docs, config.data.val_fraction, config.data.near_dups)
      if nd_key:
        log(f'{near_dup_text(memo["split"].stats)} ({time.perf_counter() - t:.1f} s)')
      if not len(memo['split'].train) or not len(memo['split'].val):
        too_few(docs)
    return memo['split']

  t_cfg = config.tokenizer
  stored = tokenizer_lib.stored_path(workdir) is not None
  tokenizer = tokenizer_lib.resolve(workdir, t_cfg.path)
  if t_cfg.extend_pieces and not stored:  # a resumed run's stored tokenizer is already extended
    if tokenizer is None:
      raise ValueError(f'tokenizer.extend_pieces={t_cfg.extend_pieces} extends an existing '
                       'tokenizer: set init_from (or tokenizer.path)')
    ext_path = root / 'tokenizers' / (_digest('extend', tokenizer.fingerprint, ckey,
                                              config.data.val_fraction, nd_key,
                                              int(t_cfg.extend_pieces), config.seed) + '.model')
    if ext_path.exists():
      tokenizer = tokenizer_lib.Tokenizer.load(ext_path)
    else:
      docs = documents()
      t = time.perf_counter()
      found = vocab_extension.extend(tokenizer, [docs[i] for i in split(docs).train],
                                     int(t_cfg.extend_pieces), seed=config.seed, log=log)
      ext_path.parent.mkdir(parents=True, exist_ok=True)
      tokenizer_lib.write_atomically(ext_path, found.tokenizer.serialized_model)
      tokenizer = tokenizer_lib.Tokenizer.load(ext_path)
      log(f'extended the tokenizer by {len(found.sources)} pieces learned from the training split '
          f'({found.base_vocab_size} -> {tokenizer.vocab_size}; {time.perf_counter() - t:.1f} s): '
          + ' '.join(found.pieces[:12]) + ' ...')
  if tokenizer is None:
    tokenizer = _trained_tokenizer(config, root, ckey, nd_key, documents, split, log, adapt)
  elif stored and adapt is not None and not t_cfg.path and not t_cfg.extend_pieces:
    if tokenizer.vocab_size < t_cfg.vocab_size and adapt.allowed('tokenizer.vocab_size'):
      adapt.change(config, 'tokenizer.vocab_size', tokenizer.vocab_size,
                   "the size of the tokenizer this run trained (the most its text supports)")

  # Packing order uses a fixed seed, so runs that differ only in config.seed share one cache;
  # config.seed drives the per-epoch row order instead.
  key = token_cache_key(ckey, tokenizer.fingerprint, seq_len=config.train.seq_len,
                        val_fraction=config.data.val_fraction, seed=0, grouping=nd_key,
                        pad_id=tokenizer.pad_id)
  cache = load_or_build_token_cache(root / 'tokens', key, documents_fn=documents, tokenizer=tokenizer,
                                    seq_len=config.train.seq_len,
                                    val_fraction=config.data.val_fraction, seed=0, split_fn=split,
                                    log=log)
  if not len(cache.val_rows):
    too_few(documents())
  tokenizer_lib.store(tokenizer, workdir)  # last: a retry with passages trains another
  return PreparedData(tokenizer, cache)
