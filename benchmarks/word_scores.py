"""Prints whole-word MLM scores of MLM workdirs on held-out text: comparable across tokenizers.

  python benchmarks/word_scores.py runs/dapt runs/dapt_ext --max_texts 400
  python benchmarks/word_scores.py runs/dapt runs/dapt_ext --corpus '../shared/data/pretrain/general/*.txt'

For each workdir (its latest checkpoint, or best/ when it kept one) and each corpus (default: the
run's data.corpus and, for a DAPT run, eval.other_corpus), the held-out documents of the run's own
split (data.val_fraction, near-duplicates grouped) are read, cut into windows of the same words,
and the same 15% of words are masked whole (mlm_eval.whole_word_scores). Printed per run and
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
  out = []
  texts = {}
  for workdir in args.workdirs:
    run = predict.load_run(workdir)
    if run.task != 'mlm':
      sys.exit(f'error: {workdir} is a {run.task!r} run; word scores need an MLM run')
    specs = args.corpus or [c for c in (run.config.data.corpus, run.config.eval.other_corpus) if c]
    for spec in specs:
      if spec not in texts:  # the first run's split decides the texts every run is scored on
        texts[spec] = held_out(run.config, spec, args.max_texts)
      words = [w for t in texts[spec] for w in t.split()]
      pieces = sum(len(x) for x in run.tokenizer.encode_batch(words))
      scores = mlm_eval.whole_word_scores(run.graphdef, run.params, run.tokenizer, texts[spec],
                                          seq_len=int(run.config.train.seq_len), rate=args.rate)
      row = {'workdir': workdir, 'step': run.step, 'vocab_size': run.tokenizer.vocab_size,
             'corpus': spec, 'texts': len(texts[spec]), 'fertility': pieces / max(len(words), 1),
             **scores}
      out.append(row)
      print(f'{workdir} (step {run.step}, {run.tokenizer.vocab_size} pieces) on {spec}: '
            f'{row["fertility"]:.3f} pieces/word, {scores["words"]:,} masked words '
            f'({scores["chars"]:,} chars, {scores["dropped_rows"]} windows dropped): '
            f'{scores["nats_per_char"]:.4f} nats/char, {scores["nats_per_word"]:.3f} nats/word, '
            f'word accuracy {100 * scores["word_accuracy"]:.2f}%', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
