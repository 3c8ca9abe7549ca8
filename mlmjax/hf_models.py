"""Hugging Face architectures: what BERT, RoBERTa-PreLayerNorm and ModernBERT call our encoder.

The config.json translation both ways (encoder_config, hf_config_from, with what each side cannot
express refused: check_supported, check_exportable) and the tensor name and layout map
(params_from_hf, params_to_hf). A post-LN encoder is BertForMaskedLM, a pre-LN one (the default)
RobertaPreLayerNormForMaskedLM, which computes the same: LayerNorm after the embeddings, before
attention and before the MLP, and a final one; its positions start at padding_idx + 1, so position
row p of ours is its row p + 1 and its row 0 (padding only) is zeros. A rotary encoder
(model.MODERN's options) is ModernBertForMaskedLM. The weight layout: HF Linear weights are
(out, in) and compute x @ W.T; our kernels are (in, ...) with the output split per head for
query/key/value (H, heads, head_dim) and the attention output (heads, head_dim, H). ModernBERT
fuses query, key and value into one Wqkv (3H, H) and the GeGLU's activated input and gate into
one Wi (2I, H).
"""

import dataclasses
from typing import Callable

import numpy as np

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
# Reading HF weights into our params and back.


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
