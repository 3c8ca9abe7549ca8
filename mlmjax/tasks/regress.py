"""Regression (STS-B style): one float label per text or text pair, from the pooled encoder.

Fields and inputs as classify's (tasks/classify.py: text_field, text_b_field for pairs,
title_field, id_field/group_field); task_data.label_field holds a number (or a numeric string, as
TFDS float labels are read). The model is classify's SequenceClassifier with one output unit
(classify.pooling picks its vector); the loss is the squared error, averaged over the rows.

Row layout, int32, as classify's with the label column holding the float32 label's bits
(np.float32(y).view(np.int32)), so the int32 rows carry it exactly:
  one text: W = L + 1 (tokens, label); a text pair: W = 2 L + 1 (tokens, type ids, label).

Evaluation on 'val' / 'test': loss (mean squared error), pearson and spearman (Pearson's r of
the predictions and the labels, and of their average ranks; 0.0 when either side is constant),
and the number of examples. Baseline: predicting the training labels' mean (mean_mse).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlmjax import heads
from mlmjax.tasks import metrics as metrics_lib, task_data as td
from mlmjax.tasks.base import Task, TaskData, batched
from mlmjax.tasks.classify import TextInputs


def labels_to_column(labels) -> np.ndarray:
  """Returns the int32 column holding float labels' float32 bits."""
  return np.asarray(labels, np.float32).view(np.int32)


def column_to_labels(column: jax.Array) -> jax.Array:
  """Returns the float32 labels of an int32 label column (labels_to_column's inverse)."""
  return jax.lax.bitcast_convert_type(column, jnp.float32)


def squared_error_sums(pred: jax.Array, target: jax.Array,
                       valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (sum of squared errors over the valid rows, their count), both float32."""
  err = jnp.where(valid, jnp.square(pred.astype(jnp.float32) - target), 0.0)
  return err.sum(), valid.sum().astype(jnp.float32)


def regression_metrics(gold, pred) -> dict[str, float]:
  """Returns loss (mean squared error), pearson, spearman and examples of float predictions."""
  gold = np.asarray(gold, np.float64)
  pred = np.asarray(pred, np.float64)
  return {'loss': float(np.mean((pred - gold) ** 2)) if gold.size else 0.0,
          'pearson': metrics_lib.pearson(gold, pred), 'spearman': metrics_lib.spearman(gold, pred),
          'examples': float(gold.size)}


class RegressTask(TextInputs, Task):
  """One float per text or text pair: squared-error loss, Pearson and Spearman (module doc)."""

  name = 'regress'
  best_metric = 'pearson'
  best_mode = 'max'
  progress_metrics = (('train/loss', 'mse', '.4f'), ('train/lr', 'lr', '.2e'))
  eval_metrics = (('loss', 'mse', '.4f'), ('pearson', 'pearson', '.4f'),
                  ('spearman', 'spearman', '.4f'), ('examples', 'examples', '.0f'))
  predict_modes = ('regress',)

  def __init__(self, config, tokenizer=None, log: Callable[[str], None] = print):
    super().__init__(config, tokenizer, log)
    self.splits: dict[str, np.ndarray] | None = None
    self._forward = None
    self._predict_fns = {}

  @property
  def embed_pooling(self) -> str:
    return str(self.config.classify.pooling)  # the vector the regression head reads

  def _labels(self, rows: list[dict], path: str) -> np.ndarray:
    """Returns the float64 labels of the examples; a non-number names the row and the key."""
    cfg = self.config.task_data
    out = np.zeros(len(rows), np.float64)
    for i, row in enumerate(rows, 1):
      value = td.field(row, cfg.label_field, i, path, key='label_field')
      try:
        if isinstance(value, bool):
          raise ValueError
        out[i - 1] = float(value)
      except (TypeError, ValueError):
        raise ValueError(f'task_data.label_field: {cfg.label_field!r} in row {i} of {path} is '
                         f'{value!r}, expected a number') from None
    if not np.isfinite(out).all():
      bad = int(np.flatnonzero(~np.isfinite(out))[0]) + 1
      raise ValueError(f'task_data.label_field: {cfg.label_field!r} in row {bad} of {path} is '
                       'not finite')
    return out

  def prepare(self, workdir) -> TaskData:
    self.load_tokenizer(workdir)  # nothing is cached on disk
    cfg, seq_len = self.config.task_data, int(self.config.train.seq_len)
    path = str(cfg.path)
    rows = self.read_examples()
    splits = np.array(td.split_rows(rows, path, cfg))
    labels = self._labels(rows, path)
    enc_stats: dict[str, int] = {}
    inputs = self.encode_examples(rows, path, enc_stats)
    table = np.concatenate([inputs, labels_to_column(labels)[:, None]], axis=1)
    self.splits = {s: table[splits == s] for s in td.SPLITS}
    if not len(self.splits['train']):
      raise ValueError(f'{path}: the train split is empty; lower task_data.val_fraction / '
                       'task_data.test_fraction or add examples')
    label_stats = {}
    for s in td.SPLITS:
      y = labels[splits == s]
      label_stats[s] = ({'mean': float(y.mean()), 'std': float(y.std()), 'min': float(y.min()),
                         'max': float(y.max())} if y.size else {})
    stats = {**self.input_stats(path, len(rows), enc_stats),
             'split_examples': {s: int(len(a)) for s, a in self.splits.items()},
             'label_stats': label_stats}
    self.log(f'regress: {len(rows)} examples from {path}; train/val/test '
             f'{stats["split_examples"]["train"]}/{stats["split_examples"]["val"]}/'
             f'{stats["split_examples"]["test"]}; labels {labels.min():.3g}..{labels.max():.3g}; '
             f'{stats["truncated"]} {"pairs" if self.pair else "texts"} cut to {seq_len} tokens')
    key = td.digest(self.splits['train'], self.splits['val'], self.splits['test'])
    return TaskData(train=self.splits['train'], val=self.splits['val'], test=self.splits['test'],
                    stats=stats, key=key)

  def build_model(self, enc_cfg, rngs):
    return heads.SequenceClassifier(enc_cfg, 1, pooling=self.config.classify.pooling,
                                    **self.layout_ids(), rngs=rngs)

  def _outputs(self, m, inputs: jax.Array, drop_key=None) -> jax.Array:
    """Returns the (B,) predictions of input columns (B, input_width): tokens, pairs' type ids."""
    width = int(self.config.train.seq_len)
    types = {'type_ids': inputs[:, width:]} if self.pair else {}
    return m(inputs[:, :width], dropout_rng=drop_key, **types)[:, 0]

  def _predictions(self, m, rows: jax.Array, drop_key=None) -> tuple[jax.Array, ...]:
    """Returns (predictions (B,), targets (B,), valid (B,)) of a batch of rows."""
    _, column, valid = self.parts(rows, self.layout_ids()['pad_id'])
    return self._outputs(m, rows[:, :-1], drop_key), column_to_labels(column), valid

  def batch_loss(self, m, rows, mask_key, drop_key, step):
    del mask_key, step
    pred, target, valid = self._predictions(m, rows, drop_key)
    loss_sum, weight = squared_error_sums(pred, target, valid)
    return loss_sum, weight, {'loss_sum': loss_sum, 'weight': weight}

  def window_record(self, sums):
    return {'train/loss': float(sums['loss_sum']) / max(float(sums['weight']), 1.0)}

  def _forward_fn(self):
    """Returns the jitted (graphdef, params, rows) -> (pred, target, valid), built once."""
    if self._forward is None:
      self._forward = jax.jit(
          lambda graphdef, params, rows: self._predictions(nnx.merge(graphdef, params), rows),
          static_argnums=0)
    return self._forward

  def evaluate(self, graphdef, params, split, to_device) -> dict[str, Any]:
    """Returns loss (MSE), pearson, spearman and examples on split 'val' or 'test'."""
    if self.splits is None:
      raise RuntimeError('regress: call prepare() before evaluate()')
    rows = self.splits[split]
    if not len(rows):
      return {}
    pred, gold, valid = td.collect(self._forward_fn(), graphdef, params, rows,
                                   int(self.config.eval.batch_size), to_device)
    keep = valid.astype(bool)
    return regression_metrics(gold[keep], pred[keep]) if keep.any() else {}

  def baselines(self) -> dict[str, float]:
    """Returns mean_mse: the squared error of predicting the training labels' mean on test (val)."""
    if self.splits is None:
      raise RuntimeError('regress: call prepare() before baselines()')
    rows = self.splits['test'] if len(self.splits['test']) else self.splits['val']
    if not len(rows):
      return {}
    mean = float(self.splits['train'][:, -1].view(np.float32).astype(np.float64).mean())
    gold = rows[:, -1].view(np.float32).astype(np.float64)
    return {'mean_mse': float(np.mean((gold - mean) ** 2))}

  def final_text(self, record):
    found = metrics_lib.final_split(record, 'pearson')
    if found is None:
      return None
    split, m = found
    line = (f'{split} split: pearson {m["pearson"]:.4f} | spearman {m["spearman"]:.4f} | '
            f'mse {m["loss"]:.4f}')
    if 'baseline/mean_mse' in record:
      line += f'   (predicting the train mean: mse {record["baseline/mean_mse"]:.4f})'
    return line

  def predict(self, graphdef, params, mode, inputs, top_k=0):
    """Returns one float per input (a text; pair tasks: (a, b) or 'a<TAB>b')."""
    if mode != 'regress':
      return super().predict(graphdef, params, mode, inputs, top_k)
    if not inputs:
      return []
    if graphdef not in self._predict_fns:
      self._predict_fns[graphdef] = jax.jit(
          lambda p, inputs: self._outputs(nnx.merge(graphdef, p), inputs))
    columns = self.encode_inputs(inputs)
    out = batched(lambda ids: self._predict_fns[graphdef](params, ids), columns,
                  self.layout_ids()['pad_id'])
    return [float(x) for x in out]

  def format_prediction(self, mode, text, result) -> str:
    return f'{text}\n  {result:.4f}'
