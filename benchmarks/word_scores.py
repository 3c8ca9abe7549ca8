"""Prints whole-word MLM scores of MLM workdirs on held-out text: comparable across tokenizers.

  python benchmarks/word_scores.py runs/dapt runs/dapt_ext --max_texts 400
  python benchmarks/word_scores.py runs/dapt runs/dapt_ext --corpus '../shared/data/pretrain/general/*.txt'

For each corpus (default: the first run's data.corpus and, for a DAPT run, eval.other_corpus) the
first run's held-out documents (its data.val_fraction split, near-duplicates grouped) are cut into
windows of the same words (a window any run's tokenizer cannot fit is skipped by all) and the same
15% of words are masked whole (mlm_eval.whole_word_scores); every workdir (its latest checkpoint, or
best/ when it kept one) is scored on them. Printed per run and
corpus: pieces per word over all words, nats per character and per word of the masked words, and
whole-word accuracy. MLM loss per masked piece is not comparable between tokenizations; these are,
because every run scores the same words of the same text.
"""

import argparse
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from mlmjax import input_pipeline, predict  # pylint: disable=g-import-not-at-top
from mlmjax.tasks import mlm_eval  # pylint: disable=g-import-not-at-top


def held_out(config, corpus_spec: str, max_texts: int) -> list[str]:
  """Returns the first max_texts validation documents of corpus_spec under config's data split."""
  data = config.data.copy_and_resolve_references()
  with data.unlocked():
    data.corpus = corpus_spec
  docs = input_pipeline.cleaned_documents(data, input_pipeline.cache_root(data), log=lambda _: None)
  split = input_pipeline.split_corpus(docs, data.val_fraction, data.near_dups)
  return [docs[i] for i in split.val[:max_texts]]


def main() -> None:
  """Parses the workdirs and options, prints one line per run and corpus."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('workdirs', nargs='+')
  p.add_argument('--corpus', action='append', default=[],
                 help="data.corpus values to score (repeatable); default the run's own and "
                      'eval.other_corpus')
  p.add_argument('--max_texts', type=int, default=400, help='held-out documents per corpus')
  p.add_argument('--rate', type=float, default=0.15, help='share of words masked')
  p.add_argument('--json', default='', help='also write the numbers to this file')
  args = p.parse_args()
  runs = [predict.load_run(w) for w in args.workdirs]
  for workdir, run in zip(args.workdirs, runs):
    if run.task != 'mlm':
      sys.exit(f'error: {workdir} is a {run.task!r} run; word scores need an MLM run')
  specs = args.corpus or [c for c in (runs[0].config.data.corpus, runs[0].config.eval.other_corpus)
                          if c]
  seq_len = int(runs[0].config.train.seq_len)
  out = []
  for spec in specs:
    texts = held_out(runs[0].config, spec, args.max_texts)  # the first run's split, for every run
    # Windows any run's tokenizer cannot fit are skipped by all: every run scores the same words.
    skip = frozenset().union(*(mlm_eval.whole_word_rows(r.tokenizer, texts, seq_len)['dropped']
                               for r in runs))
    for workdir, run in zip(args.workdirs, runs):
      words = [w for t in texts for w in t.split()]
      pieces = sum(len(x) for x in run.tokenizer.encode_batch(words))
      scores = mlm_eval.whole_word_scores(run.graphdef, run.params, run.tokenizer, texts,
                                          seq_len=seq_len, rate=args.rate, skip=skip)
      row = {'workdir': workdir, 'step': run.step, 'vocab_size': run.tokenizer.vocab_size,
             'corpus': spec, 'texts': len(texts), 'skipped_windows': len(skip),
             'fertility': pieces / max(len(words), 1), **scores}
      out.append(row)
      print(f'{workdir} (step {run.step}, {run.tokenizer.vocab_size} pieces) on {spec}: '
            f'{row["fertility"]:.3f} pieces/word, {scores["words"]:,} masked words '
            f'({scores["chars"]:,} chars; {len(skip)} windows skipped): '
            f'{scores["nats_per_char"]:.4f} nats/char, {scores["nats_per_word"]:.3f} nats/word, '
            f'word accuracy {100 * scores["word_accuracy"]:.2f}%', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
