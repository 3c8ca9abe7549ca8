"""Compile the train step for the configured mesh from abstract shapes; report memory and FLOPs.

  python -m mlmjax.train --config configs/pretrain.py:mini --dry_run
  JAX_PLATFORMS=cpu python -m mlmjax.train --config configs/pretrain.py:base --dry_run --topology v5e:2x2

The step is experiment.setup's, set up from shapes alone, so it is the step train.run runs, for
every task. Nothing is allocated or trained: the state is jax.eval_shape'd with its shardings, the
batch is a ShapeDtypeStruct of the task's row width, and neither the corpus nor the tokenizer is
built (tokenizer.vocab_size sizes the model, or the vocabulary of tokenizer.path when one is set;
classify and tag read only their label names from task_data.path).
"""

import math
import time

import jax
import numpy as np

from mlmjax import adapt as adapt_lib
from mlmjax import experiment, sharding, train_state


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


def compile_report(config, *, topology: str = '', explicit=None) -> dict:
  """Returns per-device memory, FLOPs and the mesh of the configured task's train step, compiled AOT.

  explicit: the keys set on the command line; given, defaults that do not fit the budget are
  adapted and init_from's model adopted as a run would (adapt.Adaptations), else they are errors.
  """
  t0 = time.perf_counter()
  devices = topology_devices(topology) if topology else jax.devices()
  mesh = sharding.make_mesh(config.mesh, devices)
  adapt = None if explicit is None else adapt_lib.Adaptations(explicit, log=print)
  init_run = train_state.init_source(config.init_from) if config.init_from and adapt else None
  exp = experiment.setup(config, None, mesh, log=lambda _: None, adapt=adapt, init_run=init_run)
  rows, seed_key = exp.abstract_batch()
  t_lower = time.perf_counter()
  compiled = exp.train_step.lower(exp.abstract_state, rows, seed_key).compile()
  compile_s = time.perf_counter() - t_lower
  # Pallas kernels compiled for a TPU (Mosaic) appear as custom calls; interpreted ones would not.
  tpu_kernels = (compiled.as_text().count('custom_call_target="tpu_custom_call"')
                 if devices[0].platform == 'tpu' else 0)

  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
  n_dev = len(devices)
  batch, seq_len = int(config.train.batch_size), int(config.train.seq_len)
  slots = exp.task.flops_max_predictions()
  analytic = exp.flops_per_token * batch * seq_len * exp.task.sequences_per_row
  enc = exp.enc_cfg
  return {
      'platform': devices[0].platform, 'device_kind': devices[0].device_kind,
      'topology': topology or None, 'num_devices': n_dev, 'mesh': dict(mesh.shape),
      'task': exp.task.name,
      'model': {'layers': enc.num_layers, 'hidden': enc.hidden_size, 'heads': enc.num_heads,
                'intermediate': enc.intermediate_size, 'vocab': enc.vocab_size, 'dtype': enc.dtype},
      'batch_size': batch, 'seq_len': seq_len, 'row_width': exp.row_width, 'max_predictions': slots,
      'num_params': exp.num_params,
      'params_bytes_per_device': _bytes_per_device(exp.abstract_state['params']),
      'opt_state_bytes_per_device': _bytes_per_device(exp.abstract_state['opt_state']),
      'batch_bytes_per_device': _bytes_per_device(rows),
      'memory_per_device': _memory(compiled),
      'xla_flops_per_device': xla_flops,
      'xla_flops_per_step': xla_flops * n_dev,
      'analytic_flops_per_step': analytic,
      'analytic_flops_per_token': exp.flops_per_token,
      'tpu_kernels': tpu_kernels, 'compile_s': compile_s, 'total_s': time.perf_counter() - t0,
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
      f"step ({r['task']}): batch {r['batch_size']} rows of {r['row_width']} columns "
      f"(seq_len {r['seq_len']}), {r['max_predictions']} prediction slots per row; compiled in "
      f"{r['compile_s']:.1f} s" + (f"; {r['tpu_kernels']} Pallas TPU kernel calls (Mosaic)"
                                   if r['tpu_kernels'] else ''),
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
