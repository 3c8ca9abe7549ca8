"""Optax chains for pretraining and adaptation: schedules, decay masks, clipping."""

import jax
import optax

DECAYS = ('linear', 'cosine', 'constant')


def learning_rate_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """Returns linear warmup from 0 to the peak, then linear/cosine decay or a constant."""
  peak = float(optim_cfg.learning_rate)
  warmup = int(optim_cfg.warmup_steps)
  end = peak * float(optim_cfg.end_lr_fraction)
  if optim_cfg.decay not in DECAYS:
    raise ValueError(f'optim.decay={optim_cfg.decay!r}: choose one of {DECAYS}')
  if peak <= 0:
    raise ValueError(f'optim.learning_rate={peak} must be > 0')
  if warmup < 0:
    raise ValueError(f'optim.warmup_steps={warmup} must be >= 0')
  decay_steps = max(num_steps - warmup, 1)
  if optim_cfg.decay == 'linear':
    after = optax.linear_schedule(peak, end, decay_steps)
  elif optim_cfg.decay == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


# Leaf names never decayed whatever their rank: attention q/k/v biases are (heads, head_dim).
_NO_DECAY_NAMES = ('bias', 'scale')


def _leaf_name(path) -> str | None:
  """Returns the last dict key or attribute name of a pytree path, or None."""
  last = path[-1] if path else None
  return getattr(last, 'key', getattr(last, 'name', None))


def decay_mask(params):
  """Returns a tree of bools: True for matrices (kernels, embeddings), False for LayerNorm and biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and _leaf_name(path) not in _NO_DECAY_NAMES, params)


def make_optimizer(optim_cfg, num_steps: int) -> optax.GradientTransformation:
  """Returns AdamW with global-norm clipping and the warmup/decay schedule."""
  schedule = learning_rate_schedule(optim_cfg, num_steps)
  parts = []
  if optim_cfg.grad_clip_norm and optim_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                           eps=float(optim_cfg.eps), weight_decay=float(optim_cfg.weight_decay),
                           mask=decay_mask))
  return optax.chain(*parts)
