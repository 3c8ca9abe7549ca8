"""Hugging Face interop: import a BERT or RoBERTa-PreLayerNorm directory, export a workdir as one.

  python -m mlmjax.convert import SRC_DIR --workdir runs/imported
  python -m mlmjax.convert export --workdir runs/x OUT_DIR

A post-LN run exports as BertForMaskedLM, a pre-LN run (the default) as
RobertaPreLayerNormForMaskedLM, which computes the same: LayerNorm after the embeddings, before
attention and before the MLP, and a final one; its positions start at padding_idx + 1, so position
row p of ours is its row p + 1 and its row 0 (padding only) is zeros. Reading needs only
safetensors and numpy (pytorch_model.bin needs torch). The weight layout: HF Linear weights are
(out, in) and compute x @ W.T; our kernels are (in, ...) with the output split per head for
query/key/value (H, heads, head_dim) and the attention output (heads, head_dim, H).
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


BERT = Arch('bert', 'BertForMaskedLM', 'bert.', 'cls.predictions.', 'transform.dense',
            'transform.LayerNorm', ('pooler.', 'cls.seq_relationship.', 'embeddings.position_ids'))
PRE_LN = Arch('roberta-prelayernorm', 'RobertaPreLayerNormForMaskedLM', 'roberta_prelayernorm.',
              'lm_head.', 'dense', 'layer_norm', ('pooler.', 'embeddings.position_ids',
                                                  'embeddings.token_type_ids'))
ARCHS = {a.model_type: a for a in (BERT, PRE_LN)}
# Rows of RoBERTa's position table before our position 0: padding_idx + 1 with [PAD] = 0.
ROBERTA_POSITION_OFFSET = 1
# HF config fields whose other values our encoder cannot compute, with the value it needs.
_REQUIRED = (('hidden_act', 'gelu'), ('position_embedding_type', 'absolute'),
             ('is_decoder', False), ('add_cross_attention', False))
IMPORTED_FILE = 'imported.json'  # what an import knew of its source, kept in the workdir


def arch_of(enc_cfg) -> Arch:
  """Returns the transformers class that computes what enc_cfg does (pre-LN: RoBERTa-PreLayerNorm)."""
  return PRE_LN if enc_cfg.pre_layer_norm else BERT


def check_supported(hf_config: dict, where: str = 'config.json') -> None:
  """Returns None; raises ValueError naming the first config.json field our encoder cannot represent."""
  kind = hf_config.get('model_type', 'bert')
  if kind not in ARCHS:
    raise ValueError(f'{where}: model_type={kind!r} is not supported; mlmjax computes only '
                     f'model_type in {sorted(ARCHS)} (BERT, or RoBERTa-PreLayerNorm for pre-LN)')
  for field, needed in _REQUIRED:
    value = hf_config.get(field, needed)
    if value != needed:
      raise ValueError(f'{where}: {field}={value!r} is not supported; mlmjax computes only '
                       f'{field}={needed!r} (exact GELU, absolute positions, an encoder)')
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


def _roberta_offset(hf_config: dict) -> int:
  pad = hf_config.get('pad_token_id')
  return (1 if pad is None else int(pad)) + 1  # RobertaPreLayerNormConfig's default pad is 1


def encoder_config(hf_config: dict):
  """Returns the model.EncoderConfig (float32) of a supported BERT or RoBERTa-PreLayerNorm config."""
  from mlmjax import model  # pylint: disable=g-import-not-at-top
  check_supported(hf_config)
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


def hf_config_from(enc_cfg, pad_id: int = tok.PAD_ID, *, cls_id: int = tok.CLS_ID,
                   sep_id: int = tok.SEP_ID) -> dict:
  """Returns the transformers config dict (BertForMaskedLM, or RobertaPreLayerNormForMaskedLM if pre-LN)."""
  arch = arch_of(enc_cfg)
  common = {
      'architectures': [arch.architecture], 'model_type': arch.model_type,
      'vocab_size': enc_cfg.vocab_size, 'hidden_size': enc_cfg.hidden_size,
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


def _norm(ours: tuple, hf: str) -> list:
  return [((*ours, 'scale'), f'{hf}.weight', _ident, _ident),
          ((*ours, 'bias'), f'{hf}.bias', _ident, _ident)]


def _dense(ours: tuple, hf: str, to_ours: Callable = _linear_in, to_hf: Callable = _linear_in,
           bias_in: Callable = _ident, bias_out: Callable = _ident) -> list:
  return [((*ours, 'kernel'), f'{hf}.weight', to_ours, to_hf),
          ((*ours, 'bias'), f'{hf}.bias', bias_in, bias_out)]


def name_map(enc_cfg, *, head: bool = True) -> list[tuple]:
  """Returns [(our param path, HF tensor name (base model, unprefixed), to_ours(x, cfg), to_hf(x, cfg))].

  Head tensors carry their full name (cls.predictions.* or lm_head.*).
  """
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
    out.append((('mlm_head', 'bias'), f'{arch.head}bias', _ident, _ident))
    if not enc_cfg.tie_embeddings:
      out.append((('mlm_head', 'decoder'), f'{arch.head}decoder.weight', _ident, _ident))
  return out


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


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

  enc_cfg.pre_layer_norm picks the naming (RoBERTa-PreLayerNorm, else BERT). fresh_head: our
  initialized mlm_head params, used (with a warning) when the checkpoint has none.
  """
  arch = arch_of(enc_cfg)
  weights = _normalize_names(weights, arch)
  has_head = any(k.startswith(arch.head) for k in weights)
  # The MLM decoder adds its own bias; in untied checkpoints it may differ from `bias`.
  if f'{arch.head}decoder.bias' in weights:
    weights[f'{arch.head}bias'] = weights[f'{arch.head}decoder.bias']
  decoder = weights.get(f'{arch.head}decoder.weight')
  if (enc_cfg.tie_embeddings and decoder is not None
      and not np.array_equal(decoder, weights.get('embeddings.word_embeddings.weight'))):
    raise ValueError(f'{arch.head}decoder.weight differs from the word embeddings but '
                     'config.json has tie_word_embeddings=true; set it to false to keep it')
  params, used = {}, {f'{arch.head}decoder.weight', f'{arch.head}decoder.bias'}
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
    name = hf if hf.startswith(arch.head) else arch.prefix + hf
    out[name] = np.ascontiguousarray(to_hf(np.asarray(_get(params, ours), np.float32), enc_cfg))
  if enc_cfg.tie_embeddings:
    out[f'{arch.head}decoder.weight'] = out[f'{arch.prefix}embeddings.word_embeddings.weight']
  out[f'{arch.head}decoder.bias'] = out[f'{arch.head}bias']
  return out


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
  """Returns model.safetensors' bytes of the tensors (deterministic: equal tensors, equal bytes)."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  return save(tensors, metadata={'format': 'pt'})


# ---------------------------------------------------------------------------------------------
# Workdir <-> HF directory.


DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'pretrain.py') + ':base'


def read_tokenizer(src: pathlib.Path):
  """Returns the tokenizer of a HF directory: tokenizer.model (sentencepiece), else WordPiece."""
  if (src / 'tokenizer.model').is_file():  # an mlmjax export: the exact sentencepiece model
    return tok.Tokenizer.load(src / 'tokenizer.model')
  for name in ('tokenizer.json', 'vocab.txt'):
    if (src / name).is_file():
      return tok.WordPieceTokenizer.load(src / name)
  raise FileNotFoundError(f'{src} has no tokenizer.model, tokenizer.json or vocab.txt: an import '
                          "needs the checkpoint's tokenizer beside config.json")


def import_hf(src_dir, workdir, *, config_spec: str = DEFAULT_CONFIG,
              log: Callable[[str], None] = print) -> dict:
  """Writes an mlmjax workdir (config.json, tokenizer, checkpoint step 0) from a HF directory.

  Reads BERT and RoBERTa-PreLayerNorm checkpoints with a WordPiece or an mlmjax sentencepiece
  tokenizer. Returns the written config as a dict. The workdir must not hold a checkpoint yet.
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

  config = cli.load_config(config_spec)
  m = config.model
  m.size = 'custom'
  m.hidden_size, m.num_layers = enc_cfg.hidden_size, enc_cfg.num_layers
  m.num_heads, m.intermediate_size = enc_cfg.num_heads, enc_cfg.intermediate_size
  m.type_vocab_size, m.layer_norm_eps = enc_cfg.type_vocab_size, enc_cfg.layer_norm_eps
  m.max_position, m.pre_layer_norm = enc_cfg.max_position, enc_cfg.pre_layer_norm
  m.dropout_rate, m.tie_embeddings = enc_cfg.dropout_rate, enc_cfg.tie_embeddings
  m.attention_dropout_rate, m.initializer_range = (enc_cfg.attention_dropout_rate,
                                                   enc_cfg.initializer_range)
  config.train.seq_len = min(config.train.seq_len, enc_cfg.max_position)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / tokenizer.file_name).write_bytes(tokenizer.serialized_model)
  config.tokenizer.path = str((workdir / tokenizer.file_name).resolve())
  config.tokenizer.vocab_size = enc_cfg.vocab_size
  # The padded vocabulary of config.json wins: ids past the tokenizer's are never produced.
  enc_cfg = model.EncoderConfig(vocab_size=enc_cfg.vocab_size, **config.model)

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
  log('continue MLM from it with: python -m mlmjax.train --config pretrain:base '
      f'--workdir runs/NEW --config.init_from={workdir}')
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
  """
  def dump(obj) -> bytes:
    return (json.dumps(obj, indent=2) + '\n').encode('utf-8')

  if isinstance(tokenizer, tok.Tokenizer):
    files = {'tokenizer.model': tokenizer.serialized_model,
             'tokenizer.json': hf_tokenizer.sentencepiece_json(tokenizer, tokenizer.model_path, log)}
    return {**files, **{k: dump(v) for k, v in hf_tokenizer.config_files(max_len).items()}}
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
  imp = sub.add_parser('import', help='Hugging Face BERT / RoBERTa-PreLayerNorm directory -> mlmjax workdir')
  imp.add_argument('src_dir', help='directory with config.json, model.safetensors and a tokenizer')
  imp.add_argument('--workdir', required=True, help='new mlmjax workdir to write')
  imp.add_argument('--config', default=DEFAULT_CONFIG,
                   help='config file:variant whose data/optim/train settings the workdir takes')
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
