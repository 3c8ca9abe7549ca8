"""Text with planted near-duplicates for the near-duplicate tests: unrelated pieces, edits, a task."""

import functools
import json
import re

from pydoc_data.topics import topics

from mlmjax import near_dups

TOPICS = [topics[k] for k in sorted(topics)]


@functools.cache
def unrelated() -> tuple[str, ...]:
  """Returns 200-word pieces of the help topics that share under 20% of their 8-grams with any other."""
  pieces = []
  for doc in TOPICS:
    lines, words = [], 0
    for line in doc.splitlines():  # whole lines, so that line breaks survive for the edits
      lines.append(line)
      words += len(line.split())
      if words >= 200:
        pieces.append('\n'.join(lines))
        lines, words = [], 0
  sets = [near_dups.shingles(p, 8) for p in pieces]
  return tuple(p for i, p in enumerate(pieces) if len(sets[i]) > 100 and all(
      len(sets[i] & sets[j]) < 0.2 * min(len(sets[i]), len(sets[j]))
      for j in range(len(pieces)) if j != i and sets[j]))


def long_docs(n: int) -> list[str]:
  """Returns n unrelated pieces of help topics, 200 words or more each."""
  docs = unrelated()
  assert len(docs) >= n
  return list(docs[:n])


def whitespace_edit(text: str) -> str:
  return re.sub(r' ', '  ', text.replace('\n', '\n\n  '))


def punctuation_edit(text: str) -> str:
  text = re.sub(r'\.(\s)', r'!\1', text.replace(',', ';'))  # sentence ends, not dotted names
  return text.replace('(', '[').replace(')', ']').upper()


def word_edit(text: str, keep: float = 0.9, ngram: int = 8) -> str:
  """Returns text with words replaced so that about `keep` of its n-grams survive.

  Each replaced word (8 or more apart) removes ngram of the original n-grams: (S - 8k) / S = keep.
  """
  words = text.split()
  s = len(near_dups.words(text)) - ngram + 1
  k = round(s * (1 - keep) / ngram)
  step = len(words) // (k + 1)
  assert step >= ngram
  for j in range(1, k + 1):
    words[j * step] = f'zqx{j}'
  return ' '.join(words)


def exact(a: str, b: str, ngram: int = 8) -> tuple[float, float]:
  """Returns the exact (Jaccard, containment of the smaller) of two texts' shingle sets."""
  x, y = near_dups.shingles(a, ngram), near_dups.shingles(b, ngram)
  inter = len(x & y)
  return inter / len(x | y), inter / min(len(x), len(y))


def same_group(groups, i, j) -> bool:
  return groups.of[i] == groups.of[j]


def finetune_config_file(tmp_path, rows) -> str:
  """Writes a fine-tuning config file over a JSON Lines file of rows; returns its spec."""
  data = tmp_path / 'task.jsonl'
  data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  cfg = tmp_path / 'ft_config.py'
  cfg.write_text(
      'from mlmjax import schema\n\n'
      'def get_config(arg="x"):\n'
      '  c = schema.defaults()\n'
      '  c.task = "classify"\n'
      f'  c.task_data.path = {str(data)!r}\n'
      '  c.task_data.val_fraction = 0.4\n'
      '  c.task_data.test_fraction = 0.4\n'
      '  return c\n')
  return f'{cfg}:x'
