"""Hugging Face interop: import BERT, RoBERTa-PreLayerNorm or ModernBERT, export a workdir as one.

  python -m mlmjax.convert import SRC_DIR --workdir runs/imported
  python -m mlmjax.convert export --workdir runs/x OUT_DIR

A post-LN run exports as BertForMaskedLM, a pre-LN run (the default) as
RobertaPreLayerNormForMaskedLM, a rotary run (model.MODERN's options) as ModernBertForMaskedLM;
mlmjax/hf_models.py holds how each names and lays out our weights. This module reads and writes
the files: weights, config.json, the tokenizer files, the workdir and the model card. Reading
needs only safetensors and numpy (pytorch_model.bin needs torch).
"""

import argparse
import hashlib
import importlib.util
import json
import pathlib
import sys
from typing import Callable

import numpy as np

from mlmjax import cli, hf_models, hf_tokenizer, model_card
from mlmjax import tokenizer as tok

IMPORTED_FILE = 'imported.json'  # what an import knew of its source, kept in the workdir


# ---------------------------------------------------------------------------------------------
# Reading and writing HF weights.


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
  hf_models.check_supported(hf_config, str(cfg_path))
  enc_cfg = hf_models.encoder_config(hf_config)
  tokenizer = read_tokenizer(src)
  if tokenizer.vocab_size > enc_cfg.vocab_size:
    raise ValueError(f'{src}: the tokenizer has {tokenizer.vocab_size} pieces but config.json '
                     f'vocab_size={enc_cfg.vocab_size}')
  if (workdir / 'checkpoints').is_dir() and any((workdir / 'checkpoints').iterdir()):
    raise ValueError(f'{workdir / "checkpoints"} already holds checkpoints; import into a new --workdir')

  modern = hf_models.arch_of(enc_cfg) is hf_models.MODERN
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
  params = hf_models.params_from_hf(read_weights(src), enc_cfg, fresh_head, log=log)
  _check_shapes(params, nnx.to_pure_dict(train_state.abstract_model(enc_cfg, config.seed)[1]))
  # An mlmjax export's facts, kept with the digest of the weights as exported: an export of this
  # workdir whose weights are still these carries them (and so writes the same model card).
  digest = hashlib.sha256(safetensors_bytes(hf_models.params_to_hf(params, enc_cfg))).hexdigest()
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
  if hf_models.arch_of(enc_cfg) is hf_models.MODERN:
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
      workdir, config, step=run.step, architecture=hf_models.arch_of(enc_cfg).architecture,
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
  hf_config = hf_models.hf_config_from(enc_cfg, t.pad_id, cls_id=t.cls_id, sep_id=t.sep_id)
  tensors = hf_models.params_to_hf(jax.device_get(run.params), enc_cfg)
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
  log(f'exported {workdir} (step {run.step}) to {out}: {hf_models.arch_of(enc_cfg).architecture}, '
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