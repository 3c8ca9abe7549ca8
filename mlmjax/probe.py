"""Evaluates every kept checkpoint of an MLM run at the run's own fixed evaluation masks.

  python -m mlmjax.probe --workdir runs/x [--out runs/x/probe] [--buckets 4] [--num_batches N]

Writes probe.csv, probe.md and probe.png to --out (default WORKDIR/probe); docs/recipes.md has the
columns and the frequency-bucket rule.
"""

import argparse
import csv
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mlmjax import checkpoint, input_pipeline, losses, masking, predict, schema, tasks
from mlmjax.tasks import mlm as mlm_task
from mlmjax.tasks import mlm_eval

OUT_DIR = 'probe'
FILES = ('probe.csv', 'probe.md', 'probe.png')
# Rows of the token cache counted per np.bincount call: bounded memory on a memory-mapped cache.
_COUNT_CHUNK_ROWS = 65_536


def kept_steps(workdir) -> list[int]:
  """Returns the committed checkpoint steps of an MLM workdir, ascending (raises if none)."""
  workdir = pathlib.Path(workdir)
  if not (workdir / 'config.json').is_file():
    raise FileNotFoundError(f'{workdir} holds no config.json: is it a workdir written by '
                            'mlmjax.train?')
  config = schema.upgrade(json.loads((workdir / 'config.json').read_text()))
  if not issubclass(tasks.get_task_class(str(config.task)), mlm_task.MlmTask):
    raise ValueError(f'{workdir} was trained with task {config.task!r}: the probe evaluates MLM '
                     'runs (task mlm) only')
  ckpt_dir = workdir / 'checkpoints'
  steps = []
  if ckpt_dir.is_dir():
    reader = checkpoint.Checkpointer(ckpt_dir, log=lambda s: None, read_only=True)
    try:
      steps = reader.all_steps()
    finally:
      reader.close()
  if not steps:
    raise FileNotFoundError(f'{workdir} has no checkpoints ({ckpt_dir} holds no step): train it '
                            'first (keep milestones with ckpt.keep_every)')
  return steps


def token_counts(rows: np.ndarray, vocab_size: int) -> np.ndarray:
  """Returns (vocab_size,) int64 occurrences of each id in token rows, counted chunk by chunk."""
  counts = np.zeros(vocab_size, np.int64)
  for start in range(0, len(rows), _COUNT_CHUNK_ROWS):
    chunk = np.asarray(rows[start:start + _COUNT_CHUNK_ROWS]).ravel()
    counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
  return counts


def frequency_buckets(counts: np.ndarray, special_mask: np.ndarray,
                      num_buckets: int) -> tuple[np.ndarray, list[str], list[float]]:
  """Returns (bucket of each id, -1 for specials; names 'top1-12'; each bucket's training share).

  Regular ids are ranked by training count (most frequent first, ties by lower id). Bucket k ends
  at the id where the cumulative count first reaches (k + 1) / num_buckets of all occurrences
  (that id included), with at least one id per bucket; ids never seen in training rank last.
  """
  special_mask = np.asarray(special_mask, bool)
  ids = np.flatnonzero(~special_mask)
  if num_buckets < 1:
    raise ValueError(f'--buckets {num_buckets}: give at least 1')
  if num_buckets > len(ids):
    raise ValueError(f'--buckets {num_buckets}: the vocabulary has only {len(ids)} regular ids')
  order = ids[np.lexsort((ids, -counts[ids]))]
  cum = np.cumsum(counts[order])
  total = int(cum[-1])
  if total == 0:
    raise ValueError('the training rows hold no regular token: no frequencies to bucket by')
  bounds = [0]
  for k in range(1, num_buckets):
    # Integer comparison: the first rank whose cumulative count reaches k / num_buckets.
    end = int(np.argmax(cum * num_buckets >= k * total)) + 1
    bounds.append(min(max(end, bounds[-1] + 1), len(order) - (num_buckets - k)))
  bounds.append(len(order))
  bucket_of = np.full(len(special_mask), -1, np.int32)
  names, shares = [], []
  for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    bucket_of[order[lo:hi]] = k
    names.append(f'top{lo + 1}-{hi}')
    shares.append(float(counts[order[lo:hi]].sum()) / total)
  return bucket_of, names, shares


def make_probe_step(graphdef, spec: masking.MaskingSpec, cls_id: int, num_buckets: int):
  """Returns jitted (params, tokens, key, unigram, successor, bucket_of) -> metric sums.

  The sums of mlm_eval.make_eval_step (same masks, same forward) plus, per frequency bucket of the
  target, hits and counts at [MASK] positions ('bucket_correct_mask', 'bucket_count_mask': (K,)).
  """

  def bucket_sums(mb, logits, bucket_of):
    at_mask = mb.weights.astype(jnp.float32) * (mb.kinds == masking.KIND_MASK)
    # (B, P, K) one-hot of each target's bucket (a special id's -1 gives a zero row): a segment sum.
    onehot = jax.nn.one_hot(bucket_of[mb.labels], num_buckets, dtype=jnp.float32)
    hits = (jnp.argmax(logits, axis=-1) == mb.labels).astype(jnp.float32)
    return {'bucket_correct_mask': jnp.einsum('bp,bpk->k', at_mask * hits, onehot),
            'bucket_count_mask': jnp.einsum('bp,bpk->k', at_mask, onehot)}

  return mlm_eval.make_eval_step(graphdef, spec, cls_id, extra_sums=bucket_sums)


def _ratio(num: float, den: float) -> float:
  return float(num) / float(den) if den > 0 else math.nan


def row_of(step: int, sums: dict, names: list[str]) -> dict:
  """Returns one table row (column -> number) of a checkpoint's metric sums."""
  scalars = {k: float(v) for k, v in sums.items() if np.ndim(v) == 0}
  m = losses.finalize_metrics(scalars)
  n_mask = scalars['count_mask']
  unigram = _ratio(scalars['baseline_unigram_correct_mask'], n_mask)
  bigram = _ratio(scalars['baseline_bigram_correct_mask'], n_mask)
  row = {'step': int(step), 'loss': m['loss'], 'accuracy': m['accuracy'],
         'acc_mask': m['accuracy_at_mask']}
  for k, name in enumerate(names):
    row[f'acc_mask_{name}'] = _ratio(sums['bucket_correct_mask'][k], sums['bucket_count_mask'][k])
  row['gap_unigram'] = m['accuracy_at_mask'] - unigram
  row['gap_bigram'] = m['accuracy_at_mask'] - bigram
  row['n_mask'] = int(round(n_mask))
  for k, name in enumerate(names):
    row[f'n_mask_{name}'] = int(round(float(sums['bucket_count_mask'][k])))
  row['unigram_acc_mask'], row['bigram_acc_mask'] = unigram, bigram
  return row


def probe(workdir, out=None, *, buckets: int = 4, num_batches: int | None = None,
          log=print) -> list[dict]:
  """Evaluates every kept checkpoint of workdir; writes probe.csv/.md/.png to out; returns rows."""
  workdir = pathlib.Path(workdir)
  out = pathlib.Path(out) if out else workdir / OUT_DIR
  steps = kept_steps(workdir)
  # Config, tokenizer, task and the newest parameters that restore (damaged steps skipped): once.
  run = predict.load_run(workdir, 'latest')
  task, config = run.impl, run.config
  task.log = log
  task.prepare(workdir)  # the run's token cache (rebuilt from the corpus if it was deleted)
  n = int(config.eval.num_batches) if num_batches is None else int(num_batches)
  batches = input_pipeline.eval_batches(task.cache.val_rows, batch_size=int(config.eval.batch_size),
                                        num_batches=n, pad_id=task.tokenizer.pad_id)
  if not batches:
    raise ValueError(f'{workdir}: the validation split is empty; nothing to evaluate')
  vocab = task.tokenizer.vocab_size
  bucket_of, names, shares = frequency_buckets(
      token_counts(task.cache.train_rows, vocab), task.tokenizer.special_mask, buckets)
  log(f'probe: {workdir}, steps {", ".join(map(str, steps))}; {len(batches)} validation batches '
      f'of {config.eval.batch_size}; buckets by training frequency: '
      + ', '.join(f'{nm} ({100 * s:.1f}%)' for nm, s in zip(names, shares)))
  step_fn = make_probe_step(run.graphdef, task.eval_spec, task.tokenizer_cls_id(), len(names))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        run.params)
  args = dict(seed=int(config.eval.seed), unigram=int(task.unigram), successor=task.successor,
              extra=(jnp.asarray(bucket_of),))
  rows = []
  for step in steps:
    if step > run.step:
      log(f'WARNING: checkpoint step {step} does not restore; skipping it')
      continue
    try:
      params = run.params if step == run.step else checkpoint.restore_params_in(
          workdir / 'checkpoints', target, what=f'workdir {workdir}', log=log, step=step)[1]
    except FileNotFoundError as e:  # a damaged milestone: the others still make the table
      log(f'WARNING: {e}; skipping it')
      continue
    rows.append(row_of(step, mlm_eval.sum_batches(step_fn, params, batches, **args), names))
    log(f'  step {step}: loss {rows[-1]["loss"]:.4f}, acc@[MASK] {rows[-1]["acc_mask"]:.4f}')
  out.mkdir(parents=True, exist_ok=True)
  write_csv(out / FILES[0], rows)
  caption = (f'{workdir}: {len(batches)} validation batches of {config.eval.batch_size} at the '
             f'fixed masks (eval.seed {config.eval.seed}, eval.rate {config.eval.rate}); buckets '
             'of the target by training frequency: '
             + ', '.join(f'{nm} {100 * s:.1f}% of tokens' for nm, s in zip(names, shares)))
  (out / FILES[1]).write_text(f'{caption}\n\n{markdown_table(rows)}\n', encoding='utf-8')
  plot(out / FILES[2], rows, names, title=str(workdir))
  return rows


def write_csv(path, rows: list[dict]) -> None:
  """Writes rows (same columns each) as CSV with a header line."""
  with open(path, 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def _cell(v) -> str:
  if isinstance(v, int):
    return str(v)
  return 'nan' if math.isnan(v) else f'{v:.4f}'


def markdown_table(rows: list[dict]) -> str:
  """Returns rows as a Markdown table (floats to 4 decimals)."""
  cols = list(rows[0])
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '|'.join('---:' for _ in cols) + '|']
  lines += ['| ' + ' | '.join(_cell(r[c]) for c in cols) + ' |' for r in rows]
  return '\n'.join(lines)


def plot(path, rows: list[dict], names: list[str], *, title: str = '') -> None:
  """Writes a PNG of accuracy at [MASK] vs step: per bucket, overall, and the two baselines."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(7, 4.5))
  FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
  ax = fig.subplots()
  steps = [r['step'] for r in rows]
  for name in names:
    ax.plot(steps, [r[f'acc_mask_{name}'] for r in rows], marker='.',
            label=f'targets ranked {name[3:]}')
  ax.plot(steps, [r['acc_mask'] for r in rows], color='black', lw=2, marker='o', label='all')
  for key, label, style in (('unigram_acc_mask', 'unigram baseline', ':'),
                            ('bigram_acc_mask', 'bigram baseline', '--')):
    ax.axhline(rows[-1][key], color='gray', lw=1, ls=style, label=label)
  ax.set_xlabel('step')
  ax.set_ylabel('accuracy at [MASK]')
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  """Parses --workdir, --out, --buckets and --num_batches; writes and prints the probe table."""
  parser = argparse.ArgumentParser(prog='python -m mlmjax.probe', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='an MLM workdir written by mlmjax.train')
  parser.add_argument('--out', default='', help='output directory (default WORKDIR/probe)')
  parser.add_argument('--buckets', type=int, default=4,
                      help='token-frequency buckets of equal training-token share')
  parser.add_argument('--num_batches', type=int, default=None,
                      help="validation batches (default: the run's eval.num_batches; 0 = all); "
                      'another number no longer matches metrics.jsonl')
  args = parser.parse_args(argv)
  if args.num_batches is not None and args.num_batches < 0:
    parser.error('--num_batches must be >= 0 (0 = the whole validation split)')
  try:
    rows = probe(args.workdir, args.out or None, buckets=args.buckets,
                 num_batches=args.num_batches, log=lambda s: print(s, file=sys.stderr))
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  out = pathlib.Path(args.out or pathlib.Path(args.workdir) / OUT_DIR)
  print(markdown_table(rows))
  print(f'wrote {", ".join(str(out / f) for f in FILES)}')


if __name__ == '__main__':
  main()
