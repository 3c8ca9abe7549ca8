"""Times HF's FlaxBertForMaskedLM trained as in its run_mlm_flax.py, beside our `mini` train step.

  python3 -m venv .venv-hf
  .venv-hf/bin/pip install 'transformers<5' flax==0.12.8 jax==0.10.2 jaxlib==0.10.2 optax==0.2.8
  .venv-hf/bin/python benchmarks/hf_flax_baseline.py --steps 20 --ours

transformers 5 dropped its Flax models, so the baseline has its own venv (.venv-hf, gitignored).
Checked with transformers 4.57.6, flax 0.12.8, jax/jaxlib 0.10.2, optax 0.2.8, numpy 2.4.6 (the jax
and flax of .venv): FlaxBertForMaskedLM imports, trains and compiles on them.

The model has the `mini` shape (4 layers, hidden 256, 4 heads, intermediate 1024, vocabulary 32,000,
512 positions, dropout 0.1 as `mini`). The step follows run_mlm_flax.py: the MLM head over every
position (dense (B, L, V) logits), softmax cross-entropy against one-hot labels weighted by
labels > 0 (only masked positions carry a label), summed and divided by the number of labels, AdamW
with a linear warmup/decay schedule and no decay on biases and LayerNorm, one jitted step that
donates the train state. run_mlm_flax.py pmaps the step over the local devices; on one device its
psums are identities, so jax.jit is the same computation. Its masking (15%, 80/10/10) runs on the
host in numpy inside the data collator: here the batches are masked once up front and the timed
step excludes masking, while ours includes masking on the device; the comparison favours HF.

--ours then runs `.venv/bin/python benchmarks/throughput.py --config mini --steps N` (our step,
same shapes, masking included) right after, and prints both numbers and their ratio. On a shared
machine use --rounds 2 (or 4): the two alternate A B B A ..., so a load that drifts during the run
weighs on both alike, and the ratio of the medians over rounds is printed.
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

REPO = pathlib.Path(__file__).resolve().parents[1]
MASK_ID, FIRST_REGULAR = 4, 5  # ids below 5 are special in mlmjax's vocabularies; the same here


def masked_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab: int) -> dict:
  """Returns one host-masked batch as the Flax MLM collator makes it: 15% selected, 80/10/10."""
  ids = rng.integers(FIRST_REGULAR, vocab, (batch, seq_len)).astype(np.int32)
  selected = rng.random(ids.shape) < 0.15
  labels = np.where(selected, ids, 0).astype(np.int32)  # 0: not predicted (label weight 0)
  draw = rng.random(ids.shape)
  inputs = np.where(selected & (draw < 0.8), MASK_ID, ids)
  random_ids = rng.integers(FIRST_REGULAR, vocab, ids.shape)
  inputs = np.where(selected & (draw >= 0.8) & (draw < 0.9), random_ids, inputs).astype(np.int32)
  return {'input_ids': inputs, 'attention_mask': np.ones_like(inputs),
          'token_type_ids': np.zeros_like(inputs), 'labels': labels}


def no_decay_mask(params) -> dict:
  """Returns True for parameters that take weight decay: not biases, not LayerNorm scales."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(params)
  mask = {path: path[-1] != 'bias' and not any('layernorm' in p.lower() for p in path)
          for path in flat}
  return traverse_util.unflatten_dict(mask)


def build(args):
  """Returns (train_step, state, dropout_rng, num_params) for the HF model and optimizer."""
  from flax.training import common_utils, train_state  # pylint: disable=g-import-not-at-top
  from transformers import BertConfig, FlaxBertForMaskedLM  # pylint: disable=g-import-not-at-top
  config = BertConfig(vocab_size=args.vocab_size, hidden_size=256, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=1024, max_position_embeddings=512,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  model = FlaxBertForMaskedLM(config, seed=0, dtype=jnp.float32)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, 1e-3, 2000), optax.linear_schedule(1e-3, 0.0, 98_000)], [2000])
  tx = optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, mask=no_decay_mask)
  state = train_state.TrainState.create(apply_fn=model.__call__, params=model.params, tx=tx)

  def train_step(state, batch, dropout_rng):
    dropout_rng, next_rng = jax.random.split(dropout_rng)
    labels = batch['labels']
    inputs = {k: v for k, v in batch.items() if k != 'labels'}

    def loss_fn(params):
      logits = state.apply_fn(**inputs, params=params, dropout_rng=dropout_rng, train=True)[0]
      weights = jnp.where(labels > 0, 1.0, 0.0)
      loss = optax.softmax_cross_entropy(logits, common_utils.onehot(labels, logits.shape[-1]))
      return (loss * weights).sum(), weights.sum()

    (loss, num_labels), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.tree.map(lambda g: g / num_labels, grads)
    return state.apply_gradients(grads=grads), {'loss': loss / num_labels}, next_rng

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return jax.jit(train_step, donate_argnums=(0,)), state, jax.random.key(0), n_params


def time_hf(args) -> float:
  """Returns the median seconds per HF train step after two warm-up steps; prints the numbers."""
  step, state, rng, n_params = build(args)
  data = np.random.default_rng(0)
  pool = [jax.device_put(masked_batch(data, args.batch_size, args.seq_len, args.vocab_size))
          for _ in range(4)]
  for i in range(2):
    state, metrics, rng = step(state, pool[i % 4], rng)
  jax.block_until_ready(metrics)
  times = []
  for i in range(args.steps):
    t = time.perf_counter()
    state, metrics, rng = step(state, pool[i % 4], rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  t_step = float(np.median(times))
  tokens = args.batch_size * args.seq_len
  print(f'HF FlaxBertForMaskedLM (run_mlm_flax.py step): {n_params / 1e6:.2f} M params, '
        f'batch {args.batch_size} x {args.seq_len}, loss {float(metrics["loss"]):.3f}', flush=True)
  print(f'  step time {t_step * 1e3:.1f} ms (median of {args.steps}), '
        f'{tokens / t_step:.0f} tokens/s', flush=True)
  return tokens / t_step


def time_ours(args) -> float:
  """Runs benchmarks/throughput.py --config mini in .venv; returns its tokens/s."""
  cmd = [args.ours_python, str(REPO / 'benchmarks' / 'throughput.py'), '--config', 'mini',
         '--steps', str(args.steps), '--batch_size', str(args.batch_size),
         '--seq_len', str(args.seq_len)]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  if out.returncode:
    sys.exit(f'error: {" ".join(cmd)} failed: {out.stderr.strip().splitlines()[-1:]}')
  print('mlmjax (benchmarks/throughput.py --config mini):', flush=True)
  print('\n'.join('  ' + line for line in out.stdout.strip().splitlines()), flush=True)
  match = re.search(r'^tokens/s\s+([0-9.]+)', out.stdout, re.M)
  if not match:
    sys.exit('error: no "tokens/s" line in the output of benchmarks/throughput.py')
  return float(match.group(1))


def main() -> None:
  """Parses flags, times the HF step and (with --ours) ours, and prints the ratio."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--steps', type=int, default=20, help='timed steps (after 2 warm-up steps)')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--vocab_size', type=int, default=32000)
  p.add_argument('--ours', action='store_true',
                 help='also run benchmarks/throughput.py --config mini')
  p.add_argument('--ours_python', default=str(REPO / '.venv' / 'bin' / 'python'),
                 help='the Python of the mlmjax venv')
  p.add_argument('--rounds', type=int, default=1,
                 help='with --ours: measure both this many times, alternating which goes first')
  args = p.parse_args()
  dev = jax.devices()[0]
  print(f'device {dev.platform} ({dev.device_kind}) x {jax.device_count()}, jax {jax.__version__}, '
        f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}', flush=True)
  if not args.ours:
    time_hf(args)
    return
  hf, ours = [], []
  for r in range(args.rounds):
    for which in (('hf', 'ours') if r % 2 == 0 else ('ours', 'hf')):
      (hf if which == 'hf' else ours).append(time_hf(args) if which == 'hf' else time_ours(args))
      print(f'  (round {r + 1}, load average {os.getloadavg()[0]:.1f})', flush=True)
    print(f'round {r + 1}: mlmjax {ours[-1]:.0f} / HF {hf[-1]:.0f} tokens/s = '
          f'{ours[-1] / hf[-1]:.2f}x', flush=True)
  m_ours, m_hf = float(np.median(ours)), float(np.median(hf))
  print(f'ratio: mlmjax {m_ours:.0f} / HF {m_hf:.0f} tokens/s = {m_ours / m_hf:.2f}x '
        f'(medians over {args.rounds} round(s) of {args.steps} steps each)')


if __name__ == '__main__':
  main()
