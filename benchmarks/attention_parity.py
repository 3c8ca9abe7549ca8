"""Prints how far each fused attention path's loss and gradients are from the dense reference's.

  python benchmarks/attention_parity.py                  # the paths this backend has
  python benchmarks/attention_parity.py --splash         # on CPU, also Pallas splash (interpreted, slow)

For `base` (BERT) and `modern_base` (ModernBERT: rotary, gated MLP, local and global layers) at a
reduced width and depth, the MLM loss and every parameter's gradient on packed rows (several units
and a PAD tail per row) are computed with `model.attention_impl='reference'` (the dense mask) and
with each fused path of the backend: cuDNN and XLA's choice on a GPU, splash on a TPU, XLA on a
CPU. Both sides run in --dtype (default: bfloat16 on an accelerator, as cuDNN needs; float32 on a
CPU). The tests check the CPU paths (tests/test_model*.py); this script checks the accelerator's.
Exits 1 if a path is further than --tol (relative) from the reference.
"""

import argparse
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention_sweep  # pylint: disable=g-import-not-at-top
import throughput
from configs import pretrain
from mlmjax import model as M

SMALL = dict(hidden_size=256, num_layers=3, num_heads=4, intermediate_size=512)


def paths(backend: str, config: str, splash: bool) -> list[str]:
  """Returns the fused attention_impl values to check on this backend."""
  if backend == 'gpu':
    return ['cudnn', 'xla'] if attention_sweep.fused_path(config) == 'cudnn' else ['xla']
  if backend == 'tpu':
    return ['splash', 'xla']
  return ['xla', 'splash'] if splash else ['xla']


def encoder_config(name: str, impl: str, dtype: str, vocab: int, seq_len: int) -> M.EncoderConfig:
  """Returns the named config's encoder at SMALL's shape, without dropout."""
  fields = {**pretrain.get_config(name).model, **SMALL, 'size': 'custom', 'dtype': dtype,
            'attention_impl': impl, 'dropout_rate': 0.0, 'attention_dropout_rate': 0.0,
            'max_position': max(512, seq_len)}
  return M.EncoderConfig(vocab_size=vocab, **fields)


def loss_and_grads(config: M.EncoderConfig, params, tokens, slots, labels):
  """Returns (mean NLL at the slots, gradients) of the model with these parameters."""
  graphdef = nnx.split(nnx.eval_shape(lambda: M.BertForMLM(config, rngs=nnx.Rngs(0))))[0]

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens, slots)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), labels[..., None],
                               axis=-1)
    return nll.mean()
  return jax.jit(jax.value_and_grad(loss))(params)


def relative_gaps(got, want) -> tuple[float, float]:
  """Returns (|loss difference| / |loss|, the largest per-parameter ||g - g_ref|| / ||g_ref||).

  A parameter's norm is floored at 1e-3 of the whole gradient's: some gradients are zero up to
  rounding (a key bias shifts every logit of a query's row equally), so their ratio means nothing.
  """
  loss_gap = abs(float(got[0]) - float(want[0])) / abs(float(want[0]))
  pairs = [(np.asarray(g, np.float64), np.asarray(w, np.float64))
           for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]))]
  floor = 1e-3 * np.sqrt(sum(np.sum(w * w) for _, w in pairs))
  grad_gap = max(float(np.linalg.norm(g - w) / max(np.linalg.norm(w), floor)) for g, w in pairs)
  return loss_gap, grad_gap


def main() -> int:
  """Parses flags, runs every check and prints one Markdown table; returns the exit status."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--configs', nargs='+', default=['base', 'modern_base'])
  p.add_argument('--seq_len', type=int, default=512)
  p.add_argument('--batch_size', type=int, default=4)
  p.add_argument('--dtype', default='', help='default: bfloat16 on an accelerator, float32 on a CPU')
  p.add_argument('--tol', type=float, default=0.0,
                 help='largest relative gap allowed; default 3e-2 in bfloat16, 1e-4 in float32')
  p.add_argument('--splash', action='store_true', help='on a CPU, also run splash interpreted')
  args = p.parse_args()
  backend = jax.default_backend()
  dtype = args.dtype or ('float32' if backend == 'cpu' else 'bfloat16')
  tol = args.tol or (1e-4 if dtype == 'float32' else 3e-2)
  vocab = 1000
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(throughput.synthetic_rows(rng, args.batch_size, args.seq_len, vocab))
  # Slots at real tokens only: a padding position's output differs between paths by design.
  real = np.asarray(tokens) > 0
  slots = jnp.asarray(np.stack([np.sort(rng.choice(np.flatnonzero(r), 32, replace=False))
                                for r in real]))
  labels = jnp.asarray(rng.integers(5, vocab, slots.shape))
  print(f'backend {backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}, {dtype}, '
        f'{args.batch_size} x {args.seq_len} packed rows, {SMALL}, tolerance {tol:g}\n')
  print('| config | attention | loss | loss gap | largest gradient gap | within tolerance |')
  print('|---|---|---:|---:|---:|---|')
  failed = False
  for name in args.configs:
    reference = encoder_config(name, 'reference', dtype, vocab, args.seq_len)
    params = nnx.split(M.BertForMLM(reference, rngs=nnx.Rngs(1)))[1]
    want = loss_and_grads(reference, params, tokens, slots, labels)
    print(f'| {name} | reference | {float(want[0]):.6f} | | | |', flush=True)
    for impl in paths(backend, name, args.splash):
      try:
        got = loss_and_grads(encoder_config(name, impl, dtype, vocab, args.seq_len), params,
                             tokens, slots, labels)
      except Exception as e:  # pylint: disable=broad-except
        failed = True
        print(f'| {name} | {impl} | error: {type(e).__name__}: {str(e).splitlines()[0][:100]} | | | no |',
              flush=True)
        continue
      loss_gap, grad_gap = relative_gaps(got, want)
      ok = max(loss_gap, grad_gap) <= tol
      failed |= not ok
      print(f'| {name} | {impl} | {float(got[0]):.6f} | {loss_gap:.2e} | {grad_gap:.2e} | '
            f'{"yes" if ok else "no"} |', flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
