"""Tests for mlmjax.prepare_beam: the token-shard build on Apache Beam writes prepare's bytes."""

import collections
import dataclasses
import json
import os
import pathlib

import pytest

from configs import pretrain
from mlmjax import corpus, prepare, prepare_beam

SHARD_CHARS = 30_000  # the ~400 k characters below make about a dozen train shards

try:
  from apache_beam.io import filesystem as beam_filesystem
  from apache_beam.io import localfilesystem
except ImportError:
  localfilesystem = None
else:

  class _UrlFileSystem(localfilesystem.LocalFileSystem):
    """Beam's filesystem for `mlmjaxtest://NAME` URLs, kept in the folder `root`."""

    root = pathlib.Path('/nonexistent')
    prefix = 'mlmjaxtest://'

    @classmethod
    def scheme(cls):
      return 'mlmjaxtest'

    def _local(self, url: str) -> str:
      assert url.startswith(self.prefix), url  # no local path may reach this filesystem
      return str(self.root / url[len(self.prefix):])

    def join(self, base, *paths):
      return '/'.join([base.rstrip('/'), *paths])

    def _url_dirname(self, url):
      return url.rsplit('/', 1)[0]

    def exists(self, path):
      return os.path.exists(self._local(path))

    def _list(self, dir_or_prefix):
      for folder, _, names in os.walk(self._local(dir_or_prefix)):
        for name in names:
          path = os.path.join(folder, name)
          yield beam_filesystem.FileMetadata(self.prefix + os.path.relpath(path, self.root),
                                             os.path.getsize(path), os.path.getmtime(path))

    def metadata(self, path):
      local = self._local(path)
      return beam_filesystem.FileMetadata(path, os.path.getsize(local), os.path.getmtime(local))

    def create(self, path, *args, **kwargs):
      os.makedirs(os.path.dirname(self._local(path)), exist_ok=True)
      return self._path_open(self._local(path), 'wb', *args, **kwargs)

    def open(self, path, *args, **kwargs):
      return self._path_open(self._local(path), 'rb', *args, **kwargs)

    def delete(self, paths):
      for path in paths:
        os.remove(self._local(path))


def _quiet(_):
  pass


def _files(directory) -> dict[str, bytes]:
  """Returns {file name: bytes} of a build directory."""
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope='module')
def corpus_glob(tmp_path_factory):
  """Returns a glob over three files of Python's help topics, with duplicates and bad input."""
  from pydoc_data.topics import topics
  texts = [topics[k] for k in sorted(topics)]
  third = len(texts) // 3
  folder = tmp_path_factory.mktemp('beam_corpus')
  (folder / 'a.txt').write_text('\n\n'.join(texts[:third] + ['too short']), encoding='utf-8')
  # A line that is not UTF-8 drops its paragraph (data.bad_input='skip'); duplicates of a.txt.
  (folder / 'b.txt').write_bytes('\n\n'.join(texts[third:2 * third]).encode('utf-8')
                                 + b'\n\nnot \xff UTF-8\n\n' + '\n\n'.join(texts[:5]).encode())
  rows = [json.dumps({'text': t}) for t in texts[2 * third:] + texts[third:third + 3]]
  rows[4:4] = ['{not json', json.dumps({'text': ' \t '})]  # a bad row, an empty text
  (folder / 'c.jsonl').write_text('\n'.join(rows) + '\n', encoding='utf-8')
  return str(folder / '*')


def _config(corpus_glob, tokenizer_path, **data):
  """Returns the tiny pretraining config over the glob, with small shards and passages."""
  c = pretrain.get_config('tiny_classic')
  c.data.corpus = corpus_glob
  c.data.shard_chars = SHARD_CHARS
  c.data.passage_chars = 3000  # cuts the JSON Lines topics into passages
  c.data.near_dups.threshold = 0.0
  for key, value in data.items():
    c.data[key] = value
  c.tokenizer.path = str(tokenizer_path)
  c.tokenizer.vocab_size = 1000
  return c


@pytest.fixture(scope='module')
def reference(tmp_path_factory, corpus_glob, topics_tokenizer):
  """Returns (config, out directory, manifest) of prepare.build with one worker."""
  config = _config(corpus_glob, topics_tokenizer.model_path)
  out = tmp_path_factory.mktemp('reference')
  return config, out, prepare.build(config, out, workers=1, log=_quiet)


def _scan_and_plan(config, work):
  """Returns (source, partitions, report, sizes) of the scan and plan steps, run here."""
  source = prepare_beam._source(config.data)
  parts = prepare_beam._partitions(source)
  for part in parts:
    prepare_beam._scan(part, source, work)
  return (source, parts, *prepare_beam._plan(source, parts, config.data.shard_chars, work))


def test_the_steps_run_here_write_the_shards_of_prepare(reference, tmp_path):
  config, out, manifest = reference
  assert manifest['splits']['train']['shards'] >= 8 and manifest['splits']['val']['shards'] >= 1
  cleaning = manifest['cleaning']
  assert cleaning['dropped']['duplicate'] and cleaning['dropped']['too_short']
  assert cleaning['dropped']['empty'] == 1
  assert cleaning['skipped']['not_utf8_lines'] == cleaning['skipped']['bad_json_rows'] == 1
  source, parts, report, sizes = _scan_and_plan(config, tmp_path)
  assert len(parts) == 3
  assert dataclasses.asdict(report) == manifest['cleaning']
  assert sizes == {e['file'][:-4]: e['documents'] for e in manifest['shards']}
  groups = collections.defaultdict(list)  # what GroupByKey does
  for part in parts:
    for key, value in prepare_beam._emit(part, source, tmp_path):
      groups[key].append(value)
  job = prepare._job(config, manifest['config_digest'], prepare.tokenizer_lib.load_any(
      config.tokenizer.path))
  (tmp_path / 'shards').mkdir()
  for item in reversed(list(groups.items())):  # any order
    prepare_beam._write(item, tmp_path / 'shards', job)
  written = _files(tmp_path / 'shards')
  assert written == {k: v for k, v in _files(out).items() if k in written}
  assert len(written) == 2 * len(manifest['shards'])


# 977 documents survive: a.txt's 580, b.txt's, c.jsonl's 30; 366 with min_chars=200
@pytest.mark.parametrize('data', [{'max_documents': 800}, {'max_documents': 960},
                                  {'max_documents': 300, 'min_chars': 200},
                                  {'dedup': False, 'passage_chars': 0}])
def test_the_plan_keeps_the_documents_the_corpus_reader_keeps(reference, tmp_path, data):
  config = _config(reference[0].data.corpus, reference[0].tokenizer.path, **data)
  expected = corpus.CleaningReport()
  grouping, sizes = prepare._Grouping(SHARD_CHARS), collections.Counter()
  docs = corpus.iter_documents(config.data, expected)
  for split, doc in prepare._labelled(docs, config.data.passage_chars, config.data.val_fraction):
    sizes[prepare.shard_name(split, grouping.add(split, len(doc))[0])] += 1
  _, _, report, planned = _scan_and_plan(config, tmp_path)
  assert report == expected
  assert report.dropped['max_documents'] or not config.data.max_documents
  assert planned == sizes


def test_bad_input_under_error_is_the_corpus_readers_error(reference, tmp_path):
  config = _config(reference[0].data.corpus, reference[0].tokenizer.path, bad_input='error')
  with pytest.raises(ValueError) as local:
    list(corpus.iter_documents(config.data, corpus.CleaningReport()))
  with pytest.raises(ValueError) as planned:
    _scan_and_plan(config, tmp_path)
  assert str(planned.value) == str(local.value)
  assert 'b.txt is not UTF-8 at line' in str(local.value)


def test_the_direct_runner_writes_the_bytes_of_prepare(reference, tmp_path):
  pytest.importorskip('apache_beam', reason='apache-beam needs its own environment (protobuf<7): '
                      f'{prepare_beam.INSTALL}')
  config, out, manifest = reference
  args = ['--runner=DirectRunner']
  assert prepare_beam.build(config, tmp_path, pipeline_args=args, log=_quiet) == manifest
  assert _files(tmp_path) == _files(out)
  # A rerun keeps what holds and writes what is missing or damaged, to the same bytes.
  (tmp_path / prepare.MANIFEST).unlink()
  (tmp_path / 'train-00001.json').unlink()
  damaged = bytearray((tmp_path / 'train-00002.npy').read_bytes())
  damaged[-1] ^= 0xFF
  (tmp_path / 'train-00002.npy').write_bytes(bytes(damaged))
  kept = (tmp_path / 'train-00000.npy').stat().st_mtime_ns
  assert prepare_beam.build(config, tmp_path, pipeline_args=args, log=_quiet) == manifest
  assert _files(tmp_path) == _files(out)
  assert (tmp_path / 'train-00000.npy').stat().st_mtime_ns == kept
  lines = []
  assert prepare_beam.build(config, tmp_path, pipeline_args=args, log=lines.append) == manifest
  assert len(lines) == 1 and 'already holds this build' in lines[0]


def test_without_beam_the_command_names_the_install(tmp_path):
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top,unused-import
    pytest.skip('apache-beam is installed here')
  except ImportError:
    pass
  with pytest.raises(SystemExit) as e:
    prepare_beam.main(['prepare_beam', '--config', 'pretrain:tiny', f'--out={tmp_path}', '--',
                       '--runner=DirectRunner'])
  message = str(e.value.code)
  assert message.startswith('error: mlmjax.prepare_beam needs apache-beam')
  assert prepare_beam.INSTALL in message and '\n' not in message


def test_the_steps_read_and_write_folder_urls(reference, tmp_path):
  tf = pytest.importorskip('tensorflow', reason='tf.io.gfile serves URLs where Beam is absent')
  if prepare_beam.sources._beam() is not None:
    pytest.skip('Beam serves URLs here: test_the_direct_runner_builds_in_a_folder_url covers it')
  config, out, manifest = reference
  root = f'ram://{tmp_path.name}'  # TensorFlow's in-memory filesystem: no local path works there
  for path in sorted(pathlib.Path(config.data.corpus).parent.iterdir()):
    with tf.io.gfile.GFile(f'{root}/corpus/{path.name}', 'wb') as f:
      f.write(path.read_bytes())
  folder, config = config.data.corpus[:-2], _config(f'{root}/corpus/*', config.tokenizer.path)
  source, parts, report, sizes = _scan_and_plan(config, f'{root}/work')
  assert [p[1] for p in parts] == [f'{root}/corpus/{n}' for n in ('a.txt', 'b.txt', 'c.jsonl')]
  report.first_skipped = {k: v.replace(f'{root}/corpus', folder)
                          for k, v in report.first_skipped.items()}
  assert dataclasses.asdict(report) == manifest['cleaning']
  assert sizes == {e['file'][:-4]: e['documents'] for e in manifest['shards']}
  groups = collections.defaultdict(list)
  for part in parts:
    for key, value in prepare_beam._emit(part, source, f'{root}/work'):
      groups[key].append(value)
  job = prepare._job(config, manifest['config_digest'], prepare.tokenizer_lib.load_any(
      config.tokenizer.path))
  for item in groups.items():
    prepare_beam._write(item, f'{root}/shards', job)
  reference_files = _files(out)
  for entry in manifest['shards']:
    for name in (entry['file'], entry['file'][:-4] + '.json'):
      with tf.io.gfile.GFile(f'{root}/shards/{name}', 'rb') as f:
        assert f.read() == reference_files[name], name
  # A damaged shard is written again; a sound one is kept.
  name = manifest['shards'][0]['file']
  with tf.io.gfile.GFile(f'{root}/shards/{name}', 'wb') as f:
    f.write(reference_files[name][:-1])
  key = next(k for k in groups if prepare.shard_name(*k) + '.npy' == name)
  assert prepare_beam._write((key, groups[key]), f'{root}/shards', job) == json.loads(
      reference_files[name[:-4] + '.json'])
  with tf.io.gfile.GFile(f'{root}/shards/{name}', 'rb') as f:
    assert f.read() == reference_files[name]


def test_the_direct_runner_builds_in_a_folder_url(reference, tmp_path):
  if localfilesystem is None:
    pytest.skip(f'apache-beam needs its own environment (protobuf<7): {prepare_beam.INSTALL}')
  config, out, manifest = reference
  _UrlFileSystem.root = tmp_path
  folder = pathlib.Path(config.data.corpus).parent
  (tmp_path / 'corpus').mkdir()
  for path in folder.iterdir():
    (tmp_path / 'corpus' / path.name).write_bytes(path.read_bytes())
  config = _config('mlmjaxtest://corpus/*', config.tokenizer.path)
  url, args = 'mlmjaxtest://shards', ['--runner=DirectRunner']

  def same_build(built):
    """Asserts that a build at the URL holds the reference's shards and tokenizer."""
    assert built['shards'] == manifest['shards'] and built['splits'] == manifest['splits']
    cleaning = json.dumps(built['cleaning']).replace('mlmjaxtest://corpus', str(folder))
    assert json.loads(cleaning) == manifest['cleaning']
    files, reference_files = _files(tmp_path / 'shards'), _files(out)
    assert files.keys() == reference_files.keys()
    assert not list(tmp_path.glob('shards/.beam/*'))  # no scratch left behind
    assert all(files[k] == v for k, v in reference_files.items() if k.endswith(('.npy', '.model')))
    assert json.loads(files[prepare.MANIFEST]) == built

  same_build(prepare_beam.build(config, url, pipeline_args=args, log=_quiet))
  # A rerun keeps what holds and writes what is missing or damaged.
  (tmp_path / 'shards' / prepare.MANIFEST).unlink()
  (tmp_path / 'shards' / 'train-00001.json').unlink()
  damaged = bytearray((tmp_path / 'shards' / 'train-00002.npy').read_bytes())
  damaged[-1] ^= 0xFF
  (tmp_path / 'shards' / 'train-00002.npy').write_bytes(bytes(damaged))
  kept = (tmp_path / 'shards' / 'train-00000.npy').stat().st_mtime_ns
  same_build(prepare_beam.build(config, url, pipeline_args=args, log=_quiet))
  assert (tmp_path / 'shards' / 'train-00000.npy').stat().st_mtime_ns == kept
  lines = []
  same_build(prepare_beam.build(config, url, pipeline_args=args, log=lines.append))
  assert len(lines) == 1 and 'already holds this build' in lines[0]
  config.data.shard_chars = 2 * SHARD_CHARS
  with pytest.raises(ValueError, match='mlmjaxtest://shards holds a build of another config'):
    prepare_beam.build(config, url + '/', pipeline_args=args, log=_quiet)
