"""Fine-tuning configs: get_config('tiny'|'retrieve_tiny'|'bbc'|'brown_pos'|'bible').

  python -m mlmjax.train --config configs/finetune.py:tiny --workdir runs/cls \
      --config.init_from=runs/demo

Time on 2 CPU cores: no preset has been timed end to end. tiny is 400 steps of 16 x 128 tokens;
at the 175-220 ms measured for a tiny 16 x 128 MLM step (2026-11-27, jax 0.10.2) the steps alone
take about 1.2-1.5 minutes. Expected result: no number is recorded for tiny or retrieve_tiny
(summary.json gives test/accuracy beside baseline/majority_accuracy). For bbc, brown_pos and bible,
docs/results.md has test numbers from a tiny pretrained on 262 M tokens (untied embeddings, mean
of 3 seeds), against random init: bbc accuracy 0.939 vs 0.891, brown_pos word accuracy 0.935 vs
0.870, bible MRR 0.985 vs 0.985 (0.987 after task-adaptive MLM). From a smaller pretrained run
(e.g. the demo's) expect less.

Each builds on the `tiny` pretraining config (configs/pretrain.py) and sets the task sections
(task_data, classify, retrieve; every config has them, see mlmjax/schema.py).
Start from a pretrained run with --config.init_from=runs/pretrain: its encoder weights and its
tokenizer are loaded, the task head starts fresh. Without init_from the encoder starts random
(set tokenizer.path to compare with a pretrained run on the same pieces).

  tiny           classify embedded Python docstrings by their library (no ../shared needed)
  retrieve_tiny  retrieve a function's signature from its docstring (embedded, no ../shared)
  bbc            ../shared/data/tasks/bbc_news_topic5.jsonl: 5 topics (accuracy, macro-F1)
  brown_pos      ../shared/data/tasks/brown_pos_tagged.jsonl: coarse part of speech per word
  bible          ../shared/data/tasks/bible_kjv_web_verses.jsonl: KJV verse -> WEB verse retrieval
"""

import ml_collections

from mlmjax.configs import pretrain

SHARED_TASKS = '../shared/data/tasks'

# name: (task, task_data overrides, train overrides, section overrides)
_PRESETS = {
    'tiny': ('classify', dict(path='embedded:pydoc_library'),
             dict(seq_len=128, batch_size=16, num_steps=400), {}),
    'retrieve_tiny': ('retrieve', dict(path='embedded:pydoc_signature', query_field='query',
                                       document_field='document'),
                      dict(seq_len=64, batch_size=32, num_steps=400), {}),
    'bbc': ('classify', dict(path=f'{SHARED_TASKS}/bbc_news_topic5.jsonl', text_field='text',
                             title_field='title', label_field='label', id_field='id'),
            dict(seq_len=256, batch_size=16, num_steps=300), {}),
    'brown_pos': ('tag', dict(path=f'{SHARED_TASKS}/brown_pos_tagged.jsonl', tokens_field='tokens',
                              tags_field='tags', id_field='', group_field='doc',
                              tag_map='brown_coarse'),
                  # 96: about 1% of sentences lose words at the end (7% at 64), with 8,000 pieces.
                  dict(seq_len=96, batch_size=32, num_steps=600), {}),
    'bible': ('retrieve', dict(path=f'{SHARED_TASKS}/bible_kjv_web_verses.jsonl', query_field='a',
                               document_field='b', id_field='ref'),
              dict(seq_len=64, batch_size=32, num_steps=600), {}),
}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  """Returns the locked fine-tuning config for preset `arg`."""
  if arg not in _PRESETS:
    raise ValueError(f'configs/finetune.py: unknown variant {arg!r}; choose one of {sorted(_PRESETS)}')
  task, data, train, _ = _PRESETS[arg]
  c = pretrain.get_config('tiny')  # locked: presets set values of keys mlmjax/schema.py defines
  c.variant = arg
  c.task = task  # 'classify', 'tag' or 'retrieve' (mlmjax/tasks/)

  for k, v in data.items():
    c.task_data[k] = v
  c.train.seq_len = train['seq_len']
  c.train.batch_size = train['batch_size']
  c.train.num_steps = train['num_steps']
  c.model.dropout_rate = 0.1  # fine-tuning regularizer (pretraining tiny uses none)
  c.optim.decay, c.optim.decay_fraction = 'linear', 0.0  # linear decay over the whole fine-tune
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = max(train['num_steps'] // 10, 1)
  c.eval.every_steps = max(train['num_steps'] // 5, 1)
  c.eval.at_start = True  # the starting point's numbers, for the before/after comparison
  c.eval.batch_size = 64
  c.ckpt.every_steps = c.eval.every_steps
  c.ckpt.max_to_keep = 2
  return c
