"""Task models: an encoder plus a head. Each keeps the encoder under `encoder`, so init_from swaps in pretrained weights."""

import jax
import jax.numpy as jnp
from flax import nnx

from mlmjax import model


POOLINGS = ('cls', 'mean')


def mean_pool(hidden: jax.Array, valid: jax.Array) -> jax.Array:
  """Returns float32 (B, H): the mean of hidden (B, L, H) over positions where valid (B, L)."""
  w = valid.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def pool(hidden: jax.Array, tokens: jax.Array, how: str, pad_id: int = model.SP_PAD_ID) -> jax.Array:
  """Returns float32 (B, H): the [CLS] (first) vector, or the mean over non-padding positions."""
  if how == 'cls':
    return hidden[:, 0].astype(jnp.float32)
  if how == 'mean':
    return mean_pool(hidden, tokens != pad_id)
  raise ValueError(f'pooling {how!r} is not supported; use one of {list(POOLINGS)}')


def encode_pooled(encoder: model.Encoder, input_ids: jax.Array, how: str, *, pad_id: int,
                  **kwargs) -> jax.Array:
  """Returns float32 (B, H): encoder(input_ids, pad_id=pad_id, **kwargs) pooled by `how`.

  [CLS] pooling reads position 0 only, so the encoder's last layer runs there only (query_index).
  """
  if how == 'cls':
    first = jnp.zeros((input_ids.shape[0], 1), jnp.int32)
    return encoder(input_ids, pad_id=pad_id, query_index=first, **kwargs)[:, 0].astype(jnp.float32)
  return pool(encoder(input_ids, pad_id=pad_id, **kwargs), input_ids, how, pad_id=pad_id)


class SequenceClassifier(nnx.Module):
  """model.Encoder, pooled vector ([CLS] or mean), dropout and a linear layer to num_labels logits."""

  def __init__(self, config: model.EncoderConfig, num_labels: int, *, pooling: str = 'cls',
               cls_id: int = model.SP_CLS_ID, pad_id: int = model.SP_PAD_ID, rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f'pooling {pooling!r} is not supported; use one of {list(POOLINGS)}')
    self.encoder = model.Encoder(config, rngs=rngs)
    self.pooling = pooling
    self.cls_id, self.pad_id = int(cls_id), int(pad_id)  # the tokenizer's: layout, padding
    self.rate = config.dropout_rate
    self.classifier = model.Dense(config, (config.hidden_size, num_labels), ('embed', None), rngs=rngs)

  def __call__(self, input_ids: jax.Array, *, type_ids: jax.Array | None = None,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Returns float32 logits (B, num_labels) of rows (B, L); type_ids (B, L): pairs' segments."""
    pooled = encode_pooled(self.encoder, input_ids, self.pooling, pad_id=self.pad_id,
                           type_ids=type_ids, dropout_rng=model.fold_key(dropout_rng, 0),
                           cls_id=self.cls_id)
    pooled = model.dropout(pooled, self.rate, model.fold_key(dropout_rng, 1))
    return self.classifier(pooled).astype(jnp.float32)


class TokenTagger(nnx.Module):
  """model.Encoder, dropout and a linear layer to num_tags logits at every position."""

  def __init__(self, config: model.EncoderConfig, num_tags: int, *, cls_id: int = model.SP_CLS_ID,
               pad_id: int = model.SP_PAD_ID, rngs: nnx.Rngs):
    self.encoder = model.Encoder(config, rngs=rngs)
    self.cls_id, self.pad_id = int(cls_id), int(pad_id)
    self.rate = config.dropout_rate
    self.classifier = model.Dense(config, (config.hidden_size, num_tags), ('embed', None), rngs=rngs)

  def __call__(self, input_ids: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Returns float32 logits (B, L, num_tags)."""
    hidden = self.encoder(input_ids, dropout_rng=model.fold_key(dropout_rng, 0), cls_id=self.cls_id,
                          pad_id=self.pad_id)
    return self.classifier(model.dropout(hidden, self.rate, model.fold_key(dropout_rng, 1))).astype(jnp.float32)


class DualEncoder(nnx.Module):
  """One shared encoder for queries and documents; embeddings are pooled hidden states."""

  def __init__(self, config: model.EncoderConfig, *, pooling: str = 'mean', cls_id: int = model.SP_CLS_ID,
               pad_id: int = model.SP_PAD_ID, rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f'pooling {pooling!r} is not supported; use one of {list(POOLINGS)}')
    self.encoder = model.Encoder(config, rngs=rngs)
    self.pooling = pooling
    self.cls_id, self.pad_id = int(cls_id), int(pad_id)

  def __call__(self, input_ids: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Returns float32 (B, H) embeddings, not normalized."""
    return encode_pooled(self.encoder, input_ids, self.pooling, pad_id=self.pad_id,
                         dropout_rng=dropout_rng, cls_id=self.cls_id)
