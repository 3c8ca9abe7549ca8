"""Tests for mlmjax.losses against float64 NumPy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmjax import losses


def np_log_softmax(logits: np.ndarray) -> np.ndarray:
  x = logits.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def random_case(seed: int, scale: float = 3.0, offset: float = 0.0, shape=(4, 7), vocab=23):
  """Returns logits, labels and weights (0/1 and fractional weights, some zero-weight slots)."""
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=shape + (vocab,)) * scale + offset).astype(np.float32)
  labels = rng.integers(0, vocab, size=shape).astype(np.int32)
  weights = rng.choice([0.0, 1.0, 0.5, 2.0], size=shape, p=[0.3, 0.5, 0.1, 0.1])
  return logits, labels, weights.astype(np.float32)


def np_cross_entropy(logits, labels, weights):
  logp = np.take_along_axis(np_log_softmax(logits), labels[..., None], -1)[..., 0]
  return -(logp * weights).sum(), weights.sum()


@pytest.mark.parametrize('seed,scale,offset', [(0, 3.0, 0.0), (1, 0.1, 0.0),
                                               (2, 1e3, 0.0), (3, 5.0, 1e4), (4, 50.0, -3e4)])
def test_cross_entropy_sum_matches_float64_reference(seed, scale, offset):
  logits, labels, weights = random_case(seed, scale, offset)
  total, weight = losses.cross_entropy_sum(jnp.asarray(logits), labels, weights)
  ref_total, ref_weight = np_cross_entropy(logits, labels, weights)
  assert total.dtype == jnp.float32 and weight.dtype == jnp.float32
  assert np.isfinite(float(total))
  np.testing.assert_allclose(float(weight), ref_weight, rtol=1e-6)
  # float32 logits carry ~1e-7 relative error of their magnitude into each log-softmax term.
  atol = 1e-6 * (abs(offset) + 10 * scale) * weights.sum()
  np.testing.assert_allclose(float(total), ref_total, rtol=1e-5, atol=atol)


def test_cross_entropy_ignores_zero_weight_slots_whatever_their_label_or_logits():
  logits, labels, weights = random_case(5)
  weights[0, :3] = 0.0
  bad_logits, bad_labels = logits.copy(), labels.copy()
  bad_labels[0, 0], bad_labels[0, 1] = -7, 10_000  # out of range labels
  bad_logits[0, 2] = np.nan
  good = losses.cross_entropy_sum(logits, labels, weights)
  bad = losses.cross_entropy_sum(bad_logits, bad_labels, weights)
  np.testing.assert_allclose(np.array(bad), np.array(good), rtol=1e-6)


def test_cross_entropy_accepts_bfloat16_logits():
  logits, labels, weights = random_case(6)
  low = jnp.asarray(logits, jnp.bfloat16)
  total, _ = losses.cross_entropy_sum(low, labels, weights)
  assert total.dtype == jnp.float32
  ref, _ = np_cross_entropy(np.asarray(low.astype(jnp.float32)), labels, weights)
  np.testing.assert_allclose(float(total), ref, rtol=1e-5)


def test_accuracy_sum_matches_reference():
  logits, labels, weights = random_case(7, shape=(8, 16), vocab=5)  # small vocab: many hits
  correct, weight = losses.accuracy_sum(logits, labels, weights)
  hits = logits.argmax(-1) == labels
  assert 0 < hits.sum() < hits.size
  np.testing.assert_allclose(float(correct), (hits * weights).sum(), rtol=1e-6)
  np.testing.assert_allclose(float(weight), weights.sum(), rtol=1e-6)


def test_mlm_metric_sums_per_kind_match_reference():
  logits, labels, weights = random_case(8, shape=(8, 20), vocab=4)
  kinds = np.random.default_rng(9).integers(0, 3, size=labels.shape).astype(np.int32)
  sums = jax.jit(losses.mlm_metric_sums)(logits, labels, weights, kinds)
  hits = (logits.argmax(-1) == labels) * weights
  ref_loss, ref_weight = np_cross_entropy(logits, labels, weights)
  np.testing.assert_allclose(float(sums['loss_sum']), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(sums['weight']), ref_weight, rtol=1e-6)
  np.testing.assert_allclose(float(sums['correct']), hits.sum(), rtol=1e-6)
  for k, name in enumerate(('mask', 'random', 'keep')):
    np.testing.assert_allclose(float(sums[f'count_{name}']), weights[kinds == k].sum(), rtol=1e-6)
    np.testing.assert_allclose(float(sums[f'correct_{name}']), hits[kinds == k].sum(), rtol=1e-6)
  assert all(v.dtype == jnp.float32 for v in sums.values())


def test_finalize_metrics_values_and_nan_for_empty_kinds():
  logits, labels, weights = random_case(10, shape=(6, 10), vocab=4)
  kinds = np.where(np.arange(10) < 7, 0, 2)[None].repeat(6, 0)  # no 'random' slots at all
  sums = losses.mlm_metric_sums(logits, labels, weights, kinds)
  out = losses.finalize_metrics(sums)
  hits = (logits.argmax(-1) == labels) * weights
  ref_loss = np_cross_entropy(logits, labels, weights)[0] / weights.sum()
  assert out['loss'] == pytest.approx(ref_loss, rel=1e-5)
  assert out['perplexity'] == pytest.approx(math.exp(ref_loss), rel=1e-5)
  assert out['accuracy'] == pytest.approx(hits.sum() / weights.sum(), rel=1e-6)
  assert out['accuracy_at_mask'] == pytest.approx(
      hits[kinds == 0].sum() / weights[kinds == 0].sum(), rel=1e-6)
  assert out['accuracy_at_keep'] == pytest.approx(
      hits[kinds == 2].sum() / weights[kinds == 2].sum(), rel=1e-6)
  assert math.isnan(out['accuracy_at_random'])
  assert all(isinstance(v, float) for v in out.values())


def test_finalize_metrics_takes_numpy_scalars_and_an_empty_batch():
  zero = {k: np.float32(0.0) for k in ('loss_sum', 'weight', 'correct', 'correct_mask',
                                       'count_mask', 'correct_random', 'count_random',
                                       'correct_keep', 'count_keep')}
  out = losses.finalize_metrics(zero)
  assert all(math.isnan(v) for v in out.values())


def test_sums_add_across_shards_before_normalizing():
  logits, labels, weights = random_case(11, shape=(8, 12), vocab=6)
  kinds = np.random.default_rng(12).integers(0, 3, size=labels.shape)
  halves = [losses.mlm_metric_sums(logits[s], labels[s], weights[s], kinds[s])
            for s in (slice(0, 3), slice(3, 8))]
  summed = jax.tree.map(lambda a, b: a + b, *halves)
  whole = losses.finalize_metrics(losses.mlm_metric_sums(logits, labels, weights, kinds))
  for key, value in losses.finalize_metrics(summed).items():
    assert value == pytest.approx(whole[key], rel=1e-5), key


def np_logsumexp(logits: np.ndarray) -> np.ndarray:
  x = logits.astype(np.float64)
  top = x.max(-1)
  return top + np.log(np.exp(x - top[..., None]).sum(-1))


@pytest.mark.parametrize('seed,scale,offset', [(20, 3.0, 0.0), (21, 0.1, -2.0), (22, 5.0, 40.0)])
def test_z_loss_sum_matches_float64_reference_and_skips_padding(seed, scale, offset):
  logits, _, weights = random_case(seed, scale, offset)
  assert (weights == 0).any()
  total, weight = jax.jit(losses.z_loss_sum)(jnp.asarray(logits), weights)
  assert total.dtype == jnp.float32 and weight.dtype == jnp.float32
  np.testing.assert_allclose(float(total), (np_logsumexp(logits) ** 2 * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(weight), weights.sum(), rtol=1e-6)
  # Zero-weight (padding) slots contribute nothing, even with NaN or huge logits there.
  bad = logits.copy()
  pad = np.argwhere(weights == 0)
  bad[tuple(pad[0])] = np.nan
  bad[tuple(pad[-1])] = 1e30
  np.testing.assert_allclose(float(losses.z_loss_sum(bad, weights)[0]), float(total), rtol=1e-6)


@pytest.mark.parametrize('offset', [6.0, -10.0])
def test_z_loss_gradient_pulls_logsumexp_toward_zero(offset):
  logits, _, weights = random_case(23, 2.0, offset)
  grad = jax.grad(lambda x: losses.z_loss_sum(x, weights)[0])(jnp.asarray(logits))
  lse = np_logsumexp(logits)
  assert (np.sign(lse) == np.sign(offset)).all()  # both signs of log Z are exercised
  # d(lse^2)/dlogits = 2 lse softmax: every entry has the sign of lse; padding gets none.
  g = np.asarray(grad, np.float64)
  live = weights != 0
  assert (np.sign(g[live]) == np.sign(lse[live])[..., None]).all()
  np.testing.assert_array_equal(g[~live], 0.0)
  np.testing.assert_allclose(g.sum(-1), 2 * lse * weights, rtol=1e-5)
  # A small step down the gradient brings every live |logsumexp| closer to 0.
  stepped = np_logsumexp(logits - 0.01 * g)
  assert (np.abs(stepped[live]) < np.abs(lse[live])).all()
  np.testing.assert_allclose(stepped[~live], lse[~live])


def test_finalize_metrics_reports_z_loss_only_when_summed():
  logits, labels, weights = random_case(24)
  kinds = np.zeros(labels.shape, np.int32)
  sums = losses.mlm_metric_sums(logits, labels, weights, kinds)
  assert 'z_loss' not in losses.finalize_metrics(sums)
  z_sum, _ = losses.z_loss_sum(logits, weights)
  out = losses.finalize_metrics({**sums, 'z_loss_sum': 1e-4 * z_sum})
  ref = 1e-4 * (np_logsumexp(logits) ** 2 * weights).sum() / weights.sum()
  assert out['z_loss'] == pytest.approx(ref, rel=1e-5)
