"""Optax chains for pretraining and adaptation: AdamW, LAMB, StableAdamW, schedules, decay masks."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

DECAYS = ('linear', 'cosine', '1-sqrt', 'constant')
OPTIMIZERS = ('adamw', 'lamb', 'stable_adamw')


def _one_minus_sqrt(peak: float, end: float, steps: int) -> optax.Schedule:
  """Returns end + (peak - end) * (1 - sqrt(t / steps)), held at end after steps."""
  def schedule(t):
    frac = jnp.clip(jnp.asarray(t, jnp.float32) / steps, 0.0, 1.0)
    return end + (peak - end) * (1.0 - jnp.sqrt(frac))
  return schedule


def learning_rate_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """Returns linear warmup from 0 to the peak, a stable phase, then the decay to the end lr.

  optim.decay_steps = 0 decays over everything after the warmup (no stable phase); N > 0 keeps
  the peak until the last N steps (warmup-stable-decay), as does optim.decay_fraction f > 0 for
  the last f * num_steps (at most all after the warmup). 'constant' never decays.
  """
  peak = float(optim_cfg.learning_rate)
  warmup = int(optim_cfg.warmup_steps)
  end = peak * float(optim_cfg.end_lr_fraction)
  if optim_cfg.decay not in DECAYS:
    raise ValueError(f'optim.decay={optim_cfg.decay!r}: choose one of {DECAYS}')
  if peak <= 0:
    raise ValueError(f'optim.learning_rate={peak} must be > 0')
  if warmup < 0:
    raise ValueError(f'optim.warmup_steps={warmup} must be >= 0')
  after_warmup = max(num_steps - warmup, 1)
  fraction = float(optim_cfg.get('decay_fraction', 0.0))
  if fraction and optim_cfg.decay_steps:
    raise ValueError(f'optim.decay_steps={optim_cfg.decay_steps} and optim.decay_fraction='
                     f'{fraction} both set the decay; set one of them')
  decay_steps = (min(max(round(fraction * num_steps), 1), after_warmup) if fraction
                 else int(optim_cfg.decay_steps) or after_warmup)
  if decay_steps > after_warmup:
    raise ValueError(f'optim.decay_steps={decay_steps} exceeds the {after_warmup} steps after '
                     f'the warmup of train.num_steps={num_steps}; lower it (0 = all of them)')
  if optim_cfg.decay == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif optim_cfg.decay == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
  elif optim_cfg.decay == '1-sqrt':
    decay = _one_minus_sqrt(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  parts, boundaries = [], []
  if warmup:
    parts.append(optax.linear_schedule(0.0, peak, warmup))
  stable = after_warmup - decay_steps
  if stable > 0 and optim_cfg.decay != 'constant':
    boundaries.append(warmup)
    parts.append(optax.constant_schedule(peak))
  boundaries.append(warmup + (stable if stable > 0 else 0))
  parts.append(decay)
  if len(parts) == 1:
    return parts[0]
  return optax.join_schedules(parts, boundaries[-(len(parts) - 1):])


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


class EmaParamsState(NamedTuple):
  """An exponential moving average of the parameters, kept in the optimizer state."""
  ema: Any


def ema_of_params(decay: float) -> optax.GradientTransformation:
  """Returns a transformation that passes updates through and tracks the EMA of the parameters.

  Last in a chain, it sees the final updates: ema <- decay * ema + (1 - decay) * (params +
  updates), starting from the initial parameters (no bias correction). Being optimizer state, it
  is checkpointed, sharded like the parameters and resumed exactly.
  """
  def init(params):
    return EmaParamsState(ema=jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params))

  def update(updates, state, params=None):
    ema = jax.tree.map(lambda e, p, u: decay * e + (1.0 - decay) * (p + u),
                       state.ema, params, updates)
    return updates, EmaParamsState(ema=ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state):
  """Returns the EMA parameters held in an optimizer state, or None when it keeps none."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaParamsState))
           if isinstance(s, EmaParamsState)]
  return found[0].ema if found else None


def scale_by_stable_adam(b1: float, b2: float, eps: float, weight_decay: float,
                         mask=decay_mask) -> optax.GradientTransformation:
  """Returns StableAdamW's unscaled step: Adam plus masked decay, per tensor over max(1, RMS_t)."""
  inner = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                      optax.add_decayed_weights(weight_decay, mask))

  def update(grads, state, params=None):
    updates, state = inner.update(grads, state, params)
    adam = state[0]
    # Wortsman et al. 2023, Algorithm 2: RMS_t = sqrt(mean(g_t^2 / max(v_hat_t, eps^2))) per
    # tensor, with v_hat_t the bias-corrected second moment that already includes g_t. It is ~1
    # while gradients stay near their running scale and > 1 when one spikes past it; dividing the
    # whole step (Adam update and decoupled decay alike) by max(1, RMS_t) clips that step.
    nu_hat = optax.tree.bias_correction(adam.nu, b2, adam.count)

    def clip(u, g, v):
      rms = jnp.sqrt(jnp.mean(jnp.square(g.astype(jnp.float32))
                              / jnp.maximum(v.astype(jnp.float32), eps * eps)))
      return u / jnp.maximum(rms, 1.0).astype(u.dtype)

    return jax.tree.map(clip, updates, grads, nu_hat), state

  return optax.GradientTransformation(inner.init, update)


def _lamb(schedule, b1: float, b2: float, eps: float,
          weight_decay: float) -> optax.GradientTransformation:
  """Returns LAMB (You et al. 2020) from optax parts, the trust ratio on decayed leaves only."""
  # optax.lamb applies the trust ratio ||p|| / ||adam + wd p|| to every leaf. LAMB's BERT
  # practice (the reference optimizer's exclude_from_layer_adaptation, which defaults to its
  # weight-decay exclusions) leaves LayerNorm scales and biases out, and so does this: a bias
  # starts at 0, so after its first step ||p|| ~ lr ||u|| and the ratio would all but freeze it.
  # Those leaves take the plain Adam step.
  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                     optax.add_decayed_weights(weight_decay, decay_mask),
                     optax.masked(optax.scale_by_trust_ratio(), decay_mask),
                     optax.scale_by_learning_rate(schedule))


def make_optimizer(optim_cfg, num_steps: int) -> optax.GradientTransformation:
  """Returns optim.optimizer with global-norm clipping and the lr schedule (and the EMA tracker)."""
  name = optim_cfg.optimizer
  if name not in OPTIMIZERS:
    raise ValueError(f'optim.optimizer={name!r}: choose one of {OPTIMIZERS}')
  schedule = learning_rate_schedule(optim_cfg, num_steps)
  b1, b2, eps = float(optim_cfg.b1), float(optim_cfg.b2), float(optim_cfg.eps)
  weight_decay = float(optim_cfg.weight_decay)
  parts = []
  if optim_cfg.grad_clip_norm and optim_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip_norm)))
  if name == 'adamw':
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
  elif name == 'lamb':
    parts.append(_lamb(schedule, b1, b2, eps, weight_decay))
  else:
    parts += [scale_by_stable_adam(b1, b2, eps, weight_decay),
              optax.scale_by_learning_rate(schedule)]
  if optim_cfg.ema_decay:
    parts.append(ema_of_params(float(optim_cfg.ema_decay)))
  return optax.chain(*parts)
