"""Streaming, sharded token build: `python -m mlmjax.prepare --config CONFIG [--workers N] [--out DIR]`.

Documents stream from data.corpus through cleaning (corpus.iter_documents), data.passage_chars,
the train/val split (input_pipeline.split_documents' hash, each document alone), tokenization
(tokenizer.path's tokenizer, or one trained here on a bounded sample) and packing
(input_pipeline.pack_documents: the token cache's [CLS] piece [SEP] rows) into shard files.
Memory is bounded by a shard, not by the corpus.

The documents of each split fill groups in corpus order; a group closes once it holds
data.shard_chars characters, and group k of split s becomes the shard `s-0000k.npy`: (rows,
train.seq_len) ids, uint16 when the vocabulary fits (else int32), its documents packed in an order
drawn from (s, k). Which documents form a shard depends only on the corpus and the config, so the
bytes do not depend on --workers or on how many processes share the build.

Each shard is written under a temporary name and renamed when complete, then its meta file
`s-0000k.json` (counts, sha256, config digest, tokenizer fingerprint); manifest.json comes last,
written once every shard of the build is complete. A rerun keeps every shard whose meta and
checksum match and builds the rest. With --process_count=P, process i builds the shards k with
k % P == i; the last one to finish writes the manifest. mlmjax.prepare_beam runs the same
steps on Apache Beam. docs/data.md has the commands.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import heapq
import io
import itertools
import json
import multiprocessing
import pathlib
import re
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from mlmjax import cli, corpus, input_pipeline, sources
from mlmjax import tokenizer as tokenizer_lib

FORMAT = 1  # bump when the shard layout, the grouping or the packing order changes
PACK_SEED = 0  # fixed, as the token cache's packing seed: config.seed only shapes the tokenizer
SPLITS = ('train', 'val')
MANIFEST = 'manifest.json'
BUILD = 'build.json'  # the directory's config digest and tokenizer, written before any shard
_CLEAN_CHARS = 1 << 20  # raw characters per cleaning task sent to a worker
_CLEAN_DOCS = 1024  # at most this many documents per cleaning task
_ENCODE_CHUNK = 1024  # documents per encode_batch call
_READ_BLOCK = 1 << 24  # bytes read at a time to checksum a file


# ---------------------------------------------------------------------------------------------
# Worker processes


class _Workers:
  """N spawned worker processes (no JAX, nothing inherited) or, for N = 1, this process."""

  def __init__(self, n: int):
    self.n = n
    self._pool = (concurrent.futures.ProcessPoolExecutor(
        n, mp_context=multiprocessing.get_context('spawn')) if n > 1 else None)
    self._shards = collections.deque()

  def __enter__(self) -> '_Workers':
    return self

  def __exit__(self, *exc) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)

  def _submit(self, fn: Callable, *args) -> concurrent.futures.Future:
    if self._pool is not None:
      return self._pool.submit(fn, *args)
    future = concurrent.futures.Future()
    future.set_result(fn(*args))  # in this process an error raises here, at once
    return future

  def map(self, fn: Callable[[str], Any], items: Iterable[str | None]) -> Iterator[Any]:
    """Yields fn(item) (None for None) in order, computed in chunks, at most 2N chunks ahead."""
    pending = collections.deque()
    try:
      for chunk in _chunks(items):
        pending.append(self._submit(_map_chunk, fn, chunk))
        while len(pending) > 2 * self.n:
          yield from pending.popleft().result()
      while pending:
        yield from pending.popleft().result()
    finally:
      for future in pending:
        future.cancel()

  def shard(self, fn: Callable, *args) -> list[Any]:
    """Starts fn(*args); returns the results of earlier calls it waited for (at most N run at once)."""
    self._shards.append(self._submit(fn, *args))
    done = []
    while len(self._shards) > self.n:
      done.append(self._shards.popleft().result())
    return done

  def wait(self) -> list[Any]:
    """Returns the results of every shard call still running, once they finish."""
    done = [f.result() for f in self._shards]
    self._shards.clear()
    return done


def _chunks(items: Iterable[str | None]) -> Iterator[list[str | None]]:
  """Yields consecutive lists of items holding about _CLEAN_CHARS characters each."""
  chunk, chars = [], 0
  for item in items:
    chunk.append(item)
    chars += len(item) if item is not None else 0
    if chars >= _CLEAN_CHARS or len(chunk) >= _CLEAN_DOCS:
      yield chunk
      chunk, chars = [], 0
  if chunk:
    yield chunk


def _map_chunk(fn: Callable[[str], Any], chunk: list[str | None]) -> list[Any]:
  """Returns fn(item) for each item of a chunk, None for None (runs in a worker)."""
  return [None if item is None else fn(item) for item in chunk]


@dataclasses.dataclass(frozen=True)
class _Job:
  """What a worker needs to write a shard: the build's digest, tokenizer and row layout."""
  config_digest: str
  tokenizer_class: type
  tokenizer_model: bytes
  seq_len: int
  dtype: str


_LOADED: dict[str, Any] = {}  # this worker's tokenizer, by the sha256 of its model


def _worker_tokenizer(job: _Job):
  """Returns the job's tokenizer, loaded once per worker process."""
  key = hashlib.sha256(job.tokenizer_model).hexdigest()
  if key not in _LOADED:
    _LOADED.clear()
    _LOADED[key] = job.tokenizer_class(job.tokenizer_model, '<mlmjax.prepare>')
  return _LOADED[key]


def shard_order(split: str, index: int, num_documents: int) -> np.ndarray:
  """Returns the order in which shard `index` of `split` packs its documents (seeded by both)."""
  return np.random.default_rng([PACK_SEED, SPLITS.index(split), index]).permutation(num_documents)


def _write_shard(out: pathlib.Path, split: str, index: int, docs: list[str], job: _Job) -> dict:
  """Encodes and packs one group into out/NAME.npy, then writes out/NAME.json; returns that meta."""
  tok = _worker_tokenizer(job)
  order = shard_order(split, index, len(docs))
  ids = []
  for i in range(0, len(order), _ENCODE_CHUNK):
    batch = tok.encode_batch([docs[j] for j in order[i:i + _ENCODE_CHUNK]], num_threads=1)
    ids.extend(np.asarray(x, dtype=np.int32) for x in batch)
  rows = input_pipeline.pack_documents(ids, job.seq_len, cls_id=tok.cls_id, sep_id=tok.sep_id,
                                       pad_id=tok.pad_id)
  buffer = io.BytesIO()
  np.save(buffer, rows.astype(job.dtype))
  data = buffer.getvalue()
  name = shard_name(split, index)
  tokenizer_lib.write_atomically(out / f'{name}.npy', data)
  meta = {'file': f'{name}.npy', 'split': split, 'index': index, 'documents': len(docs),
          'chars': sum(map(len, docs)), 'rows': int(rows.shape[0]),
          'tokens': int(sum(map(len, ids))), 'bytes': len(data),
          'sha256': hashlib.sha256(data).hexdigest(), 'config_digest': job.config_digest,
          'tokenizer_fingerprint': tok.fingerprint}
  tokenizer_lib.write_atomically(out / f'{name}.json', _json_bytes(meta))
  return meta


# ---------------------------------------------------------------------------------------------
# Files of a build


def shard_name(split: str, index: int) -> str:
  """Returns the file stem of shard `index` of `split` ('train-00003')."""
  return f'{split}-{index:05d}'


def _json_bytes(obj: Any) -> bytes:
  return (json.dumps(obj, indent=1, sort_keys=True) + '\n').encode('utf-8')


def _read_json(path) -> dict | None:
  """Returns the JSON object in a local file or one at a URL, or None when missing or damaged."""
  try:
    data = sources.read_bytes(path) if sources.is_url(path) else pathlib.Path(path).read_bytes()
    found = json.loads(data) if data is not None else None
  except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  return found if isinstance(found, dict) else None


def sha256_file(path) -> str | None:
  """Returns the hex sha256 of a local file or one at a URL, or None when there is none."""
  digest = hashlib.sha256()
  if sources.is_url(path) and sources.url_stat(path, missing_ok=True) is None:
    return None
  try:
    with sources.open_url(path) if sources.is_url(path) else open(path, 'rb') as f:
      while block := f.read(_READ_BLOCK):
        digest.update(block)
  except FileNotFoundError:
    return None
  return digest.hexdigest()


def _verified(out, name: str, digest: str, fingerprint: str, documents: int | None,
              log: Callable[[str], None]) -> dict | None:
  """Returns the meta of shard `name` in `out` (a folder or a folder URL) when it belongs to this
  build and its checksum holds."""
  meta = _read_json(sources.in_folder(out, f'{name}.json'))
  if meta is None or meta.get('config_digest') != digest:
    return None
  if (meta.get('tokenizer_fingerprint') != fingerprint
      or (documents is not None and meta.get('documents') != documents)
      or sha256_file(sources.in_folder(out, meta.get('file') or f'{name}.npy'))
      != meta.get('sha256')):
    log(f'prepare: {sources.in_folder(out, name)}.npy does not match its meta file; it is built '
        'again')
    return None
  return meta


def _remove_temps(out: pathlib.Path, process_index: int, process_count: int) -> None:
  """Deletes temporary files (NAME.XXXX.tmp) that killed runs left of this process's shards."""
  for tmp in out.glob('*.tmp'):
    found = re.match(r'(?:train|val)-(\d+)\.', tmp.name)
    if process_count == 1 or (found and int(found.group(1)) % process_count == process_index):
      tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The build


def _inputs(config, given) -> dict:
  """Returns what decides a build's bytes: corpus, cleaning, split, grouping, packing, tokenizer."""
  data, t_cfg = config.data, config.tokenizer
  if given is not None:
    tokenizer = {'fingerprint': given.fingerprint}
    if given.pad_id != tokenizer_lib.PAD_ID:  # rows padded with it (earlier builds padded with 0)
      tokenizer['pad_id'] = int(given.pad_id)
  else:
    tokenizer = {k: t_cfg[k] for k in ('vocab_size', 'model_type', 'character_coverage',
                                       'max_sentences', 'sample_chars')}
    tokenizer['seed'] = int(config.seed)
  return {'format': FORMAT, 'corpus': corpus.corpus_key(data),
          'val_fraction': float(data.val_fraction), 'passage_chars': int(data.passage_chars),
          'shard_chars': int(data.shard_chars), 'seq_len': int(config.train.seq_len),
          'min_chunk': input_pipeline.MIN_CHUNK, 'pack_seed': PACK_SEED, 'tokenizer': tokenizer}


def config_digest(inputs: dict) -> str:
  """Returns the hex sha256 of a build's inputs (_inputs)."""
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def default_out(config, digest: str) -> pathlib.Path:
  """Returns where a build goes without --out: the cache directory's shards/L<seq_len>-<digest>."""
  return (input_pipeline.cache_root(config.data) / 'shards'
          / f'L{int(config.train.seq_len)}-{digest[:16]}')


def _check(config, workers: int, process_index: int, process_count: int) -> None:
  """Raises ValueError naming the config key or flag that prepare cannot take."""
  # Imported here, not at the top: spawned workers import this module and must not import JAX.
  from mlmjax import config_check  # pylint: disable=g-import-not-at-top
  config_check.check_config(config)
  if workers < 1:
    raise ValueError(f'--workers={workers} must be at least 1')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'--process_index={process_index} must be in [0, --process_count='
                     f'{process_count})')
  if config.data.decontaminate.configs:
    raise ValueError(f'data.decontaminate.configs={config.data.decontaminate.configs!r}: '
                     'mlmjax.prepare does not decontaminate yet; clear it here')
  if config.tokenizer.extend_pieces:
    raise ValueError(f'tokenizer.extend_pieces={config.tokenizer.extend_pieces}: mlmjax.prepare '
                     'does not extend tokenizers; extend it first and set tokenizer.path')


def _passages(docs: Iterable[str], passage_chars: int) -> Iterator[str]:
  """Yields the documents, each cut into passages when data.passage_chars is set."""
  for doc in docs:
    yield from corpus.passages([doc], passage_chars) if passage_chars else (doc,)


def _split_of(text: str, val_fraction: float) -> str:
  """Returns 'val' or 'train' for a document by its own hash (input_pipeline.split_documents)."""
  return 'val' if input_pipeline.split_documents([text], val_fraction)[1] else 'train'


def _labelled(docs: Iterable[str], passage_chars: int,
             val_fraction: float) -> Iterator[tuple[str, str]]:
  """Yields (split, passage) for the passages of cleaned documents, in order."""
  for doc in _passages(docs, passage_chars):
    yield _split_of(doc, val_fraction), doc


class _Grouping:
  """The grouping rule: a split's group closes at the first document that brings it to shard_chars."""

  def __init__(self, shard_chars: int):
    self.shard_chars = shard_chars
    self._open = {s: [0, 0, 0] for s in SPLITS}  # the open group: index, documents, characters

  def add(self, split: str, chars: int) -> tuple[int, int]:
    """Puts a document in split's group; returns (that group, its documents if it closed, else 0)."""
    group = self._open[split]
    group[1] += 1
    group[2] += chars
    if group[2] < self.shard_chars:
      return group[0], 0
    self._open[split] = [group[0] + 1, 0, 0]
    return group[0], group[1]

  def finish(self) -> list[tuple[str, int, int]]:
    """Returns (split, group, documents) of each split's last group that holds documents."""
    return [(s, g[0], g[1]) for s, g in self._open.items() if g[1]]


def sample(texts: Iterable[str], budget: int, seed: int) -> Iterable[str]:
  """Returns the texts with the smallest seeded hashes that reach `budget` characters, in order.

  A uniform sample of whole texts held in about `budget` characters; budget 0 returns all texts.
  """
  if not budget:
    return texts
  key = str(int(seed)).encode()
  heap, total = [], 0  # (-hash, -index, text): the largest hash on top
  for i, text in enumerate(texts):
    h = hashlib.blake2b(text.encode('utf-8'), digest_size=8, key=key).digest()
    heapq.heappush(heap, (-int.from_bytes(h, 'big'), -i, text))
    total += len(text)
    while total - len(heap[0][2]) >= budget:
      total -= len(heapq.heappop(heap)[2])
  return [text for _, _, text in sorted(heap, key=lambda entry: -entry[1])]


def _train_tokenizer(config, path: pathlib.Path, workers: _Workers, log) -> Any:
  """Returns a tokenizer trained on the training-split documents of a tokenizer.sample_chars sample."""
  data, t_cfg = config.data, config.tokenizer
  budget, seed = int(t_cfg.sample_chars), int(config.seed)
  start = time.perf_counter()
  report = corpus.CleaningReport()
  if data.max_documents:  # the corpus is its first max_documents survivors: sample those
    kept = itertools.islice(corpus.iter_documents(data, report, map_clean=workers.map),
                            int(data.max_documents))
    docs = sample(kept, budget, seed)
  else:  # sampled before cleaning: only the sample is cleaned
    docs = corpus.iter_documents(data, report, map_clean=workers.map,
                                 select=lambda raw: sample(raw, budget, seed))
  train = [d for s, d in _labelled(docs, int(data.passage_chars), data.val_fraction)
           if s == 'train']
  if not report.documents_out:
    raise corpus.empty_corpus_error(data, report)
  tok = tokenizer_lib.train_tokenizer(
      train, path, vocab_size=t_cfg.vocab_size, model_type=t_cfg.model_type,
      character_coverage=t_cfg.character_coverage, max_sentences=t_cfg.max_sentences, seed=seed)
  log(f'prepare: trained a {t_cfg.model_type} tokenizer of {tok.vocab_size} pieces on '
      f'{len(train):,} training documents ({sum(map(len, train)):,} characters; '
      f'tokenizer.sample_chars={budget:,}) in {time.perf_counter() - start:.1f} s')
  return tok


def _tokenizer(config, out: pathlib.Path, digest: str, given, workers: _Workers, log) -> Any:
  """Returns the build's tokenizer, stored in `out`: given, trained by an earlier run, or trained now."""
  tok = given
  if tok is None:
    path = out / tokenizer_lib.WORKDIR_FILES[0]
    state = _read_json(out / BUILD) or {}
    if state.get('tokenizer_fingerprint') and sha256_file(path) == state['tokenizer_fingerprint']:
      tok = tokenizer_lib.Tokenizer.load(path)
      log(f'prepare: reusing {path}')
    else:
      tok = _train_tokenizer(config, path, workers, log)
  file = out / tok.file_name
  if sha256_file(file) != tok.fingerprint:
    tokenizer_lib.write_atomically(file, tok.serialized_model)
  state = {'format': FORMAT, 'config_digest': digest, 'tokenizer_file': tok.file_name,
           'tokenizer_fingerprint': tok.fingerprint}
  if _read_json(out / BUILD) != state:
    tokenizer_lib.write_atomically(out / BUILD, _json_bytes(state))
  return tok


def _shards(config, out: pathlib.Path, job: _Job, tok, workers: _Workers, process_index: int,
            process_count: int, log) -> tuple[corpus.CleaningReport, dict[str, int], dict]:
  """Builds this process's shards that are not complete yet.

  Returns the cleaning report, {shard name: its number of documents} of every shard of the build,
  and the metas of this process's shards.
  """
  data = config.data
  report = corpus.CleaningReport()
  grouping = _Grouping(int(data.shard_chars))
  groups = {s: [] for s in SPLITS}  # the documents of each split's open group
  sizes, metas = {}, {}
  start, tokens, manifest_removed = time.perf_counter(), 0, False

  def finished(done: list[dict]) -> None:
    nonlocal tokens
    for meta in done:
      metas[shard_name(meta['split'], meta['index'])] = meta
      tokens += meta['tokens']
      seconds = time.perf_counter() - start
      log(f'prepare: wrote {meta["file"]}: {meta["rows"]:,} rows, {meta["tokens"]:,} tokens '
          f'({tokens:,} tokens in {seconds:.0f} s, {tokens / max(seconds, 1e-9):,.0f} tokens/s)')

  def close(split: str, index: int) -> None:
    nonlocal manifest_removed
    docs, groups[split] = groups[split], []
    name = shard_name(split, index)
    sizes[name] = len(docs)
    if index % process_count != process_index:
      return
    meta = _verified(out, name, job.config_digest, tok.fingerprint, len(docs), log)
    if meta is not None:
      metas[name] = meta
      return
    if not manifest_removed:  # before a shard is rewritten, no manifest may vouch for the old one
      (out / MANIFEST).unlink(missing_ok=True)
      manifest_removed = True
    finished(workers.shard(_write_shard, out, split, index, docs, job))

  docs = corpus.iter_documents(data, report, map_clean=workers.map)
  for split, doc in _labelled(docs, int(data.passage_chars), data.val_fraction):
    groups[split].append(doc)
    index, closed = grouping.add(split, len(doc))
    if closed:
      close(split, index)
  for split, index, _ in grouping.finish():
    close(split, index)
  finished(workers.wait())
  if not report.documents_out:
    raise corpus.empty_corpus_error(data, report)
  return report, sizes, metas


def _manifest(out: pathlib.Path, inputs: dict, job: _Job, tok, report: corpus.CleaningReport,
              sizes: dict[str, int], metas: dict, log) -> dict | None:
  """Writes manifest.json once every shard is complete and verified; returns it (None: not yet)."""
  digest = job.config_digest
  entries, missing = [], []
  for name, documents in sizes.items():
    meta = metas.get(name) or _verified(out, name, digest, tok.fingerprint, documents, log)
    if meta is None:
      missing.append(name)
    else:
      entries.append({k: meta[k] for k in ('file', 'split', 'index', 'documents', 'chars', 'rows',
                                           'tokens', 'bytes', 'sha256')})
  if missing:
    log(f'prepare: {len(missing)} of {len(sizes)} shards ({", ".join(missing[:3])}'
        f'{", ..." if len(missing) > 3 else ""}) belong to other processes and are not done; '
        f'the last process to finish writes {out / MANIFEST}')
    return None
  entries.sort(key=lambda e: (SPLITS.index(e['split']), e['index']))
  splits = {s: {'shards': 0, 'documents': 0, 'rows': 0, 'tokens': 0, 'bytes': 0} for s in SPLITS}
  for e in entries:
    for k in ('documents', 'rows', 'tokens', 'bytes'):
      splits[e['split']][k] += e[k]
    splits[e['split']]['shards'] += 1
  manifest = {
      'format': FORMAT, 'config_digest': digest, 'inputs': inputs,
      'tokenizer': {'file': tok.file_name, 'fingerprint': tok.fingerprint,
                    'vocab_size': tok.vocab_size},
      'seq_len': job.seq_len, 'dtype': job.dtype,
      'split_rule': "each document's own hash (input_pipeline.split_documents); no near_dups",
      'cleaning': dataclasses.asdict(report), 'splits': splits, 'shards': entries,
  }
  tokenizer_lib.write_atomically(out / MANIFEST, _json_bytes(manifest))
  return manifest


def _complete(out: pathlib.Path, digest: str) -> dict | None:
  """Returns the manifest of a finished build of this digest in `out`, every file verified."""
  manifest = _read_json(out / MANIFEST)
  if manifest is None or manifest.get('config_digest') != digest:
    return None
  files = [(s['file'], s['sha256']) for s in manifest['shards']]
  files.append((manifest['tokenizer']['file'], manifest['tokenizer']['fingerprint']))
  return manifest if all(sha256_file(out / f) == h for f, h in files) else None


def build(config, out=None, *, workers: int = 1, process_index: int = 0, process_count: int = 1,
          log: Callable[[str], None] = print) -> dict | None:
  """Builds (or completes) the token shards of `config` in `out`; returns the manifest.

  None when shards of other processes (process_count > 1) are still missing: the last process
  to finish writes the manifest. out=None: default_out(config, digest).
  """
  _check(config, workers, process_index, process_count)
  given, inputs, out, done = _start(config, out, process_index, process_count, log)
  if done is not None:
    return done
  start, digest = time.perf_counter(), config_digest(inputs)
  with _Workers(workers) as pool:
    tok = _tokenizer(config, out, digest, given, pool, log)
    job = _job(config, digest, tok)
    report, sizes, metas = _shards(config, out, job, tok, pool, process_index, process_count, log)
  manifest = _manifest(out, inputs, job, tok, report, sizes, metas, log)
  _summary(config, out, report, manifest, time.perf_counter() - start, log)
  return manifest


def _start(config, out, process_index: int, process_count: int,
           log) -> tuple[Any, dict, pathlib.Path, dict | None]:
  """Returns (tokenizer.path's tokenizer, inputs, out, the manifest when out holds this build done).

  Creates out; refuses a directory that holds another config's build; deletes temporaries.
  """
  t_cfg = config.tokenizer
  given = tokenizer_lib.load_any(t_cfg.path) if t_cfg.path else None
  inputs = _inputs(config, given)
  digest = config_digest(inputs)
  out = pathlib.Path(out) if out else default_out(config, digest)
  out.mkdir(parents=True, exist_ok=True)
  done = _complete(out, digest)
  if done is not None:
    log(f'prepare: {out} already holds this build ({len(done["shards"])} shards, verified)')
    return given, inputs, out, done
  state = _read_json(out / BUILD)
  if state is not None and state.get('config_digest') != digest:
    raise ValueError(f'{out} holds a build of another config (config digest '
                     f'{str(state.get("config_digest"))[:12]}, this config {digest[:12]}): '
                     'choose another --out or delete it')
  _remove_temps(out, process_index, process_count)
  if config.data.near_dups.threshold:
    log('prepare: data.near_dups is not applied here: each document goes to train or val by its '
        'own hash')
  return given, inputs, out, None


def _job(config, digest: str, tok) -> _Job:
  """Returns what a worker needs to write the build's shards."""
  return _Job(digest, type(tok), tok.serialized_model, int(config.train.seq_len),
              'uint16' if tok.vocab_size <= 1 << 16 else 'int32')


def _summary(config, out: pathlib.Path, report: corpus.CleaningReport, manifest: dict | None,
             seconds: float, log) -> None:
  """Logs the cleaning report and, once the manifest is written, the build's totals."""
  log(f'prepare: corpus {config.data.corpus!r}\n{report.summary()}')
  if manifest is not None:
    s = manifest['splits']
    log(f'prepare: {out}: {len(manifest["shards"])} shards, train {s["train"]["rows"]:,} rows / '
        f'{s["train"]["tokens"]:,} tokens, val {s["val"]["rows"]:,} rows / '
        f'{s["val"]["tokens"]:,} tokens; this run took {seconds:.1f} s')


def main(argv=None) -> None:
  """Parses --config, --workers, --out and --process_index/--process_count, and builds."""

  def define(flags, flag_values):
    flags.DEFINE_integer('workers', 0, 'Worker processes on this machine; 0: one per CPU.',
                         flag_values=flag_values)
    flags.DEFINE_string('out', '', 'Output directory; default: the cache directory '
                        '(data.cache_dir) shards/L<seq_len>-<config digest>.',
                        flag_values=flag_values)
    flags.DEFINE_integer('process_index', 0, 'This process builds the shards k with k % '
                         'process_count == process_index.', flag_values=flag_values)
    flags.DEFINE_integer('process_count', 1, 'Processes (e.g. hosts) sharing the build.',
                         flag_values=flag_values)

  f = cli.parse_flags(argv, define, prog='mlmjax.prepare',
                      config_help='A pretraining config, e.g. pretrain:tiny.')
  if f.config is None:
    cli.fail('usage: python -m mlmjax.prepare --config pretrain:tiny [--config.KEY=VALUE ...] '
             '[--workers N] [--out DIR] [--process_index I --process_count P]')
  workers = f.workers or cli.cpu_count()
  with cli.user_errors():
    build(f.config, f.out or None, workers=workers, process_index=f.process_index,
          process_count=f.process_count)


if __name__ == '__main__':
  main()
