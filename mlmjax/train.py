"""MLM training loop: `python -m mlmjax.train --config configs/pretrain.py:tiny --workdir runs/x`."""

import copy
import dataclasses
import math
import os
import pathlib
import signal
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mlmjax import (checkpoint, config_check, flops, input_pipeline, masking, optim, run_files,
                    sharding, train_state)
from mlmjax import tasks as tasks_lib
from mlmjax import tokenizer as tokenizer_lib
from mlmjax.tasks import mlm as mlm_task


# ---------------------------------------------------------------------------------------------
# Config checks that name the key and the allowed values.


def validate_config(config) -> None:
  """Raises ValueError naming the key for values that cannot work (see config_check)."""
  config_check.check_config(config)
  t = config.train
  # Model shape keys, heads, dtype.
  train_state.encoder_config_from(config, config.tokenizer.vocab_size)
  # Building the specs validates masking.rate, masking.split, masking.selection.
  masking.spec_from_config(config.masking, vocab_size=config.tokenizer.vocab_size, seq_len=t.seq_len,
                           num_steps=t.num_steps)
  optim.learning_rate_schedule(config.optim, t.num_steps)


# ---------------------------------------------------------------------------------------------
# The train step: a pure function of (state, rows, seed key), jitted by run().


def step_keys(seed_key: jax.Array, step) -> tuple[jax.Array, jax.Array]:
  """Returns the (mask, dropout) keys of a step: split(fold_in(seed_key, step))."""
  return tuple(jax.random.split(jax.random.fold_in(seed_key, step)))


def microbatches(tokens: jax.Array, k: int) -> jax.Array:
  """Returns rows (B, L) as k microbatches (k, B/k, L); microbatch i holds rows i, i+k, i+2k, ...

  Strided, not contiguous: each device's contiguous block of B/dp rows then holds B/(dp k) rows of
  every microbatch, so every microbatch stays spread over all data-parallel devices.
  """
  b, length = tokens.shape
  if b % k:
    raise ValueError(f'train.batch_size={b} must be divisible by train.grad_accum_steps={k}')
  return jnp.swapaxes(tokens.reshape(b // k, k, length), 0, 1)


def mask_microbatch(mask_key: jax.Array, i, tokens: jax.Array, spec: masking.MaskingSpec,
                    rate=None, tables: masking.MaskingTables | None = None) -> masking.MaskedBatch:
  """Returns the MaskedBatch of microbatch i, drawn from fold_in(mask_key, i)."""
  return masking.mask_tokens(jax.random.fold_in(mask_key, i), tokens, spec, rate=rate, tables=tables)


def make_train_step(graphdef, tx, spec: masking.MaskingSpec, schedule, dropout: bool,
                    cls_id: int = tokenizer_lib.CLS_ID, *,
                    rate_schedule: masking.RateSchedule | None = None,
                    tables: masking.MaskingTables | None = None,
                    grad_accum_steps: int = 1) -> Callable:
  """Returns the MLM train_step(state, tokens, seed_key) -> (state, metric sums) (see make_step).

  rate_schedule: the masking rate at each step (None: spec.rate); tables: for unit strategies.
  Masks come from fold_in(key, step); with grad_accum_steps k > 1, microbatch i is masked from
  fold_in(mask_key, i), so its masks differ from the k = 1 step's.
  """
  return make_step(graphdef, tx, schedule,
                   mlm_task.make_batch_loss(spec, cls_id=cls_id, rate_schedule=rate_schedule,
                                            tables=tables),
                   step_sums=mlm_task.make_step_sums(spec, rate_schedule), dropout=dropout,
                   grad_accum_steps=grad_accum_steps)


def make_step(graphdef, tx, schedule, batch_loss: Callable, *, step_sums: Callable | None = None,
              dropout: bool, grad_accum_steps: int = 1, token_columns: int | None = None) -> Callable:
  """Returns train_step(state, rows, seed_key) -> (state, metric sums) for a task's batch_loss.

  batch_loss(model, rows, mask_key, drop_key, step) -> (loss_sum, weight, sums); the update
  follows the gradient of sum(loss_sum) / sum(weight). grad_accum_steps k > 1: the batch is k
  microbatches (`microbatches`) run one after another in a lax.scan, microbatch i with keys
  fold_in(key, i); the update is the large-batch one, with the memory of one microbatch.
  A step whose loss or gradient norm is not finite applies no update (flag `nonfinite`).
  token_columns: the leading columns of a row that hold tokens (tokens/s); None = all.
  """
  k = int(grad_accum_steps)
  if k < 1:
    raise ValueError(f'train.grad_accum_steps={grad_accum_steps} must be >= 1')

  def whole_batch(params, rows, mask_key, drop_key, step):
    """Returns (loss, grads, metric sums) of the batch in one pass."""

    def loss_fn(p):
      loss_sum, weight, sums = batch_loss(nnx.merge(graphdef, p), rows, mask_key,
                                          drop_key if dropout else None, step)
      return loss_sum / jnp.maximum(weight, 1.0), (weight, sums)

    (loss, (_, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, sums

  def accumulated(params, rows, mask_key, drop_key, step):
    """Returns (loss, grads, metric sums) of the batch as k scanned microbatches."""

    def body(grad_sum, xs):
      i, micro = xs

      def sum_loss(p):
        loss_sum, weight, sums = batch_loss(
            nnx.merge(graphdef, p), micro, jax.random.fold_in(mask_key, i),
            jax.random.fold_in(drop_key, i) if dropout else None, step)
        return loss_sum, (loss_sum, weight, sums)

      (_, aux), g = jax.value_and_grad(sum_loss, has_aux=True)(params)
      return jax.tree.map(jnp.add, grad_sum, g), aux

    grad_sum, (loss_sums, weights, per_micro) = jax.lax.scan(
        body, jax.tree.map(jnp.zeros_like, params), (jnp.arange(k), microbatches(rows, k)))
    sums = jax.tree.map(lambda v: v.sum(0), per_micro)
    # Sums first, one division by the whole batch's weight: the k = 1 update exactly, not a mean
    # of microbatch means (microbatches select different numbers of tokens).
    denom = jnp.maximum(weights.sum(), 1.0)
    return loss_sums.sum() / denom, jax.tree.map(lambda g: g / denom, grad_sum), sums

  def train_step(state, rows, seed_key):
    mask_key, drop_key = step_keys(seed_key, state['step'])
    loss, grads, sums = (whole_batch if k == 1 else accumulated)(
        state['params'], rows, mask_key, drop_key, state['step'])
    sums = dict(sums)
    if step_sums is not None:
      sums.update(step_sums(rows, state['step']))
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    # A non-finite loss or gradient applies no update; the step counter still advances, so the
    # data order and the masks stay those of an uninterrupted run.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                     (params, opt_state), (state['params'], state['opt_state']))
    token_rows = rows if token_columns is None else rows[:, :token_columns]
    sums.update(steps=jnp.ones((), jnp.float32), loss_mean_sum=loss, grad_norm_sum=grad_norm,
                lr_sum=jnp.asarray(schedule(state['step']), jnp.float32),
                tokens=jnp.sum(token_rows != 0).astype(jnp.float32))
    # Zeroed on a skipped step, so that the window's metrics stay finite.
    sums = {name: jnp.where(ok, v, jnp.zeros_like(v)) for name, v in sums.items()}
    # 0: applied; 1: non-finite loss; 2: finite loss, non-finite gradient norm.
    sums['nonfinite'] = jnp.where(ok, 0.0, jnp.where(jnp.isfinite(loss), 2.0, 1.0))
    new_state = {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}
    return new_state, sums

  return train_step


def _window_record(sums: dict, task) -> dict[str, float]:
  """Returns the progress-line numbers from summed train metrics over a logging window."""
  s = {k: float(v) for k, v in sums.items()}
  n = max(s['steps'], 1.0)
  return {**task.window_record(s), 'train/grad_norm': s['grad_norm_sum'] / n,
          'train/lr': s['lr_sum'] / n, 'train/step_loss_mean': s['loss_mean_sum'] / n}


# ---------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class _Progress:
  """Bookkeeping that a checkpoint carries beside the arrays."""
  wall_time_s: float = 0.0
  tokens_seen: float = 0.0
  best_eval_loss: float = float('inf')
  best_eval_step: int = -1
  skipped_batches: int = 0  # steps whose non-finite loss or gradient applied no update
  best_value: float | None = None  # of the early-stopping metric (early_stop.metric)
  best_step: int = -1
  evals_since_best: int = 0
  early_stopped: bool = False


def _count_nonfinite(flags, first_step: int, progress: _Progress, max_skipped: int,
                     last_good: str, log: Callable[[str], None]) -> None:
  """Counts and logs the skipped steps among per-step `nonfinite` flags; raises past max_skipped."""
  for i, flag in enumerate(flags):
    if not flag:
      continue
    step, what = first_step + i, 'training loss' if flag == 1 else 'gradient norm'
    progress.skipped_batches += 1
    if progress.skipped_batches > max_skipped:
      allowed = f' after {max_skipped} skipped (train.max_skipped_batches)' if max_skipped else ''
      raise FloatingPointError(
          f'non-finite {what} at step {step}{allowed}; last good checkpoint: {last_good}. '
          'Lower optim.learning_rate or check the data.')
    log(f'skipped non-finite batch at step {step} ({progress.skipped_batches} of {max_skipped}): '
        f'non-finite {what}, no update applied')


def run(config, workdir, *, stop_after: int | None = None) -> dict:
  """Trains (or resumes) the run of config.task in workdir; returns the summary also in summary.json.

  stop_after: end this invocation after that many steps (checkpointing first), as a crash would.
  SIGTERM/SIGINT during training (or JAX's multi-host preemption sync point) saves a checkpoint at
  the current step, waits for it to commit and returns with summary['preempted'] = True.
  """
  t_start = time.perf_counter()
  sharding.maybe_initialize_distributed(config)  # first: before anything touches a device
  validate_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  run_files.check_writable(workdir)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  dp = sharding.data_parallel_size(mesh)
  for key, b in (('train.batch_size', config.train.batch_size), ('eval.batch_size', config.eval.batch_size)):
    if b % dp:
      raise ValueError(f'{key}={b} must be divisible by the {dp} data-parallel devices of mesh.shape')
  accum = int(config.train.get('grad_accum_steps', 1))
  if (config.train.batch_size // accum) % dp:
    raise ValueError(f'train.batch_size / train.grad_accum_steps = {config.train.batch_size // accum}'
                     f' rows per microbatch must be divisible by the {dp} data-parallel devices')
  ckpt_dir = workdir / 'checkpoints'
  saved = [int(p.name) for p in ckpt_dir.glob('*') if p.is_dir() and p.name.isdigit()]
  reporter = run_files.Reporter(workdir, enabled=is_main, resume_step=max(saved, default=0))
  log = reporter.log
  task_name = str(config.get('task', 'mlm'))
  log(f'mlmjax: workdir {workdir} | task {task_name} | devices {jax.device_count()} '
      f'({jax.devices()[0].platform}) | mesh {dict(mesh.shape)} | processes {jax.process_count()}')

  if not jax.config.jax_compilation_cache_dir:
    # Reruns, resumes and sweeps reuse compiled steps instead of paying XLA's compile again.
    jax.config.update('jax_compilation_cache_dir', str(input_pipeline.cache_root(config.data) / 'xla'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  quiet = log if is_main else (lambda s: None)
  init_run = train_state.init_source(config.init_from) if config.init_from else None
  task = _make_task(config, workdir, init_run, quiet)
  data = task.prepare(workdir)
  tokenizer = task.tokenizer
  if is_main:
    run_files.write_config(workdir, config, log)
    run_files.atomic_write_json(workdir / 'task.json', {'task': task.name, **data.stats})

  enc_cfg = train_state.encoder_config_from(config, tokenizer.vocab_size)
  seq_len = config.train.seq_len
  schedule = optim.learning_rate_schedule(config.optim, config.train.num_steps)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  graphdef, param_state = train_state.abstract_model(enc_cfg, config.seed, task.build_model)
  init_fn = train_state.make_init_fn(enc_cfg, tx, config.seed, task.build_model)
  abstract_state = jax.eval_shape(init_fn)
  shardings = train_state.state_shardings(param_state, abstract_state, tx, mesh)
  abstract_target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 abstract_state, shardings)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state['params']))
  checkpoint.check_disk_space(workdir, abstract_state, max_to_keep=config.ckpt.max_to_keep)
  spe = input_pipeline.steps_per_epoch(len(data.train), config.train.batch_size)
  stop_metric, stop_mode, patience, min_delta = _early_stop_settings(config, task)
  keep_best = task.name != 'mlm' or patience > 0

  # Resume order: this workdir's checkpoint > init_from > scratch.
  progress = _Progress()
  ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=config.ckpt.max_to_keep,
                                 async_save=config.ckpt.async_save,
                                 log=lambda s: print(s, flush=True) if is_main else None)
  best_ckpt = None
  try:
    if keep_best:
      best_ckpt = checkpoint.Checkpointer(workdir / 'best', max_to_keep=1,
                                          async_save=config.ckpt.async_save,
                                          log=lambda s: print(s, flush=True) if is_main else None)
    restored = ckpt.restore_latest(abstract_target)
    if restored is not None:
      step0, state, meta = restored
      progress = _Progress(**meta.get('progress', {}))
      run_files.check_resume_meta(meta, data.key, tokenizer, config, log)
      log(f'resumed from step {step0} (checkpoint {ckpt.directory / str(step0)})')
    else:
      state = jax.jit(init_fn, out_shardings=shardings)()
      if init_run is not None:
        state = train_state.init_params_from(init_run, state, abstract_target, task, enc_cfg,
                                             tokenizer, log)
      step0 = 0
      log(f'initialized {config.model.size} {task.name} model: {n_params / 1e6:.2f} M parameters'
          + ('' if init_run is None else
             f' ({"parameters" if task.name == "mlm" else "encoder"} from init_from)'))
  except BaseException:
    ckpt.close()
    if best_ckpt is not None:
      best_ckpt.close()
    reporter.close()
    raise

  num_steps = config.train.num_steps
  batches = input_pipeline.train_batches(
      data.train, global_batch=config.train.batch_size, seed=config.seed, start_step=step0,
      process_index=jax.process_index(), process_count=jax.process_count(),
      prefetch=config.data.prefetch)

  seed_key = jax.random.key(config.seed)
  data_spec = sharding.batch_sharding(mesh)
  row_tokens = seq_len * task.sequences_per_row
  train_step = jax.jit(
      make_step(graphdef, tx, schedule, task.batch_loss, step_sums=task.step_sums,
                dropout=config.model.dropout_rate > 0, grad_accum_steps=accum,
                token_columns=row_tokens),
      in_shardings=(shardings, data_spec, None), out_shardings=(shardings, None), donate_argnums=0)
  # MFU: analytic matmul FLOPs per token slot over the device peak (table, or a measured matmul).
  flops_per_token = flops.train_flops_per_token(enc_cfg, seq_len=seq_len,
                                                max_predictions=task.flops_max_predictions())
  peak = flops.device_peak(config.model.dtype)
  log(f'MFU counts {flops_per_token / 1e6:.2f} MFLOPs per token against {peak.units} x '
      f'{peak.flops_per_s / 1e12:.3g} TFLOP/s ({peak.source})')

  def to_global(rows):
    lo = jax.process_index() * (len(rows) // jax.process_count())
    return sharding.global_batch(rows[lo:lo + len(rows) // jax.process_count()], mesh)

  last_good = {'step': step0 if restored is not None else None}
  closed = {'best': False}  # an evaluation after the loop (a rerun of a finished run) saves nothing

  def meta_of(step):
    meta = {'step': step, 'data': input_pipeline.data_position(step, len(data.train),
                                                               config.train.batch_size),
            'seed': config.seed, 'cache_key': data.key, 'tokenizer': tokenizer.fingerprint,
            'task': task.name, 'progress': dataclasses.asdict(progress)}
    meta['progress']['wall_time_s'] = progress.wall_time_s + (time.perf_counter() - t_start)
    return meta

  def save(step):
    ckpt.save(step, state, meta_of(step))
    last_good['step'] = step

  def run_eval(step):
    metrics = task.evaluate(graphdef, state['params'], 'val', to_global)
    if not metrics:
      return None
    record = {k if '/' in k else f'eval/{k}': v for k, v in metrics.items() if _is_number(v)}
    reporter.write(step, record)
    if 'loss' in metrics and metrics['loss'] < progress.best_eval_loss:
      progress.best_eval_loss, progress.best_eval_step = metrics['loss'], step
    value = metrics.get(stop_metric)
    if value is None:
      raise ValueError(f'early_stop.metric={stop_metric!r}: the {task.name} task reports '
                       f'{sorted(k for k, v in metrics.items() if _is_number(v))}')
    better = progress.best_value is None or (
        value < progress.best_value - min_delta if stop_mode == 'min' else
        value > progress.best_value + min_delta)
    if better:
      progress.best_value, progress.best_step, progress.evals_since_best = float(value), step, 0
      if best_ckpt is not None and not closed['best']:
        best_ckpt.save(step, state, meta_of(step))
    else:
      progress.evals_since_best += 1
    log(f'eval  step {step}: {task.eval_text(metrics)}'
        + ('' if not keep_best else f' | best {stop_metric} {progress.best_value:.4f} at step '
           f'{progress.best_step}'))
    return record

  log(f'training steps {step0}..{num_steps} | batch {config.train.batch_size} x {seq_len} tokens | '
      f'{spe} steps per epoch | {task.describe()}')
  eval_record = None
  if step0 == 0 and config.eval.get('at_start', False) and restored is None:
    eval_record = run_eval(0)
  window, t_window, window_steps = None, time.perf_counter(), 0
  step = step0
  stop_at = num_steps if stop_after is None else min(num_steps, step0 + stop_after)
  if progress.early_stopped:
    log(f'this run stopped early at step {step0} (no improvement of {stop_metric}); nothing to train')
    stop_at = step0
  max_wall = float(config.train.max_wall_minutes) * 60
  preempted = False
  stop = checkpoint.StopRequest().__enter__()
  pending = []  # per-step `nonfinite` flags on the device, fetched where the host syncs anyway
  try:
    while step < stop_at:
      rows = next(batches)
      state, sums = train_step(state, sharding.global_batch(rows, mesh), seed_key)
      pending.append(sums['nonfinite'])
      window = sums if window is None else jax.tree.map(jnp.add, window, sums)
      step += 1
      window_steps += 1
      wall_stop = max_wall > 0 and time.perf_counter() - t_start > max_wall
      # A stop request at the last step changes nothing: the run just finishes.
      preempted = step < stop_at and (stop.signum is not None or checkpoint.reached_preemption_sync_point(step))
      done = step == stop_at or wall_stop or preempted
      where = (f'checkpoint step {last_good["step"]} in {ckpt.directory}'
               if last_good['step'] is not None else 'no checkpoint yet')
      # Before every log line and every save, so that a checkpoint's skip count is exact.
      if step % config.train.log_every_steps == 0 or step % config.ckpt.every_steps == 0 or done:
        _count_nonfinite(jax.device_get(pending), step - len(pending) + 1, progress,
                         int(config.train.get('max_skipped_batches', 0)), where, log)
        pending = []
      if step % config.train.log_every_steps == 0 or done:
        host = jax.device_get(window)
        record = _window_record(host, task)
        if not math.isfinite(record['train/loss']) and host['steps'] > 0:  # skipped steps count 0
          raise FloatingPointError(
              f'non-finite training loss at step {step - window_steps + 1}..{step}; '
              f'last good checkpoint: {where}. Lower optim.learning_rate or check the data.')
        record['train/skipped_batches'] = float(progress.skipped_batches)
        dt = time.perf_counter() - t_window
        progress.tokens_seen += float(host['tokens'])
        record['train/tokens_per_s'] = config.train.batch_size * row_tokens * window_steps / dt
        record['train/step_time_s'] = dt / window_steps
        record['train/mfu'] = flops.mfu(record['train/tokens_per_s'], flops_per_token, peak.units,
                                        peak.flops_per_s)
        record['train/epoch'] = step / spe
        reporter.write(step, record)
        eta = (num_steps - step) * dt / window_steps
        log(f'step {step}/{num_steps} | {task.progress_text(record, step)} | '
            f'{record["train/tokens_per_s"] / 1e3:.1f}k tok/s | MFU {record["train/mfu"]:.1%} | '
            f'{record["train/step_time_s"] * 1e3:.0f} ms/step | ETA {run_files.fmt_time(eta)}')
        window, t_window, window_steps = None, time.perf_counter(), 0
      if step % config.eval.every_steps == 0 or step == num_steps:
        eval_record = run_eval(step)
        t_window = time.perf_counter()  # evaluation time is not training throughput
        if patience and progress.evals_since_best >= patience and step < num_steps:
          progress.early_stopped = True
          log(f'early stopping at step {step}: {stop_metric} has not improved by more than '
              f'{min_delta} for {patience} evaluations; best {progress.best_value:.4f} at step '
              f'{progress.best_step} (kept in {workdir / "best"})')
          done = True
      if step % config.ckpt.every_steps == 0 or done:
        save(step)
        t_window = time.perf_counter()
      if progress.early_stopped:
        break
      if preempted:
        ckpt.wait()
        why = signal.Signals(stop.signum).name if stop.signum is not None else 'preemption sync point'
        log(f'preempted at step {step} ({why}): checkpoint saved to {ckpt.directory / str(step)}, '
            'rerun the same command to resume')
        break
      if wall_stop:
        log(f'stopping at step {step}: train.max_wall_minutes={config.train.max_wall_minutes} reached')
        break
  finally:
    try:
      ckpt.close()  # commits pending asynchronous saves, also when an exception ends the loop
      if best_ckpt is not None:
        best_ckpt.close()
        closed['best'] = True
      reporter.close()
    finally:
      stop.__exit__(None, None, None)

  progress.wall_time_s += time.perf_counter() - t_start
  finished = step >= num_steps or progress.early_stopped
  if eval_record is None and finished:
    eval_record = run_eval(step)
  summary = {'step': step, 'num_steps': num_steps, 'finished': finished,
             'preempted': preempted, 'task': task.name, 'early_stopped': progress.early_stopped,
             'tokens_seen': progress.tokens_seen, 'wall_time_s': progress.wall_time_s,
             'num_params': n_params, 'best_eval_loss': progress.best_eval_loss,
             'best_eval_step': progress.best_eval_step, 'variant': config.variant,
             'skipped_batches': progress.skipped_batches, 'init_from': config.init_from,
             'data': data.stats, **task.summary_extras()}
  if keep_best:
    summary.update(best_metric=stop_metric, best_value=progress.best_value,
                   best_step=progress.best_step)
  if eval_record:
    summary.update(eval_record)
  if finished and len(data.test):
    summary.update(_test_with_best(task, graphdef, state, abstract_target, best_ckpt, to_global, log))
  if finished:
    summary.update({f'baseline/{k}': v for k, v in task.baselines().items()})
  reporter.close()
  if is_main:
    run_files.atomic_write_json(workdir / 'summary.json', summary)
    table = task.final_text(summary) if finished or eval_record else None
    if table:
      log(table)
  return summary


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)


def _early_stop_settings(config, task) -> tuple[str, str, int, float]:
  """Returns (metric, mode, patience, min_delta) from config.early_stop and the task's defaults."""
  es = config.get('early_stop')
  if es is None:
    return task.best_metric, task.best_mode, 0, 0.0
  metric = str(es.metric or task.best_metric)
  mode = str(es.mode or (task.best_mode if metric == task.best_metric else
                         'min' if metric.endswith('loss') or metric == 'perplexity' else 'max'))
  if mode not in ('min', 'max'):
    raise ValueError(f"early_stop.mode={es.mode!r}: use 'min', 'max' or '' (the task's default)")
  if int(es.patience) < 0 or float(es.min_delta) < 0:
    raise ValueError('early_stop.patience and early_stop.min_delta must be >= 0')
  return metric, mode, int(es.patience), float(es.min_delta)


def _test_with_best(task, graphdef, state, abstract_target, best_ckpt, to_global, log) -> dict:
  """Returns test/* metrics of the best checkpoint's parameters (the final ones when none is kept)."""
  params, which = state['params'], 'final'
  if best_ckpt is not None:
    reopened = checkpoint.Checkpointer(best_ckpt.directory, async_save=False, log=log)
    try:
      restored = reopened.restore_latest(abstract_target)
    finally:
      reopened.close()
    if restored is not None:
      params, which = restored[1]['params'], f'best (step {restored[0]})'
  metrics = task.evaluate(graphdef, params, 'test', to_global)
  out = {f'test/{k}': v for k, v in metrics.items() if _is_number(v)}
  if 'per_class' in metrics:
    out['test/per_class'] = metrics['per_class']
  out['test/parameters'] = which
  log(f'test ({which} parameters): {task.eval_text(metrics)}')
  return out


# ---------------------------------------------------------------------------------------------
# The task with its tokenizer (workdir's, tokenizer.path, or init_from's).


def _make_task(config, workdir: pathlib.Path, init_run: train_state.InitSource | None, log):
  """Returns the config.task Task with its tokenizer: workdir's > tokenizer.path > init_from's."""
  name = str(config.get('task', 'mlm'))
  stored = any((workdir / n).exists() for n in tokenizer_lib.WORKDIR_FILES)
  if init_run is not None and not stored and not config.tokenizer.path:
    config = copy.deepcopy(config)
    config.tokenizer.path = str(init_run.tokenizer_path)
    log(f'tokenizer from init_from: {init_run.tokenizer_path}')
  if name == 'mlm':
    prepared = input_pipeline.prepare_data(config, workdir, log=log)
    return mlm_task.MlmTask(config, prepared.tokenizer, log, cache=prepared.cache)
  cls = tasks_lib.get_task_class(name)
  found = [workdir / n for n in tokenizer_lib.WORKDIR_FILES if (workdir / n).exists()]
  if found:
    tokenizer = tokenizer_lib.load_any(found[0])
  elif config.tokenizer.path:
    tokenizer = tokenizer_lib.load_any(config.tokenizer.path)
  else:
    raise ValueError(f"task '{name}' needs a tokenizer: set init_from (a pretrained workdir) or "
                     'tokenizer.path (e.g. runs/pretrain/tokenizer.model)')
  if not found and jax.process_index() == 0:
    tmp = workdir / (tokenizer.file_name + '.tmp')
    tmp.write_bytes(tokenizer.serialized_model)
    os.replace(tmp, workdir / tokenizer.file_name)
  return cls(config, tokenizer, log)


# ---------------------------------------------------------------------------------------------
# Command line.


def _flag_error(e: BaseException) -> str:
  """Returns a one-line message for a flag or config-override error (no traceback)."""
  while not isinstance(e, KeyError) and isinstance(e.__cause__ or e.__context__, KeyError):
    e = e.__cause__ or e.__context__
  if isinstance(e, KeyError) and e.args:
    lines = [l.strip() for l in str(e.args[0]).splitlines() if l.strip()]
    hint = f' ({lines[1]})' if len(lines) > 1 else ''
    return f'unknown config key {lines[0]}{hint}; see configs/pretrain.py for the keys'
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  useful = [l for l in lines if not l.startswith(('Traceback', 'File ', '^', '~'))]
  last = useful[-1] if useful else str(e)
  return last if last == lines[0] else f'{lines[0].rstrip(":")}: {last}'


def check_config_path(argv) -> None:
  """Exits with a one-line error when --config names a file that does not exist."""
  for i, arg in enumerate(argv):
    value = arg.split('=', 1)[1] if arg.startswith('--config=') else (
        argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None)
    if value is not None and not os.path.isfile(value.split(':', 1)[0]):
      sys.exit(f'error: --config: no such config file {value.split(":", 1)[0]!r}')


def main(argv=None) -> None:
  """Parses --config/--workdir flags and calls run()."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags_ = flags.FlagValues()
  argv = sys.argv if argv is None else argv
  # sys_argv: config_flags otherwise reads --config.KEY overrides from sys.argv, not from argv.
  config_flags.DEFINE_config_file('config', None, 'Path to a config file, e.g. configs/pretrain.py:tiny.',
                                  flag_values=flags_, lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.',
                      flag_values=flags_)
  flags.DEFINE_bool('dry_run', False, 'Compile the train step for the mesh from abstract shapes, '
                    'print per-device memory and FLOPs, and exit without training.',
                    flag_values=flags_)
  flags.DEFINE_string('topology', '', 'With --dry_run: compile for a named TPU topology, e.g. '
                      'v5e:2x2 (needs libtpu).', flag_values=flags_)
  check_config_path(argv)
  try:
    flags_(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    sys.exit(f'error: {_flag_error(e)}')
  if flags_.config is None or (flags_.workdir is None and not flags_.dry_run):
    sys.exit('usage: python -m mlmjax.train --config configs/pretrain.py:tiny --workdir runs/demo '
             '[--config.KEY=VALUE ...] [--dry_run [--topology v5e:2x2]]')
  if flags_.topology and not flags_.dry_run:
    sys.exit('error: --topology only applies with --dry_run')
  try:
    if flags_.dry_run:
      from mlmjax import compile_check  # pylint: disable=g-import-not-at-top
      print(compile_check.format_report(
          compile_check.compile_report(flags_.config, topology=flags_.topology)), flush=True)
      return
    run(flags_.config, flags_.workdir)
  except (ValueError, FileNotFoundError, PermissionError, FloatingPointError, RuntimeError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
