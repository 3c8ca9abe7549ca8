"""Tests for mlmjax.prepare: the streaming, sharded token build (workers, processes, resume, format)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import pretrain
from mlmjax import corpus, prepare
from mlmjax import input_pipeline as ip
from mlmjax import tokenizer as tok_lib
from mlmjax.tokenizer import CLS_ID, PAD_ID, SEP_ID

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_CHARS = 40_000  # the ~330 k characters of the help topics make about 8 train shards


def _config(corpus_path, tokenizer_path='', **data):
  """Returns the tiny pretraining config over a small corpus, with small shards."""
  c = pretrain.get_config('tiny_classic')
  c.data.corpus = str(corpus_path)
  c.data.shard_chars = SHARD_CHARS
  c.data.passage_chars = 3000  # cuts the longest topics, so passages cross shard boundaries
  c.data.near_dups.threshold = 0.0  # prepare splits each document by its own hash
  for key, value in data.items():
    c.data[key] = value
  c.tokenizer.path = str(tokenizer_path)
  c.tokenizer.vocab_size = 1000
  return c


def _files(directory) -> dict[str, bytes]:
  """Returns {file name: bytes} of a build directory."""
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _quiet(_):
  pass


@pytest.fixture(scope='module')
def reference(tmp_path_factory, topics_corpus, topics_tokenizer):
  """Returns (config, out directory, manifest) of a one-worker, one-process build."""
  config = _config(topics_corpus, topics_tokenizer.model_path)
  out = tmp_path_factory.mktemp('reference')
  manifest = prepare.build(config, out, workers=1, log=_quiet)
  return config, out, manifest


def test_one_and_two_workers_write_the_same_bytes(reference, tmp_path):
  config, out, manifest = reference
  assert manifest is not None and manifest['splits']['train']['shards'] >= 4
  assert manifest['splits']['val']['shards'] >= 1
  prepare.build(config, tmp_path, workers=2, log=_quiet)
  assert _files(tmp_path) == _files(out)
  assert not list(tmp_path.glob('*.tmp'))


def test_workers_do_not_import_jax():
  code = 'import sys, mlmjax.prepare; print("jax" in sys.modules)'
  found = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         cwd=REPO, timeout=60)
  assert found.stdout.strip() == 'False'


def test_processes_each_build_their_shards_and_together_the_single_process_build(reference,
                                                                                 tmp_path):
  config, out, manifest = reference
  lines = []
  assert prepare.build(config, tmp_path, process_index=1, process_count=2, log=lines.append) is None
  assert not (tmp_path / prepare.MANIFEST).exists()
  assert any('belong to other processes' in line for line in lines)
  built = {p.name for p in tmp_path.glob('*.npy')}
  assert built == {s['file'] for s in manifest['shards'] if s['index'] % 2 == 1}
  assert prepare.build(config, tmp_path, process_index=0, process_count=2, log=_quiet) == manifest
  assert _files(tmp_path) == _files(out)


def test_a_killed_build_resumes_at_its_incomplete_shards_to_the_same_bytes(reference, tmp_path):
  config, out, _ = reference
  shutil.copytree(out, tmp_path, dirs_exist_ok=True)
  # What a kill leaves: no manifest, a half-written temporary, a shard renamed but without its
  # meta; and a shard damaged since (its checksum fails).
  (tmp_path / prepare.MANIFEST).unlink()
  (tmp_path / 'train-00002.npy').unlink()
  (tmp_path / 'train-00002.json').unlink()
  (tmp_path / 'train-00002.npy.x1y2z3.tmp').write_bytes(b'\x93NUMPY half a shard')
  (tmp_path / 'train-00003.json').unlink()
  damaged = bytearray((tmp_path / 'train-00001.npy').read_bytes())
  damaged[-1] ^= 0xFF
  (tmp_path / 'train-00001.npy').write_bytes(bytes(damaged))
  kept = (tmp_path / 'train-00000.npy').stat().st_mtime_ns
  lines = []
  manifest = prepare.build(config, tmp_path, workers=1, log=lines.append)
  assert manifest is not None and _files(tmp_path) == _files(out)
  assert (tmp_path / 'train-00000.npy').stat().st_mtime_ns == kept  # verified, not rewritten
  assert any('train-00001.npy does not match its meta file' in line for line in lines)
  rebuilt = {line.split()[2].rstrip(':') for line in lines if line.startswith('prepare: wrote')}
  assert rebuilt == {'train-00001.npy', 'train-00002.npy', 'train-00003.npy'}
  # A finished build is verified and left alone.
  lines.clear()
  assert prepare.build(config, tmp_path, workers=1, log=lines.append) == manifest
  assert len(lines) == 1 and 'already holds this build' in lines[0]


@pytest.mark.slow
def test_a_build_killed_by_sigkill_resumes_to_the_same_bytes(topics_corpus, topics_tokenizer,
                                                             tmp_path):
  config = _config(topics_corpus, topics_tokenizer.model_path, shard_chars=4000)
  expected = prepare.build(config, tmp_path / 'whole', workers=1, log=_quiet)
  out = tmp_path / 'killed'
  args = [sys.executable, '-m', 'mlmjax.prepare', '--config', 'pretrain:tiny',
          f'--config.data.corpus={topics_corpus}', '--config.data.shard_chars=4000',
          '--config.data.passage_chars=3000', '--config.data.near_dups.threshold=0',
          f'--config.tokenizer.path={topics_tokenizer.model_path}',
          '--config.tokenizer.vocab_size=1000', '--workers=2', f'--out={out}']
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  deadline = time.monotonic() + 60
  while not (out / 'train-00010.json').exists() and time.monotonic() < deadline:
    time.sleep(0.01)
  os.killpg(proc.pid, signal.SIGKILL)  # the build and its workers, as a crash would
  proc.wait(timeout=30)
  assert not (out / prepare.MANIFEST).exists(), 'the build finished before it was killed'
  assert prepare.build(config, out, workers=1, log=_quiet) == expected
  assert _files(out) == _files(tmp_path / 'whole')


def test_a_missing_corpus_file_is_one_line_naming_it(tmp_path, capsys):
  missing = tmp_path / 'missing.txt'
  argv = ['prepare', '--config', 'pretrain:tiny', f'--config.data.corpus={missing}',
          f'--out={tmp_path / "out"}', '--workers=1']
  with pytest.raises(SystemExit) as e:
    prepare.main(argv)
  message = str(e.value.code)
  assert message.startswith('error: data.corpus: corpus file') and str(missing) in message
  assert '\n' not in message
  assert not (tmp_path / 'out').exists()


def test_bad_flags_and_a_directory_of_another_build_are_one_line_errors(reference, tmp_path):
  config, out, _ = reference
  with pytest.raises(ValueError, match=r'--process_index=2 must be in \[0, --process_count=2\)'):
    prepare.build(config, tmp_path, process_index=2, process_count=2, log=_quiet)
  with pytest.raises(ValueError, match='data.shard_chars=0 must be in'):
    prepare.build(_config(config.data.corpus, config.tokenizer.path, shard_chars=0), tmp_path)
  other = _config(config.data.corpus, config.tokenizer.path)
  other.train.seq_len = 32
  with pytest.raises(ValueError, match='holds a build of another config .* choose another --out'):
    prepare.build(other, out, log=_quiet)


def test_manifest_counts_agree_with_the_shards(reference):
  config, out, manifest = reference
  assert manifest == json.loads((out / prepare.MANIFEST).read_text())
  tokenizer = tok_lib.Tokenizer.load(out / manifest['tokenizer']['file'])
  assert manifest['tokenizer']['fingerprint'] == tokenizer.fingerprint
  assert manifest['config_digest'] == json.loads((out / prepare.BUILD).read_text())['config_digest']
  totals = {s: dict.fromkeys(('shards', 'documents', 'rows', 'tokens', 'bytes'), 0)
            for s in prepare.SPLITS}
  for entry in manifest['shards']:
    path = out / entry['file']
    rows = np.load(path)
    assert rows.dtype == np.uint16 and rows.shape == (entry['rows'], config.train.seq_len)
    special = (rows == PAD_ID) | (rows == CLS_ID) | (rows == SEP_ID)
    assert entry['tokens'] == int((~special).sum())
    assert (rows[:, 0] == CLS_ID).all() and ((rows == CLS_ID).sum(1) == (rows == SEP_ID).sum(1)).all()
    assert entry['bytes'] == path.stat().st_size
    assert entry['sha256'] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(path.with_suffix('.json').read_text())['sha256'] == entry['sha256']
    for key in ('documents', 'rows', 'tokens', 'bytes'):
      totals[entry['split']][key] += entry[key]
    totals[entry['split']]['shards'] += 1
  assert manifest['splits'] == totals
  cleaning = manifest['cleaning']
  assert cleaning['documents_out'] <= sum(t['documents'] for t in totals.values())  # + passages


def test_rows_equal_todays_packing_of_the_same_documents(reference, topics_tokenizer):
  # The in-memory cache packs a whole split in one shuffled order; a shard packs its group in
  # prepare.shard_order. Given the same documents in the same order, the rows are the same.
  config, out, manifest = reference
  docs, _ = corpus.load_documents(config.data)
  docs = corpus.passages(docs, config.data.passage_chars)
  train, val = ip.split_documents(docs, config.data.val_fraction)
  for split, indices in (('train', train), ('val', val)):
    shards = [s for s in manifest['shards'] if s['split'] == split]
    start = 0
    for entry in shards:
      group = [docs[i] for i in indices[start:start + entry['documents']]]
      start += entry['documents']
      chars = sum(map(len, group))
      if entry is not shards[-1]:  # a group closes at the first document that fills it
        assert chars >= SHARD_CHARS > chars - len(group[-1])
      order = prepare.shard_order(split, entry['index'], len(group))
      ids = topics_tokenizer.encode_batch([group[j] for j in order])
      expected = ip.pack_documents(ids, config.train.seq_len)
      np.testing.assert_array_equal(np.load(out / entry['file']), expected)
    assert start == len(indices)


@pytest.mark.slow
def test_the_tokenizer_is_trained_on_the_training_split_of_the_sample(topics_corpus, tmp_path):
  # With a sample holding the whole corpus, the tokenizer is the in-memory pipeline's one.
  config = _config(topics_corpus)
  config.tokenizer.sample_chars = 0
  manifest = prepare.build(config, tmp_path, workers=1, log=_quiet)
  docs, _ = corpus.load_documents(config.data)
  docs = corpus.passages(docs, config.data.passage_chars)
  train, _ = ip.split_documents(docs, config.data.val_fraction)
  expected = tok_lib.train_tokenizer([docs[i] for i in train], tmp_path / 'expected.model',
                                     vocab_size=1000, max_sentences=config.tokenizer.max_sentences,
                                     seed=config.seed)
  assert manifest['tokenizer']['fingerprint'] == expected.fingerprint
  assert (tmp_path / 'tokenizer.model').read_bytes() == expected.serialized_model


def test_sample_is_bounded_seeded_and_keeps_order():
  texts = [f'document {i} ' + 'x' * (i % 50) for i in range(2000)]
  total = sum(map(len, texts))
  assert prepare.sample(texts, 0, 0) is texts
  assert prepare.sample(iter(texts), total + 1, 0) == texts
  part = prepare.sample(iter(texts), total // 10, 0)
  assert total // 10 <= sum(map(len, part)) < total // 10 + 70
  assert part == [t for t in texts if t in set(part)]  # corpus order
  assert part == prepare.sample(iter(texts), total // 10, 0)
  assert part != prepare.sample(iter(texts), total // 10, 1)
