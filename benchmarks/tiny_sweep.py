"""Short measured sweep behind the tiny config: equal optimizer steps, one change at a time.

  python benchmarks/tiny_sweep.py --steps 1500 --workdir runs/tiny_sweep

Every variant trains the embedded corpus with the same seed and data order, then prints a
Markdown table: validation loss, accuracy where the input is [MASK] beside the unigram and bigram
baselines on the same masks, and the measured time per step. A finished variant is not rerun.
"""

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from configs import pretrain  # pylint: disable=g-import-not-at-top
from mlmjax import train

# name -> overrides of configs/pretrain.py:tiny (dotted keys); 'steps_factor' scales num_steps so
# a variant with k times the tokens per step gets 1/k of the steps (equal compute).
VARIANTS = {
    'pre-LN lr2e-3 b16 L64': {},
    'pre-LN lr1e-3 b16 L64': {'optim.learning_rate': 1e-3},
    'pre-LN lr4e-3 b16 L64': {'optim.learning_rate': 4e-3},
    'post-LN lr2e-3 b16 L64': {'model.pre_layer_norm': False},
    'post-LN lr5e-4 b16 L64': {'model.pre_layer_norm': False, 'optim.learning_rate': 5e-4},
    'pre-LN lr2e-3 b32 L64 (half the steps)': {'train.batch_size': 32, 'steps_factor': 0.5},
    'pre-LN lr2e-3 b8 L128': {'train.batch_size': 8, 'train.seq_len': 128},
}


def main() -> None:
  """Runs each variant (skipping finished ones) and prints the comparison table."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--steps', type=int, default=1500, help='optimizer steps of a b16 variant')
  p.add_argument('--workdir', default='runs/tiny_sweep')
  p.add_argument('--only', default='', help='comma-separated variant names to run')
  args = p.parse_args()
  rows = []
  for name, overrides in VARIANTS.items():
    if args.only and name not in args.only.split(','):
      continue
    overrides = dict(overrides)
    factor = overrides.pop('steps_factor', 1.0)
    c = pretrain.get_config('tiny')
    c.train.num_steps = int(args.steps * factor)
    c.optim.warmup_steps = min(c.optim.warmup_steps, c.train.num_steps // 5)
    c.eval.every_steps = c.train.num_steps
    c.ckpt.every_steps = c.train.num_steps
    c.train.log_every_steps = 250
    for key, value in overrides.items():
      section, field = key.split('.')
      setattr(getattr(c, section), field, value)
    workdir = pathlib.Path(args.workdir) / name.replace(' ', '_').replace('(', '').replace(')', '')
    summary_path = workdir / 'summary.json'
    if summary_path.exists() and json.loads(summary_path.read_text()).get('finished'):
      summary = json.loads(summary_path.read_text())
    else:
      summary = train.run(c, workdir)
    step_times = [json.loads(l)['train/step_time_s'] for l in (workdir / 'metrics.jsonl').open()
                  if 'train/step_time_s' in l]
    ms = 1e3 * sorted(step_times)[len(step_times) // 2] if step_times else float('nan')
    rows.append((name, c.train.num_steps, summary['eval/loss'], summary['eval/accuracy_at_mask'],
                 summary['baseline/unigram_accuracy_at_mask'], summary['baseline/bigram_accuracy_at_mask'],
                 ms))
  print('\n| variant | steps | val loss | acc@[MASK] | unigram | bigram | ms/step |')
  print('|---|---|---|---|---|---|---|')
  for name, steps, loss, acc, uni, bi, ms in rows:
    print(f'| {name} | {steps} | {loss:.3f} | {acc:.4f} ({acc / uni:.2f}x) | {uni:.4f} | {bi:.4f} | {ms:.0f} |')


if __name__ == '__main__':
  main()
