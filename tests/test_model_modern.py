"""Tests for mlmjax.model's architecture options: rotary positions, windows, gated MLPs, norms, paths."""

import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from mlmjax import flops
from mlmjax import model as M

REPO = pathlib.Path(__file__).resolve().parents[1]
PAD, CLS, SEP = 0, 2, 3
VOCAB = 61


def modern_config(**overrides) -> M.EncoderConfig:
  base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=48,
              **{**M.MODERN, 'local_window': 8})
  return M.EncoderConfig(**{**base, **overrides})


@functools.lru_cache(maxsize=None)
def _model(overrides: tuple = ()) -> M.BertForMLM:
  return M.BertForMLM(modern_config(**dict(overrides)), rngs=nnx.Rngs(0))


def packed_rows(length: int, units=((10, 7), (5, 9, 4))) -> np.ndarray:
  """Returns rows of [CLS] t.. [SEP] units of the given content lengths, then padding."""
  rng = np.random.default_rng(0)
  rows = []
  for lengths in units:
    row = []
    for n in lengths:
      row += [CLS] + list(rng.integers(5, VOCAB, size=n)) + [SEP]
    rows.append(row + [PAD] * (length - len(row)))
  return np.array(rows, np.int32)


def np_rotary(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
  """Rotary embedding as complex multiplication: pair (k, k + D/2) turns by pos * theta^(-2k/D)."""
  d = x.shape[-1]
  z = x[..., :d // 2] + 1j * x[..., d // 2:]
  freq = theta ** (-np.arange(0, d, 2) / d)
  z = z * np.exp(1j * positions[..., None, None] * freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_rotary_agrees_with_a_numpy_complex_rotation():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 3, 8))
  positions = rng.integers(0, 4000, size=(2, 5))
  for theta in (10_000.0, 160_000.0):
    got = np.asarray(M.rotary(jnp.asarray(x, jnp.float32), jnp.asarray(positions), theta))
    np.testing.assert_allclose(got, np_rotary(x, positions, theta), atol=2e-4, rtol=0)


def test_rotary_attention_logits_depend_only_on_relative_position():
  rng = np.random.default_rng(2)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))

  def logit(m, n):
    rq = M.rotary(q, jnp.array([[m]]), 10_000.0)
    rk = M.rotary(k, jnp.array([[n]]), 10_000.0)
    return float((rq * rk).sum())
  for m, n in ((3, 7), (0, 12), (9, 2)):
    for shift in (1, 50, 700):
      assert logit(m + shift, n + shift) == pytest.approx(logit(m, n), abs=1e-4)
  # and the logit does change with the offset itself
  assert abs(logit(3, 7) - logit(3, 8)) > 1e-3


@pytest.mark.parametrize('local', [True, False])
def test_a_local_layer_ignores_tokens_outside_its_window_and_a_global_layer_sees_them(local):
  cfg = modern_config(global_every=2, local_window=4)
  block = M.Block(cfg, index=1 if local else 0, rngs=nnx.Rngs(3))
  length, query = 16, 8
  x = jnp.asarray(np.random.default_rng(4).normal(size=(1, length, cfg.hidden_size)), jnp.float32)
  doc = jnp.ones((1, length), jnp.int32)
  pos = jnp.arange(length)[None]
  grad = jax.jit(jax.grad(lambda x: block(x, doc, pos, None)[0, query].sum()))(x)
  reach = np.abs(np.asarray(grad[0])).sum(-1)
  far = np.abs(np.arange(length) - query) > cfg.local_window // 2
  if local:
    assert (reach[far] == 0).all()  # exactly zero, not small
    assert (reach[~far] > 0).all()
  else:
    assert (reach > 0).all()


@functools.lru_cache(maxsize=None)
def _params():
  """Returns the parameters every attention path is run with (the paths hold no parameters)."""
  model = M.BertForMLM(modern_config(attention_dropout_rate=0.0), rngs=nnx.Rngs(5))
  return nnx.split(model)[1]


def _loss_and_grads(impl: str, tokens: np.ndarray, positions: np.ndarray):
  config = modern_config(attention_impl=impl, attention_dropout_rate=0.0)
  graphdef = nnx.split(nnx.eval_shape(lambda: M.BertForMLM(config, rngs=nnx.Rngs(5))))[0]

  def loss(params):
    logits = nnx.merge(graphdef, params)(jnp.asarray(tokens), jnp.asarray(positions))
    return -jax.nn.log_softmax(logits)[..., 7].mean()
  return jax.jit(jax.value_and_grad(loss))(_params())


def _assert_same(got, want):
  np.testing.assert_allclose(float(got[0]), float(want[0]), atol=1e-5, rtol=0)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


def test_xla_attention_paths_give_the_reference_loss_and_gradients():
  tokens = packed_rows(32)
  positions = np.array([[1, 5, 14, 20], [2, 8, 17, 22]])  # real tokens only
  want = _loss_and_grads('reference', tokens, positions)
  # '' is 'xla' without attention dropout: XLA is the only implementation jax chooses today.
  _assert_same(_loss_and_grads('xla', tokens, positions), want)


@pytest.mark.slow
def test_splash_attention_gives_the_reference_loss_and_gradients():
  tokens = packed_rows(128, units=((40, 50, 20), (30, 60)))
  positions = np.array([[1, 10, 60, 100], [3, 20, 50, 90]])  # real tokens only
  _assert_same(_loss_and_grads('splash', tokens, positions),
               _loss_and_grads('reference', tokens, positions))


_SHARDED_SPLASH = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mlmjax import model as M, sharding
    import ml_collections

    def config(impl):
      return M.EncoderConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                             intermediate_size=48, **{**M.MODERN, 'local_window': 32},
                             attention_impl=impl, attention_dropout_rate=0.0, dropout_rate=0.0)

    rng = np.random.default_rng(0)
    tokens = np.zeros((4, 128), np.int32)
    for r, lengths in enumerate(((40, 50), (30, 60, 20), (100,), (10, 20, 30))):
      row = []
      for n in lengths:
        row += [2] + list(rng.integers(5, 61, n)) + [3]
      tokens[r, :len(row)] = row
    slots = np.stack([np.sort(rng.choice(np.flatnonzero(t), 8, replace=False)) for t in tokens])
    params = nnx.split(M.BertForMLM(config('reference'), rngs=nnx.Rngs(5)))[1]
    mesh = sharding.make_mesh(ml_collections.ConfigDict(
        {'shape': (('data', 2), ('fsdp', 1), ('tensor', 2))}))

    def loss_and_grads(impl):
      graphdef = nnx.split(nnx.eval_shape(lambda: M.BertForMLM(config(impl), rngs=nnx.Rngs(5))))[0]
      def loss(p, t, s):
        return -jax.nn.log_softmax(nnx.merge(graphdef, p)(t, s))[..., 7].mean()
      rows = NamedSharding(mesh, P(('data', 'fsdp'), None))
      f = jax.jit(jax.value_and_grad(loss), in_shardings=(NamedSharding(mesh, P()), rows, rows))
      with M.mesh_context(mesh):
        lowered = f.lower(params, tokens, slots)
      return lowered.compile()(params, tokens, slots), lowered.as_text()

    (want, want_g), _ = loss_and_grads('reference')
    (got, got_g), text = loss_and_grads('splash')
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)))
    print('RESULT ' + json.dumps({'devices': jax.device_count(), 'loss': [float(got), float(want)],
                                  'grad_gap': gap, 'manual': text.count('manual_computation')}))
''')


@pytest.mark.slow
def test_splash_runs_per_shard_on_a_mesh_and_gives_the_reference_loss_and_gradients(tmp_path):
  # XLA cannot partition a Mosaic kernel, so under model.mesh_context splash runs in a shard_map:
  # rows over 'data', heads over 'tensor'. Four forced host devices, the kernel interpreted.
  script = tmp_path / 'sharded_splash.py'
  script.write_text(_SHARDED_SPLASH)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')][-1][7:])
  assert out['devices'] == 4 and out['manual'] > 0
  np.testing.assert_allclose(out['loss'][0], out['loss'][1], atol=1e-5, rtol=0)
  assert out['grad_gap'] < 1e-5


def test_a_requested_attention_impl_that_cannot_run_is_an_error():
  with pytest.raises(ValueError, match="cuDNN attention has no two-sided sliding window"):
    modern_config(attention_impl='cudnn', attention_dropout_rate=0.0, dtype='bfloat16')
  if jax.default_backend() != 'gpu':
    cfg = M.EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                          intermediate_size=32, attention_impl='cudnn', attention_dropout_rate=0.0,
                          dtype='bfloat16')
    model = M.BertForMLM(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU"):
      model.encoder(jnp.asarray(packed_rows(32)))
  model = M.BertForMLM(modern_config(attention_impl='splash', attention_dropout_rate=0.0),
                       rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'splash' needs a sequence length that is a multiple of 128"):
    model.encoder(jnp.asarray(packed_rows(32)))


def test_splash_on_a_gpu_is_an_error_not_the_interpreter(monkeypatch):
  # Off TPU the kernel would run interpreted: fine for CPU tests, a silent crawl on a GPU.
  model = M.BertForMLM(modern_config(attention_impl='splash', attention_dropout_rate=0.0),
                       rngs=nnx.Rngs(0))
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  with pytest.raises(ValueError, match="'splash' is a TPU kernel"):
    model.encoder(jnp.asarray(packed_rows(128)))


@pytest.mark.parametrize('overrides,message', [
    (dict(global_every=3, local_window=0), 'set both'),
    (dict(global_every=1, local_window=8), 'set both'),
    (dict(local_window=7), 'must be even'),
    (dict(mlp_type='relu'), r"model\.mlp_type"),
    (dict(norm='batchnorm'), r"model\.norm"),
    (dict(position_embedding='alibi'), r"model\.position_embedding"),
    (dict(pre_layer_norm=False), 'first_attention_norm=False needs'),
])
def test_architecture_errors_name_the_key(overrides, message):
  with pytest.raises(ValueError, match=message):
    modern_config(**overrides)


def test_modern_layout_of_parameters():
  model = _model()
  enc = model.encoder
  assert enc.position_embed is None and enc.type_embed is None
  assert enc.token_embed.shape == (64, 32)  # 61 pieces padded to a multiple of 64
  assert model.mlm_head.bias.shape == (64,)
  assert enc.layers[0].attention_norm is None and enc.layers[1].attention_norm is not None
  assert [layer.attention.window for layer in enc.layers] == [0, 8, 8]
  assert [layer.attention.theta for layer in enc.layers] == [160_000.0, 10_000.0, 10_000.0]
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  biases = sorted('.'.join(map(str, path)) for path, _ in params if path[-1] == 'bias')
  assert biases == ['mlm_head.bias']  # only the decoder's bias
  tokens = jnp.asarray(packed_rows(32))
  assert model(tokens, jnp.array([[1, 2], [3, 4]])).shape == (2, 2, VOCAB)
  # No token-type table: type ids change nothing.
  np.testing.assert_array_equal(enc(tokens, type_ids=jnp.ones_like(tokens)), enc(tokens))


@pytest.mark.parametrize('kind', ['geglu', 'swiglu'])
def test_gated_mlp_matches_numpy(kind):
  cfg = modern_config(mlp_type=kind, use_bias=True)
  mlp = M.Mlp(cfg, rngs=nnx.Rngs(6))
  x = np.random.default_rng(7).normal(size=(3, 32))
  w_in, w_gate, w_out = (np.asarray(d.kernel[...], np.float64)
                         for d in (mlp.intermediate, mlp.gate, mlp.output))
  a = x @ w_in
  gelu = a * 0.5 * (1 + scipy.special.erf(a / 2 ** 0.5))
  act = a * scipy.special.expit(a) if kind == 'swiglu' else gelu
  want = (act * (x @ w_gate)) @ w_out
  np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x, jnp.float32))), want, atol=1e-5)


def test_rms_norm_matches_numpy():
  norm = M.LayerNorm(modern_config(norm='rmsnorm'), dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert norm.bias is None
  x = np.random.default_rng(8).normal(size=(4, 32)) * 3
  want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x, jnp.float32))), want, atol=1e-5)


def test_rotary_rows_may_exceed_max_position():
  model = _model((('max_position', 16),))
  assert np.isfinite(np.asarray(model.encoder(jnp.asarray(packed_rows(32))))).all()


def test_flops_count_gated_mlps_and_windows():
  cfg = modern_config()
  parts = flops.forward_flops_per_row(cfg, 32, 4)
  h, i = cfg.hidden_size, cfg.intermediate_size
  # three layers, three matmuls each; the last runs at the 4 slots only
  assert parts['mlp'] == (32 + 32 + 4) * 3 * 2 * h * i
  # one global layer over 32 keys, two local layers over 9 keys each (the last from 4 queries)
  assert parts['attention'] == 2 * 2 * h * (32 * 32 + 32 * 9 + 4 * 9)
  assert parts['mlm_head'] == 4 * (2 * h * h + 2 * h * 64)
