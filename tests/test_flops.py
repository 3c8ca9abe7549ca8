"""Tests of mlmjax.flops: analytic FLOPs against the lowered program and XLA's cost analysis, peaks, MFU."""

import dataclasses
import math
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain
from mlmjax import experiment, flops, masking, model, optim, train_state
from mlmjax.tasks import mlm as mlm_task

REPO = pathlib.Path(__file__).resolve().parents[1]

# (layers, hidden, heads, intermediate, vocab, batch, seq_len, max_predictions, pre_layer_norm)
SHAPES = {
    'tiny_preln': (2, 128, 2, 512, 1000, 4, 64, 10, True),
    'mini_postln': (2, 256, 4, 1024, 2000, 2, 128, 20, False),
}


def _encoder(shape) -> tuple[model.EncoderConfig, int, int, int]:
  layers, h, heads, i, v, b, length, p, pre = shape
  cfg = model.EncoderConfig(vocab_size=v, hidden_size=h, num_layers=layers, num_heads=heads,
                            intermediate_size=i, pre_layer_norm=pre, dropout_rate=0.0,
                            attention_dropout_rate=0.0)
  return cfg, b, length, p


def _lowered_forward(cfg, batch, length, p):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model.BertForMLM(cfg, rngs=nnx.Rngs(0))))
  fwd = lambda s, ids, pos: nnx.merge(graphdef, s)(ids, pos)
  return jax.jit(fwd).lower(state, jax.ShapeDtypeStruct((batch, length), jnp.int32),
                            jax.ShapeDtypeStruct((batch, p), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Exact: every dot_general of the lowered (pre-XLA) program, counted as 2 x output x contraction.

_FUNC = re.compile(r'func\.func (?:public |private )?@([\w.$-]+)\(')
_DOT = re.compile(r'stablehlo\.dot_general .*contracting_dims = \[([\d, ]*)\] x .*: '
                  r'\(tensor<([\dx]*)[a-z]\w*>, tensor<[^>]*>\) -> tensor<([\dx]*)[a-z]\w*>')
_CALL = re.compile(r'\bcall @([\w.$-]+)\(')


def stablehlo_matmul_flops(text: str) -> int:
  """Returns 2 * sum(output size x contracted size) over dot_generals reachable from @main."""
  funcs, current = {}, None
  for line in text.splitlines():
    m = _FUNC.search(line)
    if m:
      current = funcs.setdefault(m.group(1), {'flops': 0, 'calls': []})
      continue
    if current is None:
      continue
    m = _DOT.search(line)
    if m:
      dims = lambda s: [int(d) for d in s.split('x') if d]
      lhs, out = dims(m.group(2)), dims(m.group(3))
      contracted = math.prod(lhs[int(k)] for k in m.group(1).split(',') if k.strip())
      current['flops'] += 2 * math.prod(out) * contracted
    else:
      assert 'dot_general' not in line, f'unparsed dot: {line}'
    current['calls'] += _CALL.findall(line)

  def total(name):  # a private function is counted once per call
    return funcs[name]['flops'] + sum(total(c) for c in funcs[name]['calls'])

  return total('main')


@pytest.mark.parametrize('name', sorted(SHAPES))
def test_forward_flops_equal_the_matmuls_of_the_lowered_model(name):
  cfg, b, length, p = _encoder(SHAPES[name])
  counted = stablehlo_matmul_flops(_lowered_forward(cfg, b, length, p).as_text())
  assert counted == flops.forward_flops(cfg, batch=b, seq_len=length, max_predictions=p)


@pytest.fixture(scope='module')
def tiny_train_step():
  """Returns (lowered train step, encoder config, batch, seq_len, max_predictions) of train.py's step."""
  c = pretrain.get_config('tiny_classic')
  c.tokenizer.vocab_size, c.train.seq_len, c.train.batch_size = 1000, 64, 8
  c.model.dropout_rate = 0.0
  vocab, length, batch = 1000, 64, 8
  enc = experiment.encoder_config(c, vocab)
  spec = masking.spec_from_config(c.masking, vocab_size=vocab, seq_len=length)
  tx = optim.make_optimizer(c.optim, 100)
  graphdef, _ = train_state.abstract_model(enc, 0)
  state = jax.eval_shape(train_state.make_init_fn(enc, tx, 0))
  step = mlm_task.make_train_step(graphdef, tx, spec, optim.learning_rate_schedule(c.optim, 100), False)
  lowered = jax.jit(step).lower(state, jax.ShapeDtypeStruct((batch, length), jnp.int32),
                                jax.eval_shape(lambda: jax.random.key(0)))
  return lowered, enc, batch, length, spec.max_predictions


def test_train_step_matmuls_are_three_forwards(tiny_train_step):
  lowered, enc, batch, length, p = tiny_train_step
  # Less the decoder bias's gradient, which model.decoder_logits takes as a (1, B*P) x (B*P, V)
  # product (a bias add, not counted).
  counted = stablehlo_matmul_flops(lowered.as_text()) - 2 * batch * p * enc.padded_vocab_size
  assert counted == flops.train_flops_per_step(enc, batch=batch, seq_len=length, max_predictions=p)
  assert counted == 3 * flops.forward_flops(enc, batch=batch, seq_len=length, max_predictions=p)


# ---------------------------------------------------------------------------------------------
# XLA's cost analysis of the compiled program also counts elementwise work (LayerNorm, exact GELU's
# erf polynomial, softmax exps, bias adds, the loss, AdamW): the analytic count is a lower bound and
# the excess is the non-matmul share. That share falls as ~1/hidden: per token and layer the
# elementwise ops scale with H + I + heads * L, the matmuls with H^2 + L * H. The measured shares
# are in docs/benchmarks.md#mfu.

_TOLERANCE = {128: 0.15, 256: 0.08}


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


def test_xla_cost_analysis_of_the_forward_is_within_the_elementwise_share():
  excess = {}
  for name in sorted(SHAPES):
    cfg, b, length, p = _encoder(SHAPES[name])
    analytic = flops.forward_flops(cfg, batch=b, seq_len=length, max_predictions=p)
    xla = _xla_flops(_lowered_forward(cfg, b, length, p).compile())
    excess[cfg.hidden_size] = xla / analytic - 1.0
    assert 0.0 <= excess[cfg.hidden_size] <= _TOLERANCE[cfg.hidden_size], (name, xla, analytic)
  assert excess[256] < excess[128]


@pytest.mark.slow
def test_xla_cost_analysis_of_the_train_step_is_three_forwards(tiny_train_step):
  lowered, enc, batch, length, p = tiny_train_step
  analytic = flops.train_flops_per_step(enc, batch=batch, seq_len=length, max_predictions=p)
  xla = _xla_flops(lowered.compile())
  assert 0.0 <= xla / analytic - 1.0 <= _TOLERANCE[enc.hidden_size], (xla, analytic)


def test_parts_and_per_token():
  cfg, _, length, p = _encoder(SHAPES['tiny_preln'])
  parts = flops.forward_flops_per_row(cfg, length, p)
  h, n = cfg.hidden_size, cfg.num_layers
  # Every query of the first layer attends to all L keys; the last layer's queries are the P slots.
  assert n == 2 and parts['attention'] == 4 * (length + p) * length * h
  assert parts['projections'] == 2 * 2 * h * h * (2 * length + length + p)
  assert parts['mlp'] == 2 * 2 * h * cfg.intermediate_size * (length + p)
  assert parts['mlm_head'] == p * (2 * h * h + 2 * h * cfg.vocab_size)  # only the P slots
  assert parts['total'] == sum(v for k, v in parts.items() if k != 'total')
  per_token = flops.train_flops_per_token(cfg, seq_len=length, max_predictions=p)
  assert per_token == pytest.approx(3 * parts['total'] / length)
  # Doubling the row length: every query sees twice the keys, and the first layer has twice the
  # queries; the last layer's MLP still runs at the P slots.
  longer = flops.forward_flops_per_row(cfg, 2 * length, p)
  assert longer['attention'] == 4 * (2 * length + p) * (2 * length) * h
  assert longer['mlp'] - parts['mlp'] == pytest.approx(parts['mlp'] * length / (length + p))


@pytest.mark.parametrize('impl', ['cudnn', 'splash'])
def test_fused_attention_counts_the_last_layer_at_every_token(impl):
  cfg, _, length, p = _encoder(SHAPES['tiny_preln'])
  full = flops.forward_flops_per_row(dataclasses.replace(cfg, attention_impl=impl, dtype='bfloat16'),
                                     length, p)
  h, n = cfg.hidden_size, cfg.num_layers
  assert full['attention'] == n * 4 * length * length * h
  assert full['mlp'] == n * length * 2 * 2 * h * cfg.intermediate_size
  # The same count as slots == seq_len, where there is nothing to save.
  assert flops.forward_flops_per_row(cfg, length, length)['mlp'] == full['mlp']


# ---------------------------------------------------------------------------------------------
# Peaks and MFU.


@pytest.mark.parametrize('kind,dtype,expected', [
    ('TPU v4', 'bfloat16', 275e12),
    ('TPU v5 lite', 'bfloat16', 197e12),
    ('TPU v5e', 'float32', 197e12),  # TPUs run f32 dots as bf16 passes at default precision
    ('TPU v5', 'bfloat16', 459e12),  # v5p's device_kind
    ('TPU v5p', 'bfloat16', 459e12),
    ('TPU v6 lite', 'bfloat16', 918e12),
    ('NVIDIA A100-SXM4-40GB', 'bfloat16', 312e12),
    ('NVIDIA A100 80GB PCIe', 'float32', 156e12),  # TF32
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12),
    ('NVIDIA H100 PCIe', 'bfloat16', 756e12),
    ('NVIDIA H200', 'bfloat16', 989e12),
])
def test_peak_table(kind, dtype, expected):
  assert flops.table_peak(kind, dtype)[1] == expected


@pytest.mark.parametrize('kind', ['cpu', 'TPU v4 lite', 'NVIDIA GeForce RTX 4090'])
def test_kinds_outside_the_table(kind):
  assert flops.table_peak(kind) is None


def test_cpu_peak_is_measured_per_host(monkeypatch):
  monkeypatch.delenv(flops.PEAK_ENV, raising=False)
  peak = flops.device_peak('float32')
  assert jax.devices()[0].platform == 'cpu'
  assert peak.units == 1 and 'measured' in peak.source
  # Any CPU that runs these tests does a 1024^3 matmul faster than 1 GFLOP/s, and no CPU reaches
  # 100 TFLOP/s.
  assert 1e9 < peak.flops_per_s < 1e14


def test_a_given_peak_replaces_the_measurement(monkeypatch):
  monkeypatch.setenv(flops.PEAK_ENV, '2.5e11')
  peak = flops.device_peak('float32')
  assert peak.flops_per_s == 2.5e11 and peak.units == 1 and flops.PEAK_ENV in peak.source
  monkeypatch.setenv(flops.PEAK_ENV, 'fast')
  with pytest.raises(ValueError, match=flops.PEAK_ENV):
    flops.device_peak('float32')


def _best_matmul_flops(n: int, reps: int = 5) -> float:
  """Returns the best FLOP/s of a jitted float32 (n, n) @ (n, n) matmul over reps, timed here."""
  a = jnp.asarray(np.random.default_rng(1).standard_normal((n, n), dtype=np.float32))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


@pytest.mark.slow
def test_cpu_peak_is_a_matmul_large_enough_to_use_every_core():
  """A fresh process's peak is at least what a 2048^3 matmul reaches here, not a small one's."""
  code = 'from mlmjax import flops; print(flops.device_peak("float32").flops_per_s)'
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop(flops.PEAK_ENV, None)
  references, peaks = [_best_matmul_flops(2048)], []
  for _ in range(2):
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks.append(float(proc.stdout.split()[-1]))
    references.append(_best_matmul_flops(2048))
  # On some 2-core hosts a 1024^3 matmul reaches ~0.3x of a 2048^3 one (on others as much), in
  # every process. Other processes on the cores slow any one timing by 2x or more while they run:
  # the best of two fresh peaks against the lowest of the three references around them, with 0.8
  # for the ~10% spread of best-of-5 timings, absorbs that and still rejects a 0.3x peak.
  assert max(peaks) >= 0.8 * min(references), (peaks, references)


def test_mfu_arithmetic():
  assert flops.mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
  assert math.isnan(flops.mfu(1000.0, 1e9, 0, 1e12))
