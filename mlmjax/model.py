"""BERT-style Flax NNX encoder over packed rows, with a sparse (gathered) MLM head."""

import contextlib
import contextvars
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# '' lets jax.nn.dot_product_attention choose; 'reference' is the dense einsum path that the others
# are tested against (and the only one with dropout on the probabilities); 'splash' is Pallas splash
# attention (TPU; interpreted elsewhere, for tests).
ATTENTION_IMPLS = ('', 'xla', 'cudnn', 'reference', 'splash')
# The implementations that attend from a subset of positions (the last layer at the MLM slots).
SPARSE_QUERY_IMPLS = ('', 'xla', 'reference')
POSITIONS = ('learned', 'rope')
MLPS = ('gelu', 'geglu', 'swiglu')
NORMS = ('layernorm', 'rmsnorm')
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
# The architecture options: what a pretrained encoder's weights mean beyond their shapes.
ARCHITECTURE_OPTIONS = ('position_embedding', 'rope_theta', 'rope_local_theta', 'mlp_type', 'norm',
                        'norm_bias', 'use_bias', 'global_every', 'local_window',
                        'first_attention_norm', 'vocab_multiple')


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
  attention_impl: str = ''  # a key of ATTENTION_IMPLS; '' (or None): jax.nn.dot_product_attention chooses
  remat: str = ''  # per-block rematerialization policy, a key of REMAT_POLICIES
  # Architecture options (MODERN sets them as ModernBERT does); the defaults are BERT's.
  position_embedding: str = 'learned'  # 'learned' table of max_position rows, or 'rope' (rotary)
  rope_theta: float = 10000.0  # rotary base of the global-attention layers
  rope_local_theta: float = 10000.0  # rotary base of the local (sliding-window) layers
  mlp_type: str = 'gelu'  # 'gelu' (dense, GELU, dense), or gated 'geglu' / 'swiglu'
  norm: str = 'layernorm'  # 'layernorm' or 'rmsnorm'
  norm_bias: bool = True  # LayerNorm's additive bias (RMSNorm has none)
  use_bias: bool = True  # biases of the attention, MLP and head-transform layers (the decoder's stays)
  global_every: int = 1  # layer i attends globally when i % global_every == 0, else locally
  local_window: int = 0  # a local layer's query sees keys at most local_window // 2 positions away
  first_attention_norm: bool = True  # False: layer 0 attends to the embedding norm's output directly
  vocab_multiple: int = 1  # embedding and decoder rows padded to a multiple (logits keep vocab_size)

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
    if self.attention_impl not in ATTENTION_IMPLS:
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
    self._check_architecture()

  def _check_architecture(self):
    for key, choices in (('position_embedding', POSITIONS), ('mlp_type', MLPS),
                         ('norm', NORMS)):
      if getattr(self, key) not in choices:
        raise ValueError(f'model.{key}: {getattr(self, key)!r} is not supported; use one of '
                         f'{list(choices)}')
    if self.global_every < 1:
      raise ValueError(f'model.global_every: {self.global_every} must be >= 1 (1: every layer '
                       'attends globally)')
    if (self.global_every > 1) != (self.local_window > 0):
      raise ValueError(f'model.global_every={self.global_every} and model.local_window='
                       f'{self.local_window}: set both (local layers need a window) or neither')
    if self.local_window < 0 or self.local_window % 2:
      raise ValueError(f'model.local_window: {self.local_window} must be even and >= 0 (a query '
                       'sees local_window // 2 keys on each side)')
    if self.position_embedding == 'rope' and self.head_dim % 2:
      raise ValueError(f'model: rotary positions need an even head size, not {self.head_dim}')
    if self.vocab_multiple < 1:
      raise ValueError(f'model.vocab_multiple: {self.vocab_multiple} must be >= 1')
    if not self.first_attention_norm and not self.pre_layer_norm:
      raise ValueError('model.first_attention_norm=False needs model.pre_layer_norm=True')
    if self.type_vocab_size < 0:
      raise ValueError(f'model.type_vocab_size: {self.type_vocab_size} must be >= 0 (0: none)')
    # A requested implementation that cannot be honoured is an error, never a silent fallback.
    impl = self.attention_impl
    if impl in ('xla', 'cudnn', 'splash') and self.attention_dropout_rate > 0:
      raise ValueError(f"model.attention_impl={impl!r} has no dropout on the attention "
                       f"probabilities, but model.attention_dropout_rate="
                       f"{self.attention_dropout_rate}; set it to 0, or attention_impl to '' or "
                       "'reference'")
    if impl == 'cudnn' and self.dtype != 'bfloat16':
      raise ValueError(f"model.attention_impl='cudnn' needs model.dtype='bfloat16' (jax's cuDNN "
                       f"attention takes 16-bit inputs), not {self.dtype!r}")
    if impl == 'cudnn' and self.local_window:
      raise ValueError("model.attention_impl='cudnn': jax's cuDNN attention has no two-sided "
                       "sliding window (model.local_window); use '' or 'reference' on GPU")

  @property
  def head_dim(self) -> int:
    """Returns the width of one attention head."""
    return self.hidden_size // self.num_heads

  @property
  def padded_vocab_size(self) -> int:
    """Returns the number of embedding rows: vocab_size rounded up to vocab_multiple."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  def sparse_last_layer(self, seq_len: int, slots: int) -> bool:
    """Returns whether the last layer runs at `slots` positions of each row, not all seq_len."""
    return self.attention_impl in SPARSE_QUERY_IMPLS and slots < seq_len

  def is_local(self, layer: int) -> bool:
    """Returns whether layer `layer` attends through the sliding window."""
    return layer % self.global_every != 0

  @property
  def compute_dtype(self) -> Any:
    """Returns the jnp dtype that matmuls and activations use."""
    return _DTYPES[self.dtype]


def _size(layers: int, hidden: int, heads: int) -> dict[str, int]:
  return dict(num_layers=layers, hidden_size=hidden, num_heads=heads, intermediate_size=4 * hidden)


# mini/small/base/large are BERT's published shapes (Turc et al. 2019; Devlin et al. 2019);
# modern_base/modern_large are ModernBERT's (Warner et al. 2024), whose MLP width is the gated one.
SIZES: dict[str, dict] = {
    'tiny': _size(2, 128, 2),
    'mini': _size(4, 256, 4),
    'small': _size(4, 512, 8),
    'base': _size(12, 768, 12),
    'large': _size(24, 1024, 16),
    'modern_tiny': dict(num_layers=3, hidden_size=128, num_heads=2, intermediate_size=256),
    'modern_base': dict(num_layers=22, hidden_size=768, num_heads=12, intermediate_size=1152),
    'modern_large': dict(num_layers=28, hidden_size=1024, num_heads=16, intermediate_size=2624),
}

# ModernBERT's architecture (Warner et al. 2024) as EncoderConfig fields: rotary positions with a
# 160k global and 10k local base, GeGLU, bias-free layers and norms, global attention every third
# layer and a 128-token window elsewhere, no norm before the first attention, 8k positions.
MODERN: dict[str, Any] = dict(
    position_embedding='rope', rope_theta=160_000.0, rope_local_theta=10_000.0, mlp_type='geglu',
    norm='layernorm', norm_bias=False, use_bias=False, global_every=3, local_window=128,
    first_attention_norm=False, vocab_multiple=64, layer_norm_eps=1e-5, type_vocab_size=0,
    max_position=8192)


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


def attention_mask(doc_ids: jax.Array, local_window: int = 0,
                   query_index: jax.Array | None = None) -> jax.Array:
  """Returns the (B, 1, T, L) bool mask: same unit, key not padding, and within the local window.

  Queries are every position (T = L), or the positions query_index (B, T) names.
  """
  keys = jnp.arange(doc_ids.shape[-1], dtype=jnp.int32)
  queries = keys[None] if query_index is None else query_index.astype(jnp.int32)
  doc_q = doc_ids if query_index is None else jnp.take_along_axis(doc_ids, queries, axis=1)
  mask = (doc_q[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, None, :] > 0)
  if local_window:
    mask &= jnp.abs(queries[:, :, None] - keys[None, None, :]) <= local_window // 2
  return mask[:, None]


def gather_positions(x: jax.Array, index: jax.Array) -> jax.Array:
  """Returns x (B, L, ...) at the positions index (B, T): (B, T, ...)."""
  index = index.astype(jnp.int32).reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Returns x (B, L, N, D) rotated by rotary position embeddings at positions (B, L), in float32.

  Dimension pairs are (d, d + D/2), as GPT-NeoX and ModernBERT pair them; pair k turns by
  position * theta^(-2k/D).
  """
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, L, D/2)
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  x = x.astype(jnp.float32)
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _param(rngs: nnx.Rngs, init, shape, names) -> nnx.Param:
  # Values are drawn flat and reshaped: eager (un-jitted) init compiles one sampler per distinct
  # shape, and flat draws share samplers across shapes of equal size (tiny model init 13 s -> 4 s).
  def flat_init(key, shape, dtype):
    return init(key, (math.prod(shape),), dtype).reshape(shape)
  # eager_sharding=False: names are metadata only, so construction needs no mesh; sharding.py maps
  # them to mesh axes (nnx.get_partition_spec) and shards through jit out_shardings.
  partitioned = nnx.with_partitioning(flat_init, tuple(names), eager_sharding=False)
  return nnx.Param(partitioned(rngs.params(), tuple(shape), jnp.float32))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Returns x with inverted dropout applied, or x itself when key is None or rate is 0."""
  if key is None or rate == 0.0:
    return x
  data = jax.random.key_data(key)
  if data.shape == (2,):
    # Philox-4x32 over the key's 64 bits (threefry2x32's key space): XLA:CPU runs threefry's rounds
    # as a loop of passes over the array, about 10x philox's time per mask (docs/benchmarks.md).
    key = jax.random.wrap_key_data(data, impl='philox4x32')
  # Flat draw, as in _param: eager calls then share one compiled sampler per size.
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.size,)).reshape(x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def fold_key(key: jax.Array | None, i: int) -> jax.Array | None:
  """Returns jax.random.fold_in(key, i), or None when key is None."""
  return None if key is None else jax.random.fold_in(key, i)


class Dense(nnx.Module):
  """Affine map contracting the last `n_in` input axes with the first `n_in` kernel axes."""

  def __init__(self, config: EncoderConfig, shape, names, *, n_in: int = 1, bias: bool = True,
               rngs: nnx.Rngs):
    self.n_in = n_in
    self.dtype = config.compute_dtype
    init = jax.nn.initializers.truncated_normal(config.initializer_range)
    self.kernel = _param(rngs, init, shape, names)
    self.bias = _param(rngs, jax.nn.initializers.zeros, shape[n_in:], names[n_in:]) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), axes=self.n_in)
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm or RMSNorm (config.norm) in float32; returns `dtype` (default: the compute dtype)."""

  def __init__(self, config: EncoderConfig, *, dtype: Any = None, rngs: nnx.Rngs):
    self.eps = config.layer_norm_eps
    self.rms = config.norm == 'rmsnorm'
    self.dtype = config.compute_dtype if dtype is None else dtype
    h = config.hidden_size
    self.scale = _param(rngs, jax.nn.initializers.ones, (h,), ('embed',))
    with_bias = config.norm_bias and not self.rms
    self.bias = _param(rngs, jax.nn.initializers.zeros, (h,), ('embed',)) if with_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    if self.rms:
      y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    else:
      mean = x.mean(-1, keepdims=True)
      var = jnp.square(x - mean).mean(-1, keepdims=True)
      y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...]
    return (y if self.bias is None else y + self.bias[...]).astype(self.dtype)


def _attend_reference(q, k, v, mask, rate: float, key: jax.Array | None) -> jax.Array:
  """Returns softmax(q k^T / sqrt(d)) v (B, T, N, D) through the dense mask, with optional dropout."""
  logits = jnp.einsum('btnd,bsnd->bnts', q, k, preferred_element_type=jnp.float32)
  logits = logits / np.sqrt(q.shape[-1])
  # A finite fill (as jax.nn.dot_product_attention uses) keeps fully masked padding rows finite.
  logits = jnp.where(mask, logits, 0.7 * jnp.finfo(jnp.float32).min)
  probs = dropout(jax.nn.softmax(logits, axis=-1), rate, key)
  return jnp.einsum('bnts,bsnd->btnd', probs.astype(v.dtype), v)


_MESH = contextvars.ContextVar('mlmjax_model_mesh', default=None)


@contextlib.contextmanager
def mesh_context(mesh):
  """Model code traced in this context runs its per-device kernels (splash attention) on mesh."""
  token = _MESH.set(mesh)
  try:
    yield
  finally:
    _MESH.reset(token)


def _attend_splash(q, k, v, doc_ids, local_window: int) -> jax.Array:
  """Returns attention (B, T, N, D) through Pallas splash attention with segment ids, no dense mask.

  Padding (segment 0) attends to padding only, so its outputs differ from the dense path's; real
  tokens' outputs are the same. Compiled for a TPU it is the Mosaic kernel; elsewhere the kernel
  runs interpreted (slow; for tests). Traced inside mesh_context(mesh) it runs per shard: rows
  split over the batch axes, heads over 'tensor' where they divide.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  rows, length, heads, d = q.shape
  block = min(length, 512)
  if length % block or block % 128:
    raise ValueError(f"model.attention_impl='splash' needs a sequence length that is a multiple "
                     f"of 128 (blocks of min(L, 512)); got {length}")
  mesh = _MESH.get()
  names = mesh.axis_names if mesh is not None else ()
  # Rows and heads are split where they divide, else each device computes all of them.
  row_axes = tuple(a for a in ('data', 'fsdp') if a in names and mesh.shape[a] > 1)
  if row_axes and rows % math.prod(mesh.shape[a] for a in row_axes):
    row_axes = ()
  head_axis = ('tensor' if 'tensor' in names and mesh.shape['tensor'] > 1
               and heads % mesh.shape['tensor'] == 0 else None)
  shape = (length, length)
  one = (sm.LocalMask(shape, (local_window // 2, local_window // 2), offset=0) if local_window
         else sm.FullMask(shape))
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)

  def attend(qt, kt, vt, seg_ids):
    def run(interpret: bool):
      kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * qt.shape[1]), head_shards=1,
                                  q_seq_shards=1, block_sizes=sizes, interpret=interpret)
      return lambda *a: jax.vmap(kernel)(*a)
    seg = sk.SegmentIds(q=seg_ids, kv=seg_ids)
    # The lowering platform picks the branch: the Mosaic kernel when compiling for a TPU (also
    # ahead of time from a CPU host, where jax.default_backend() is 'cpu'), the interpreter elsewhere.
    return jax.lax.platform_dependent(qt, kt, vt, seg, tpu=run(False), default=run(True))

  scale = 1.0 / np.sqrt(d)
  # Splash takes (N, L, D) per row and applies no scale.
  qt, kt, vt = (jnp.swapaxes(t, 1, 2) for t in (q * scale, k, v))
  if mesh is not None and mesh.size > 1:
    # A Mosaic kernel cannot be partitioned by XLA: each device runs it on its own rows and heads.
    spec = P(row_axes or None, head_axis, None, None)
    attend = jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec, P(row_axes or None, None)),
                           out_specs=spec, check_vma=False)
  out = attend(qt.astype(v.dtype), kt, vt, doc_ids)
  return jnp.swapaxes(out, 1, 2)


class Attention(nnx.Module):
  """Multi-head self-attention, global or sliding-window, with learned or rotary positions."""

  def __init__(self, config: EncoderConfig, *, local: bool = False, rngs: nnx.Rngs):
    h, n = config.hidden_size, config.num_heads
    qkv = ((h, n, h // n), ('embed', 'heads', 'kv'))
    bias = config.use_bias
    self.query = Dense(config, *qkv, bias=bias, rngs=rngs)
    self.key = Dense(config, *qkv, bias=bias, rngs=rngs)
    self.value = Dense(config, *qkv, bias=bias, rngs=rngs)
    self.output = Dense(config, (n, h // n, h), ('heads', 'kv', 'embed'), n_in=2, bias=bias,
                        rngs=rngs)
    self.rate = config.attention_dropout_rate
    self.impl = config.attention_impl
    self.window = config.local_window if local else 0
    self.theta = None
    if config.position_embedding == 'rope':
      self.theta = config.rope_local_theta if local else config.rope_theta

  def __call__(self, x: jax.Array, doc_ids: jax.Array, position_ids: jax.Array,
               dropout_rng: jax.Array | None, query_index: jax.Array | None = None) -> jax.Array:
    """Returns the attention output at every position, or (B, T, H) at query_index (B, T) only."""
    k, v = self.key(x), self.value(x)
    if query_index is None:
      q, q_positions = self.query(x), position_ids
    else:
      q = self.query(gather_positions(x, query_index))
      q_positions = gather_positions(position_ids, query_index)
    if self.theta is not None:
      q = rotary(q, q_positions, self.theta).astype(v.dtype)
      k = rotary(k, position_ids, self.theta).astype(v.dtype)
    drop = dropout_rng is not None and self.rate > 0.0
    if query_index is not None and self.impl not in SPARSE_QUERY_IMPLS:
      raise ValueError(f'model.attention_impl={self.impl!r} attends from every position only')
    backend = jax.default_backend()
    if self.impl == 'cudnn' and backend != 'gpu':
      raise ValueError(f"model.attention_impl='cudnn' needs a GPU; this process runs on {backend}")
    if self.impl == 'splash' and backend == 'gpu':
      raise ValueError("model.attention_impl='splash' is a TPU kernel (interpreted elsewhere, far too "
                       "slow to train); on GPU use 'cudnn', '' or 'reference'")
    if self.impl == 'splash':
      out = _attend_splash(q, k, v, doc_ids, self.window)
    elif self.impl == 'reference' or (drop and not self.impl):
      out = _attend_reference(q, k, v, attention_mask(doc_ids, self.window, query_index), self.rate,
                              dropout_rng if drop else None)
    elif query_index is not None:
      # The window is in the mask: jax's local_window_size assumes query i sits at key i.
      out = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(doc_ids, self.window,
                                                                      query_index),
                                         implementation=self.impl or None)
    else:
      window = (self.window // 2, self.window // 2) if self.window else None
      out = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(doc_ids),
                                         local_window_size=window,
                                         implementation=self.impl or None)
    return self.output(out)


class Mlp(nnx.Module):
  """Position-wise feed-forward block: dense, GELU, dense; or gated (GeGLU, SwiGLU)."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    h, i = config.hidden_size, config.intermediate_size
    bias = config.use_bias
    self.kind = config.mlp_type
    self.intermediate = Dense(config, (h, i), ('embed', 'mlp'), bias=bias, rngs=rngs)
    self.gate = (None if self.kind == 'gelu'
                 else Dense(config, (h, i), ('embed', 'mlp'), bias=bias, rngs=rngs))
    self.output = Dense(config, (i, h), ('mlp', 'embed'), bias=bias, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.intermediate(x)
    if self.kind == 'swiglu':
      y = jax.nn.silu(y)
    else:
      y = jax.nn.gelu(y, approximate=False)
    if self.gate is not None:
      y = y * self.gate(x)
    return self.output(y)


class Block(nnx.Module):
  """One transformer layer, pre-LN or post-LN per the config; the residual stream is float32."""

  def __init__(self, config: EncoderConfig, *, index: int = 0, rngs: nnx.Rngs):
    self.pre_ln = config.pre_layer_norm
    self.rate = config.dropout_rate
    self.attention = Attention(config, local=config.is_local(index), rngs=rngs)
    # Post-LN's norms write the residual stream (float32); pre-LN's feed the matmuls only.
    stream = None if config.pre_layer_norm else jnp.float32
    skip = index == 0 and not config.first_attention_norm
    self.attention_norm = None if skip else LayerNorm(config, dtype=stream, rngs=rngs)
    self.mlp = Mlp(config, rngs=rngs)
    self.mlp_norm = LayerNorm(config, dtype=stream, rngs=rngs)

  def __call__(self, x: jax.Array, doc_ids: jax.Array, position_ids: jax.Array,
               dropout_rng: jax.Array | None, query_index: jax.Array | None = None) -> jax.Array:
    """Returns the layer's output (B, L, H), or (B, T, H) at query_index (B, T) only."""
    keys = [fold_key(dropout_rng, i) for i in range(3)]
    # With bf16 sublayers the stream stays float32: its ~8 bits would round away each layer's
    # update where it is small against the stream; the sublayer outputs promote to float32.
    x = x.astype(jnp.float32)
    layout = (doc_ids, position_ids, keys[0], query_index)
    skip = x if query_index is None else gather_positions(x, query_index)
    if self.pre_ln:
      normed = x if self.attention_norm is None else self.attention_norm(x)
      x = skip + dropout(self.attention(normed, *layout), self.rate, keys[1])
      return x + dropout(self.mlp(self.mlp_norm(x)), self.rate, keys[2])
    x = self.attention_norm(skip + dropout(self.attention(x, *layout), self.rate, keys[1]))
    return self.mlp_norm(x + dropout(self.mlp(x), self.rate, keys[2]))


def _call_block(layer: Block, x: jax.Array, doc_ids: jax.Array, position_ids: jax.Array,
                dropout_rng: jax.Array | None, query_index: jax.Array | None = None) -> jax.Array:
  return layer(x, doc_ids, position_ids, dropout_rng, query_index)


def block_fn(remat: str):
  """Returns f(layer, x, doc_ids, position_ids, dropout_rng[, query_index]) -> x, remat'ed."""
  if not remat:
    return _call_block
  return nnx.remat(_call_block, policy=REMAT_POLICIES[remat])


class Encoder(nnx.Module):
  """Embeddings plus a stack of transformer blocks; holds only nnx.Params."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    h = config.hidden_size
    init = jax.nn.initializers.truncated_normal(config.initializer_range)
    self.token_embed = _param(rngs, init, (config.padded_vocab_size, h), ('vocab', 'embed'))
    self.position_embed = (_param(rngs, init, (config.max_position, h), (None, 'embed'))
                           if config.position_embedding == 'learned' else None)
    self.type_embed = (_param(rngs, init, (config.type_vocab_size, h), (None, 'embed'))
                       if config.type_vocab_size else None)
    self.embed_norm = LayerNorm(config, dtype=jnp.float32, rngs=rngs)  # starts the residual stream
    self.layers = nnx.List([Block(config, index=i, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = LayerNorm(config, rngs=rngs) if config.pre_layer_norm else None

  def __call__(self, input_ids: jax.Array, *, type_ids: jax.Array | None = None,
               position_ids: jax.Array | None = None, doc_ids: jax.Array | None = None,
               dropout_rng: jax.Array | None = None, cls_id: int = SP_CLS_ID,
               pad_id: int = SP_PAD_ID, query_index: jax.Array | None = None) -> jax.Array:
    """Returns hidden states (B, L, H) in the compute dtype; absent layout ids: packed_layout's.

    With query_index (B, T) it returns (B, T, H) at those positions, and the last layer computes
    its queries, MLP and norms only there (its keys and values still come from every position).
    Without token-type embeddings (type_vocab_size 0) type_ids are ignored.
    """
    if self.position_embed is not None and input_ids.shape[-1] > self.config.max_position:
      raise ValueError(f'model.max_position: {self.config.max_position} is shorter than the '
                       f'sequence length {input_ids.shape[-1]}; raise it or lower train.seq_len')
    if position_ids is None or doc_ids is None:
      pos, doc = packed_layout(input_ids, cls_id=cls_id, pad_id=pad_id)
      position_ids = pos if position_ids is None else position_ids
      doc_ids = doc if doc_ids is None else doc_ids
    x = jnp.take(self.token_embed[...], input_ids, axis=0)
    if self.position_embed is not None:
      x = x + jnp.take(self.position_embed[...], position_ids, axis=0)
    if self.type_embed is not None:
      type_ids = jnp.zeros_like(input_ids) if type_ids is None else type_ids
      x = x + jnp.take(self.type_embed[...], type_ids, axis=0)
    rate = self.config.dropout_rate
    x = dropout(self.embed_norm(x), rate, fold_key(dropout_rng, 0))
    call = block_fn(self.config.remat)
    # The last layer's outputs are needed only at query_index: it attends from there, and its MLP
    # and norms run there, which gives the same values as computing every position and gathering.
    sparse = query_index is not None and self.config.sparse_last_layer(input_ids.shape[-1],
                                                                       query_index.shape[-1])
    last = len(self.layers) - 1
    for i, layer in enumerate(self.layers):
      at = query_index if sparse and i == last else None
      x = call(layer, x, doc_ids, position_ids, fold_key(dropout_rng, i + 1), at)
    if query_index is not None and not sparse:
      x = gather_positions(x, query_index)
    if self.final_norm is None:
      return x.astype(self.config.compute_dtype)
    return self.final_norm(x)


@jax.custom_vjp
def decoder_logits(x: jax.Array, embedding: jax.Array, bias: jax.Array) -> jax.Array:
  """Returns float32 logits x (..., H) @ embedding (V, H)^T + bias (V,)."""
  return jnp.einsum('...h,vh->...v', x, embedding, preferred_element_type=jnp.float32) + bias


def _decoder_logits_fwd(x, embedding, bias):
  return decoder_logits(x, embedding, bias), (x, embedding)


def _decoder_logits_bwd(residuals, g):
  x, embedding = residuals
  g2 = g.reshape(-1, g.shape[-1])  # (P, V)
  dx = jnp.einsum('...v,vh->...h', g, embedding, preferred_element_type=jnp.float32)
  dembedding = jnp.einsum('pv,ph->vh', g2, x.reshape(-1, x.shape[-1]),
                          preferred_element_type=jnp.float32)
  # The bias gradient as a (1, P) x (P, V) product: XLA:CPU's column sum of g2 is far slower
  # (docs/benchmarks.md). The barrier keeps XLA from folding the product with ones back into it.
  ones = jax.lax.optimization_barrier(jnp.ones((1, g2.shape[0]), g2.dtype))
  return dx.astype(x.dtype), dembedding.astype(embedding.dtype), (ones @ g2)[0]


decoder_logits.defvjp(_decoder_logits_fwd, _decoder_logits_bwd)


class MlmHead(nnx.Module):
  """BERT's MLM head: transform (dense, GELU, LayerNorm), then a tied or untied decoder and a bias."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.dtype = config.compute_dtype
    self.vocab_size = config.vocab_size
    self.transform = Dense(config, (h, h), ('embed', None), bias=config.use_bias, rngs=rngs)
    self.norm = LayerNorm(config, rngs=rngs)
    rows = config.padded_vocab_size
    self.bias = _param(rngs, jax.nn.initializers.zeros, (rows,), ('vocab',))
    self.decoder = None if config.tie_embeddings else _param(
        rngs, jax.nn.initializers.truncated_normal(config.initializer_range), (rows, h),
        ('vocab', 'embed'))

  def __call__(self, hidden: jax.Array, embedding: jax.Array) -> jax.Array:
    """Returns float32 logits (..., V) for hidden states (..., H) and the (V', H) token embedding."""
    x = self.norm(jax.nn.gelu(self.transform(hidden), approximate=False))
    if self.decoder is not None:
      embedding = self.decoder[...]
    logits = decoder_logits(x.astype(self.dtype), embedding.astype(self.dtype), self.bias[...])
    # Padding rows of a vocab_multiple table are never scored.
    return logits if logits.shape[-1] == self.vocab_size else logits[..., :self.vocab_size]


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
                          doc_ids=doc_ids, dropout_rng=dropout_rng, query_index=pred_positions)
    return self.mlm_head(hidden, self.encoder.token_embed[...])

  def dense_logits(self, input_ids: jax.Array, **kwargs) -> jax.Array:
    """Returns float32 logits (B, L, V) at every position; takes the encoder's keywords."""
    return self.mlm_head(self.encoder(input_ids, **kwargs), self.encoder.token_embed[...])


def count_params(params) -> int:
  """Returns the number of scalars in a module's Params, a State, or any pytree of arrays."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(params)))
