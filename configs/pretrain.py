"""MLM pretraining configs: get_config('tiny'|'mini'|'small'|'base'|'large'|'modern_tiny'|'modern_base').

Run (the tiny variant is what `python3 quickstart.py demo` trains, into runs/demo):

  python -m mlmjax.train --config configs/pretrain.py:tiny --workdir runs/x

tiny on 2 CPU cores: 3,200 steps of 16 x 64 tokens on the embedded corpus at a 40% masking rate,
untied decoder, warmup-stable-decay with a 1-sqrt decay over the last 800 steps: about 7 minutes
of training, and validation accuracy at [MASK] above the bigram baseline at the fixed 15%
evaluation masks (docs/tiny.md has the measured run and how the recipe was chosen). mini and
larger are for accelerators: one mini step takes about 2.5 s on 2 CPU cores, so its 100,000
steps would take days there (docs/benchmarks.md).

modern_* is ModernBERT's architecture (model.MODERN: rotary positions, GeGLU, bias-free layers,
sliding-window attention in two of every three layers) at ModernBERT's published shapes for base;
modern_tiny trains on the demo's data and budget with a 32-token window scaled to its 64-token rows
(docs/architecture.md).
"""

import ml_collections

from mlmjax import model, schema

# Per-size overrides of the defaults in mlmjax/schema.py: model shape, batch, schedule.
_SIZES = {
    # Chosen by a measured sweep on 2 CPU cores (README, "Tiny config"; benchmarks/tiny_sweep.py).
    # tiny's masking rate, untied decoder and length: the recipe that learns most in the demo's
    # 10 minutes on 2 CPU cores (docs/tiny.md, "A recipe above the bigram baseline").
    'tiny': dict(model='tiny', vocab_size=8000, seq_len=64, batch_size=16, num_steps=3200,
                 lr=2e-3, warmup=300, eval_every=800, ckpt_every=800, dropout=0.0,
                 mask_rate=0.4, tie=False, decay='1-sqrt', decay_fraction=0.25),
    'mini': dict(model='mini', vocab_size=32000, seq_len=128, batch_size=32, num_steps=100_000,
                 lr=1e-3, warmup=2000, eval_every=2000, ckpt_every=2000, dropout=0.1),
    'small': dict(model='small', vocab_size=32000, seq_len=128, batch_size=128, num_steps=200_000,
                  lr=5e-4, warmup=5000, eval_every=5000, ckpt_every=5000, dropout=0.1),
    'base': dict(model='base', vocab_size=32000, seq_len=128, batch_size=256, num_steps=500_000,
                 lr=2e-4, warmup=10_000, eval_every=10_000, ckpt_every=10_000, dropout=0.1),
    'large': dict(model='large', vocab_size=32000, seq_len=128, batch_size=256, num_steps=1_000_000,
                  lr=1e-4, warmup=10_000, eval_every=10_000, ckpt_every=10_000, dropout=0.1),
    # ModernBERT's architecture: no dropout, 30% masking and StableAdamW as ModernBERT pretrains.
    'modern_tiny': dict(model='modern_tiny', modern=dict(local_window=32), vocab_size=8000,
                        seq_len=64, batch_size=16, num_steps=3200, lr=2e-3, warmup=300,
                        eval_every=800, ckpt_every=800, dropout=0.0, mask_rate=0.4,
                        decay='1-sqrt', decay_fraction=0.25),
    'modern_base': dict(model='modern_base', modern={}, vocab_size=32000, seq_len=1024,
                        batch_size=256, num_steps=200_000, lr=8e-4, warmup=3000, eval_every=5000,
                        ckpt_every=5000, dropout=0.0, mask_rate=0.3, decay='1-sqrt',
                        decay_fraction=0.1, optimizer='stable_adamw'),
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
  c.model.dropout_rate = s['dropout']
  # None on the probabilities, as ModernBERT and mmBERT pretrain: fused attention kernels have none.
  c.model.attention_dropout_rate = 0.0
  c.model.tie_embeddings = s.get('tie', True)
  if 'modern' in s:
    for key, value in {**model.MODERN, **s['modern']}.items():
      c.model[key] = value
    c.optim.optimizer = s.get('optimizer', c.optim.optimizer)
  c.masking.rate = s.get('mask_rate', 0.15)
  c.train.num_steps = s['num_steps']
  c.train.batch_size = s['batch_size']
  c.train.seq_len = s['seq_len']
  c.optim.learning_rate = s['lr']
  c.optim.warmup_steps = s['warmup']
  c.optim.decay = s.get('decay', 'linear')
  c.optim.decay_fraction = s.get('decay_fraction', 0.0)  # tiny: the last 800 of 3,200 steps
  c.ckpt.every_steps = s['ckpt_every']
  c.eval.every_steps = s['eval_every']
  c.lock()
  return c
