"""Train state {params, opt_state, step}: sharded init, parameters-only targets, init_from a pretrained run."""

import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mlmjax import checkpoint, model, schema, sharding
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import vocab_extension

# Parameters carry logical axis names as metadata only; shardings are applied by jit.
nnx.use_eager_sharding(False)


# ---------------------------------------------------------------------------------------------
# The model shape and the sharded initial state.


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
  tok_path = tokenizer_lib.stored_path(workdir)
  if tok_path is None:
    raise FileNotFoundError(f'init_from={source!r}: {workdir} holds no tokenizer '
                            f'({" or ".join(tokenizer_lib.WORKDIR_FILES)})')
  config = schema.upgrade(json.loads((workdir / 'config.json').read_text()))
  return InitSource(source, workdir, ckpt_dir, config, tok_path,
                    int(src.name) if src != workdir and src.name.isdigit() else None)


# The model keys that shape the parameters: a run started from init_from takes them from its config.
ARCHITECTURE_KEYS = ('size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size',
                     'max_position', 'type_vocab_size', 'layer_norm_eps', 'pre_layer_norm',
                     'tie_embeddings', *model.ARCHITECTURE_OPTIONS)


def adopt_model(config, src: InitSource, adapt) -> None:
  """Sets config.model's architecture keys to src's, except keys adapt says were set explicitly."""
  theirs = {f'model.{k}': src.config.model[k] for k in ARCHITECTURE_KEYS}
  adapt.adopt(config, theirs, f'model from init_from ({src.workdir / "config.json"})')


def abstract_params(enc_cfg: model.EncoderConfig, build: Callable, mesh) -> tuple[Any, dict]:
  """Returns (graphdef, params as ShapeDtypeStructs with shardings on mesh): a restore target."""
  graphdef, param_state = abstract_model(enc_cfg, 0, build)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(param_state))
  shapes = nnx.to_pure_dict(param_state)
  shardings = sharding.tree_shardings(logical, shapes, mesh, sharding.DEFAULT_RULES)
  return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                shapes, shardings)


def init_params_from(src: InitSource, state: dict, exp, log) -> dict:
  """Returns state with parameters from src's checkpoint, carried over by exp.task.transfer."""
  where = f'init_from={src.source!r}'
  task, enc_cfg = exp.task, exp.enc_cfg
  theirs = tokenizer_lib.load_any(src.tokenizer_path)
  new_pieces = []  # per id this run's tokenizer adds to theirs: the old ids its rows start from
  if theirs.fingerprint != task.tokenizer.fingerprint:
    try:
      new_pieces = vocab_extension.sources(theirs, task.tokenizer)
    except ValueError:
      new_pieces = None
  if new_pieces is None:
    raise ValueError(f'{where}: its tokenizer {src.tokenizer_path} differs from this run\'s '
                     f'{task.tokenizer.model_path} ({theirs.vocab_size} vs '
                     f'{task.tokenizer.vocab_size} pieces); leave tokenizer.path empty to use the '
                     'pretrained one')
  src_cfg = model.EncoderConfig(vocab_size=theirs.vocab_size, **src.config.model)
  differ = [f'model.{k}={getattr(enc_cfg, k)!r} (theirs {getattr(src_cfg, k)!r})'
            for k in task.init_match_keys() if getattr(src_cfg, k) != getattr(enc_cfg, k)]
  if differ:
    raise ValueError(f'{where}: this config\'s model differs from {src.workdir / "config.json"} in '
                     f'{len(differ)} key(s): {", ".join(differ)}; leave them unset to take the '
                     'pretrained model\'s')
  if not src.ckpt_dir.is_dir():
    raise FileNotFoundError(f'{where}: no checkpoint directory {src.ckpt_dir}')
  # The pretrained run's parameters only (its MLM model), on this run's mesh: no optimizer is built.
  _, target = abstract_params(src_cfg, _mlm_model, exp.mesh)
  step, loaded, _ = checkpoint.restore_params_in(src.ckpt_dir, target, what=where, log=log,
                                                 step=src.step)
  if new_pieces:
    _, param_state = abstract_model(src_cfg, 0)
    axes = vocab_extension.vocab_axes(nnx.to_pure_dict(nnx.get_partition_spec(param_state)))
    grown = vocab_extension.extend_params(loaded, axes, new_pieces)
    # Placed like this run's freshly initialized parameters of the same path.
    fresh = dict(jax.tree_util.tree_flatten_with_path(state['params'])[0])
    loaded = jax.tree_util.tree_map_with_path(
        lambda path, a: jax.device_put(a, fresh[path].sharding) if path in fresh else a, grown)
    log(f'{where}: {len(new_pieces)} new pieces after its {theirs.vocab_size} ids start as the '
        'mean of the embeddings of the pieces its tokenizer cuts them into')
  params = task.transfer(loaded, state['params'])
  log(f'initialized the model from {src.ckpt_dir / str(step)} (fresh optimizer'
      + (')' if params is loaded else ', fresh task head)'))
  return {**state, 'params': params}
