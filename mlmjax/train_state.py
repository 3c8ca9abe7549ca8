"""Train state {params, opt_state, step}: encoder config, sharded init, init_from a pretrained run."""

import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mlmjax import checkpoint, model, optim, sharding
from mlmjax import tokenizer as tokenizer_lib

# Parameters carry logical axis names as metadata only; shardings are applied by jit.
nnx.use_eager_sharding(False)


# ---------------------------------------------------------------------------------------------
# The model shape and the sharded initial state.


_SHAPE_KEYS = ('hidden_size', 'num_layers', 'num_heads', 'intermediate_size')


def encoder_config_from(config, vocab_size: int) -> model.EncoderConfig:
  """Returns the EncoderConfig named by config.model (size, then non-zero shape keys) for a vocab."""
  m = config.model
  # Configs written before the shape keys existed lack them: .get keeps their meaning.
  shape = dict(model.SIZES.get(m.size, {}))
  for key in _SHAPE_KEYS:
    if int(m.get(key, 0) or 0):
      shape[key] = int(m.get(key))
    elif key not in shape:
      raise ValueError(f"model.{key} must be set (> 0) when model.size='custom'")
  return model.EncoderConfig(
      vocab_size=vocab_size, **shape, max_position=m.max_position,
      type_vocab_size=int(m.get('type_vocab_size', 2)),
      layer_norm_eps=float(m.get('layer_norm_eps', 1e-12)), pre_layer_norm=m.pre_layer_norm,
      tie_embeddings=bool(m.get('tie_embeddings', True)),
      dropout_rate=m.dropout_rate, attention_dropout_rate=m.dropout_rate, dtype=m.dtype,
      attention_impl=m.attention_impl or None, remat=str(m.get('remat', '')))


def _mlm_model(enc_cfg: model.EncoderConfig, rngs: nnx.Rngs) -> nnx.Module:
  return model.BertForMLM(enc_cfg, rngs=rngs)


def abstract_model(enc_cfg: model.EncoderConfig, seed: int, build: Callable = _mlm_model):
  """Returns (graphdef, abstract param State) of build(enc_cfg, rngs) without allocating parameters."""
  abstract = nnx.eval_shape(lambda: build(enc_cfg, nnx.Rngs(seed)))
  return nnx.split(abstract, nnx.Param)


def state_shardings(param_state, abstract_state, tx, mesh, rules=sharding.DEFAULT_RULES):
  """Returns NamedShardings for {params, opt_state, step} from the parameters' logical names."""
  logical = nnx.to_pure_dict(nnx.get_partition_spec(param_state))
  p_shard = sharding.tree_shardings(logical, abstract_state['params'], mesh, rules)
  o_shard = optax.tree_map_params(
      tx, lambda _, s: s, abstract_state['opt_state'], p_shard,
      transform_non_params=lambda _: sharding.replicated(mesh),
      is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  return {'params': p_shard, 'opt_state': o_shard, 'step': sharding.replicated(mesh)}


def make_init_fn(enc_cfg: model.EncoderConfig, tx, seed: int,
                 build: Callable = _mlm_model) -> Callable[[], dict]:
  """Returns a function that builds the initial train state (to be jitted with out_shardings)."""

  def init():
    m = build(enc_cfg, nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.split(m, nnx.Param)[1])
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}

  return init


# ---------------------------------------------------------------------------------------------
# init_from: parameters (and the tokenizer) of a pretrained run, for DAPT and fine-tuning.


@dataclasses.dataclass
class InitSource:
  """A pretrained run to start from: its workdir, checkpoint directory, config and tokenizer."""
  source: str
  workdir: pathlib.Path
  ckpt_dir: pathlib.Path
  config: Any  # ml_collections.ConfigDict of its config.json
  tokenizer_path: pathlib.Path
  step: int | None = None  # a step directory was named: that step, else the latest that restores


def init_source(source: str) -> InitSource:
  """Returns the InitSource of a workdir, its checkpoints/ or best/ directory, or one step in them."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  src = pathlib.Path(source)
  if not src.exists():
    raise FileNotFoundError(f'init_from={source!r}: no such workdir or checkpoint directory')
  workdir = next((d for d in (src, src.parent, src.parent.parent) if (d / 'config.json').is_file()),
                 None)
  if workdir is None:
    raise FileNotFoundError(f'init_from={source!r}: no config.json in it or above it; point it at '
                            'a workdir written by mlmjax.train or mlmjax.convert')
  if src == workdir:
    ckpt_dir = workdir / 'checkpoints'
  else:
    ckpt_dir = src if not src.name.isdigit() else src.parent
  tok_path = next((workdir / n for n in tokenizer_lib.WORKDIR_FILES if (workdir / n).is_file()), None)
  if tok_path is None:
    raise FileNotFoundError(f'init_from={source!r}: {workdir} holds no tokenizer '
                            f'({" or ".join(tokenizer_lib.WORKDIR_FILES)})')
  config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  return InitSource(source, workdir, ckpt_dir, config, tok_path,
                    int(src.name) if src != workdir and src.name.isdigit() else None)


MATCH_KEYS = ('hidden_size', 'num_layers', 'num_heads', 'intermediate_size', 'max_position',
               'type_vocab_size', 'pre_layer_norm', 'layer_norm_eps')


def init_params_from(src: InitSource, state: dict, abstract_target: dict, task, enc_cfg,
                      tokenizer, log) -> dict:
  """Returns state with parameters from src's checkpoint: all of them for MLM, else the encoder."""
  where = f'init_from={src.source!r}'
  theirs = tokenizer_lib.load_any(src.tokenizer_path)
  if theirs.fingerprint != tokenizer.fingerprint:
    raise ValueError(f'{where}: its tokenizer {src.tokenizer_path} differs from this run\'s '
                     f'{tokenizer.model_path} ({theirs.vocab_size} vs {tokenizer.vocab_size} '
                     'pieces); leave tokenizer.path empty to use the pretrained one')
  src_cfg = encoder_config_from(src.config, theirs.vocab_size)
  # The decoder's layout matters only when the MLM head comes along (DAPT).
  for key in MATCH_KEYS + (('tie_embeddings',) if task.name == 'mlm' else ()):
    if getattr(src_cfg, key) != getattr(enc_cfg, key):
      raise ValueError(f'{where}: model.{key} is {getattr(enc_cfg, key)!r} in this config but '
                       f'{getattr(src_cfg, key)!r} in {src.workdir / "config.json"}; use the '
                       'pretrained model\'s settings')
  if not src.ckpt_dir.is_dir():
    raise FileNotFoundError(f'{where}: no checkpoint directory {src.ckpt_dir}')
  if task.name == 'mlm':
    target, take = abstract_target, (lambda p: p)
  else:
    # The pretrained run's own state layout (BertForMLM, its optimizer), on this run's mesh.
    mesh = jax.tree.leaves(abstract_target)[0].sharding.mesh
    src_enc = dataclasses.replace(enc_cfg, dropout_rate=src_cfg.dropout_rate,
                                  attention_dropout_rate=src_cfg.attention_dropout_rate,
                                  tie_embeddings=src_cfg.tie_embeddings)
    tx = optim.make_optimizer(src.config.optim, src.config.train.num_steps)
    _, param_state = abstract_model(src_enc, 0)
    abstract = jax.eval_shape(make_init_fn(src_enc, tx, 0))
    shard = state_shardings(param_state, abstract, tx, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shard)
    take = lambda p: {**state['params'], 'encoder': p['encoder']}
  if src.step is None:
    step, loaded, _ = checkpoint.restore_latest_in(src.ckpt_dir, target, what=where, log=log)
  else:
    named = checkpoint.Checkpointer(src.ckpt_dir, async_save=False, log=log)
    try:
      loaded, _ = named.restore(src.step, target)
    finally:
      named.close()
    step = src.step
  part = 'parameters' if task.name == 'mlm' else 'encoder'
  log(f'initialized the {part} from {src.ckpt_dir / str(step)} (fresh optimizer'
      + (', fresh task head)' if task.name != 'mlm' else ')'))
  return {**state, 'params': take(loaded['params'])}
