"""Domain-adaptive MLM: get_config('tiny'|'mini') continues pretraining on in-domain text.

  python -m mlmjax.train --config configs/dapt.py:tiny --workdir runs/dapt \
      --config.init_from=runs/pretrain

tiny on 2 CPU cores: 3,000 steps of 16 x 64 tokens of ../shared/data/pretrain/technical, 935 s
of wall time measured with other jobs sharing the cores (2026-11-27, jax 0.10.2). Expected result,
from the tiny pretrained 6,000 steps on ../shared/data/pretrain/general (docs/results.md):
technical validation accuracy at [MASK] 4.9% -> 18.8% (loss 6.57 -> 4.33), general 11.0% ->
10.1% (loss 5.54 -> 6.09). From another starting run the numbers differ.

--config.tokenizer.extend_pieces=2000 appends pieces learned from the new domain to init_from's
tokenizer, their embeddings the mean of the old pieces they replace (docs/adaptation.md).

The run starts from init_from's parameters and tokenizer (fresh optimizer), trains MLM on
data.corpus (the new domain) and validates on held-out text of both domains: eval/... is the new
domain, eval_<eval.other_name>/... the original one (eval.other_corpus), so the trade-off is
visible at every evaluation. The evaluation before the first step (eval.at_start) gives the
starting point. Early stopping follows early_stop.metric with early_stop.patience, and the best
evaluation's checkpoint is kept in <workdir>/best.
"""

import ml_collections

from mlmjax.configs import pretrain

_SIZES = {
    # steps, peak lr, warmup, evaluation cadence
    'tiny': dict(num_steps=3000, lr=5e-4, warmup=100, eval_every=250),
    'mini': dict(num_steps=20_000, lr=2e-4, warmup=1000, eval_every=1000),
}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  """Returns the locked DAPT config for size variant `arg` (the pretrained run's size)."""
  if arg not in _SIZES:
    raise ValueError(f'configs/dapt.py: unknown variant {arg!r}; choose one of {sorted(_SIZES)}')
  s = _SIZES[arg]
  c = pretrain.get_config(arg)
  c.data.corpus = '../shared/data/pretrain/technical/*.txt'  # the new domain
  c.eval.other_corpus = '../shared/data/pretrain/general/*.txt'  # the original domain, held out too
  c.eval.other_name = 'general'
  c.eval.at_start = True
  c.eval.every_steps = s['eval_every']
  c.ckpt.every_steps = s['eval_every']
  c.train.num_steps = s['num_steps']
  c.optim.learning_rate = s['lr']
  c.optim.warmup_steps = s['warmup']
  # The measured DAPT recipe (docs/results.md), whatever pretraining used.
  c.masking.rate, c.optim.decay, c.optim.decay_fraction = 0.15, 'linear', 0.0
  c.early_stop.metric = 'loss'  # in-domain validation loss; 'eval_general/loss' guards the old domain
  c.early_stop.patience = 3  # evaluations without improvement before stopping
  c.early_stop.min_delta = 0.002
  return c
