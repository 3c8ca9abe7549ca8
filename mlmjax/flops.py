"""Analytic FLOPs of the encoder's train step, accelerator peak FLOP/s, and model FLOPs utilization.

What is counted: matrix multiplies only, 2 FLOPs per multiply-add, as in the PaLM/Chinchilla MFU
convention. Per packed row of L tokens, hidden H, MLP width I, vocabulary V, P prediction slots:
  per layer and token  q, k, v, output projections  4 * 2H^2
                       scores Q K^T and mix A V      2 * 2LH   (bidirectional: all L x L, padding too;
                                                     a sliding-window layer: min(L, W + 1) keys)
                       MLP in and out                2 * 2HI   (gated MLPs: 3 * 2HI)
  MLM head, per slot   transform dense 2H^2 + decoder to the vocabulary 2HV (only at the P slots)
The last layer's outputs are needed only at the P slots (model.Encoder's query_index): there its
keys and values cover all L tokens (2 * 2H^2 per token) while its queries, output projection, scores
and MLP cover the P slots only. A cuDNN or splash run computes the last layer at every token.
Embedding lookups, LayerNorm, GELU, softmax, bias adds, dropout, the loss and the optimizer are not
counted (XLA's cost analysis counts them; tests/test_flops.py bounds the gap). A train step is 3x
the forward: the backward pass multiplies by the weights and by the activations, 2 matmuls per
forward matmul (both operands of Q K^T and A V are activations, and every layer's input needs its
gradient because the embeddings below it train). No rematerialization is counted (model FLOPs).
"""

import functools
import os
import time
from typing import NamedTuple

import jax
import numpy as np


def forward_flops_per_row(cfg, seq_len: int, max_predictions: int) -> dict[str, float]:
  """Returns the forward matmul FLOPs of one packed row by part, with 'total'.

  cfg: a model.EncoderConfig (hidden_size, intermediate_size, num_layers, vocab_size).
  """
  h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  v = getattr(cfg, 'padded_vocab_size', cfg.vocab_size)  # the decoder's rows, padding included
  length, p = int(seq_len), int(max_predictions)
  window = getattr(cfg, 'local_window', 0)
  keys = [min(length, window + 1) if window and cfg.is_local(j) else length for j in range(n)]
  queries = [length] * n
  if hasattr(cfg, 'sparse_last_layer') and cfg.sparse_last_layer(length, p):
    queries[-1] = p
  mlp_matmuls = 2 if getattr(cfg, 'mlp_type', 'gelu') == 'gelu' else 3
  parts = {
      'projections': sum((length + q) * 2 * 2 * h * h for q in queries),
      'attention': sum(q * 2 * 2 * k * h for q, k in zip(queries, keys)),
      'mlp': sum(queries) * mlp_matmuls * 2 * h * i,
      'mlm_head': p * (2 * h * h + 2 * h * v),
  }
  parts = {k: float(val) for k, val in parts.items()}
  parts['total'] = sum(parts.values())
  return parts


def forward_flops(cfg, *, batch: int, seq_len: int, max_predictions: int) -> float:
  """Returns the forward matmul FLOPs of a (batch, seq_len) batch with max_predictions slots per row."""
  return batch * forward_flops_per_row(cfg, seq_len, max_predictions)['total']


def train_flops_per_step(cfg, *, batch: int, seq_len: int, max_predictions: int) -> float:
  """Returns the matmul FLOPs of one train step (forward + backward = 3x forward)."""
  return 3.0 * forward_flops(cfg, batch=batch, seq_len=seq_len, max_predictions=max_predictions)


def train_flops_per_token(cfg, *, seq_len: int, max_predictions: int) -> float:
  """Returns train-step matmul FLOPs per token slot (padding included, as tokens/s counts them)."""
  return 3.0 * forward_flops_per_row(cfg, seq_len, max_predictions)['total'] / seq_len


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s per device.

# (device_kind substring, lowercase; name, bf16 peak, float32 peak), dense (no sparsity), per chip.
# First match wins, so longer names come before their prefixes ('tpu v5 lite' before 'tpu v5').
# float32 at JAX's default matmul precision: TPUs run f32 dots as one bf16 pass (so the bf16 peak),
# Ampere/Hopper GPUs as TF32 (A100 156e12, H100 SXM 494.7e12). With
# jax_default_matmul_precision='highest' the real f32 peak is far lower (A100 19.5e12): MFU then
# reads low by that factor.
PEAK_FLOPS = (
    ('tpu v4 lite', 'TPU v4i', None, None),  # inference chip: no published training peak here
    ('tpu v4', 'TPU v4', 275e12, 275e12),
    ('tpu v5 lite', 'TPU v5e', 197e12, 197e12),
    ('tpu v5e', 'TPU v5e', 197e12, 197e12),
    ('tpu v5p', 'TPU v5p', 459e12, 459e12),
    ('tpu v5', 'TPU v5p', 459e12, 459e12),  # v5p reports device_kind 'TPU v5'
    ('tpu v6 lite', 'TPU v6e', 918e12, 918e12),
    ('tpu v6e', 'TPU v6e', 918e12, 918e12),
    ('a100', 'A100', 312e12, 156e12),
    ('h100 pcie', 'H100 PCIe', 756e12, 378e12),
    ('h100 nvl', 'H100 NVL', 835e12, 417.5e12),
    ('h100', 'H100 SXM', 989e12, 494.7e12),
    ('h200', 'H200', 989e12, 494.7e12),
)


class Peak(NamedTuple):
  """Peak FLOP/s of one unit, how many units the run uses, and where the number comes from."""
  flops_per_s: float
  units: int  # devices from the table; hosts (processes) when measured on CPU
  source: str


def table_peak(device_kind: str, dtype: str = 'bfloat16') -> tuple[str, float] | None:
  """Returns (name, peak FLOP/s per device) for a jax device_kind, or None when not in the table."""
  kind = device_kind.lower()
  for pattern, name, bf16, fp32 in PEAK_FLOPS:
    if pattern in kind:
      peak = bf16 if dtype == 'bfloat16' else fp32
      return None if peak is None else (name, peak)
  return None


# Square float32 matmul sizes for a CPU peak. Hosts differ in which size is fastest: on one 2-core
# host a 1024^3 matmul reached ~80 GFLOP/s and 2048^3-4096^3 270-300 (the small one leaves cores
# idle); on another (AMD EPYC) every size reached about the same 180-210. The best over the sizes
# is right on both; 3072 is the largest that keeps the measurement under ~2 s on 2 cores.
PEAK_MATMUL_SIZES = (1024, 2048, 3072)
PEAK_ENV = 'MLMJAX_PEAK_FLOPS'  # a peak FLOP/s per device that replaces the table and the measurement


@functools.lru_cache(maxsize=None)
def measure_matmul_flops(n: int = 1024, reps: int = 5, device=None) -> float:
  """Returns the best FLOP/s of a jitted float32 (n, n) @ (n, n) matmul over `reps` timed runs."""
  device = device or jax.local_devices()[0]
  a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32), device)
  f = jax.jit(lambda x: x @ x).lower(a).compile()  # compiled ahead: no untimed warm-up run
  best = float('inf')
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


@functools.lru_cache(maxsize=None)
def measure_peak_flops(device=None) -> float:
  """Returns the best float32 matmul FLOP/s over PEAK_MATMUL_SIZES (1.5-2 s on 2 CPU cores)."""
  return max(measure_matmul_flops(n, reps, device) for n, reps in zip(PEAK_MATMUL_SIZES, (5, 4, 2)))


def device_peak(dtype: str = 'float32', devices=None) -> Peak:
  """Returns the Peak for the run's devices: the table, else a measured matmul per host."""
  devices = jax.devices() if devices is None else devices
  kind = devices[0].device_kind
  given = os.environ.get(PEAK_ENV)
  if given:
    try:
      return Peak(float(given), len(devices), f'{PEAK_ENV}={given} FLOP/s per device')
    except ValueError:
      raise ValueError(f'{PEAK_ENV}={given!r} is not a number of FLOP/s') from None
  hit = table_peak(kind, dtype)
  if hit is not None:
    return Peak(hit[1], len(devices), f'{hit[0]} {dtype} peak (table)')
  # Forced host devices (--xla_force_host_platform_device_count) share one host's cores, so the
  # measured peak is per host: MFU divides by the processes, not by the devices.
  hosts = len({d.process_index for d in devices})
  sizes = f'n={PEAK_MATMUL_SIZES[0]}..{PEAK_MATMUL_SIZES[-1]}'
  return Peak(measure_peak_flops(), hosts, f'{kind}: measured, best float32 n^3 matmul over '
              f'{sizes}, per host (not in the table)')


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float) -> float:
  """Returns model FLOPs utilization: achieved FLOP/s over n_devices x peak FLOP/s."""
  if n_devices <= 0 or peak <= 0:
    return float('nan')
  return tokens_per_s * flops_per_token / (n_devices * peak)


class Meter:
  """Tokens/s, step time, MFU and ETA of the steps counted since the last reset."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, dtype: str = 'float32'):
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak = device_peak(dtype)
    self.reset()

  def describe(self) -> str:
    """Returns what MFU is measured against, for the log."""
    return (f'MFU counts {self.flops_per_token / 1e6:.2f} MFLOPs per token against '
            f'{self.peak.units} x {self.peak.flops_per_s / 1e12:.3g} TFLOP/s ({self.peak.source})')

  def reset(self) -> None:
    """Restarts the clock (after evaluations and saves, which are not training throughput)."""
    self.t0, self.steps = time.perf_counter(), 0

  def record(self, steps_left: int) -> dict[str, float]:
    """Returns train/tokens_per_s, train/step_time_s, train/mfu and eta_s of the current window."""
    dt = time.perf_counter() - self.t0
    tokens_per_s = self.tokens_per_step * self.steps / dt
    return {'train/tokens_per_s': tokens_per_s, 'train/step_time_s': dt / self.steps,
            'train/mfu': mfu(tokens_per_s, self.flops_per_token, self.peak.units,
                             self.peak.flops_per_s),
            'eta_s': steps_left * dt / self.steps}
