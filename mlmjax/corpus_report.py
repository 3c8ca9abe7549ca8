"""What a pretraining corpus holds before a run reads it: cleaning, near-duplicates, split, overlap.

  python -m mlmjax.corpus_report --config configs/pretrain.py:tiny
  python -m mlmjax.corpus_report --config configs/pretrain.py:tiny \
      --config.data.corpus='../shared/data/pretrain/*/*.txt' \
      --against configs/finetune.py:bbc,configs/finetune.py:bible --json runs/corpus.json

Prints the cleaning counts (corpus.CleaningReport), the near-duplicate groups of data.near_dups and
the documents they moved between train and validation, how much validation text also occurs in
training (word n-grams, with and without grouping), the largest groups, and, with --against (or
data.decontaminate.configs), how many fine-tuning validation/test texts the corpus contains and how
many pretraining documents data.decontaminate.configs would drop. Reads no token cache and writes
nothing but --json.
"""

import time

from mlmjax import cli, corpus, input_pipeline, near_dups
from mlmjax.tasks import texts as task_texts

_EXAMPLES = 5  # largest groups quoted


def _share(stats: dict) -> str:
  return (f'{100 * stats["share"]:.1f}% of validation {stats["val_shingles"]:,} n-grams occur in '
          f'training; {stats["documents_90pct_in_train"]} of {stats["val_documents"]:,} validation '
          'documents have 90% or more of theirs there')


def report(config, *, against: str = '', log=print) -> dict:
  """Returns the report of config.data as a dict, printing its lines through log."""
  data = config.data
  near_dups.check(data)
  t = time.perf_counter()
  docs, cleaning = corpus.load_documents(data)
  log(f'corpus {data.corpus!r}: {len(docs):,} documents after cleaning '
      f'({time.perf_counter() - t:.1f} s)\n{cleaning.summary()}')
  out = {'corpus': data.corpus, 'cleaning': {'documents_in': cleaning.documents_in,
                                             'documents_out': cleaning.documents_out,
                                             'dropped': cleaning.dropped}}
  nd = data.near_dups
  t = time.perf_counter()
  split = input_pipeline.split_corpus(docs, data.val_fraction, nd)
  train, val, stats = split.train, split.val, split.stats
  alone_train, alone_val = input_pipeline.split_documents(docs, data.val_fraction)
  log(f'near_dups (word {nd.ngram}-grams, Jaccard >= {nd.threshold} or {nd.containment} inside, '
      f'{nd.num_perm} permutations): '
      f'{input_pipeline.near_dup_text(stats)} ({time.perf_counter() - t:.1f} s)')
  log(f'split (val_fraction {data.val_fraction}): {len(train):,} train, {len(val):,} validation '
      'documents')
  pick = lambda idx: [docs[i] for i in idx]
  grouped = near_dups.shared_shingles(pick(train), pick(val), int(nd.ngram))
  alone = near_dups.shared_shingles(pick(alone_train), pick(alone_val), int(nd.ngram))
  log(f'validation text in training, grouped: {_share(grouped)}')
  log(f'validation text in training, each document hashed alone: {_share(alone)}')
  largest = sorted(split.groups.sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:_EXAMPLES]
  for first, size in largest:
    log(f'  group of {size}: {docs[first][:90]!r}')
  out.update(near_dups=stats, split={'train': len(train), 'val': len(val)},
             val_in_train={'grouped': grouped, 'alone': alone},
             largest_groups=[{'size': n, 'first': docs[i][:200]} for i, n in largest])
  specs = against or data.decontaminate.configs
  if not specs:
    return out
  key = '--against' if against else 'data.decontaminate.configs'
  min_share = float(data.decontaminate.min_share)
  spans, every = {}, []
  for spec in filter(None, (x.strip() for x in specs.split(','))):
    texts = task_texts.eval_texts(spec, key=key)
    spans[spec] = slice(len(every), len(every) + len(texts))
    every += texts
  found = near_dups.contained(docs, every, ngram=int(nd.ngram), min_share=min_share)
  out['overlap'] = {'configs': specs, 'min_share': min_share, **found.stats(), 'by_config': {}}
  for spec, span in spans.items():
    s = found.stats(span)
    log(f'overlap with {spec} (validation and test, {s["of_texts"]:,} texts): {s["texts"]:,} '
        f'({100 * s["texts"] / max(s["of_texts"], 1):.1f}%) hold >= {min_share} of their '
        f'{nd.ngram}-grams in one of {s["documents"]:,} pretraining documents')
    out['overlap']['by_config'][spec] = s
  log(f'data.decontaminate.configs={specs!r} would drop {out["overlap"]["documents"]:,} of '
      f'{len(docs):,} pretraining documents')
  return out


def main(argv=None) -> None:
  """Parses --config, --against and --json, and prints the report."""

  def define(flags, flag_values):
    flags.DEFINE_string('against', '', 'Fine-tuning configs (comma-separated, e.g. '
                        'configs/finetune.py:bible) whose validation and test texts are looked '
                        'for in the corpus; default data.decontaminate.configs.',
                        flag_values=flag_values)
    flags.DEFINE_string('json', '', 'Also write the report as JSON to this file.',
                        flag_values=flag_values)

  f = cli.parse_flags(argv, define, prog='mlmjax.corpus_report',
                      config_help='A pretraining config, e.g. configs/pretrain.py:tiny.')
  if f.config is None:
    cli.fail('usage: python -m mlmjax.corpus_report --config configs/pretrain.py:tiny '
             '[--config.data.corpus=...] [--against configs/finetune.py:bbc] [--json out.json]')
  with cli.user_errors((ValueError, FileNotFoundError, PermissionError)):
    out = report(f.config, against=f.against)
    if f.json:
      cli.write_json(f.json, out)


if __name__ == '__main__':
  main()
