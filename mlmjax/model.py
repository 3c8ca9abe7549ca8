"""BERT-style Flax NNX encoder over packed rows, with a sparse (gathered) MLM head."""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_ATTENTION_IMPLS = (None, '', 'xla', 'cudnn')
# Rematerialization of each encoder block: which intermediates the backward pass keeps instead of
# recomputing. '' keeps everything (no remat); 'full' keeps only the block's inputs; 'dots' keeps
# every matmul output (attention scores included); 'dots_no_batch' keeps the weight matmuls only
# and recomputes the attention scores and softmax, the (heads, L, L) activations.
REMAT_POLICIES: dict[str, Any] = {
    '': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


_SHAPE_FIELDS = ('hidden_size', 'num_layers', 'num_heads', 'intermediate_size')


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Shape and numerics of the encoder; parameters are always float32.

  `config.model` holds these fields (all but vocab_size): EncoderConfig(vocab_size=V, **config.model).
  A shape field left 0 takes the value of the named `size` (a key of SIZES); with size '' or
  'custom' all four shape fields must be set. After construction they hold the resolved shape.
  """
  vocab_size: int
  # Named shape (a key of SIZES), '' or 'custom'; it only fills zero shape fields, so two configs
  # of the same resolved shape compare equal whatever named it.
  size: str = dataclasses.field(default='', compare=False)
  hidden_size: int = 0
  num_layers: int = 0
  num_heads: int = 0
  intermediate_size: int = 0
  max_position: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1  # hidden dropout (embeddings, attention output, MLP output)
  attention_dropout_rate: float = 0.1  # dropout on the attention probabilities
  layer_norm_eps: float = 1e-12  # BERT's value
  pre_layer_norm: bool = True  # False = BERT's original post-LN
  tie_embeddings: bool = True  # False = the MLM decoder has its own (V, H) output embedding
  initializer_range: float = 0.02  # truncated-normal std, as BERT
  dtype: str = 'float32'  # compute dtype: 'float32' or 'bfloat16'
  attention_impl: str = ''  # jax.nn.dot_product_attention(implementation=...); '' (or None): XLA chooses
  remat: str = ''  # per-block rematerialization policy, a key of REMAT_POLICIES

  def __post_init__(self):
    if self.size not in ('', 'custom') and self.size not in SIZES:
      raise ValueError(f"model.size: unknown size {self.size!r}; choose one of {list(SIZES)} or "
                       "'custom'")
    named = SIZES.get(self.size, {})
    for key in _SHAPE_FIELDS:
      if not getattr(self, key):
        if key not in named:
          raise ValueError(f'model.{key} must be set (> 0) when model.size={self.size!r}')
        object.__setattr__(self, key, named[key])
    if self.attention_impl is None:
      object.__setattr__(self, 'attention_impl', '')
    if self.dtype not in _DTYPES:
      raise ValueError(f'model.dtype: {self.dtype!r} is not supported; use one of {sorted(_DTYPES)}')
    if self.attention_impl not in _ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl: {self.attention_impl!r} is not supported; "
                       "use '' (XLA chooses), 'xla' or 'cudnn'")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat: {self.remat!r} is not supported; use one of '
                       f'{list(REMAT_POLICIES)} (\'\' = no rematerialization)')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'model: hidden_size {self.hidden_size} is not divisible by '
                       f'num_heads {self.num_heads}; change one of them')
    for name in ('dropout_rate', 'attention_dropout_rate'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f'model.{name}: {getattr(self, name)} must be in [0, 1)')
    if self.attention_impl == 'cudnn' and self.attention_dropout_rate > 0:
      # The fused kernels have no dropout on the probabilities: training would run the einsum path.
      raise ValueError(f"model.attention_impl='cudnn' cannot apply model.attention_dropout_rate="
                       f"{self.attention_dropout_rate}; set it to 0 or attention_impl to ''")

  @property
  def compute_dtype(self) -> Any:
    """Returns the jnp dtype that matmuls and activations use."""
    return _DTYPES[self.dtype]


def _size(layers: int, hidden: int, heads: int) -> dict[str, int]:
  return dict(num_layers=layers, hidden_size=hidden, num_heads=heads, intermediate_size=4 * hidden)


# mini/small/base/large are BERT's published shapes (Turc et al. 2019; Devlin et al. 2019).
SIZES: dict[str, dict] = {
    'tiny': _size(2, 128, 2),
    'mini': _size(4, 256, 4),
    'small': _size(4, 512, 8),
    'base': _size(12, 768, 12),
    'large': _size(24, 1024, 16),
}


def encoder_config(size: str, *, vocab_size: int, **overrides) -> EncoderConfig:
  """Returns the EncoderConfig of named shape `size`, with `overrides` applied."""
  if size not in SIZES:
    raise ValueError(f'model.size: unknown size {size!r}; choose one of {list(SIZES)}')
  fields = {f.name for f in dataclasses.fields(EncoderConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'model: unknown encoder setting(s) {unknown}; known: {sorted(fields)}')
  return EncoderConfig(vocab_size=vocab_size, **{**SIZES[size], 'size': size, **overrides})


# [CLS] and [PAD] of the sentencepiece layout (tokenizer.py's fixed ids): the defaults where rows
# are known to use it; a fine-tuning task passes its tokenizer's ids (WordPiece: [CLS]=101).
SP_CLS_ID, SP_PAD_ID = 2, 0


def packed_layout(tokens: jax.Array, *, cls_id: int = SP_CLS_ID,
                  pad_id: int = SP_PAD_ID) -> tuple[jax.Array, jax.Array]:
  """Returns (position_ids, doc_ids), both (B, L) int32, from the [CLS] markers of packed rows."""
  tokens = jnp.asarray(tokens)
  idx = jnp.arange(tokens.shape[-1], dtype=jnp.int32)
  # Column 0 always opens a unit, so a row that does not start with [CLS] is still one unit.
  starts = (tokens == cls_id) | (idx == 0)
  real = (tokens != pad_id).astype(jnp.int32)
  doc_ids = jnp.cumsum(starts.astype(jnp.int32), axis=-1) * real
  last_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=tokens.ndim - 1)
  position_ids = (idx - last_start) * real
  return position_ids.astype(jnp.int32), doc_ids.astype(jnp.int32)


def attention_mask(doc_ids: jax.Array) -> jax.Array:
  """Returns the (B, 1, L, L) bool mask: query and key in the same unit, key not padding."""
  same = doc_ids[:, :, None] == doc_ids[:, None, :]
  return (same & (doc_ids[:, None, :] > 0))[:, None]


def _param(rngs: nnx.Rngs, init, shape, names) -> nnx.Param:
  # Values are drawn flat and reshaped: eager (un-jitted) init compiles one sampler per distinct
  # shape, and flat draws share samplers across shapes of equal size (tiny model init 13 s -> 4 s).
  def flat_init(key, shape, dtype):
    return init(key, (math.prod(shape),), dtype).reshape(shape)
  # eager_sharding=False: names are metadata only, so construction needs no mesh; sharding.py maps
  # them to mesh axes (nnx.get_partition_spec) and shards through jit out_shardings.
  partitioned = nnx.with_partitioning(flat_init, tuple(names), eager_sharding=False)
  return nnx.Param(partitioned(rngs.params(), tuple(shape), jnp.float32))


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Returns x with inverted dropout applied, or x itself when key is None or rate is 0."""
  if key is None or rate == 0.0:
    return x
  # Flat draw, as in _param: eager calls then share one compiled sampler per size.
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.size,)).reshape(x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
  return None if key is None else jax.random.fold_in(key, i)


class Dense(nnx.Module):
  """Affine map contracting the last `n_in` input axes with the first `n_in` kernel axes."""

  def __init__(self, config: EncoderConfig, shape, names, *, n_in: int = 1, rngs: nnx.Rngs):
    self.n_in = n_in
    self.dtype = config.compute_dtype
    init = jax.nn.initializers.truncated_normal(config.initializer_range)
    self.kernel = _param(rngs, init, shape, names)
    self.bias = _param(rngs, jax.nn.initializers.zeros, shape[n_in:], names[n_in:])

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), axes=self.n_in)
    return y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm whose statistics are float32; returns `dtype` (default: the compute dtype)."""

  def __init__(self, config: EncoderConfig, *, dtype: Any = None, rngs: nnx.Rngs):
    self.eps = config.layer_norm_eps
    self.dtype = config.compute_dtype if dtype is None else dtype
    h = config.hidden_size
    self.scale = _param(rngs, jax.nn.initializers.ones, (h,), ('embed',))
    self.bias = _param(rngs, jax.nn.initializers.zeros, (h,), ('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def _attend_with_dropout(q, k, v, mask, rate: float, key: jax.Array) -> jax.Array:
  """Returns softmax(q k^T / sqrt(d)) v with dropout on the probabilities, (B, T, N, D)."""
  logits = jnp.einsum('btnd,bsnd->bnts', q, k, preferred_element_type=jnp.float32)
  logits = logits / np.sqrt(q.shape[-1])
  # A finite fill (as jax.nn.dot_product_attention uses) keeps fully masked padding rows finite.
  logits = jnp.where(mask, logits, 0.7 * jnp.finfo(jnp.float32).min)
  probs = _dropout(jax.nn.softmax(logits, axis=-1), rate, key)
  return jnp.einsum('bnts,bsnd->btnd', probs.astype(v.dtype), v)


class Attention(nnx.Module):
  """Multi-head self-attention with BERT's query/key/value/output projections."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    h, n = config.hidden_size, config.num_heads
    qkv = ((h, n, h // n), ('embed', 'heads', 'kv'))
    self.query = Dense(config, *qkv, rngs=rngs)
    self.key = Dense(config, *qkv, rngs=rngs)
    self.value = Dense(config, *qkv, rngs=rngs)
    self.output = Dense(config, (n, h // n, h), ('heads', 'kv', 'embed'), n_in=2, rngs=rngs)
    self.rate = config.attention_dropout_rate
    self.impl = config.attention_impl or None

  def __call__(self, x: jax.Array, mask: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
    q, k, v = self.query(x), self.key(x), self.value(x)
    if dropout_rng is not None and self.rate > 0.0:
      out = _attend_with_dropout(q, k, v, mask, self.rate, dropout_rng)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.impl)
    return self.output(out)


class Mlp(nnx.Module):
  """Position-wise feed-forward block: dense, exact GELU, dense."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    h, i = config.hidden_size, config.intermediate_size
    self.intermediate = Dense(config, (h, i), ('embed', 'mlp'), rngs=rngs)
    self.output = Dense(config, (i, h), ('mlp', 'embed'), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.output(jax.nn.gelu(self.intermediate(x), approximate=False))


class Block(nnx.Module):
  """One transformer layer, pre-LN or post-LN per the config; the residual stream is float32."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.pre_ln = config.pre_layer_norm
    self.rate = config.dropout_rate
    self.attention = Attention(config, rngs=rngs)
    # Post-LN's norms write the residual stream (float32); pre-LN's feed the matmuls only.
    stream = None if config.pre_layer_norm else jnp.float32
    self.attention_norm = LayerNorm(config, dtype=stream, rngs=rngs)
    self.mlp = Mlp(config, rngs=rngs)
    self.mlp_norm = LayerNorm(config, dtype=stream, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
    keys = [_fold(dropout_rng, i) for i in range(3)]
    # With bf16 sublayers the stream stays float32: its ~8 bits would round away each layer's
    # update where it is small against the stream; the sublayer outputs promote to float32.
    x = x.astype(jnp.float32)
    if self.pre_ln:
      x = x + _dropout(self.attention(self.attention_norm(x), mask, keys[0]), self.rate, keys[1])
      return x + _dropout(self.mlp(self.mlp_norm(x)), self.rate, keys[2])
    x = self.attention_norm(x + _dropout(self.attention(x, mask, keys[0]), self.rate, keys[1]))
    return self.mlp_norm(x + _dropout(self.mlp(x), self.rate, keys[2]))


def _call_block(layer: Block, x: jax.Array, mask: jax.Array,
                dropout_rng: jax.Array | None) -> jax.Array:
  return layer(x, mask, dropout_rng)


def block_fn(remat: str):
  """Returns f(layer, x, mask, dropout_rng) -> x, wrapped in nnx.remat with the named policy."""
  if not remat:
    return _call_block
  return nnx.remat(_call_block, policy=REMAT_POLICIES[remat])


class Encoder(nnx.Module):
  """Embeddings plus a stack of transformer blocks; holds only nnx.Params."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    h = config.hidden_size
    init = jax.nn.initializers.truncated_normal(config.initializer_range)
    self.token_embed = _param(rngs, init, (config.vocab_size, h), ('vocab', 'embed'))
    self.position_embed = _param(rngs, init, (config.max_position, h), (None, 'embed'))
    self.type_embed = _param(rngs, init, (config.type_vocab_size, h), (None, 'embed'))
    self.embed_norm = LayerNorm(config, dtype=jnp.float32, rngs=rngs)  # starts the residual stream
    self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = LayerNorm(config, rngs=rngs) if config.pre_layer_norm else None

  def __call__(self, input_ids: jax.Array, *, type_ids: jax.Array | None = None,
               position_ids: jax.Array | None = None, doc_ids: jax.Array | None = None,
               dropout_rng: jax.Array | None = None, cls_id: int = SP_CLS_ID,
               pad_id: int = SP_PAD_ID) -> jax.Array:
    """Returns hidden states (B, L, H) in the compute dtype; absent layout ids: packed_layout's."""
    if input_ids.shape[-1] > self.config.max_position:
      raise ValueError(f'model.max_position: {self.config.max_position} is shorter than the '
                       f'sequence length {input_ids.shape[-1]}; raise it or lower train.seq_len')
    if position_ids is None or doc_ids is None:
      pos, doc = packed_layout(input_ids, cls_id=cls_id, pad_id=pad_id)
      position_ids = pos if position_ids is None else position_ids
      doc_ids = doc if doc_ids is None else doc_ids
    if type_ids is None:
      type_ids = jnp.zeros_like(input_ids)
    x = (jnp.take(self.token_embed[...], input_ids, axis=0)
         + jnp.take(self.position_embed[...], position_ids, axis=0)
         + jnp.take(self.type_embed[...], type_ids, axis=0))
    rate = self.config.dropout_rate
    x = _dropout(self.embed_norm(x), rate, _fold(dropout_rng, 0))
    mask = attention_mask(doc_ids)
    call = block_fn(self.config.remat)
    for i, layer in enumerate(self.layers):
      x = call(layer, x, mask, _fold(dropout_rng, i + 1))
    if self.final_norm is None:
      return x.astype(self.config.compute_dtype)
    return self.final_norm(x)


class MlmHead(nnx.Module):
  """BERT's MLM head: transform (dense, GELU, LayerNorm), then a tied or untied decoder and a bias."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.dtype = config.compute_dtype
    self.transform = Dense(config, (h, h), ('embed', None), rngs=rngs)
    self.norm = LayerNorm(config, rngs=rngs)
    self.bias = _param(rngs, jax.nn.initializers.zeros, (config.vocab_size,), ('vocab',))
    self.decoder = None if config.tie_embeddings else _param(
        rngs, jax.nn.initializers.truncated_normal(config.initializer_range),
        (config.vocab_size, h), ('vocab', 'embed'))

  def __call__(self, hidden: jax.Array, embedding: jax.Array) -> jax.Array:
    """Returns float32 logits (..., V) for hidden states (..., H) and the (V, H) token embedding."""
    x = self.norm(jax.nn.gelu(self.transform(hidden), approximate=False))
    if self.decoder is not None:
      embedding = self.decoder[...]
    logits = jnp.einsum('...h,vh->...v', x.astype(self.dtype), embedding.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    return logits + self.bias[...]


class BertForMLM(nnx.Module):
  """Encoder plus MLM head; the head runs only at the requested prediction positions."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.encoder = Encoder(config, rngs=rngs)
    self.mlm_head = MlmHead(config, rngs=rngs)

  def __call__(self, input_ids: jax.Array, pred_positions: jax.Array, *,
               type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
               doc_ids: jax.Array | None = None,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Returns float32 logits (B, P, V) at pred_positions (B, P)."""
    hidden = self.encoder(input_ids, type_ids=type_ids, position_ids=position_ids,
                          doc_ids=doc_ids, dropout_rng=dropout_rng)
    gathered = jnp.take_along_axis(hidden, pred_positions[..., None].astype(jnp.int32), axis=1)
    return self.mlm_head(gathered, self.encoder.token_embed[...])

  def dense_logits(self, input_ids: jax.Array, **kwargs) -> jax.Array:
    """Returns float32 logits (B, L, V) at every position; takes the encoder's keywords."""
    return self.mlm_head(self.encoder(input_ids, **kwargs), self.encoder.token_embed[...])


# ---------------------------------------------------------------------------------------------
# Task heads: each model keeps the encoder under `encoder`, so init_from swaps in pretrained weights.

POOLINGS = ('cls', 'mean')


def mean_pool(hidden: jax.Array, valid: jax.Array) -> jax.Array:
  """Returns float32 (B, H): the mean of hidden (B, L, H) over positions where valid (B, L)."""
  w = valid.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def pool(hidden: jax.Array, tokens: jax.Array, how: str, pad_id: int = SP_PAD_ID) -> jax.Array:
  """Returns float32 (B, H): the [CLS] (first) vector, or the mean over non-padding positions."""
  if how == 'cls':
    return hidden[:, 0].astype(jnp.float32)
  if how == 'mean':
    return mean_pool(hidden, tokens != pad_id)
  raise ValueError(f'pooling {how!r} is not supported; use one of {list(POOLINGS)}')


class SequenceClassifier(nnx.Module):
  """Encoder, pooled vector ([CLS] or mean), dropout and a linear layer to num_labels logits."""

  def __init__(self, config: EncoderConfig, num_labels: int, *, pooling: str = 'cls',
               cls_id: int = SP_CLS_ID, pad_id: int = SP_PAD_ID, rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f'pooling {pooling!r} is not supported; use one of {list(POOLINGS)}')
    self.encoder = Encoder(config, rngs=rngs)
    self.pooling = pooling
    self.cls_id, self.pad_id = int(cls_id), int(pad_id)  # the tokenizer's: layout, padding
    self.rate = config.dropout_rate
    self.classifier = Dense(config, (config.hidden_size, num_labels), ('embed', None), rngs=rngs)

  def __call__(self, input_ids: jax.Array, *, type_ids: jax.Array | None = None,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Returns float32 logits (B, num_labels) of rows (B, L); type_ids (B, L): pairs' segments."""
    hidden = self.encoder(input_ids, type_ids=type_ids, dropout_rng=_fold(dropout_rng, 0),
                          cls_id=self.cls_id, pad_id=self.pad_id)
    pooled = pool(hidden, input_ids, self.pooling, pad_id=self.pad_id)
    pooled = _dropout(pooled, self.rate, _fold(dropout_rng, 1))
    return self.classifier(pooled).astype(jnp.float32)


class TokenTagger(nnx.Module):
  """Encoder, dropout and a linear layer to num_tags logits at every position."""

  def __init__(self, config: EncoderConfig, num_tags: int, *, cls_id: int = SP_CLS_ID,
               pad_id: int = SP_PAD_ID, rngs: nnx.Rngs):
    self.encoder = Encoder(config, rngs=rngs)
    self.cls_id, self.pad_id = int(cls_id), int(pad_id)
    self.rate = config.dropout_rate
    self.classifier = Dense(config, (config.hidden_size, num_tags), ('embed', None), rngs=rngs)

  def __call__(self, input_ids: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Returns float32 logits (B, L, num_tags)."""
    hidden = self.encoder(input_ids, dropout_rng=_fold(dropout_rng, 0), cls_id=self.cls_id,
                          pad_id=self.pad_id)
    return self.classifier(_dropout(hidden, self.rate, _fold(dropout_rng, 1))).astype(jnp.float32)


class DualEncoder(nnx.Module):
  """One shared encoder for queries and documents; embeddings are pooled hidden states."""

  def __init__(self, config: EncoderConfig, *, pooling: str = 'mean', cls_id: int = SP_CLS_ID,
               pad_id: int = SP_PAD_ID, rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f'pooling {pooling!r} is not supported; use one of {list(POOLINGS)}')
    self.encoder = Encoder(config, rngs=rngs)
    self.pooling = pooling
    self.cls_id, self.pad_id = int(cls_id), int(pad_id)

  def __call__(self, input_ids: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Returns float32 (B, H) embeddings, not normalized."""
    hidden = self.encoder(input_ids, dropout_rng=dropout_rng, cls_id=self.cls_id,
                          pad_id=self.pad_id)
    return pool(hidden, input_ids, self.pooling, pad_id=self.pad_id)


def count_params(params) -> int:
  """Returns the number of scalars in a module's Params, a State, or any pytree of arrays."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(params)))
