"""Prints one table of train-step throughput, MFU and memory over encoders, lengths and attention paths.

  python benchmarks/attention_sweep.py                                  # the GPU check of issue 17
  python benchmarks/attention_sweep.py --configs tiny --lengths 512 --impls '' reference --dtype float32

Each cell runs benchmarks/throughput.py in its own process (so peak memory is per cell) at one
packed row per step times --rows, and the table gathers what it printed. Defaults: `base` (BERT) and
`modern_base` (ModernBERT) in bfloat16 at 512, 2,048 and 8,192 tokens, through the fused paths
(cuDNN for BERT; XLA's choice for ModernBERT, whose windows cuDNN cannot take) and the dense
reference. BERT's learned position table grows to the longest length. A cell that fails prints
its last line instead of numbers. Cells run shortest length first; with --budget_s, no cell starts
once that many seconds have passed (the rest are listed as not run), so a time-limited lease still
returns the most important rows.
"""

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))
from configs import pretrain  # pylint: disable=g-import-not-at-top

FIELDS = {'tokens/s': r'tokens/s\s+([\d.]+)', 'MFU %': r'MFU\s+([\d.]+) %',
          'XLA temp MiB': r'XLA memory/dev\s+([\d.]+) MiB', 'device peak MiB': r'device peak\s+([\d.]+) MiB',
          'peak RSS MiB': r'peak RSS\s+([\d.]+) MiB'}


def cell(config: str, length: int, impl: str, args) -> dict[str, str]:
  """Returns the measured fields of one throughput.py run (or its last line under 'error')."""
  rows = max(1, args.tokens // length)
  cmd = [sys.executable, os.path.join(HERE, 'throughput.py'), '--config', config, '--seq_len',
         str(length), '--batch_size', str(rows), '--steps', str(args.steps), '--dtype', args.dtype,
         '--attention_impl', impl, '--max_position', str(max(512, length))]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
  text = out.stdout + out.stderr
  got = {k: (m.group(1) if (m := re.search(p, text)) else '') for k, p in FIELDS.items()}
  if out.returncode:
    got['error'] = (text.strip().splitlines() or ['?'])[-1][:100]
  return got


def fused_path(config: str) -> str:
  """Returns cudnn, or '' (XLA chooses) for a config with sliding windows, which cuDNN cannot take."""
  return '' if pretrain.get_config(config).model.local_window else 'cudnn'


def main() -> None:
  """Parses flags, runs every cell and prints the table as Markdown."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--configs', nargs='+', default=['base', 'modern_base'])
  p.add_argument('--lengths', nargs='+', type=int, default=[512, 2048, 8192])
  p.add_argument('--impls', nargs='+', default=None,
                 help="attention paths; default: cudnn, or '' (XLA chooses) with sliding windows, and reference")
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--tokens', type=int, default=65536, help='tokens per step (rows = tokens // length)')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--timeout', type=int, default=600, help='seconds per cell')
  p.add_argument('--budget_s', type=float, default=0, help='start no cell after this many seconds')
  args = p.parse_args()
  start = time.monotonic()
  print('| config | length | attention | ' + ' | '.join(FIELDS) + ' | error |')
  print('|---|---|---|' + '---|' * (len(FIELDS) + 1))
  for length in sorted(args.lengths):
    for config in args.configs:
      impls = args.impls or [fused_path(config), 'reference']
      for impl in impls:
        if args.budget_s and time.monotonic() - start > args.budget_s:
          got = {'error': f'not run: --budget_s {args.budget_s:g} spent'}
        else:
          got = cell(config, length, impl, args)
        print(f'| {config} | {length} | {impl or "XLA chooses"} | '
              + ' | '.join(got.get(k, '') for k in FIELDS) + f' | {got.get("error", "")} |',
              flush=True)


if __name__ == '__main__':
  main()
