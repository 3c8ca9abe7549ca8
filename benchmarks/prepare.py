"""Throughput, peak memory and disk use of `python -m mlmjax.prepare` at two corpus sizes 10x apart.

  python benchmarks/prepare.py                     # 4 MB and 40 MB: a few minutes on 2 CPU cores
  python benchmarks/prepare.py --large_mb 2000     # 200 MB and 2 GB
  python benchmarks/prepare.py --keep /tmp/bench   # keep the corpora and the shards there

The corpora are real text from ../shared/data/pretrain: an equal share of each of its files, cut
at a paragraph break. Where a size needs more than a file holds, the file is REPEATED: copy k >= 1
has '(copy k) ' put before each paragraph, so that exact deduplication keeps the copies. Such a
corpus measures the pipeline, not a corpus of that much distinct text.

The tokenizer is trained once, by mlmjax.prepare on a tokenizer.sample_chars sample of the small
corpus (that build is timed apart); every measured build then reads it through tokenizer.path.
Each build runs in a child process, which reports its wall time, the CPU time of itself and its
workers during the build, and the peak RSS of itself and of its largest worker (resource.getrusage, RUSAGE_SELF
and RUSAGE_CHILDREN; the main process's from its VmHWM where Linux gives it, since ru_maxrss
starts at the parent's RSS; a worker's is an upper bound: it starts at the build process's RSS when
the worker is spawned). The CPU time is the number to compare on a shared machine.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
REPO = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN = REPO.parent / 'shared' / 'data' / 'pretrain'

CHILD = """
import json, re, resource, sys, time
from mlmjax import cli, prepare
args = json.loads(sys.argv[1])
config = cli.load_config('pretrain:tiny')
config.unlock()
for key, value in args['overrides'].items():
  section, field = key.split('.')
  config[section][field] = value
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
manifest = prepare.build(config, args['out'], workers=args['workers'], log=lambda _: None)
seconds = time.perf_counter() - start
usage = {'self': resource.getrusage(resource.RUSAGE_SELF),
         'children': resource.getrusage(resource.RUSAGE_CHILDREN)}
peak = usage['self'].ru_maxrss  # KiB on Linux; after a fork it starts at the parent's RSS, so
try:  # VmHWM, this process's own high-water mark (reset by exec), where Linux gives it
  peak = int(re.search(r'VmHWM:\s+(\d+) kB', open('/proc/self/status').read())[1])
except (OSError, TypeError):
  pass
print(json.dumps({'seconds': seconds, 'splits': manifest['splits'], 'self_kib': peak,
                  'children_kib': usage['children'].ru_maxrss,
                  'self_cpu_s': usage['self'].ru_utime + usage['self'].ru_stime
                                - before.ru_utime - before.ru_stime,  # the build only
                  'children_cpu_s': usage['children'].ru_utime + usage['children'].ru_stime}))
"""


def write_corpus(directory: pathlib.Path, total_chars: int) -> dict:
  """Writes one .txt per source file holding total_chars / files characters; returns its facts."""
  sources = sorted(PRETRAIN.glob('*/*.txt'))
  if not sources:
    sys.exit(f'{PRETRAIN} holds no .txt files (a fresh clone has no ../shared)')
  directory.mkdir(parents=True, exist_ok=True)
  share = total_chars // len(sources)
  copies = 0
  for source in sources:
    text = source.read_text(encoding='utf-8')
    left = share
    with open(directory / source.name, 'w', encoding='utf-8') as f:
      k = 0
      while left > 0:
        # Copy k of the file: '(copy k) ' before each paragraph (k = 0 is the file itself).
        part = text if k == 0 else f'(copy {k}) ' + re.sub(r'(\n[ \t]*\n)', rf'\1(copy {k}) ',
                                                          text)
        if len(part) > left:  # the last piece: cut at a paragraph break
          cut = part.rfind('\n\n', 0, left)
          part, left = part[:cut if cut > 0 else left], 0
        f.write(part + '\n\n')
        left -= len(part) + 2
        copies += k > 0
        k += 1
  chars = 0
  for path in directory.glob('*.txt'):  # a block at a time: this process stays small
    with open(path, encoding='utf-8') as f:
      while block := f.read(1 << 24):
        chars += len(block)
  return {'dir': str(directory), 'chars': chars, 'files': len(sources), 'repeated_copies': copies}


def run_child(overrides: dict, out: pathlib.Path, workers: int) -> dict:
  """Returns what the child build reported (seconds, splits, peak RSS in KiB)."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  args = json.dumps({'overrides': overrides, 'out': str(out), 'workers': workers})
  done = subprocess.run([sys.executable, '-c', CHILD, args], cwd=REPO, env=env,
                        capture_output=True, text=True)
  if done.returncode:
    sys.exit(f'build failed (workers={workers}, out={out}):\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
  """Builds the corpora, trains the tokenizer, runs every build, prints a table and JSON."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--large_mb', type=float, default=40.0,
                      help='size of the large corpus in millions of characters; small is 1/10')
  parser.add_argument('--workers', default='1,2', help='worker counts to measure, comma-separated')
  parser.add_argument('--seq_len', type=int, default=128)
  parser.add_argument('--vocab_size', type=int, default=8000)
  parser.add_argument('--sample_mb', type=float, default=4.0,
                      help='tokenizer.sample_chars of the tokenizer build, in millions')
  parser.add_argument('--shard_mb', type=float, default=16.0,
                      help='data.shard_chars in millions of characters')
  parser.add_argument('--keep', default='', help='directory to keep the corpora and shards in')
  args = parser.parse_args()
  root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix='mlmjax_prepare_bench_'))
  sizes = {'small': int(args.large_mb * 1e5), 'large': int(args.large_mb * 1e6)}
  corpora = {name: write_corpus(root / f'corpus_{name}', chars) for name, chars in sizes.items()}
  for name, c in corpora.items():
    print(f'corpus {name}: {c["chars"] / 1e6:,.1f} M characters in {c["files"]} files '
          f'({c["repeated_copies"]} repeated, perturbed copies of a file)', flush=True)
  base = {'data.shard_chars': int(args.shard_mb * 1e6), 'train.seq_len': args.seq_len,
          'tokenizer.vocab_size': args.vocab_size}
  first = run_child({**base, 'data.corpus': f'{root}/corpus_small/*.txt',
                     'tokenizer.sample_chars': int(args.sample_mb * 1e6)},
                    root / 'tokenizer_build', 1)
  tokenizer = root / 'tokenizer_build' / 'tokenizer.model'
  print(f'tokenizer build (small corpus, 1 worker, tokenizer trained on a '
        f'{args.sample_mb:g} M-character sample): {first["seconds"]:.1f} s', flush=True)
  results = []
  print(f'{"corpus":>7} {"workers":>7} {"seconds":>8} {"CPU s":>6} {"tokens":>12} {"tokens/s":>10} '
        f'{"MB/s":>6} {"bytes/token":>11} {"peak RSS MB (main, largest worker)":>36}')
  for name in sizes:
    for workers in (int(w) for w in args.workers.split(',')):
      out = root / f'shards_{name}_w{workers}'
      r = run_child({**base, 'data.corpus': f'{root}/corpus_{name}/*.txt',
                     'tokenizer.path': str(tokenizer)}, out, workers)
      tokens = sum(s['tokens'] for s in r['splits'].values())
      disk = sum(s['bytes'] for s in r['splits'].values())
      row = {'corpus': name, 'chars': corpora[name]['chars'], 'workers': workers,
             'seconds': round(r['seconds'], 2),
             'cpu_seconds': round(r['self_cpu_s'] + r['children_cpu_s'], 2), 'tokens': tokens,
             'tokens_per_s': round(tokens / r['seconds']),
             'chars_per_s': round(corpora[name]['chars'] / r['seconds']),
             'disk_bytes_per_token': round(disk / tokens, 3),
             'peak_rss_main_mb': round(r['self_kib'] / 1024),
             'peak_rss_worker_mb': round(r['children_kib'] / 1024) if workers > 1 else 0}
      results.append(row)
      print(f'{name:>7} {workers:>7} {row["seconds"]:>8.1f} {row["cpu_seconds"]:>6.1f} {tokens:>12,} '
            f'{row["tokens_per_s"]:>10,} {row["chars_per_s"] / 1e6:>6.2f} '
            f'{row["disk_bytes_per_token"]:>11.3f} '
            f'{row["peak_rss_main_mb"]:>22,} {row["peak_rss_worker_mb"]:>13,}', flush=True)
  print(json.dumps({'corpora': corpora, 'results': results}))


if __name__ == '__main__':
  main()
