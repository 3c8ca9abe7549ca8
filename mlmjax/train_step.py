"""The train step: a pure function of (state, rows, seed key) over a task's batch loss, jitted by setup().

Masks and dropout come from split(fold_in(seed_key, step)): a resumed run re-creates exactly the
masks and dropout it would have drawn. With gradient accumulation the batch is scanned as
microbatches and the update is the large-batch one.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mlmjax import masking


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


def make_step(graphdef, tx, schedule, batch_loss: Callable, *, step_sums: Callable | None = None,
              dropout: bool, grad_accum_steps: int = 1, token_columns: int | None = None,
              pad_id: int = 0) -> Callable:
  """Returns train_step(state, rows, seed_key) -> (state, metric sums) for a task's batch_loss.

  batch_loss(model, rows, mask_key, drop_key, step) -> (loss_sum, weight, sums); the update
  follows the gradient of sum(loss_sum) / sum(weight). grad_accum_steps k > 1: the batch is k
  microbatches (`microbatches`) run one after another in a lax.scan, microbatch i with keys
  fold_in(key, i); the update is the large-batch one, with the memory of one microbatch.
  A step whose loss or gradient norm is not finite applies no update (flag `nonfinite`).
  token_columns: the leading columns of a row that hold tokens (tokens/s); None = all.
  pad_id: the tokenizer's [PAD], not counted as a token.
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
                tokens=jnp.sum(token_rows != pad_id).astype(jnp.float32))
    # Zeroed on a skipped step, so that the window's metrics stay finite.
    sums = {name: jnp.where(ok, v, jnp.zeros_like(v)) for name, v in sums.items()}
    # 0: applied; 1: non-finite loss; 2: finite loss, non-finite gradient norm.
    sums['nonfinite'] = jnp.where(ok, 0.0, jnp.where(jnp.isfinite(loss), 2.0, 1.0))
    new_state = {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}
    return new_state, sums

  return train_step
