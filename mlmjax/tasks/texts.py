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

from mlmjax import cli, tasks
from mlmjax.tasks import task_data as td

def split_texts(config, splits=('train',)) -> list[str]:
  """Returns the unlabeled texts (the task's unlabeled_texts) of the given splits, in file order."""
  task = tasks.create(config, log=lambda _: None)
  if type(task).unlabeled_texts is tasks.Task.unlabeled_texts:
    raise ValueError(f'task: {config.task!r} has no task data to export; use a fine-tuning config '
                     '(e.g. configs/finetune.py:bible)')
  path = str(config.task_data.path)
  rows = td.load_examples(config, getattr(task, 'example_fields', tuple)())
  split_of = td.split_rows(rows, path, config.task_data)
  return [t for i, (row, split) in enumerate(zip(rows, split_of), 1) if split in splits
          for t in task.unlabeled_texts(row, i, path)]


def train_texts(config) -> list[str]:
  """Returns the unlabeled texts of the training split (an error when it is empty)."""
  texts = split_texts(config, ('train',))
  if not texts:
    path = config.task_data.path
    raise ValueError(f'{path}: the train split is empty; lower task_data.val_fraction / '
                     'task_data.test_fraction or add examples')
  return texts


def eval_texts(specs: str, *, key: str = 'data.decontaminate.configs') -> list[str]:
  """Returns the validation and test texts of each fine-tuning config in comma-separated specs."""
  texts = []
  for spec in filter(None, (s.strip() for s in str(specs).split(','))):
    try:
      config = cli.load_config(spec, key=key)
    except (ImportError, AttributeError) as e:
      raise ValueError(f'{key}: cannot load {spec!r} ({e})') from None
    texts += split_texts(config, ('val', 'test'))
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

  def define(flags, flag_values):
    flags.DEFINE_string('out', None, 'The .jsonl file to write.', flag_values=flag_values)

  f = cli.parse_flags(argv, define, prog='mlmjax.tasks.texts',
                      config_help='A fine-tuning config, e.g. configs/finetune.py:bible.')
  if f.config is None or not f.out:
    cli.fail('usage: python -m mlmjax.tasks.texts --config configs/finetune.py:bible '
             '--out runs/tapt/bible.jsonl [--config.KEY=VALUE ...]')
  with cli.user_errors((ValueError, FileNotFoundError, PermissionError)):
    texts = train_texts(f.config)
    out = write_jsonl(texts, f.out)
  print(f'wrote {len(texts)} texts of the training split of {f.config.task_data.path} to {out}')


if __name__ == '__main__':
  main()
