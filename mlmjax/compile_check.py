"""Compile the train step for the configured mesh from abstract shapes; report memory and FLOPs.

  python -m mlmjax.train --config configs/pretrain.py:mini --dry_run
  JAX_PLATFORMS=cpu python -m mlmjax.train --config configs/pretrain.py:base --dry_run --topology v5e:2x2

Nothing is allocated or trained: the state is jax.eval_shape'd with its shardings, the batch is a
ShapeDtypeStruct, and neither the corpus nor the tokenizer is built (tokenizer.vocab_size sizes the
model, or the vocabulary of tokenizer.path when one is set).
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from mlmjax import flops, masking, optim, sharding, train, train_state
from mlmjax import tokenizer as tokenizer_lib


def topology_devices(topology: str) -> list:
  """Returns the devices of a named TPU topology (e.g. 'v5e:2x2'), for ahead-of-time compiles."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform='tpu').devices)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise RuntimeError(
        f"--topology {topology}: compiling for a TPU topology needs libtpu "
        f"(pip install -e '.[tpu]'; on a CPU machine also set JAX_PLATFORMS=cpu) and a name like "
        f"v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2. JAX said: {first}") from None


def _vocab_size(config) -> int:
  """Returns the vocabulary of tokenizer.path when set (cheap to load), else tokenizer.vocab_size."""
  if config.tokenizer.path:
    return tokenizer_lib.load_any(config.tokenizer.path).vocab_size
  return int(config.tokenizer.vocab_size)


def _masking_for_shapes(config, vocab: int, seq_len: int):
  """Returns (spec, rate schedule, tables) as train.run builds them, tables as same-shape stand-ins."""
  steps = config.train.num_steps
  spec = masking.spec_from_config(config.masking, vocab_size=vocab, seq_len=seq_len, num_steps=steps)
  rate_schedule = masking.rate_schedule_from_config(config.masking, steps)
  # The tokenizer's word starts and the corpus's PMI n-grams are not built here; zeros of their
  # shapes compile the same step.
  word_start = pmi = None
  if spec.strategy == 'whole_word' or (spec.strategy == 'span' and spec.span_words):
    word_start = jnp.zeros((vocab,), bool)
  if spec.strategy == 'pmi':
    pmi = jnp.zeros((int(config.masking.pmi_vocab_size),), jnp.uint32)
  tables = masking.MaskingTables(word_start=word_start, pmi_hash1=pmi, pmi_hash2=pmi)
  return spec, rate_schedule, tables


def _bytes_per_device(tree) -> int:
  """Returns the bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return int(total)


def _memory(compiled) -> dict[str, int]:
  """Returns compiled.memory_analysis() as a dict of per-device byte counts (empty if unavailable)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  out = {'argument_bytes': m.argument_size_in_bytes, 'output_bytes': m.output_size_in_bytes,
         'alias_bytes': m.alias_size_in_bytes, 'temp_bytes': m.temp_size_in_bytes,
         'generated_code_bytes': m.generated_code_size_in_bytes}
  out = {k: int(v) for k, v in out.items()}
  # Donated state aliases its outputs, so live bytes are arguments + outputs - aliased + temporaries.
  out['peak_estimate_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes']
                                + out['temp_bytes'])
  return out


def compile_report(config, *, topology: str = '') -> dict:
  """Returns per-device memory, FLOPs and the mesh of the configured train step, compiled AOT."""
  t0 = time.perf_counter()
  train.validate_config(config)
  devices = topology_devices(topology) if topology else jax.devices()
  mesh = sharding.make_mesh(config.mesh, devices)
  dp = sharding.data_parallel_size(mesh)
  batch, seq_len = int(config.train.batch_size), int(config.train.seq_len)
  if batch % dp:
    raise ValueError(f'train.batch_size={batch} must be divisible by the {dp} data-parallel '
                     'devices of mesh.shape')
  vocab = _vocab_size(config)
  enc_cfg = train_state.encoder_config_from(config, vocab)
  spec, rate_schedule, tables = _masking_for_shapes(config, vocab, seq_len)
  schedule = optim.learning_rate_schedule(config.optim, config.train.num_steps)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)

  graphdef, param_state = train_state.abstract_model(enc_cfg, config.seed)
  init_fn = train_state.make_init_fn(enc_cfg, tx, config.seed)
  abstract_state = jax.eval_shape(init_fn)
  shardings = train_state.state_shardings(param_state, abstract_state, tx, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract_state, shardings)
  data_spec = sharding.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=data_spec)
  key_type = jax.eval_shape(lambda: jax.random.key(0))
  seed_key = jax.ShapeDtypeStruct(key_type.shape, key_type.dtype, sharding=sharding.replicated(mesh))
  # The same step train.run jits; the key and the metric sums are replicated explicitly so that a
  # topology's devices (not attached here) receive every array.
  step = jax.jit(
      train.make_train_step(graphdef, tx, spec, schedule, config.model.dropout_rate > 0,
                            rate_schedule=rate_schedule, tables=tables,
                            grad_accum_steps=int(config.train.get('grad_accum_steps', 1))),
      in_shardings=(shardings, data_spec, sharding.replicated(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  t_lower = time.perf_counter()
  lowered = step.lower(state, tokens, seed_key)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t_lower

  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
  n_dev = len(devices)
  analytic = flops.train_flops_per_step(enc_cfg, batch=batch, seq_len=seq_len,
                                        max_predictions=spec.max_predictions)
  return {
      'platform': devices[0].platform, 'device_kind': devices[0].device_kind,
      'topology': topology or None, 'num_devices': n_dev, 'mesh': dict(mesh.shape),
      'model': {'layers': enc_cfg.num_layers, 'hidden': enc_cfg.hidden_size,
                'heads': enc_cfg.num_heads, 'intermediate': enc_cfg.intermediate_size,
                'vocab': vocab, 'dtype': enc_cfg.dtype},
      'batch_size': batch, 'seq_len': seq_len, 'max_predictions': spec.max_predictions,
      'num_params': sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state['params'])),
      'params_bytes_per_device': _bytes_per_device(state['params']),
      'opt_state_bytes_per_device': _bytes_per_device(state['opt_state']),
      'memory_per_device': _memory(compiled),
      'xla_flops_per_device': xla_flops,
      'xla_flops_per_step': xla_flops * n_dev,
      'analytic_flops_per_step': analytic,
      'analytic_flops_per_token': analytic / (batch * seq_len),
      'compile_s': compile_s, 'total_s': time.perf_counter() - t0,
  }


def _mib(b: float) -> str:
  return f'{b / 2**20:10.2f} MiB'


def format_report(r: dict) -> str:
  """Returns the human-readable compile-check report."""
  m = r['model']
  where = f"topology {r['topology']} " if r['topology'] else ''
  lines = [
      f"compile check: {where}{r['num_devices']} x {r['device_kind']} ({r['platform']}), "
      f"mesh {r['mesh']}",
      f"model: {m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads, intermediate "
      f"{m['intermediate']}, vocab {m['vocab']}, {m['dtype']}; {r['num_params'] / 1e6:.2f} M params",
      f"step: batch {r['batch_size']} x {r['seq_len']} tokens, {r['max_predictions']} prediction "
      f"slots per row; compiled in {r['compile_s']:.1f} s",
      'per device, from the shardings:',
      f"  parameters (float32)           {_mib(r['params_bytes_per_device'])}",
      f"  optimizer state                {_mib(r['opt_state_bytes_per_device'])}",
  ]
  mem = r['memory_per_device']
  if mem:
    lines += [
        "per device, from XLA's memory analysis of the compiled step:",
        f"  arguments (state + batch)      {_mib(mem['argument_bytes'])}",
        f"  outputs (state + metrics)      {_mib(mem['output_bytes'])}",
        f"  aliased (donated state)        {_mib(mem['alias_bytes'])}",
        f"  temporaries (activations...)   {_mib(mem['temp_bytes'])}",
        f"  generated code                 {_mib(mem['generated_code_bytes'])}",
        f"  peak estimate (args + out - aliased + temp) {_mib(mem['peak_estimate_bytes']).strip()}",
    ]
  else:
    lines.append("XLA's memory analysis is not available on this backend")
  ratio = r['xla_flops_per_step'] / r['analytic_flops_per_step']
  lines += [
      'FLOPs per step:',
      f"  XLA cost analysis  {r['xla_flops_per_device']:.4g} per device x {r['num_devices']} = "
      f"{r['xla_flops_per_step']:.4g}",
      f"  analytic (matmuls, 3x forward) {r['analytic_flops_per_step']:.4g} "
      f"({r['analytic_flops_per_token']:.4g} per token); XLA / analytic = {ratio:.3f}",
  ]
  return '\n'.join(lines)
