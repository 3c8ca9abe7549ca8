"""Tests for mlmjax.model: layout, masking of packed units, heads, dropout, dtypes, params."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from mlmjax import heads, losses
from mlmjax import model as M

PAD, CLS, SEP, MASK = 0, 2, 3, 4
VOCAB = 61


def small_config(**overrides) -> M.EncoderConfig:
  base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
              max_position=64)
  return M.EncoderConfig(**{**base, **overrides})


@functools.lru_cache(maxsize=None)
def _cached_model(seed: int, overrides: tuple) -> M.BertForMLM:
  return M.BertForMLM(small_config(**dict(overrides)), rngs=nnx.Rngs(seed))


def make_model(seed: int = 0, **overrides) -> M.BertForMLM:
  """Returns a small model; tests never mutate it, so one per setting is shared (init is slow)."""
  return _cached_model(seed, tuple(sorted(overrides.items())))


def packed_row(rng: np.random.Generator, lengths, row_len: int) -> np.ndarray:
  """Returns one packed row of units [CLS] t.. [SEP] with n content tokens each, then PAD."""
  row = []
  for n in lengths:
    row += [CLS] + list(rng.integers(5, VOCAB, size=n)) + [SEP]
  assert len(row) <= row_len
  return np.array(row + [PAD] * (row_len - len(row)), dtype=np.int32)


def reference_layout(row) -> tuple[list[int], list[int]]:
  """Plain-Python positions and unit ids of one packed row."""
  pos, doc, unit, p = [], [], 0, 0
  for t in row:
    if t == PAD:
      pos.append(0)
      doc.append(0)
      continue
    if t == CLS:
      unit, p = unit + 1, 0
    pos.append(p)
    doc.append(unit)
    p += 1
  return pos, doc


def two_unit_batch(rng, row_len=24):
  rows = [packed_row(rng, [5, 7], row_len), packed_row(rng, [9, 3], row_len)]
  return np.stack(rows)


def test_packed_layout_matches_python_reference():
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(12):
    lengths, total = [], 0
    while True:
      n = int(rng.integers(0, 8))
      if total + n + 2 > 40:
        break
      lengths.append(n)
      total += n + 2
      if rng.random() < 0.2:
        break
    rows.append(packed_row(rng, lengths, 40))
  tokens = np.stack(rows)
  pos, doc = jax.jit(M.packed_layout)(tokens)
  assert pos.dtype == jnp.int32 and doc.dtype == jnp.int32
  for row, p, d in zip(tokens, np.asarray(pos), np.asarray(doc)):
    ref_p, ref_d = reference_layout(row)
    np.testing.assert_array_equal(p, ref_p)
    np.testing.assert_array_equal(d, ref_d)


def test_packed_layout_hand_built_row_and_row_without_cls():
  tokens = np.array([[CLS, 9, 8, SEP, CLS, 7, SEP, PAD],
                     [9, 8, 7, 6, PAD, PAD, PAD, PAD]], np.int32)
  pos, doc = M.packed_layout(tokens)
  np.testing.assert_array_equal(pos, [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 0, 0, 0, 0]])
  np.testing.assert_array_equal(doc, [[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0, 0, 0]])


def test_attention_mask_blocks_other_units_and_padding():
  doc = jnp.array([[1, 1, 2, 0]])
  mask = M.attention_mask(doc)
  assert mask.shape == (1, 1, 4, 4) and mask.dtype == jnp.bool_
  expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mask[0, 0], expected)


@pytest.mark.slow
def test_shapes_and_dtypes():
  m = make_model()
  tokens = two_unit_batch(np.random.default_rng(1))
  hidden = m.encoder(tokens)
  assert hidden.shape == (2, 24, 32) and hidden.dtype == jnp.float32
  positions = jnp.array([[1, 2, 9], [3, 4, 5]])
  logits = m(tokens, positions)
  assert logits.shape == (2, 3, VOCAB) and logits.dtype == jnp.float32
  assert m.dense_logits(tokens).shape == (2, 24, VOCAB)


@pytest.mark.parametrize('pre_ln', [True, False])
def test_packed_units_never_attend_across(pre_ln):
  m = make_model(pre_layer_norm=pre_ln)
  rng = np.random.default_rng(2)
  tokens = two_unit_batch(rng)
  changed = tokens.copy()
  # Unit 2 of row 0 spans columns 7..15; replace its content tokens.
  changed[0, 8:15] = (tokens[0, 8:15] - 5 + 11) % (VOCAB - 5) + 5
  types = np.zeros_like(tokens)
  types[0, 7:16] = 1
  h_a = np.asarray(m.encoder(tokens, type_ids=types))
  h_b = np.asarray(m.encoder(changed, type_ids=types))
  np.testing.assert_allclose(h_a[0, :7], h_b[0, :7], atol=1e-6, rtol=0)
  # The edit reaches unit 2, and row 1 is untouched.
  assert np.abs(h_a[0, 7:16] - h_b[0, 7:16]).max() > 1e-3
  np.testing.assert_array_equal(h_a[1], h_b[1])


@pytest.mark.slow
@pytest.mark.parametrize('pre_ln', [True, False])
def test_padding_rows_are_finite(pre_ln):
  m = make_model(pre_layer_norm=pre_ln, attention_dropout_rate=0.2)
  tokens = two_unit_batch(np.random.default_rng(3))
  tokens[1] = PAD  # a row that is all padding
  for key in (None, jax.random.key(0)):
    logits = m.dense_logits(tokens, dropout_rng=key)
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.slow
def test_dropout_attention_path_matches_fused_attention_without_dropout():
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 3, 8)), jnp.float32) for _ in range(3))
  _, doc = M.packed_layout(jnp.array([[CLS, 5, CLS, 6, 7, PAD], [PAD] * 6]))
  mask = M.attention_mask(doc)
  manual = M._attend_reference(q, k, v, mask, 0.0, jax.random.key(0))
  fused = jax.nn.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(manual, fused, atol=1e-5)


def sparse_batch(rng):
  tokens = two_unit_batch(rng)
  # Prediction slots: real positions (never column 0), then padding slots with weight 0.
  positions = np.array([[1, 3, 9, 12, 0], [2, 5, 14, 0, 0]], np.int32)
  weights = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.float32)
  labels = rng.integers(5, VOCAB, size=positions.shape).astype(np.int32)
  return tokens, positions, labels, weights


@pytest.mark.slow
def test_sparse_head_equals_gathered_dense_logits_and_same_loss():
  m = make_model(pre_layer_norm=False)
  tokens, positions, labels, weights = sparse_batch(np.random.default_rng(5))
  sparse = m(tokens, positions)
  dense = m.dense_logits(tokens)
  gathered = jnp.take_along_axis(dense, positions[..., None], axis=1)
  np.testing.assert_allclose(sparse, gathered, atol=1e-5, rtol=0)

  rows = np.arange(2)[:, None]
  dense_labels = np.zeros(tokens.shape, np.int32)
  dense_weights = np.zeros(tokens.shape, np.float32)
  dense_labels[rows, positions] = np.where(weights > 0, labels, 0)
  np.add.at(dense_weights, (np.broadcast_to(rows, positions.shape), positions), weights)
  sparse_loss, sparse_w = losses.cross_entropy_sum(sparse, labels, weights)
  dense_loss, dense_w = losses.cross_entropy_sum(dense, dense_labels, dense_weights)
  assert float(sparse_w) == float(dense_w) == 7.0
  np.testing.assert_allclose(sparse_loss, dense_loss, rtol=1e-5)


def test_attention_mask_at_query_positions_is_those_rows_of_the_full_mask():
  doc = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  index = jnp.array([[0, 4, 5], [5, 2, 2]])
  for window in (0, 2):
    full = M.attention_mask(doc, window)
    want = np.take_along_axis(np.asarray(full[:, 0]), np.asarray(index)[..., None], axis=1)
    got = M.attention_mask(doc, window, index)
    assert got.shape == (2, 1, 3, 6)
    np.testing.assert_array_equal(got[:, 0], want)


# The last layer at the prediction slots must give what every position then a gather gives:
# learned and rotary positions, pre- and post-LN, a sliding-window last layer, both XLA paths.
LAST_LAYER_SETTINGS = {
    'pre_ln': {},
    'post_ln': dict(pre_layer_norm=False),
    'reference': dict(attention_impl='reference'),
    'modern_local_last': {**M.MODERN, 'local_window': 6, 'max_position': 64, 'vocab_multiple': 1},
}


@pytest.mark.parametrize('name', sorted(LAST_LAYER_SETTINGS))
def test_last_layer_at_the_slots_gives_every_position_then_gather(name):
  config = small_config(**LAST_LAYER_SETTINGS[name], dropout_rate=0.0, attention_dropout_rate=0.0)
  assert config.is_local(config.num_layers - 1) == (name == 'modern_local_last')
  graphdef, params = nnx.split(M.BertForMLM(config, rngs=nnx.Rngs(3)))
  tokens, positions, labels, weights = sparse_batch(np.random.default_rng(11))

  def loss(params, sparse):
    m = nnx.merge(graphdef, params)
    if sparse:
      logits = m(tokens, positions)
    else:
      hidden = M.gather_positions(m.encoder(tokens), positions)
      logits = m.mlm_head(hidden, m.encoder.token_embed[...])
    return losses.cross_entropy_sum(logits, labels, weights)[0] / weights.sum()

  got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, True)
  want = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, False)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-5)


def test_last_layer_at_the_slots_with_dropout_and_the_paths_that_refuse_it():
  m = make_model(dropout_rate=0.1, attention_dropout_rate=0.1)
  tokens, positions, _, _ = sparse_batch(np.random.default_rng(12))
  key = jax.random.key(1)
  hidden = m.encoder(tokens, dropout_rng=key, query_index=positions)
  assert hidden.shape == positions.shape + (32,) and np.isfinite(np.asarray(hidden)).all()
  np.testing.assert_array_equal(hidden, m.encoder(tokens, dropout_rng=key, query_index=positions))
  assert np.abs(np.asarray(hidden - m.encoder(tokens, query_index=positions))).max() > 1e-3
  # Fused kernels attend from every position: asked for a subset, the layer says so.
  splash = M.Block(small_config(attention_impl='splash', attention_dropout_rate=0.0),
                   rngs=nnx.Rngs(0))
  x = jnp.zeros((2, 24, 32))
  _, doc = M.packed_layout(tokens)
  with pytest.raises(ValueError, match="'splash' attends from every position only"):
    splash(x, doc, doc, None, jnp.asarray(positions))
  for impl, sparse in (('', True), ('xla', True), ('reference', True), ('cudnn', False),
                       ('splash', False)):
    config = small_config(attention_impl=impl, attention_dropout_rate=0.0, dtype='bfloat16')
    assert config.sparse_last_layer(128, 20) == sparse and not config.sparse_last_layer(128, 128)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_decoder_logits_gradients_are_autodiffs(dtype):
  rng = np.random.default_rng(13)
  x = jnp.asarray(rng.normal(size=(3, 5, 8)), dtype)
  emb = jnp.asarray(rng.normal(size=(11, 8)), dtype)
  bias = jnp.asarray(rng.normal(size=(11,)), jnp.float32)
  plain = lambda x, e, b: jnp.einsum('...h,vh->...v', x, e, preferred_element_type=jnp.float32) + b
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * jnp.arange(11.0))
  np.testing.assert_array_equal(M.decoder_logits(x, emb, bias), plain(x, emb, bias))
  got = jax.grad(loss(M.decoder_logits), (0, 1, 2))(x, emb, bias)
  want = jax.grad(loss(plain), (0, 1, 2))(x, emb, bias)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=1e-6,
                               atol=1e-5)


def test_dropout_keys():
  m = make_model(dropout_rate=0.1, attention_dropout_rate=0.1)
  tokens = two_unit_batch(np.random.default_rng(6))
  det_a, det_b = m.encoder(tokens), m.encoder(tokens)
  np.testing.assert_array_equal(det_a, det_b)
  key = jax.random.key(7)
  drop_a = m.encoder(tokens, dropout_rng=key)
  drop_b = m.encoder(tokens, dropout_rng=key)
  np.testing.assert_array_equal(drop_a, drop_b)
  assert np.abs(np.asarray(drop_a - det_a)).max() > 1e-3
  other = m.encoder(tokens, dropout_rng=jax.random.key(8))
  assert np.abs(np.asarray(other - drop_a)).max() > 1e-3
  # With both rates at 0 a key changes nothing.
  m0 = make_model(dropout_rate=0.0, attention_dropout_rate=0.0)
  np.testing.assert_array_equal(m0.encoder(tokens), m0.encoder(tokens, dropout_rng=key))


def test_dropout_masks_are_philox_draws_at_the_rate():
  x = jnp.ones((64, 1024), jnp.float32)
  key = jax.random.key(4)
  y = np.asarray(M.dropout(x, 0.1, key))
  philox = jax.random.wrap_key_data(jax.random.key_data(key), impl='philox4x32')
  keep = np.asarray(jax.random.bernoulli(philox, 0.9, (x.size,))).reshape(x.shape)
  np.testing.assert_array_equal(y != 0, keep)
  np.testing.assert_allclose(y[keep], 1 / 0.9, rtol=1e-6)
  n = x.size  # the dropped share within 4 standard deviations of a binomial draw
  assert abs((y == 0).mean() - 0.1) < 4 * np.sqrt(0.1 * 0.9 / n)
  # Another key, another mask; a key of another implementation is used as it is.
  assert (np.asarray(M.dropout(x, 0.1, jax.random.key(5))) != y).any()
  rbg = jax.random.key(4, impl='rbg')
  np.testing.assert_array_equal(np.asarray(M.dropout(x, 0.1, rbg)) != 0,
                                np.asarray(jax.random.bernoulli(rbg, 0.9, (x.size,))).reshape(x.shape))


def test_attention_dropout_alone_changes_output():
  m = make_model(dropout_rate=0.0, attention_dropout_rate=0.3)
  tokens = two_unit_batch(np.random.default_rng(9))
  det = m.encoder(tokens)
  drop = m.encoder(tokens, dropout_rng=jax.random.key(0))
  assert np.abs(np.asarray(drop - det)).max() > 1e-3


def test_split_merge_round_trip_holds_only_params():
  m = make_model()
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  assert jax.tree.leaves(rest) == []
  tokens = two_unit_batch(np.random.default_rng(10))
  merged = nnx.merge(graphdef, params)
  np.testing.assert_array_equal(merged.dense_logits(tokens), m.dense_logits(tokens))


@pytest.mark.slow
def test_grad_through_jitted_functional_call_is_finite():
  m = make_model(num_layers=1)  # one layer: jit compile time dominates this test
  graphdef, params = nnx.split(m, nnx.Param)
  tokens, positions, labels, weights = sparse_batch(np.random.default_rng(11))

  @jax.jit
  def loss_fn(params, key):
    model = nnx.merge(graphdef, params)
    logits = model(tokens, positions, dropout_rng=key)
    total, weight = losses.cross_entropy_sum(logits, labels, weights)
    return total / weight

  loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.key(0))
  assert np.isfinite(float(loss))
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == len(jax.tree.leaves(params))
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert float(jnp.abs(grads['encoder']['token_embed'][...]).sum()) > 0


@pytest.mark.slow
@pytest.mark.parametrize('tie', [True, False])
def test_untied_decoder_leaves_absent_tokens_embeddings_alone(tie):
  m = make_model(num_layers=1, **({} if tie else {'tie_embeddings': False}))  # tied: the cached one
  graphdef, params = nnx.split(m, nnx.Param)
  tokens, positions, labels, weights = sparse_batch(np.random.default_rng(11))
  assert ('decoder' in params['mlm_head']) == (not tie)

  def loss_fn(params):
    logits = nnx.merge(graphdef, params)(tokens, positions)
    total, weight = losses.cross_entropy_sum(logits, labels, weights)
    return total / weight

  grads = jax.jit(jax.grad(loss_fn))(params)
  embed = np.abs(np.asarray(grads['encoder']['token_embed'][...])).sum(-1)
  absent = np.setdiff1d(np.arange(VOCAB), np.asarray(tokens))
  assert absent.size > 10
  # Tied, the softmax pushes every row of the shared matrix (the degeneration of rare tokens);
  # untied, an input embedding learns only where its token occurs in the input.
  assert (embed[absent] > 0).all() if tie else (embed[absent] == 0).all()
  if not tie:
    decoder = np.abs(np.asarray(grads['mlm_head']['decoder'][...])).sum(-1)
    assert (decoder[absent] > 0).all()
    assert M.count_params(params) == M.count_params(nnx.split(make_model(
        num_layers=1), nnx.Param)[1]) + VOCAB * 32


@pytest.mark.slow
def test_bfloat16_forward_runs_and_is_close_to_float32():
  m32 = make_model(seed=3)
  m16 = make_model(seed=3, dtype='bfloat16')
  for p in jax.tree.leaves(nnx.state(m16, nnx.Param)):
    assert p.dtype == jnp.float32
  tokens, positions, _, _ = sparse_batch(np.random.default_rng(12))
  assert m16.encoder(tokens).dtype == jnp.bfloat16
  l32, l16 = m32(tokens, positions), m16(tokens, positions)
  assert l16.dtype == jnp.float32
  # bf16 keeps ~8 mantissa bits: allow a few percent of the logit scale.
  scale = float(jnp.abs(l32).max())
  assert float(jnp.abs(l16 - l32).max()) < 0.05 * scale


def _output(captured, *path):
  """Returns the first output of the submodule at `path` from an nnx.capture of method outputs."""
  for key in path:
    captured = captured[key]
  return captured['__call__'][0]


@pytest.mark.parametrize('pre_ln', [True, False])
def test_bfloat16_keeps_the_residual_stream_float32(pre_ln):
  tokens = two_unit_batch(np.random.default_rng(12))
  capture = nnx.capture(lambda m: m.encoder(tokens), nnx.Intermediate,
                        method_outputs=nnx.Intermediate)
  h16, out16 = capture(make_model(seed=3, dtype='bfloat16', pre_layer_norm=pre_ln))
  _, out32 = capture(make_model(seed=3, pre_layer_norm=pre_ln))
  # The stream starts as the float32 embedding LayerNorm, unrounded: the float32 model's bits.
  stream = _output(out16, 'encoder', 'embed_norm')
  assert stream.dtype == jnp.float32
  np.testing.assert_array_equal(stream, _output(out32, 'encoder', 'embed_norm'))
  for i in range(2):
    layer = ('encoder', 'layers', i)
    assert _output(out16, *layer).dtype == jnp.float32  # the stream after each block
    assert _output(out16, *layer, 'attention').dtype == jnp.bfloat16  # the matmuls stay bf16
    assert _output(out16, *layer, 'mlp').dtype == jnp.bfloat16
  assert h16.dtype == jnp.bfloat16  # the encoder still hands its heads the compute dtype


def bert_param_count(v, h, layers, inter, max_pos=512, types=2, pre_ln=False) -> int:
  """BERT's encoder plus MLM head (no pooler), counted by formula."""
  embeddings = v * h + max_pos * h + types * h + 2 * h
  layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * (2 * h)
  head = (h * h + h) + 2 * h + v
  return embeddings + layers * layer + head + (2 * h if pre_ln else 0)


@pytest.mark.slow
@pytest.mark.parametrize('pre_ln', [True, False])
def test_base_parameter_count_matches_bert_formula(pre_ln):
  vocab = 30522
  cfg = M.encoder_config('base', vocab_size=vocab, pre_layer_norm=pre_ln)
  abstract = nnx.eval_shape(lambda: M.BertForMLM(cfg, rngs=nnx.Rngs(0)))
  n = M.count_params(nnx.state(abstract, nnx.Param))
  assert n == bert_param_count(vocab, 768, 12, 3072, pre_ln=pre_ln)
  if not pre_ln:
    # Encoder + pooler (768*768 + 768) is the published bert-base-uncased size, 109,482,240.
    encoder = M.count_params(nnx.state(abstract.encoder, nnx.Param))
    assert encoder + 768 * 768 + 768 == 109_482_240


def test_partition_names_on_params():
  m = make_model()
  specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
  allowed = {'vocab', 'embed', 'mlp', 'heads', 'kv', None}
  values = nnx.to_flat_state(nnx.state(m, nnx.Param))
  for path, spec in nnx.to_flat_state(specs):
    names = tuple(spec.get_value())
    assert set(names) <= allowed, path
    assert len(names) == dict(values)[path].get_value().ndim, path
  enc = specs['encoder']
  assert tuple(enc['token_embed'].get_value()) == ('vocab', 'embed')
  attn = enc['layers'][0]['attention']
  assert tuple(attn['query']['kernel'].get_value()) == ('embed', 'heads', 'kv')
  assert tuple(attn['output']['kernel'].get_value()) == ('heads', 'kv', 'embed')
  mlp = enc['layers'][0]['mlp']
  assert tuple(mlp['intermediate']['kernel'].get_value()) == ('embed', 'mlp')
  assert tuple(mlp['output']['kernel'].get_value()) == ('mlp', 'embed')


def test_init_statistics():
  m = make_model()
  enc = m.encoder
  draws = np.concatenate([np.ravel(x) for x in (
      enc.token_embed[...], enc.position_embed[...], enc.layers[0].attention.query.kernel[...],
      enc.layers[0].mlp.intermediate.kernel[...], m.mlm_head.transform.kernel[...])])
  # Truncated at 2 std, as BERT: the truncated normal's std is 0.02 * 0.8796.
  n = draws.size
  assert abs(draws.mean()) < 5 * 0.02 / np.sqrt(n)
  assert abs(draws.std() - 0.02 * 0.8796) < 5 * 0.02 / np.sqrt(2 * n)
  assert np.abs(draws).max() <= 0.04 + 1e-6
  norm = m.encoder.embed_norm
  np.testing.assert_array_equal(norm.scale[...], 1.0)
  np.testing.assert_array_equal(norm.bias[...], 0.0)
  np.testing.assert_array_equal(m.encoder.layers[0].attention.query.bias[...], 0.0)


def test_encoder_config_sizes_and_errors():
  for name, shape in M.SIZES.items():
    cfg = M.encoder_config(name, vocab_size=100)
    assert cfg.hidden_size // cfg.num_heads == 64, name
    # BERT's MLP is 4H wide; ModernBERT's gated width is 1.5H (base) and about 2.6H (large).
    ratio = {'modern_large': 2.5625}.get(name, 2.0 if name == 'modern_tiny' else
                                         1.5 if name.startswith('modern') else 4)
    assert cfg.intermediate_size == ratio * cfg.hidden_size, name
  assert M.encoder_config('base', vocab_size=10, num_layers=3).num_layers == 3
  with pytest.raises(ValueError, match=r"model\.size.*'huge'.*tiny"):
    M.encoder_config('huge', vocab_size=100)
  with pytest.raises(ValueError, match='num_layerz'):
    M.encoder_config('tiny', vocab_size=100, num_layerz=3)
  with pytest.raises(ValueError, match=r'model\.dtype'):
    M.encoder_config('tiny', vocab_size=100, dtype='float16')
  with pytest.raises(ValueError, match=r'model\.attention_impl'):
    M.encoder_config('tiny', vocab_size=100, attention_impl='flash')
  with pytest.raises(ValueError, match='num_heads'):
    M.encoder_config('tiny', vocab_size=100, num_heads=3)


def test_encoder_config_size_fills_zero_shape_fields():
  base = M.EncoderConfig(vocab_size=100, size='base', num_layers=3)
  assert (base.hidden_size, base.num_layers, base.num_heads, base.intermediate_size) == (
      768, 3, 12, 3072)
  assert base == M.encoder_config('base', vocab_size=100, num_layers=3)  # size is not compared
  assert base == M.EncoderConfig(vocab_size=100, hidden_size=768, num_layers=3, num_heads=12,
                                 intermediate_size=3072, attention_impl=None)
  assert base.attention_impl == '' and base.size == 'base'
  for size in ('', 'custom'):
    with pytest.raises(ValueError, match=rf"^model.intermediate_size must be set \(> 0\) when "
                                         rf"model.size='{size}'"):
      M.EncoderConfig(vocab_size=100, size=size, hidden_size=32, num_layers=1, num_heads=2)
  with pytest.raises(ValueError, match=r"model\.size.*'huge'"):
    M.EncoderConfig(vocab_size=100, size='huge')


def test_attention_impl_empty_string_and_xla_agree_with_default():
  tokens = two_unit_batch(np.random.default_rng(14))
  default = make_model().encoder(tokens)
  for impl in ('', 'xla'):
    np.testing.assert_array_equal(
        make_model(attention_impl=impl, attention_dropout_rate=0.0).encoder(tokens), default)


def test_cudnn_attention_with_attention_dropout_is_refused_not_bypassed():
  for impl in ('cudnn', 'xla', 'splash'):
    with pytest.raises(ValueError, match=rf"attention_impl='{impl}' has no dropout on the "
                                         r"attention probabilities.*=0\.1"):
      M.EncoderConfig(vocab_size=100, size='tiny', attention_impl=impl,
                      attention_dropout_rate=0.1)
  # Hidden dropout alone leaves the attention fused.
  M.EncoderConfig(vocab_size=100, size='tiny', attention_impl='cudnn', dropout_rate=0.1,
                  attention_dropout_rate=0.0, dtype='bfloat16')
  from configs import finetune, pretrain  # pylint: disable=g-import-not-at-top
  for size in ('tiny_classic', 'mini', 'base', 'large'):  # pretraining: no dropout on the probabilities
    c = pretrain.get_config(size)
    assert c.model.attention_dropout_rate == 0.0
    M.EncoderConfig(vocab_size=100, **{**c.model, 'attention_impl': 'cudnn', 'dtype': 'bfloat16'})
  # cuDNN's attention takes 16-bit inputs only: float32 is refused by name, not deep in a trace.
  with pytest.raises(ValueError, match=r"attention_impl='cudnn' needs model\.dtype='bfloat16'"):
    M.EncoderConfig(vocab_size=100, size='tiny', attention_impl='cudnn', attention_dropout_rate=0.0)
  assert finetune.get_config('bbc').model.attention_dropout_rate == 0.1


def test_sequence_longer_than_max_position_is_a_clear_error():
  m = make_model()
  with pytest.raises(ValueError, match='max_position'):
    m.encoder(np.full((1, 65), 7, np.int32))


def np_layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def np_encoder_row(params, tokens, types, config):
  """Float64 NumPy BERT encoder over one packed row, written from the paper's equations."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  pos, doc = map(np.array, reference_layout(tokens))
  allowed = (doc[:, None] == doc[None, :]) & (doc[None, :] > 0)
  eps = config.layer_norm_eps
  x = p['token_embed'][tokens] + p['position_embed'][pos] + p['type_embed'][types]
  x = np_layer_norm(x, p['embed_norm'], eps)

  def attention(h, a):
    q, k, v = (np.einsum('lh,hnd->lnd', h, a[n]['kernel']) + a[n]['bias']
               for n in ('query', 'key', 'value'))
    scores = np.einsum('tnd,snd->nts', q, k) / np.sqrt(q.shape[-1])
    scores = np.where(allowed[None], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum('nts,snd->tnd', probs, v)
    return np.einsum('tnd,ndh->th', out, a['output']['kernel']) + a['output']['bias']

  def mlp(h, m):
    u = h @ m['intermediate']['kernel'] + m['intermediate']['bias']
    u = 0.5 * u * (1 + scipy.special.erf(u / np.sqrt(2)))  # exact GELU
    return u @ m['output']['kernel'] + m['output']['bias']

  for i in range(config.num_layers):
    lp = p['layers'][i]
    if config.pre_layer_norm:
      x = x + attention(np_layer_norm(x, lp['attention_norm'], eps), lp['attention'])
      x = x + mlp(np_layer_norm(x, lp['mlp_norm'], eps), lp['mlp'])
    else:
      x = np_layer_norm(x + attention(x, lp['attention']), lp['attention_norm'], eps)
      x = np_layer_norm(x + mlp(x, lp['mlp']), lp['mlp_norm'], eps)
  return np_layer_norm(x, p['final_norm'], eps) if config.pre_layer_norm else x


@pytest.mark.parametrize('pre_ln', [True, False])
def test_encoder_matches_float64_numpy_reference(pre_ln):
  # A wide init puts GELU inputs where exact and tanh-approximate GELU differ (~1e-3 at |u|~2).
  m = make_model(pre_layer_norm=pre_ln, initializer_range=0.3)
  params = nnx.to_pure_dict(nnx.state(m.encoder, nnx.Param))
  tokens = two_unit_batch(np.random.default_rng(13))
  types = np.zeros_like(tokens)
  types[:, 7:] = 1
  hidden = np.asarray(m.encoder(tokens, type_ids=types))
  for row in range(tokens.shape[0]):
    ref = np_encoder_row(params, tokens[row], types[row], m.encoder.config)
    real = tokens[row] != PAD
    np.testing.assert_allclose(hidden[row][real], ref[real], atol=2e-5, rtol=0)


def _checkpoint_policies(jaxpr) -> list:
  """Returns the policy of every checkpoint (remat) equation in a jaxpr, nested ones included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('checkpoint', 'remat', 'remat2'):  # jax.checkpoint's primitive
      found.append(eqn.params['policy'])
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _checkpoint_policies(sub)
  return found


@pytest.mark.slow
@pytest.mark.parametrize('remat', ['full', 'dots', 'dots_no_batch'])
def test_remat_policies_keep_loss_and_grads(remat):
  tokens, positions, labels, weights = sparse_batch(np.random.default_rng(15))

  def value_and_grad(m):
    graphdef, params = nnx.split(m, nnx.Param)

    def loss_fn(params, key):
      logits = nnx.merge(graphdef, params)(tokens, positions, dropout_rng=key)
      total, weight = losses.cross_entropy_sum(logits, labels, weights)
      return total / weight

    fn = jax.value_and_grad(loss_fn)
    return jax.jit(fn)(params, jax.random.key(1)), jax.make_jaxpr(fn)(params, jax.random.key(1))

  # Dropout on: the recomputed forward pass must draw the same dropout masks as the first one.
  (loss, grads), plain_jaxpr = value_and_grad(make_model(dropout_rate=0.1))
  (loss_r, grads_r), remat_jaxpr = value_and_grad(make_model(dropout_rate=0.1, remat=remat))
  assert _checkpoint_policies(plain_jaxpr.jaxpr) == []
  # One checkpoint per encoder block, each with the named policy.
  assert _checkpoint_policies(remat_jaxpr.jaxpr) == [M.REMAT_POLICIES[remat]] * 2
  np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
  for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(np.asarray(g_r), np.asarray(g), rtol=1e-6, atol=1e-9)


def test_unknown_remat_policy_names_the_key():
  with pytest.raises(ValueError, match=r"model\.remat: 'some' is not supported"):
    small_config(remat='some')


def test_heads_lay_out_rows_by_the_cls_and_pad_ids_they_are_given():
  """A WordPiece-like row ([CLS]=7, [SEP]=8): id 2 inside the text is a word, not a unit start."""
  cfg = small_config()
  row = jnp.array([[7, 9, CLS, 11, 12, 8, PAD, PAD]], jnp.int32)
  real = (row != PAD).astype(jnp.int32)
  one_unit = dict(position_ids=jnp.arange(8, dtype=jnp.int32)[None] * real, doc_ids=real)
  ids = dict(cls_id=7, pad_id=PAD)
  clf = heads.SequenceClassifier(cfg, 3, pooling='cls', **ids, rngs=nnx.Rngs(0))
  hidden = clf.encoder(row, **one_unit)
  # The sentencepiece default splits the row at id 2: the [CLS] vector would read 2 tokens only.
  assert np.abs(np.asarray(clf.encoder(row)[:, 0] - hidden[:, 0])).max() > 1e-3
  np.testing.assert_allclose(clf.encoder(row, **ids), hidden, atol=1e-6)
  np.testing.assert_allclose(clf(row), clf.classifier(hidden[:, 0]), atol=1e-6)
  tagger = heads.TokenTagger(cfg, 3, **ids, rngs=nnx.Rngs(1))
  np.testing.assert_allclose(tagger(row), tagger.classifier(tagger.encoder(row, **one_unit)),
                             atol=1e-6)
  dual = heads.DualEncoder(cfg, pooling='mean', **ids, rngs=nnx.Rngs(2))
  np.testing.assert_allclose(dual(row), heads.mean_pool(dual.encoder(row, **one_unit), real), atol=1e-6)


@pytest.mark.parametrize('pre_ln', [True, False])
def test_cls_pooling_runs_the_last_layer_at_cls_with_every_position_gradients(pre_ln):
  cfg = small_config(pre_layer_norm=pre_ln, dropout_rate=0.0, attention_dropout_rate=0.0)
  clf = heads.SequenceClassifier(cfg, 3, pooling='cls', rngs=nnx.Rngs(4))
  graphdef, params = nnx.split(clf)
  rows = jnp.asarray(two_unit_batch(np.random.default_rng(14)))
  types = jnp.asarray(np.random.default_rng(15).integers(0, 2, rows.shape), jnp.int32)

  def loss(params, sparse):
    m = nnx.merge(graphdef, params)
    if sparse:
      pooled = heads.encode_pooled(m.encoder, rows, 'cls', pad_id=PAD, type_ids=types)
      assert pooled.shape == (2, 32)
    else:
      pooled = heads.pool(m.encoder(rows, type_ids=types), rows, 'cls')
    return jnp.sum(jnp.sin(m.classifier(pooled)))

  got = jax.value_and_grad(loss)(params, True)
  want = jax.value_and_grad(loss)(params, False)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-5)


def test_sequence_classifier_passes_token_type_ids_to_the_embeddings():
  """Pair rows' segments reach the type embeddings: flipping them moves every real position."""
  cfg = small_config(num_layers=1, dropout_rate=0.0)
  clf = heads.SequenceClassifier(cfg, 3, pooling='mean', rngs=nnx.Rngs(0))
  row = jnp.array([[CLS, 9, 10, SEP, 11, 12, 13, SEP, PAD, PAD]], jnp.int32)
  types = jnp.array([[0, 0, 0, 0, 1, 1, 1, 1, 0, 0]], jnp.int32)

  @jax.jit
  def outputs(model, types):
    flipped = jnp.where(row != PAD, 1 - types, 0)
    return (model.encoder(row, type_ids=types), model.encoder(row, type_ids=flipped),
            model(row, type_ids=types), model(row), model(row, type_ids=jnp.zeros_like(types)))

  hidden, hidden_flipped, logits, plain, zeros = outputs(clf, types)
  assert float(jnp.abs(hidden - hidden_flipped)[row != PAD].min()) > 1e-4
  np.testing.assert_allclose(logits, clf.classifier(heads.mean_pool(hidden, row != PAD)), atol=1e-5)
  np.testing.assert_allclose(plain, zeros, atol=1e-6)  # no type ids: all segment 0
  assert float(jnp.abs(logits - plain).max()) > 1e-5
