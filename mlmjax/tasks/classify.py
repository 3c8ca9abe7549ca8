"""Text classification: one label per example, from the [CLS] (or mean-pooled) encoder vector.

Fields: task_data.text_field, optional task_data.title_field (prepended as 'Title. text'),
task_data.label_field, task_data.id_field (splits; see task_data). The label names are the sorted
set of labels in the whole file; a label's id is its position in that list (stats['labels']).

Row layout, W = train.seq_len + 1, int32:
  columns [0, seq_len)  tokens: [CLS] pieces [SEP] PAD... (texts longer than seq_len - 2 pieces are cut)
  column  seq_len       the label id
Every token id is the tokenizer's. Rows whose first token is its PAD (evaluation padding) carry
no weight.
"""

import jax
import numpy as np

from mlmjax import model
from mlmjax.tasks import task_data as td
from mlmjax.tasks.base import LabelTask, TaskData


def split_row_parts(rows: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (tokens (B, L), label ids (B,), valid (B,) bool) of classification rows (B, L + 1).

  A row whose first token is pad_id (the tokenizer's; evaluation padding) is not valid.
  """
  tokens, labels = rows[:, :-1], rows[:, -1]
  return tokens, labels, tokens[:, 0] != pad_id


class ClassifyTask(LabelTask):
  """Sequence classification with model.SequenceClassifier (accuracy, macro-F1, per-class report)."""

  name = 'classify'
  best_metric = 'accuracy'
  best_mode = 'max'
  parts = staticmethod(split_row_parts)
  predict_modes = ('classify',)

  @property
  def embed_pooling(self) -> str:
    return str(self.config.classify.pooling)  # the vector the classifier reads

  def row_width(self) -> int:
    return int(self.config.train.seq_len) + 1

  def _names(self, rows: list[dict], path: str) -> list[str]:
    cfg = self.config.task_data
    return [td.text_field(row, cfg.label_field, i, path, key='label_field')
            for i, row in enumerate(rows, 1)]

  def label_names(self) -> list[str]:
    path = str(self.config.task_data.path)
    rows = td.read_examples(path, max_examples=int(self.config.task_data.max_examples))
    return sorted(set(self._names(rows, path)))

  def unlabeled_texts(self, row: dict, i: int, path: str) -> list[str]:
    """Returns [text], after the title when task_data.title_field is set."""
    cfg = self.config.task_data
    text = td.text_field(row, cfg.text_field, i, path, key='text_field')
    if cfg.title_field:
      text = title_and_text(td.text_field(row, cfg.title_field, i, path, key='title_field'), text)
    return [text]

  def prepare(self, workdir) -> TaskData:
    # Tokenizing a few thousand texts each run is cheap; nothing is cached on disk.
    self.load_tokenizer(workdir)
    cfg, seq_len = self.config.task_data, int(self.config.train.seq_len)
    path = str(cfg.path)
    rows = td.read_examples(path, max_examples=int(cfg.max_examples))
    splits = td.split_rows(rows, path, cfg)
    texts = [self.unlabeled_texts(row, i, path)[0] for i, row in enumerate(rows, 1)]
    names = self._names(rows, path)
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
    return self._task_data(stats)

  def build_model(self, enc_cfg, rngs):
    if not self.labels:
      raise RuntimeError('classify: no labels: call prepare() or load_meta() before build_model()')
    return model.SequenceClassifier(enc_cfg, len(self.labels), pooling=self.config.classify.pooling,
                                    **self.layout_ids(), rngs=rngs)

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


  def predict(self, graphdef, params, mode, inputs, top_k=0):
    """Returns per text the top_k (label, probability) pairs, most probable first."""
    if mode != 'classify':
      return super().predict(graphdef, params, mode, inputs, top_k)
    if not inputs:
      return []
    probs = self.probabilities(graphdef, params, self.encode_texts(inputs))
    return [[(self.labels[i], float(row[i])) for i in np.argsort(-row, kind='stable')[:top_k or 3]]
            for row in probs]

  def format_prediction(self, mode, text, result) -> str:
    return f'{text}\n  ' + '  '.join(f'{label} {p:.3f}' for label, p in result)


def title_and_text(title: str, text: str) -> str:
  """Returns 'title. text' (no extra period when the title already ends a sentence)."""
  title = title.strip()
  if not title:
    return text
  return f'{title} {text}' if title[-1] in '.!?' else f'{title}. {text}'


def majority_label(labels: np.ndarray, n: int) -> int:
  """Returns the most frequent label id (the lowest id among ties)."""
  return int(np.argmax(np.bincount(np.asarray(labels, np.int64), minlength=n)))
