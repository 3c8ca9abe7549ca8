"""Token shards on Apache Beam: `python -m mlmjax.prepare_beam --config CONFIG --out DIR [-- OPTS]`.

The build of mlmjax.prepare, byte for byte, on a Beam runner; OPTS are Beam's pipeline options
(`--runner=DirectRunner`, the default; Flink and Spark in docs/data.md). It runs prepare's own
steps (the tokenizer, _write_shard, _manifest): one build, two engines. This launcher loads or
trains the tokenizer as prepare does, then runs two pipelines with one cheap pass between them:

1. scan, in parallel: each partition of the corpus (one input file; a TFDS split or `pydocs` is a
   single partition) is read and cleaned, and summed up in a few numbers per document: which
   cleaning rules changed it, its length, whether it is empty or too short, its 16-byte hash, and
   its passages' splits and lengths.
2. plan, here, partition after partition: corpus.py's drop rules in corpus order (max_documents,
   empty, too_short, exact duplicates) and prepare's grouping rule give each kept passage its
   (split, group), written per partition, plus the cleaning report.
3. write, in parallel: each partition is read and cleaned again and its kept passages keyed by
   (split, group); a GroupByKey gathers each group, which is put back in corpus order and written
   by prepare._write_shard (a shard whose meta and checksum already hold is kept).

Last, prepare._manifest writes manifest.json here. No step holds the corpus: a worker holds one
partition's summary or one group; the plan holds one partition's summary and the 64-bit hashes of
the kept documents (prepare holds the same set). --out (with its scratch folder .beam/) and
data.corpus must be seen by every worker: absolute paths on a shared filesystem, or URLs
(`gs://B/...`, through Beam's FileSystems: Dataflow's workers share no filesystem).
"""

import array
import contextlib
import dataclasses
import io
import json
import logging
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import numpy as np

from mlmjax import cli, corpus, prepare, sources
from mlmjax import tokenizer as tokenizer_lib

INSTALL = 'pip install -r requirements-beam.txt && pip install --no-deps -e .'
_KEPT, _EMPTY, _SHORT = 0, 1, 2  # a cleaned document's state before the order-dependent rules
_CHANGES = corpus._CHANGE_RULES  # bit i of a document's `changed`: rule i changed it


def _beam():
  """Returns the apache_beam module; raises a one-line error naming the install when it is absent."""
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise RuntimeError('mlmjax.prepare_beam needs apache-beam, which needs protobuf<7 and so '
                       f'its own environment (docs/data.md): {INSTALL}') from None
  return apache_beam


@dataclasses.dataclass(frozen=True)
class _Source:
  """What a worker needs to read and clean a partition (plain values, no config object)."""
  spec: str
  options: dict
  tfds: tuple[str, str, bool]  # data.tfds_split, data.tfds_data_dir, data.tfds_download
  passage_chars: int
  val_fraction: float


def _source(data) -> _Source:
  """Returns the _Source of a config's data section."""
  return _Source(corpus._spec(data), corpus._options(data),
                 (data.tfds_split, data.tfds_data_dir, bool(data.tfds_download)),
                 int(data.passage_chars), float(data.val_fraction))


def _partitions(source: _Source) -> list[tuple[int, str | None, bool]]:
  """Returns (index, file, named literally) per partition; file None: the whole spec (TFDS, pydocs)."""
  if source.spec == 'pydocs' or source.spec.startswith('tfds:'):
    return [(0, None, True)]
  return [(i, path, literal)
          for i, (path, literal) in enumerate(sources.expand_sources(source.spec).items())]


def _raw(source: _Source, part) -> tuple[Iterator[str], sources.BadInput]:
  """Returns the raw documents of a partition, in order, and the BadInput that counts what it skips."""
  opts = source.options
  bad = sources.BadInput(opts['bad_input'], opts['max_line_chars'])
  _, path, literal = part
  if path is not None:
    return sources.read_files({path: literal}, opts['text_field'], bad), bad
  split, data_dir, download = source.tfds
  return sources.read_raw_documents(source.spec, text_field=opts['text_field'], tfds_split=split,
                                   tfds_data_dir=data_dir, tfds_download=download,
                                   bad_input=bad), bad


def _clean(source: _Source, text: str) -> tuple[str, list[str]]:
  """Returns corpus.py's cleaning of a raw document and the names of the rules that changed it."""
  return corpus._clean_steps(text, source.options['fix_text'], source.options['normalization'])


def _save(path, **arrays) -> None:
  """Writes arrays to an .npz file, complete or not at all (a local file is renamed when whole)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  if sources.is_url(path):
    sources.write_bytes(path, buffer.getvalue())
  else:
    tokenizer_lib.write_atomically(path, buffer.getvalue())


def _load(path):
  """Returns np.load of a local .npz file or of one at a URL."""
  return np.load(io.BytesIO(sources.read_bytes(path)) if sources.is_url(path) else path)


def _scan(part, source: _Source, work) -> int:
  """Reads and cleans one partition into work/scan-NNNNN.npz; returns its number of documents."""
  status, changed, chars, digests = (array.array('B'), array.array('B'), array.array('q'),
                                     array.array('Q'))
  passages, passage_chars, passage_val = array.array('q'), array.array('q'), array.array('B')
  info = {'chars_in': 0, 'error': None}
  raw, bad = _raw(source, part)
  try:
    for text in raw:
      info['chars_in'] += len(text)
      cleaned, rules = _clean(source, text)
      changed.append(sum(1 << _CHANGES.index(r) for r in rules))
      chars.append(len(cleaned))
      if not cleaned or len(cleaned) < source.options['min_chars']:
        status.append(_EMPTY if not cleaned else _SHORT)
        continue
      status.append(_KEPT)
      if source.options['dedup']:
        digests.append(corpus.text_digest(cleaned))
      cut = list(prepare._labelled([cleaned], source.passage_chars, source.val_fraction))
      passages.append(len(cut))
      for split, passage in cut:
        passage_chars.append(len(passage))
        passage_val.append(split == 'val')
  except ValueError as e:  # bad input under data.bad_input='error': the plan raises it, in order
    info['error'] = str(e)
  info['skipped'], info['first_skipped'] = bad.counts, bad.first
  _save(sources.in_folder(work, f'scan-{part[0]:05d}.npz'),
        status=np.frombuffer(status, np.uint8),
        changed=np.frombuffer(changed, np.uint8), chars=np.frombuffer(chars, np.int64),
        digests=np.frombuffer(digests, np.uint64), passages=np.frombuffer(passages, np.int64),
        passage_chars=np.frombuffer(passage_chars, np.int64),
        passage_val=np.frombuffer(passage_val, np.uint8), info=np.array(json.dumps(info)))
  return len(status)


def _plan(source: _Source, parts, shard_chars: int,
          work) -> tuple[corpus.CleaningReport, dict[str, int]]:
  """Applies the drop rules and the grouping rule to the scans in corpus order.

  Writes work/plan-NNNNN.npz per partition (which raw documents are kept; each kept passage's
  split and group) and returns the cleaning report and {shard name: its documents}.
  """
  opts = source.options
  max_documents, dedup = opts['max_documents'], opts['dedup']
  report, grouping = corpus.CleaningReport(), prepare._Grouping(shard_chars)
  seen, sizes = corpus.DigestSet(), {}
  for index, _, _ in parts:
    with _load(sources.in_folder(work, f'scan-{index:05d}.npz')) as scan:
      info = json.loads(str(scan['info']))
      if info['error']:
        raise ValueError(info['error'])
      status, changed, chars, passages = (scan[k].tolist() for k in ('status', 'changed', 'chars',
                                                                      'passages'))
      lengths, val = scan['passage_chars'].tolist(), scan['passage_val'].tolist()
      digests = scan['digests'].tolist()
    report.documents_in += len(status)
    report.chars_in += info['chars_in']
    for kind, count in info['skipped'].items():
      report.skipped[kind] += count
    for kind, message in info['first_skipped'].items():
      report.first_skipped.setdefault(kind, message)
    kept, groups, splits = np.zeros(len(status), bool), array.array('q'), array.array('B')
    candidate = end = 0  # among the documents in state _KEPT: the next one, its passages' end
    for i, state in enumerate(status):
      digest, begin = 0, end
      if state == _KEPT:
        digest = digests[candidate] if dedup else 0
        end += passages[candidate]
        candidate += 1
      if max_documents and report.documents_out >= max_documents:
        report.dropped['max_documents'] += 1  # as corpus.py: not cleaned, so no rule counted
        continue
      for bit, rule in enumerate(_CHANGES):
        report.changed[rule] += changed[i] >> bit & 1
      if state != _KEPT:
        report.dropped['empty' if state == _EMPTY else 'too_short'] += 1
        continue
      if dedup and not seen.add(digest):
        report.dropped['duplicate'] += 1
        continue
      report.documents_out += 1
      report.chars_out += chars[i]
      kept[i] = True
      for j in range(begin, end):
        split = prepare.SPLITS[val[j]]
        group, closed = grouping.add(split, lengths[j])
        groups.append(group)
        splits.append(val[j])
        if closed:
          sizes[prepare.shard_name(split, group)] = closed
    _save(sources.in_folder(work, f'plan-{index:05d}.npz'), kept=kept,
          groups=np.frombuffer(groups, np.int64),
          val=np.frombuffer(splits, np.uint8))
  for split, group, documents in grouping.finish():
    sizes[prepare.shard_name(split, group)] = documents
  return report, sizes


def _emit(part, source: _Source, work) -> Iterator[tuple[tuple[str, int], Any]]:
  """Yields ((split, group), ((partition, passage), text)) for a partition's kept passages."""
  with _load(sources.in_folder(work, f'plan-{part[0]:05d}.npz')) as plan:
    kept, groups, val = plan['kept'].tolist(), plan['groups'].tolist(), plan['val'].tolist()
  changed = RuntimeError(f'{part[1] or source.spec} read differently in the scan and the write '
                         '(did it change meanwhile?); run the build again')
  raw, _ = _raw(source, part)
  count = j = 0
  for count, text in enumerate(raw, 1):
    if count > len(kept):
      raise changed
    if not kept[count - 1]:
      continue
    cleaned, _ = _clean(source, text)
    for split, passage in prepare._labelled([cleaned], source.passage_chars, source.val_fraction):
      if j >= len(groups) or split != prepare.SPLITS[val[j]]:
        raise changed
      yield (split, groups[j]), ((part[0], j), passage)
      j += 1
  if count != len(kept) or j != len(groups):
    raise changed


def _write(item, out, job: prepare._Job) -> dict:
  """Writes the shard of one (split, group) and its gathered passages; returns its meta.

  out: a local folder, or a folder URL, where the shard is written here first and then copied,
  its meta file last (the meta vouches for the shard).
  """
  (split, index), values = item
  docs = [text for _, text in sorted(values, key=lambda v: v[0])]
  name = prepare.shard_name(split, index)
  fingerprint = prepare._worker_tokenizer(job).fingerprint
  meta = prepare._verified(out, name, job.config_digest, fingerprint, len(docs), logging.warning)
  if meta is not None:
    return meta
  if not sources.is_url(out):
    return prepare._write_shard(pathlib.Path(out), split, index, docs, job)
  with tempfile.TemporaryDirectory() as tmp:
    meta = prepare._write_shard(pathlib.Path(tmp), split, index, docs, job)
    for file in (meta['file'], f'{name}.json'):
      sources.write_bytes(sources.join(out, file), (pathlib.Path(tmp) / file).read_bytes())
  return meta


def _start_url(url: str, digest: str, local: pathlib.Path, log) -> dict | None:
  """Returns the manifest when folder URL `url` holds this build done; else readies `local`.

  Refuses a folder that holds another config's build; copies this build's state and tokenizer
  from an interrupted run into `local`, where prepare._tokenizer reuses them.
  """
  manifest = prepare._read_json(sources.join(url, prepare.MANIFEST))
  if manifest is not None and manifest.get('config_digest') == digest:
    whole = [(sources.url_stat(sources.join(url, s['file']), missing_ok=True) or (-1,))[0]
             == s['bytes'] for s in manifest['shards']]
    tokenizer = manifest['tokenizer']
    if all(whole) and prepare.sha256_file(
        sources.join(url, tokenizer['file'])) == tokenizer['fingerprint']:
      log(f'prepare_beam: {url} already holds this build ({len(whole)} shards of the '
          'manifest\'s sizes)')
      return manifest
  state = prepare._read_json(sources.join(url, prepare.BUILD))
  if state is None:
    return None
  if state.get('config_digest') != digest:
    raise ValueError(f'{url} holds a build of another config (config digest '
                     f'{str(state.get("config_digest"))[:12]}, this config {digest[:12]}): '
                     'choose another --out or delete it')
  for name in (prepare.BUILD, state.get('tokenizer_file')):
    data = sources.read_bytes(sources.join(url, name)) if name else None
    if data is not None:
      tokenizer_lib.write_atomically(local / name, data)
  return None


def build(config, out=None, *, pipeline_args=(), workers: int = 1,
          log: Callable[[str], None] = print) -> dict:
  """Builds (or completes) the token shards of `config` in `out` on Beam; returns the manifest.

  out: a folder every worker sees, or a folder URL (gs://B/shards/base: the build's small files
  are made in a local temporary folder and copied, the manifest last); None:
  prepare.default_out(config, digest). pipeline_args: Beam's pipeline options (the runner and its
  settings); workers: processes that clean the tokenizer's sample here.
  """
  beam = _beam()
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  prepare._check(config, workers, 0, 1)
  url = str(out).rstrip('/') if out is not None and sources.is_url(out) else None
  with contextlib.ExitStack() as stack:
    local = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory())) if url else out
    given, inputs, local, done = prepare._start(config, local, 0, 1, log)
    digest = prepare.config_digest(inputs)
    if url:
      done = _start_url(url, digest, local, log)
    if done is not None:
      return done
    start = time.perf_counter()
    with prepare._Workers(workers) as pool:
      tok = prepare._tokenizer(config, local, digest, given, pool, log)
    job = prepare._job(config, digest, tok)
    target = url or local.resolve()
    if url:  # from the start, the folder says which build it holds
      sources.delete([sources.join(url, prepare.MANIFEST)])
      for name in (tok.file_name, prepare.BUILD):
        sources.write_bytes(sources.join(url, name), (local / name).read_bytes())
    else:
      (local / prepare.MANIFEST).unlink(missing_ok=True)
    work = sources.in_folder(target, '.beam')  # this run's scans and plans, deleted when it ends
    source = _source(config.data)
    parts = _partitions(source)
    if url:
      scratch = [sources.in_folder(work, f'{kind}-{i:05d}.npz')
                 for kind in ('scan', 'plan') for i, _, _ in parts]
      stack.callback(sources.delete, scratch)
    else:
      shutil.rmtree(work, ignore_errors=True)
      work.mkdir()
      stack.callback(shutil.rmtree, work, ignore_errors=True)
    options = pipeline_options.PipelineOptions(list(pipeline_args))
    log(f'prepare_beam: scanning {len(parts)} partition(s) of {source.spec!r}')
    with beam.Pipeline(options=options) as p:
      _ = (p | 'partitions' >> beam.Create(parts) | 'spread' >> beam.Reshuffle()
           | 'scan' >> beam.Map(_scan, source, work))
    report, sizes = _plan(source, parts, int(config.data.shard_chars), work)
    if not report.documents_out:
      raise corpus.empty_corpus_error(config.data, report)
    log(f'prepare_beam: {report.documents_out:,} documents in {len(sizes)} shards; writing them')
    with beam.Pipeline(options=options) as p:
      _ = (p | 'partitions' >> beam.Create(parts) | 'spread' >> beam.Reshuffle()
           | 'read' >> beam.FlatMap(_emit, source, work) | 'group' >> beam.GroupByKey()
           | 'write' >> beam.Map(_write, target, job))
    metas = {}
    for name in sizes:
      meta = prepare._read_json(sources.in_folder(target, f'{name}.json'))
      if meta is not None and meta.get('config_digest') == digest:
        metas[name] = meta
    manifest = prepare._manifest(local, inputs, job, tok, report, sizes, metas, log)
    if url and manifest is not None:  # last: the manifest vouches for the folder
      sources.write_bytes(sources.join(url, prepare.MANIFEST),
                           (local / prepare.MANIFEST).read_bytes())
    prepare._summary(config, target, report, manifest, time.perf_counter() - start, log)
  return manifest


def main(argv=None) -> None:
  """Parses --config, --out and --workers, and after `--` Beam's pipeline options; builds."""
  argv = list(sys.argv if argv is None else argv)
  pipeline_args = []
  if '--' in argv:
    split = argv.index('--')
    argv, pipeline_args = argv[:split], argv[split + 1:]

  def define(flags, flag_values):
    flags.DEFINE_string('out', '', 'Output directory that every Beam worker sees; default: the '
                        'cache directory shards/L<seq_len>-<config digest>.',
                        flag_values=flag_values)
    flags.DEFINE_integer('workers', 0, 'Processes here that clean the tokenizer sample; 0: one '
                         'per CPU.', flag_values=flag_values)

  f = cli.parse_flags(argv, define, prog='mlmjax.prepare_beam',
                      config_help='A pretraining config, e.g. pretrain:tiny.')
  if f.config is None:
    cli.fail('usage: python -m mlmjax.prepare_beam --config pretrain:tiny [--config.KEY=VALUE '
             '...] [--out DIR] [-- --runner=DirectRunner ...]')
  workers = f.workers or cli.cpu_count()
  with cli.user_errors():
    build(f.config, f.out or None, pipeline_args=pipeline_args, workers=workers)


if __name__ == '__main__':
  main()
