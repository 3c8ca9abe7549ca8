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
  """Returns the tiny config's optim section, linear decay over all steps, with `fields` set."""
  cfg = pretrain.get_config('tiny_classic').optim
  cfg.decay, cfg.decay_fraction = 'linear', 0.0
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


# --- LAMB and StableAdamW against NumPy references written from the papers

_PEAK, _END_FRACTION, _NUM_STEPS = 0.05, 0.1, 10


def _lr(k: int) -> float:
  """The linear schedule of _ref_cfg at optimizer step k (counting from 0), in closed form."""
  return _PEAK + (_END_FRACTION * _PEAK - _PEAK) * min(k, _NUM_STEPS) / _NUM_STEPS


def _ref_cfg(optimizer: str, **fields):
  """Returns the optim section the references assume (no clipping unless `fields` set it)."""
  ref = dict(optimizer=optimizer, learning_rate=_PEAK, warmup_steps=0, decay='linear',
             end_lr_fraction=_END_FRACTION, weight_decay=0.3, b1=0.9, b2=0.98, eps=1e-6,
             grad_clip_norm=0.0)
  return _optim_cfg(**{**ref, **fields})


def _small_tree(rng: np.random.Generator) -> dict:
  """Returns a small float32 parameter tree: decayed matrices, an undecayed bias and norm scale."""
  return {'dense': {'kernel': rng.normal(size=(3, 4)), 'bias': rng.normal(size=(4,)) * 0.1},
          'norm': {'scale': 1.0 + rng.normal(size=(4,)) * 0.1},
          'embed': rng.normal(size=(5, 3))}


def _flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


_DECAYED = ("['dense']['kernel']", "['embed']")


def _run_optax(optimizer: str, params: dict, grads_seq: list[dict], **fields):
  """Returns (params after each step, updates of each step) of make_optimizer on the sequence."""
  tx = optim.make_optimizer(_ref_cfg(optimizer, **fields), _NUM_STEPS)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p)
  update = jax.jit(tx.update)
  out_params, out_updates = [], []
  for g in grads_seq:
    u, state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
    p = optax.apply_updates(p, u)
    out_params.append(_flat(p))
    out_updates.append(_flat(u))
  return out_params, out_updates


def _grads_seq(rng: np.random.Generator, params: dict, n: int, scales=None) -> list[dict]:
  scales = scales or [1.0] * n
  return [jax.tree.map(lambda x, s=s: rng.normal(size=np.shape(x)) * s, params) for s in scales]


def _np_lamb(params: dict, grads_seq: list[dict], b1=0.9, b2=0.98, eps=1e-6, wd=0.3):
  """You et al. 2020, Algorithm 2 (LAMB), in float64; no trust ratio on LayerNorm and biases."""
  p, m, v = _flat(params), {}, {}
  out = []
  for t, grads in enumerate(grads_seq, start=1):
    g = _flat(grads)
    for k in p:
      m[k] = b1 * m.get(k, 0.0) + (1 - b1) * g[k]
      v[k] = b2 * v.get(k, 0.0) + (1 - b2) * g[k] ** 2
      r = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      if k in _DECAYED:
        r = r + wd * p[k]
        p_norm, r_norm = np.linalg.norm(p[k]), np.linalg.norm(r)
        r = r * (p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0)  # phi(z) = z
      p[k] = p[k] - _lr(t - 1) * r
    out.append(dict(p))
  return out


def _np_stable_adamw(params: dict, grads_seq: list[dict], b1=0.9, b2=0.98, eps=1e-6, wd=0.3):
  """Wortsman et al. 2023, Algorithm 2 (StableAdamW), float64; returns (params, RMS_t) per step."""
  p, v, u = _flat(params), {}, {}
  out, rms_seq = [], []
  for t, grads in enumerate(grads_seq, start=1):
    g = _flat(grads)
    # The paper folds the bias correction into the averaging coefficients.
    b1_hat = b1 * (1 - b1 ** (t - 1)) / (1 - b1 ** t)
    b2_hat = b2 * (1 - b2 ** (t - 1)) / (1 - b2 ** t)
    rms = {}
    for k in p:
      v[k] = b1_hat * v.get(k, 0.0) + (1 - b1_hat) * g[k]
      u[k] = b2_hat * u.get(k, 0.0) + (1 - b2_hat) * g[k] ** 2
      rms[k] = np.sqrt(np.mean(g[k] ** 2 / np.maximum(u[k], eps ** 2)))
      eta = _lr(t - 1) / max(1.0, rms[k])
      decay = wd * p[k] if k in _DECAYED else 0.0
      p[k] = p[k] - eta * decay - eta * v[k] / (np.sqrt(u[k]) + eps)
    out.append(dict(p))
    rms_seq.append(rms)
  return out, rms_seq


def _assert_trees_close(got: dict, want: dict, rtol: float = 1e-6, atol: float = 1e-7):
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


def test_lamb_equals_a_numpy_reference():
  rng = np.random.default_rng(1)
  params = _small_tree(rng)
  grads_seq = _grads_seq(rng, params, 6)
  got, _ = _run_optax('lamb', params, grads_seq)
  want = _np_lamb(params, grads_seq)
  for a, b in zip(got, want):
    _assert_trees_close(a, b)
  # The trust ratio acts: a decayed matrix's step is not Adam's (norm-scaled instead).
  adam_params, _ = _run_optax('adamw', params, grads_seq[:1])
  k = "['embed']"
  assert not np.allclose(got[0][k], adam_params[0][k], rtol=1e-3)
  # LayerNorm scale and bias take the plain AdamW step (no decay, no trust ratio).
  for k in ("['dense']['bias']", "['norm']['scale']"):
    np.testing.assert_allclose(got[0][k], adam_params[0][k], rtol=1e-6, atol=1e-7)


def test_stable_adamw_equals_a_numpy_reference():
  rng = np.random.default_rng(2)
  params = _small_tree(rng)
  # Growing then spiking gradients: some RMS_t well above 1, so the clip acts in the reference.
  grads_seq = _grads_seq(rng, params, 7, scales=[1.0, 0.5, 2.0, 1.0, 8.0, 0.3, 1.0])
  got, _ = _run_optax('stable_adamw', params, grads_seq)
  want, rms_seq = _np_stable_adamw(params, grads_seq)
  assert max(max(r.values()) for r in rms_seq) > 2.0
  assert min(min(r.values()) for r in rms_seq) < 1.0
  for a, b in zip(got, want):
    _assert_trees_close(a, b)


def test_stable_adamw_is_adamw_while_every_rms_is_at_most_one():
  rng = np.random.default_rng(3)
  params = _small_tree(rng)
  # Shrinking gradients: each g_t^2 lies below the running second moment, so RMS_t <= 1.
  grads_seq = _grads_seq(rng, params, 1) * 6
  grads_seq = [jax.tree.map(lambda x, t=t: x * 0.7 ** t, g) for t, g in enumerate(grads_seq)]
  _, rms_seq = _np_stable_adamw(params, grads_seq)
  assert all(r <= 1.0 + 1e-9 for rms in rms_seq for r in rms.values())
  stable, _ = _run_optax('stable_adamw', params, grads_seq)
  adamw, _ = _run_optax('adamw', params, grads_seq)
  for a, b in zip(stable, adamw):
    _assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


def test_stable_adamw_shrinks_the_whole_step_when_a_gradient_spikes():
  rng = np.random.default_rng(4)
  params = _small_tree(rng)
  steady = _grads_seq(rng, params, 1) * 20
  grads_seq = steady + [jax.tree.map(lambda x: 50.0 * x, steady[0])]
  stable_params, stable = _run_optax('stable_adamw', params, grads_seq)
  adamw_params, adamw = _run_optax('adamw', params, grads_seq)
  _, rms_seq = _np_stable_adamw(params, grads_seq)
  # A constant gradient keeps RMS_t = 1: both reach the spike from the same parameters.
  _assert_trees_close(stable_params[-2], adamw_params[-2])
  for k, rms in rms_seq[-1].items():
    # A 50x spike after 20 steps: RMS_t = sqrt(2500 (1 - b2^21) / (b2 (1 - b2^20) + 50)) ~ 4.1.
    assert rms > 4.0, k
    # Adam's step and the decoupled decay alike are divided by RMS_t.
    np.testing.assert_allclose(stable[-1][k], adamw[-1][k] / rms, rtol=1e-5, atol=1e-8,
                               err_msg=k)
    assert np.linalg.norm(stable[-1][k]) < 0.25 * np.linalg.norm(adamw[-1][k])


@pytest.mark.parametrize('optimizer', optim.OPTIMIZERS)
def test_global_norm_clipping_precedes_each_optimizer(optimizer):
  rng = np.random.default_rng(5)
  params = _small_tree(rng)
  grads_seq = _grads_seq(rng, params, 3, scales=[10.0, 30.0, 20.0])
  clip = 1.0
  clipped_seq = []
  for g in grads_seq:
    norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g)))
    clipped_seq.append(jax.tree.map(lambda x, n=norm: x * clip / n, g))
  got, _ = _run_optax(optimizer, params, grads_seq, grad_clip_norm=clip)
  want, _ = _run_optax(optimizer, params, clipped_seq)
  for a, b in zip(got, want):
    _assert_trees_close(a, b, rtol=1e-5, atol=1e-7)


def test_adamw_is_the_optax_chain_bit_for_bit():
  cfg = _ref_cfg('adamw', grad_clip_norm=1.0, ema_decay=0.9)
  schedule = optim.learning_rate_schedule(cfg, _NUM_STEPS)
  explicit = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.3, mask=optim.decay_mask),
      optim.ema_of_params(0.9))
  rng = np.random.default_rng(6)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _small_tree(rng))
  results = []
  for tx in (optim.make_optimizer(cfg, _NUM_STEPS), explicit):
    p, state = params, tx.init(params)
    for g in _grads_seq(np.random.default_rng(7), params, 4, scales=[0.1, 3.0, 1.0, 0.5]):
      u, state = jax.jit(tx.update)(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g),
                                    state, p)
      p = optax.apply_updates(p, u)
    results.append((p, state))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('optimizer', optim.OPTIMIZERS)
def test_ema_and_state_layout_with_each_optimizer(optimizer):
  decay = 0.8
  cfg = _ref_cfg(optimizer, ema_decay=decay, grad_clip_norm=1.0)
  tx = optim.make_optimizer(cfg, _NUM_STEPS)
  rng = np.random.default_rng(8)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _small_tree(rng))
  state = tx.init(params)
  ref = _flat(params)
  for g in _grads_seq(rng, params, 4):
    u, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, params)
    params = optax.apply_updates(params, u)
    ref = {k: decay * ref[k] + (1 - decay) * v for k, v in _flat(params).items()}
  is_ema = lambda x: isinstance(x, optim.EmaParamsState)
  assert sum(map(is_ema, jax.tree.leaves(state, is_leaf=is_ema))) == 1
  _assert_trees_close(_flat(optim.ema_params(state)), ref, rtol=1e-5, atol=1e-6)
  # Parameter-shaped state (Adam's two moments and the EMA) is what state_shardings maps onto
  # the parameters' shardings; everything else is replicated.
  marked = optax.tree_map_params(tx, lambda _: 'param', state, transform_non_params=lambda _: 0)
  assert jax.tree.leaves(marked).count('param') == 3 * len(jax.tree.leaves(params))


def test_unknown_optimizer_names_the_key():
  with pytest.raises(ValueError, match=r"optim.optimizer='sgd'.*adamw"):
    optim.make_optimizer(_optim_cfg(optimizer='sgd'), 10)


def test_a_decay_fraction_is_the_last_part_of_any_run_length():
  for steps in (40, 3200, 10_000):
    by_fraction = optim.learning_rate_schedule(_optim_cfg(decay_fraction=0.25, warmup_steps=4),
                                               steps)
    by_steps = optim.learning_rate_schedule(_optim_cfg(decay_steps=steps // 4, warmup_steps=4),
                                            steps)
    for t in (0, 3, steps // 2, steps * 3 // 4, steps * 3 // 4 + 1, steps - 1, steps):
      assert _at(by_fraction, t) == _at(by_steps, t), (steps, t)
  with pytest.raises(ValueError, match='optim.decay_steps=10 and optim.decay_fraction=0.25 both'):
    optim.learning_rate_schedule(_optim_cfg(decay_steps=10, decay_fraction=0.25), 100)
  # tiny's own: warmup 300, the peak until step 2,400, then 1-sqrt to 0 at 3,200.
  tiny = pretrain.get_config('tiny_classic')
  schedule = optim.learning_rate_schedule(tiny.optim, tiny.train.num_steps)
  peak = tiny.optim.learning_rate
  assert _at(schedule, 2400) == pytest.approx(peak) and _at(schedule, 3200) == 0.0
  assert _at(schedule, 2600) == pytest.approx(peak * (1 - 0.5), rel=1e-6)  # 1 - sqrt(1/4)
