"""Phases of one run: per-step-range overrides of the sequence length, batch and masking.

  segments = plan(config)              # config.phases and the batch warmup, cut at every boundary
  config_of(config, segments[i])       # the run's config with that segment's overrides
  steps = budget_steps(config, cost)   # train.num_steps that a token or time budget affords

A phase is a dict: 'until' (the step it ends at, an int; or a float in (0, 1], a fraction of
train.num_steps; the last phase may omit it) and dotted keys from PHASE_KEYS or masking.*. The
batch warmup (train.batch_warmup_steps) adds boundaries where the batch doubles. The optimizer,
its schedule and the parameters are one for the whole run; the data of a segment is its own
stream (`Stream`), a pure function of (seed, step).
"""

import copy
import dataclasses
from typing import Any, Callable

# Keys a phase may set (besides any masking.* key); the rest of the config is the run's.
PHASE_KEYS = ('train.seq_len', 'train.batch_size', 'train.grad_accum_steps')
_PREFIXES = ('masking.',)


@dataclasses.dataclass(frozen=True)
class Segment:
  """Steps [start, end) trained with the run's config plus `overrides` (dotted keys)."""
  start: int
  end: int
  overrides: dict[str, Any]
  label: str  # 'phase 2/3', with the batch warmup's batch when it applies


def _until(phase: dict, i: int, num_steps: int, last: bool) -> int:
  """Returns the end step of phases[i] ('until' as a step or a fraction of the run)."""
  until = phase.get('until')
  if until is None:
    if not last:
      raise ValueError(f"phases[{i}]: needs 'until' (the step it ends at); only the last phase "
                       'may omit it')
    return num_steps
  if isinstance(until, bool) or not isinstance(until, (int, float)):
    raise ValueError(f"phases[{i}]: 'until'={until!r} must be a step (int) or a fraction of "
                     'train.num_steps (float in (0, 1])')
  if isinstance(until, float):
    if not 0 < until <= 1:
      raise ValueError(f"phases[{i}]: 'until'={until} as a fraction of train.num_steps must be "
                       'in (0, 1]')
    return max(1, round(until * num_steps))
  return int(until)


def _check_keys(phase: dict, i: int) -> dict[str, Any]:
  """Returns the overrides of phases[i]; raises for keys a phase may not set."""
  if not isinstance(phase, dict):
    raise ValueError(f"phases[{i}]={phase!r}: each phase is a dict such as "
                     "{'until': 1000, 'train.seq_len': 128}")
  overrides = {k: v for k, v in phase.items() if k != 'until'}
  for key in overrides:
    if key not in PHASE_KEYS and not key.startswith(_PREFIXES):
      raise ValueError(f'phases[{i}]: {key!r} cannot change between phases; a phase sets '
                       f'{", ".join(PHASE_KEYS)} or masking.* keys')
  return overrides


def _phases(config, num_steps: int) -> list[tuple[int, dict]]:
  """Returns [(end step, overrides)] of config.phases (one phase without overrides when empty)."""
  phases = list(config.phases)
  if not phases:
    return [(num_steps, {})]
  out, prev = [], 0
  for i, phase in enumerate(phases):
    overrides = _check_keys(phase, i)
    end = _until(phase, i, num_steps, last=i == len(phases) - 1)
    if end <= prev:
      raise ValueError(f"phases[{i}]: 'until' ends at step {end}, not after the previous "
                       f'phase (step {prev})')
    out.append((end, overrides))
    prev = end
  if prev != num_steps:
    raise ValueError(f"phases[{len(phases) - 1}]: the last phase ends at step {prev}, the run at "
                     f"train.num_steps={num_steps}; end it there (or omit its 'until')")
  return out


def _batch_warmup(config, num_steps: int) -> list[tuple[int, int]]:
  """Returns [(end step, batch size)] of the batch warmup; one entry (the run's batch) when off."""
  t = config.train
  steps, full = int(t.batch_warmup_steps), int(t.batch_size)
  if not steps:
    return [(num_steps, full)]
  first = int(t.batch_warmup_from) or full
  if first >= full or full % first or (full // first) & (full // first - 1):
    raise ValueError(f'train.batch_warmup_from={t.batch_warmup_from} must be train.batch_size='
                     f'{full} divided by a power of two (the batch doubles)')
  if steps >= num_steps:
    raise ValueError(f'train.batch_warmup_steps={steps} must be less than train.num_steps='
                     f'{num_steps}')
  sizes = []
  while first < full:
    sizes.append(first)
    first *= 2
  # Equal shares of the warmup per size, then the full batch for the rest of the run.
  ends = [round(steps * (k + 1) / len(sizes)) for k in range(len(sizes))]
  return [*zip(ends, sizes), (num_steps, full)]


def plan(config, num_steps: int | None = None) -> list[Segment]:
  """Returns the run's segments: config.phases cut where the batch warmup doubles the batch."""
  num_steps = int(config.train.num_steps if num_steps is None else num_steps)
  phases = _phases(config, num_steps)
  warmup = _batch_warmup(config, num_steps)
  named = len(phases) > 1
  segments, start = [], 0
  for end in sorted({e for e, _ in phases} | {e for e, _ in warmup}):
    p = next(i for i, (e, _) in enumerate(phases) if end <= e)
    overrides = dict(phases[p][1])
    batch = next(b for e, b in warmup if end <= e)
    if len(warmup) > 1 and batch != config.train.batch_size:
      if 'train.batch_size' in overrides:
        raise ValueError(f'phases[{p}] sets train.batch_size during train.batch_warmup_steps; '
                         'use one or the other')
      overrides['train.batch_size'] = batch
    label = f'phase {p + 1}/{len(phases)}' if named else 'run'
    if 'train.batch_size' in overrides and len(warmup) > 1 and batch != config.train.batch_size:
      label += f' (batch warmup: {batch})'
    segments.append(Segment(start, end, overrides, label))
    start = end
  return segments


def config_of(config, segment: Segment):
  """Returns a copy of config with the segment's overrides (and no phases of its own)."""
  out = copy.deepcopy(config)
  out.unlock()
  out.phases = ()
  out.train.batch_warmup_steps = out.train.batch_warmup_from = 0
  out.update_from_flattened_dict(segment.overrides)
  out.lock()
  return out


def tokens_per_step(config) -> int:
  """Returns the token slots of one step: batch_size x seq_len."""
  return int(config.train.batch_size) * int(config.train.seq_len)


def budget_steps(config, step_cost: Callable[[Any], float], budget: float,
                 *, upper: int = 1 << 40) -> int:
  """Returns the largest train.num_steps whose segments cost at most `budget` (at least 1).

  step_cost(segment config) -> the cost of one step of it (tokens, seconds). The cost of a plan is
  monotone in the number of steps, so a bisection finds the largest affordable one.
  """
  def cost(n):
    try:
      segments = plan(config, n)
    except ValueError:  # too few steps for the fixed boundaries: more are needed anyway
      return 0.0
    return sum((s.end - s.start) * step_cost(config_of(config, s)) for s in segments)

  low, high = 1, 1
  while high < upper and cost(high) <= budget:
    low, high = high, high * 2
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if cost(mid) <= budget else (low, mid)
  try:
    plan(config, low)
  except ValueError as e:
    raise ValueError(f'the budget affords {low} steps, too few for the run: {e}') from e
  return low


def describe(segments: list[Segment]) -> str:
  """Returns one line per segment: its steps and overrides."""
  return '\n'.join(f'  {s.label}: steps {s.start}..{s.end}'
                   + ''.join(f' | {k}={v}' for k, v in s.overrides.items()) for s in segments)
