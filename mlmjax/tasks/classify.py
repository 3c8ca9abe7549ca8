"""Text classification: one label per example, from the [CLS] (or mean-pooled) encoder vector.

Fields: task_data.text_field, optional task_data.title_field (prepended as 'Title. text'),
task_data.label_field, task_data.id_field (splits; see task_data). The label names are the sorted
set of labels in the whole file; a label's id is its position in that list (stats['labels']).

Row layout, W = train.seq_len + 1, int32:
  columns [0, seq_len)  tokens: [CLS] pieces [SEP] PAD... (texts longer than seq_len - 2 pieces are cut)
  column  seq_len       the label id
Rows whose first token is PAD (evaluation padding) carry no weight.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlmjax import losses, model
from mlmjax.tasks import Task, TaskData
from mlmjax.tasks import task_data as td


def title_and_text(title: str, text: str) -> str:
  """Returns 'title. text' (no extra period when the title already ends a sentence)."""
  title = title.strip()
  if not title:
    return text
  return f'{title} {text}' if title[-1] in '.!?' else f'{title}. {text}'


def split_row_parts(rows: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (tokens (B, L), label ids (B,), valid (B,) bool) of classification rows (B, L + 1)."""
  tokens, labels = rows[:, :-1], rows[:, -1]
  return tokens, labels, tokens[:, 0] != td.PAD_ID


class ClassifyTask(Task):
  """Sequence classification with model.SequenceClassifier (accuracy, macro-F1, per-class report)."""

  name = 'classify'
  best_metric = 'accuracy'
  best_mode = 'max'

  def __init__(self, config, tokenizer, log):
    super().__init__(config, tokenizer, log)
    self.labels: list[str] = []
    self.splits: dict[str, np.ndarray] | None = None
    self._forward = None

  def prepare(self, workdir) -> TaskData:
    del workdir  # tokenizing a few thousand texts each run is cheap; nothing is cached on disk
    cfg, seq_len = self.config.task_data, int(self.config.train.seq_len)
    path = str(cfg.path)
    rows = td.read_examples(path, max_examples=int(cfg.max_examples))
    splits = td.split_rows(rows, path, cfg)
    texts, names = [], []
    for i, row in enumerate(rows, 1):
      text = td.text_field(row, cfg.text_field, i, path, key='text_field')
      if cfg.title_field:
        text = title_and_text(td.text_field(row, cfg.title_field, i, path, key='title_field'), text)
      texts.append(text)
      names.append(td.text_field(row, cfg.label_field, i, path, key='label_field'))
    self.labels = sorted(set(names))
    if len(self.labels) < 2:
      raise ValueError(f'task_data.label_field: {cfg.label_field!r} has {len(self.labels)} distinct '
                       f'value(s) in {path}; classification needs at least 2')
    index = {n: k for k, n in enumerate(self.labels)}
    enc_stats: dict[str, int] = {}
    tokens = td.encode_texts(self.tokenizer, texts, seq_len, stats=enc_stats)
    ids = np.array([index[n] for n in names], np.int32)
    table = np.concatenate([tokens, ids[:, None]], axis=1)
    where = np.array(splits)
    self.splits = {s: table[where == s] for s in td.SPLITS}
    if not len(self.splits['train']):
      raise ValueError(f'{path}: the train split is empty; lower task_data.val_fraction / '
                       'task_data.test_fraction or add examples')
    stats = {
        'source': path, 'examples': len(rows), 'labels': self.labels,
        'split_examples': {s: int(len(a)) for s, a in self.splits.items()},
        'label_counts': {s: {n: int((a[:, -1] == k).sum()) for k, n in enumerate(self.labels)}
                         for s, a in self.splits.items()},
        'truncated': int(enc_stats.get('truncated', 0)),
        'truncated_fraction': enc_stats.get('truncated', 0) / len(rows),
        'seq_len': seq_len,
    }
    self.log(f'classify: {len(rows)} examples from {path}, {len(self.labels)} labels '
             f'{self.labels}; train/val/test {stats["split_examples"]["train"]}/'
             f'{stats["split_examples"]["val"]}/{stats["split_examples"]["test"]}; '
             f'{stats["truncated"]} texts cut to {seq_len} tokens')
    key = td.digest(self.splits['train'], self.splits['val'], self.splits['test'],
                    np.array(self.labels))
    return TaskData(train=self.splits['train'], val=self.splits['val'], test=self.splits['test'],
                    stats=stats, key=key)

  def load_meta(self, stats: dict) -> None:
    self.labels = list(stats['labels'])

  def build_model(self, enc_cfg, rngs):
    if not self.labels:
      raise RuntimeError('classify: no labels: call prepare() or load_meta() before build_model()')
    return model.SequenceClassifier(enc_cfg, len(self.labels),
                                    pooling=self.config.classify.pooling, rngs=rngs)

  def batch_loss(self, m, rows, mask_key, drop_key, step):
    del mask_key, step
    tokens, labels, valid = split_row_parts(rows)
    logits = m(tokens, dropout_rng=drop_key)
    loss_sum, weight = losses.cross_entropy_sum(logits, labels, valid)
    correct, _ = losses.accuracy_sum(logits, labels, valid)
    return loss_sum, weight, {'loss_sum': loss_sum, 'weight': weight, 'correct': correct}

  def window_record(self, sums):
    w = max(float(sums['weight']), 1.0)
    return {'train/loss': float(sums['loss_sum']) / w, 'train/accuracy': float(sums['correct']) / w}

  def progress_text(self, record, step):
    del step
    text = f'loss {record["train/loss"]:.4f} | acc {record["train/accuracy"]:.4f}'
    if 'train/lr' in record:
      text += f' | lr {record["train/lr"]:.2e}'
    return text

  def _forward_fn(self):
    """Returns the jitted (graphdef, params, rows) -> (pred, label, valid, nll), built once."""
    if self._forward is None:
      def forward(graphdef, params, rows):
        tokens, labels, valid = split_row_parts(rows)
        logits = nnx.merge(graphdef, params)(tokens)
        lse = jax.nn.logsumexp(logits, axis=-1)
        gold = jnp.take_along_axis(logits, labels[:, None], axis=-1, mode='clip')[:, 0]
        return jnp.argmax(logits, -1).astype(jnp.int32), labels, valid, lse - gold
      self._forward = jax.jit(forward, static_argnums=0)
    return self._forward

  def evaluate(self, graphdef, params, split, to_device) -> dict[str, Any]:
    if self.splits is None:
      raise RuntimeError('classify: call prepare() before evaluate()')
    rows = self.splits[split]
    if not len(rows):
      return {}
    pred, gold, valid, nll = td.collect(self._forward_fn(), graphdef, params, rows,
                                        int(self.config.eval.batch_size), to_device)
    pred, gold, nll = pred[valid], gold[valid], nll[valid]
    n = len(self.labels)
    return {'loss': float(nll.mean()), 'accuracy': td.accuracy(gold, pred),
            'macro_f1': td.macro_f1(gold, pred, n), 'examples': float(len(gold)),
            'per_class': td.per_class_report(gold, pred, self.labels)}

  def eval_text(self, metrics):
    return (f'loss {metrics["loss"]:.4f} | acc {metrics["accuracy"]:.4f} | '
            f'macro-F1 {metrics["macro_f1"]:.4f} ({int(metrics["examples"])} examples)')

  def baselines(self) -> dict[str, float]:
    if self.splits is None:
      raise RuntimeError('classify: call prepare() before baselines()')
    rows = self.splits['test'] if len(self.splits['test']) else self.splits['val']
    if not len(rows):
      return {}
    majority = majority_label(self.splits['train'][:, -1], len(self.labels))
    gold = rows[:, -1]
    pred = np.full_like(gold, majority)
    return {'majority_accuracy': td.accuracy(gold, pred),
            'majority_macro_f1': td.macro_f1(gold, pred, len(self.labels))}

  def final_text(self, record):
    found = td.final_split(record)
    if found is None:
      return None
    split, m = found
    line = f'{split} split: accuracy {m["accuracy"]:.4f} | macro-F1 {m.get("macro_f1", 0.0):.4f}'
    if 'baseline/majority_accuracy' in record:
      line += (f'   (majority class: accuracy {record["baseline/majority_accuracy"]:.4f}, '
               f'macro-F1 {record["baseline/majority_macro_f1"]:.4f})')
    lines = [line]
    if isinstance(m.get('per_class'), dict):
      lines += td.class_table(m['per_class'])
    return '\n'.join(lines)


def majority_label(labels: np.ndarray, n: int) -> int:
  """Returns the most frequent label id (the lowest id among ties)."""
  return int(np.argmax(np.bincount(np.asarray(labels, np.int64), minlength=n)))
