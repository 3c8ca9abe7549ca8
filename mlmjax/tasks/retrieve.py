"""Retrieval: find each query's document among a split's documents with a dual encoder.

Rows are int32 (N, 2 * seq_len): the query's tokens ([CLS] pieces [SEP] PAD...) in columns
[0, seq_len), its document's tokens (same layout) in [seq_len, 2 * seq_len). A row whose first token
is PAD is padding. Fields: task_data.query_field, document_field; splits hash id_field (group_field
when set, the content when id_field is ''), as every task does (task_data.split_rows).

Training: one shared encoder embeds queries and documents (heads.DualEncoder), both L2-normalized;
the loss is InfoNCE with in-batch negatives: softmax cross-entropy over cosine / temperature, the
row's own document as the target and the batch's other documents as negatives. A document whose
tokens equal the target's (the same verse text twice in a batch) is no negative: it is dropped from
that row's softmax. With train.grad_accum_steps k > 1 each microbatch is its own batch: a row's
negatives are the other rows of its microbatch (batch_size / k - 1 of them), not of the whole step.

Evaluation ranks every query of the split against the split's distinct documents (documents with
identical tokens are one candidate, so duplicates never compete with each other); with
retrieve.num_candidates = N > 0 each query ranks its document among N candidates: its own and the
first N - 1 other distinct documents of the split (in file order). Scores are cosines in float64.
Ties count against the query: rank = 1 + the number of other candidates scoring at least the gold
score minus TIE_TOL, so a model mapping everything to one vector gets rank = num_candidates, not 1.
Metrics: recall_at_1, recall_at_10 (gold rank <= k), mrr (mean 1 / rank), num_candidates, and
'loss', the in-batch loss over the split in order in batches of eval.batch_size (comparable between
runs with the same eval.batch_size and retrieve.temperature).

Baseline (baselines()): TF-IDF cosine between the query and document words (lowercased \\w+ runs,
tf = 1 + log(count), idf = log((1 + D) / (1 + df)) + 1 over the D candidate documents), ranked the
same way over the same candidates of the test split, reported as overlap_recall_at_1,
overlap_recall_at_10, overlap_mrr. It reads the full texts, which the model sees cut to seq_len.
"""

import collections
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from flax import nnx

from mlmjax import corpus, heads, input_pipeline
from mlmjax.tasks import task_data
from mlmjax.tasks.base import Task, TaskData

PAD_ID = task_data.PAD_ID  # the sentencepiece layout's; the task passes its tokenizer's pad_id
# Cosines within this of the gold score count as ties (against the gold): float32 embeddings carry
# ~1e-7 relative rounding, so documents with equal scores in exact arithmetic land within ~1e-7.
TIE_TOL = 1e-6
_CHUNK = 1024  # queries scored at a time, bounding the (chunk, candidates) float64 score matrix
_WORD = re.compile(r'\w+')


# ---------------------------------------------------------------------------------------------
# Loss and ranking (pure functions: the tests check them against numpy)


def normalize(x: jax.Array) -> jax.Array:
  """Returns x (B, H) with unit L2 rows (a zero row stays zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def in_batch_sums(q: jax.Array, d: jax.Array, q_tokens: jax.Array, d_tokens: jax.Array,
                  temperature: float, pad_id: int = PAD_ID
                  ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Returns (loss_sum, weight, sums) of InfoNCE with in-batch negatives over the valid rows.

  q, d: (B, H) embeddings; q_tokens, d_tokens: (B, L) their token rows (row valid: q_tokens[:, 0]
  != pad_id, the tokenizer's). Row i's negatives are the valid documents j != i whose tokens differ
  from document i's.
  sums: 'loss_sum', 'weight' (valid rows), 'correct' (gold strictly above every negative),
  'negatives' (negatives summed over valid rows).
  """
  b = q.shape[0]
  valid = q_tokens[:, 0] != pad_id
  scores = (normalize(q) @ normalize(d).T) / temperature
  same_doc = jnp.all(d_tokens[:, None, :] == d_tokens[None, :, :], axis=-1)
  negative = valid[None, :] & ~same_doc
  eye = jnp.eye(b, dtype=bool)
  gold = jnp.diagonal(scores)
  lse = jax.nn.logsumexp(jnp.where(negative | eye, scores, -jnp.inf), axis=1)
  per_row = jnp.where(valid, lse - gold, 0.0)
  best_negative = jnp.max(jnp.where(negative, scores, -jnp.inf), axis=1)
  weight = valid.sum().astype(jnp.float32)
  loss_sum = per_row.sum()
  sums = {'loss_sum': loss_sum, 'weight': weight,
          'correct': (valid & (gold > best_negative)).sum().astype(jnp.float32),
          'negatives': jnp.where(valid, negative.sum(1), 0).sum().astype(jnp.float32)}
  return loss_sum, weight, sums


def gold_ranks(scores, gold, num_candidates: int = 0, tol: float = TIE_TOL) -> np.ndarray:
  """Returns int64 (Q,) 1-based ranks of each query's gold column in scores (Q, C), ties against it.

  A query's distractors are the columns j != gold[q] with j < N (num_candidates, 0 = all C), or
  j < N - 1 when gold[q] >= N, so every query ranks among exactly min(N, C) candidates. Rank = 1 +
  the number of distractors scoring >= gold score - tol.
  """
  scores = np.asarray(scores)
  gold = np.asarray(gold, np.int64)
  q, c = scores.shape
  n = c if num_candidates <= 0 else min(num_candidates, c)
  gold_score = scores[np.arange(q), gold]
  cols = np.arange(c)
  limit = np.where(gold < n, n, n - 1)
  counted = (cols[None, :] < limit[:, None]) & (cols[None, :] != gold[:, None])
  beats = counted & (scores >= gold_score[:, None] - tol)
  return 1 + beats.sum(1).astype(np.int64)


def rank_queries(queries, candidates, gold, num_candidates: int = 0) -> tuple[np.ndarray, int]:
  """Returns (ranks (Q,), candidates per query): gold_ranks of queries @ candidates.T, in chunks.

  queries (Q, H) and candidates (C, H) are numpy arrays or scipy sparse matrices (rows already
  normalized when the score is a cosine).
  """
  gold = np.asarray(gold, np.int64)
  num_q, c = queries.shape[0], candidates.shape[0]
  n = c if num_candidates <= 0 else min(num_candidates, c)
  ranks = np.zeros(num_q, np.int64)
  for start in range(0, num_q, _CHUNK):
    scores = queries[start:start + _CHUNK] @ candidates.T
    if scipy.sparse.issparse(scores):
      scores = scores.toarray()
    ranks[start:start + _CHUNK] = gold_ranks(np.asarray(scores), gold[start:start + _CHUNK], n)
  return ranks, n


def ranking_metrics(ranks, prefix: str = '') -> dict[str, float]:
  """Returns {prefix}recall_at_1, recall_at_10 and mrr of 1-based ranks; zeros without ranks."""
  ranks = np.asarray(ranks, np.float64)
  if not ranks.size:
    return {f'{prefix}recall_at_1': 0.0, f'{prefix}recall_at_10': 0.0, f'{prefix}mrr': 0.0}
  return {f'{prefix}recall_at_1': float(np.mean(ranks <= 1)),
          f'{prefix}recall_at_10': float(np.mean(ranks <= 10)),
          f'{prefix}mrr': float(np.mean(1.0 / ranks))}


def distinct_documents(doc_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns (first row index of each distinct token row, in order; (N,) each row's distinct id)."""
  ids, firsts, gold = {}, [], np.zeros(len(doc_rows), np.int64)
  for i, row in enumerate(np.ascontiguousarray(doc_rows)):
    k = ids.setdefault(row.tobytes(), len(ids))
    if k == len(firsts):
      firsts.append(i)
    gold[i] = k
  return np.asarray(firsts, np.int64), gold


def unit_rows(x: np.ndarray) -> np.ndarray:
  """Returns float64 x with unit L2 rows (a zero row stays zero)."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _word_counts(text: str) -> collections.Counter:
  return collections.Counter(_WORD.findall(corpus.clean_document(text).lower()))


def tfidf_ranks(query_texts, doc_texts, gold, num_candidates: int = 0) -> tuple[np.ndarray, int]:
  """Returns (ranks, candidates per query) of the gold document by TF-IDF cosine (module doc)."""
  docs = [_word_counts(t) for t in doc_texts]
  vocab = {w: k for k, w in enumerate(sorted(set().union(*docs)))} if docs else {}
  df = np.zeros(len(vocab))
  for counts in docs:
    for w in counts:
      df[vocab[w]] += 1
  idf = np.log((1.0 + len(docs)) / (1.0 + df)) + 1.0
  unseen_idf = math.log(1.0 + len(docs)) + 1.0

  def matrix(counts_list):
    r, c, v = [], [], []
    norms = []
    for i, counts in enumerate(counts_list):
      sq = 0.0
      for w, n in counts.items():
        # Words absent from every document add to the query's norm only, so they are left out;
        # a query's scale does not change its ranking.
        weight = (1.0 + math.log(n)) * (idf[vocab[w]] if w in vocab else unseen_idf)
        sq += weight * weight
        if w in vocab:
          r.append(i)
          c.append(vocab[w])
          v.append(weight)
      norms.append(math.sqrt(sq) or 1.0)
    m = scipy.sparse.csr_matrix((v, (r, c)), shape=(len(counts_list), len(vocab)))
    return scipy.sparse.diags(1.0 / np.asarray(norms)) @ m

  queries = matrix([_word_counts(t) for t in query_texts])
  return rank_queries(queries.tocsr(), matrix(docs).tocsr(), gold, num_candidates)


# ---------------------------------------------------------------------------------------------
# The task


class RetrieveTask(Task):
  """Query -> document retrieval with a dual encoder and in-batch negatives (module doc)."""

  name = 'retrieve'
  best_metric = 'mrr'
  best_mode = 'max'
  sequences_per_row = 2  # a query and a document, each seq_len tokens
  progress_metrics = (('train/loss', 'loss', '.4f'), ('train/accuracy', 'in-batch acc', '.4f'),
                      ('train/negatives', 'negatives', '.0f'), ('train/lr', 'lr', '.2e'))
  eval_metrics = (('loss', 'loss', '.4f'), ('recall_at_1', 'R@1', '.4f'),
                  ('recall_at_10', 'R@10', '.4f'), ('mrr', 'MRR', '.4f'),
                  ('num_queries', 'queries', '.0f'), ('num_candidates', 'candidates', '.0f'))

  def __init__(self, config, tokenizer=None, log: Callable[[str], None] = print):
    super().__init__(config, tokenizer, log)
    r = config.retrieve
    if r.pooling not in heads.POOLINGS:
      raise ValueError(f'retrieve.pooling: {r.pooling!r} is not supported; use one of '
                       f'{list(heads.POOLINGS)}')
    if not float(r.temperature) > 0:
      raise ValueError(f'retrieve.temperature={r.temperature} must be > 0')
    if int(r.num_candidates) < 0:
      raise ValueError(f'retrieve.num_candidates={r.num_candidates} must be >= 0 (0 = all)')
    self.seq_len = int(config.train.seq_len)
    self.temperature = float(r.temperature)
    self.num_candidates = int(r.num_candidates)
    self.rows: dict[str, np.ndarray] = {}
    self.texts: dict[str, tuple[list[str], list[str]]] = {}  # split -> (queries, documents)
    self._eval_fns: dict[Any, Callable] = {}

  @property
  def embed_pooling(self) -> str:
    return str(self.config.retrieve.pooling)

  def embedding(self, m, ids, pooling):
    """Returns the dual encoder's own embedding for its pooling, else the pooled encoder output."""
    if pooling == self.embed_pooling:
      return m(ids)
    return super().embedding(m, ids, pooling)

  def unlabeled_texts(self, row: dict, i: int, path: str) -> list[str]:
    """Returns [query, document]."""
    td = self.config.task_data
    return [task_data.text_field(row, td.query_field, i, path, key='query_field'),
            task_data.text_field(row, td.document_field, i, path, key='document_field')]

  def prepare(self, workdir) -> TaskData:
    self.load_tokenizer(workdir)  # tokenizing a few ten thousand pairs takes seconds: nothing is cached
    td = self.config.task_data
    path = str(td.path)
    examples = task_data.load_examples(self.config)  # tfds: reads data.tfds_* too
    queries = [task_data.text_field(r, td.query_field, i, path, key='query_field')
               for i, r in enumerate(examples, 1)]
    documents = [task_data.text_field(r, td.document_field, i, path, key='document_field')
                 for i, r in enumerate(examples, 1)]
    splits = np.asarray(task_data.split_rows(examples, path, td))
    width = 2 * self.seq_len
    stats = {'task': self.name, 'source': path, 'examples': len(examples),
             'fields': {'query': td.query_field, 'document': td.document_field,
                        'split_key': td.group_field or td.id_field or '(content)'},
             'seq_len': self.seq_len, 'row_width': width,
             'counts': task_data.split_counts(splits), 'distinct_documents': {},
             'truncated_queries': {}, 'truncated_documents': {}, 'pieces_dropped': {}}
    for split in task_data.SPLITS:
      idx = np.flatnonzero(splits == split)
      q_stats, d_stats = {}, {}
      q_rows = task_data.encode_texts(self.tokenizer, [queries[i] for i in idx], self.seq_len,
                                      stats=q_stats)
      d_rows = task_data.encode_texts(self.tokenizer, [documents[i] for i in idx], self.seq_len,
                                      stats=d_stats)
      self.rows[split] = np.concatenate([q_rows, d_rows], axis=1).astype(np.int32)
      self.texts[split] = ([queries[i] for i in idx], [documents[i] for i in idx])
      stats['distinct_documents'][split] = int(len(distinct_documents(d_rows)[0]))
      stats['truncated_queries'][split] = int(q_stats.get('truncated', 0))
      stats['truncated_documents'][split] = int(d_stats.get('truncated', 0))
      stats['pieces_dropped'][split] = int(q_stats.get('pieces_dropped', 0)
                                           + d_stats.get('pieces_dropped', 0))
    if not len(self.rows['train']):
      raise ValueError(f'task_data: no training examples in {path} (check task_data.val_fraction '
                       'and task_data.test_fraction)')
    self.log(f'retrieve: {len(examples)} pairs from {path}: ' + ', '.join(
        f'{s} {stats["counts"][s]} ({stats["distinct_documents"][s]} distinct documents)'
        for s in task_data.SPLITS) + f' | cut to {self.seq_len} tokens: '
        f'{sum(stats["truncated_queries"].values())} queries, '
        f'{sum(stats["truncated_documents"].values())} documents')
    key = task_data.digest(*(self.rows[s] for s in task_data.SPLITS))
    return TaskData(train=self.rows['train'], val=self.rows['val'], test=self.rows['test'],
                    stats=stats, key=key)

  def build_model(self, enc_cfg, rngs):
    return heads.DualEncoder(enc_cfg, pooling=self.config.retrieve.pooling, **self.layout_ids(),
                             rngs=rngs)

  def _split_halves(self, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    if rows.shape[-1] != 2 * self.seq_len:
      raise ValueError(f'retrieve: rows are {rows.shape[-1]} wide, expected 2 * train.seq_len = '
                       f'{2 * self.seq_len}')
    return rows[:, :self.seq_len], rows[:, self.seq_len:]

  def batch_loss(self, m, rows, mask_key, drop_key, step):
    """Returns (loss_sum, weight, sums) of InfoNCE over this (micro)batch's rows (module doc).

    Negatives come from the rows passed in: under gradient accumulation, the microbatch only.
    """
    del mask_key, step
    q_tokens, d_tokens = self._split_halves(rows)
    q = m(q_tokens, dropout_rng=None if drop_key is None else jax.random.fold_in(drop_key, 0))
    d = m(d_tokens, dropout_rng=None if drop_key is None else jax.random.fold_in(drop_key, 1))
    return in_batch_sums(q, d, q_tokens, d_tokens, self.temperature, self.layout_ids()['pad_id'])

  def window_record(self, sums):
    w = max(float(sums['weight']), 1.0)
    return {'train/loss': float(sums['loss_sum']) / w, 'train/accuracy': float(sums['correct']) / w,
            'train/negatives': float(sums['negatives']) / w}

  def _eval_fn(self, graphdef) -> Callable:
    """Returns the jitted (params, rows) -> (q, d, [loss_sum, weight, correct]) of a graphdef."""
    if graphdef not in self._eval_fns:
      pad_id = self.layout_ids()['pad_id']

      def forward(params, rows):
        m = nnx.merge(graphdef, params)
        q_tokens, d_tokens = self._split_halves(rows)
        q, d = m(q_tokens), m(d_tokens)
        _, _, sums = in_batch_sums(q, d, q_tokens, d_tokens, self.temperature, pad_id)
        return q, d, jnp.stack([sums['loss_sum'], sums['weight'], sums['correct']])

      self._eval_fns[graphdef] = jax.jit(forward)
    return self._eval_fns[graphdef]

  def _split_rows(self, split: str) -> np.ndarray:
    if split not in self.rows:
      raise ValueError(f'retrieve: split {split!r} is not prepared (call prepare first; splits: '
                       f'{list(self.rows) or "none"})')
    return self.rows[split]

  def evaluate(self, graphdef, params, split, to_device):
    """Returns recall_at_1, recall_at_10, mrr, num_candidates, loss, ... on 'val' or 'test'."""
    rows = self._split_rows(split)
    if not len(rows):
      return {}
    fn, pad_id = self._eval_fn(graphdef), self.layout_ids()['pad_id']
    q_parts, d_parts, totals = [], [], np.zeros(3)
    for batch in input_pipeline.eval_batches(rows, batch_size=int(self.config.eval.batch_size),
                                             pad_id=pad_id):
      q, d, sums = fn(params, to_device(batch))
      valid = batch[:, 0] != pad_id  # the padding rows of the last batch are all PAD
      q_parts.append(task_data.to_host(q)[valid])
      d_parts.append(task_data.to_host(d)[valid])
      totals += task_data.to_host(sums).reshape(-1)[:3]
    firsts, gold = distinct_documents(rows[:, self.seq_len:])
    candidates = unit_rows(np.concatenate(d_parts))[firsts]
    ranks, n = rank_queries(unit_rows(np.concatenate(q_parts)), candidates, gold,
                            self.num_candidates)
    loss_sum, weight, correct = totals
    return {**ranking_metrics(ranks), 'num_candidates': float(n), 'num_queries': float(len(ranks)),
            'loss': float(loss_sum / max(weight, 1.0)),
            'in_batch_accuracy': float(correct / max(weight, 1.0))}

  def baselines(self):
    """Returns overlap_recall_at_1, _at_10 and overlap_mrr of TF-IDF on test (val when empty)."""
    split = next((s for s in ('test', 'val') if len(self.rows.get(s, ()))), None)
    if split is None:
      return {}
    queries, documents = self.texts[split]
    firsts, gold = distinct_documents(self.rows[split][:, self.seq_len:])
    ranks, _ = tfidf_ranks(queries, [documents[i] for i in firsts], gold, self.num_candidates)
    return ranking_metrics(ranks, prefix='overlap_')

  def final_text(self, record):
    for split, prefix in (('test', 'test/'), ('validation', 'eval/')):
      if f'{prefix}mrr' in record:
        break
    else:
      return None
    names = (('recall@1', 'recall_at_1'), ('recall@10', 'recall_at_10'), ('MRR', 'mrr'))
    lines = [f'retrieval on the {split} split ({int(record.get(f"{prefix}num_queries", 0))} '
             f'queries, {int(record.get(f"{prefix}num_candidates", 0))} candidates each):',
             f'  {"":10}  {"model":>7}  {"TF-IDF":>7}']
    for label, key in names:
      base = record.get(f'baseline/overlap_{key}')
      base_text = f'{base:7.4f}' if base is not None else f'{"-":>7}'
      lines.append(f'  {label:10}  {record[f"{prefix}{key}"]:7.4f}  {base_text}')
    lines.append(f'  in-batch loss {record[f"{prefix}loss"]:.4f} (eval.batch_size '
                 f'{self.config.eval.batch_size}, temperature {self.temperature})')
    return '\n'.join(lines)
