"""Tests for mlmjax/tasks/classify.py: prepare, loss, evaluation, baselines, on tiny real models."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import finetune
from mlmjax.tasks import classify
from mlmjax.tasks import metrics as metrics_lib, task_data as td

SEQ_LEN = 24
WORDS = {'colors': 'red green blue yellow purple orange black white'.split(),
         'numbers': 'one two three four five six seven eight'.split(),
         'python': 'class function module import lambda return yield object'.split()}


@pytest.fixture(scope='module')
def tok(topics_tokenizer):
  """Returns the session's 1,000-piece tokenizer of the pydoc topics."""
  return topics_tokenizer


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
  """Returns a JSON Lines file of 120 short texts in 3 classes, with ids and titles."""
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp('data') / 'topics.jsonl'
  with open(path, 'w') as f:
    for i in range(120):
      label = sorted(WORDS)[i % 3]
      words = rng.choice(WORDS[label], size=int(rng.integers(3, 20)))
      f.write(json.dumps({'id': f'ex{i}', 'label': label, 'title': f'Item {i}',
                          'text': ' '.join(words)}) + '\n')
  return path


def make_config(path, **task_data):
  c = finetune.get_config('tiny')
  c.task_data.path = str(path)
  c.task_data.title_field = 'title'
  c.task_data.val_fraction = 0.2
  c.task_data.test_fraction = 0.2
  for k, v in task_data.items():
    c.task_data[k] = v
  c.train.seq_len = SEQ_LEN
  c.eval.batch_size = 8
  return c


@pytest.fixture(scope='module')
def prepared(tok, data_path):
  task = classify.ClassifyTask(make_config(data_path), tok, lambda s: None)
  return task, task.prepare(None)


@pytest.fixture(scope='module')
def net(prepared, tok, tiny_task_model):
  """Returns (graphdef, params, logits_fn) of a tiny random classifier; logits_fn is jitted."""
  graphdef, params = tiny_task_model(prepared[0], tok.vocab_size, SEQ_LEN, seed=3)
  logits_fn = jax.jit(lambda p, tokens: nnx.merge(graphdef, p)(tokens))
  return graphdef, params, logits_fn


def _np_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  return lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]


def test_prepare_layout_and_splits(prepared, tok, data_path):
  task, data = prepared
  assert data.stats['labels'] == sorted(WORDS) == task.labels
  assert data.train.shape[1] == SEQ_LEN + 1 and data.train.dtype == np.int32
  counts = data.stats['split_examples']
  assert sum(counts.values()) == 120 == data.stats['examples']
  assert counts == {s: len(getattr(data, s)) for s in td.SPLITS}
  for s in td.SPLITS:
    # Each split's rows are exactly the examples whose id hashes into it.
    assert counts[s] == sum(td.split_of(f'id:ex{i}', 0.2, 0.2) == s for i in range(120))
  rows = np.concatenate([data.train, data.val, data.test])
  assert (rows[:, 0] == td.CLS_ID).all() and set(rows[:, -1]) == {0, 1, 2}
  # The title comes first; each row's words all come from its label's word list.
  for row in rows[:20]:
    text = tok.decode(row[:SEQ_LEN])
    assert text.startswith('[CLS] Item ') and text.endswith('[SEP]')
    words = text.split('. ', 1)[1].removesuffix(' [SEP]').split()
    if row[SEQ_LEN - 1] != td.PAD_ID:  # cut to fit: the last word may be a part of a word
      words = words[:-1]
    assert set(words) <= set(WORDS[task.labels[row[-1]]]), text
  again = classify.ClassifyTask(make_config(data_path), tok, lambda s: None).prepare(None)
  assert again.key == data.key and (again.train == data.train).all()
  json.dumps(data.stats)  # summary.json must be able to hold it


def test_prepare_errors(tok, tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_text('{"id": 1, "text": "a", "label": "x"}\n{"id": 2, "text": "b"}\n')
  with pytest.raises(ValueError, match=r"task_data\.label_field: 'label' is missing in row 2 of "):
    classify.ClassifyTask(make_config(path, title_field=''), tok, print).prepare(None)
  path.write_text('{"id": 1, "text": "a", "label": "x"}\n{"id": 2, "text": "b", "label": "x"}\n')
  with pytest.raises(ValueError, match='has 1 distinct value'):
    classify.ClassifyTask(make_config(path, title_field=''), tok, print).prepare(None)


@pytest.mark.slow
def test_batch_loss_matches_numpy_and_ignores_padding_rows(prepared, net):
  task, data = prepared
  graphdef, params, logits_fn = net
  rows = jnp.asarray(data.train[:6])
  padded = jnp.concatenate([rows, jnp.zeros((3, SEQ_LEN + 1), jnp.int32)])

  @jax.jit
  def losses(params, key):
    m = nnx.merge(graphdef, params)  # the way train.py's jitted step calls batch_loss
    return (task.batch_loss(m, rows, key, None, jnp.int32(0)),
            task.batch_loss(m, padded, key, None, jnp.int32(0)),
            task.batch_loss(m, rows, key, key, jnp.int32(0)))

  (loss_sum, weight, sums), (loss2, weight2, _), (dropped, w3, _) = losses(params, jax.random.key(1))
  logits = np.asarray(logits_fn(params, rows[:, :SEQ_LEN]))
  labels = data.train[:6, -1]
  assert float(weight) == 6 == float(sums['weight'])
  np.testing.assert_allclose(float(loss_sum), _np_cross_entropy(logits, labels).sum(), rtol=1e-5)
  assert float(sums['correct']) == float((logits.argmax(-1) == labels).sum())
  # All-zero padding rows add nothing.
  assert float(weight2) == 6
  np.testing.assert_allclose(float(loss2), float(loss_sum), rtol=1e-5)
  # Dropout (drop_key given) changes the loss but not the weight.
  assert float(w3) == 6 and math.isfinite(float(dropped)) and float(dropped) != float(loss_sum)
  record = task.window_record({k: float(v) for k, v in sums.items()})
  assert record['train/loss'] == pytest.approx(float(loss_sum) / 6)
  assert record['train/accuracy'] == pytest.approx(float(sums['correct']) / 6)
  assert task.progress_text(record).startswith('loss ')


def test_evaluate_is_consistent_with_the_forward_pass(prepared, net):
  task, data = prepared
  graphdef, params, logits_fn = net
  assert len(data.val) > 8
  # A batch size that does not divide the split, so the last batch carries padding rows.
  task.config.eval.batch_size = next(b for b in (7, 8, 9, 11) if len(data.val) % b)
  metrics = task.evaluate(graphdef, params, 'val', jnp.asarray)
  logits = np.asarray(logits_fn(params, jnp.asarray(data.val[:, :SEQ_LEN])))
  gold, pred = data.val[:, -1], logits.argmax(-1)
  assert metrics['examples'] == len(data.val)
  assert metrics['accuracy'] == pytest.approx(float(np.mean(pred == gold)))
  assert metrics['loss'] == pytest.approx(_np_cross_entropy(logits, gold).mean(), rel=1e-5)
  assert metrics['macro_f1'] == pytest.approx(metrics_lib.macro_f1(gold, pred, 3))
  assert sum(v['support'] for v in metrics['per_class'].values()) == len(data.val)
  task.evaluate(graphdef, params, 'val', jnp.asarray)
  assert task._forward._cache_size() == 1  # one compiled forward, reused
  assert 'macro-F1' in task.eval_text(metrics)


def test_baselines_on_a_constructed_split(tok, data_path):
  task = classify.ClassifyTask(make_config(data_path), tok, print)
  task.labels = ['a', 'b', 'c']

  def rows(labels):
    r = np.zeros((len(labels), SEQ_LEN + 1), np.int32)
    r[:, 0], r[:, -1] = td.CLS_ID, labels
    return r

  task.splits = {'train': rows([0, 0, 1, 2, 0, 1]), 'val': rows([]), 'test': rows([0, 1, 1, 2])}
  b = task.baselines()
  # Majority class 'a': right on 1 of 4; F1('a') = 2 * 0.25 * 1 / 1.25 = 0.4 over 3 classes.
  assert b == pytest.approx({'majority_accuracy': 0.25, 'majority_macro_f1': 0.4 / 3})
  assert classify.majority_label(np.array([2, 1, 1, 2]), 3) == 1  # ties go to the lowest id


def test_final_text():
  task = classify.ClassifyTask(finetune.get_config('tiny'), None, print)
  assert task.final_text({'train/loss': 1.0}) is None
  per_class = {'business': {'precision': 0.9, 'recall': 0.8, 'f1': 0.847, 'support': 50}}
  text = task.final_text({'test/accuracy': 0.9, 'test/macro_f1': 0.85, 'test/per_class': per_class,
                          'baseline/majority_accuracy': 0.22, 'baseline/majority_macro_f1': 0.07})
  assert text.splitlines()[0].startswith('test split: accuracy 0.9000 | macro-F1 0.8500')
  assert 'majority class: accuracy 0.2200' in text and 'business' in text.splitlines()[-1]


def test_bbc_news(shared_data, tok):
  path = shared_data / 'tasks' / 'bbc_news_topic5.jsonl'
  c = finetune.get_config('bbc')
  c.task_data.path = str(path)
  c.train.seq_len = 48
  task = classify.ClassifyTask(c, tok, print)
  data = task.prepare(None)
  stats = data.stats
  assert stats['examples'] == 2225
  assert stats['labels'] == ['business', 'entertainment', 'politics', 'sports', 'tech']
  totals = {n: sum(stats['label_counts'][s][n] for s in td.SPLITS) for n in stats['labels']}
  assert totals == {'business': 510, 'entertainment': 386, 'politics': 417, 'sports': 511,
                    'tech': 401}  # the counts in ../shared/data/README.md
  for s, p in (('val', 0.1), ('test', 0.1)):
    n = stats['split_examples'][s]
    assert abs(n - 2225 * p) <= 4 * math.sqrt(2225 * p * (1 - p)), stats['split_examples']
  texts = [tok.decode(r[:-1]) for r in np.concatenate([data.train, data.val, data.test])]
  assert any('\u00a3' in t for t in texts) and not any('\u00c2' in t for t in texts)
  b = task.baselines()
  majority = np.bincount(data.train[:, -1]).argmax()
  assert b['majority_accuracy'] == pytest.approx(float(np.mean(data.test[:, -1] == majority)))


# ---------------------------------------------------------------------------------------------
# Sentence pairs: [CLS] a [SEP] b [SEP], token types, MCC, the positive label's F1


@pytest.fixture(scope='module')
def pair_path(tmp_path_factory):
  """Returns a JSON Lines file of 90 pairs: 'same' when b holds a's words, else 'different'."""
  rng = np.random.default_rng(1)
  path = tmp_path_factory.mktemp('pairs') / 'pairs.jsonl'
  words = sorted(w for ws in WORDS.values() for w in ws)
  with open(path, 'w') as f:
    for i in range(90):
      a = list(rng.choice(words, size=int(rng.integers(2, 12))))
      b = list(rng.permutation(a)) if i % 2 else list(rng.choice(words, size=len(a)))
      f.write(json.dumps({'id': f'p{i}', 'a': ' '.join(a), 'b': ' '.join(b),
                          'label': 'same' if i % 2 else 'different'}) + '\n')
  return path


def pair_config(path, **classify):
  c = make_config(path, title_field='', text_field='a', text_b_field='b')
  for k, v in classify.items():
    c.classify[k] = v
  return c


@pytest.fixture(scope='module')
def pair_prepared(tok, pair_path):
  task = classify.ClassifyTask(pair_config(pair_path, positive_label='same'), tok, lambda s: None)
  return task, task.prepare(None)


@pytest.fixture(scope='module')
def pair_net(pair_prepared, tok, tiny_task_model):
  return tiny_task_model(pair_prepared[0], tok.vocab_size, SEQ_LEN, seed=5)


def test_pair_rows_hold_tokens_then_type_ids_then_the_label(pair_prepared, tok, pair_path):
  task, data = pair_prepared
  assert task.pair and task.row_width() == 2 * SEQ_LEN + 1 == data.train.shape[1]
  assert data.stats['pair'] and data.stats['labels'] == ['different', 'same'] == task.labels
  examples = {r['id']: r for r in td.read_examples(str(pair_path))}
  rows = np.concatenate([data.train, data.val, data.test])
  for row in rows:
    tokens, types = row[:SEQ_LEN], row[SEQ_LEN:2 * SEQ_LEN]
    seps = np.flatnonzero(tokens == td.SEP_ID)
    assert tokens[0] == td.CLS_ID and len(seps) == 2
    pos = np.arange(SEQ_LEN)
    np.testing.assert_array_equal(types, (pos > seps[0]) & (pos <= seps[1]))
  # Each pair's columns are encode_pairs' own.
  ids, types = td.encode_pairs(tok, [examples['p3']['a']], [examples['p3']['b']], SEQ_LEN)
  assert any((r[:SEQ_LEN] == ids[0]).all() and (r[SEQ_LEN:-1] == types[0]).all() and r[-1] == 1
             for r in rows)
  tokens, labels, valid = classify.split_row_parts(jnp.asarray(rows), td.PAD_ID, pair=True)
  assert tokens.shape == (len(rows), SEQ_LEN) and (np.asarray(labels) == rows[:, -1]).all()
  assert bool(valid.all())
  np.testing.assert_array_equal(classify.row_type_ids(rows), rows[:, SEQ_LEN:-1])
  # The same file read as one text per row keeps today's layout: [CLS] a [SEP] and the label.
  single = classify.ClassifyTask(make_config(pair_path, title_field='', text_field='a'), tok,
                                 lambda s: None)
  one = single.prepare(None)
  assert single.row_width() == SEQ_LEN + 1 == one.train.shape[1]
  assert single.type_ids(one.train) is None
  np.testing.assert_array_equal(one.train[:, :-1], td.encode_texts(
      tok, [examples[f'p{i}']['a'] for i in range(90)
            if td.split_of(f'id:p{i}', 0.2, 0.2) == 'train'], SEQ_LEN))
  assert single.unlabeled_texts(examples['p3'], 1, 'x') == [examples['p3']['a']]
  assert task.unlabeled_texts(examples['p3'], 1, 'x') == [examples['p3']['a'], examples['p3']['b']]


def test_flipped_token_types_change_the_encoder_output(pair_prepared, pair_net):
  task, data = pair_prepared
  graphdef, params = pair_net
  rows = data.train[:8].copy()
  flipped = rows.copy()
  real = rows[:, :SEQ_LEN] != td.PAD_ID
  flipped[:, SEQ_LEN:2 * SEQ_LEN] = np.where(real, 1 - rows[:, SEQ_LEN:2 * SEQ_LEN], 0)
  # Through the task's own forward (the one batch_loss and evaluate use): the loss changes.
  nll = task._forward_fn()(graphdef, params, jnp.asarray(rows))[3]
  nll_flipped = task._forward_fn()(graphdef, params, jnp.asarray(flipped))[3]
  assert np.abs(np.asarray(nll) - np.asarray(nll_flipped)).min() > 1e-6

  @jax.jit
  def outputs(p, tokens, types, flipped_types):
    m = nnx.merge(graphdef, p)
    return (m.encoder(tokens, type_ids=types), m.encoder(tokens, type_ids=flipped_types),
            m(tokens, type_ids=types), m(tokens), m(tokens, type_ids=jnp.zeros_like(types)))

  hidden, hidden_flipped, logits, no_types, zeros = outputs(
      params, rows[:, :SEQ_LEN], rows[:, SEQ_LEN:-1], flipped[:, SEQ_LEN:-1])
  assert float(jnp.abs(hidden - hidden_flipped)[real].min()) > 1e-4  # every real position moves
  # The classifier reads them too: all-zero types (one text's) give other logits.
  assert float(jnp.abs(logits - no_types).max()) > 1e-5
  np.testing.assert_allclose(no_types, zeros, atol=1e-6)


def test_pair_evaluate_reports_mcc_and_the_positive_labels_f1(pair_prepared, pair_net):
  task, data = pair_prepared
  graphdef, params = pair_net
  metrics = task.evaluate(graphdef, params, 'val', jnp.asarray)
  pred = np.asarray(task._forward_fn()(graphdef, params, jnp.asarray(data.val))[0])
  gold = data.val[:, -1]
  assert metrics['examples'] == len(gold)
  assert metrics['accuracy'] == pytest.approx(metrics_lib.accuracy(gold, pred))
  assert metrics['mcc'] == pytest.approx(metrics_lib.mcc(gold, pred, 2))
  assert metrics['f1'] == pytest.approx(metrics['per_class'].get('same', {'f1': 0.0})['f1'])
  assert 'MCC' in task.eval_text(metrics) and 'F1' in task.eval_text(metrics)
  record = {f'test/{k}': v for k, v in metrics.items()}
  assert '| MCC ' in task.final_text(record) and '| F1 ' in task.final_text(record)
  assert set(task.baselines()) == {'majority_accuracy', 'majority_macro_f1', 'majority_f1'}
  no_positive = classify.ClassifyTask(pair_config('x.jsonl'), None, print)
  no_positive.labels = task.labels
  assert 'f1' not in no_positive.label_metrics(gold, pred) and 'mcc' in no_positive.label_metrics(
      gold, pred)


def test_pair_predict_takes_tab_strings_and_tuples(pair_prepared, pair_net):
  task, _ = pair_prepared
  graphdef, params = pair_net
  both = task.predict(graphdef, params, 'classify', ['red blue\tblue red', ('one two', 'six')],
                      top_k=2)
  again = task.predict(graphdef, params, 'classify', [('red blue', 'blue red'), 'one two\tsix'],
                       top_k=2)
  assert both == again and [len(r) for r in both] == [2, 2]
  assert {label for label, _ in both[0]} == {'different', 'same'}
  assert sum(p for _, p in both[0]) == pytest.approx(1.0, abs=1e-5)
  with pytest.raises(ValueError, match='reads text pairs'):
    task.predict(graphdef, params, 'classify', ['no tab here'])


def test_positive_label_must_be_a_label(tok, pair_path):
  task = classify.ClassifyTask(pair_config(pair_path, positive_label='yes'), tok, lambda s: None)
  with pytest.raises(ValueError, match=r"classify\.positive_label: 'yes' is not a label; the "
                                       r"labels are \['different', 'same'\]"):
    task.prepare(None)


def test_bible_pairs_preset(shared_data, tok, tmp_path):
  # The first 1,500 verses (Genesis 1-50, Exodus 1-...) keep the test fast; the whole file's
  # pairs are checked in test_task_data.py.
  with open(shared_data / 'tasks' / 'bible_kjv_web_verses.jsonl', encoding='utf-8') as f:
    head = [next(f) for _ in range(1500)]
  (tmp_path / 'verses.jsonl').write_text(''.join(head), encoding='utf-8')
  c = finetune.get_config('bible_pairs')
  assert c.task_data.path.startswith('pairs:') and c.task_data.path.endswith(
      '/bible_kjv_web_verses.jsonl')
  c.task_data.path = 'pairs:' + str(tmp_path / 'verses.jsonl')
  c.train.seq_len = 48
  task = classify.ClassifyTask(c, tok, lambda s: None)
  data = task.prepare(None)
  assert data.train.shape[1] == 2 * 48 + 1 and task.labels == ['mismatch', 'paraphrase']
  assert data.stats['fields']['split_key'] == 'chapter' and data.stats['examples'] == 3000
  counts = {s: sum(data.stats['label_counts'][s].values()) for s in td.SPLITS}
  assert counts == data.stats['split_examples'] and counts['val'] and counts['test']
  for s in td.SPLITS:  # both halves of every verse land in its chapter's split
    assert data.stats['label_counts'][s]['paraphrase'] == data.stats['label_counts'][s]['mismatch']
  assert task.positive_id() == 1
