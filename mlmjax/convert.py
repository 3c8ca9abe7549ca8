"""Hugging Face interop: import BERT, RoBERTa-PreLayerNorm or ModernBERT, export a workdir as one.

  python -m mlmjax.convert import SRC_DIR --workdir runs/imported
  python -m mlmjax.convert export --workdir runs/x OUT_DIR

A post-LN run exports as BertForMaskedLM, a pre-LN run (the default) as
RobertaPreLayerNormForMaskedLM, which computes the same: LayerNorm after the embeddings, before
attention and before the MLP, and a final one; its positions start at padding_idx + 1, so position
row p of ours is its row p + 1 and its row 0 (padding only) is zeros. A rotary run (model.MODERN's
options) exports as ModernBertForMaskedLM. Reading needs only safetensors and numpy
(pytorch_model.bin needs torch). The weight layout: HF Linear weights are (out, in) and compute
x @ W.T; our kernels are (in, ...) with the output split per head for query/key/value
(H, heads, head_dim) and the attention output (heads, head_dim, H). ModernBERT fuses query, key
and value into one Wqkv (3H, H) and the GeGLU's activated input and gate into one Wi (2I, H).
"""

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import pathlib
import sys
from typing import Callable

import numpy as np

from mlmjax import cli, hf_tokenizer, model_card
from mlmjax import tokenizer as tok


@dataclasses.dataclass(frozen=True)
class Arch:
  """How one transformers masked-LM class names what our encoder computes."""
  model_type: str
  architecture: str  # the *ForMaskedLM class
  prefix: str  # the base model's prefix in the *ForMaskedLM state dict
  head: str  # the MLM head's prefix
  head_dense: str
  head_norm: str
  ignored: tuple  # tensors with no use in an MLM encoder (pooler, heads of other tasks, buffers)
  decoder: str  # the MLM decoder (output embedding) Linear
  bias: str  # the tensor our mlm_head.bias is
  embedding: str  # the word embedding (base model, unprefixed)


BERT = Arch('bert', 'BertForMaskedLM', 'bert.', 'cls.predictions.', 'transform.dense',
            'transform.LayerNorm', ('pooler.', 'cls.seq_relationship.', 'embeddings.position_ids'),
            'cls.predictions.decoder', 'cls.predictions.bias', 'embeddings.word_embeddings.weight')
PRE_LN = Arch('roberta-prelayernorm', 'RobertaPreLayerNormForMaskedLM', 'roberta_prelayernorm.',
              'lm_head.', 'dense', 'layer_norm', ('pooler.', 'embeddings.position_ids',
                                                  'embeddings.token_type_ids'),
              'lm_head.decoder', 'lm_head.bias', 'embeddings.word_embeddings.weight')
MODERN = Arch('modernbert', 'ModernBertForMaskedLM', 'model.', 'head.', 'dense', 'norm', (),
              'decoder', 'decoder.bias', 'embeddings.tok_embeddings.weight')
ARCHS = {a.model_type: a for a in (BERT, PRE_LN, MODERN)}
# Rows of RoBERTa's position table before our position 0: padding_idx + 1 with [PAD] = 0.
ROBERTA_POSITION_OFFSET = 1
# HF config fields whose other values our encoder cannot compute, with the value it needs.
_REQUIRED = (('hidden_act', 'gelu'), ('position_embedding_type', 'absolute'),
             ('is_decoder', False), ('add_cross_attention', False))
_MODERN_REQUIRED = (('hidden_activation', 'gelu'), ('classifier_activation', 'gelu'),
                    ('is_decoder', False), ('rope_scaling', None))
# ModernBertConfig's defaults, for configs that leave a field out.
_MODERN_THETA = {'full_attention': ('global_rope_theta', 160_000.0),
                 'sliding_attention': ('local_rope_theta', 10_000.0)}
_MODERN_WINDOW = 128
IMPORTED_FILE = 'imported.json'  # what an import knew of its source, kept in the workdir


def arch_of(enc_cfg) -> Arch:
  """Returns the transformers class that computes what enc_cfg does (rotary: ModernBERT)."""
  if enc_cfg.position_embedding == 'rope':
    return MODERN
  return PRE_LN if enc_cfg.pre_layer_norm else BERT


# What each class computes, as EncoderConfig fields; learned positions need BERT's defaults.
_EXPRESSIBLE = {
    MODERN: (('mlp_type', 'geglu'), ('norm', 'layernorm'), ('pre_layer_norm', True),
             ('first_attention_norm', False), ('type_vocab_size', 0)),
    BERT: (('mlp_type', 'gelu'), ('norm', 'layernorm'), ('norm_bias', True), ('use_bias', True),
           ('global_every', 1), ('first_attention_norm', True)),
}


def check_exportable(enc_cfg) -> None:
  """Returns None; raises ValueError naming the first model key the export class cannot express."""
  arch = arch_of(enc_cfg)
  for key, needed in _EXPRESSIBLE[MODERN if arch is MODERN else BERT]:
    value = getattr(enc_cfg, key)
    if value != needed:
      how = ("model.position_embedding='rope' exports as ModernBertForMaskedLM" if arch is MODERN
             else f"model.position_embedding='learned' exports as {arch.architecture}")
      raise ValueError(f'model.{key}={value!r} cannot be exported: {how}, which computes only '
                       f'{key}={needed!r}')
  if arch is not MODERN and enc_cfg.type_vocab_size < 1:
    raise ValueError(f'model.type_vocab_size=0 cannot be exported: {arch.architecture} needs at '
                     'least one token type (rotary runs export as ModernBERT, which has none)')


def check_supported(hf_config: dict, where: str = 'config.json') -> None:
  """Returns None; raises ValueError naming the first config.json field our encoder cannot represent."""
  kind = hf_config.get('model_type', 'bert')
  if kind not in ARCHS:
    raise ValueError(f'{where}: model_type={kind!r} is not supported; mlmjax computes only '
                     f'model_type in {sorted(ARCHS)} (BERT, RoBERTa-PreLayerNorm for pre-LN, '
                     'ModernBERT)')
  modern = kind == MODERN.model_type
  positions = 'default rotary' if modern else 'absolute'
  for field, needed in (_MODERN_REQUIRED if modern else _REQUIRED):
    value = hf_config.get(field, needed)
    if value != needed:
      raise ValueError(f'{where}: {field}={value!r} is not supported; mlmjax computes only '
                       f'{field}={needed!r} (exact GELU, {positions} positions, an encoder)')
  for field in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                'intermediate_size', 'max_position_embeddings'):
    if not isinstance(hf_config.get(field), int):
      raise ValueError(f'{where}: field {field} is missing or not an integer')
  if hf_config['hidden_size'] % hf_config['num_attention_heads']:
    raise ValueError(f'{where}: hidden_size={hf_config["hidden_size"]} is not divisible by '
                     f'num_attention_heads={hf_config["num_attention_heads"]}')
  if kind == PRE_LN.model_type and hf_config['max_position_embeddings'] <= _roberta_offset(hf_config):
    raise ValueError(f'{where}: max_position_embeddings={hf_config["max_position_embeddings"]} '
                     f'leaves no position after pad_token_id={hf_config.get("pad_token_id")}')
  if modern:
    _modern_options(hf_config, where)


def _roberta_offset(hf_config: dict) -> int:
  pad = hf_config.get('pad_token_id')
  return (1 if pad is None else int(pad)) + 1  # RobertaPreLayerNormConfig's default pad is 1


def _modern_options(hf_config: dict, where: str = 'config.json') -> dict:
  """Returns the EncoderConfig architecture fields of a ModernBERT config (ValueError naming a field)."""
  n = hf_config['num_hidden_layers']
  types = hf_config.get('layer_types')
  if types is None:  # configs before transformers 5 give the period only
    every = int(hf_config.get('global_attn_every_n_layers', 3))
    types = ['sliding_attention' if i % every else 'full_attention' for i in range(n)]
  full = [i for i, t in enumerate(types) if t == 'full_attention']
  every = 1 if len(full) == n else (full[1] if len(full) > 1 else n)
  if list(types) != ['sliding_attention' if i % every else 'full_attention' for i in range(n)]:
    raise ValueError(f'{where}: layer_types={types} is not supported; mlmjax computes full '
                     'attention in every k-th layer from layer 0 and sliding windows in the others')
  window = int(hf_config.get('local_attention', _MODERN_WINDOW)) if every > 1 else 0
  if window % 2 or (every > 1 and window <= 0):
    raise ValueError(f'{where}: local_attention={window} must be even and positive')
  biases = {k: bool(hf_config.get(k, False))
            for k in ('attention_bias', 'mlp_bias', 'classifier_bias')}
  if len(set(biases.values())) > 1:
    raise ValueError(f'{where}: ' + ', '.join(f'{k}={v}' for k, v in biases.items()) + ' differ; '
                     "mlmjax's model.use_bias sets all three alike")
  if (hf_config['hidden_size'] // hf_config['num_attention_heads']) % 2:
    raise ValueError(f'{where}: hidden_size / num_attention_heads must be even (rotary positions)')
  theta = {}
  for kind, (old, default) in _MODERN_THETA.items():
    rope = (hf_config.get('rope_parameters') or {}).get(kind) or {}
    if rope.get('rope_type', 'default') != 'default':
      raise ValueError(f'{where}: rope_parameters.{kind}.rope_type={rope["rope_type"]!r} is not '
                       "supported; mlmjax computes only 'default' rotary positions")
    value = rope.get('rope_theta', hf_config.get(old))
    theta[kind] = float(default if value is None else value)
  return dict(position_embedding='rope', rope_theta=theta['full_attention'],
              rope_local_theta=theta['sliding_attention'], mlp_type='geglu', norm='layernorm',
              norm_bias=bool(hf_config.get('norm_bias', False)), use_bias=biases['mlp_bias'],
              global_every=every, local_window=window, first_attention_norm=False,
              vocab_multiple=1)


def encoder_config(hf_config: dict):
  """Returns the model.EncoderConfig (float32) of a supported config.json (check_supported)."""
  from mlmjax import model  # pylint: disable=g-import-not-at-top
  check_supported(hf_config)
  if hf_config.get('model_type') == MODERN.model_type:
    return model.EncoderConfig(
        vocab_size=hf_config['vocab_size'], hidden_size=hf_config['hidden_size'],
        num_layers=hf_config['num_hidden_layers'], num_heads=hf_config['num_attention_heads'],
        intermediate_size=hf_config['intermediate_size'],
        max_position=hf_config['max_position_embeddings'], type_vocab_size=0,
        dropout_rate=hf_config.get('embedding_dropout', 0.0),
        attention_dropout_rate=hf_config.get('attention_dropout', 0.0),
        layer_norm_eps=hf_config.get('norm_eps', 1e-5), pre_layer_norm=True,
        tie_embeddings=bool(hf_config.get('tie_word_embeddings', True)),
        initializer_range=hf_config.get('initializer_range', 0.02), **_modern_options(hf_config))
  pre_ln = hf_config.get('model_type', 'bert') == PRE_LN.model_type
  positions = hf_config['max_position_embeddings'] - (_roberta_offset(hf_config) if pre_ln else 0)
  return model.EncoderConfig(
      vocab_size=hf_config['vocab_size'], hidden_size=hf_config['hidden_size'],
      num_layers=hf_config['num_hidden_layers'], num_heads=hf_config['num_attention_heads'],
      intermediate_size=hf_config['intermediate_size'], max_position=positions,
      type_vocab_size=hf_config.get('type_vocab_size', 2),
      dropout_rate=hf_config.get('hidden_dropout_prob', 0.1),
      attention_dropout_rate=hf_config.get('attention_probs_dropout_prob', 0.1),
      layer_norm_eps=hf_config.get('layer_norm_eps', 1e-12), pre_layer_norm=pre_ln,
      tie_embeddings=bool(hf_config.get('tie_word_embeddings', True)),
      initializer_range=hf_config.get('initializer_range', 0.02))


def _modern_config(enc_cfg, pad_id: int, cls_id: int, sep_id: int) -> dict:
  """Returns the ModernBertForMaskedLM config dict of a rotary EncoderConfig."""
  def rope(theta):
    return {'rope_type': 'default', 'rope_theta': float(theta)}
  bias = enc_cfg.use_bias
  return {
      'architectures': [MODERN.architecture], 'model_type': MODERN.model_type,
      'vocab_size': enc_cfg.padded_vocab_size, 'hidden_size': enc_cfg.hidden_size,
      'num_hidden_layers': enc_cfg.num_layers, 'num_attention_heads': enc_cfg.num_heads,
      'intermediate_size': enc_cfg.intermediate_size, 'hidden_activation': 'gelu',
      'classifier_activation': 'gelu', 'max_position_embeddings': enc_cfg.max_position,
      'layer_types': ['sliding_attention' if enc_cfg.is_local(i) else 'full_attention'
                      for i in range(enc_cfg.num_layers)],
      'local_attention': enc_cfg.local_window or _MODERN_WINDOW,  # unused without local layers
      'rope_parameters': {'full_attention': rope(enc_cfg.rope_theta),
                          'sliding_attention': rope(enc_cfg.rope_local_theta)},
      'norm_eps': enc_cfg.layer_norm_eps, 'norm_bias': enc_cfg.norm_bias,
      'attention_bias': bias, 'mlp_bias': bias, 'classifier_bias': bias, 'decoder_bias': True,
      # Training-time only, and placed a little differently from ours: see docs/huggingface.md.
      'embedding_dropout': enc_cfg.dropout_rate, 'mlp_dropout': enc_cfg.dropout_rate,
      'attention_dropout': enc_cfg.attention_dropout_rate,
      'initializer_range': enc_cfg.initializer_range, 'pad_token_id': int(pad_id),
      'cls_token_id': int(cls_id), 'sep_token_id': int(sep_id), 'bos_token_id': int(cls_id),
      'eos_token_id': int(sep_id), 'tie_word_embeddings': enc_cfg.tie_embeddings,
      'torch_dtype': 'float32'}


def hf_config_from(enc_cfg, pad_id: int = tok.PAD_ID, *, cls_id: int = tok.CLS_ID,
                   sep_id: int = tok.SEP_ID) -> dict:
  """Returns the transformers config dict of enc_cfg's class (BERT, RoBERTa-PreLayerNorm, ModernBERT)."""
  check_exportable(enc_cfg)
  arch = arch_of(enc_cfg)
  if arch is MODERN:
    return _modern_config(enc_cfg, pad_id, cls_id, sep_id)
  common = {
      'architectures': [arch.architecture], 'model_type': arch.model_type,
      'vocab_size': enc_cfg.padded_vocab_size, 'hidden_size': enc_cfg.hidden_size,
      'num_hidden_layers': enc_cfg.num_layers, 'num_attention_heads': enc_cfg.num_heads,
      'intermediate_size': enc_cfg.intermediate_size, 'hidden_act': 'gelu',
      'hidden_dropout_prob': enc_cfg.dropout_rate,
      'attention_probs_dropout_prob': enc_cfg.attention_dropout_rate,
      'type_vocab_size': enc_cfg.type_vocab_size, 'initializer_range': enc_cfg.initializer_range,
      'layer_norm_eps': enc_cfg.layer_norm_eps, 'pad_token_id': int(pad_id),
      'tie_word_embeddings': enc_cfg.tie_embeddings, 'torch_dtype': 'float32'}
  if arch is BERT:
    return {**common, 'max_position_embeddings': enc_cfg.max_position,
            'position_embedding_type': 'absolute'}
  if pad_id != 0:
    raise ValueError(f'the tokenizer pads with id {pad_id}; mlmjax pads with 0, so [PAD] must be id 0')
  return {**common, 'max_position_embeddings': enc_cfg.max_position + ROBERTA_POSITION_OFFSET,
          'bos_token_id': int(cls_id), 'eos_token_id': int(sep_id)}


# ---------------------------------------------------------------------------------------------
# The name and layout map. Each entry: (our path, HF name, HF -> ours, ours -> HF).


def _ident(x, _):
  return x


def _linear_in(x, _):
  return x.T


def _qkv_in(w, c):
  n = c.num_heads
  return w.T.reshape(c.hidden_size, n, c.hidden_size // n) if w.ndim == 2 else w.reshape(n, -1)


def _qkv_out(w, c):
  return w.reshape(c.hidden_size, -1).T if w.ndim == 3 else w.reshape(-1)


def _attn_out_in(w, c):
  n = c.num_heads
  return w.T.reshape(n, c.hidden_size // n, c.hidden_size)


def _attn_out_out(w, c):
  return w.reshape(-1, c.hidden_size).T


def _positions_in(x, c):
  return x[x.shape[0] - c.max_position:]  # RoBERTa's rows after padding_idx


def _positions_out(x, c):
  return np.concatenate([np.zeros((ROBERTA_POSITION_OFFSET, c.hidden_size), x.dtype), x])


def _norm(ours: tuple, hf: str, bias: bool = True) -> list:
  return [((*ours, 'scale'), f'{hf}.weight', _ident, _ident),
          *([((*ours, 'bias'), f'{hf}.bias', _ident, _ident)] if bias else [])]


def _dense(ours: tuple, hf: str, to_ours: Callable = _linear_in, to_hf: Callable = _linear_in,
           bias_in: Callable = _ident, bias_out: Callable = _ident, bias: bool = True) -> list:
  return [((*ours, 'kernel'), f'{hf}.weight', to_ours, to_hf),
          *([((*ours, 'bias'), f'{hf}.bias', bias_in, bias_out)] if bias else [])]


def _fused(ours: list, hf: str, to_ours: Callable, to_hf: Callable) -> tuple:
  """Returns the map entry of an HF tensor stacking len(ours) of our tensors along its first axis."""
  def split(x, c):
    return [to_ours(part, c) for part in np.split(x, len(ours))]

  def join(xs, c):
    return np.concatenate([to_hf(x, c) for x in xs])
  return ours, hf, split, join


def _modern_map(c, head: bool) -> list[tuple]:
  """Returns name_map's entries for ModernBertForMaskedLM (see name_map)."""
  enc, bias, nb = ('encoder',), c.use_bias, c.norm_bias
  out = [((*enc, 'token_embed'), MODERN.embedding, _ident, _ident),
         *_norm((*enc, 'embed_norm'), 'embeddings.norm', nb)]
  for i in range(c.num_layers):
    ours, hf = (*enc, 'layers', i), f'layers.{i}'
    if i:  # layer 0 attends to the embedding norm's output (first_attention_norm=False)
      out += _norm((*ours, 'attention_norm'), f'{hf}.attn_norm', nb)
    qkv = [(*ours, 'attention', name) for name in ('query', 'key', 'value')]
    out.append(_fused([(*q, 'kernel') for q in qkv], f'{hf}.attn.Wqkv.weight', _qkv_in, _qkv_out))
    if bias:
      out.append(_fused([(*q, 'bias') for q in qkv], f'{hf}.attn.Wqkv.bias', _qkv_in, _qkv_out))
    out += _dense((*ours, 'attention', 'output'), f'{hf}.attn.Wo', _attn_out_in, _attn_out_out,
                  bias=bias)
    out += _norm((*ours, 'mlp_norm'), f'{hf}.mlp_norm', nb)
    # Wi's first half is the GELU's input, its second the gate.
    gated = [(*ours, 'mlp', name) for name in ('intermediate', 'gate')]
    for kind in ('weight', 'bias') if bias else ('weight',):
      leaf = 'kernel' if kind == 'weight' else 'bias'
      out.append(_fused([(*g, leaf) for g in gated], f'{hf}.mlp.Wi.{kind}', _linear_in, _linear_in))
    out += _dense((*ours, 'mlp', 'output'), f'{hf}.mlp.Wo', bias=bias)
  out += _norm((*enc, 'final_norm'), 'final_norm', nb)
  if head:
    out += _dense(('mlm_head', 'transform'), 'head.dense', bias=bias)
    out += _norm(('mlm_head', 'norm'), 'head.norm', nb)
    out.append((('mlm_head', 'bias'), MODERN.bias, _ident, _ident))
    if not c.tie_embeddings:
      out.append((('mlm_head', 'decoder'), f'{MODERN.decoder}.weight', _ident, _ident))
  return out


def name_map(enc_cfg, *, head: bool = True) -> list[tuple]:
  """Returns [(our param path, HF tensor name (base model, unprefixed), to_ours(x, cfg), to_hf(x, cfg))].

  Head tensors carry their full name (cls.predictions.*, lm_head.*, or head.* and decoder.*). A
  list of our paths is one fused HF tensor: to_ours returns a list, to_hf takes one.
  """
  if arch_of(enc_cfg) is MODERN:
    return _modern_map(enc_cfg, head)
  arch, enc = arch_of(enc_cfg), ('encoder',)
  pre_ln = arch is PRE_LN
  out = [((*enc, 'token_embed'), 'embeddings.word_embeddings.weight', _ident, _ident),
         ((*enc, 'position_embed'), 'embeddings.position_embeddings.weight',
          *((_positions_in, _positions_out) if pre_ln else (_ident, _ident))),
         ((*enc, 'type_embed'), 'embeddings.token_type_embeddings.weight', _ident, _ident),
         *_norm((*enc, 'embed_norm'), 'embeddings.LayerNorm')]
  for i in range(enc_cfg.num_layers):
    ours, hf = (*enc, 'layers', i), f'encoder.layer.{i}'
    for name in ('query', 'key', 'value'):
      out += _dense((*ours, 'attention', name), f'{hf}.attention.self.{name}', _qkv_in, _qkv_out,
                    _qkv_in, _qkv_out)
    out += _dense((*ours, 'attention', 'output'), f'{hf}.attention.output.dense', _attn_out_in,
                  _attn_out_out)
    out += _dense((*ours, 'mlp', 'intermediate'), f'{hf}.intermediate.dense')
    out += _dense((*ours, 'mlp', 'output'), f'{hf}.output.dense')
    if pre_ln:  # the norms in front of attention and MLP
      out += _norm((*ours, 'attention_norm'), f'{hf}.attention.LayerNorm')
      out += _norm((*ours, 'mlp_norm'), f'{hf}.intermediate.LayerNorm')
    else:  # the norms after each residual sum
      out += _norm((*ours, 'attention_norm'), f'{hf}.attention.output.LayerNorm')
      out += _norm((*ours, 'mlp_norm'), f'{hf}.output.LayerNorm')
  if pre_ln:
    out += _norm((*enc, 'final_norm'), 'LayerNorm')
  if head:
    out += _dense(('mlm_head', 'transform'), f'{arch.head}{arch.head_dense}')
    out += _norm(('mlm_head', 'norm'), f'{arch.head}{arch.head_norm}')
    out.append((('mlm_head', 'bias'), arch.bias, _ident, _ident))
    if not enc_cfg.tie_embeddings:
      out.append((('mlm_head', 'decoder'), f'{arch.decoder}.weight', _ident, _ident))
  return out


def _set(tree: dict, path: tuple | list, value) -> None:
  if isinstance(path, list):  # a fused HF tensor: one value per path
    for p, v in zip(path, value):
      _set(tree, p, v)
    return
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple | list):
  if isinstance(path, list):
    return [_get(tree, p) for p in path]
  for k in path:
    tree = tree[k]
  return tree


def _is_head(name: str, arch: Arch) -> bool:
  return name.startswith((arch.head, arch.decoder + '.'))


# ---------------------------------------------------------------------------------------------
# Reading and writing HF weights.


def _normalize_names(weights: dict, arch: Arch) -> dict:
  """Returns weights keyed as the base model (no 'bert.' prefix), with gamma/beta LayerNorm names fixed."""
  prefixed = any(k.startswith(arch.prefix) for k in weights)
  out = {}
  for k, v in weights.items():
    if prefixed and k.startswith(arch.prefix):
      k = k[len(arch.prefix):]
    k = k.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')
    out[k] = v
  return out


def read_weights(src: pathlib.Path) -> dict[str, np.ndarray]:
  """Returns the float32 tensors of model.safetensors (sharded too) or pytorch_model.bin in src."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  index = src / 'model.safetensors.index.json'
  if (src / 'model.safetensors').is_file():
    raw = load_file(str(src / 'model.safetensors'))
  elif index.is_file():
    raw = {}
    for shard in sorted(set(json.loads(index.read_text())['weight_map'].values())):
      raw.update(load_file(str(src / shard)))
  elif (src / 'pytorch_model.bin').is_file():
    if importlib.util.find_spec('torch') is None:
      raise ValueError(f'{src / "pytorch_model.bin"}: reading it needs torch; install '
                       'torch==2.13.0 or convert the checkpoint to model.safetensors')
    import torch  # pylint: disable=g-import-not-at-top
    state = torch.load(src / 'pytorch_model.bin', map_location='cpu', weights_only=True)
    raw = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise FileNotFoundError(f'{src} has no model.safetensors or pytorch_model.bin: point '
                            'SRC_DIR at a Hugging Face model directory')
  return {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}


def params_from_hf(weights: dict, enc_cfg, fresh_head: dict | None = None,
                   log: Callable[[str], None] = print) -> dict:
  """Returns our pure param dict {encoder, mlm_head} from HF tensors (base model or *ForMaskedLM).

  arch_of(enc_cfg) picks the naming (ModernBERT if rotary, RoBERTa-PreLayerNorm if pre-LN, else
  BERT). fresh_head: our initialized mlm_head params, used (with a warning) when the checkpoint
  has none.
  """
  arch = arch_of(enc_cfg)
  weights = _normalize_names(weights, arch)
  has_head = any(k.startswith(arch.head) for k in weights)
  # The MLM decoder adds its own bias; in untied checkpoints it may differ from `bias`.
  if f'{arch.decoder}.bias' in weights:
    weights[arch.bias] = weights[f'{arch.decoder}.bias']
  elif arch is MODERN and has_head:  # decoder_bias=false: a zero bias computes the same
    weights[arch.bias] = np.zeros(enc_cfg.padded_vocab_size, np.float32)
  decoder = weights.get(f'{arch.decoder}.weight')
  if (enc_cfg.tie_embeddings and decoder is not None
      and not np.array_equal(decoder, weights.get(arch.embedding))):
    raise ValueError(f'{arch.decoder}.weight differs from the word embeddings but '
                     'config.json has tie_word_embeddings=true; set it to false to keep it')
  params, used = {}, {f'{arch.decoder}.weight', f'{arch.decoder}.bias'}
  for ours, hf, to_ours, _ in name_map(enc_cfg, head=has_head):
    if hf not in weights:
      raise ValueError(f'the checkpoint lacks tensor {hf!r} that config.json\'s shape requires')
    _set(params, ours, to_ours(weights[hf], enc_cfg))
    used.add(hf)
  if not has_head:
    if fresh_head is None:
      raise ValueError(f'the checkpoint has no MLM head ({arch.head}*) and no fresh head was given')
    log('WARNING: the checkpoint has no MLM head (a base model); the head is freshly initialized')
    params['mlm_head'] = fresh_head
  unknown = sorted(k for k in weights if k not in used and not k.startswith(arch.ignored))
  if unknown:
    raise ValueError(f'the checkpoint holds {len(unknown)} tensors a {arch.model_type} MLM encoder '
                     f'does not have (e.g. {unknown[:3]}); only base-model and {arch.architecture} '
                     'weights are supported')
  ignored = sorted({k.split('.')[0] for k in weights if k.startswith(arch.ignored)})
  if ignored:
    log(f'note: ignored tensors with no mlmjax counterpart: {", ".join(ignored)}')
  return params


def params_to_hf(params: dict, enc_cfg) -> dict[str, np.ndarray]:
  """Returns *ForMaskedLM tensors (base-model prefix, decoder weight and bias included) of our params."""
  arch, out = arch_of(enc_cfg), {}
  for ours, hf, _, to_hf in name_map(enc_cfg):
    name = hf if _is_head(hf, arch) else arch.prefix + hf
    value = _float32(_get(params, ours))
    out[name] = np.ascontiguousarray(to_hf(value, enc_cfg))
  if enc_cfg.tie_embeddings:
    out[f'{arch.decoder}.weight'] = out[arch.prefix + arch.embedding]
  out[f'{arch.decoder}.bias'] = out[arch.bias]
  return out


def _float32(x):
  """Returns x (an array or a list of them) as float32 numpy."""
  return [np.asarray(v, np.float32) for v in x] if isinstance(x, list) else np.asarray(x, np.float32)


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
  """Returns model.safetensors' bytes of the tensors (deterministic: equal tensors, equal bytes)."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  return save(tensors, metadata={'format': 'pt'})


# ---------------------------------------------------------------------------------------------
# Workdir <-> HF directory.


_PRETRAIN = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'pretrain.py')
DEFAULT_CONFIG = _PRETRAIN + ':base'
MODERN_CONFIG = _PRETRAIN + ':modern_base'  # a ModernBERT import's default settings
# The model keys an import sets from the checkpoint (model.size becomes 'custom').
_IMPORTED_KEYS = ('hidden_size', 'num_layers', 'num_heads', 'intermediate_size', 'type_vocab_size',
                  'layer_norm_eps', 'max_position', 'pre_layer_norm', 'dropout_rate',
                  'tie_embeddings', 'attention_dropout_rate', 'initializer_range')


def read_tokenizer(src: pathlib.Path):
  """Returns the tokenizer of a HF directory: tokenizer.model (sentencepiece), else WordPiece or BPE."""
  if (src / 'tokenizer.model').is_file():  # an mlmjax export: the exact sentencepiece model
    return tok.Tokenizer.load(src / 'tokenizer.model')
  for name in ('tokenizer.json', 'vocab.txt'):
    if (src / name).is_file():
      return tok.load_any(src / name)
  raise FileNotFoundError(f'{src} has no tokenizer.model, tokenizer.json or vocab.txt: an import '
                          "needs the checkpoint's tokenizer beside config.json")


def _vocab_multiple(vocab: int, rows: int) -> int:
  """Returns the smallest model.vocab_multiple that pads `vocab` tokenizer ids to `rows` rows."""
  return next(m for m in range(1, rows + 1) if -(-vocab // m) * m == rows)


def import_hf(src_dir, workdir, *, config_spec: str | None = None,
              log: Callable[[str], None] = print) -> dict:
  """Writes an mlmjax workdir (config.json, tokenizer, checkpoint step 0) from a HF directory.

  Reads BERT, RoBERTa-PreLayerNorm and ModernBERT checkpoints with a WordPiece, BPE or mlmjax
  sentencepiece tokenizer. config_spec: the data/optim/train settings (default pretrain.py's base,
  modern_base for ModernBERT). Returns the written config as a dict. The workdir must not hold a
  checkpoint yet.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mlmjax import checkpoint, model, optim, train_state  # pylint: disable=g-import-not-at-top
  src, workdir = pathlib.Path(src_dir), pathlib.Path(workdir)
  cfg_path = src / 'config.json'
  if not cfg_path.is_file():
    raise FileNotFoundError(f'{cfg_path} does not exist: point SRC_DIR at a Hugging Face model directory')
  hf_config = json.loads(cfg_path.read_text())
  check_supported(hf_config, str(cfg_path))
  enc_cfg = encoder_config(hf_config)
  tokenizer = read_tokenizer(src)
  if tokenizer.vocab_size > enc_cfg.vocab_size:
    raise ValueError(f'{src}: the tokenizer has {tokenizer.vocab_size} pieces but config.json '
                     f'vocab_size={enc_cfg.vocab_size}')
  if (workdir / 'checkpoints').is_dir() and any((workdir / 'checkpoints').iterdir()):
    raise ValueError(f'{workdir / "checkpoints"} already holds checkpoints; import into a new --workdir')

  modern = arch_of(enc_cfg) is MODERN
  config = cli.load_config(config_spec or (MODERN_CONFIG if modern else DEFAULT_CONFIG))
  m = config.model
  m.size = 'custom'
  for key in (*_IMPORTED_KEYS, *model.ARCHITECTURE_OPTIONS):
    m[key] = getattr(enc_cfg, key)
  # config.json's vocab_size counts embedding rows, which may pad the tokenizer's ids (never
  # produced past them): the model keeps the rows and scores the tokenizer's ids.
  m.vocab_multiple = _vocab_multiple(tokenizer.vocab_size, enc_cfg.vocab_size)
  config.train.seq_len = min(config.train.seq_len, enc_cfg.max_position)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / tokenizer.file_name).write_bytes(tokenizer.serialized_model)
  config.tokenizer.path = str((workdir / tokenizer.file_name).resolve())
  config.tokenizer.vocab_size = tokenizer.vocab_size
  enc_cfg = model.EncoderConfig(vocab_size=tokenizer.vocab_size, **config.model)

  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  fresh = model.MlmHead(enc_cfg, rngs=nnx.Rngs(config.seed))
  fresh_head = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(fresh, nnx.Param)))
  params = params_from_hf(read_weights(src), enc_cfg, fresh_head, log=log)
  _check_shapes(params, nnx.to_pure_dict(train_state.abstract_model(enc_cfg, config.seed)[1]))
  # An mlmjax export's facts, kept with the digest of the weights as exported: an export of this
  # workdir whose weights are still these carries them (and so writes the same model card).
  digest = hashlib.sha256(safetensors_bytes(params_to_hf(params, enc_cfg))).hexdigest()
  facts = None
  if (src / model_card.FACTS_FILE).is_file():
    facts = json.loads((src / model_card.FACTS_FILE).read_text())
  (workdir / IMPORTED_FILE).write_text(json.dumps(
      {'source': str(src.resolve()), 'model_sha256': digest, 'facts': facts},
      indent=2, sort_keys=True) + '\n')
  params = jax.tree.map(lambda x: jax.numpy.asarray(x, jax.numpy.float32), params)
  state = {'params': params, 'opt_state': tx.init(params), 'step': jax.numpy.zeros((), jax.numpy.int32)}
  ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', async_save=False, log=log)
  try:
    ckpt.save(0, state, {'step': 0, 'seed': config.seed, 'tokenizer': tokenizer.fingerprint,
                         'imported_from': str(src.resolve())})
  finally:
    ckpt.close()
  written = json.loads(config.to_json_best_effort())
  (workdir / 'config.json').write_text(json.dumps(written, indent=2, sort_keys=True) + '\n')
  log(f'imported {src} ({hf_config.get("model_type", "bert")}, {enc_cfg.num_layers} layers, '
      f'hidden {enc_cfg.hidden_size}, vocab {enc_cfg.vocab_size}) into {workdir}')
  # init_from brings the model's architecture and the tokenizer: no model flags are needed.
  if tokenizer.pad_id != tok.PAD_ID:
    log(f'note: the tokenizer pads with id {tokenizer.pad_id}; fine-tune from it with '
        f'--config.init_from={workdir} (continued MLM pretraining packs rows padded with id 0, '
        'which it does not support yet)')
  else:
    log(f'continue MLM from it with: python -m mlmjax.train --config '
        f'pretrain:{"modern_base" if modern else "base"} --workdir runs/NEW '
        f'--config.init_from={workdir}')
  return written


def _check_shapes(params: dict, abstract: dict) -> None:
  """Raises ValueError naming the first parameter whose imported shape differs from the model's."""
  import jax  # pylint: disable=g-import-not-at-top
  got = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, want in jax.tree_util.tree_leaves_with_path(abstract):
    if path not in got:
      raise ValueError(f'the import produced no parameter {jax.tree_util.keystr(path)}')
    if tuple(got[path].shape) != tuple(want.shape):
      raise ValueError(f'parameter {jax.tree_util.keystr(path)}: the checkpoint gives shape '
                       f'{tuple(got[path].shape)}, config.json implies {tuple(want.shape)}')


def _tokenizer_files(tokenizer, max_len: int, log: Callable[[str], None]) -> dict[str, bytes]:
  """Returns {file name: bytes} of the tokenizer: tokenizer.json that transformers reads, and more.

  Sentencepiece: tokenizer.json built to encode as it does, and tokenizer.model, which import
  restores exactly. WordPiece: its tokenizer.json and vocab.txt, as transformers' BERT ships them.
  BPE: its tokenizer.json.
  """
  def dump(obj) -> bytes:
    return (json.dumps(obj, indent=2) + '\n').encode('utf-8')

  if isinstance(tokenizer, tok.Tokenizer):
    files = {'tokenizer.model': tokenizer.serialized_model,
             'tokenizer.json': hf_tokenizer.sentencepiece_json(tokenizer, tokenizer.model_path, log)}
    return {**files, **{k: dump(v) for k, v in hf_tokenizer.config_files(max_len).items()}}
  if isinstance(tokenizer, tok.BpeTokenizer):  # its own tokenizer.json, the specials named
    specials = {f'{k}_token': tokenizer.id_to_piece(getattr(tokenizer, f'{k}_id'))
                for k in ('unk', 'sep', 'pad', 'cls', 'mask')}
    return {'tokenizer.json': tokenizer.serialized_model,
            'special_tokens_map.json': dump(specials),
            'tokenizer_config.json': dump({'tokenizer_class': 'PreTrainedTokenizerFast',
                                           'model_max_length': max_len,
                                           'clean_up_tokenization_spaces': False, **specials})}
  vocab = '\n'.join(tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)) + '\n'
  specials = dict(unk_token='[UNK]', sep_token='[SEP]', pad_token='[PAD]', cls_token='[CLS]',
                  mask_token='[MASK]')
  return {'tokenizer.json': tokenizer.serialized_model, 'vocab.txt': vocab.encode('utf-8'),
          'special_tokens_map.json': dump(specials),
          'tokenizer_config.json': dump({'tokenizer_class': 'BertTokenizer',
                                         'model_max_length': max_len, **specials})}


def _model_shape(enc_cfg, params) -> dict:
  from mlmjax import model  # pylint: disable=g-import-not-at-top
  keys = ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size',
          'max_position', 'type_vocab_size', 'pre_layer_norm', 'tie_embeddings', 'layer_norm_eps')
  if arch_of(enc_cfg) is MODERN:
    keys += model.ARCHITECTURE_OPTIONS
  return {**{k: getattr(enc_cfg, k) for k in keys}, 'parameters': model.count_params(params)}


def _facts(workdir: pathlib.Path, run, enc_cfg, digest: str) -> dict:
  """Returns the export's facts: the import's source facts while the weights are still those."""
  origin = None
  if (workdir / IMPORTED_FILE).is_file():
    origin = json.loads((workdir / IMPORTED_FILE).read_text())
    if origin.get('model_sha256') == digest and origin.get('facts'):
      return origin['facts']
  config = json.loads(run.config.to_json_best_effort())
  facts = model_card.gather(
      workdir, config, step=run.step, architecture=arch_of(enc_cfg).architecture,
      model_shape=_model_shape(enc_cfg, run.params),
      tokenizer={'kind': hf_tokenizer.describe(run.tokenizer), 'vocab_size': run.tokenizer.vocab_size,
                 'fingerprint': run.tokenizer.fingerprint}, model_sha256=digest)
  if origin is not None and origin.get('model_sha256') == digest:
    facts['imported_from'] = origin.get('source')  # weights as imported: no mlmjax training
  return facts


def export_hf(workdir, out_dir, *, log: Callable[[str], None] = print) -> pathlib.Path:
  """Writes a transformers model directory of a workdir's latest MLM step to out_dir.

  config.json, model.safetensors, the tokenizer files, mlmjax.json (the run's facts) and
  README.md (the model card made of them). Returns out_dir.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mlmjax import model, predict  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  run = predict.load_run(workdir)  # parameters only
  if run.task != 'mlm' or 'mlm_head' not in run.params:
    raise ValueError(f'{workdir}: config.task={run.task!r}; export writes masked-LM models, so '
                     'export the MLM workdir this one was fine-tuned from')
  enc_cfg = model.EncoderConfig(vocab_size=run.tokenizer.vocab_size, **run.config.model)
  t = run.tokenizer
  hf_config = hf_config_from(enc_cfg, t.pad_id, cls_id=t.cls_id, sep_id=t.sep_id)
  tensors = params_to_hf(jax.device_get(run.params), enc_cfg)
  weights = safetensors_bytes(tensors)
  digest = hashlib.sha256(weights).hexdigest()
  facts = _facts(workdir, run, enc_cfg, digest)
  files = {'config.json': (json.dumps(hf_config, indent=2, sort_keys=True) + '\n').encode('utf-8'),
           'model.safetensors': weights, **_tokenizer_files(t, enc_cfg.max_position, log),
           model_card.FACTS_FILE: model_card.dumps(facts).encode('utf-8'),
           'README.md': model_card.render(facts).encode('utf-8')}
  out = pathlib.Path(out_dir)
  if out.is_dir():
    stale = sorted(p.name for p in out.iterdir() if p.name not in files and not p.name.startswith('.'))
    if stale:
      raise ValueError(f'{out} holds {stale[0]}, which this export does not write; export into a '
                       'new or empty directory')
  out.mkdir(parents=True, exist_ok=True)
  for name, data in files.items():
    tok.write_atomically(out / name, data)
  log(f'exported {workdir} (step {run.step}) to {out}: {arch_of(enc_cfg).architecture}, '
      f'{len(tensors)} tensors, {hf_tokenizer.describe(t)} tokenizer, model card README.md')
  return out


def main(argv=None) -> None:
  """Parses `import SRC_DIR --workdir W` or `export --workdir W OUT_DIR` and runs it."""
  parser = argparse.ArgumentParser(prog='python -m mlmjax.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='Hugging Face BERT / RoBERTa-PreLayerNorm / ModernBERT '
                       'directory -> mlmjax workdir')
  imp.add_argument('src_dir', help='directory with config.json, model.safetensors and a tokenizer')
  imp.add_argument('--workdir', required=True, help='new mlmjax workdir to write')
  imp.add_argument('--config', default=None,
                   help='config file:variant whose data/optim/train settings the workdir takes '
                   '(default: configs/pretrain.py:base, :modern_base for ModernBERT)')
  exp = sub.add_parser('export', help='mlmjax workdir -> Hugging Face *ForMaskedLM directory')
  exp.add_argument('--workdir', required=True, help='a workdir written by mlmjax.train or import')
  exp.add_argument('out_dir', help='directory to write the model, tokenizer and model card to')
  args = parser.parse_args(argv)
  try:
    if args.command == 'import':
      import_hf(args.src_dir, args.workdir, config_spec=args.config)
    else:
      export_hf(args.workdir, args.out_dir)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
