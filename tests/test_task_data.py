"""Tests for mlmjax/tasks/task_data.py: reading, hash splits, encoding, metrics, eval batches."""

import collections
import inspect
import json
import math
import re
import time

import ml_collections
import numpy as np
import pytest

from mlmjax import corpus
from mlmjax import tokenizer as tokenizer_lib
from mlmjax.tasks import task_data as td


@pytest.fixture(scope='module')
def tok(topics_tokenizer):
  """Returns the session's 1,000-piece tokenizer of the pydoc topics."""
  return topics_tokenizer


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(id_field='id', group_field='', val_fraction=0.1,
                                     test_fraction=0.1))
  c.update(kw)
  return c


def _within_binomial(count: int, n: int, p: float, sds: float = 4.0) -> bool:
  return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


# ---------------------------------------------------------------------------------------------
# Reading


def test_read_examples_jsonl_and_max_examples(tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_text('{"id": 1, "text": "a"}\n\n{"id": 2, "text": "b"}\n{"id": 3, "text": "c"}\n')
  rows = td.read_examples(str(path))
  assert [r['id'] for r in rows] == [1, 2, 3]
  assert [r['text'] for r in td.read_examples(str(path), max_examples=2)] == ['a', 'b']


def test_read_examples_bad_line_names_file_and_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3,, }\n')
  with pytest.raises(ValueError, match=r'bad\.jsonl line 3: not valid JSON'):
    td.read_examples(str(path))
  path.write_text('{"id": 1}\n[1, 2]\n')
  with pytest.raises(ValueError, match=r'bad\.jsonl line 2: expected a JSON object'):
    td.read_examples(str(path))
  path.write_bytes(b'{"id": 1}\n{"t": "\xff"}\n')
  with pytest.raises(ValueError, match=r'bad\.jsonl line 2: not UTF-8'):
    td.read_examples(str(path))


def test_read_examples_missing_and_empty(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'task_data\.path: .*nope\.jsonl does not exist'):
    td.read_examples(str(tmp_path / 'nope.jsonl'))
  (tmp_path / 'empty.jsonl').write_text('\n\n')
  with pytest.raises(ValueError, match='holds no examples'):
    td.read_examples(str(tmp_path / 'empty.jsonl'))
  with pytest.raises(ValueError, match='task_data.path is empty'):
    td.read_examples('')


def test_field_error_names_key_field_row_and_file():
  row = {'text': 'x'}
  assert td.field(row, 'text', 3, 'data.jsonl') == 'x'
  with pytest.raises(ValueError, match=r"task_data\.label_field: 'lbl' is missing in row 3 of "
                                       r'data\.jsonl'):
    td.field(row, 'lbl', 3, 'data.jsonl', key='label_field')
  with pytest.raises(ValueError, match=r"'text' in row 4 of d\.jsonl is list"):
    td.text_field({'text': ['a']}, 'text', 4, 'd.jsonl', key='text_field')
  assert td.text_field({'label': 7}, 'label', 1, 'd.jsonl') == '7'


# ---------------------------------------------------------------------------------------------
# Splits


def test_split_of_is_deterministic_with_binomial_fractions():
  n, val, test = 2000, 0.1, 0.2
  ids = [f'example-{i}' for i in range(n)]
  first = [td.split_of(i, val, test) for i in ids]
  assert first == [td.split_of(i, val, test) for i in ids]
  counts = td.split_counts(first)
  assert sum(counts.values()) == n
  assert _within_binomial(counts['val'], n, val), counts
  assert _within_binomial(counts['test'], n, test), counts
  # Raising val_fraction only moves train examples into val: test and old val stay where they were.
  more = [td.split_of(i, 0.3, test) for i in ids]
  for a, b in zip(first, more):
    assert a == b or (a == 'train' and b == 'val')
  assert td.split_counts([td.split_of(i, 0.0, 0.0) for i in ids])['train'] == n


def test_split_of_rejects_bad_fractions():
  with pytest.raises(ValueError, match='task_data.val_fraction=0.6 and task_data.test_fraction=0.5'):
    td.split_of('x', 0.6, 0.5)
  with pytest.raises(ValueError, match='val_fraction=-0.1'):
    td.split_of('x', -0.1, 0.1)


def test_group_field_keeps_groups_together():
  rows = [{'id': f'{g}-{k}', 'doc': f'doc{g}', 'text': f'sentence {k} of {g}'}
          for g in range(200) for k in range(5)]
  by_group = td.split_rows(rows, 'x.jsonl', _cfg(group_field='doc', val_fraction=0.2,
                                                  test_fraction=0.2))
  for g in range(200):
    assert len(set(by_group[5 * g:5 * g + 5])) == 1
  counts = td.split_counts(by_group)
  assert _within_binomial(counts['test'] // 5, 200, 0.2)
  # Hashing the id instead splits some documents across splits.
  by_id = td.split_rows(rows, 'x.jsonl', _cfg(val_fraction=0.2, test_fraction=0.2))
  assert any(len(set(by_id[5 * g:5 * g + 5])) > 1 for g in range(200))


def test_content_split_follows_content_not_position():
  rows = [{'text': f't{i}'} for i in range(300)]
  splits = td.split_rows(rows, 'x.jsonl', _cfg(id_field=''))
  moved = td.split_rows(rows[::-1], 'x.jsonl', _cfg(id_field=''))
  assert splits == moved[::-1]
  assert td.split_key({'b': 1, 'a': 2}, 1, 'x') == td.split_key({'a': 2, 'b': 1}, 1, 'x')
  with pytest.raises(ValueError, match=r"task_data\.group_field: 'doc' is missing in row 1"):
    td.split_rows(rows, 'x.jsonl', _cfg(group_field='doc'))


# ---------------------------------------------------------------------------------------------
# Encoding


def test_encode_text_layout(tok):
  text = 'The quick brown fox jumps over the lazy dog.'
  pieces = tok.encode(text)
  row = td.encode_text(tok, text, 64)
  n = len(pieces)
  assert row.dtype == np.int32 and row.shape == (64,)
  assert row[0] == td.CLS_ID and row[n + 1] == td.SEP_ID
  assert list(row[1:n + 1]) == pieces
  assert (row[n + 2:] == td.PAD_ID).all()
  assert tok.decode(row[1:n + 1]) == text


def test_encode_text_truncates_and_counts(tok):
  text = 'lambda expressions create anonymous functions ' * 20
  pieces = tok.encode(text)
  stats = {}
  row = td.encode_text(tok, text, 10, stats=stats)
  assert row[0] == td.CLS_ID and row[-1] == td.SEP_ID and (row != td.PAD_ID).all()
  assert list(row[1:-1]) == pieces[:8]
  assert stats == {'truncated': 1, 'pieces_dropped': len(pieces) - 8}
  rows = td.encode_texts(tok, [text, 'short'], 10, stats=stats)
  assert (rows[0] == row).all() and rows[1][0] == td.CLS_ID and rows[1][-1] == td.PAD_ID
  assert stats['truncated'] == 2
  with pytest.raises(ValueError, match='train.seq_len=2'):
    td.encode_text(tok, text, 2)


def test_encode_text_repairs_mojibake(tok):
  row = td.encode_text(tok, 'It cost \u00c2\u00a3600m.', 32)
  assert tok.decode(row) == '[CLS] It cost \u00a3600m. [SEP]'


def test_encode_words_first_pieces(tok):
  words = ['The', 'interpreter', "doesn't", 'stop', '``', 'here', "''", '.']
  ids, starts = td.encode_words(tok, words, 64)
  assert ids[0] == td.CLS_ID and starts[0] == 1
  assert (np.diff(starts) > 0).all()
  assert tok.word_starts(ids[starts]).all()
  ends = list(starts[1:]) + [int(np.flatnonzero(ids == td.SEP_ID)[0])]
  for w, s, e in zip(words, starts, ends):
    assert tok.decode(ids[s:e]) == w
    assert not tok.word_starts(ids[s + 1:e]).any()  # the word's later pieces continue it


def test_encode_words_truncation_drops_whole_words(tok):
  words = ['xylophonically'] * 10
  per_word = len(tok.encode(' xylophonically'))
  assert per_word >= 2  # so the spare piece cannot hold a fourth word
  seq_len = 2 + 3 * per_word + 1  # room for 3 words and one spare piece
  stats = {}
  ids, starts = td.encode_words(tok, words, seq_len, stats=stats, cache={})
  assert (starts[:3] >= 0).all() and (starts[3:] == -1).all()
  assert ids[1 + 3 * per_word] == td.SEP_ID and ids[-1] == td.PAD_ID
  assert stats == {'truncated': 1, 'truncated_words': 7}
  # A word that cleans to nothing still gets a position ([UNK]) so it can carry a tag.
  ids, starts = td.encode_words(tok, ['a', '\u200b', 'b'], 16)
  assert ids[starts[1]] == td.UNK_ID


def test_digest():
  a = np.arange(12, dtype=np.int32).reshape(3, 4)
  assert td.digest(a) == td.digest(a.copy())
  b = a.copy()
  b[2, 3] += 1
  assert td.digest(a) != td.digest(b)
  assert td.digest(a) != td.digest(a.reshape(4, 3))
  assert td.digest(a, a) != td.digest(a)


# ---------------------------------------------------------------------------------------------
# Metrics


def test_confusion_and_per_class_report_by_hand():
  gold = [0, 0, 0, 1, 1, 2]
  pred = [0, 0, 1, 1, 2, 2]
  cm = td.confusion(gold, pred, 4)
  assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
  report = td.per_class_report(gold, pred, ['a', 'b', 'c', 'unused'])
  assert list(report) == ['a', 'b', 'c']  # a class in neither gold nor predictions is left out
  assert report['a'] == pytest.approx({'precision': 1.0, 'recall': 2 / 3, 'f1': 0.8, 'support': 3})
  assert report['b'] == pytest.approx({'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'support': 2})
  assert report['c'] == pytest.approx({'precision': 0.5, 'recall': 1.0, 'f1': 2 / 3, 'support': 1})
  assert td.macro_f1(gold, pred, 4) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
  assert td.accuracy(gold, pred) == pytest.approx(4 / 6)


def test_metric_identities():
  rng = np.random.default_rng(0)
  gold = rng.integers(0, 5, 500)
  assert td.accuracy(gold, gold) == 1.0
  assert td.macro_f1(gold, gold, 5) == 1.0
  # A constant predictor: F1 = 2p / (p + 1) on its class (precision p = its share), 0 elsewhere.
  const = np.full_like(gold, 2)
  p = float(np.mean(gold == 2))
  assert td.macro_f1(gold, const, 5) == pytest.approx(2 * p / (p + 1) / 5)
  assert td.accuracy(gold, const) == pytest.approx(p)
  assert td.confusion(gold, const, 5).sum() == 500
  assert td.accuracy([], []) == 0.0 and td.macro_f1([], [], 3) == 0.0
  # A prediction outside gold's classes counts as a class of its own in macro-F1.
  assert td.macro_f1([0, 0], [0, 1], 2) == pytest.approx((2 / 3 + 0) / 2)


def test_class_table_and_final_split():
  per_class = {'sports': {'precision': 1.0, 'recall': 0.5, 'f1': 2 / 3, 'support': 4}}
  lines = td.class_table(per_class)
  assert 'precision' in lines[0] and lines[1].split() == ['sports', '1.000', '0.500', '0.667', '4']
  assert td.final_split({'test/accuracy': 0.5, 'eval/accuracy': 0.4})[0] == 'test'
  assert td.final_split({'eval/accuracy': 0.4}) == ('val', {'accuracy': 0.4})
  assert td.final_split({'train/loss': 1.0}) is None


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_collect_cuts_padding_and_keeps_order():
  rows = np.arange(1, 22, dtype=np.int32).reshape(7, 3)
  calls = []

  def forward(graphdef, params, batch):
    calls.append(batch.shape)
    return batch.sum(1) * params, batch[:, 0]

  total, first = td.collect(forward, None, 2, rows, 3, np.asarray)
  assert calls == [(3, 3)] * 3
  assert total.tolist() == (rows.sum(1) * 2).tolist() and first.tolist() == rows[:, 0].tolist()


def test_read_examples_embedded_branch(monkeypatch):
  # embedded_examples walks the stdlib in a fresh interpreter; stand in for its rows here.
  fake = [{'id': str(i), 'text': f'doc {i}', 'label': 'x'} for i in range(5)]
  monkeypatch.setattr(td, 'embedded_examples', lambda name: {'demo': fake}[name])
  assert td.read_examples('embedded:demo') == fake
  assert td.read_examples('embedded:demo', max_examples=2) == fake[:2]


def test_read_examples_reads_gzip(tmp_path):
  import gzip
  path = tmp_path / 'd.jsonl.gz'
  with gzip.open(path, 'wt') as f:
    f.write(json.dumps({'id': 'a'}) + '\n')
  assert td.read_examples(str(path)) == [{'id': 'a'}]


# ---------------------------------------------------------------------------------------------
# Embedded tasks (the stdlib walk itself: test_pydocs.py)

@pytest.fixture(scope='module')
def embedded_tasks():
  return {name: td.embedded_examples(name) for name in td.EMBEDDED_TASKS}


def test_pydoc_library_holds_balanced_labelled_docstrings(embedded_tasks):
  import asyncio  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  import unittest  # pylint: disable=g-import-not-at-top
  import xml.etree.ElementTree  # pylint: disable=g-import-not-at-top
  rows = embedded_tasks['pydoc_library']
  assert all(set(r) == {'id', 'text', 'label'} for r in rows)
  counts = collections.Counter(r['label'] for r in rows)
  assert set(counts) == set(td.PYDOC_LIBRARIES)
  assert 100 <= min(counts.values()) and max(counts.values()) <= 400
  ids = [r['id'] for r in rows]
  assert ids == sorted(ids) and len(set(ids)) == len(ids)
  assert len({r['text'] for r in rows}) == len(rows)
  assert min(len(r['text']) for r in rows) >= 40
  # The label is the package the object is defined in, so it is the first part of its id.
  assert all(r['id'].partition('.')[0] == r['label'] for r in rows)
  by_id = {r['id']: r for r in rows}
  for obj, ident in ((logging.Logger.warning, 'logging.Logger.warning'),
                     (asyncio.gather, 'asyncio.tasks.gather'),  # re-exported by asyncio
                     (unittest.TestCase.assertEqual, 'unittest.case.TestCase.assertEqual'),
                     (xml.etree.ElementTree.fromstring, 'xml.etree.ElementTree.XML')):
    assert by_id[ident]['text'] == corpus.clean_document(inspect.cleandoc(obj.__doc__)), ident


def test_pydoc_signature_pairs_docstring_summaries_with_signatures(embedded_tasks):
  rows = embedded_tasks['pydoc_signature']
  assert len(rows) >= 2000
  assert all(set(r) == {'id', 'query', 'document'} for r in rows)
  ids = [r['id'] for r in rows]
  assert ids == sorted(ids) and len(set(ids)) == len(ids)
  assert len({r['query'] for r in rows}) == len({r['document'] for r in rows}) == len(rows)
  assert min(len(r['query']) for r in rows) >= 20
  assert all(re.fullmatch(r'[A-Za-z_][\w.]*\(.+\)', r['document']) for r in rows)
  by_id = {r['id']: r for r in rows}
  assert not any(' at 0x' in r['document'] for r in rows)
  # self and cls go, from methods in classes and from bound methods bound to module names alike.
  assert not any(re.search(r'\.\w+\(self\b', r['document']) for r in rows)
  assert by_id['random.Random.randint']['document'] == 'Random.randint(a, b)'
  assert by_id['multiprocessing.context.BaseContext.Pipe']['document'] == 'BaseContext.Pipe(duplex=True)'
  assert by_id['builtins.dict.fromkeys']['document'] == 'dict.fromkeys(iterable, value=None, /)'
  assert by_id['json.dumps'] == {
      'id': 'json.dumps', 'query': 'Serialize ``obj`` to a JSON formatted ``str``.',
      'document': 'dumps' + str(inspect.signature(json.dumps))}
  summary = ' '.join(inspect.cleandoc(collections.Counter.most_common.__doc__).split('\n\n')[0].split())
  assert by_id['collections.Counter.most_common'] == {
      'id': 'collections.Counter.most_common', 'query': summary,
      'document': 'Counter.most_common(n=None)'}


def test_first_paragraph_skips_a_leading_signature_line():
  assert td._first_paragraph('put(item) -> None\nPut an item\nin the box.\n\nMore.',
                             'put') == 'Put an item in the box.'
  assert td._first_paragraph('put(item)\n\nPut it.', 'put') == 'Put it.'
  assert td._first_paragraph('Take it.\nNow.', 'put') == 'Take it. Now.'


def test_embedded_tasks_are_cached_copies_and_names_are_checked(embedded_tasks):
  start = time.perf_counter()
  rows = td.embedded_examples('pydoc_library')
  assert time.perf_counter() - start < 0.5  # the walk ran once, for the fixture
  assert rows == embedded_tasks['pydoc_library']
  rows[0]['label'] = 'changed'
  assert td.embedded_examples('pydoc_library')[0] == embedded_tasks['pydoc_library'][0]
  with pytest.raises(ValueError, match='embedded:nope.*pydoc_library, pydoc_signature'):
    td.embedded_examples('nope')
  with pytest.raises(ValueError, match='embedded:nope'):
    td.read_examples('embedded:nope')


def test_rows_take_the_special_ids_of_a_wordpiece_tokenizer(tmp_path):
  """Rows use a BERT vocabulary's [CLS] [SEP] [PAD] [UNK] (6, 7, 0, 5 here), not sentencepiece's."""
  vocab = (['[PAD]'] + [f'[unused{i}]' for i in range(4)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
           + ['the', 'list', 'is', 'sorted', '.', '##s'])
  (tmp_path / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
  wp = tokenizer_lib.load_any(tmp_path / 'vocab.txt')
  assert (wp.cls_id, wp.sep_id, wp.pad_id, wp.unk_id) == (6, 7, 0, 5)
  pieces = wp.encode('The lists are sorted.')
  rows = td.encode_texts(wp, ['The lists are sorted.', 'the list'], 12)
  np.testing.assert_array_equal(rows[0], [6, *pieces, 7] + [0] * (10 - len(pieces)))
  np.testing.assert_array_equal(td.encode_text(wp, 'the list', 12), rows[1])
  assert list(rows[1][:4]) == [6, wp.piece_to_id('the'), wp.piece_to_id('list'), 7]
  ids, starts = td.encode_words(wp, ['the', '\u200b', 'lists'], 8)
  np.testing.assert_array_equal(ids, [6, 9, 5, 10, 14, 7, 0, 0])
  np.testing.assert_array_equal(starts, [1, 2, 3])
