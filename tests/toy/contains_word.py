"""A toy task defined outside mlmjax: does a sentence contain the word 'alpha'?

Configured as config.task = 'tests.toy.contains_word:ContainsWordTask'; no file of mlmjax/ knows it.
Sentences are drawn from a fixed word list with a seeded generator; the label column follows the
tokens: rows are (N, seq_len + 1) int32.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlmjax import heads, losses
from mlmjax.tasks import base
from mlmjax.tasks import task_data

WORDS = ('alpha', 'beta', 'gamma', 'delta', 'river', 'stone', 'cloud', 'paper')


def sentences(n: int, seed: int) -> tuple[list[str], np.ndarray]:
  """Returns n sentences of 3-8 words and whether each contains 'alpha' (about half do)."""
  rng = np.random.default_rng(seed)
  texts, labels = [], []
  for _ in range(n):
    words = list(rng.choice(WORDS[1:], size=rng.integers(3, 9)))
    if rng.random() < 0.5:
      words[rng.integers(len(words))] = 'alpha'
    texts.append(' '.join(words))
    labels.append(int('alpha' in words))
  return texts, np.array(labels, np.int32)


class ContainsWordTask(base.Task):
  """Binary classification of synthetic sentences, with a mean-pooled linear head."""

  name = 'contains_word'
  best_metric = 'accuracy'
  best_mode = 'max'
  eval_metrics = (('loss', 'loss', '.4f'), ('accuracy', 'acc', '.4f'))
  predict_modes = ('contains',)

  def row_width(self) -> int:
    return int(self.config.train.seq_len) + 1

  def prepare(self, workdir) -> base.TaskData:
    self.load_tokenizer(workdir)
    seq_len = int(self.config.train.seq_len)
    splits = {}
    for split, (n, seed) in {'train': (256, 0), 'val': (64, 1), 'test': (64, 2)}.items():
      texts, labels = sentences(n, seed)
      tokens = task_data.encode_texts(self.tokenizer, texts, seq_len)
      splits[split] = np.concatenate([tokens, labels[:, None]], axis=1)
    self.splits = splits
    return base.TaskData(**splits, stats={'labels': ['no', 'yes']},
                         key=task_data.digest(*splits.values()))

  def build_model(self, enc_cfg, rngs):
    return heads.SequenceClassifier(enc_cfg, 2, pooling='mean', rngs=rngs)

  def batch_loss(self, m, rows, mask_key, drop_key, step):
    del mask_key, step
    logits = m(rows[:, :-1], dropout_rng=drop_key)
    weights = (rows[:, 0] != 0).astype(jnp.float32)
    loss_sum, weight = losses.cross_entropy_sum(logits, rows[:, -1], weights)
    correct, _ = losses.accuracy_sum(logits, rows[:, -1], weights)
    return loss_sum, weight, {'loss_sum': loss_sum, 'weight': weight, 'correct': correct}

  def window_record(self, sums):
    w = max(sums['weight'], 1.0)
    return {'train/loss': sums['loss_sum'] / w, 'train/accuracy': sums['correct'] / w}

  def evaluate(self, graphdef, params, split, to_device):
    rows = self.splits[split]
    logits, = task_data.collect(
        lambda g, p, batch: (nnx.merge(g, p)(batch[:, :-1]),), graphdef, params, rows,
        int(self.config.eval.batch_size), to_device)
    nll = jax.nn.logsumexp(logits, -1) - np.take_along_axis(logits, rows[:, -1:], -1)[:, 0]
    return {'loss': float(nll.mean()), 'accuracy': float((logits.argmax(-1) == rows[:, -1]).mean())}

  def predict(self, graphdef, params, mode, inputs, top_k=0):
    if mode != 'contains':
      return super().predict(graphdef, params, mode, inputs, top_k)
    logits = base.batched(lambda ids: nnx.merge(graphdef, params)(ids), self.encode_texts(inputs))
    return [float(p) for p in jax.nn.softmax(logits, -1)[:, 1]]
