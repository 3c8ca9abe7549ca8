"""Vocabulary extension for domain-adaptive MLM: new pieces after the old ids, embeddings from old pieces.

  python -m mlmjax.train --config configs/dapt.py:tiny --workdir runs/dapt_ext \
      --config.init_from=runs/pretrain --config.tokenizer.extend_pieces=2000

A sentencepiece unigram tokenizer trained on the in-domain training split proposes pieces; those the
old vocabulary lacks, taken in the order of their in-domain unigram score (log-probability), are
appended after the old ids with that score, so every old id keeps its piece, type and score. The
unigram segmenter then prefers a new piece where its score beats the old pieces' sum, and text
whose best segmentation uses no new piece is cut exactly as before.

Each new piece's rows start as the mean of the rows of the old pieces the old tokenizer cuts it
into: the input embedding, the MLM decoder row (untied models) and the decoder bias. Old rows are
unchanged, so on text without new pieces the extended model's hidden states and its logits over the
old ids equal the original's (the softmax now also spreads mass over the new ids). Which pieces
are new, and what they are made of, is read off the two tokenizers (`sources`): init_from accepts
an extended tokenizer whose first ids are the pretrained run's, with nothing else to store.
Only sentencepiece unigram tokenizers (mlmjax's default) can be extended: BPE merges and WordPiece
vocabularies would need their own rules.
"""

import dataclasses
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model

from mlmjax import tokenizer as tokenizer_lib

_WORD_START = '\u2581'


def _proto(tokenizer) -> sp_model.ModelProto:
  """Returns the parsed model proto of a sentencepiece unigram tokenizer (ValueError otherwise)."""
  if not isinstance(tokenizer, tokenizer_lib.Tokenizer):
    raise ValueError(f'tokenizer.extend_pieces: {tokenizer.model_path} is a WordPiece vocabulary; '
                     'only sentencepiece unigram tokenizers can be extended')
  proto = sp_model.ModelProto()
  proto.ParseFromString(tokenizer.serialized_model)
  if proto.trainer_spec.model_type != sp_model.TrainerSpec.UNIGRAM:
    raise ValueError(f'tokenizer.extend_pieces: {tokenizer.model_path} is not a unigram model; '
                     'only sentencepiece unigram tokenizers can be extended')
  return proto


@dataclasses.dataclass
class Extension:
  """An extended tokenizer and, per new piece, the old ids its rows start from."""
  tokenizer: tokenizer_lib.Tokenizer
  base_vocab_size: int
  sources: list[list[int]]  # sources[k]: old ids of new id base_vocab_size + k

  @property
  def pieces(self) -> list[str]:
    """Returns the new pieces, in id order."""
    return [self.tokenizer.id_to_piece(self.base_vocab_size + k) for k in range(len(self.sources))]


def extend(base: tokenizer_lib.Tokenizer, texts: Sequence[str], num_pieces: int, *,
           seed: int = 0, log=print) -> Extension:
  """Returns base extended by up to num_pieces pieces learned from texts (see the module doc)."""
  if num_pieces < 1:
    raise ValueError(f'tokenizer.extend_pieces={num_pieces} must be >= 1 to extend')
  proto = _proto(base)
  have = {p.piece for p in proto.pieces}
  with tempfile.TemporaryDirectory() as tmp:
    domain = tokenizer_lib.train_tokenizer(
        texts, f'{tmp}/domain.model', vocab_size=base.vocab_size, model_type='unigram', seed=seed)
  dproto = sp_model.ModelProto()
  dproto.ParseFromString(domain.serialized_model)
  normal = sp_model.ModelProto.SentencePiece.NORMAL
  found = sorted(((p.score, p.piece) for p in dproto.pieces
                  if p.type == normal and p.piece not in have), key=lambda sp: (-sp[0], sp[1]))
  if len(found) < num_pieces:
    log(f'tokenizer.extend_pieces={num_pieces}: the in-domain tokenizer has only {len(found)} '
        'pieces the old vocabulary lacks; adding those')
  for score, piece in found[:num_pieces]:
    proto.pieces.add(piece=piece, score=score, type=normal)
  extended = tokenizer_lib.Tokenizer(proto.SerializeToString(), '<extended>')
  return Extension(extended, base.vocab_size, sources(base, extended))


def sources(base: tokenizer_lib.Tokenizer, extended) -> list[list[int]]:
  """Returns, per id of `extended` past base's, the old ids base cuts its piece into.

  ValueError when extended is not base extended: a different kind, fewer ids, or an old id whose
  piece, score or type differs.
  """
  if not isinstance(extended, tokenizer_lib.Tokenizer) or not isinstance(base, tokenizer_lib.Tokenizer):
    raise ValueError('not an extension: only sentencepiece tokenizers are extended')
  old, new = sp_model.ModelProto(), sp_model.ModelProto()
  old.ParseFromString(base.serialized_model)
  new.ParseFromString(extended.serialized_model)
  if len(new.pieces) <= len(old.pieces):
    raise ValueError(f'not an extension: {len(new.pieces)} pieces, not more than {len(old.pieces)}')
  for i, (a, b) in enumerate(zip(old.pieces, new.pieces)):
    if (a.piece, a.score, a.type) != (b.piece, b.score, b.type):
      raise ValueError(f'not an extension: id {i} is {b.piece!r} instead of {a.piece!r}')
  # Pieces without a leading '▁' are word-inner: cut them without sentencepiece's dummy prefix.
  inner = sp_model.ModelProto()
  inner.CopyFrom(old)
  inner.normalizer_spec.add_dummy_prefix = False
  inner_sp = spm.SentencePieceProcessor()
  inner_sp.LoadFromSerializedProto(inner.SerializeToString())
  out = []
  for p in new.pieces[len(old.pieces):]:
    text = p.piece.replace(_WORD_START, ' ')
    ids = inner_sp.encode(text) if not p.piece.startswith(_WORD_START) else base.encode(text[1:])
    out.append([int(i) for i in ids] or [tokenizer_lib.UNK_ID])
  return out


def vocab_axes(logical: Any) -> dict[str, int]:
  """Returns {parameter path: index of its 'vocab' axis} from the model's logical partition specs."""
  import jax  # pylint: disable=g-import-not-at-top  (input_pipeline imports this module: no JAX there)
  flat = jax.tree_util.tree_flatten_with_path(
      logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  return {jax.tree_util.keystr(path): tuple(spec).index('vocab')
          for path, spec in flat if spec is not None and 'vocab' in tuple(spec)}


def extend_params(params: Any, axes: dict[str, int], srcs: Sequence[Sequence[int]]) -> Any:
  """Returns params with each vocab axis grown by one slice per source list (the mean of its rows)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  width = max((len(s) for s in srcs), default=1)
  idx = np.zeros((len(srcs), width), np.int32)
  weight = np.zeros((len(srcs), width), np.float32)
  for k, s in enumerate(srcs):
    idx[k, :len(s)] = s
    weight[k, :len(s)] = 1.0 / len(s)

  def grow(path, leaf):
    axis = axes.get(jax.tree_util.keystr(path))
    if axis is None or not len(srcs):
      return leaf
    rows = jnp.moveaxis(jnp.asarray(leaf), axis, 0)
    # Rows are averaged in float32 (the parameters' dtype), one einsum over padded source lists.
    new = jnp.einsum('kw,kw...->k...', weight, rows[idx]).astype(rows.dtype)
    return jnp.moveaxis(jnp.concatenate([rows, new], axis=0), 0, axis)

  return jax.tree_util.tree_map_with_path(grow, params)
