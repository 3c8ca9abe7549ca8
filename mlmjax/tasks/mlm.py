"""The MLM task: dynamic masking inside the step, validation at fixed masks beside n-gram baselines.

Rows are packed token rows (N, seq_len) from the token cache. With eval.other_corpus set (domain-
adaptive MLM), a second corpus's held-out rows are evaluated too, logged as eval_<other_name>/...
"""

import copy
import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from mlmjax import evaluate, input_pipeline, losses, masking, model, pmi
from mlmjax import tokenizer as tokenizer_lib
from mlmjax.tasks import Task, TaskData


def make_batch_loss(spec: masking.MaskingSpec, *, cls_id: int = tokenizer_lib.CLS_ID,
                    rate_schedule: masking.RateSchedule | None = None,
                    tables: masking.MaskingTables | None = None) -> Callable:
  """Returns batch_loss(model, rows, mask_key, drop_key, step) -> (loss_sum, weight, metric sums)."""

  def batch_loss(m, rows, mask_key, drop_key, step):
    rate = None if rate_schedule is None else rate_schedule(step)
    mb = masking.mask_tokens(mask_key, rows, spec, rate=rate, tables=tables)
    # Unit layout from the uncorrupted rows: positions restart and attention stops at each [CLS].
    position_ids, doc_ids = model.packed_layout(rows, cls_id=cls_id, pad_id=spec.pad_id)
    logits = m(mb.inputs, mb.positions, position_ids=position_ids, doc_ids=doc_ids,
               dropout_rng=drop_key)
    loss_sum, weight = losses.cross_entropy_sum(logits, mb.labels, mb.weights)
    sums = losses.mlm_metric_sums(logits, mb.labels, mb.weights, mb.kinds)
    sums['selected'] = sums['weight']
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


def eval_spec_from(config, tokenizer) -> masking.MaskingSpec:
  """Returns the fixed evaluation masking: eval.rate and eval.split, token by token, exact."""
  seq_len = config.train.seq_len
  return masking.MaskingSpec(
      vocab_size=tokenizer.vocab_size, rate=float(config.eval.rate), split=tuple(config.eval.split),
      max_predictions=masking.default_max_predictions(float(config.eval.rate), seq_len, 'exact'),
      selection='exact', **masking.special_fields(tokenizer.special_mask, mask_id=tokenizer.mask_id,
                                                  pad_id=tokenizer.pad_id))


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

  def __init__(self, config, tokenizer, log, *, cache=None):
    super().__init__(config, tokenizer, log)
    self.cache = cache
    seq_len = config.train.seq_len
    self.spec = masking.spec_from_config(config.masking, vocab_size=tokenizer.vocab_size,
                                         seq_len=seq_len, tokenizer=tokenizer,
                                         num_steps=config.train.num_steps)
    self.rate_schedule = masking.rate_schedule_from_config(config.masking, config.train.num_steps)
    self.eval_spec = eval_spec_from(config, tokenizer)
    self.tables = None
    self.other = None  # (name, val batches, unigram, successor) of eval.other_corpus

  def prepare(self, workdir) -> TaskData:
    cache, config = self.cache, self.config
    pmi_vocab = None
    if self.spec.strategy == 'pmi':
      pmi_vocab = pmi.load_or_build_pmi_vocab(
          input_pipeline.cache_root(config.data), cache.key, cache.train_rows,
          self.tokenizer.special_mask, min_count=config.masking.pmi_min_count,
          size=config.masking.pmi_vocab_size, log=self.log)
    self.tables = masking.tables_for(self.spec, self.tokenizer, pmi_vocab)
    self.val_batches = input_pipeline.eval_batches(cache.val_rows, batch_size=config.eval.batch_size,
                                                   num_batches=config.eval.num_batches)
    if not self.val_batches:
      self.log('WARNING: the validation split is empty; evaluation is skipped (raise data.val_fraction)')
    self.unigram, self.successor = evaluate.baseline_tables(
        cache.train_rows, self.tokenizer.vocab_size, self.tokenizer.special_mask)
    other = str(config.eval.get('other_corpus', '') or '')
    if other:
      self.other = self._prepare_other(workdir, other)
    return TaskData(train=cache.train_rows, val=cache.val_rows,
                    test=np.zeros((0, cache.train_rows.shape[1]), np.int32), stats=cache.stats,
                    key=cache.key)

  def _prepare_other(self, workdir, corpus: str):
    """Returns (name, val batches, unigram, successor) of a second corpus, same tokenizer and packing."""
    config = self.config
    other_cfg = copy.deepcopy(config)
    other_cfg.data.corpus = corpus
    name = str(config.eval.get('other_name', 'original') or 'original')
    self.log(f'second validation corpus ({name}): {corpus}')
    # The workdir already holds this run's tokenizer, so the second corpus is cut into the same pieces.
    data = input_pipeline.prepare_data(other_cfg, workdir, log=self.log)
    batches = input_pipeline.eval_batches(data.cache.val_rows, batch_size=config.eval.batch_size,
                                          num_batches=config.eval.num_batches)
    if not batches:
      raise ValueError(f'eval.other_corpus={corpus!r}: its validation split is empty')
    unigram, successor = evaluate.baseline_tables(data.cache.train_rows, self.tokenizer.vocab_size,
                                                  self.tokenizer.special_mask)
    return name, batches, unigram, successor

  def build_model(self, enc_cfg, rngs):
    return model.BertForMLM(enc_cfg, rngs=rngs)

  def batch_loss(self, m, rows, mask_key, drop_key, step):
    return make_batch_loss(self.spec, cls_id=self.tokenizer.cls_id,
                           rate_schedule=self.rate_schedule, tables=self.tables)(
                               m, rows, mask_key, drop_key, step)

  def step_sums(self, rows, step):
    return make_step_sums(self.spec, self.rate_schedule)(rows, step)

  def window_record(self, sums):
    m = losses.finalize_metrics(sums)
    n = max(sums['steps'], 1.0)
    return {'train/loss': m['loss'], 'train/accuracy': m['accuracy'],
            'train/accuracy_at_mask': m['accuracy_at_mask'],
            'train/mask_rate': sums['mask_rate_sum'] / n,
            'train/mask_rate_realized': sums['selected'] / max(sums['candidates'], 1.0)}

  def progress_text(self, record, step):
    return (f'loss {record["train/loss"]:.4f} | acc {record["train/accuracy"]:.4f} | '
            f'lr {record["train/lr"]:.2e} | mask rate {self.rate_schedule.at(step - 1):.3f}')

  def evaluate(self, graphdef, params, split, to_device):
    if split != 'val' or not self.val_batches:
      return {}
    step = self._eval_step(graphdef)
    metrics = evaluate.evaluate(step, params, self.val_batches, seed=self.config.eval.seed,
                                unigram=self.unigram, successor=self.successor, to_device=to_device)
    if self.other is not None:
      name, batches, unigram, successor = self.other
      more = evaluate.evaluate(step, params, batches, seed=self.config.eval.seed, unigram=unigram,
                               successor=successor, to_device=to_device)
      metrics.update({f'eval_{name}/{k.replace("baseline/", "baseline_")}': v
                      for k, v in more.items()})
    return metrics

  def _eval_step(self, graphdef):
    if getattr(self, '_eval_fn', None) is None:
      self._eval_fn = evaluate.make_eval_step(graphdef, self.eval_spec, cls_id=self.tokenizer.cls_id)
    return self._eval_fn

  def eval_text(self, metrics):
    text = (f'loss {metrics["loss"]:.4f} | acc {metrics["accuracy"]:.4f} | '
            f'acc@[MASK] {metrics["accuracy_at_mask"]:.4f} (unigram '
            f'{metrics["baseline/unigram_accuracy_at_mask"]:.4f}, bigram '
            f'{metrics["baseline/bigram_accuracy_at_mask"]:.4f}) | acc@random '
            f'{metrics["accuracy_at_random"]:.4f} | acc@keep {metrics["accuracy_at_keep"]:.4f}')
    if self.other is not None:
      n = self.other[0]
      text += (f' || {n}: loss {metrics[f"eval_{n}/loss"]:.4f} | acc@[MASK] '
               f'{metrics[f"eval_{n}/accuracy_at_mask"]:.4f}')
    return text

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
