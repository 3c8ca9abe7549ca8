"""Tasks for train.run's one loop (`config.task`): each supplies data, model, loss and metrics.

train.run owns everything a task shares: mesh and shardings, the optimizer, gradient accumulation,
skipping non-finite steps, checkpoints and exact resume, init_from, evaluation cadence, early
stopping with the best checkpoint, the progress line, metrics.jsonl, TensorBoard and summary.json.

A task's rows are one int32 array (N, W) per split, its columns side by side (its own layout: e.g.
tokens then a label column), so the same seeded, resumable, per-host batching serves every task.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlmjax import losses

NAMES = ('mlm', 'classify', 'tag', 'retrieve')


@dataclasses.dataclass
class TaskData:
  """A task's prepared splits and what summary.json records about them."""
  train: np.ndarray  # (N, W) int32, the rows train.py batches
  val: np.ndarray  # (M, W) int32, evaluated every eval.every_steps
  test: np.ndarray  # (T, W) int32, evaluated once at the end with the best parameters; may be empty
  stats: dict  # JSON-able: sources, counts per split, label names, ... (summary.json['data'])
  key: str  # digest of the rows' content: a resume warns when it changes


class Task:
  """The hooks train.run calls; subclasses live in mlmjax/tasks/<name>.py."""

  name = ''
  # Early stopping and the best checkpoint follow this validation metric unless the config names one.
  best_metric = 'loss'
  best_mode = 'min'  # 'min' or 'max'

  def __init__(self, config, tokenizer, log: Callable[[str], None]):
    self.config = config
    self.tokenizer = tokenizer
    self.log = log

  def prepare(self, workdir) -> TaskData:
    """Returns the tokenized splits (read from config, cached where the task caches)."""
    raise NotImplementedError

  def load_meta(self, stats: dict) -> None:
    """Sets what build_model needs (e.g. label names) from TaskData.stats, without the data.

    mlmjax.predict calls this with the stats train.py stored in the workdir's task.json.
    """
    del stats

  def build_model(self, enc_cfg, rngs):
    """Returns the nnx model (encoder under the attribute `encoder`, heads beside it)."""
    raise NotImplementedError

  def batch_loss(self, model, rows: jax.Array, mask_key: jax.Array, drop_key: jax.Array | None,
                 step: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Returns (loss_sum, weight, metric sums) of a (micro)batch, inside the jitted step.

    The loss the optimizer sees is the sum of loss_sum over microbatches divided by the sum of
    weight. Metric sums are float arrays that add up over microbatches and logging windows.
    drop_key is None when the model has no dropout.
    """
    raise NotImplementedError

  def step_sums(self, rows: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
    """Returns per-step metric sums computed once on the whole batch (not per microbatch)."""
    del rows, step
    return {}

  def window_record(self, sums: dict[str, float]) -> dict[str, float]:
    """Returns the task's train/* numbers from metric sums added over a logging window."""
    raise NotImplementedError

  def progress_text(self, record: dict[str, float], step: int) -> str:
    """Returns the task's part of the progress line, e.g. 'loss 0.41 | acc 0.88'."""
    raise NotImplementedError

  def evaluate(self, graphdef, params, split: str, to_device: Callable) -> dict[str, Any]:
    """Returns metrics (no prefix) on split 'val' or 'test'; to_device turns host rows into a global batch."""
    raise NotImplementedError

  def eval_text(self, metrics: dict[str, Any]) -> str:
    """Returns one log line of the metrics evaluate returned."""
    raise NotImplementedError

  def final_text(self, record: dict[str, Any]) -> str | None:
    """Returns a closing table for the log from the summary's eval/test numbers, or None."""
    del record
    return None

  # Sequences of seq_len tokens per row (a retrieval row holds a query and a document).
  sequences_per_row = 1

  def describe(self) -> str:
    """Returns a few words on the task's setup for the log."""
    return self.name

  def summary_extras(self) -> dict[str, Any]:
    """Returns task-specific entries for summary.json."""
    return {}

  def flops_max_predictions(self) -> int:
    """Returns the MLM head's prediction slots per row for the FLOP count (0: no MLM head)."""
    return 0

  def baselines(self) -> dict[str, float]:
    """Returns simple baselines on the test (or val) split, for summary.json ('baseline/...')."""
    return {}


class LabelTask(Task):
  """Shared hooks of tasks with a label per row (classify) or per position (tag).

  Subclasses define parts(rows) -> (tokens, labels, weights): the loss is softmax cross-entropy of
  the model's logits against labels where weights > 0, and accuracy counts argmax hits there.
  """

  accuracy_name = 'acc'  # in the progress line
  count_name = 'examples'  # what evaluate counts: examples (classify) or words (tag)

  def __init__(self, config, tokenizer, log: Callable[[str], None]):
    super().__init__(config, tokenizer, log)
    self.labels: list[str] = []
    self.splits: dict[str, np.ndarray] | None = None
    self._forward = None

  @staticmethod
  def parts(rows: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (tokens, labels, weights) of a batch of rows."""
    raise NotImplementedError

  def load_meta(self, stats: dict) -> None:
    self.labels = list(stats['labels'])

  def _task_data(self, stats: dict) -> TaskData:
    """Returns the TaskData of self.splits, keyed by a digest of the rows and the label names."""
    from mlmjax.tasks import task_data as td  # pylint: disable=g-import-not-at-top
    s = self.splits
    return TaskData(train=s['train'], val=s['val'], test=s['test'], stats=stats,
                    key=td.digest(s['train'], s['val'], s['test'], np.array(self.labels)))

  def batch_loss(self, m, rows, mask_key, drop_key, step):
    del mask_key, step
    tokens, labels, weights = self.parts(rows)
    logits = m(tokens, dropout_rng=drop_key)
    loss_sum, weight = losses.cross_entropy_sum(logits, labels, weights)
    correct, _ = losses.accuracy_sum(logits, labels, weights)
    return loss_sum, weight, {'loss_sum': loss_sum, 'weight': weight, 'correct': correct}

  def window_record(self, sums):
    w = max(float(sums['weight']), 1.0)
    return {'train/loss': float(sums['loss_sum']) / w, 'train/accuracy': float(sums['correct']) / w}

  def progress_text(self, record, step):
    del step
    text = f'loss {record["train/loss"]:.4f} | {self.accuracy_name} {record["train/accuracy"]:.4f}'
    if 'train/lr' in record:
      text += f' | lr {record["train/lr"]:.2e}'
    return text

  def evaluate(self, graphdef, params, split, to_device) -> dict[str, Any]:
    """Returns loss, accuracy, macro-F1, the count and a per-class report on split."""
    from mlmjax.tasks import task_data as td  # pylint: disable=g-import-not-at-top
    if self.splits is None:
      raise RuntimeError(f'{self.name}: call prepare() before evaluate()')
    rows = self.splits[split]
    if not len(rows):
      return {}
    pred, gold, weights, nll = td.collect(self._forward_fn(), graphdef, params, rows,
                                          int(self.config.eval.batch_size), to_device)
    keep = weights.astype(bool)
    pred, gold, nll = pred[keep], gold[keep], nll[keep]
    if not gold.size:
      return {}
    return {'loss': float(nll.mean()), 'accuracy': td.accuracy(gold, pred),
            'macro_f1': td.macro_f1(gold, pred, len(self.labels)),
            self.count_name: float(gold.size),
            'per_class': td.per_class_report(gold, pred, self.labels)}

  def _forward_fn(self):
    """Returns the jitted (graphdef, params, rows) -> (pred, label, weight, nll), built once."""
    if self._forward is None:
      parts = self.parts

      def forward(graphdef, params, rows):
        tokens, labels, weights = parts(rows)
        logits = nnx.merge(graphdef, params)(tokens)
        lse = jax.nn.logsumexp(logits, axis=-1)
        gold = jnp.take_along_axis(logits, labels[..., None], axis=-1, mode='clip')[..., 0]
        return jnp.argmax(logits, -1).astype(jnp.int32), labels, weights, lse - gold

      self._forward = jax.jit(forward, static_argnums=0)
    return self._forward


def get_task_class(name: str) -> type:
  """Returns the Task subclass for config.task."""
  if name == 'mlm':
    from mlmjax.tasks import mlm  # pylint: disable=g-import-not-at-top
    return mlm.MlmTask
  if name == 'classify':
    from mlmjax.tasks import classify  # pylint: disable=g-import-not-at-top
    return classify.ClassifyTask
  if name == 'tag':
    from mlmjax.tasks import tag  # pylint: disable=g-import-not-at-top
    return tag.TagTask
  if name == 'retrieve':
    from mlmjax.tasks import retrieve  # pylint: disable=g-import-not-at-top
    return retrieve.RetrieveTask
  raise ValueError(f'task: {name!r} is not a task; choose one of {list(NAMES)}')
