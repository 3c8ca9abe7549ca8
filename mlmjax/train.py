"""The training loop: `python -m mlmjax.train --config configs/pretrain.py:tiny --workdir runs/x`.

main(argv) parses flags and calls run(config, workdir); run() reads top to bottom: setup (one
experiment.setup for every task), restore or init, the loop, finish. Resume order: this workdir's
checkpoint > init_from's parameters > scratch.
"""

import contextlib
import copy
import dataclasses
import json
import math
import pathlib
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mlmjax import (adapt as adapt_lib, checkpoint, cli, compile_check, experiment, flops,
                    input_pipeline, model, optim, phases, run_files, schema, sharding,
                    train_state)


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
  # Cumulative counts through step counted_step (train/cum_* in metrics.jsonl; NaN: the run
  # resumed from a checkpoint written before they were counted).
  cum_tokens: float = 0.0  # token slots trained, padding included (what FLOPs count)
  cum_flops: int = 0  # analytic training FLOPs (a Python int: the sum is exact at any size)
  cum_predictions: float = 0.0  # prediction targets: the loss's weight (MLM: selected positions)
  counted_step: int = 0


_COUNTS = ('cum_tokens', 'cum_flops', 'cum_predictions')


# ---------------------------------------------------------------------------------------------
# Small helpers of the loop: early stopping, restore or init, the logging window, the summary.


class _EarlyStop:
  """Follows the early-stopping metric (config.early_stop, else the task's best_metric)."""

  def __init__(self, config, task):
    es = config.early_stop
    self.metric = es.metric or task.best_metric
    self.mode = es.mode or (task.best_mode if self.metric == task.best_metric else
                            'min' if self.metric.endswith('loss') or self.metric == 'perplexity'
                            else 'max')
    self.patience, self.min_delta = int(es.patience), float(es.min_delta)
    self.task_name = task.name

  def improved(self, progress: _Progress, metrics: dict, step: int) -> bool:
    """Records an evaluation in progress; returns whether it is the best so far."""
    value = metrics.get(self.metric)
    if value is None:
      raise ValueError(f'early_stop.metric={self.metric!r}: the {self.task_name} task reports '
                       f'{sorted(k for k, v in metrics.items() if _is_number(v))}')
    best = progress.best_value
    better = best is None or (value < best - self.min_delta if self.mode == 'min' else
                              value > best + self.min_delta)
    if better:
      progress.best_value, progress.best_step, progress.evals_since_best = float(value), step, 0
    else:
      progress.evals_since_best += 1
    return better

  def should_stop(self, progress: _Progress) -> bool:
    return bool(self.patience) and progress.evals_since_best >= self.patience


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


def _restore_or_init(exp, ckpts: checkpoint.RunCheckpoints, init_run, data_key: str, log):
  """Returns (step, state, progress): this workdir's checkpoint > init_from's parameters > scratch."""
  config, task = exp.config, exp.task
  restart = config.ckpt.restart_if_unrestorable
  had_steps = bool(ckpts.latest.all_steps())
  restored = ckpts.latest.restore_latest(exp.abstract_state, keep_unrestorable=not restart)
  if restored is not None:
    step0, state, meta = restored
    run_files.check_resume_meta(meta, data_key, task.tokenizer, config, log)
    ckpts.last_good = step0
    log(f'resumed from step {step0} (checkpoint {ckpts.latest.directory / str(step0)})')
    progress = _Progress(**meta['progress'])
    if 'counted_step' not in meta['progress']:  # written before the cumulative counts existed
      progress.counted_step = step0
      for name in _COUNTS:
        setattr(progress, name, math.nan)
    return step0, state, progress
  if had_steps:
    log(f'WARNING: no checkpoint in {ckpts.latest.directory} restores; starting over '
        '(ckpt.restart_if_unrestorable=True)')
  state = exp.init_state()
  if init_run is not None:
    state = train_state.init_params_from(init_run, state, exp, log)
  log(f'initialized {config.model.size} {task.name} model: {exp.num_params / 1e6:.2f} M '
      f'parameters' + ('' if init_run is None else ' (pretrained weights from init_from)'))
  return 0, state, _Progress()


def _meta(exp, step: int, progress: _Progress, window, t_start: float, position: dict,
          meter: flops.Meter | None = None) -> dict:
  """Returns a checkpoint's meta at step; its counts (tokens_seen, cum_*) include unlogged steps.

  window: the summed metrics of the steps since the last log line; meter: their segment's.
  """
  config, data = exp.config, exp.data
  meta = {'step': step, 'seed': config.seed, 'cache_key': data.key, 'task': exp.task.name,
          'data': position,
          'tokenizer': exp.task.tokenizer.fingerprint, 'progress': dataclasses.asdict(progress)}
  meta['progress']['wall_time_s'] += time.perf_counter() - t_start
  if window is not None:  # the steps since the last log line
    host = jax.device_get(window)
    meta['progress']['tokens_seen'] += float(host['tokens'])
    counts = _window_counts(host, step - progress.counted_step, meter)
    meta['progress'].update({k: meta['progress'][k] + v for k, v in counts.items()})
  meta['progress']['counted_step'] = step
  return meta


def _window_counts(sums: dict, steps: int, meter: flops.Meter) -> dict[str, float]:
  """Returns what `steps` steps with summed metrics `sums` add to the cumulative counts.

  Every step counts its token slots and FLOPs (a skipped step computed them too); predictions
  count the steps that applied an update (a skipped step's sums are zero).
  """
  step_flops = round(meter.tokens_per_step * meter.flops_per_token)  # an integer up to float noise
  return {'cum_tokens': float(steps * meter.tokens_per_step), 'cum_flops': steps * step_flops,
          'cum_predictions': float(sums.get('weight', 0.0))}


def _record_start(workdir: pathlib.Path, config, exp, reporter, step0: int, prov: dict,
                  log) -> None:
  """Truncates metrics.jsonl to the step restored; writes config.json, task.json, provenance.json."""
  reporter.truncate_metrics(step0)
  if jax.process_index() == 0:
    run_files.write_config(workdir, config, log)
    run_files.atomic_write_json(workdir / 'task.json', {'task': exp.task.name, **exp.data.stats})
    run_files.record_provenance(workdir, {**prov, 'start_step': step0})
  task = exp.task
  reporter.hparams(schema.flatten(config.to_dict()),
                   [k for k, _, _ in task.progress_metrics]
                   + [k if '/' in k else f'eval/{k}' for k, _, _ in task.eval_metrics])


def _log_window(window, task, meter: flops.Meter, progress: _Progress, step: int, num_steps: int,
                epoch: float, where: str, reporter, log, data_record: dict | None = None) -> None:
  """Writes the metrics of a logging window (and data_record's) and prints the progress line."""
  host = jax.device_get(window)
  record = _window_record(host, task)
  if not math.isfinite(record['train/loss']) and host['steps'] > 0:  # skipped steps count 0
    raise FloatingPointError(
        f'non-finite training loss at step {step - meter.steps + 1}..{step}; last good '
        f'checkpoint: {where}. Lower optim.learning_rate or check the data.')
  progress.tokens_seen += float(host['tokens'])
  for name, add in _window_counts(host, step - progress.counted_step, meter).items():
    setattr(progress, name, getattr(progress, name) + add)
  progress.counted_step = step
  timing = meter.record(num_steps - step)
  record.update({k: v for k, v in timing.items() if k != 'eta_s'},
                **{'train/skipped_batches': float(progress.skipped_batches),
                   'train/epoch': epoch},
                **{f'train/{name}': getattr(progress, name) for name in _COUNTS},
                **(data_record or {}))
  reporter.write(step, record)
  log(f'step {step}/{num_steps} | {task.progress_text(record)} | '
      f'{record["train/tokens_per_s"] / 1e3:.1f}k tok/s | MFU {record["train/mfu"]:.1%} | '
      f'{record["train/step_time_s"] * 1e3:.0f} ms/step | ETA {run_files.fmt_time(timing["eta_s"])}')
  meter.reset()


def _window_record(sums: dict, task) -> dict[str, float]:
  """Returns the progress-line numbers from summed train metrics over a logging window."""
  s = {k: float(v) for k, v in sums.items()}
  n = max(s['steps'], 1.0)
  return {**task.window_record(s), 'train/grad_norm': s['grad_norm_sum'] / n,
          'train/lr': s['lr_sum'] / n, 'train/step_loss_mean': s['loss_mean_sum'] / n}


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)


class _Segments:
  """The run's segments (config.phases, batch warmup), each with its Experiment and data stream.

  A segment's stream starts where the tokens of the segments before it leave off in its own rows
  (for segments with the run's rows and batch: at the step itself), so the batch of every step
  is a pure function of (seed, step), wherever a run resumes.
  """

  def __init__(self, exp, make_exp: Callable):
    self.exp, self.make_exp = exp, make_exp
    self.segments = phases.plan(exp.config)
    self._exps = {}
    self._own = phases.config_of(exp.config, phases.Segment(0, 0, {}, 'run')).to_dict()
    for i, seg in enumerate(self.segments):  # every segment's data and checks before step 0
      try:
        e = self.exp_of(i)
      except ValueError as err:
        raise ValueError(f'{seg.label} (steps {seg.start}..{seg.end}): {err}') from err
      if jax.tree.map(lambda a: a.shape, e.abstract_state) != jax.tree.map(
          lambda a: a.shape, exp.abstract_state):
        raise ValueError(f'{seg.label}: its overrides {seg.overrides} change the model state')

  def index_at(self, step: int) -> int:
    """Returns the index of the segment that trains step (the last one past the end)."""
    return next((i for i, s in enumerate(self.segments) if step < s.end), len(self.segments) - 1)

  def exp_of(self, i: int):
    """Returns the Experiment of segment i (the run's own when its overrides change nothing)."""
    if i not in self._exps:
      cfg = phases.config_of(self.exp.config, self.segments[i])
      self._exps[i] = self.exp if cfg.to_dict() == self._own else self.make_exp(cfg)
    return self._exps[i]

  def stream_step(self, step: int) -> int:
    """Returns the position of step in its segment's stream of batches."""
    i = self.index_at(step)
    seg, cfg = self.segments[i], self.exp_of(i).config
    before = sum((s.end - s.start) * phases.tokens_per_step(self.exp_of(j).config)
                 for j, s in enumerate(self.segments[:i]))
    return before // phases.tokens_per_step(cfg) + step - seg.start

  def position(self, step: int) -> dict:
    """Returns {'epoch', 'offset'} of step's batch, and its segment when there are several."""
    e = self.exp_of(self.index_at(step))
    pos = input_pipeline.data_position(self.stream_step(step), len(e.data.train),
                                       e.config.train.batch_size)
    return pos if len(self.segments) == 1 else {**pos, 'segment': self.index_at(step)}

  def epoch(self, step: int) -> float:
    """Returns the epochs of step's stream read before step (train/epoch)."""
    e = self.exp_of(self.index_at(step))
    return self.stream_step(step) / input_pipeline.steps_per_epoch(
        len(e.data.train), e.config.train.batch_size)

  def mix_shares(self, first: int, end: int) -> dict[str, float]:
    """Returns {train/mix/<source>: its share of the rows of steps first..end-1} (data.mixture)."""
    e = self.exp_of(self.index_at(first))
    rows, batch = e.data.train, e.config.train.batch_size
    if not hasattr(rows, 'shares'):
      return {}
    shares = rows.shares(self.stream_step(first) * batch, (end - first) * batch, e.config.seed)
    return {f'train/mix/{name}': float(v) for name, v in zip(rows.names, shares)}

  def batches(self, step: int, seed: int, prefetch: int):
    """Returns the iterator of batches from step to the end of its segment."""
    e = self.exp_of(self.index_at(step))
    return input_pipeline.train_batches(
        e.data.train, global_batch=e.config.train.batch_size, seed=seed,
        start_step=self.stream_step(step), process_index=jax.process_index(),
        process_count=jax.process_count(), prefetch=prefetch)


def _budgeted_steps(config, steps: int, adapt, why: str, log) -> None:
  """Sets train.num_steps to what a budget affords, unless the command line set it too."""
  old = int(config.train.num_steps)
  if not adapt.allowed('train.num_steps') and steps != old:
    raise ValueError(f'train.num_steps={old} and a budget ({why}) both set the length of the '
                     'run; set one of them')
  config.train.num_steps = steps
  adapt.changes['train.num_steps'] = {'from': old, 'to': steps, 'why': why}
  log(f'budget: train.num_steps {old} -> {steps} ({why}); the schedule ends with the budget')


def _step_seconds(exp, seed: int, steps: int = 5) -> float:
  """Returns the mean time of one train step of exp, measured after two compiling steps."""
  state = exp.init_state()
  batches = input_pipeline.train_batches(exp.data.train, global_batch=exp.config.train.batch_size,
                                         seed=seed, process_index=jax.process_index(),
                                         process_count=jax.process_count())
  key = jax.random.key(seed)
  for i in range(2 + steps):
    if i == 2:
      jax.block_until_ready(state)
      t0 = time.perf_counter()
    state, _ = exp.train_step(state, sharding.global_batch(next(batches), exp.mesh), key)
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / steps


def _time_budget(exp, workdir: pathlib.Path, mesh) -> tuple[int, str]:
  """Returns (train.num_steps, why) that train.budget_minutes of steps afford, as measured.

  Data preparation, compilation and evaluations are not counted. The count is written to budget.json; a resumed run (checkpoints present) reads it back, so
  that its schedule is the one it started with.
  """
  config = exp.config
  minutes = float(config.train.budget_minutes)
  record = workdir / 'budget.json'
  saved = json.loads(record.read_text()) if record.exists() else {}
  if (workdir / 'checkpoints').is_dir() and saved.get('budget_minutes') == minutes:
    steps, times = int(saved['num_steps']), None
  else:
    shape = lambda c: (int(c.train.batch_size), int(c.train.seq_len),
                       int(c.train.grad_accum_steps))
    times = {}
    for seg in phases.plan(config, 1 << 30):  # every shape the run will train
      cfg = phases.config_of(config, seg)
      if shape(cfg) not in times:
        e = exp if shape(cfg) == shape(config) else experiment.setup(cfg, workdir, mesh,
                                                                      log=lambda _: None)
        times[shape(cfg)] = _step_seconds(e, config.seed)
    steps = phases.budget_steps(config, lambda c: times[shape(c)], minutes * 60)
  if jax.process_count() > 1:  # every process trains the steps that process 0 settled on
    steps = int(multihost_utils.broadcast_one_to_all(np.int64(steps)))
  if times is None:
    return steps, f'train.budget_minutes={minutes:g}, as measured at the start ({record})'
  if jax.process_index() == 0:
    run_files.atomic_write_json(record, {'budget_minutes': minutes, 'num_steps': steps,
                                         'step_seconds': {str(k): v for k, v in times.items()}})
  ms = ', '.join(f'{t * 1e3:.0f} ms' for t in times.values())
  return steps, f'train.budget_minutes={minutes:g} of steps at {ms} per step'


# ---------------------------------------------------------------------------------------------
# The run.


def run(config, workdir, *, stop_after: int | None = None, explicit=()) -> dict:
  """Trains (or resumes) the run of config.task in workdir; returns the summary also in summary.json.

  stop_after: end this invocation after that many steps (checkpointing first), as a crash would.
  SIGTERM/SIGINT during training (or JAX's multi-host preemption sync point) saves a checkpoint at
  the current step, waits for it to commit and returns with summary['preempted'] = True.
  An error that ends the run is appended to log.txt before it propagates.
  Defaults that do not fit the run (a warmup longer than train.num_steps, a vocabulary larger than
  the text supports) are changed with a note (mlmjax/adapt.py), except keys listed in `explicit`;
  config itself is not modified, config.json and summary['adapted'] record the changes.
  """
  try:
    config = copy.deepcopy(config)
    sharding.maybe_initialize_distributed(config)  # first: before anything touches a device
    mesh = sharding.make_mesh(config.mesh)
    with model.mesh_context(mesh):  # every step traced in the run sees the mesh
      return _run(config, workdir, mesh, stop_after=stop_after, explicit=explicit)
  except Exception as e:
    run_files.log_fatal(workdir, e, cli.USER_ERRORS)
    raise


def _run(config, workdir, mesh, *, stop_after: int | None, explicit) -> dict:
  """The body of run()."""
  # --- setup
  t_start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  run_files.check_writable(workdir)
  is_main = jax.process_index() == 0
  reporter = run_files.Reporter(workdir, enabled=is_main, wandb=config.wandb)
  log = reporter.log
  log(f'mlmjax: workdir {workdir} | task {config.task} | devices {jax.device_count()} '
      f'({jax.devices()[0].platform}) | mesh {dict(mesh.shape)} | processes {jax.process_count()}')
  _use_compilation_cache(config)
  prov = run_files.provenance()
  init_run = train_state.init_source(config.init_from) if config.init_from else None
  adapt = adapt_lib.Adaptations(explicit, log=log)
  if config.train.budget_tokens:
    steps = phases.budget_steps(config, phases.tokens_per_step, config.train.budget_tokens)
    _budgeted_steps(config, steps, adapt, f'train.budget_tokens={config.train.budget_tokens:,}',
                    log)
  if config.train.budget_minutes:  # steps measured on a first setup, then set up for them
    pristine = copy.deepcopy(config)
    exp = experiment.setup(config, workdir, mesh, log=log, init_run=init_run,
                           adapt=adapt_lib.Adaptations(explicit, log=lambda _: None))
    config = pristine
    steps, why = _time_budget(exp, workdir, mesh)
    _budgeted_steps(config, steps, adapt, why, log)
  exp = experiment.setup(config, workdir, mesh, log=log, init_run=init_run, adapt=adapt)
  adapt.apply(config)  # config.json records what runs
  task, data, num_steps = exp.task, exp.data, config.train.num_steps
  checkpoint.check_disk_space(workdir, exp.abstract_state, max_to_keep=config.ckpt.max_to_keep)
  segs = _Segments(exp, lambda cfg: experiment.setup(cfg, workdir, mesh, log=log))
  if len(segs.segments) > 1:
    log('segments of the run:\n' + phases.describe(segs.segments))
  early = _EarlyStop(config, task)
  keep_best = task.keeps_best or early.patience > 0

  def to_global(rows):  # evaluation rows: this process's part of each global batch
    part = input_pipeline.process_slice(len(rows), jax.process_index(), jax.process_count())
    return sharding.global_batch(rows[part], mesh)

  with checkpoint.RunCheckpoints(workdir, config.ckpt, keep_best=keep_best, log=log) as ckpts, \
       contextlib.closing(reporter):
    # --- restore or init; only then (checks passed) config.json, task.json, metrics.jsonl change
    step0, state, progress = _restore_or_init(exp, ckpts, init_run, data.key, log)
    _record_start(workdir, config, exp, reporter, step0, prov, log)
    if step0 == 0 and config.ckpt.keep_every:  # milestones start with the initial weights
      ckpts.save(0, state, _meta(exp, 0, progress, None, t_start, segs.position(0)))
    # pending: per-step `nonfinite` flags on the device; window_from: the window's first step
    step, window, window_from, pending = step0, None, step0, []

    def meta_of(step):
      return _meta(exp, step, progress, window, t_start, segs.position(step), meter)

    def run_eval(step):
      metrics = task.evaluate(exp.graphdef, state['params'], 'val', to_global)
      if not metrics:
        return None
      record = {k if '/' in k else f'eval/{k}': v for k, v in metrics.items() if _is_number(v)}
      ema, ema_metrics = optim.ema_params(state['opt_state']), None
      if ema is not None:  # the parameters' moving average answers the same questions
        ema_metrics = task.evaluate(exp.graphdef, ema, 'val', to_global)
        record.update({f'eval_ema/{k}': v for k, v in ema_metrics.items()
                       if _is_number(v) and '/' not in k})
      reporter.write(step, record)
      if 'loss' in metrics and metrics['loss'] < progress.best_eval_loss:
        progress.best_eval_loss, progress.best_eval_step = metrics['loss'], step
      if early.improved(progress, metrics, step):
        ckpts.save_best(step, state, meta_of(step))
      log(f'eval  step {step}: {task.eval_text(metrics)}' + (
          f' | best {early.metric} {progress.best_value:.4f} at step {progress.best_step}'
          if keep_best else ''))
      if ema_metrics is not None:
        log(f'eval  step {step} (EMA {config.optim.ema_decay}): {task.eval_text(ema_metrics)}')
      return record

    # --- the loop
    seed_key = jax.random.key(config.seed)
    seg_end, batches, meter, seg_exp = -1, None, None, exp

    def enter_segment(step):
      """Returns (end, batches, meter, exp) of the segment that trains step; logs it."""
      i = segs.index_at(step)
      e, seg = segs.exp_of(i), segs.segments[i]
      m = flops.Meter(e.config.train.batch_size * e.row_tokens, e.flops_per_token, e.enc_cfg.dtype)
      spe = input_pipeline.steps_per_epoch(len(e.data.train), e.config.train.batch_size)
      if step == step0:
        log(m.describe())
      log(f'training steps {step}..{seg.end if len(segs.segments) > 1 else num_steps}'
          + (f' ({seg.label})' if len(segs.segments) > 1 else '')
          + f' | batch {e.config.train.batch_size} x {e.config.train.seq_len} tokens | '
          f'{spe} steps per epoch | {e.task.describe()}')
      return seg.end, segs.batches(step, config.seed, config.data.prefetch), m, e

    eval_record = run_eval(0) if step0 == 0 and config.eval.at_start else None
    stop_at = num_steps if stop_after is None else min(num_steps, step0 + stop_after)
    if progress.early_stopped:
      log(f'this run stopped early at step {step0} (no improvement of {early.metric}); '
          'nothing to train')
      stop_at = step0
    max_wall, preempted = float(config.train.max_wall_minutes) * 60, False
    with checkpoint.StopRequest() as stop:
      while step < stop_at:
        if step == seg_end or batches is None:
          seg_end, batches, meter, seg_exp = enter_segment(step)
        state, sums = seg_exp.train_step(state, sharding.global_batch(next(batches), mesh),
                                         seed_key)
        pending.append(sums['nonfinite'])
        if window is None:
          window_from = step
        window = sums if window is None else jax.tree.map(jnp.add, window, sums)
        step += 1
        meter.steps += 1
        wall_stop = max_wall > 0 and time.perf_counter() - t_start > max_wall
        # A stop request at the last step changes nothing: the run just finishes.
        preempted = step < stop_at and (stop.signum is not None
                                        or checkpoint.reached_preemption_sync_point(step))
        done = step == stop_at or wall_stop or preempted
        log_now = step % config.train.log_every_steps == 0 or done or step == seg_end
        # Before every log line and every save, so that a checkpoint's skip count is exact.
        if log_now or step % config.ckpt.every_steps == 0:
          _count_nonfinite(jax.device_get(pending), step - len(pending) + 1, progress,
                           config.train.max_skipped_batches, ckpts.where(), log)
          pending = []
        if log_now:
          _log_window(window, task, meter, progress, step, num_steps, segs.epoch(step),
                      ckpts.where(), reporter, log, segs.mix_shares(window_from, step))
          window = None
        if step % config.eval.every_steps == 0 or step == num_steps:
          eval_record = run_eval(step)
          meter.reset()
          if early.should_stop(progress) and step < num_steps:
            progress.early_stopped = done = True
            log(f'early stopping at step {step}: {early.metric} has not improved by more than '
                f'{early.min_delta} for {early.patience} evaluations; best '
                f'{progress.best_value:.4f} at step {progress.best_step} (kept in {workdir / "best"})')
        if step % config.ckpt.every_steps == 0 or done:
          ckpts.save(step, state, meta_of(step))
          meter.reset()
        if preempted:
          ckpts.latest.wait()
          why = signal.Signals(stop.signum).name if stop.signum is not None else 'preemption sync point'
          log(f'preempted at step {step} ({why}): checkpoint saved to '
              f'{ckpts.latest.directory / str(step)}, rerun the same command to resume')
        elif wall_stop:
          log(f'stopping at step {step}: train.max_wall_minutes={config.train.max_wall_minutes} '
              'reached')
        if progress.early_stopped or preempted or wall_stop:
          break

  # --- finish
  progress.wall_time_s += time.perf_counter() - t_start
  finished = step >= num_steps or progress.early_stopped
  if eval_record is None and finished:
    eval_record = run_eval(step)
  summary = _summary(exp, progress, step, prov, finished=finished, preempted=preempted,
                     best_metric=early.metric if keep_best else None)
  summary['adapted'] = adapt.changes
  summary.update(eval_record or {})
  if finished and len(data.test):
    summary.update(_test_with_best(exp, state, ckpts.best, to_global, log))
  if finished:
    summary.update({f'baseline/{k}': v for k, v in task.baselines().items()})
  reporter.finish(summary)
  if is_main:
    run_files.atomic_write_json(workdir / 'summary.json', summary)
    table = task.final_text(summary) if finished or eval_record else None
    if table:
      log(table)
  return summary


def _summary(exp, progress: _Progress, step: int, prov: dict, *, finished: bool,
             preempted: bool, best_metric: str | None) -> dict:
  """Returns the summary.json entries of the run's state (evaluation and test numbers come after)."""
  config, task = exp.config, exp.task
  summary = {'step': step, 'num_steps': config.train.num_steps, 'finished': finished,
             'preempted': preempted, 'task': task.name, 'early_stopped': progress.early_stopped,
             'tokens_seen': progress.tokens_seen, 'wall_time_s': progress.wall_time_s,
             'num_params': exp.num_params, 'best_eval_loss': progress.best_eval_loss,
             'best_eval_step': progress.best_eval_step, 'variant': config.variant,
             'skipped_batches': progress.skipped_batches, 'init_from': config.init_from,
             'data': exp.data.stats, 'provenance': prov, **task.summary_extras()}
  if best_metric is not None:
    summary.update(best_metric=best_metric, best_value=progress.best_value,
                   best_step=progress.best_step)
  return summary


def _use_compilation_cache(config) -> None:
  """Points JAX's persistent compilation cache at the data cache, unless one is set already."""
  if not jax.config.jax_compilation_cache_dir:
    # Reruns, resumes and sweeps reuse compiled steps instead of paying XLA's compile again.
    jax.config.update('jax_compilation_cache_dir', str(input_pipeline.cache_root(config.data) / 'xla'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def _test_with_best(exp, state, best: checkpoint.Checkpointer | None, to_global, log) -> dict:
  """Returns test/* metrics of the best checkpoint's parameters (the final ones when none is kept)."""
  params, which = state['params'], 'final'
  if best is not None:
    try:
      step, params, _ = checkpoint.restore_params_in(best.directory, exp.abstract_state['params'],
                                                     what='best/', log=log)
      which = f'best (step {step})'
    except FileNotFoundError:
      pass  # no evaluation improved on nothing: the final parameters
  metrics = exp.task.evaluate(exp.graphdef, params, 'test', to_global)
  out = {f'test/{k}': v for k, v in metrics.items() if _is_number(v)}
  if 'per_class' in metrics:
    out['test/per_class'] = metrics['per_class']
  out['test/parameters'] = which
  log(f'test ({which} parameters): {exp.task.eval_text(metrics)}')
  return out


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv=None) -> None:
  """Parses --config/--workdir flags and calls run() (or the compile check with --dry_run)."""

  def define(flags, flag_values):
    flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.',
                        flag_values=flag_values)
    flags.DEFINE_bool('dry_run', False, 'Compile the train step for the mesh from abstract shapes, '
                      'print per-device memory and FLOPs, and exit without training.',
                      flag_values=flag_values)
    flags.DEFINE_string('topology', '', 'With --dry_run: compile for a named TPU topology, e.g. '
                        'v5e:2x2 (needs libtpu).', flag_values=flag_values)

  f = cli.parse_flags(argv, define, prog='mlmjax.train')
  explicit = cli.override_keys(argv)
  if f.config is None or (f.workdir is None and not f.dry_run):
    cli.fail('usage: python -m mlmjax.train --config configs/pretrain.py:tiny --workdir runs/demo '
             '[--config.KEY=VALUE ...] [--dry_run [--topology v5e:2x2]]')
  if f.topology and not f.dry_run:
    cli.fail('error: --topology only applies with --dry_run')
  with cli.user_errors():
    if f.dry_run:
      report = compile_check.compile_report(f.config, topology=f.topology, explicit=explicit)
      print(compile_check.format_report(report), flush=True)
      return
    run(f.config, f.workdir, explicit=explicit)


if __name__ == '__main__':
  main()
