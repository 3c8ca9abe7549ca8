"""Fine-tuning configs: get_config('tiny'|'retrieve_tiny'|'bbc'|'brown_pos'|'bible').

Each builds on the `tiny` pretraining config (configs/pretrain.py) and adds the task sections.
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

from configs import pretrain

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
  c = pretrain.get_config('tiny')
  c.unlock()
  c.variant = arg
  c.task = task  # 'classify', 'tag' or 'retrieve' (mlmjax/tasks/)

  c.task_data = ml_collections.ConfigDict()
  c.task_data.path = ''  # JSON Lines file, or 'embedded:pydoc_library' / 'embedded:pydoc_signature'
  c.task_data.text_field = 'text'  # classify: the text
  c.task_data.title_field = ''  # classify: a field prepended to the text ('' = none)
  c.task_data.label_field = 'label'  # classify: the class name
  c.task_data.tokens_field = 'tokens'  # tag: the list of words
  c.task_data.tags_field = 'tags'  # tag: one tag per word
  c.task_data.query_field = 'query'  # retrieve: the query text
  c.task_data.document_field = 'document'  # retrieve: the text to find
  c.task_data.id_field = 'id'  # splits hash this field; '' hashes the example's content
  c.task_data.group_field = ''  # examples sharing this field's value stay in one split (e.g. 'doc')
  c.task_data.val_fraction = 0.1  # share of examples (or groups) for validation, by hash
  c.task_data.test_fraction = 0.1  # share for the final test, by hash
  c.task_data.max_examples = 0  # keep the first N examples of the file; 0 keeps all
  c.task_data.tag_map = ''  # tag: '' keeps the tags as they are; 'brown_coarse' (README)

  c.classify = ml_collections.ConfigDict()
  # Sentence vector: 'mean' over tokens, or 'cls' (the [CLS] hidden state). MLM pretraining here
  # has no sentence-level task, so [CLS] is not trained to summarize (docs/results.md).
  c.classify.pooling = 'mean'

  c.retrieve = ml_collections.ConfigDict()
  c.retrieve.pooling = 'mean'  # embedding: 'mean' over tokens or 'cls'
  c.retrieve.temperature = 0.05  # softmax temperature of the in-batch-negatives loss (cosine scores)
  c.retrieve.num_candidates = 0  # evaluation candidates: the split's first N documents; 0 = all

  for k, v in data.items():
    c.task_data[k] = v
  c.train.seq_len = train['seq_len']
  c.train.batch_size = train['batch_size']
  c.train.num_steps = train['num_steps']
  c.model.dropout_rate = 0.1  # fine-tuning regularizer (pretraining tiny uses none)
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = max(train['num_steps'] // 10, 1)
  c.eval.every_steps = max(train['num_steps'] // 5, 1)
  c.eval.at_start = True  # the starting point's numbers, for the before/after comparison
  c.eval.batch_size = 64
  c.ckpt.every_steps = c.eval.every_steps
  c.ckpt.max_to_keep = 2
  c.lock()
  return c
