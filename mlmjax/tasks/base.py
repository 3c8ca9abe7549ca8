"""The task protocol: what train.run, the compile check and mlmjax.predict ask of a task.

A task owns its knowledge: how its data are prepared (MLM's token cache included), its model and
loss, the metrics it reports, how pretrained encoder weights enter its model, its unlabeled texts
(for task-adaptive MLM) and what `mlmjax.predict` does with a trained model. Everything a task
shares (mesh and shardings, the optimizer, gradient accumulation, skipping non-finite steps,
checkpoints and exact resume, init_from, evaluation cadence, early stopping, the progress line,
metrics.jsonl, TensorBoard, summary.json) belongs to mlmjax/experiment.py and mlmjax/train.py.

A task's rows are one int32 array (N, W) per split, its columns side by side (its own layout: e.g.
tokens then a label column), so the same seeded, resumable, per-host batching serves every task.
"""

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlmjax import heads, losses, model as model_lib
from mlmjax import tokenizer as tokenizer_lib
# Not `from mlmjax.tasks import ...`: that package imports this module.
import mlmjax.tasks.metrics as metrics_lib
import mlmjax.tasks.task_data as td

# (record key, label, format spec): one entry of a progress or evaluation line.
Metric = tuple[str, str, str]


@dataclasses.dataclass
class TaskData:
  """A task's prepared splits and what summary.json records about them."""
  train: np.ndarray  # (N, W) int32, the rows train.py batches
  val: np.ndarray  # (M, W) int32, evaluated every eval.every_steps
  test: np.ndarray  # (T, W) int32, evaluated once at the end with the best parameters; may be empty
  stats: dict  # JSON-able: sources, counts per split, label names, ... (summary.json['data'])
  key: str  # digest of the rows' content: a resume warns when it changes


def format_metrics(record: dict[str, Any], declared: Sequence[Metric]) -> str:
  """Returns 'label value | label value ...' for the declared keys present in record."""
  return ' | '.join(f'{label} {record[key]:{fmt}}' for key, label, fmt in declared
                    if key in record and record[key] is not None)


class Task:
  """The hooks the loop, the compile check and predict call; subclasses live in tasks/<name>.py."""

  name = ''
  # Early stopping and the best checkpoint follow this validation metric unless the config names one.
  best_metric = 'loss'
  best_mode = 'min'  # 'min' or 'max'
  keeps_best = True  # keep best/ (the best evaluation's checkpoint) even without early stopping
  sequences_per_row = 1  # sequences of seq_len tokens per row (a retrieval row holds two)
  # The progress line's and the evaluation line's numbers, in order (see format_metrics).
  progress_metrics: Sequence[Metric] = (('train/loss', 'loss', '.4f'),
                                        ('train/accuracy', 'acc', '.4f'),
                                        ('train/lr', 'lr', '.2e'))
  eval_metrics: Sequence[Metric] = (('loss', 'loss', '.4f'),)
  predict_modes: Sequence[str] = ()  # mlmjax.predict --mode values beyond 'embed' (every task's)
  embed_pooling = 'mean'  # what `embed` pools unless asked otherwise

  def __init__(self, config, tokenizer=None, log: Callable[[str], None] = print):
    self.config = config
    self.tokenizer = tokenizer  # set by prepare() when None
    self.log = log
    self.adapt = None  # an adapt.Adaptations: defaults prepare() may change to fit the data

  # --- data

  def row_width(self) -> int:
    """Returns the columns of a row (the compile check builds its batch from this)."""
    return int(self.config.train.seq_len) * self.sequences_per_row

  def load_tokenizer(self, workdir) -> None:
    """Sets self.tokenizer (unless given): the workdir's, else tokenizer.path's, copied into the workdir."""
    if self.tokenizer is None:
      self.tokenizer = tokenizer_lib.resolve(workdir, self.config.tokenizer.path)
    if self.tokenizer is None:
      raise ValueError(f"task '{self.name}' needs a tokenizer: set init_from (a pretrained workdir) "
                       'or tokenizer.path (e.g. runs/pretrain/tokenizer.model)')
    if workdir is not None:
      tokenizer_lib.store(self.tokenizer, workdir)

  def prepare(self, workdir) -> TaskData:
    """Returns the tokenized splits (resolving the tokenizer first; cached where the task caches)."""
    raise NotImplementedError

  def prepare_shapes(self) -> None:
    """Sets up what build_model and batch_loss need from shapes alone (the compile check)."""

  def load_meta(self, stats: dict) -> None:
    """Sets what build_model needs (e.g. label names) from TaskData.stats, without the data.

    mlmjax.predict calls this with the stats train.py stored in the workdir's task.json.
    """
    del stats

  def unlabeled_texts(self, row: dict, i: int, path: str) -> list[str]:
    """Returns the unlabeled text(s) of example `row` (line i of path), for task-adaptive MLM."""
    raise ValueError(f'task: {self.name!r} has no task data to export; use a fine-tuning config')

  # --- model and loss

  def build_model(self, enc_cfg, rngs):
    """Returns the nnx model (encoder under the attribute `encoder`, heads beside it)."""
    raise NotImplementedError

  def transfer(self, pretrained: dict, fresh: dict) -> dict:
    """Returns this task's initial parameters from a pretrained MLM run's: its encoder, fresh heads."""
    return {**fresh, 'encoder': pretrained['encoder']}

  def init_match_keys(self) -> tuple[str, ...]:
    """Returns the model fields that must equal the pretrained run's for transfer()."""
    return ('hidden_size', 'num_layers', 'num_heads', 'intermediate_size', 'max_position',
            'type_vocab_size', 'pre_layer_norm', 'layer_norm_eps',
            # The rotary bases may change: context extension raises them.
            *(k for k in model_lib.ARCHITECTURE_OPTIONS if not k.startswith('rope_')))

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

  def flops_max_predictions(self) -> int:
    """Returns the MLM head's prediction slots per row for the FLOP count (0: no MLM head)."""
    return 0

  # --- metrics

  def window_record(self, sums: dict[str, float]) -> dict[str, float]:
    """Returns the task's train/* numbers from metric sums added over a logging window."""
    raise NotImplementedError

  def progress_text(self, record: dict[str, float]) -> str:
    """Returns the task's part of the progress line (its progress_metrics)."""
    return format_metrics(record, self.progress_metrics)

  def evaluate(self, graphdef, params, split: str, to_device: Callable) -> dict[str, Any]:
    """Returns metrics (no prefix) on split 'val' or 'test'; to_device turns host rows into a global batch."""
    raise NotImplementedError

  def eval_text(self, metrics: dict[str, Any]) -> str:
    """Returns one log line of the metrics evaluate returned (its eval_metrics)."""
    return format_metrics(metrics, self.eval_metrics) or 'no examples'

  def final_text(self, record: dict[str, Any]) -> str | None:
    """Returns a closing table for the log from the summary's eval/test numbers, or None."""
    del record
    return None

  def describe(self) -> str:
    """Returns a few words on the task's setup for the log."""
    return self.name

  def summary_extras(self) -> dict[str, Any]:
    """Returns task-specific entries for summary.json."""
    return {}

  def baselines(self) -> dict[str, float]:
    """Returns simple baselines on the test (or val) split, for summary.json ('baseline/...')."""
    return {}

  # --- prediction (mlmjax.predict)

  def predict(self, graphdef, params, mode: str, inputs: list, top_k: int = 0) -> list:
    """Returns one result per input for --mode `mode` (one of predict_modes)."""
    raise ValueError(f'--mode {mode}: the {self.name} task predicts {list(self.predict_modes)}')

  def format_prediction(self, mode: str, text, result) -> str:
    """Returns the lines mlmjax.predict prints for one input's result."""
    del mode
    return f'{text}\n  {result}'

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Returns (N, seq_len) int32 rows [CLS] pieces [SEP] PAD... of cleaned texts (prediction input)."""
    return td.encode_texts(self.tokenizer, texts, int(self.config.train.seq_len))

  def layout_ids(self) -> dict[str, int]:
    """Returns the tokenizer's {'cls_id', 'pad_id'}, as the heads and the encoder take them.

    Without a tokenizer (the compile check of a config that names none: shapes only) they are
    the sentencepiece layout's.
    """
    t = self.tokenizer
    if t is None:
      return {'cls_id': tokenizer_lib.CLS_ID, 'pad_id': tokenizer_lib.PAD_ID}
    return {'cls_id': int(t.cls_id), 'pad_id': int(t.pad_id)}

  def embedding(self, model, ids: jax.Array, pooling: str) -> jax.Array:
    """Returns the (B, H) embedding of rows: the encoder's output pooled by `pooling`."""
    ids_of = self.layout_ids()
    return heads.encode_pooled(model.encoder, ids, pooling, **ids_of)


# Rows per prediction forward call: 8, 16 or 32 (the next power of two), so a few compiles serve any count.
_MIN_BATCH, _MAX_BATCH = 8, 32


def batched(fn: Callable[[np.ndarray], jax.Array], rows: np.ndarray,
            pad_id: int = tokenizer_lib.PAD_ID) -> np.ndarray:
  """Returns fn's per-row outputs for rows (N, W), in batches of a few sizes padded with pad_id."""
  n = len(rows)
  size = min(_MAX_BATCH, max(_MIN_BATCH, 1 << max(n - 1, 0).bit_length()))
  outs = []
  for start in range(0, n, size):
    part = rows[start:start + size]
    padded = np.full((size, rows.shape[1]), pad_id, np.int32)  # their outputs are dropped
    padded[:len(part)] = part
    outs.append(np.asarray(fn(padded))[:len(part)])
  return np.concatenate(outs)


class LabelTask(Task):
  """Shared hooks of tasks with a label per row (classify) or per position (tag).

  Subclasses define parts(rows, pad_id) -> (tokens, labels, weights), pad_id the tokenizer's (a
  row whose first token is pad_id is padding): the loss is softmax cross-entropy of the model's
  logits against labels where weights > 0, and accuracy counts argmax hits there.
  """

  count_name = 'examples'  # what evaluate counts: examples (classify) or words (tag)
  eval_metrics = (('loss', 'loss', '.4f'), ('accuracy', 'acc', '.4f'),
                  ('macro_f1', 'macro-F1', '.4f'), ('examples', 'examples', '.0f'))

  def __init__(self, config, tokenizer=None, log: Callable[[str], None] = print):
    super().__init__(config, tokenizer, log)
    self.labels: list[str] = []
    self.splits: dict[str, np.ndarray] | None = None
    self._forward = None
    self._probs = {}

  @staticmethod
  def parts(rows: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (tokens, labels, weights) of a batch of rows; pad_id marks padding rows."""
    raise NotImplementedError

  def type_ids(self, rows: jax.Array) -> jax.Array | None:
    """Returns the (B, L) token type ids of a batch of rows, or None (all 0: one text per row)."""
    del rows
    return None

  def model_inputs(self, rows: jax.Array) -> dict[str, jax.Array]:
    """Returns the keyword inputs of the model besides the tokens: {'type_ids': ...} or {}."""
    types = self.type_ids(rows)
    return {} if types is None else {'type_ids': types}

  def label_metrics(self, gold: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Returns accuracy, macro_f1 and the per-class report of label ids (evaluate adds the rest)."""
    return {'accuracy': metrics_lib.accuracy(gold, pred),
            'macro_f1': metrics_lib.macro_f1(gold, pred, len(self.labels)),
            'per_class': metrics_lib.per_class_report(gold, pred, self.labels)}

  def label_names(self) -> list[str]:
    """Returns the sorted label names of task_data.path without tokenizing it (compile check)."""
    raise NotImplementedError

  def prepare_shapes(self) -> None:
    self.labels = self.label_names()

  def load_meta(self, stats: dict) -> None:
    if not stats.get('labels'):
      raise ValueError(f'lists no "labels": the {self.name!r} head cannot be rebuilt')
    self.labels = list(stats['labels'])

  def _task_data(self, stats: dict) -> TaskData:
    """Returns the TaskData of self.splits, keyed by a digest of the rows and the label names."""
    s = self.splits
    return TaskData(train=s['train'], val=s['val'], test=s['test'], stats=stats,
                    key=td.digest(s['train'], s['val'], s['test'], np.array(self.labels)))

  def batch_loss(self, m, rows, mask_key, drop_key, step):
    del mask_key, step
    tokens, labels, weights = self.parts(rows, self.layout_ids()['pad_id'])
    logits = m(tokens, dropout_rng=drop_key, **self.model_inputs(rows))
    loss_sum, weight = losses.cross_entropy_sum(logits, labels, weights)
    correct, _ = losses.accuracy_sum(logits, labels, weights)
    return loss_sum, weight, {'loss_sum': loss_sum, 'weight': weight, 'correct': correct}

  def window_record(self, sums):
    w = max(float(sums['weight']), 1.0)
    return {'train/loss': float(sums['loss_sum']) / w, 'train/accuracy': float(sums['correct']) / w}

  def evaluate(self, graphdef, params, split, to_device) -> dict[str, Any]:
    """Returns loss, the count and label_metrics (accuracy, macro-F1, per-class report) on split."""
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
    return {'loss': float(nll.mean()), **self.label_metrics(gold, pred),
            self.count_name: float(gold.size)}

  def _forward_fn(self):
    """Returns the jitted (graphdef, params, rows) -> (pred, label, weight, nll), built once."""
    if self._forward is None:
      parts, inputs, pad_id = self.parts, self.model_inputs, self.layout_ids()['pad_id']

      def forward(graphdef, params, rows):
        tokens, labels, weights = parts(rows, pad_id)
        logits = nnx.merge(graphdef, params)(tokens, **inputs(rows))
        lse = jax.nn.logsumexp(logits, axis=-1)
        gold = jnp.take_along_axis(logits, labels[..., None], axis=-1, mode='clip')[..., 0]
        return jnp.argmax(logits, -1).astype(jnp.int32), labels, weights, lse - gold

      self._forward = jax.jit(forward, static_argnums=0)
    return self._forward

  def probabilities(self, graphdef, params, rows: np.ndarray,
                    type_ids: np.ndarray | None = None) -> np.ndarray:
    """Returns the model's label probabilities of token rows (classify: (N, C); tag: (N, L, C)).

    type_ids: (N, L) token types of text-pair rows; None for one text per row.
    """
    if graphdef not in self._probs:

      def probs(p, ids):
        # Pair rows travel as [tokens | types] (2 L columns), so one batching serves both.
        width = int(self.config.train.seq_len)
        types = {} if ids.shape[1] == width else {'type_ids': ids[:, width:]}
        return jax.nn.softmax(nnx.merge(graphdef, p)(ids[:, :width], **types), axis=-1)

      self._probs[graphdef] = jax.jit(probs)
    joined = rows if type_ids is None else np.concatenate([rows, type_ids], axis=1)
    return batched(lambda ids: self._probs[graphdef](params, ids), joined,
                   self.layout_ids()['pad_id'])
