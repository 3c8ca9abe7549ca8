"""Prints train-step throughput (tokens/s, step time, MFU) with masking included, masking's share,
and memory: XLA's per-device estimate of the compiled step and the peak resident memory of this
process, measured in the same run.

  python benchmarks/throughput.py --config tiny            # or mini, small, base
  python benchmarks/throughput.py --config mini --steps 20 --batch_size 32 --dtype bfloat16

Batches are synthetic packed rows ([CLS] ... [SEP] units of random regular ids, PAD tails) so the
number measures the step, not the input pipeline; the step is experiment.setup's, which train.run
jits.
"""

import argparse
import os
import resource
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from configs import pretrain  # pylint: disable=g-import-not-at-top
from mlmjax import experiment, flops, masking, sharding
from mlmjax import tokenizer as tok


def synthetic_rows(rng: np.random.Generator, batch: int, seq_len: int, vocab: int) -> np.ndarray:
  """Returns (batch, seq_len) packed rows: 1-3 units per row and a short PAD tail."""
  rows = np.zeros((batch, seq_len), np.int32)
  for r in range(batch):
    used = 0
    end = seq_len - int(rng.integers(0, seq_len // 10 + 1))
    while end - used >= 10:
      n = int(min(end - used - 2, rng.integers(8, seq_len)))
      rows[r, used] = tok.CLS_ID
      rows[r, used + 1:used + 1 + n] = rng.integers(tok.NUM_SPECIAL, vocab, n)
      rows[r, used + 1 + n] = tok.SEP_ID
      used += n + 2
  return rows


def time_fn(fn, args_fn, steps: int) -> float:
  """Returns the median seconds per call of fn after two warm-up calls."""
  out = None
  for _ in range(2):
    out = fn(*args_fn())
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    a = args_fn()
    t = time.perf_counter()
    jax.block_until_ready(fn(*a))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main() -> None:
  """Parses flags, builds the configured step and prints its measured throughput."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='tiny', help='size variant of configs/pretrain.py')
  p.add_argument('--steps', type=int, default=20, help='timed steps (after 2 warm-up steps)')
  p.add_argument('--batch_size', type=int, default=0, help='override train.batch_size')
  p.add_argument('--seq_len', type=int, default=0, help='override train.seq_len')
  p.add_argument('--dtype', default='', help="override model.dtype ('float32' or 'bfloat16')")
  p.add_argument('--grad_accum_steps', type=int, default=1, help='override train.grad_accum_steps')
  p.add_argument('--remat', default='', help="override model.remat ('full', 'dots', 'dots_no_batch')")
  p.add_argument('--max_position', type=int, default=0,
                 help='override model.max_position (learned positions beyond 512 tokens)')
  p.add_argument('--attention_impl', default='', help="override model.attention_impl ('xla', 'cudnn', 'reference', 'splash')")
  args = p.parse_args()

  config = pretrain.get_config(args.config)
  with config.unlocked():
    if args.batch_size:
      config.train.batch_size = args.batch_size
    if args.seq_len:
      config.train.seq_len = args.seq_len
    if args.dtype:
      config.model.dtype = args.dtype
    config.train.grad_accum_steps = args.grad_accum_steps
    config.model.remat = args.remat
    config.model.attention_impl = args.attention_impl
    if args.max_position:
      config.model.max_position = args.max_position
  b, l, vocab = config.train.batch_size, config.train.seq_len, config.tokenizer.vocab_size
  mesh = sharding.make_mesh(config.mesh)
  exp = experiment.setup(config, None, mesh)  # the step train.run runs, from shapes
  enc_cfg, spec, step = exp.enc_cfg, exp.task.spec, exp.train_step
  state = exp.init_state()
  n_params = exp.num_params
  mask_only = jax.jit(lambda key, t: masking.mask_tokens(key, t, spec))
  rng = np.random.default_rng(0)
  pool = [sharding.global_batch(synthetic_rows(rng, b, l, vocab), mesh) for _ in range(4)]
  key = jax.random.key(0)
  holder = {'state': state, 'i': 0}

  def step_args():
    holder['i'] += 1
    return holder['state'], pool[holder['i'] % len(pool)], key

  def step_fn(s, batch, k):
    holder['state'], sums = step(s, batch, k)
    return sums

  compiled = step.lower(*step_args()).compile()
  mem = compiled.memory_analysis()
  t_step = time_fn(step_fn, step_args, args.steps)
  t_mask = time_fn(mask_only, lambda: (jax.random.fold_in(key, holder['i']), pool[0]), args.steps)
  dev = jax.devices()[0]
  print(f'config {args.config}: {enc_cfg.num_layers} layers, hidden {enc_cfg.hidden_size}, '
        f'{n_params / 1e6:.2f} M params, vocab {vocab}, batch {b} x {l}, {config.model.dtype}, '
        f'max_predictions {spec.max_predictions}')
  print(f'device {dev.platform} ({dev.device_kind}) x {jax.device_count()}, mesh {dict(mesh.shape)}, '
        f'attention {config.model.attention_impl or "XLA chooses"}, remat {config.model.remat or "none"}, '
        f'grad_accum {args.grad_accum_steps}')
  print(f'step time        {t_step * 1e3:9.2f} ms  (median of {args.steps})')
  print(f'tokens/s         {b * l / t_step:9.0f}')
  print(f'masking alone    {t_mask * 1e3:9.3f} ms  = {100 * t_mask / t_step:.2f}% of the step')
  fpt = exp.flops_per_token
  peak = flops.device_peak(config.model.dtype)
  util = flops.mfu(b * l / t_step, fpt, peak.units, peak.flops_per_s)
  print(f'MFU              {100 * util:9.2f} %  ({fpt:.3e} train FLOPs/token; peak {peak.flops_per_s:.3e} '
        f'FLOP/s x {peak.units}: {peak.source})')
  if mem is not None:
    print(f'XLA memory/dev   {mem.temp_size_in_bytes / 2**20:9.1f} MiB temporaries, '
          f'{mem.argument_size_in_bytes / 2**20:.1f} MiB arguments')
  stats = dev.memory_stats() or {}  # accelerators report their allocator's peak; CPU reports none
  if 'peak_bytes_in_use' in stats:
    print(f'device peak      {stats["peak_bytes_in_use"] / 2**20:9.1f} MiB ({dev.device_kind}, allocator)')
  # ru_maxrss is KiB on Linux: the peak of this whole process (state, batches, step, XLA runtime).
  print(f'peak RSS         {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:9.1f} MiB (this process)')


if __name__ == '__main__':
  main()
