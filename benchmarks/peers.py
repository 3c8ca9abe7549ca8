"""Times our `mini` train step beside two peers in one run: HF's FlaxBertForMaskedLM and torch's.

  python3 -m venv .venv-hf
  .venv-hf/bin/pip install 'transformers<5' flax==0.12.8 jax==0.10.2 jaxlib==0.10.2 optax==0.2.8
  .venv/bin/python benchmarks/peers.py --steps 10 --rounds 3

transformers 5 dropped its Flax models, so the Flax peer runs in its own venv (.venv-hf, gitignored;
--flax_python); the torch peer (transformers 5, torch of the test extra) and ours run in .venv. Each
measurement is its own process; the three alternate, rotating which goes first in each round, so a
load that drifts during the run weighs on all alike; the ratios are of the medians over rounds.
`--only ours|flax|torch` measures one in this process.

All three have the `mini` shape: 4 layers, hidden 256, 4 heads, intermediate 1024, vocabulary
32,000, 512 learned positions, exact GELU, hidden dropout 0.1, and attention dropout 0 (as our
pretraining configs set it), float32, batch 32 x 128, AdamW (betas 0.9/0.98, eps 1e-6, decay 0.01
except biases and LayerNorm), linear warmup. What each step does:
- ours: benchmarks/throughput.py's step (experiment.setup's, which train.run jits): masking on the
  device inside the step, the MLM head and the last layer's queries and MLP at the 20 prediction
  slots per row only, dropout masks from philox4x32.
- flax: run_mlm_flax.py's step: the MLM head over every position (dense (B, L, V) logits), softmax
  cross-entropy against one-hot labels weighted by labels > 0, summed and divided by the number of
  labels, one jitted step donating the state. Its masking (15%, 80/10/10, numpy, in the collator)
  is left out of the timed step.
- torch: BertForMaskedLM of transformers 5 in eager mode (no torch.compile; its default SDPA
  attention), labels -100 where not selected (its loss: mean cross-entropy over selected positions,
  head over every position), torch.optim.AdamW(fused=True), a LambdaLR warmup, zero_grad(set_to_none).
  Host masking is left out of its step too. torch uses all CPU threads (torch.get_num_threads()).
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
MASK_ID, FIRST_REGULAR = 4, 5  # ids below 5 are special in mlmjax's vocabularies; the same here
SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
             max_position_embeddings=512, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
             hidden_act='gelu')
PEERS = ('ours', 'flax', 'torch')


def masked_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab: int) -> dict:
  """Returns one host-masked batch as HF's MLM collators make it: 15% selected, 80/10/10."""
  ids = rng.integers(FIRST_REGULAR, vocab, (batch, seq_len)).astype(np.int32)
  selected = rng.random(ids.shape) < 0.15
  labels = np.where(selected, ids, 0).astype(np.int32)  # 0: not predicted (label weight 0)
  draw = rng.random(ids.shape)
  inputs = np.where(selected & (draw < 0.8), MASK_ID, ids)
  random_ids = rng.integers(FIRST_REGULAR, vocab, ids.shape)
  inputs = np.where(selected & (draw >= 0.8) & (draw < 0.9), random_ids, inputs).astype(np.int32)
  return {'input_ids': inputs, 'attention_mask': np.ones_like(inputs),
          'token_type_ids': np.zeros_like(inputs), 'labels': labels}


def decays(path: tuple[str, ...]) -> bool:
  """True for parameters that take weight decay: not biases, not LayerNorm scales."""
  return path[-1] != 'bias' and not any('layernorm' in p.lower() for p in path)


def median_step(step, steps: int) -> float:
  """Returns the median seconds of step(i) over `steps` calls after two warm-up calls."""
  for i in range(2):
    step(i)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    step(i)
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def time_flax(args) -> tuple[float, str]:
  """Returns (median seconds per step, description) of run_mlm_flax.py's step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import optax
  from flax import traverse_util
  from flax.training import common_utils, train_state
  from transformers import BertConfig, FlaxBertForMaskedLM
  model = FlaxBertForMaskedLM(BertConfig(vocab_size=args.vocab_size, **SHAPE), seed=0,
                              dtype=jnp.float32)
  schedule = optax.linear_schedule(0.0, 1e-3, 2000)
  mask = traverse_util.unflatten_dict(
      {p: decays(p) for p in traverse_util.flatten_dict(model.params)})
  tx = optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, mask=mask)
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
    return state.apply_gradients(grads=grads), loss / num_labels, next_rng

  step_fn = jax.jit(train_step, donate_argnums=(0,))
  data = np.random.default_rng(0)
  pool = [jax.device_put(masked_batch(data, args.batch_size, args.seq_len, args.vocab_size))
          for _ in range(4)]
  holder = {'state': state, 'rng': jax.random.key(0)}

  def step(i):
    holder['state'], loss, holder['rng'] = step_fn(holder['state'], pool[i % 4], holder['rng'])
    jax.block_until_ready(loss)

  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return median_step(step, args.steps), f'FlaxBertForMaskedLM, {n / 1e6:.2f} M params, jax {jax.__version__}'


def time_torch(args) -> tuple[float, str]:
  """Returns (median seconds per step, description) of BertForMaskedLM with fused AdamW."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers
  from transformers import BertConfig, BertForMaskedLM
  torch.manual_seed(0)
  model = BertForMaskedLM(BertConfig(vocab_size=args.vocab_size, **SHAPE)).train()
  groups = [{'params': [], 'weight_decay': 0.01}, {'params': [], 'weight_decay': 0.0}]
  for name, p in model.named_parameters():
    groups[0 if decays(tuple(name.split('.'))) else 1]['params'].append(p)
  opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, fused=True)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2000))
  data = np.random.default_rng(0)
  pool = []
  for _ in range(4):
    b = masked_batch(data, args.batch_size, args.seq_len, args.vocab_size)
    b['labels'] = np.where(b['labels'] > 0, b['labels'], -100)
    pool.append({k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items()})

  def step(i):
    loss = model(**pool[i % 4]).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)

  n = sum(p.numel() for p in model.parameters())
  return median_step(step, args.steps), (
      f'BertForMaskedLM ({model.config._attn_implementation} attention), {n / 1e6:.2f} M params, '
      f'torch {torch.__version__} ({torch.get_num_threads()} threads), '
      f'transformers {transformers.__version__}')


def time_ours(args) -> tuple[float, str]:
  """Returns (median seconds per step, description) of our `mini` step, masking included."""
  sys.path.insert(0, str(REPO))
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import jax  # pylint: disable=g-import-not-at-top
  import throughput
  from configs import pretrain
  from mlmjax import experiment, sharding
  config = pretrain.get_config('mini')
  with config.unlocked():
    config.train.batch_size, config.train.seq_len = args.batch_size, args.seq_len
    for item in args.set:
      key, value = item.split('=', 1)
      *path, leaf = key.split('.')
      node = config
      for part in path:
        node = node[part]
      node[leaf] = type(node[leaf])(value)
  assert config.tokenizer.vocab_size == args.vocab_size, config.tokenizer.vocab_size
  mesh = sharding.make_mesh(config.mesh)
  exp = experiment.setup(config, None, mesh)
  rng = np.random.default_rng(0)
  pool = [sharding.global_batch(throughput.synthetic_rows(rng, args.batch_size, args.seq_len,
                                                          args.vocab_size), mesh)
          for _ in range(4)]
  holder = {'state': exp.init_state(), 'key': jax.random.key(0)}

  def step(i):
    holder['state'], sums = exp.train_step(holder['state'], pool[i % 4], holder['key'])
    jax.block_until_ready(sums)

  return median_step(step, args.steps), (
      f'mlmjax mini, {exp.num_params / 1e6:.2f} M params, jax {jax.__version__}'
      + (f', {" ".join(args.set)}' if args.set else ''))


def measure(args, which: str) -> float:
  """Runs `--only which` in its own process with the right Python; returns its tokens/s."""
  python = args.flax_python if which == 'flax' else sys.executable
  cmd = [python, __file__, '--only', which, '--steps', str(args.steps), '--batch_size',
         str(args.batch_size), '--seq_len', str(args.seq_len), '--vocab_size',
         str(args.vocab_size), *[f'--set={s}' for s in args.set]]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  if out.returncode:
    sys.exit(f'error: {" ".join(cmd)} failed:\n{out.stderr.strip()[-2000:]}')
  print('  ' + out.stdout.strip().replace('\n', '\n  '), flush=True)
  return float(re.search(r'tokens/s ([0-9.]+)', out.stdout)[1])


def main() -> None:
  """Parses flags; measures one peer (--only) or all three alternately and prints the ratios."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--steps', type=int, default=10, help='timed steps (after 2 warm-up steps)')
  p.add_argument('--rounds', type=int, default=3, help='measurements of each, alternating')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--vocab_size', type=int, default=32000)
  p.add_argument('--peers', default='ours,flax,torch', help='which to measure, comma-separated')
  p.add_argument('--only', choices=PEERS, help='measure this one here and print its line')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='override of our mini config, e.g. model.dropout_rate=0 (repeatable)')
  p.add_argument('--flax_python', default=str(REPO / '.venv-hf' / 'bin' / 'python'),
                 help='the Python of a venv with transformers<5 and flax')
  args = p.parse_args()
  tokens = args.batch_size * args.seq_len
  if args.only:
    seconds, what = {'ours': time_ours, 'flax': time_flax, 'torch': time_torch}[args.only](args)
    print(f'{args.only}: {what}\n{args.only}: step {seconds * 1e3:.0f} ms (median of '
          f'{args.steps}), tokens/s {tokens / seconds:.0f}')
    return
  peers = args.peers.split(',')
  if 'flax' in peers and not pathlib.Path(args.flax_python).exists():
    sys.exit(f'error: --flax_python {args.flax_python} does not exist; create .venv-hf as the '
             'docstring says, or pass --peers ours,torch')
  print(f'{os.cpu_count()} CPUs, batch {args.batch_size} x {args.seq_len}, {args.steps} steps, '
        f'{args.rounds} rounds, load average {os.getloadavg()[0]:.1f}', flush=True)
  found = {w: [] for w in peers}
  for r in range(args.rounds):
    order = peers[r % len(peers):] + peers[:r % len(peers)]
    for which in order:
      found[which].append(measure(args, which))
    print(f'round {r + 1} (load average {os.getloadavg()[0]:.1f}): ' + ', '.join(
        f'{w} {found[w][-1]:.0f}' for w in peers) + ' tokens/s', flush=True)
  med = {w: float(np.median(v)) for w, v in found.items()}
  print('medians: ' + ', '.join(f'{w} {med[w]:.0f} tokens/s' for w in peers))
  for w in peers:
    if w != 'ours' and 'ours' in med:
      per_round = ', '.join(f'{o / x:.2f}' for o, x in zip(found['ours'], found[w]))
      print(f'ours / {w}: {med["ours"] / med[w]:.2f}x (per round {per_round})')


if __name__ == '__main__':
  main()
