"""Tests for mlmjax/corpus.py: sources, cleaning rules and counts, errors, keys, TFDS."""

import gzip
import hashlib
import importlib.util
import itertools
import json
import os
import re
import time

import ftfy
import numpy as np
import pytest

from mlmjax import corpus, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data_cfg(**overrides):
  """Returns the `data` section of the tiny pretraining config with `overrides` applied."""
  spec = importlib.util.spec_from_file_location(
      'pretrain_config', os.path.join(REPO, 'configs', 'pretrain.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config('tiny_classic').data
  for name, value in overrides.items():
    setattr(cfg, name, value)
  return cfg


def _write(path, text, encoding='utf-8'):
  path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
  return str(path)


def _jsonl(path, rows):
  return _write(path, ''.join(json.dumps(r) + '\n' for r in rows))


# ---------------------------------------------------------------------------------------------
# The pydocs source through cleaning (the walk itself: test_pydocs.py)

@pytest.mark.slow
def test_pydocs_through_load_documents_drops_trivial_docstrings(pydocs):
  docs, report = corpus.load_documents(_data_cfg(corpus='pydocs', min_chars=40))
  assert report.documents_in == len(pydocs)
  assert report.dropped['too_short'] > 0
  assert min(map(len, docs)) >= 40


# ---------------------------------------------------------------------------------------------
# .txt

def test_txt_splits_on_blank_lines_and_unwraps(tmp_path):
  text = ('\ufeffFirst paragraph, wrapped\nover two lines.\r\n\r\n'
          'Second   one\n  indented continuation \n \t \n\n\n'
          'Third\n')
  path = _write(tmp_path / 'a.txt', text)
  assert list(sources.read_raw_documents(path)) == [
      'First paragraph, wrapped over two lines.', 'Second   one indented continuation', 'Third']


def test_txt_gzip_and_comma_separated_globs_in_sorted_order(tmp_path):
  (tmp_path / 'd').mkdir()
  _write(tmp_path / 'd' / 'b.txt', 'from b\n')
  _write(tmp_path / 'd' / 'a.txt', 'from a\n\nalso a\n')
  (tmp_path / 'c.txt.gz').write_bytes(gzip.compress(b'from c\n'))
  spec = f'{tmp_path}/c.txt.gz, {tmp_path}/d/*.txt, {tmp_path}/d/a.txt'
  assert list(sources.read_raw_documents(spec)) == ['from c', 'from a', 'also a', 'from b']


def test_txt_real_novel_keeps_every_word_in_paragraphs(shared_data):
  path = shared_data / 'pretrain' / 'general' / 'austen.txt'
  if not path.exists():
    pytest.skip(f'{path} is absent')
  text = path.read_text(encoding='utf-8')
  docs = list(sources.read_raw_documents(str(path)))
  paragraphs = [p for p in re.split(r'\n\s*\n', text) if p.strip()]
  assert len(docs) == len(paragraphs) > 10_000
  assert all('\n' not in d for d in docs)
  assert ' '.join(docs).split() == text.split()  # unwrapping loses or reorders no word


# ---------------------------------------------------------------------------------------------
# .jsonl

def test_jsonl_reads_text_field_and_skips_blank_lines(tmp_path):
  path = _write(tmp_path / 'a.jsonl', '{"id": 1, "body": "one"}\n\n{"body": "two", "x": null}\n')
  assert list(sources.read_raw_documents(path, text_field='body')) == ['one', 'two']


@pytest.mark.parametrize('line,expected', [
    ('{"body": "ok"', ['line 2', 'not valid JSON']),
    ('["body"]', ['line 2', 'expected a JSON object']),
    ('{"text": "x"}', ['line 2', "no field 'body'", 'data.text_field']),
    ('{"body": 3}', ['line 2', "field 'body' is int"]),
])
def test_jsonl_bad_lines_name_file_line_and_field(tmp_path, line, expected):
  path = _write(tmp_path / 'bad.jsonl', '{"body": "fine"}\n' + line + '\n')
  with pytest.raises(ValueError) as e:
    list(sources.read_raw_documents(path, text_field='body'))
  for part in [path, *expected]:
    assert part in str(e.value)


def test_real_bbc_mojibake_is_repaired(shared_data):
  path = shared_data / 'tasks' / 'bbc_news_topic5.jsonl'
  if not path.exists():
    pytest.skip(f'{path} is absent')
  raw = list(itertools.islice(sources.read_raw_documents(str(path)), 200))
  broken = [t for t in raw if 'Â£' in t]
  assert broken
  for text in broken:
    cleaned = corpus.clean_document(text)
    assert 'Â' not in cleaned
    assert cleaned.count('£') == text.count('Â£')


# ---------------------------------------------------------------------------------------------
# Cleaning rules

@pytest.mark.parametrize('raw,kwargs,expected', [
    ('price (Â£600m) &amp; more', {}, 'price (£600m) & more'),
    ('price (Â£600m) &amp; more', {'fix_text': False}, 'price (Â£600m) &amp; more'),
    ('cafe\u0301', {'fix_text': False}, 'caf\u00e9'),
    ('cafe\u0301', {'fix_text': False, 'normalization': ''}, 'cafe\u0301'),
    ('\ufb01ne \u2460', {'fix_text': False, 'normalization': 'NFKC'}, 'fine 1'),
    ('a\x00b\x07c\u200bd\ufeffe\tf\r\ng\rh', {}, 'abcde f\ng\nh'),
    ('  a  b   \n\n\n\n c \t\n', {}, 'a b\n\n c'),
])
def test_clean_document_rules(raw, kwargs, expected):
  assert corpus.clean_document(raw, **kwargs) == expected


def test_fast_paths_match_ftfy_and_cleaning_is_idempotent(pydocs, shared_data):
  samples = [d for d in pydocs if not d.isascii() or '&' in d][:150] + pydocs[::100]
  bbc = shared_data / 'tasks' / 'bbc_news_topic5.jsonl'
  if bbc.exists():
    samples += list(itertools.islice(sources.read_raw_documents(str(bbc)), 150))
  for text in samples:
    cleaned = corpus.clean_document(text, normalization='')
    reference = corpus.clean_document(ftfy.fix_text(text, normalization=None), fix_text=False,
                                      normalization='')
    assert cleaned == reference
    assert corpus.clean_document(cleaned) == corpus.clean_document(text)
    assert corpus.clean_document(corpus.clean_document(text)) == corpus.clean_document(text)


def test_report_counts_each_rule_and_dedup_keeps_first(tmp_path):
  long = 'x' * 40
  rows = [
      'Â£ mojibake ' + long,            # fix_text
      'cafe\u0301 ' + long,             # normalization
      'ctrl\u200b ' + long,             # control_chars (ftfy keeps zero-width spaces)
      'spaces   here ' + long,          # whitespace
      'first copy ' + long,             # kept
      'first  copy ' + long,            # whitespace, then a duplicate of the row above
      '   ',                            # whitespace, then empty
      'short',                          # too_short
      'y' * 39 + '!',                   # exactly min_chars=40: kept
      'tail one ' + long, 'tail two ' + long,  # max_documents=7 keeps one of these
  ]
  path = _jsonl(tmp_path / 'rows.jsonl', [{'text': t} for t in rows])
  docs, report = corpus.load_documents(_data_cfg(corpus=path, min_chars=40, max_documents=7))
  assert docs == ['£ mojibake ' + long, 'caf\u00e9 ' + long, 'ctrl ' + long,
                  'spaces here ' + long, 'first copy ' + long, 'y' * 39 + '!', 'tail one ' + long]
  assert report.changed == {'fix_text': 1, 'normalization': 1, 'control_chars': 1,
                            'whitespace': 3}
  assert report.dropped == {'empty': 1, 'too_short': 1, 'duplicate': 1, 'max_documents': 1}
  assert report.documents_in == len(rows) == report.documents_out + sum(report.dropped.values())
  assert report.chars_in == sum(map(len, rows))
  assert report.chars_out == sum(map(len, docs))
  assert 'duplicate 1' in report.summary() and 'whitespace 3' in report.summary()
  undeduped, report = corpus.load_documents(_data_cfg(corpus=path, dedup=False))
  assert undeduped.count('first copy ' + long) == 2 and report.dropped['duplicate'] == 0


def test_digest_set_answers_as_a_python_set_across_merged_runs():
  rng = np.random.default_rng(0)
  # Edge values and repeats; a buffer of 7 makes many runs and merges of unequal sizes.
  values = [0, 2**64 - 1, 2**63] + rng.integers(0, 2**64, 2_000, dtype=np.uint64).tolist()
  values += [values[i] for i in rng.integers(0, len(values), 500)]
  digests, reference = corpus.DigestSet(buffer=7), set()
  for v in values:
    assert (v in digests) == (v in reference) != digests.add(v)
    reference.add(v)
    assert len(digests) == len(reference)
  assert len(digests._runs) <= int(np.log2(len(reference) / 7)) + 1
  # v ^ 1 shares v's filter bit, so absent neighbours reach the search of the runs.
  for v in rng.integers(0, 2**64, 2_000, dtype=np.uint64).tolist() + values + [v ^ 1 for v in values]:
    assert (v in digests) == (v in reference)
  assert corpus.text_digest('a') == corpus.text_digest('a') != corpus.text_digest('b')


# ---------------------------------------------------------------------------------------------
# Errors

def test_missing_file_and_empty_glob_name_the_path_and_key(tmp_path):
  for spec in (str(tmp_path / 'nope.txt'), str(tmp_path / '*.txt')):
    for fn in (corpus.load_documents, corpus.corpus_key):
      with pytest.raises(FileNotFoundError, match='data.corpus') as e:
        fn(_data_cfg(corpus=spec))
      assert spec in str(e.value)


def test_empty_corpus_names_source_and_counts(tmp_path):
  path = _write(tmp_path / 'tiny.txt', 'too short\n\nalso short\n')
  with pytest.raises(ValueError) as e:
    corpus.load_documents(_data_cfg(corpus=path, min_chars=40))
  assert path in str(e.value) and 'too_short 2' in str(e.value) and 'data.min_chars' in str(e.value)


def test_non_utf8_file_names_file_and_line(tmp_path):
  path = _write(tmp_path / 'latin1.txt', 'fine line\n\nstill fine\ncaf\u00e9 au lait\n', 'latin-1')
  with pytest.raises(ValueError, match='is not UTF-8 at line 4') as e:
    corpus.load_documents(_data_cfg(corpus=path))
  assert path in str(e.value)


def test_bad_extension_directory_and_config_values(tmp_path):
  path = _write(tmp_path / 'doc.md', 'text')
  with pytest.raises(ValueError, match=r'\.txt, \.jsonl'):
    sources.read_raw_documents(path)
  with pytest.raises(FileNotFoundError, match='is a directory'):
    sources.read_raw_documents(str(tmp_path))
  with pytest.raises(ValueError, match='data.normalization'):
    corpus.load_documents(_data_cfg(normalization='NFX'))
  with pytest.raises(ValueError, match='data.min_chars'):
    corpus.corpus_key(_data_cfg(min_chars=-1))
  with pytest.raises(ValueError, match='data.corpus'):
    corpus.load_documents(_data_cfg(corpus=' '))


# ---------------------------------------------------------------------------------------------
# corpus_key

def test_corpus_key_tracks_files_and_cleaning_fields(tmp_path):
  path = _write(tmp_path / 'a.txt', 'some text here\n')
  cfg = _data_cfg(corpus=path)
  key = corpus.corpus_key(cfg)
  assert key == corpus.corpus_key(_data_cfg(corpus=path)) and len(key) == 16
  changes = dict(text_field='body', max_documents=5, min_chars=3, fix_text=False,
                 normalization='NFKC', dedup=False, corpus='pydocs')
  keys = {name: corpus.corpus_key(_data_cfg(**{'corpus': path, name: value}))
          for name, value in changes.items()}
  assert len(set(keys.values()) | {key}) == len(changes) + 1
  stat = os.stat(path)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  touched = corpus.corpus_key(cfg)
  _write(tmp_path / 'a.txt', 'some text here, longer\n')
  assert len({key, touched, corpus.corpus_key(cfg)}) == 3
  tfds_keys = {corpus.corpus_key(_data_cfg(corpus='tfds:x', tfds_split=s)) for s in ('a', 'b')}
  assert len(tfds_keys) == 2


# ---------------------------------------------------------------------------------------------
# TFDS

def test_tfds_missing_data_fails_fast_with_one_line(tmp_path):
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
  cfg = _data_cfg(corpus='tfds:imdb_reviews', tfds_data_dir=str(tmp_path))
  start = time.monotonic()  # the import (seconds) is not the point: TFDS's retries (~200 s) are
  with pytest.raises(FileNotFoundError) as e:
    corpus.load_documents(cfg)
  assert time.monotonic() - start < 30
  message = str(e.value)
  assert '\n' not in message and str(tmp_path) in message
  assert 'data.tfds_data_dir' in message and 'data.tfds_download' in message


@pytest.fixture(scope='module')
def tiny_tfds(tmp_path_factory):
  """Returns (data_dir, texts) of a small TFDS dataset built locally, without a network."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  texts = [f'Example document number {i} for the local TFDS builder.' for i in range(20)]
  texts.append(texts[0])

  class MlmjaxCorpusTestTexts(tfds.core.GeneratorBasedBuilder):
    """Twenty-one short texts (one repeated) with an id."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {'text': tfds.features.Text(), 'id': np.int64}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, text in enumerate(texts):
        yield i, {'text': text, 'id': i}

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  MlmjaxCorpusTestTexts(data_dir=data_dir).download_and_prepare()
  return data_dir, texts


def test_tfds_reads_a_locally_built_dataset(tiny_tfds):
  data_dir, texts = tiny_tfds
  cfg = _data_cfg(corpus='tfds:mlmjax_corpus_test_texts', tfds_data_dir=data_dir)
  docs, report = corpus.load_documents(cfg)
  assert sorted(docs) == sorted(set(texts))
  assert report.documents_in == len(texts) and report.dropped['duplicate'] == 1
  assert corpus.load_documents(cfg)[0] == docs
  with pytest.raises(ValueError, match="'body' is not a feature.*id, text"):
    corpus.load_documents(_data_cfg(corpus=cfg.corpus, tfds_data_dir=data_dir, text_field='body'))


# ---------------------------------------------------------------------------------------------
# Bad input: data.bad_input='skip' counts and drops, 'error' names the file and line

GOOD = 'A good paragraph of plain English prose, long enough to be kept by min_chars.'
PARA = 'Another paragraph of the same file, also long enough to be kept after cleaning.'

# kind -> (file name, bytes, the documents of that file kept under 'skip', message parts)
BAD_FILES = {
    'binary_files': ('b.txt', b'\x7fELF\x02\x01\x01\x00\x00\x00' + GOOD.encode(), [],
                     ['looks binary', 'NUL byte at offset 7']),
    'empty_files': ('e.txt', b' \n\n\t\n', [], ['is empty']),
    'unreadable_files': ('g.txt.gz', GOOD.encode(), [], ['not a valid gzip file']),
    'not_utf8_lines': ('l.txt', (PARA + '\n\nCaf\u00e9 au lait,\nand the rest of it.\n\n' + GOOD
                                 ).encode('latin-1'), [PARA, GOOD],
                       ['is not UTF-8 at line 3', "b'\\xe9' at column 4"]),
    'long_lines': ('long.txt', (PARA + '\n\n' + 'x' * 5000 + '\nits paragraph\n\n' + GOOD
                                ).encode(), [PARA, GOOD],
                   ['line 3 is longer than data.max_line_chars=100']),
    'bad_json_rows': ('j.jsonl', ('{"text": "' + PARA + '"}\n{"text": "cut\n[1, 2]\n').encode(),
                      [PARA], ['line 2', 'not valid JSON']),
    'missing_field_rows': ('m.jsonl', ('{"body": "x"}\n{"text": 3}\n{"text": "' + PARA + '"}\n'
                                       ).encode(), [PARA], ['line 1', "no field 'text'"]),
}
BAD_COUNTS = {'bad_json_rows': 2, 'missing_field_rows': 2}


@pytest.mark.parametrize('kind', sorted(BAD_FILES))
def test_bad_input_in_a_glob_is_skipped_and_counted_or_names_file_and_line(tmp_path, kind):
  name, content, kept, parts = BAD_FILES[kind]
  _write(tmp_path / 'a_good.txt', GOOD + ' (a)\n')
  path = _write(tmp_path / name, content)
  spec = f'{tmp_path}/*'
  docs, report = corpus.load_documents(_data_cfg(corpus=spec, max_line_chars=100, dedup=False))
  assert docs == [GOOD + ' (a)'] + kept  # paragraphs around a skipped line are dropped whole
  assert report.skipped == {k: BAD_COUNTS.get(k, 1) if k == kind else 0
                            for k in sources.BAD_INPUT_KINDS}
  summary = report.summary()
  assert f'{kind} {BAD_COUNTS.get(kind, 1)}' in summary and path in summary
  with pytest.raises(ValueError) as e:
    corpus.load_documents(_data_cfg(corpus=spec, max_line_chars=100, bad_input='error'))
  message = str(e.value)
  assert '\n' not in message
  for part in [path, *parts]:
    assert part in message


@pytest.mark.parametrize('kind', ['binary_files', 'empty_files', 'unreadable_files'])
def test_a_bad_file_named_literally_is_an_error_under_either_policy(tmp_path, kind):
  name, content, _, parts = BAD_FILES[kind]
  good = _write(tmp_path / 'good.txt', GOOD + '\n')
  path = _write(tmp_path / name, content)
  for policy in sources.BAD_INPUT_POLICIES:
    with pytest.raises(ValueError) as e:
      corpus.load_documents(_data_cfg(corpus=f'{good},{path}', bad_input=policy))
    for part in [path, *parts]:
      assert part in str(e.value)
  # Matched by a glob as well as named: still asked for by name.
  with pytest.raises(ValueError, match='corpus file'):
    corpus.load_documents(_data_cfg(corpus=f'{tmp_path}/*,{path}'))


def test_utf16_text_counts_as_binary_with_a_hint(tmp_path):
  _write(tmp_path / 'a.txt', GOOD + '\n')
  _write(tmp_path / 'u.txt', (PARA + '\n').encode('utf-16'))
  docs, report = corpus.load_documents(_data_cfg(corpus=f'{tmp_path}/*.txt'))
  assert docs == [GOOD] and report.skipped['binary_files'] == 1
  assert 'UTF-16' in report.first_skipped['binary_files']


def test_skipping_keeps_line_numbers_after_an_over_long_line_and_counts_every_kind(tmp_path):
  rows = [json.dumps({'text': PARA}), json.dumps({'text': 'y' * 3000}), '{"text": 1}',
          json.dumps({'text': GOOD}), 'not json', json.dumps({'body': PARA})]
  path = _write(tmp_path / 'rows.jsonl', '\n'.join(rows).encode() + b'\n\xff\xfe\n')
  docs, report = corpus.load_documents(_data_cfg(corpus=path, max_line_chars=1000))
  assert docs == [PARA, GOOD]
  assert report.skipped == {'binary_files': 0, 'empty_files': 0, 'unreadable_files': 0,
                            'not_utf8_lines': 1, 'long_lines': 1, 'bad_json_rows': 1,
                            'missing_field_rows': 2}
  first = report.first_skipped
  assert first['long_lines'].endswith('line 2 is longer than data.max_line_chars=1000 characters '
                                      '(minified data or a dump?)')
  assert 'line 3' in first['missing_field_rows'] and 'line 5' in first['bad_json_rows']
  assert 'at line 7' in first['not_utf8_lines']


def test_truncated_gzip_keeps_what_was_read_and_counts_the_file(tmp_path):
  text = ''.join(f'Paragraph number {i} of a long gzipped file, kept when read.\n\n'
                 for i in range(3000))
  data = gzip.compress(text.encode())
  path = _write(tmp_path / 'cut.txt.gz', data[:len(data) * 3 // 4])
  _write(tmp_path / 'a.txt', GOOD + '\n')
  docs, report = corpus.load_documents(_data_cfg(corpus=f'{tmp_path}/*'))
  assert docs[0] == GOOD and 100 < len(docs) - 1 < 3000
  assert docs[1:] == [f'Paragraph number {i} of a long gzipped file, kept when read.'
                      for i in range(len(docs) - 1)]
  assert report.skipped['unreadable_files'] == 1 and path in report.first_skipped['unreadable_files']


def test_nothing_left_after_skipping_says_why(tmp_path):
  path = _write(tmp_path / 'rows.jsonl', ''.join(json.dumps({'body': PARA}) + '\n' for _ in range(3)))
  with pytest.raises(ValueError) as e:
    corpus.load_documents(_data_cfg(corpus=path))
  first, second = str(e.value).splitlines()
  assert 'no documents left' in first and 'missing_field_rows 3' in first
  assert second.startswith('first skipped: ') and 'line 1' in second and 'data.text_field' in second


def test_bad_input_keys_are_checked_and_change_the_corpus_key(tmp_path):
  path = _write(tmp_path / 'a.txt', GOOD + '\n')
  with pytest.raises(ValueError, match=r"data.bad_input='ignore': choose one of \('skip', 'error'\)"):
    corpus.load_documents(_data_cfg(corpus=path, bad_input='ignore'))
  with pytest.raises(ValueError, match='data.max_line_chars=0'):
    corpus.corpus_key(_data_cfg(corpus=path, max_line_chars=0))
  keys = {corpus.corpus_key(_data_cfg(corpus=path, **kw))
          for kw in ({}, {'bad_input': 'error'}, {'max_line_chars': 10})}
  assert len(keys) == 3


def test_failed_build_on_bad_input_leaves_earlier_cache_intact(tmp_path, topics_corpus):
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  from mlmjax import input_pipeline  # pylint: disable=g-import-not-at-top
  data = tmp_path / 'data'
  data.mkdir()
  _write(data / 'topics.txt', topics_corpus.read_bytes())
  c = pretrain.get_config('tiny_classic')
  c.data.corpus, c.data.cache_dir = f'{data}/*.txt', str(tmp_path / 'cache')
  c.tokenizer.vocab_size, c.train.seq_len = 1000, 64
  for name in ('w1', 'w2', 'w3'):
    (tmp_path / name).mkdir()
  input_pipeline.prepare_data(c, tmp_path / 'w1', log=lambda s: None)

  def snapshot():
    files = (p.relative_to(tmp_path) for p in sorted(tmp_path.rglob('*')) if p.is_file())
    return {str(p): hashlib.sha256((tmp_path / p).read_bytes()).hexdigest()
            for p in files if p.parts[0] != 'data'}

  before = snapshot()
  assert any('tokenizers' in p for p in before) and any(p.endswith('train.npy') for p in before)
  binary = _write(data / 'z.txt', b'\x00\x01binary')
  c.data.bad_input = 'error'
  with pytest.raises(ValueError, match='looks binary') as e:
    input_pipeline.prepare_data(c, tmp_path / 'w2', log=lambda s: None)
  assert binary in str(e.value)
  assert snapshot() == before  # nothing added, nothing half-written, nothing changed
  c.data.bad_input = 'skip'
  lines = []
  input_pipeline.prepare_data(c, tmp_path / 'w3', log=lines.append)
  assert 'binary_files 1' in '\n'.join(lines)
