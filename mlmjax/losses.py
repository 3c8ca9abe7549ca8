"""Weighted MLM losses and metrics as (sum, weight) pairs, normalized only after summing."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Masking kinds of a prediction slot, in the order masking.py numbers them (0, 1, 2).
KINDS = ('mask', 'random', 'keep')


def cross_entropy_sum(logits: jax.Array, labels: jax.Array,
                      weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (sum of weighted negative log-likelihoods, sum of weights), both float32."""
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  # mode='clip': a padding slot's label may be any id; its weight is 0 and it must not read NaN.
  label_logit = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1,
                                    mode='clip')[..., 0]
  nll = jnp.where(weights != 0, lse - label_logit, 0.0)
  return jnp.sum(nll * weights), jnp.sum(weights)


def z_loss_sum(logits: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (sum of weighted logsumexp(logits)^2, sum of weights), both float32."""
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  # PaLM's auxiliary z-loss (Chowdhery et al. 2022): a penalty on log(Z)^2 keeps the softmax
  # normalizer near 1, which they found stabilizes training.
  lse = jax.nn.logsumexp(logits, axis=-1)
  z2 = jnp.where(weights != 0, jnp.square(lse), 0.0)
  return jnp.sum(z2 * weights), jnp.sum(weights)


def _correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def accuracy_sum(logits: jax.Array, labels: jax.Array,
                 weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (weighted count of argmax hits, sum of weights), both float32."""
  weights = weights.astype(jnp.float32)
  return jnp.sum(_correct(logits, labels) * weights), jnp.sum(weights)


def mlm_metric_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                    kinds: jax.Array) -> dict[str, jax.Array]:
  """Returns float32 sums: loss_sum, weight, correct, and correct_/count_ per masking kind."""
  weights = weights.astype(jnp.float32)
  loss_sum, weight = cross_entropy_sum(logits, labels, weights)
  hits = _correct(logits, labels) * weights
  sums = {'loss_sum': loss_sum, 'weight': weight, 'correct': jnp.sum(hits)}
  for k, name in enumerate(KINDS):
    is_kind = (kinds == k).astype(jnp.float32)
    sums[f'correct_{name}'] = jnp.sum(hits * is_kind)
    sums[f'count_{name}'] = jnp.sum(weights * is_kind)
  return sums


def _ratio(num: float, den: float) -> float:
  return num / den if den > 0 else math.nan


def finalize_metrics(sums: dict[str, Any]) -> dict[str, float]:
  """Returns loss, accuracy, perplexity, per-kind accuracies, any z_loss (nan: nothing counted)."""
  s = {k: float(np.asarray(v)) for k, v in sums.items()}
  loss = _ratio(s['loss_sum'], s['weight'])
  out = {
      'loss': loss,
      'accuracy': _ratio(s['correct'], s['weight']),
      # exp overflows a float near 709.8; a loss that large means the run has diverged anyway.
      'perplexity': math.exp(loss) if loss < 709.0 else (math.nan if math.isnan(loss) else math.inf),
  }
  if 'z_loss_sum' in s:  # the coefficient-scaled z term, added to the trained objective
    out['z_loss'] = _ratio(s['z_loss_sum'], s['weight'])
  for name in KINDS:
    if f'count_{name}' in s:
      out[f'accuracy_at_{name}'] = _ratio(s[f'correct_{name}'], s[f'count_{name}'])
  return out
