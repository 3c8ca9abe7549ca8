"""A task's training-split text as a JSON Lines corpus, for task-adaptive MLM before fine-tuning.

  python -m mlmjax.tasks.texts --config configs/finetune.py:bible --out runs/tapt/bible.jsonl
  python -m mlmjax.train --config configs/dapt.py:tiny --workdir runs/tapt/bible \
      --config.init_from=runs/pretrain --config.data.corpus=runs/tapt/bible.jsonl \
      --config.data.min_chars=1

Only the training split is written, split by the same hash as fine-tuning (task_data.split_rows with
the config's id/group fields and fractions), so MLM on the file never reads validation or test text.
Each example gives its unlabeled text, one {"text": ...} line each: classify its text (after its
title when task_data.title_field is set), tag its words joined by spaces, retrieve its query and its
document as two lines. Labels are never written.
"""

import json
import os
import pathlib
import sys

from mlmjax.tasks import task_data as td

TASKS = ('classify', 'tag', 'retrieve')


def title_and_text(title: str, text: str) -> str:
  """Returns 'title. text' (no extra period when the title already ends a sentence)."""
  title = title.strip()
  if not title:
    return text
  return f'{title} {text}' if title[-1] in '.!?' else f'{title}. {text}'


def example_texts(config, row: dict, i: int, path: str) -> list[str]:
  """Returns the unlabeled text(s) of example `row` (line i of path) for config.task (in TASKS)."""
  cfg, task = config.task_data, str(config.get('task', 'mlm'))
  if task == 'classify':
    text = td.text_field(row, cfg.text_field, i, path, key='text_field')
    if cfg.title_field:
      text = title_and_text(td.text_field(row, cfg.title_field, i, path, key='title_field'), text)
    return [text]
  if task == 'tag':
    words = td.field(row, cfg.tokens_field, i, path, key='tokens_field')
    if not isinstance(words, list):
      raise ValueError(f'task_data.tokens_field: {cfg.tokens_field!r} must be a list in row {i} '
                       f'of {path}')
    return [' '.join(str(w) for w in words)]
  return [td.text_field(row, cfg.query_field, i, path, key='query_field'),
          td.text_field(row, cfg.document_field, i, path, key='document_field')]


def train_texts(config) -> list[str]:
  """Returns the unlabeled texts of the training split of config.task_data, in file order."""
  task = str(config.get('task', 'mlm'))
  if task not in TASKS:
    raise ValueError(f'task: {task!r} has no task data to export; use a fine-tuning config (task '
                     f'{", ".join(map(repr, TASKS))})')
  path = str(config.task_data.path)
  rows = td.read_examples(path, max_examples=int(config.task_data.max_examples))
  splits = td.split_rows(rows, path, config.task_data)
  texts = [t for i, (row, split) in enumerate(zip(rows, splits), 1) if split == 'train'
           for t in example_texts(config, row, i, path)]
  if not texts:
    raise ValueError(f'{path}: the train split is empty; lower task_data.val_fraction / '
                     'task_data.test_fraction or add examples')
  return texts


def write_jsonl(texts, out) -> pathlib.Path:
  """Writes one {"text": ...} object per line through a temporary file; returns the path."""
  out = pathlib.Path(out)
  if out.suffix != '.jsonl':
    raise ValueError(f'--out {out}: name a .jsonl file (data.corpus reads .jsonl by its suffix)')
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    for text in texts:
      f.write(json.dumps({'text': text}, ensure_ascii=False) + '\n')
  os.replace(tmp, out)
  return out


def main(argv=None) -> None:
  """Parses --config/--out and writes the training split's text."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from mlmjax import train  # pylint: disable=g-import-not-at-top

  flags_ = flags.FlagValues()
  argv = sys.argv if argv is None else argv
  config_flags.DEFINE_config_file('config', None, 'A fine-tuning config, e.g. configs/finetune.py:bible.',
                                  flag_values=flags_, lock_config=True, sys_argv=argv)
  flags.DEFINE_string('out', None, 'The .jsonl file to write.', flag_values=flags_)
  train.check_config_path(argv)
  try:
    flags_(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    sys.exit(f'error: {train._flag_error(e)}')  # pylint: disable=protected-access
  if flags_.config is None or not flags_.out:
    sys.exit('usage: python -m mlmjax.tasks.texts --config configs/finetune.py:bible '
             '--out runs/tapt/bible.jsonl [--config.KEY=VALUE ...]')
  try:
    texts = train_texts(flags_.config)
    out = write_jsonl(texts, flags_.out)
  except (ValueError, FileNotFoundError, PermissionError) as e:
    sys.exit(f'error: {e}')
  print(f'wrote {len(texts)} texts of the training split of {flags_.config.task_data.path} to {out}')


if __name__ == '__main__':
  main()
