"""Tests for mlmjax/tasks/regress.py: label columns, prepare, loss, metrics against scipy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from configs import finetune
from mlmjax import tasks
from mlmjax.tasks import regress
from mlmjax.tasks import task_data as td

SEQ_LEN = 24
WORDS = 'red green blue yellow one two three four class function module import'.split()


@pytest.fixture(scope='module')
def tok(topics_tokenizer):
  """Returns the session's 1,000-piece tokenizer of the pydoc topics."""
  return topics_tokenizer


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
  """Returns a JSON Lines file of 80 pairs scored 0-5 by the share of b's words found in a."""
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp('sts') / 'sts.jsonl'
  with open(path, 'w') as f:
    for i in range(80):
      a = list(rng.choice(WORDS, size=6))
      b = a[:i % 7] + list(rng.choice(WORDS, size=6 - i % 7))
      score = 5.0 * sum(w in a for w in b) / len(b)
      # Labels as TFDS's float32 features arrive (strings) and as JSON numbers.
      f.write(json.dumps({'id': f's{i}', 'sentence1': ' '.join(a), 'sentence2': ' '.join(b),
                          'label': str(np.float32(score)) if i % 2 else score}) + '\n')
  return path


def make_config(path, **task_data):
  c = finetune.get_config('glue_stsb')
  c.task_data.path = str(path)
  c.task_data.id_field = 'id'
  c.task_data.val_fraction = 0.2
  c.task_data.test_fraction = 0.2
  for k, v in task_data.items():
    c.task_data[k] = v
  c.train.seq_len = SEQ_LEN
  c.eval.batch_size = 8
  return c


@pytest.fixture(scope='module')
def prepared(tok, data_path):
  task = regress.RegressTask(make_config(data_path), tok, lambda s: None)
  return task, task.prepare(None)


@pytest.fixture(scope='module')
def net(prepared, tok, tiny_task_model):
  """Returns (graphdef, params) of a tiny random regressor."""
  return tiny_task_model(prepared[0], tok.vocab_size, SEQ_LEN)


def test_label_column_round_trips_floats_exactly():
  labels = np.array([0.0, 3.8, -1.25, 5.0, 1e-7, np.float32(2.2)], np.float64)
  column = regress.labels_to_column(labels)
  assert column.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(regress.column_to_labels(jnp.asarray(column))),
                                labels.astype(np.float32))
  assert regress.column_to_labels(jnp.zeros(2, jnp.int32)).tolist() == [0.0, 0.0]  # padding rows


def test_registered_and_presets():
  assert 'regress' in tasks.names()
  task = tasks.create(finetune.get_config('glue_stsb'), None, print)
  assert isinstance(task, regress.RegressTask) and task.pair
  assert task.row_width() == 2 * 128 + 1
  assert (task.best_metric, task.best_mode) == ('pearson', 'max')
  assert finetune.METRICS['glue_stsb'] == ('test/pearson', 'test/spearman')
  for suite, presets in finetune.SUITES.items():
    assert set(presets) <= set(finetune._PRESETS), suite
  assert set(finetune.METRICS) == set(finetune._PRESETS)


def test_prepare_rows_and_stats(prepared, data_path, tok):
  task, data = prepared
  examples = td.read_examples(str(data_path))
  labels = np.array([float(r['label']) for r in examples])
  assert data.train.shape[1] == 2 * SEQ_LEN + 1 and data.train.dtype == np.int32
  assert sum(data.stats['split_examples'].values()) == 80 and data.stats['pair']
  rows = np.concatenate([data.train, data.val, data.test])
  got = np.sort(rows[:, -1].view(np.float32))
  np.testing.assert_array_equal(got, np.sort(labels.astype(np.float32)))
  ids, types = td.encode_pairs(tok, [examples[0]['sentence1']], [examples[0]['sentence2']],
                               SEQ_LEN)
  assert any((r[:SEQ_LEN] == ids[0]).all() and (r[SEQ_LEN:-1] == types[0]).all() for r in rows)
  train_labels = data.train[:, -1].view(np.float32)
  assert data.stats['label_stats']['train']['mean'] == pytest.approx(float(train_labels.mean()))
  json.dumps(data.stats)
  mean = float(train_labels.astype(np.float64).mean())
  gold = data.test[:, -1].view(np.float32).astype(np.float64)
  assert task.baselines() == pytest.approx({'mean_mse': float(np.mean((gold - mean) ** 2))})


def test_bad_labels_name_the_row_and_key(tok, tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"id": 1, "sentence1": "a", "sentence2": "b", "label": 1.5}\n'
                  '{"id": 2, "sentence1": "a", "sentence2": "b", "label": "high"}\n')
  with pytest.raises(ValueError, match=r"task_data\.label_field: 'label' in row 2 of .*bad\.jsonl "
                                       r"is 'high', expected a number"):
    regress.RegressTask(make_config(path), tok, print).prepare(None)


def test_regression_metrics_match_scipy():
  rng = np.random.default_rng(4)
  gold = np.round(rng.uniform(0, 5, 300) * 5) / 5  # STS-B-like labels, many ties
  pred = (gold + rng.normal(scale=1.0, size=300)).astype(np.float32)
  m = regress.regression_metrics(gold, pred)
  assert m['pearson'] == pytest.approx(scipy.stats.pearsonr(gold, pred)[0], abs=1e-9)
  assert m['spearman'] == pytest.approx(scipy.stats.spearmanr(gold, pred)[0], abs=1e-9)
  assert m['loss'] == pytest.approx(float(np.mean((pred.astype(np.float64) - gold) ** 2)))
  assert m['examples'] == 300


def test_loss_and_evaluate_agree_with_numpy_and_scipy(prepared, net):
  task, data = prepared
  graphdef, params = net
  rows = np.concatenate([data.train[:6], np.zeros((2, data.train.shape[1]), np.int32)])

  @jax.jit
  def run(p, rows):
    m = nnx.merge(graphdef, p)
    return task.batch_loss(m, rows, None, None, jnp.int32(0)), task._outputs(m, rows[:, :-1])

  (loss_sum, weight, sums), pred = run(params, rows)
  target = data.train[:6, -1].view(np.float32).astype(np.float64)
  pred = np.asarray(pred, np.float64)
  assert float(weight) == 6  # the two all-zero padding rows carry no weight
  assert float(loss_sum) == pytest.approx(float(np.sum((pred[:6] - target) ** 2)), rel=1e-5)
  assert task.window_record({k: float(v) for k, v in sums.items()})['train/loss'] == (
      pytest.approx(float(loss_sum) / 6))
  metrics = task.evaluate(graphdef, params, 'val', jnp.asarray)  # in batches of 8, padded
  out = np.asarray(task._forward_fn()(graphdef, params, jnp.asarray(data.val))[0], np.float64)
  gold = data.val[:, -1].view(np.float32).astype(np.float64)
  assert metrics['examples'] == len(data.val)
  assert metrics['pearson'] == pytest.approx(scipy.stats.pearsonr(gold, out)[0], abs=1e-6)
  assert metrics['spearman'] == pytest.approx(scipy.stats.spearmanr(gold, out)[0], abs=1e-6)
  assert metrics['loss'] == pytest.approx(float(np.mean((out - gold) ** 2)), rel=1e-5)
  text = task.final_text({f'test/{k}': v for k, v in metrics.items()})
  assert text.startswith('test split: pearson ') and 'spearman' in task.eval_text(metrics)
  got = task.predict(graphdef, params, 'regress', ['red green\tgreen red', ('one', 'two')])
  assert len(got) == 2 and all(isinstance(x, float) for x in got)
  assert got == task.predict(graphdef, params, 'regress', [('red green', 'green red'), 'one\ttwo'])
