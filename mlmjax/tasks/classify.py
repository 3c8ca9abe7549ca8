"""Text classification: one label per example (one text or a text pair), from the pooled encoder.

Fields: task_data.text_field, optional task_data.text_b_field (a second text: sentence-pair
input), optional task_data.title_field (prepended to the first text as 'Title. text'),
task_data.label_field, task_data.id_field (splits; see task_data). The label names are the sorted
set of labels in the whole file; a label's id is its position in that list (stats['labels']).

Row layout, int32, L = train.seq_len:
  one text (text_b_field ''), W = L + 1:
    columns [0, L)   tokens: [CLS] pieces [SEP] PAD... (texts longer than L - 2 pieces are cut)
    column  L        the label id
  a text pair, W = 2 L + 1:
    columns [0, L)   tokens: [CLS] pieces of a [SEP] pieces of b [SEP] PAD...
    columns [L, 2L)  token type ids: 0 for [CLS] a [SEP] and padding, 1 for b [SEP]
    column  2L       the label id
A pair over L - 3 pieces loses pieces from the end of its longer text first
(task_data.pair_lengths).
Every token id is the tokenizer's. Rows whose first token is its PAD (evaluation padding) carry
no weight. Metrics: accuracy, macro-F1, Matthews correlation (mcc) and, with
classify.positive_label set, that label's F1 ('f1', GLUE's binary F1).
"""

from typing import Any, Sequence

import jax
import numpy as np

from mlmjax import heads
from mlmjax.tasks import metrics as metrics_lib, task_data as td
from mlmjax.tasks.base import LabelTask, TaskData


def split_row_parts(rows: jax.Array, pad_id: int,
                    pair: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (tokens (B, L), label column (B,), valid (B,) bool) of rows (B, L + 1) or (B, 2 L + 1).

  pair: the rows hold token type ids after the tokens (W = 2 L + 1). A row whose first token is
  pad_id (the tokenizer's; evaluation padding) is not valid.
  """
  length = (rows.shape[1] - 1) // 2 if pair else rows.shape[1] - 1
  tokens, labels = rows[:, :length], rows[:, -1]
  return tokens, labels, tokens[:, 0] != pad_id


def row_type_ids(rows: jax.Array) -> jax.Array:
  """Returns the (B, L) token type ids of text-pair rows (B, 2 L + 1)."""
  length = (rows.shape[1] - 1) // 2
  return rows[:, length:2 * length]


class TextInputs:
  """The text (or text-pair) input of classify and regress rows: fields, encoding and columns.

  Mixed into a Task: the rows are the input columns (tokens, then type ids for pairs) and one
  label column last.
  """

  config: Any
  tokenizer: Any

  @property
  def pair(self) -> bool:
    """Returns whether rows hold text pairs (task_data.text_b_field is set)."""
    return bool(self.config.task_data.text_b_field)

  def input_width(self) -> int:
    """Returns the input columns of a row: seq_len tokens, and seq_len type ids for pairs."""
    return int(self.config.train.seq_len) * (2 if self.pair else 1)

  def row_width(self) -> int:
    return self.input_width() + 1

  def parts(self, rows: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (tokens, label column, valid) of a batch of rows (split_row_parts)."""
    return split_row_parts(rows, pad_id, self.pair)

  def type_ids(self, rows: jax.Array) -> jax.Array | None:
    """Returns the (B, L) token type ids of pair rows, None for one text per row."""
    return row_type_ids(rows) if self.pair else None

  def example_fields(self) -> tuple[str, ...]:
    """Returns the field names this task reads from an example (what tfds: paths read)."""
    cfg = self.config.task_data
    return tuple(f for f in (cfg.text_field, cfg.text_b_field, cfg.title_field, cfg.label_field,
                             cfg.id_field, cfg.group_field) if f)

  def read_examples(self) -> list[dict]:
    """Returns the examples of task_data.path (td.load_examples with this task's fields)."""
    return td.load_examples(self.config, self.example_fields())

  def unlabeled_texts(self, row: dict, i: int, path: str) -> list[str]:
    """Returns [text] after the title when task_data.title_field is set; pairs add text b."""
    cfg = self.config.task_data
    text = td.text_field(row, cfg.text_field, i, path, key='text_field')
    if cfg.title_field:
      text = title_and_text(td.text_field(row, cfg.title_field, i, path, key='title_field'), text)
    if not self.pair:
      return [text]
    return [text, td.text_field(row, cfg.text_b_field, i, path, key='text_b_field')]

  def encode_examples(self, rows: Sequence[dict], path: str, stats: dict) -> np.ndarray:
    """Returns the int32 (N, input_width) input columns of examples; stats counts the cut ones."""
    texts = [self.unlabeled_texts(row, i, path) for i, row in enumerate(rows, 1)]
    return self._encode([t[0] for t in texts], [t[-1] for t in texts] if self.pair else None, stats)

  def encode_inputs(self, inputs: Sequence) -> np.ndarray:
    """Returns the (N, input_width) input columns of prediction inputs.

    An input is a text, or for pair tasks a (text a, text b) pair or one string 'a<TAB>b'.
    """
    if not self.pair:
      return self._encode([str(x) for x in inputs], None, None)
    pairs = [x.split('\t', 1) if isinstance(x, str) else list(x) for x in inputs]
    bad = next((x for x, p in zip(inputs, pairs) if len(p) != 2), None)
    if bad is not None:
      raise ValueError(f'{bad!r}: this task reads text pairs; give (a, b) or "a<TAB>b"')
    return self._encode([str(a) for a, _ in pairs], [str(b) for _, b in pairs], None)

  def _encode(self, texts_a: list[str], texts_b: list[str] | None,
              stats: dict | None) -> np.ndarray:
    """Returns the input columns of texts: tokens, and type ids when texts_b (pairs) is given."""
    seq_len = int(self.config.train.seq_len)
    if texts_b is None:
      return td.encode_texts(self.tokenizer, texts_a, seq_len, stats=stats)
    ids, types = td.encode_pairs(self.tokenizer, texts_a, texts_b, seq_len, stats=stats)
    return np.concatenate([ids, types], axis=1)

  def input_stats(self, path: str, n: int, enc_stats: dict) -> dict[str, Any]:
    """Returns the summary.json entries on the inputs: source, fields, truncation."""
    cfg = self.config.task_data
    return {'source': path, 'examples': n, 'pair': self.pair,
            'fields': {'text': cfg.text_field, 'text_b': cfg.text_b_field,
                       'title': cfg.title_field, 'label': cfg.label_field,
                       'split_key': cfg.group_field or cfg.id_field or '(content)'},
            'truncated': int(enc_stats.get('truncated', 0)),
            'truncated_fraction': enc_stats.get('truncated', 0) / max(n, 1),
            'seq_len': int(self.config.train.seq_len)}


class ClassifyTask(TextInputs, LabelTask):
  """Sequence (or sequence-pair) classification with heads.SequenceClassifier (module doc)."""

  name = 'classify'
  best_metric = 'accuracy'
  best_mode = 'max'
  predict_modes = ('classify',)
  eval_metrics = (('loss', 'loss', '.4f'), ('accuracy', 'acc', '.4f'),
                  ('macro_f1', 'macro-F1', '.4f'), ('mcc', 'MCC', '.4f'), ('f1', 'F1', '.4f'),
                  ('examples', 'examples', '.0f'))

  @property
  def embed_pooling(self) -> str:
    return str(self.config.classify.pooling)  # the vector the classifier reads

  def _names(self, rows: list[dict], path: str) -> list[str]:
    cfg = self.config.task_data
    return [td.text_field(row, cfg.label_field, i, path, key='label_field')
            for i, row in enumerate(rows, 1)]

  def label_names(self) -> list[str]:
    return sorted(set(self._names(self.read_examples(), str(self.config.task_data.path))))

  def positive_id(self) -> int | None:
    """Returns the id of classify.positive_label (None when unset); an unknown label raises."""
    positive = str(self.config.classify.positive_label)
    if not positive:
      return None
    if positive not in self.labels:
      raise ValueError(f'classify.positive_label: {positive!r} is not a label; the labels are '
                       f'{self.labels}')
    return self.labels.index(positive)

  def label_metrics(self, gold, pred) -> dict[str, Any]:
    """Returns accuracy, macro_f1, mcc, f1 (classify.positive_label set) and per_class."""
    out = super().label_metrics(gold, pred)
    out['mcc'] = metrics_lib.mcc(gold, pred, len(self.labels))
    k = self.positive_id()
    if k is not None:
      out['f1'] = metrics_lib.class_f1(gold, pred, len(self.labels), k)
    return out

  def prepare(self, workdir) -> TaskData:
    # Tokenizing a few ten thousand texts each run takes seconds; nothing is cached on disk.
    self.load_tokenizer(workdir)
    cfg, seq_len = self.config.task_data, int(self.config.train.seq_len)
    path = str(cfg.path)
    rows = self.read_examples()
    splits = td.split_rows(rows, path, cfg)
    names = self._names(rows, path)
    self.labels = sorted(set(names))
    if len(self.labels) < 2:
      raise ValueError(f'task_data.label_field: {cfg.label_field!r} has {len(self.labels)} distinct '
                       f'value(s) in {path}; classification needs at least 2')
    self.positive_id()  # an unknown positive label fails before any training
    index = {n: k for k, n in enumerate(self.labels)}
    enc_stats: dict[str, int] = {}
    inputs = self.encode_examples(rows, path, enc_stats)
    ids = np.array([index[n] for n in names], np.int32)
    table = np.concatenate([inputs, ids[:, None]], axis=1)
    where = np.array(splits)
    self.splits = {s: table[where == s] for s in td.SPLITS}
    if not len(self.splits['train']):
      raise ValueError(f'{path}: the train split is empty; lower task_data.val_fraction / '
                       'task_data.test_fraction or add examples')
    stats = {
        **self.input_stats(path, len(rows), enc_stats), 'labels': self.labels,
        'split_examples': {s: int(len(a)) for s, a in self.splits.items()},
        'label_counts': {s: {n: int((a[:, -1] == k).sum()) for k, n in enumerate(self.labels)}
                         for s, a in self.splits.items()},
    }
    what = 'pairs' if self.pair else 'texts'
    self.log(f'classify: {len(rows)} examples from {path}, {len(self.labels)} labels '
             f'{self.labels}; train/val/test {stats["split_examples"]["train"]}/'
             f'{stats["split_examples"]["val"]}/{stats["split_examples"]["test"]}; '
             f'{stats["truncated"]} {what} cut to {seq_len} tokens')
    return self._task_data(stats)

  def build_model(self, enc_cfg, rngs):
    if not self.labels:
      raise RuntimeError('classify: no labels: call prepare() or load_meta() before build_model()')
    return heads.SequenceClassifier(enc_cfg, len(self.labels), pooling=self.config.classify.pooling,
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
    out = {'majority_accuracy': metrics_lib.accuracy(gold, pred),
           'majority_macro_f1': metrics_lib.macro_f1(gold, pred, len(self.labels))}
    k = self.positive_id()
    if k is not None:
      out['majority_f1'] = metrics_lib.class_f1(gold, pred, len(self.labels), k)
    return out

  def final_text(self, record):
    found = metrics_lib.final_split(record)
    if found is None:
      return None
    split, m = found
    line = f'{split} split: accuracy {m["accuracy"]:.4f} | macro-F1 {m.get("macro_f1", 0.0):.4f}'
    if 'mcc' in m:
      line += f' | MCC {m["mcc"]:.4f}'
    if 'f1' in m:
      line += f' | F1 {m["f1"]:.4f}'
    if 'baseline/majority_accuracy' in record:
      line += (f'   (majority class: accuracy {record["baseline/majority_accuracy"]:.4f}, '
               f'macro-F1 {record["baseline/majority_macro_f1"]:.4f})')
    lines = [line]
    if isinstance(m.get('per_class'), dict):
      lines += metrics_lib.class_table(m['per_class'])
    return '\n'.join(lines)

  def predict(self, graphdef, params, mode, inputs, top_k=0):
    """Returns per input (a text; pairs: (a, b) or 'a<TAB>b') the top_k (label, probability)."""
    if mode != 'classify':
      return super().predict(graphdef, params, mode, inputs, top_k)
    if not inputs:
      return []
    columns = self.encode_inputs(inputs)
    width = int(self.config.train.seq_len)
    types = columns[:, width:] if self.pair else None
    probs = self.probabilities(graphdef, params, columns[:, :width], types)
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
