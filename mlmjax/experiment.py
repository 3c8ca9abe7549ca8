"""setup(): everything a run needs, built once; train.run, the compile check and benchmarks share it.

  exp = setup(config, workdir, mesh)   # prepares the task's data (tokenizer, token cache, rows)
  exp = setup(config, None, mesh)      # shapes only: nothing is read or written (--dry_run)

What is compiled by the compile check is therefore exactly what train.run runs, for every task.
"""

import copy
import dataclasses
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mlmjax import (config_check, flops, masking, model, optim, phases, sharding, tasks, train_state,
                    train_step)
from mlmjax import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Experiment:
  """A run's task, model definition, optimizer, shardings, abstract state and jitted functions."""
  config: Any
  task: tasks.Task
  data: tasks.TaskData | None  # None when set up from shapes only
  mesh: jax.sharding.Mesh
  enc_cfg: model.EncoderConfig
  tx: Any  # optax.GradientTransformation
  schedule: Callable  # learning rate at a step
  graphdef: Any
  abstract_state: dict  # ShapeDtypeStructs carrying the state's shardings: the restore target
  shardings: dict  # NamedShardings of {params, opt_state, step}
  batch_sharding: jax.sharding.NamedSharding
  init_state: Callable[[], dict]  # jitted: the sharded initial state
  train_step: Callable  # jitted (state, rows, seed_key) -> (state, metric sums), state donated
  row_width: int  # columns of a row (the batch is (train.batch_size, row_width) int32)
  row_tokens: int  # of them, token columns (tokens/s and MFU count these)
  flops_per_token: float  # analytic training FLOPs per token slot (MFU)

  @property
  def num_params(self) -> int:
    """Returns the number of parameters."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_state['params']))

  def abstract_batch(self) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Returns ShapeDtypeStructs of (rows, seed key) as train_step receives them."""
    rows = jax.ShapeDtypeStruct((int(self.config.train.batch_size), self.row_width), jnp.int32,
                                sharding=self.batch_sharding)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return rows, jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(self.mesh))


def validate_config(config) -> None:
  """Raises ValueError naming the key for values that cannot work (see config_check)."""
  config_check.check_config(config)
  t = config.train
  encoder_config(config, config.tokenizer.vocab_size)  # model shape keys, heads, dtype
  # Building the specs validates masking.rate, masking.split, masking.selection.
  masking.spec_from_config(config.masking, vocab_size=config.tokenizer.vocab_size, seq_len=t.seq_len,
                           num_steps=t.num_steps)
  optim.learning_rate_schedule(config.optim, t.num_steps)
  if t.budget_tokens and t.budget_minutes:
    raise ValueError(f'train.budget_tokens={t.budget_tokens} and train.budget_minutes='
                     f'{t.budget_minutes} both set the length of the run; set one of them')
  budget = t.budget_tokens or t.budget_minutes  # the run's length is known once it starts
  for seg in phases.plan(config, 1 << 30 if budget else None):
    if seg.overrides:
      try:
        validate_config(phases.config_of(config, seg))
      except ValueError as e:
        raise ValueError(f'{seg.label} (steps {seg.start}..{seg.end}): {e}') from e


def encoder_config(config, vocab_size: int) -> model.EncoderConfig:
  """Returns the EncoderConfig of config.model for a vocabulary."""
  return model.EncoderConfig(vocab_size=int(vocab_size), **config.model)


def check_batch(config, mesh) -> None:
  """Raises ValueError unless the batch sizes divide among the mesh's data-parallel devices."""
  dp = sharding.data_parallel_size(mesh)
  for key, b in (('train.batch_size', config.train.batch_size),
                 ('eval.batch_size', config.eval.batch_size)):
    if b % dp:
      raise ValueError(f'{key}={b} must be divisible by the {dp} data-parallel devices of mesh.shape')
  micro = config.train.batch_size // config.train.grad_accum_steps
  if micro % dp:
    raise ValueError(f'train.batch_size / train.grad_accum_steps = {micro} rows per microbatch '
                     f'must be divisible by the {dp} data-parallel devices')


def with_init_tokenizer(config, workdir, init_run: train_state.InitSource | None, log):
  """Returns config with tokenizer.path set to init_from's tokenizer when nothing else names one."""
  if (init_run is None or config.tokenizer.path
      or (workdir is not None and tokenizer_lib.stored_path(workdir) is not None)):
    return config
  config = copy.deepcopy(config)
  config.tokenizer.path = str(init_run.tokenizer_path)
  log(f'tokenizer from init_from: {init_run.tokenizer_path}')
  return config


def setup(config, workdir, mesh, *, log: Callable[[str], None] = print,
          init_run: train_state.InitSource | None = None, adapt=None) -> Experiment:
  """Returns the Experiment of config on mesh; workdir None sets it up from shapes alone.

  adapt: an adapt.Adaptations; defaults that do not fit the run's budget or data are changed in
  config (each with a note) before they are checked, and with init_run the model's architecture
  keys are the pretrained run's unless set explicitly.
  """
  if adapt is not None:
    adapt.budget(config)
    if init_run is not None:
      train_state.adopt_model(config, init_run, adapt)
  validate_config(config)
  check_batch(config, mesh)
  config = with_init_tokenizer(config, workdir, init_run, log)
  task = tasks.create(config, log=log)
  task.adapt = adapt
  if workdir is None:
    if config.tokenizer.path:  # cheap to load, and it sizes the vocabulary
      task.tokenizer = tokenizer_lib.load_any(config.tokenizer.path)
    task.prepare_shapes()
    data = None
  else:
    data = task.prepare(pathlib.Path(workdir))
  vocab = task.tokenizer.vocab_size if task.tokenizer is not None else config.tokenizer.vocab_size
  enc_cfg = encoder_config(config, vocab)
  num_steps = config.train.num_steps
  schedule = optim.learning_rate_schedule(config.optim, num_steps)
  tx = optim.make_optimizer(config.optim, num_steps)
  graphdef, param_state = train_state.abstract_model(enc_cfg, config.seed, task.build_model)
  init_fn = train_state.make_init_fn(enc_cfg, tx, config.seed, task.build_model)
  abstract = jax.eval_shape(init_fn)
  shardings = train_state.state_shardings(param_state, abstract, tx, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  row_tokens = int(config.train.seq_len) * task.sequences_per_row
  # The seed key and the metric sums are replicated explicitly so that a topology's devices (not
  # attached in an ahead-of-time compile) receive every array.
  step_fn = train_step.make_step(graphdef, tx, schedule, task.batch_loss, step_sums=task.step_sums,
                                 dropout=enc_cfg.dropout_rate > 0,
                                 grad_accum_steps=config.train.grad_accum_steps,
                                 token_columns=row_tokens, pad_id=task.layout_ids()['pad_id'])

  def step_on_mesh(*args):
    with model.mesh_context(mesh):  # while tracing: splash attention runs per shard
      return step_fn(*args)
  step = jax.jit(step_on_mesh, in_shardings=(shardings, batch_sharding, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=0)
  flops_per_token = flops.train_flops_per_token(enc_cfg, seq_len=config.train.seq_len,
                                                max_predictions=task.flops_max_predictions())
  return Experiment(
      config=config, task=task, data=data, mesh=mesh, enc_cfg=enc_cfg, tx=tx, schedule=schedule,
      graphdef=graphdef, abstract_state=abstract_state, shardings=shardings,
      batch_sharding=batch_sharding, init_state=jax.jit(init_fn, out_shardings=shardings),
      train_step=step, row_width=task.row_width(), row_tokens=row_tokens,
      flops_per_token=flops_per_token)
