"""MLM pretraining configs: get_config('tiny'|'tiny_classic'|'mini'|'small'|'base'|'large'|'modern_base').

Run (the tiny variant is what `python3 quickstart.py demo` trains, into runs/demo):

  python -m mlmjax.train --config configs/pretrain.py:tiny --workdir runs/x

tiny is ModernBERT's architecture (model.MODERN: rotary positions, GeGLU, bias-free layers,
global attention in one of three layers and a 32-token window, scaled to its 64-token rows, in
the others) at 3 layers of width 128: 3,200 steps of 16 x 64 tokens on the embedded corpus at a 40%
masking rate, warmup-stable-decay with a 1-sqrt decay over the last 800 steps, on 2 CPU cores in
under 10 minutes. It beat tiny_classic, the 2-layer BERT encoder with an untied decoder, at equal
tokens on the embedded corpus and on ../shared/data/pretrain/general (docs/architecture.md, "Which
default"; docs/tiny.md has how the recipe was chosen). mini and larger are BERT's shapes, for
accelerators: one mini step takes about 2.5 s on 2 CPU cores (docs/benchmarks.md). modern_base is
ModernBERT-base's shape and architecture.
"""

import ml_collections

from mlmjax import model, schema

# Per-size overrides of the defaults in mlmjax/schema.py: model shape, batch, schedule.
_SIZES = {
    # The demo: ModernBERT's architecture with tiny_classic's recipe (docs/architecture.md).
    'tiny': dict(model='modern_tiny', modern=dict(local_window=32), vocab_size=8000, seq_len=64,
                 batch_size=16, num_steps=3200, lr=2e-3, warmup=300, eval_every=800,
                 ckpt_every=800, dropout=0.0, mask_rate=0.4, decay='1-sqrt', decay_fraction=0.25),
    # Chosen by a measured sweep on 2 CPU cores (benchmarks/tiny_sweep.py); the masking rate,
    # untied decoder and schedule: docs/tiny.md, "A recipe above the bigram baseline".
    'tiny_classic': dict(model='tiny', vocab_size=8000, seq_len=64, batch_size=16, num_steps=3200,
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
