"""Profiles one config's train step with jax.profiler and prints where the step's time goes.

  python benchmarks/profile_step.py --config mini --steps 5
  python benchmarks/profile_step.py --config mini --set model.dropout_rate=0 --top 30

The step is experiment.setup's (as benchmarks/throughput.py times it, masking included), traced for
--steps steps after two warm-up steps. Each XLA:CPU thunk of the trace (a fusion, a matmul, a
scatter) is matched by name to the compiled HLO, whose metadata names the Python line that emitted
it; times are summed per thunk and per mlmjax source line (the innermost frame in mlmjax/), as
milliseconds per step and as shares of the step's wall time. Thunks may run on both cores at once,
so shares can sum to more than 100%. On a GPU the GPU's own kernel events are counted, matched by
the HLO instruction their `hlo_op` names. --save DIR keeps the trace and the compiled HLO.
"""

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

import throughput  # pylint: disable=g-import-not-at-top
from configs import pretrain
from mlmjax import experiment, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


def hlo_sources(hlo: str) -> dict[str, tuple[str, str, str]]:
  """Returns {instruction name: (shape, op_name, innermost mlmjax 'file:line function')}."""
  files, functions, locations, frames = {}, {}, {}, {}
  table = None
  for line in hlo.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      table = line
      continue
    if table and not line.strip():
      table = None
      continue
    if table == 'FileNames':
      i, name = line.split(' ', 1)
      files[i] = name.strip('"')
    elif table == 'FunctionNames':
      i, name = line.split(' ', 1)
      functions[i] = name.strip('"')
    elif table == 'FileLocations':
      m = re.match(r'(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)', line)
      if m:
        locations[m[1]] = (files[m[2]], functions[m[3]], int(m[4]))
    elif table == 'StackFrames':
      m = re.match(r'(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)', line)
      if m:
        frames[m[1]] = (m[2], m[3])

  def innermost(frame: str) -> str:
    seen = set()
    while frame in frames and frame not in seen:
      seen.add(frame)
      loc, parent = frames[frame]
      file, function, lineno = locations[loc]
      if '/mlmjax/' in file and 'site-packages' not in file:
        return f'{pathlib.Path(file).resolve().relative_to(REPO)}:{lineno} {function}'
      frame = parent if parent != frame else None
    return '(outside mlmjax)'

  out = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+(?: \S+\]\))?) [^\n]*?'
                       r'metadata=\{op_name="([^"]*)"(?: stack_frame_id=(\d+))?', hlo, re.M):
    name, shape, op_name, frame = m.groups()
    out[name] = (shape, op_name, innermost(frame) if frame else '(no frame)')
  return out


def main() -> None:
  """Parses flags, traces the step and prints per-thunk and per-source-line times."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='mini', help='size variant of configs/pretrain.py')
  p.add_argument('--steps', type=int, default=5, help='traced steps (after 2 warm-up steps)')
  p.add_argument('--top', type=int, default=25, help='rows per table')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='config override, e.g. model.dropout_rate=0 (repeatable)')
  p.add_argument('--save', default='', help='a folder to keep the trace and the compiled HLO in')
  args = p.parse_args()
  config = pretrain.get_config(args.config)
  with config.unlocked():
    for item in args.set:
      key, value = item.split('=', 1)
      node, *path = key.split('.')
      target = config[node]
      for part in path[:-1]:
        target = target[part]
      old = target[path[-1]]
      target[path[-1]] = type(old)(value) if not isinstance(old, bool) else value == 'True'
  b, l, vocab = config.train.batch_size, config.train.seq_len, config.tokenizer.vocab_size
  mesh = sharding.make_mesh(config.mesh)
  exp = experiment.setup(config, None, mesh)
  state = exp.init_state()
  rng = np.random.default_rng(0)
  pool = [sharding.global_batch(throughput.synthetic_rows(rng, b, l, vocab), mesh)
          for _ in range(4)]
  key = jax.random.key(0)
  hlo = exp.train_step.lower(state, pool[0], key).compile().as_text()
  sources = hlo_sources(hlo)
  for i in range(2):
    state, sums = exp.train_step(state, pool[i % 4], key)
  jax.block_until_ready(sums)
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for i in range(args.steps):
        state, sums = exp.train_step(state, pool[i % 4], key)
        jax.block_until_ready(sums)
    wall = (time.perf_counter() - t0) / args.steps
    trace = next(pathlib.Path(d).rglob('*.trace.json.gz'))
    if args.save:
      os.makedirs(args.save, exist_ok=True)
      shutil.copy(trace, os.path.join(args.save, 'step.trace.json.gz'))
      pathlib.Path(args.save, 'step.hlo.txt').write_text(hlo)
    events = json.loads(gzip.decompress(trace.read_bytes()))
  events = events['traceEvents'] if isinstance(events, dict) else events
  gpu_pids = {e['pid'] for e in events if e.get('ph') == 'M' and e.get('name') == 'process_name'
              and '/device:GPU' in str(e.get('args', {}).get('name', ''))}
  by_thunk, by_line, calls = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    if e.get('ph') != 'X' or (gpu_pids and e.get('pid') not in gpu_pids):
      continue
    name = e.get('args', {}).get('hlo_op') or e['name']
    if name in sources:
      ms = e.get('dur', 0) / 1e3 / args.steps
      by_thunk[name] += ms
      by_line[sources[name][2]] += ms
      calls[name] += 1
  total = sum(by_thunk.values())
  print(f'config {args.config} {" ".join(args.set)}: batch {b} x {l}, {exp.num_params / 1e6:.2f} M '
        f'params; step wall time {wall * 1e3:.0f} ms (traced, median not taken), thunk time '
        f'{total:.0f} ms/step over {len(by_thunk)} thunks; load average {os.getloadavg()[0]:.1f}')
  print(f'\n{"ms/step":>8} {"share":>6}  thunk (shape) <- source line / op')
  for name, ms in by_thunk.most_common(args.top):
    shape, op_name, line = sources[name]
    print(f'{ms:8.1f} {100 * ms / wall / 1e3:5.1f}%  {name} {shape} <- {line} / '
          f'{op_name.removeprefix("jit(train_step)/")[:60]}')
  print(f'\n{"ms/step":>8} {"share":>6}  mlmjax source line (all its thunks)')
  for line, ms in by_line.most_common(args.top):
    print(f'{ms:8.1f} {100 * ms / wall / 1e3:5.1f}%  {line}')


if __name__ == '__main__':
  main()
