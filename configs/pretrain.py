"""MLM pretraining configs: get_config('tiny'|'mini'|'small'|'base'|'large').

Run (the tiny variant is what `python3 quickstart.py demo` trains, into runs/demo):

  python -m mlmjax.train --config configs/pretrain.py:tiny --workdir runs/x

tiny on 2 CPU cores: 5,000 steps of 16 x 64 tokens on the embedded corpus in about 9 minutes
(532 s measured for the steps, plus under a minute of one-time data preparation; 2026-11-27,
jax 0.10.2). Expected result: validation accuracy at [MASK] about 2.5x the unigram baseline at the
fixed 15% evaluation masks, still below the bigram baseline; docs/tiny.md has the numbers. mini and
larger are for accelerators: one mini step takes about 2.5 s on 2 CPU cores, so its 100,000
steps would take days there (docs/benchmarks.md).
"""

import ml_collections

from mlmjax import schema

# Per-size overrides of the defaults in mlmjax/schema.py: model shape, batch, schedule.
_SIZES = {
    # Chosen by a measured sweep on 2 CPU cores (README, "Tiny config"; benchmarks/tiny_sweep.py).
    'tiny': dict(model='tiny', vocab_size=8000, seq_len=64, batch_size=16, num_steps=5000,
                 lr=2e-3, warmup=300, eval_every=1000, ckpt_every=1000, dropout=0.0),
    'mini': dict(model='mini', vocab_size=32000, seq_len=128, batch_size=32, num_steps=100_000,
                 lr=1e-3, warmup=2000, eval_every=2000, ckpt_every=2000, dropout=0.1),
    'small': dict(model='small', vocab_size=32000, seq_len=128, batch_size=128, num_steps=200_000,
                  lr=5e-4, warmup=5000, eval_every=5000, ckpt_every=5000, dropout=0.1),
    'base': dict(model='base', vocab_size=32000, seq_len=128, batch_size=256, num_steps=500_000,
                 lr=2e-4, warmup=10_000, eval_every=10_000, ckpt_every=10_000, dropout=0.1),
    'large': dict(model='large', vocab_size=32000, seq_len=128, batch_size=256, num_steps=1_000_000,
                  lr=1e-4, warmup=10_000, eval_every=10_000, ckpt_every=10_000, dropout=0.1),
}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  """Returns the locked pretraining config for size variant `arg`."""
  if arg not in _SIZES:
    raise ValueError(f"configs/pretrain.py: unknown variant {arg!r}; choose one of {sorted(_SIZES)}")
  s = _SIZES[arg]
  c = schema.defaults()  # every key, one comment each: mlmjax/schema.py
  c.variant = arg
  c.tokenizer.vocab_size = s['vocab_size']
  c.model.size = s['model']
  c.model.dropout_rate = s['dropout']  # attention dropout follows it
  c.train.num_steps = s['num_steps']
  c.train.batch_size = s['batch_size']
  c.train.seq_len = s['seq_len']
  c.optim.learning_rate = s['lr']
  c.optim.warmup_steps = s['warmup']
  c.ckpt.every_steps = s['ckpt_every']
  c.eval.every_steps = s['eval_every']
  c.lock()
  return c
