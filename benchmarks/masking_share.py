"""Prints each masking strategy's share of the train step on real batches of the embedded corpus.

  python benchmarks/masking_share.py --config tiny            # or mini
  python benchmarks/masking_share.py --config mini --steps 10 --strategies token,span

For every strategy the script jits the same train step train.py runs (masking inside it) and
`mask_tokens` alone, on packed rows of the real token cache with the real tokenizer's word starts
(and the PMI vocabulary built from that cache), and prints the median times and the share
masking-alone / step.
"""

import argparse
import os
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # pylint: disable=g-import-not-at-top

from benchmarks.throughput import time_fn  # pylint: disable=g-import-not-at-top
from configs import pretrain
from mlmjax import experiment, masking, sharding


def main() -> None:
  """Parses flags, prepares real batches and prints one line per strategy."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='tiny', help='size variant of configs/pretrain.py')
  p.add_argument('--steps', type=int, default=20, help='timed calls per measurement (after 2 warm-up)')
  p.add_argument('--strategies', default=','.join(masking.STRATEGIES))
  args = p.parse_args()

  config = pretrain.get_config(args.config)
  b, l = config.train.batch_size, config.train.seq_len
  mesh = sharding.make_mesh(config.mesh)
  key = jax.random.key(0)
  dev = jax.devices()[0]
  pool = None
  with tempfile.TemporaryDirectory() as workdir:
    for strategy in args.strategies.split(','):
      with config.unlocked():
        config.masking.strategy = strategy
      # The step train.run runs, with the real corpus's tokenizer, word starts and PMI n-grams.
      exp = experiment.setup(config, workdir, mesh, log=lambda s: None)
      enc_cfg, spec, tables, step = exp.enc_cfg, exp.task.spec, exp.task.tables, exp.train_step
      if pool is None:
        rows = exp.data.train
        pool = [sharding.global_batch(rows[i * b:(i + 1) * b], mesh) for i in range(4)]
        print(f'config {args.config}: {enc_cfg.num_layers} layers, hidden {enc_cfg.hidden_size}, '
              f'vocab {enc_cfg.vocab_size}, batch {b} x {l}, rate {config.masking.rate}; device '
              f'{dev.platform} ({dev.device_kind}); medians of {args.steps} calls')
        print(f'{"strategy":<11} {"buffer":>6} {"step ms":>9} {"masking ms":>10} {"share":>7}')
      mask_only = jax.jit(lambda k, t, spec=spec, tables=tables: masking.mask_tokens(k, t, spec, tables=tables))
      holder = {'state': exp.init_state(), 'i': 0}

      def step_args(holder=holder):
        holder['i'] += 1
        return holder['state'], pool[holder['i'] % len(pool)], key

      def step_fn(s, batch, k, holder=holder, step=step):
        holder['state'], sums = step(s, batch, k)
        return sums

      t_step = time_fn(step_fn, step_args, args.steps)
      t_mask = time_fn(mask_only, lambda holder=holder: (jax.random.fold_in(key, holder['i']),
                                                         pool[holder['i'] % len(pool)]), args.steps)
      print(f'{strategy:<11} {spec.max_predictions:>6} {t_step * 1e3:>9.2f} {t_mask * 1e3:>10.3f} '
            f'{100 * t_mask / t_step:>6.2f}%', flush=True)


if __name__ == '__main__':
  main()
