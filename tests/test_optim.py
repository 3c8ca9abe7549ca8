"""Tests of mlmjax.optim: schedules, the weight-decay mask, AdamW decay and global-norm clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import pretrain
from mlmjax import model, optim, train_state


def _optim_cfg(**fields):
  """Returns the tiny config's optim section with `fields` set."""
  cfg = pretrain.get_config('tiny').optim
  for key, value in fields.items():
    setattr(cfg, key, value)
  return cfg


def _at(schedule, step: int) -> float:
  return float(schedule(jnp.asarray(step, jnp.int32)))


@pytest.mark.parametrize('decay', optim.DECAYS)
def test_warmup_rises_linearly_from_zero_to_peak(decay):
  peak, warmup = 3e-3, 40
  s = optim.learning_rate_schedule(_optim_cfg(learning_rate=peak, warmup_steps=warmup,
                                              decay=decay, end_lr_fraction=0.1), 200)
  assert _at(s, 0) == 0.0
  for step in (1, 10, 25, 39):
    assert _at(s, step) == pytest.approx(peak * step / warmup, rel=1e-5)
  assert _at(s, warmup) == pytest.approx(peak, rel=1e-6)


def test_linear_decay_reaches_end_fraction_at_num_steps():
  peak, warmup, num_steps, frac = 1e-3, 10, 110, 0.2
  s = optim.learning_rate_schedule(_optim_cfg(learning_rate=peak, warmup_steps=warmup,
                                              decay='linear', end_lr_fraction=frac), num_steps)
  end = frac * peak
  for step in (10, 35, 60, 109, 110):
    t = (step - warmup) / (num_steps - warmup)
    assert _at(s, step) == pytest.approx(peak + (end - peak) * t, rel=1e-5), step
  assert _at(s, num_steps) == pytest.approx(end, rel=1e-5)
  assert _at(s, num_steps + 50) == pytest.approx(end, rel=1e-5)  # held after the end


def test_cosine_decay_reaches_end_fraction_at_num_steps():
  peak, warmup, num_steps, frac = 2e-3, 20, 220, 0.05
  s = optim.learning_rate_schedule(_optim_cfg(learning_rate=peak, warmup_steps=warmup,
                                              decay='cosine', end_lr_fraction=frac), num_steps)
  end = frac * peak
  for step in (20, 70, 120, 170, 219, 220):
    t = (step - warmup) / (num_steps - warmup)
    expected = end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    assert _at(s, step) == pytest.approx(expected, rel=1e-5), step
  assert _at(s, 120) == pytest.approx((peak + end) / 2, rel=1e-5)  # halfway: the mean


def test_constant_after_warmup_and_no_warmup():
  peak = 5e-4
  s = optim.learning_rate_schedule(_optim_cfg(learning_rate=peak, warmup_steps=4,
                                              decay='constant'), 100)
  assert [_at(s, k) for k in (0, 2)] == pytest.approx([0.0, peak / 2], rel=1e-6)
  for step in (4, 50, 100, 1000):
    assert _at(s, step) == pytest.approx(peak, rel=1e-6)
  s0 = optim.learning_rate_schedule(_optim_cfg(learning_rate=peak, warmup_steps=0,
                                               decay='linear', end_lr_fraction=0.0), 100)
  assert _at(s0, 0) == pytest.approx(peak, rel=1e-6)
  assert _at(s0, 50) == pytest.approx(peak / 2, rel=1e-5)
  assert _at(s0, 100) == pytest.approx(0.0, abs=1e-12)


def _closed_form(step: int, *, peak, end, warmup, stable_end, num_steps, decay) -> float:
  """The warmup-stable-decay learning rate at step, written out."""
  if step < warmup:
    return peak * step / warmup
  if step < stable_end:
    return peak
  t = min((step - stable_end) / (num_steps - stable_end), 1.0)
  shape = {'linear': 1 - t, 'cosine': 0.5 * (1 + math.cos(math.pi * t)), '1-sqrt': 1 - math.sqrt(t)}
  return end + (peak - end) * shape[decay]


@pytest.mark.parametrize('decay', ['linear', 'cosine', '1-sqrt'])
@pytest.mark.parametrize('warmup,decay_steps', [(20, 60), (0, 60), (20, 0), (20, 180)])
def test_warmup_stable_decay_equals_its_closed_form(decay, warmup, decay_steps):
  peak, num_steps, frac = 2e-3, 200, 0.1
  s = optim.learning_rate_schedule(_optim_cfg(learning_rate=peak, warmup_steps=warmup,
                                              decay=decay, decay_steps=decay_steps,
                                              end_lr_fraction=frac), num_steps)
  stable_end = num_steps - decay_steps if decay_steps else warmup
  for step in (0, 5, 19, 20, 21, 80, 139, 140, 141, 150, 170, 199, 200, 260):
    expected = _closed_form(step, peak=peak, end=frac * peak, warmup=warmup,
                            stable_end=stable_end, num_steps=num_steps, decay=decay)
    assert _at(s, step) == pytest.approx(expected, rel=1e-5, abs=1e-12), step
  if decay_steps and decay_steps < num_steps - warmup:
    assert _at(s, num_steps - decay_steps - 1) == pytest.approx(peak, rel=1e-6)  # stable phase


def test_decay_longer_than_the_run_after_warmup_is_refused():
  with pytest.raises(ValueError, match=r'optim.decay_steps=190 exceeds the 180 steps'):
    optim.learning_rate_schedule(_optim_cfg(warmup_steps=20, decay_steps=190), 200)


@pytest.mark.parametrize('field,value,needle', [
    ('decay', 'step', 'optim.decay'),
    ('learning_rate', 0.0, 'optim.learning_rate'),
    ('learning_rate', -1e-3, 'optim.learning_rate'),
    ('warmup_steps', -1, 'optim.warmup_steps'),
])
def test_bad_values_name_the_key(field, value, needle):
  cfg = _optim_cfg(**{field: value})
  for build in (optim.learning_rate_schedule, optim.make_optimizer):
    with pytest.raises(ValueError, match=needle) as e:
      build(cfg, 100)
    assert len(str(e.value).splitlines()) <= 2


def test_decay_mask_on_the_encoder_parameters():
  _, param_state = train_state.abstract_model(model.encoder_config('tiny', vocab_size=64), seed=0)
  params = nnx.to_pure_dict(param_state)
  mask = optim.decay_mask(params)
  flat = {jax.tree_util.keystr(p): (m, x.shape) for (p, m), x in
          zip(jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(params))}
  for name, (decayed, shape) in flat.items():
    is_norm_or_bias = name.endswith("['bias']") or name.endswith("['scale']")
    assert decayed == (not is_norm_or_bias), (name, shape)
  enc = "['encoder']"
  assert flat[f"{enc}['token_embed']"][0] and flat[f"{enc}['position_embed']"][0]
  assert flat[f"{enc}['layers'][0]['mlp']['intermediate']['kernel']"][0]
  assert not flat[f"{enc}['embed_norm']['scale']"][0]
  assert not flat[f"{enc}['layers'][0]['mlp']['output']['bias']"][0]
  # The query bias is (heads, head_dim): a bias, so undecayed despite being 2-D.
  name = f"{enc}['layers'][0]['attention']['query']['bias']"
  assert flat[name][1] == (2, 64) and not flat[name][0]


def test_adamw_decays_only_masked_in_leaves():
  lr, wd = 0.1, 0.5
  cfg = _optim_cfg(learning_rate=lr, warmup_steps=0, decay='constant', weight_decay=wd,
                   grad_clip_norm=1.0)
  tx = optim.make_optimizer(cfg, 10)
  rng = np.random.default_rng(0)
  params = {'dense': {'kernel': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                      'bias': jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            'norm': {'scale': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  # With a zero gradient Adam's moments stay 0 and its step is 0; only the decoupled decay acts.
  updates, _ = tx.update(zeros, state, params)
  new = optax.apply_updates(params, updates)
  k = np.asarray(params['dense']['kernel'])
  np.testing.assert_allclose(np.asarray(new['dense']['kernel']), k - lr * wd * k, rtol=1e-6)
  for group, name in (('dense', 'bias'), ('norm', 'scale')):
    np.testing.assert_array_equal(np.asarray(new[group][name]), np.asarray(params[group][name]))


def _first_update(clip: float, grad_value: float, eps: float) -> tuple[np.ndarray, np.ndarray]:
  """Returns (gradient, first AdamW update) for a (4, 4) parameter and a constant gradient."""
  cfg = _optim_cfg(learning_rate=0.01, warmup_steps=0, decay='constant', weight_decay=0.0,
                   grad_clip_norm=clip, eps=eps)
  tx = optim.make_optimizer(cfg, 10)
  params = {'w': jnp.ones((4, 4), jnp.float32)}
  grads = {'w': jnp.full((4, 4), grad_value, jnp.float32)}
  updates, _ = tx.update(grads, tx.init(params), params)
  return np.asarray(grads['w']), np.asarray(updates['w'])


def test_global_norm_clipping_bounds_a_huge_gradient():
  lr, clip, eps = 0.01, 1.0, 0.25
  g, update = _first_update(clip, 1e6, eps)
  clipped = g * clip / np.linalg.norm(g)  # each entry 0.25 after scaling the norm 4e6 down to 1
  # Adam's first bias-corrected step is m/(sqrt(v)+eps) = g/(|g|+eps) on the clipped gradient.
  np.testing.assert_allclose(update, -lr * clipped / (np.abs(clipped) + eps), rtol=1e-5)
  assert np.linalg.norm(update) <= lr * clip / eps * (1 + 1e-6)
  # Unclipped, the same gradient gives a step of almost lr per entry: twice as large here.
  _, unclipped = _first_update(0.0, 1e6, eps)
  np.testing.assert_allclose(unclipped, -lr * np.ones((4, 4)), rtol=1e-5)
  # A gradient already inside the norm is left alone.
  small, update_small = _first_update(clip, 0.01, eps)
  np.testing.assert_allclose(update_small, -lr * small / (np.abs(small) + eps), rtol=1e-5)


def test_ema_of_parameters_equals_a_numpy_reference():
  decay = 0.9
  cfg = _optim_cfg(warmup_steps=0, ema_decay=decay, grad_clip_norm=0.0)
  tx = optim.make_optimizer(cfg, 10)
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  state = tx.init(params)
  ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
  for _ in range(5):
    grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ref = {k: decay * ref[k] + (1 - decay) * np.asarray(params[k], np.float64) for k in ref}
  ema = optim.ema_params(state)
  for k in ref:
    np.testing.assert_allclose(np.asarray(ema[k]), ref[k], rtol=1e-5, atol=1e-6)
  assert optim.ema_params(optim.make_optimizer(_optim_cfg(), 10).init(params)) is None
