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
partition's summary or one group; the plan holds one partition's summary and the 16-byte hashes of
the kept documents (prepare holds the same set). Files are opened by path, so --out (with its
scratch folder .beam/) and data.corpus must be absolute paths that every worker sees.
"""

import array
import dataclasses
import io
import json
import logging
import pathlib
import shutil
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np

from mlmjax import cli, corpus, prepare
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
          for i, (path, literal) in enumerate(corpus._expand_sources(source.spec).items())]


def _raw(source: _Source, part) -> tuple[Iterator[str], corpus.BadInput]:
  """Returns the raw documents of a partition, in order, and the BadInput that counts what it skips."""
  opts = source.options
  bad = corpus.BadInput(opts['bad_input'], opts['max_line_chars'])
  _, path, literal = part
  if path is not None:
    return corpus._read_files({path: literal}, opts['text_field'], bad), bad
  split, data_dir, download = source.tfds
  return corpus.read_raw_documents(source.spec, text_field=opts['text_field'], tfds_split=split,
                                   tfds_data_dir=data_dir, tfds_download=download,
                                   bad_input=bad), bad


def _clean(source: _Source, text: str) -> tuple[str, list[str]]:
  """Returns corpus.py's cleaning of a raw document and the names of the rules that changed it."""
  return corpus._clean_steps(text, source.options['fix_text'], source.options['normalization'])


def _save(path: pathlib.Path, **arrays) -> None:
  """Writes arrays to an .npz file under a temporary name, renamed when complete."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  tokenizer_lib.write_atomically(path, buffer.getvalue())


def _scan(part, source: _Source, work: pathlib.Path) -> int:
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
  _save(work / f'scan-{part[0]:05d}.npz', status=np.frombuffer(status, np.uint8),
        changed=np.frombuffer(changed, np.uint8), chars=np.frombuffer(chars, np.int64),
        digests=np.frombuffer(digests, np.uint64), passages=np.frombuffer(passages, np.int64),
        passage_chars=np.frombuffer(passage_chars, np.int64),
        passage_val=np.frombuffer(passage_val, np.uint8), info=np.array(json.dumps(info)))
  return len(status)


def _plan(source: _Source, parts, shard_chars: int,
          work: pathlib.Path) -> tuple[corpus.CleaningReport, dict[str, int]]:
  """Applies the drop rules and the grouping rule to the scans in corpus order.

  Writes work/plan-NNNNN.npz per partition (which raw documents are kept; each kept passage's
  split and group) and returns the cleaning report and {shard name: its documents}.
  """
  opts = source.options
  max_documents, dedup = opts['max_documents'], opts['dedup']
  report, grouping = corpus.CleaningReport(), prepare._Grouping(shard_chars)
  seen, sizes = corpus.DigestSet(), {}
  for index, _, _ in parts:
    with np.load(work / f'scan-{index:05d}.npz') as scan:
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
    _save(work / f'plan-{index:05d}.npz', kept=kept, groups=np.frombuffer(groups, np.int64),
          val=np.frombuffer(splits, np.uint8))
  for split, group, documents in grouping.finish():
    sizes[prepare.shard_name(split, group)] = documents
  return report, sizes


def _emit(part, source: _Source, work: pathlib.Path) -> Iterator[tuple[tuple[str, int], Any]]:
  """Yields ((split, group), ((partition, passage), text)) for a partition's kept passages."""
  with np.load(work / f'plan-{part[0]:05d}.npz') as plan:
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


def _write(item, out: pathlib.Path, job: prepare._Job) -> dict:
  """Writes the shard of one (split, group) and its gathered passages; returns its meta."""
  (split, index), values = item
  docs = [text for _, text in sorted(values, key=lambda v: v[0])]
  name = prepare.shard_name(split, index)
  fingerprint = prepare._worker_tokenizer(job).fingerprint
  meta = prepare._verified(out, name, job.config_digest, fingerprint, len(docs), logging.warning)
  return meta or prepare._write_shard(out, split, index, docs, job)


def build(config, out=None, *, pipeline_args=(), workers: int = 1,
          log: Callable[[str], None] = print) -> dict:
  """Builds (or completes) the token shards of `config` in `out` on Beam; returns the manifest.

  pipeline_args: Beam's pipeline options (the runner and its settings); workers: processes that
  clean the tokenizer's sample here. out=None: prepare.default_out(config, digest).
  """
  beam = _beam()
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  prepare._check(config, workers, 0, 1)
  given, inputs, out, done = prepare._start(config, out, 0, 1, log)
  if done is not None:
    return done
  start, digest = time.perf_counter(), prepare.config_digest(inputs)
  with prepare._Workers(workers) as pool:
    tok = prepare._tokenizer(config, out, digest, given, pool, log)
  job = prepare._job(config, digest, tok)
  out = out.resolve()
  (out / prepare.MANIFEST).unlink(missing_ok=True)
  work = out / '.beam'  # the scans and plans of this run, deleted when it ends
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir()
  source = _source(config.data)
  parts = _partitions(source)
  options = pipeline_options.PipelineOptions(list(pipeline_args))
  try:
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
           | 'write' >> beam.Map(_write, out, job))
  finally:
    shutil.rmtree(work, ignore_errors=True)
  metas = {}
  for name in sizes:
    meta = prepare._read_json(out / f'{name}.json')
    if meta is not None and meta.get('config_digest') == digest:
      metas[name] = meta
  manifest = prepare._manifest(out, inputs, job, tok, report, sizes, metas, log)
  prepare._summary(config, out, report, manifest, time.perf_counter() - start, log)
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
