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
from mlmjax.tasks import metrics as metrics_lib, task_data as td


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
  cm = metrics_lib.confusion(gold, pred, 4)
  assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
  report = metrics_lib.per_class_report(gold, pred, ['a', 'b', 'c', 'unused'])
  assert list(report) == ['a', 'b', 'c']  # a class in neither gold nor predictions is left out
  assert report['a'] == pytest.approx({'precision': 1.0, 'recall': 2 / 3, 'f1': 0.8, 'support': 3})
  assert report['b'] == pytest.approx({'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'support': 2})
  assert report['c'] == pytest.approx({'precision': 0.5, 'recall': 1.0, 'f1': 2 / 3, 'support': 1})
  assert metrics_lib.macro_f1(gold, pred, 4) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
  assert metrics_lib.accuracy(gold, pred) == pytest.approx(4 / 6)


def test_metric_identities():
  rng = np.random.default_rng(0)
  gold = rng.integers(0, 5, 500)
  assert metrics_lib.accuracy(gold, gold) == 1.0
  assert metrics_lib.macro_f1(gold, gold, 5) == 1.0
  # A constant predictor: F1 = 2p / (p + 1) on its class (precision p = its share), 0 elsewhere.
  const = np.full_like(gold, 2)
  p = float(np.mean(gold == 2))
  assert metrics_lib.macro_f1(gold, const, 5) == pytest.approx(2 * p / (p + 1) / 5)
  assert metrics_lib.accuracy(gold, const) == pytest.approx(p)
  assert metrics_lib.confusion(gold, const, 5).sum() == 500
  assert metrics_lib.accuracy([], []) == 0.0 and metrics_lib.macro_f1([], [], 3) == 0.0
  # A prediction outside gold's classes counts as a class of its own in macro-F1.
  assert metrics_lib.macro_f1([0, 0], [0, 1], 2) == pytest.approx((2 / 3 + 0) / 2)


def test_class_table_and_final_split():
  per_class = {'sports': {'precision': 1.0, 'recall': 0.5, 'f1': 2 / 3, 'support': 4}}
  lines = metrics_lib.class_table(per_class)
  assert 'precision' in lines[0] and lines[1].split() == ['sports', '1.000', '0.500', '0.667', '4']
  assert metrics_lib.final_split({'test/accuracy': 0.5, 'eval/accuracy': 0.4})[0] == 'test'
  assert metrics_lib.final_split({'eval/accuracy': 0.4}) == ('val', {'accuracy': 0.4})
  assert metrics_lib.final_split({'train/loss': 1.0}) is None


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


# ---------------------------------------------------------------------------------------------
# Text pairs: [CLS] a [SEP] b [SEP] with token types


def _bert_truncate(len_a: int, len_b: int, room: int) -> tuple[int, int]:
  """BERT's _truncate_seq_pair, one piece at a time: the longer loses one; ties: b."""
  while len_a + len_b > room:
    if len_a > len_b:
      len_a -= 1
    else:
      len_b -= 1
  return len_a, len_b


def test_pair_lengths_match_the_one_at_a_time_rule():
  for room in range(0, 14):
    for len_a in range(0, 20):
      for len_b in range(0, 20):
        assert td.pair_lengths(len_a, len_b, room) == _bert_truncate(len_a, len_b, room), (
            len_a, len_b, room)


def test_encode_pairs_layout_types_and_truncation(tok):
  a, b = 'The quick brown fox.', 'A lazy dog sleeps in the sun all day long.'
  pa, pb = tok.encode(a), tok.encode(b)
  ids, types = td.encode_pairs(tok, [a], [b], 64)
  expected = [td.CLS_ID, *pa, td.SEP_ID, *pb, td.SEP_ID]
  assert ids.shape == types.shape == (1, 64) and ids.dtype == types.dtype == np.int32
  np.testing.assert_array_equal(ids[0], expected + [td.PAD_ID] * (64 - len(expected)))
  second = len(pa) + 2  # b [SEP] are type 1; [CLS] a [SEP] and the padding are type 0
  np.testing.assert_array_equal(types[0], [0] * second + [1] * (len(pb) + 1)
                                + [0] * (64 - len(expected)))
  short = tok.encode('Yes.')
  assert len(pb) > len(short) + 4 and len(pa) > 6
  for first, pieces_a, room in (('Yes.', short, 2 * len(short) + 4), (a, pa, 12)):
    stats = {}
    ids, types = td.encode_pairs(tok, [first], [b], room + 3, stats=stats)
    keep_a, keep_b = _bert_truncate(len(pieces_a), len(pb), room)
    # 'Yes.' is short: only b is cut; against a both are cut to half the room.
    assert (keep_a, keep_b) == ((len(short), len(short) + 4) if first == 'Yes.' else (6, 6))
    np.testing.assert_array_equal(ids[0], [td.CLS_ID, *pieces_a[:keep_a], td.SEP_ID,
                                           *pb[:keep_b], td.SEP_ID])
    assert stats == {'truncated': 1, 'pieces_dropped': len(pieces_a) + len(pb) - room}
    assert types[0].sum() == keep_b + 1 and types[0][-1] == 1
  with pytest.raises(ValueError, match=r'train\.seq_len=4 is too short'):
    td.encode_pairs(tok, [a], [b], 4)
  with pytest.raises(ValueError, match='2 first texts but 1 second'):
    td.encode_pairs(tok, [a, a], [b], 16)


# ---------------------------------------------------------------------------------------------
# MCC, Pearson, Spearman against scipy and direct float64 formulas


def test_mcc_matches_direct_float64_formulas():
  rng = np.random.default_rng(1)
  gold, pred = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
  pred[:150] = gold[:150]  # correlated
  tp = float(np.sum((gold == 1) & (pred == 1)))
  tn = float(np.sum((gold == 0) & (pred == 0)))
  fp = float(np.sum((gold == 0) & (pred == 1)))
  fn = float(np.sum((gold == 1) & (pred == 0)))
  binary = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  assert metrics_lib.mcc(gold, pred, 2) == pytest.approx(binary, abs=1e-12)
  # Multiclass: the correlation of the one-hot gold and prediction matrices (Gorodkin's R_K).
  gold, pred = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
  pred[:200] = gold[:200]
  x, y = np.eye(4)[gold], np.eye(4)[pred]
  x, y = x - x.mean(0), y - y.mean(0)
  r_k = np.sum(x * y) / math.sqrt(np.sum(x * x) * np.sum(y * y))
  assert metrics_lib.mcc(gold, pred, 4) == pytest.approx(r_k, abs=1e-12)
  assert metrics_lib.mcc(gold, gold, 4) == pytest.approx(1.0)
  assert metrics_lib.mcc([0, 1, 0, 1], [1, 0, 1, 0], 2) == pytest.approx(-1.0)
  assert metrics_lib.mcc(gold, np.zeros_like(gold), 4) == 0.0  # constant predictions: undefined, 0
  assert metrics_lib.mcc([], [], 2) == 0.0


def test_mcc_and_f1_match_sklearn():
  from sklearn import metrics  # pylint: disable=g-import-not-at-top  (the test extra has it)
  rng = np.random.default_rng(2)
  for n in (2, 3, 5):
    gold, pred = rng.integers(0, n, 250), rng.integers(0, n, 250)
    pred[:100] = gold[:100]
    assert metrics_lib.mcc(gold, pred, n) == pytest.approx(metrics.matthews_corrcoef(gold, pred), abs=1e-12)
    assert metrics_lib.macro_f1(gold, pred, n) == pytest.approx(
        metrics.f1_score(gold, pred, average='macro'), abs=1e-12)
    for k in range(n):
      assert metrics_lib.class_f1(gold, pred, n, k) == pytest.approx(
          metrics.f1_score(gold, pred, labels=[k], average='macro'), abs=1e-12)


def test_class_f1_is_the_binary_f1_of_the_positive_class():
  gold, pred = [1, 1, 1, 0, 0, 0, 1], [1, 0, 1, 1, 0, 0, 0]
  # Positive 1: tp 2, fp 1, fn 2 -> precision 2/3, recall 1/2, F1 4/7.
  assert metrics_lib.class_f1(gold, pred, 2, 1) == pytest.approx(4 / 7)
  assert metrics_lib.class_f1(gold, pred, 2, 0) == pytest.approx(metrics_lib.per_class_report(
      gold, pred, ['n', 'p'])['n']['f1'])


def test_pearson_and_spearman_match_scipy():
  import scipy.stats
  rng = np.random.default_rng(3)
  x = rng.normal(size=500)
  y = 0.6 * x + rng.normal(size=500)
  ties_x, ties_y = np.round(x * 2) / 2, np.round(y)  # many ties: average ranks
  for a, b in ((x, y), (ties_x, ties_y), (x.astype(np.float32), y)):
    assert metrics_lib.pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b)[0], abs=1e-10)
    assert metrics_lib.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-10)
  np.testing.assert_allclose(metrics_lib.average_ranks(ties_y), scipy.stats.rankdata(ties_y))
  assert metrics_lib.pearson(x, np.ones_like(x)) == 0.0 and metrics_lib.spearman(np.ones(3), [1, 2, 3]) == 0.0
  assert metrics_lib.pearson([1.0], [2.0]) == 0.0
  assert metrics_lib.pearson(x, 2 * x + 1) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Paraphrase pairs (pairs:FILE)


def _verses(path, verses):
  path.write_text(''.join(json.dumps({'ref': r, 'a': a, 'b': b}) + '\n' for r, a, b in verses))
  return str(path)


def test_paraphrase_pairs_pick_the_most_overlapping_verse_of_the_chapter(tmp_path):
  path = _verses(tmp_path / 'v.jsonl', [
      ('Gen 1:1', 'in the beginning god made heaven', 'in the beginning god created heaven'),
      ('Gen 1:2', 'the earth was void', 'the earth was empty'),
      ('Gen 1:3', 'god said let there be light', 'god said in the beginning let there be light'),
      ('Gen 1:4', 'god saw the light', 'the earth was empty'),  # b repeats 1:2's b verbatim
      ('Ex 1:1', 'these are the names of god', 'these are the names'),  # the beginning god
      ('Ps 117:1', 'praise the lord', 'praise yahweh'),
  ])
  rows = td.read_examples('pairs:' + path)
  assert [r['id'] for r in rows[:2]] == ['Gen 1:1/paraphrase', 'Gen 1:1/mismatch']
  by_id = {r['id']: r for r in rows}
  # Gen 1:1's a shares most words with Gen 1:3's b; Exodus is another chapter.
  assert by_id['Gen 1:1/mismatch']['ref_b'] == 'Gen 1:3'
  assert by_id['Gen 1:1/mismatch']['b'] == 'god said in the beginning let there be light'
  # Gen 1:2's b equals Gen 1:4's: that verse is never its mismatch (nor the reverse).
  assert by_id['Gen 1:2/mismatch']['ref_b'] not in ('Gen 1:2', 'Gen 1:4')
  assert by_id['Gen 1:4/mismatch']['ref_b'] not in ('Gen 1:2', 'Gen 1:4')
  # A chapter of one verse has no mismatch.
  assert 'Ex 1:1/mismatch' not in by_id and 'Ps 117:1/mismatch' not in by_id
  for r in rows:
    assert r['chapter'] == r['ref'].rpartition(':')[0] == r['ref_b'].rpartition(':')[0]
    assert r['label'] == ('paraphrase' if r['ref'] == r['ref_b'] else 'mismatch')
  assert td.read_examples('pairs:' + path) == rows  # a pure function of the file
  assert td.read_examples('pairs:' + path, max_examples=3) == rows[:3]
  with pytest.raises(FileNotFoundError, match=r'task_data\.path=pairs:.*nope'):
    td.read_examples('pairs:' + str(tmp_path / 'nope.jsonl'))
  bad = _verses(tmp_path / 'bad.jsonl', [('Gen 1:1', 'a', 'b')])
  (tmp_path / 'bad.jsonl').write_text('{"ref": "Gen 1:1", "a": "x"}\n')
  with pytest.raises(ValueError, match=r"task_data\.path: 'b' is missing in row 1 of pairs:"):
    td.read_examples('pairs:' + bad)


def test_bible_pairs_are_balanced_and_split_by_chapter(shared_data):
  path = 'pairs:' + str(shared_data / 'tasks' / 'bible_kjv_web_verses.jsonl')
  rows = td.read_examples(path)
  labels = collections.Counter(r['label'] for r in rows)
  assert labels['paraphrase'] == 31095 and labels['mismatch'] >= 31000
  splits = td.split_rows(rows, path, _cfg(group_field='chapter'))
  where: dict[str, set] = collections.defaultdict(set)
  for r, s in zip(rows, splits):
    where[r['ref']].add(s)
    where[r['ref_b']].add(s)
  assert all(len(s) == 1 for s in where.values())  # no verse's text in two splits
  counts = td.split_counts(splits)
  for s in ('val', 'test'):
    assert _within_binomial(counts[s], len(rows), 0.1, sds=12), counts  # ~1,189 chapters
  for s in td.SPLITS:
    in_split = [r['label'] for r, x in zip(rows, splits) if x == s]
    assert abs(in_split.count('paraphrase') / len(in_split) - 0.5) < 0.01


# ---------------------------------------------------------------------------------------------
# TFDS examples (tfds:NAME), on a GLUE-like pair dataset built locally


def test_split_rows_puts_the_tfds_reported_split_in_test():
  rows = ([{'idx': str(i), td.SOURCE_SPLIT: 'train'} for i in range(400)]
          + [{'idx': str(i), td.SOURCE_SPLIT: 'test'} for i in range(50)])
  splits = td.split_rows(rows, 'tfds:x', _cfg(id_field='idx', val_fraction=0.2, test_fraction=0.3))
  assert splits[400:] == ['test'] * 50 and 'test' not in splits[:400]
  assert splits[:400] == [td.split_of(f'id:{i}', 0.2, 0.0) for i in range(400)]
  assert _within_binomial(splits[:400].count('val'), 400, 0.2)


@pytest.fixture(scope='module')
def glue_like_tfds(tmp_path_factory):
  """Returns the data_dir of 'mlmjax_glue_like_pairs': train 40, validation 12, unlabelled test 6."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class MlmjaxGlueLikePairs(tfds.core.GeneratorBasedBuilder):
    """Sentence pairs with a ClassLabel, a float score and an idx, as GLUE's MRPC and STS-B."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'sentence1': tfds.features.Text(), 'sentence2': tfds.features.Text(),
          'label': tfds.features.ClassLabel(names=['not_equivalent', 'equivalent']),
          'score': np.float32, 'idx': np.int32}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples('train', 40),
              'validation': self._generate_examples('validation', 12),
              'test': self._generate_examples('test', 6)}

    def _generate_examples(self, split, n):
      for i in range(n):
        yield i, {'sentence1': f'{split} first sentence {i}',
                  'sentence2': f'{split} second sentence {i}',
                  'label': -1 if split == 'test' else i % 2, 'score': i / 8, 'idx': i}

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  MlmjaxGlueLikePairs(data_dir=data_dir).download_and_prepare()
  return data_dir


def test_tfds_examples_of_a_glue_like_dataset(glue_like_tfds):
  fields = ('sentence1', 'sentence2', 'label', 'score', 'idx', 'id', '')
  rows = td.read_examples('tfds:mlmjax_glue_like_pairs', fields=fields,
                          tfds_data_dir=glue_like_tfds)
  assert len(rows) == 52 and [r[td.SOURCE_SPLIT] for r in rows] == ['train'] * 40 + ['test'] * 12
  for r in rows:  # one pass per feature: the columns line up
    split = 'train' if r[td.SOURCE_SPLIT] == 'train' else 'validation'
    i = int(r['idx'])
    assert set(r) == {'sentence1', 'sentence2', 'label', 'score', 'idx', td.SOURCE_SPLIT}
    assert (r['sentence1'], r['sentence2']) == (f'{split} first sentence {i}',
                                                f'{split} second sentence {i}')
    assert r['label'] == ('equivalent' if i % 2 else 'not_equivalent')  # ClassLabel names
    assert float(r['score']) == np.float32(i / 8)
  first = td.read_examples('tfds:mlmjax_glue_like_pairs', fields=('idx',), max_examples=3,
                           tfds_data_dir=glue_like_tfds)
  assert first == [{'idx': r['idx'], td.SOURCE_SPLIT: r[td.SOURCE_SPLIT]}
                   for r in rows[:3] + rows[40:43]]  # each split's first 3, in TFDS's order
  hidden = td.read_examples('tfds:mlmjax_glue_like_pairs', fields=('label',),
                            tfds_data_dir=glue_like_tfds, tfds_test_split='test')
  assert {r['label'] for r in hidden if r[td.SOURCE_SPLIT] == 'test'} == {'-1'}
  config = ml_collections.ConfigDict({
      'task_data': dict(path='tfds:mlmjax_glue_like_pairs', max_examples=0,
                        tfds_test_split='validation'),
      'data': dict(tfds_data_dir=glue_like_tfds, tfds_download=False)})
  assert td.load_examples(config, ('idx',)) == [
      {'idx': r['idx'], td.SOURCE_SPLIT: r[td.SOURCE_SPLIT]} for r in rows]


def test_tfds_errors_name_the_config_keys(glue_like_tfds):
  name = 'tfds:mlmjax_glue_like_pairs'
  with pytest.raises(ValueError, match=r"none of the configured fields \['text'\] is a feature "
                                       r'\(features: idx, label, score, sentence1, sentence2\)'):
    td.read_examples(name, fields=('text',), tfds_data_dir=glue_like_tfds)
  with pytest.raises(ValueError, match=r"task_data\.tfds_test_split='dev' is not a split"):
    td.read_examples(name, fields=('idx',), tfds_data_dir=glue_like_tfds, tfds_test_split='dev')
  with pytest.raises(ValueError, match='TFDS knows no dataset'):
    td.read_examples('tfds:mlmjax_no_such_dataset', tfds_data_dir=glue_like_tfds)


def test_tfds_glue_offline_fails_fast_naming_the_data_dir(tmp_path):
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
  start = time.monotonic()  # TFDS's own retries take minutes; the import is not the point
  with pytest.raises(FileNotFoundError) as e:
    td.read_examples('tfds:glue/mrpc', fields=('sentence1', 'sentence2', 'label', 'idx'),
                     tfds_data_dir=str(tmp_path))
  assert time.monotonic() - start < 10
  message = str(e.value)
  assert '\n' not in message and message.startswith('task_data.path=tfds:glue/mrpc: ')
  assert 'data.tfds_data_dir' in message and str(tmp_path) in message


def test_classify_and_regress_read_glue_like_tfds_splits(glue_like_tfds, tok):
  from configs import finetune  # pylint: disable=g-import-not-at-top
  from mlmjax.tasks import classify, regress  # pylint: disable=g-import-not-at-top
  for preset, cls, label in (('glue_mrpc', classify.ClassifyTask, 'label'),
                             ('glue_stsb', regress.RegressTask, 'score')):
    c = finetune.get_config(preset)
    c.task_data.path, c.task_data.label_field = 'tfds:mlmjax_glue_like_pairs', label
    c.data.tfds_data_dir, c.train.seq_len = glue_like_tfds, 24
    task = cls(c, tok, lambda s: None)
    data = task.prepare(None)
    counts = data.stats['split_examples']
    # TFDS's validation split is the test split; val is cut from TFDS's train by hash of idx.
    assert counts['test'] == 12 and counts['train'] + counts['val'] == 40
    assert counts['val'] == sum(td.split_of(f'id:{i}', 0.1, 0.0) == 'val' for i in range(40))
    assert data.train.shape[1] == 2 * 24 + 1
    if cls is classify.ClassifyTask:
      assert task.labels == ['equivalent', 'not_equivalent'] and task.positive_id() == 0
    else:
      assert sorted(data.test[:, -1].view(np.float32).tolist()) == [i / 8 for i in range(12)]
