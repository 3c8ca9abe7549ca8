"""The MLM task: dynamic masking inside the step, validation at fixed masks beside n-gram baselines.

Rows are packed token rows (N, seq_len) from the token cache. With eval.other_corpus set (domain-
adaptive MLM), a second corpus's held-out rows are evaluated too, logged as eval_<other_name>/...;
with data.mixture, each source's rows of the pooled validation as eval/<source>/... The n-gram
baselines and the PMI vocabulary count a sample of data.side_table_tokens / seq_len training rows.
"""

import copy
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlmjax import corpus, input_pipeline, losses, masking, model, pmi, tokenizer_report
from mlmjax import shards, train_step
from mlmjax import tokenizer as tokenizer_lib
from mlmjax.tasks import mlm_eval, texts
from mlmjax.tasks.base import Task, TaskData


def make_batch_loss(spec: masking.MaskingSpec, *, cls_id: int = tokenizer_lib.CLS_ID,
                    rate_schedule: masking.RateSchedule | None = None,
                    tables: masking.MaskingTables | None = None, z_loss: float = 0.0,
                    seed: int = 0) -> Callable:
  """Returns batch_loss(model, rows, mask_key, drop_key, step) -> (loss_sum, weight, metric sums).

  seed: the run's seed, from which static masks (spec.static_patterns > 0) are drawn.
  z_loss > 0 adds z_loss * sum of weighted logsumexp(logits)^2 to loss_sum (so the objective
  gains z_loss times its mean over predicted positions) and reports that term as z_loss_sum.
  """

  def batch_loss(m, rows, mask_key, drop_key, step):
    rate = None if rate_schedule is None else rate_schedule(step)
    mb = masking.mask_batch(mask_key, rows, spec, seed=seed, rate=rate, tables=tables)
    # Unit layout from the uncorrupted rows: positions restart and attention stops at each [CLS].
    position_ids, doc_ids = model.packed_layout(rows, cls_id=cls_id, pad_id=spec.pad_id)
    logits = m(mb.inputs, mb.positions, position_ids=position_ids, doc_ids=doc_ids,
               dropout_rng=drop_key)
    loss_sum, weight = losses.cross_entropy_sum(logits, mb.labels, mb.weights)
    sums = losses.mlm_metric_sums(logits, mb.labels, mb.weights, mb.kinds)
    sums['selected'] = sums['weight']
    if z_loss > 0:
      z_sum = z_loss * losses.z_loss_sum(logits, mb.weights)[0]
      loss_sum = loss_sum + z_sum
      sums['z_loss_sum'] = z_sum
    return loss_sum, weight, sums

  return batch_loss


def make_step_sums(spec: masking.MaskingSpec,
                   rate_schedule: masking.RateSchedule | None = None) -> Callable:
  """Returns step_sums(rows, step): the rate in force and the maskable tokens of the whole batch."""

  def step_sums(rows, step):
    candidates = rows >= spec.first_regular_id
    if spec.special_ids:
      candidates &= ~jnp.isin(rows, jnp.asarray(spec.special_ids, jnp.int32))
    rate = spec.rate if rate_schedule is None else rate_schedule(step)
    return {'mask_rate_sum': jnp.asarray(rate, jnp.float32),
            'candidates': candidates.sum().astype(jnp.float32)}

  return step_sums


def make_train_step(graphdef, tx, spec: masking.MaskingSpec, schedule, dropout: bool,
                    cls_id: int = tokenizer_lib.CLS_ID, *,
                    rate_schedule: masking.RateSchedule | None = None,
                    tables: masking.MaskingTables | None = None,
                    grad_accum_steps: int = 1, z_loss: float = 0.0) -> Callable:
  """Returns the MLM train_step(state, tokens, seed_key) -> (state, metric sums) (see make_step).

  rate_schedule: the masking rate at each step (None: spec.rate); tables: for unit strategies;
  z_loss: the z-loss coefficient (make_batch_loss).
  Masks come from fold_in(key, step); with grad_accum_steps k > 1, microbatch i is masked from
  fold_in(mask_key, i), so its masks differ from the k = 1 step's.
  """
  return train_step.make_step(
      graphdef, tx, schedule,
      make_batch_loss(spec, cls_id=cls_id, rate_schedule=rate_schedule, tables=tables,
                      z_loss=z_loss),
      step_sums=make_step_sums(spec, rate_schedule), dropout=dropout,
      grad_accum_steps=grad_accum_steps)


def eval_spec_from(config, vocab_size: int, tokenizer=None) -> masking.MaskingSpec:
  """Returns the fixed evaluation masking: eval.rate and eval.split, token by token, exact."""
  seq_len = config.train.seq_len
  specials = {} if tokenizer is None else masking.special_fields(
      tokenizer.special_mask, mask_id=tokenizer.mask_id, pad_id=tokenizer.pad_id)
  return masking.MaskingSpec(
      vocab_size=vocab_size, rate=float(config.eval.rate), split=tuple(config.eval.split),
      max_predictions=masking.default_max_predictions(float(config.eval.rate), seq_len, 'exact'),
      selection='exact', **specials)


def describe_rate(r: masking.RateSchedule) -> str:
  """Returns the rate schedule in a few words for the log."""
  if r.kind == 'constant':
    return f'{r.start}'
  if r.kind == 'step':
    return f'step {r.values} at {r.boundaries}'
  return f'{r.kind} {r.start} -> {r.end} over {r.steps} steps'


class MlmTask(Task):
  """Masked-language modelling on the token cache (pretraining and domain-adaptive MLM)."""

  name = 'mlm'
  best_metric = 'loss'
  best_mode = 'min'
  keeps_best = False  # pretraining keeps best/ only with early stopping
  progress_metrics = (('train/loss', 'loss', '.4f'), ('train/accuracy', 'acc', '.4f'),
                      ('train/lr', 'lr', '.2e'), ('train/mask_rate', 'mask rate', '.3f'))
  predict_modes = ('fill_mask',)

  def __init__(self, config, tokenizer=None, log=print, *, cache=None):
    super().__init__(config, tokenizer, log)
    self.cache = cache
    self.rate_schedule = masking.rate_schedule_from_config(config.masking, config.train.num_steps)
    self.spec = self.eval_spec = self.tables = None
    self.val_batches = []
    self.other = None  # (name, val batches, unigram, successor) of eval.other_corpus
    # data.mixture: the sources' names and, per validation batch, each row's source (-1: padding)
    self.sources = shards.mixture_names(config.data.mixture) if config.data.mixture else []
    self.val_groups = None
    self.side_sample = None  # what the n-gram baselines and PMI counted (shards.sample_rows)
    self.eval_metrics = self._eval_metrics()
    if tokenizer is not None:
      self._build_specs()

  def _build_specs(self, vocab_size: int | None = None) -> None:
    """Builds the training and evaluation masking specs (from the tokenizer's ids when known)."""
    config, tok = self.config, self.tokenizer
    vocab = tok.vocab_size if tok is not None else int(vocab_size)
    self.spec = masking.spec_from_config(config.masking, vocab_size=vocab,
                                         seq_len=config.train.seq_len, tokenizer=tok,
                                         num_steps=config.train.num_steps)
    self.eval_spec = eval_spec_from(config, vocab, tok)

  def _eval_metrics(self):
    declared = [('loss', 'loss', '.4f'), ('accuracy', 'acc', '.4f'),
                ('accuracy_at_mask', 'acc@[MASK]', '.4f'),
                ('baseline/unigram_accuracy_at_mask', 'unigram', '.4f'),
                ('baseline/bigram_accuracy_at_mask', 'bigram', '.4f'),
                ('accuracy_at_random', 'acc@random', '.4f'), ('accuracy_at_keep', 'acc@keep', '.4f')]
    if self.config.eval.other_corpus:
      n = self.config.eval.other_name
      declared += [(f'eval_{n}/loss', f'{n}: loss', '.4f'),
                   (f'eval_{n}/accuracy_at_mask', f'{n}: acc@[MASK]', '.4f')]
    declared += [(f'eval/{n}/loss', f'{n}: loss', '.4f') for n in self.sources]
    return tuple(declared)

  def load_tokenizer(self, workdir) -> None:
    """MLM trains a tokenizer on its corpus when there is none: prepare() does it all."""
    del workdir

  def prepare(self, workdir) -> TaskData:
    config = self.config
    if self.cache is None and (config.data.prepared or config.data.mixture):
      prepared = shards.prepared_data(config, workdir, log=self.log, adapt=self.adapt)
      self.tokenizer, self.cache = prepared.tokenizer, prepared.cache
    elif self.cache is None:
      exclude = texts.eval_texts(config.data.decontaminate.configs)
      prepared = input_pipeline.prepare_data(config, workdir, exclude_texts=exclude, log=self.log,
                                             adapt=self.adapt)
      self.tokenizer, self.cache = prepared.tokenizer, prepared.cache
    self._build_specs()
    cache = self.cache
    sample, self.side_sample = self._side_sample(cache.train_rows)
    pmi_vocab = None
    if self.spec.strategy == 'pmi':
      pmi_vocab = pmi.load_or_build_pmi_vocab(
          input_pipeline.cache_root(config.data), cache.key, sample,
          self.tokenizer.special_mask, min_count=config.masking.pmi.min_count,
          size=config.masking.pmi.vocab_size, sample=self.side_sample, log=self.log)
    self.tables = masking.tables_for(self.spec, self.tokenizer, pmi_vocab)
    self.val_batches = input_pipeline.eval_batches(cache.val_rows, batch_size=config.eval.batch_size,
                                                   num_batches=config.eval.num_batches,
                                                   pad_id=self.tokenizer.pad_id)
    if not self.val_batches:
      self.log('WARNING: the validation split is empty; evaluation is skipped (raise data.val_fraction)')
    else:
      self._log_fit('validation', cache.val_rows)
      if isinstance(cache.val_rows, shards.Interleaved):  # data.mixture: self.sources are its names
        self.val_groups = self._source_groups(cache.val_rows.sources)
    self.unigram, self.successor = mlm_eval.baseline_tables(
        sample, self.tokenizer.vocab_size, self.tokenizer.special_mask)
    del sample
    if config.eval.other_corpus:
      self.other = self._prepare_other(workdir, config.eval.other_corpus)
    return TaskData(train=cache.train_rows, val=cache.val_rows,
                    test=np.zeros((0, cache.train_rows.shape[1]), np.int32),
                    stats={**cache.stats, 'side_tables': self.side_sample}, key=cache.key)

  def _side_sample(self, rows, what: str = 'n-gram baselines') -> tuple[np.ndarray, dict]:
    """Returns (data.side_table_tokens // seq_len of rows drawn from the seed, what was drawn)."""
    budget = int(self.config.data.side_table_tokens)
    sample, info = shards.sample_rows(rows, budget and max(1, budget // rows.shape[1]),
                                      int(self.config.seed), pad_id=self.tokenizer.pad_id)
    if self.spec.strategy == 'pmi' and what == 'n-gram baselines':
      what += ' and PMI vocabulary'
    self.log(f'{what}: {shards.describe_sample(info)}; '
             f'data.side_table_tokens={budget:,}')
    return sample, info

  def _source_groups(self, sources: np.ndarray) -> list[np.ndarray]:
    """Returns each validation row's source per eval batch; logs the rows each source gets."""
    e = self.config.eval
    groups = mlm_eval.row_groups(sources, batch_size=e.batch_size, num_batches=e.num_batches)
    seen = np.bincount(np.concatenate(groups) + 1, minlength=len(self.sources) + 1)[1:]
    self.log('validation rows per source (interleaved): ' +
             ', '.join(f'{n} {k:,}' for n, k in zip(self.sources, seen.tolist())))
    return groups

  def prepare_shapes(self) -> None:
    """Specs from the tokenizer (or tokenizer.vocab_size), tables as same-shape stand-ins."""
    self._build_specs(self.config.tokenizer.vocab_size)
    vocab = self.spec.vocab_size
    # The tokenizer's word starts and the corpus's PMI n-grams are not built here; zeros of their
    # shapes compile the same step.
    word_start = pmi_hashes = None
    if masking.needs_word_starts(self.spec):
      word_start = jnp.zeros((vocab,), bool)
    if self.spec.strategy == 'pmi':
      pmi_hashes = jnp.zeros((int(self.config.masking.pmi.vocab_size),), jnp.uint32)
    self.tables = masking.MaskingTables(word_start=word_start, pmi_hash1=pmi_hashes,
                                        pmi_hash2=pmi_hashes)

  def load_meta(self, stats: dict) -> None:
    del stats
    self._build_specs()

  def _log_fit(self, what: str, rows) -> None:
    """Logs how the tokenizer cuts `rows` (python -m mlmjax.tokenizer_report has the full report)."""
    f = tokenizer_report.rows_figures(self.tokenizer, rows)
    self.log(f'tokenizer on {what}: {f["fertility"]:.3f} pieces per word, '
             f'{100 * f["split_share"]:.1f}% of words split, byte fallback '
             f'{100 * f["byte_fallback_rate"]:.2f}%, [UNK] {100 * f["unk_rate"]:.2f}%')

  def _prepare_other(self, workdir, corpus_name: str):
    """Returns (name, val batches, unigram, successor) of a second corpus, same tokenizer and packing."""
    config = self.config
    other_cfg = copy.deepcopy(config)
    other_cfg.data.corpus = corpus_name
    name = config.eval.other_name
    self.log(f'second validation corpus ({name}): {corpus_name}')
    # The workdir already holds this run's tokenizer, so the second corpus is cut into the same pieces.
    data = input_pipeline.prepare_data(other_cfg, workdir, log=self.log)
    batches = input_pipeline.eval_batches(data.cache.val_rows, batch_size=config.eval.batch_size,
                                          num_batches=config.eval.num_batches,
                                          pad_id=self.tokenizer.pad_id)
    if not batches:
      raise ValueError(f'eval.other_corpus={corpus_name!r}: its validation split is empty')
    self._log_fit(f'{name} validation', data.cache.val_rows)
    sample, _ = self._side_sample(data.cache.train_rows, f'{name} n-gram baselines')
    unigram, successor = mlm_eval.baseline_tables(sample, self.tokenizer.vocab_size,
                                                  self.tokenizer.special_mask)
    return name, batches, unigram, successor

  def build_model(self, enc_cfg, rngs):
    return model.BertForMLM(enc_cfg, rngs=rngs)

  def transfer(self, pretrained: dict, fresh: dict) -> dict:
    """Domain-adaptive MLM continues with every parameter, the MLM head included."""
    del fresh
    return pretrained

  def init_match_keys(self) -> tuple[str, ...]:
    # The decoder's layout matters because the MLM head comes along.
    return super().init_match_keys() + ('tie_embeddings',)

  def batch_loss(self, m, rows, mask_key, drop_key, step):
    return make_batch_loss(self.spec, cls_id=self.tokenizer_cls_id(),
                           rate_schedule=self.rate_schedule, tables=self.tables,
                           z_loss=float(self.config.train.z_loss),
                           seed=int(self.config.seed))(
                               m, rows, mask_key, drop_key, step)

  def tokenizer_cls_id(self) -> int:
    """Returns the [CLS] id that starts each packed unit."""
    return int(self.tokenizer.cls_id) if self.tokenizer is not None else tokenizer_lib.CLS_ID

  def step_sums(self, rows, step):
    return make_step_sums(self.spec, self.rate_schedule)(rows, step)

  def window_record(self, sums):
    m = losses.finalize_metrics(sums)
    n = max(sums['steps'], 1.0)
    record = {'train/loss': m['loss'], 'train/accuracy': m['accuracy'],
              'train/accuracy_at_mask': m['accuracy_at_mask'],
              'train/mask_rate': sums['mask_rate_sum'] / n,
              'train/mask_rate_realized': sums['selected'] / max(sums['candidates'], 1.0)}
    if 'z_loss' in m:  # train.z_loss > 0; train/loss stays the plain cross-entropy
      record['train/z_loss'] = m['z_loss']
    return record

  def evaluate(self, graphdef, params, split, to_device):
    if split != 'val' or not self.val_batches:
      return {}
    step = self._eval_step(graphdef)
    metrics = mlm_eval.evaluate(step, params, self.val_batches, seed=self.config.eval.seed,
                                unigram=self.unigram, successor=self.successor, to_device=to_device,
                                groups=self.val_groups,
                                group_prefixes=[f'eval/{n}' for n in self.sources])
    if self.other is not None:
      name, batches, unigram, successor = self.other
      more = mlm_eval.evaluate(step, params, batches, seed=self.config.eval.seed, unigram=unigram,
                               successor=successor, to_device=to_device)
      metrics.update({f'eval_{name}/{k.replace("baseline/", "baseline_")}': v
                      for k, v in more.items()})
    return metrics

  def _eval_step(self, graphdef):
    if getattr(self, '_eval_fn', None) is None:
      self._eval_fn = mlm_eval.make_eval_step(graphdef, self.eval_spec,
                                              cls_id=self.tokenizer_cls_id(),
                                              num_groups=len(self.sources))
    return self._eval_fn

  def final_text(self, r):
    if 'eval/loss' not in r:
      return None
    lines = ['validation at the fixed evaluation masks:',
             f'  loss {r["eval/loss"]:.4f}  perplexity {r["eval/perplexity"]:.1f}',
             f'  accuracy, all selected positions   {r["eval/accuracy"]:.4f}',
             f'  accuracy where the input is [MASK]  {r["eval/accuracy_at_mask"]:.4f}'
             f'   (unigram baseline {r["baseline/unigram_accuracy_at_mask"]:.4f}, '
             f'bigram baseline {r["baseline/bigram_accuracy_at_mask"]:.4f})',
             f'  accuracy where the input is random  {r["eval/accuracy_at_random"]:.4f}',
             f'  accuracy where the input is kept    {r["eval/accuracy_at_keep"]:.4f}']
    uni = r['baseline/unigram_accuracy_at_mask']
    if uni > 0:
      lines.append(f'  [MASK] accuracy is {r["eval/accuracy_at_mask"] / uni:.2f}x the unigram baseline')
    if self.side_sample is not None:
      lines.append(f'  baselines from {shards.describe_sample(self.side_sample)}')
    for n in self.sources:
      if f'eval/{n}/loss' in r:
        lines.append(f'  source {n}: loss {r[f"eval/{n}/loss"]:.4f}, accuracy at [MASK] '
                     f'{r[f"eval/{n}/accuracy_at_mask"]:.4f} '
                     f'({r[f"eval/{n}/predictions"]:,.0f} predictions)')
    if self.other is not None:
      n = self.other[0]
      lines.append(f'  {n} domain: loss {r[f"eval_{n}/loss"]:.4f}, accuracy at [MASK] '
                   f'{r[f"eval_{n}/accuracy_at_mask"]:.4f}')
    return '\n'.join(lines)

  def describe(self) -> str:
    """Returns the masking setup for the log's 'training steps' line."""
    s = self.spec
    return (f'masking {s.strategy} ({s.selection}) rate {describe_rate(self.rate_schedule)} '
            f'split {s.split} | buffer {s.max_predictions}')

  def summary_extras(self) -> dict[str, Any]:
    s = self.spec
    return {'masking': {'rate': s.rate, 'split': list(s.split), 'selection': s.selection,
                        'strategy': s.strategy, 'schedule': dataclasses.asdict(self.rate_schedule)},
            'eval_rate': self.eval_spec.rate}

  def flops_max_predictions(self) -> int:
    return self.spec.max_predictions

  # --- prediction

  def predict(self, graphdef, params, mode, inputs, top_k=0):
    if mode != 'fill_mask':
      return super().predict(graphdef, params, mode, inputs, top_k)
    return [self.fill_mask(graphdef, params, text, top_k or 5) for text in inputs]

  def fill_mask(self, graphdef, params, text: str, top_k: int) -> list[list[tuple[str, float]]]:
    """Returns, per [MASK] in text, the top_k (token, probability) predictions."""
    t, max_len = self.tokenizer, int(self.config.train.seq_len)
    # The same cleaning the training corpus had, so the text meets the model as training text did.
    clean = corpus.clean_document(text, fix_text=bool(self.config.data.fix_text),
                                  normalization=str(self.config.data.normalization))
    ids = t.encode_with_specials(clean)
    if t.mask_id not in ids:
      raise ValueError(f'no [MASK] in {text!r}: write [MASK] where a token should be predicted')
    ids = [t.cls_id] + ids[:max_len - 2] + [t.sep_id]
    positions = [i for i, x in enumerate(ids) if x == t.mask_id]
    if not positions:
      raise ValueError(f'every [MASK] in {text!r} lies past train.seq_len={max_len} tokens')
    slots = -(-len(positions) // 8) * 8
    padded_ids = np.full((1, max_len), t.pad_id, np.int32)
    padded_ids[0, :len(ids)] = ids
    padded_pos = np.zeros((1, slots), np.int32)
    padded_pos[0, :len(positions)] = positions
    probs = _mask_probs(params, padded_ids, padded_pos, t.special_mask, graphdef=graphdef,
                        cls_id=int(t.cls_id), pad_id=int(t.pad_id))
    out = []
    for row in np.asarray(probs)[0, :len(positions)]:
      best = np.argsort(-row)[:top_k]
      out.append([(display_token(t, i), float(row[i])) for i in best])
    return out

  def format_prediction(self, mode, text, result) -> str:
    lines = [text]
    for i, cands in enumerate(result):
      lines.append(f'  [MASK] #{i + 1}: ' + '  '.join(f'{w} {p:.3f}' for w, p in cands))
    return '\n'.join(lines)


def display_piece(piece: str) -> str:
  """Returns a piece as a word for display (the sentencepiece word-start mark removed)."""
  return piece.replace('\u2581', ' ').strip() or piece


def display_token(tokenizer, i: int) -> str:
  """Returns token id i as a word for display: BPE ids decoded ('Ġcapital' is 'capital')."""
  piece = tokenizer.id_to_piece(int(i))
  if not isinstance(tokenizer, tokenizer_lib.BpeTokenizer):
    return display_piece(piece)
  # Byte-level pieces spell bytes as stand-in characters; decoding gives the text. A piece that
  # holds part of a character's UTF-8 bytes decodes to U+FFFD, and whitespace to nothing: the
  # piece itself tells those apart.
  text = tokenizer.decode([int(i)]).strip()
  return piece if not text or '\ufffd' in text else text


# One compiled forward for every text: rows padded to seq_len, [MASK] slots to a multiple of 8.
@functools.partial(jax.jit, static_argnames=('graphdef', 'cls_id', 'pad_id'))
def _mask_probs(params, ids, pos, special, *, graphdef, cls_id: int, pad_id: int) -> jax.Array:
  """Returns (B, P, V) probabilities at the [MASK] positions pos, special ids excluded."""
  position_ids, doc_ids = model.packed_layout(ids, cls_id=cls_id, pad_id=pad_id)
  logits = nnx.merge(graphdef, params)(ids, pos, position_ids=position_ids, doc_ids=doc_ids)
  logits = jnp.where(special, -jnp.inf, logits)  # never predict a special
  return jax.nn.softmax(logits, axis=-1)
