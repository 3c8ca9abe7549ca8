"""Hugging Face BERT interop: import a BERT directory into a workdir, export a workdir as BERT.

  python -m mlmjax.convert import SRC_DIR --workdir runs/imported
  python -m mlmjax.convert export --workdir runs/x OUT_DIR

Reading needs only safetensors and numpy (pytorch_model.bin needs torch). The weight layout:
HF Linear weights are (out, in) and compute x @ W.T; our kernels are (in, ...) with the output
split per head for query/key/value (H, heads, head_dim) and the attention output (heads, head_dim, H).
"""

import argparse
import importlib.util
import json
import pathlib
import sys
from typing import Callable

import numpy as np

from mlmjax import cli
from mlmjax import tokenizer as tok

# HF config fields whose other values our encoder cannot compute, with the value it needs.
_REQUIRED = (('model_type', 'bert'), ('hidden_act', 'gelu'),
             ('position_embedding_type', 'absolute'), ('is_decoder', False),
             ('add_cross_attention', False))
# Tensors a BERT checkpoint may hold that an MLM encoder has no use for.
_IGNORED = ('pooler.', 'cls.seq_relationship.', 'embeddings.position_ids')
_HEAD = 'cls.predictions.'


def check_supported(hf_config: dict, where: str = 'config.json') -> None:
  """Returns None; raises ValueError naming the first config.json field our encoder cannot represent."""
  for field, needed in _REQUIRED:
    value = hf_config.get(field, needed)
    if value != needed:
      raise ValueError(f'{where}: {field}={value!r} is not supported; mlmjax computes only '
                       f'{field}={needed!r} (BERT with exact GELU and absolute positions)')
  for field in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                'intermediate_size', 'max_position_embeddings'):
    if not isinstance(hf_config.get(field), int):
      raise ValueError(f'{where}: field {field} is missing or not an integer')
  if hf_config['hidden_size'] % hf_config['num_attention_heads']:
    raise ValueError(f'{where}: hidden_size={hf_config["hidden_size"]} is not divisible by '
                     f'num_attention_heads={hf_config["num_attention_heads"]}')


def encoder_config(hf_config: dict):
  """Returns the model.EncoderConfig (post-LN, float32) of a supported HF BERT config."""
  from mlmjax import model  # pylint: disable=g-import-not-at-top
  check_supported(hf_config)
  return model.EncoderConfig(
      vocab_size=hf_config['vocab_size'], hidden_size=hf_config['hidden_size'],
      num_layers=hf_config['num_hidden_layers'], num_heads=hf_config['num_attention_heads'],
      intermediate_size=hf_config['intermediate_size'],
      max_position=hf_config['max_position_embeddings'],
      type_vocab_size=hf_config.get('type_vocab_size', 2),
      dropout_rate=hf_config.get('hidden_dropout_prob', 0.1),
      attention_dropout_rate=hf_config.get('attention_probs_dropout_prob', 0.1),
      layer_norm_eps=hf_config.get('layer_norm_eps', 1e-12), pre_layer_norm=False,
      tie_embeddings=bool(hf_config.get('tie_word_embeddings', True)),
      initializer_range=hf_config.get('initializer_range', 0.02))


def hf_config_from(enc_cfg, pad_id: int = 0) -> dict:
  """Returns the transformers BertConfig dict (BertForMaskedLM) of a post-LN EncoderConfig."""
  if enc_cfg.pre_layer_norm:
    raise ValueError('model.pre_layer_norm=True: BERT has no pre-LN variant (nor its final '
                     'LayerNorm), so this run cannot be exported; train with model.pre_layer_norm=False')
  return {
      'architectures': ['BertForMaskedLM'], 'model_type': 'bert',
      'vocab_size': enc_cfg.vocab_size, 'hidden_size': enc_cfg.hidden_size,
      'num_hidden_layers': enc_cfg.num_layers, 'num_attention_heads': enc_cfg.num_heads,
      'intermediate_size': enc_cfg.intermediate_size, 'hidden_act': 'gelu',
      'hidden_dropout_prob': enc_cfg.dropout_rate,
      'attention_probs_dropout_prob': enc_cfg.attention_dropout_rate,
      'max_position_embeddings': enc_cfg.max_position, 'type_vocab_size': enc_cfg.type_vocab_size,
      'initializer_range': enc_cfg.initializer_range, 'layer_norm_eps': enc_cfg.layer_norm_eps,
      'pad_token_id': int(pad_id), 'position_embedding_type': 'absolute',
      'tie_word_embeddings': enc_cfg.tie_embeddings, 'torch_dtype': 'float32'}


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


def _norm(ours: tuple, hf: str) -> list:
  return [((*ours, 'scale'), f'{hf}.weight', _ident, _ident),
          ((*ours, 'bias'), f'{hf}.bias', _ident, _ident)]


def _dense(ours: tuple, hf: str, to_ours: Callable = _linear_in, to_hf: Callable = _linear_in,
           bias_in: Callable = _ident, bias_out: Callable = _ident) -> list:
  return [((*ours, 'kernel'), f'{hf}.weight', to_ours, to_hf),
          ((*ours, 'bias'), f'{hf}.bias', bias_in, bias_out)]


def name_map(enc_cfg, *, head: bool = True) -> list[tuple]:
  """Returns [(our param path, HF tensor name (BertModel), to_ours(x, cfg), to_hf(x, cfg))]."""
  enc = ('encoder',)
  out = [((*enc, 'token_embed'), 'embeddings.word_embeddings.weight', _ident, _ident),
         ((*enc, 'position_embed'), 'embeddings.position_embeddings.weight', _ident, _ident),
         ((*enc, 'type_embed'), 'embeddings.token_type_embeddings.weight', _ident, _ident),
         *_norm((*enc, 'embed_norm'), 'embeddings.LayerNorm')]
  for i in range(enc_cfg.num_layers):
    ours, hf = (*enc, 'layers', i), f'encoder.layer.{i}'
    for name in ('query', 'key', 'value'):
      out += _dense((*ours, 'attention', name), f'{hf}.attention.self.{name}', _qkv_in, _qkv_out,
                    _qkv_in, _qkv_out)
    out += _dense((*ours, 'attention', 'output'), f'{hf}.attention.output.dense', _attn_out_in,
                  _attn_out_out)
    out += _norm((*ours, 'attention_norm'), f'{hf}.attention.output.LayerNorm')
    out += _dense((*ours, 'mlp', 'intermediate'), f'{hf}.intermediate.dense')
    out += _dense((*ours, 'mlp', 'output'), f'{hf}.output.dense')
    out += _norm((*ours, 'mlp_norm'), f'{hf}.output.LayerNorm')
  if head:
    out += _dense(('mlm_head', 'transform'), f'{_HEAD}transform.dense')
    out += _norm(('mlm_head', 'norm'), f'{_HEAD}transform.LayerNorm')
    out.append((('mlm_head', 'bias'), f'{_HEAD}bias', _ident, _ident))
    if not enc_cfg.tie_embeddings:
      out.append((('mlm_head', 'decoder'), f'{_HEAD}decoder.weight', _ident, _ident))
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
# Reading and writing HF directories.


def _normalize_names(weights: dict) -> dict:
  """Returns weights keyed as BertModel (no 'bert.' prefix), with gamma/beta LayerNorm names fixed."""
  prefixed = any(k.startswith('bert.') for k in weights)
  out = {}
  for k, v in weights.items():
    if prefixed and k.startswith('bert.'):
      k = k[len('bert.'):]
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
                            'SRC_DIR at a Hugging Face BERT directory')
  return {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}


def params_from_hf(weights: dict, enc_cfg, fresh_head: dict | None = None,
                   log: Callable[[str], None] = print) -> dict:
  """Returns our pure param dict {encoder, mlm_head} from HF tensors (BertModel or BertForMaskedLM).

  fresh_head: our initialized mlm_head params, used (with a warning) when the checkpoint has none.
  """
  weights = _normalize_names(weights)
  has_head = any(k.startswith(_HEAD) for k in weights)
  # BertLMPredictionHead adds the decoder's bias; in untied checkpoints it may differ from `bias`.
  if 'cls.predictions.decoder.bias' in weights:
    weights['cls.predictions.bias'] = weights['cls.predictions.decoder.bias']
  decoder = weights.get(f'{_HEAD}decoder.weight')
  if (enc_cfg.tie_embeddings and decoder is not None
      and not np.array_equal(decoder, weights.get('embeddings.word_embeddings.weight'))):
    raise ValueError('cls.predictions.decoder.weight differs from the word embeddings but '
                     'config.json has tie_word_embeddings=true; set it to false to keep it')
  params, used = {}, {f'{_HEAD}decoder.weight', f'{_HEAD}decoder.bias'}
  for ours, hf, to_ours, _ in name_map(enc_cfg, head=has_head):
    if hf not in weights:
      raise ValueError(f'the checkpoint lacks tensor {hf!r} that config.json\'s shape requires')
    value = to_ours(weights[hf], enc_cfg)
    _set(params, ours, value)
    used.add(hf)
  if not has_head:
    if fresh_head is None:
      raise ValueError('the checkpoint has no MLM head (cls.predictions.*) and no fresh head was given')
    log('WARNING: the checkpoint has no MLM head (a BertModel); the head is freshly initialized')
    params['mlm_head'] = fresh_head
  unknown = sorted(k for k in weights if k not in used and not k.startswith(_IGNORED))
  if unknown:
    raise ValueError(f'the checkpoint holds {len(unknown)} tensors a BERT MLM encoder does not '
                     f'have (e.g. {unknown[:3]}); only BertModel / BertForMaskedLM / '
                     'BertForPreTraining weights are supported')
  ignored = sorted({k.split('.')[0] for k in weights if k.startswith(_IGNORED)})
  if ignored:
    log(f'note: ignored tensors with no mlmjax counterpart: {", ".join(ignored)}')
  return params


def params_to_hf(params: dict, enc_cfg) -> dict[str, np.ndarray]:
  """Returns BertForMaskedLM tensors ('bert.' prefix, decoder weight included) of our params."""
  out = {}
  for ours, hf, _, to_hf in name_map(enc_cfg):
    name = hf if hf.startswith(_HEAD) else 'bert.' + hf
    out[name] = np.ascontiguousarray(to_hf(np.asarray(_get(params, ours), np.float32), enc_cfg))
  if enc_cfg.tie_embeddings:
    out[f'{_HEAD}decoder.weight'] = out['bert.embeddings.word_embeddings.weight']
  out[f'{_HEAD}decoder.bias'] = out[f'{_HEAD}bias']
  return out


# ---------------------------------------------------------------------------------------------
# Workdir <-> HF directory.


DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'pretrain.py') + ':base'


def import_hf(src_dir, workdir, *, config_spec: str = DEFAULT_CONFIG,
              log: Callable[[str], None] = print) -> dict:
  """Writes an mlmjax workdir (config.json, tokenizer, checkpoint step 0) from a HF BERT directory.

  Returns the written config as a dict. The workdir must not hold a checkpoint yet.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mlmjax import checkpoint, model, optim, train_state  # pylint: disable=g-import-not-at-top
  src, workdir = pathlib.Path(src_dir), pathlib.Path(workdir)
  cfg_path = src / 'config.json'
  if not cfg_path.is_file():
    raise FileNotFoundError(f'{cfg_path} does not exist: point SRC_DIR at a Hugging Face BERT directory')
  hf_config = json.loads(cfg_path.read_text())
  check_supported(hf_config, str(cfg_path))
  enc_cfg = encoder_config(hf_config)
  if not any((src / n).is_file() for n in ('tokenizer.json', 'vocab.txt')):
    raise FileNotFoundError(f'{src} has no tokenizer.json or vocab.txt: an import needs the '
                            "checkpoint's WordPiece vocabulary beside config.json")
  tokenizer = tok.load_any(src / 'tokenizer.json' if (src / 'tokenizer.json').is_file()
                           else src / 'vocab.txt')
  if not hasattr(tokenizer, 'save_vocab'):
    raise ValueError(f'{src}: found a sentencepiece model; imports need the BERT vocab.txt or '
                     'tokenizer.json')
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
  m.max_position, m.pre_layer_norm = enc_cfg.max_position, False
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
  log(f'imported {src} ({enc_cfg.num_layers} layers, hidden {enc_cfg.hidden_size}, '
      f'vocab {enc_cfg.vocab_size}) into {workdir}')
  log('continue MLM from it with: python -m mlmjax.train --config configs/pretrain.py:base '
      f'--workdir runs/NEW --config.init_from={workdir} {" ".join(train_overrides(written))}')
  return written


def train_overrides(config: dict) -> list[str]:
  """Returns the --config.KEY=VALUE flags that give a train config this imported model's shape."""
  m = config['model']
  keys = ('size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size', 'type_vocab_size',
          'layer_norm_eps', 'max_position', 'pre_layer_norm', 'tie_embeddings')
  flags = [f'--config.model.{k}={m[k]}' for k in keys]
  return flags + [f'--config.tokenizer.path={config["tokenizer"]["path"]}',
                  f'--config.tokenizer.vocab_size={config["tokenizer"]["vocab_size"]}']


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


def export_hf(workdir, out_dir, *, log: Callable[[str], None] = print) -> pathlib.Path:
  """Writes config.json, model.safetensors and the tokenizer files of a workdir's latest step to out_dir."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from mlmjax import model, predict  # pylint: disable=g-import-not-at-top
  run = predict.load_run(workdir)  # parameters only
  enc_cfg = model.EncoderConfig(vocab_size=run.tokenizer.vocab_size, **run.config.model)
  hf_config = hf_config_from(enc_cfg, run.tokenizer.pad_id)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  tensors = params_to_hf(jax.device_get(run.params), enc_cfg)
  save_file(tensors, str(out / 'model.safetensors'), metadata={'format': 'pt'})
  (out / 'config.json').write_text(json.dumps(hf_config, indent=2, sort_keys=True) + '\n')
  _export_tokenizer(run.tokenizer, out, enc_cfg.max_position)
  log(f'exported {workdir} (step {run.step}) to {out}: BertForMaskedLM, {len(tensors)} tensors')
  return out


def _export_tokenizer(tokenizer, out: pathlib.Path, max_len: int) -> None:
  """Writes the tokenizer files transformers reads (WordPiece), or copies the sentencepiece model."""
  if not hasattr(tokenizer, 'save_vocab'):
    # transformers has no BERT tokenizer over a sentencepiece model: ship it for mlmjax users.
    (out / 'tokenizer.model').write_bytes(tokenizer.serialized_model)
    return
  (out / 'tokenizer.json').write_bytes(tokenizer.serialized_model)
  tokenizer.save_vocab(out / 'vocab.txt')
  specials = dict(unk_token='[UNK]', sep_token='[SEP]', pad_token='[PAD]', cls_token='[CLS]',
                  mask_token='[MASK]')
  (out / 'special_tokens_map.json').write_text(json.dumps(specials, indent=2) + '\n')
  (out / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'BertTokenizer', 'model_max_length': max_len, **specials}, indent=2) + '\n')


def main(argv=None) -> None:
  """Parses `import SRC_DIR --workdir W` or `export --workdir W OUT_DIR` and runs it."""
  parser = argparse.ArgumentParser(prog='python -m mlmjax.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='Hugging Face BERT directory -> mlmjax workdir')
  imp.add_argument('src_dir', help='directory with config.json and model.safetensors')
  imp.add_argument('--workdir', required=True, help='new mlmjax workdir to write')
  imp.add_argument('--config', default=DEFAULT_CONFIG,
                   help='config file:variant whose data/optim/train settings the workdir takes')
  exp = sub.add_parser('export', help='mlmjax workdir -> Hugging Face BertForMaskedLM directory')
  exp.add_argument('--workdir', required=True, help='a workdir written by mlmjax.train or import')
  exp.add_argument('out_dir', help='directory to write config.json and model.safetensors to')
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
