"""Tests for mlmjax/tasks/texts.py: a task's training-split text as an MLM corpus."""

import json

import pytest

from configs import finetune, pretrain
from mlmjax import corpus
from mlmjax.tasks import classify, retrieve, task_data, texts


def _write(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def _pairs(n):
  return [{'id': f'p{i}', 'query': f'query number {i} about topic {i % 7}',
           'document': f'the document that answers query {i}, topic {i % 7}'} for i in range(n)]


def test_retrieve_texts_are_the_fine_tuning_train_split(tmp_path, topics_tokenizer):
  config = finetune.get_config('retrieve_tiny')
  config.task_data.path = _write(tmp_path / 'pairs.jsonl', _pairs(200))
  config.task_data.id_field = 'id'
  task = retrieve.RetrieveTask(config, topics_tokenizer, lambda _: None)
  task.prepare(None)
  queries, documents = task.texts['train']
  assert 100 < len(queries) < 200  # about 80% of 200
  got = texts.train_texts(config)
  assert got == [t for pair in zip(queries, documents) for t in pair]
  held_out = {t for s in ('val', 'test') for part in task.texts[s] for t in part}
  assert held_out and not held_out & set(got)


def test_classify_and_tag_texts_carry_no_labels(tmp_path):
  rows = [{'id': f'r{i}', 'title': f'Title {i}', 'text': f'body text of row {i}',
           'label': f'LABEL{i % 3}', 'tokens': ['The', f'word{i}', '.'], 'tags': ['D', 'N', '.']}
          for i in range(120)]
  path = _write(tmp_path / 'rows.jsonl', rows)
  splits = task_data.split_rows(rows, path, finetune.get_config('bbc').task_data)
  train_ids = [r['id'] for r, s in zip(rows, splits) if s == 'train']
  assert 0 < len(train_ids) < len(rows)
  by_id = {r['id']: r for r in rows}

  c = finetune.get_config('bbc')
  c.task_data.path = path
  got = texts.train_texts(c)
  assert got == [classify.title_and_text(by_id[i]['title'], by_id[i]['text']) for i in train_ids]
  assert not any('LABEL' in t for t in got)

  t = finetune.get_config('brown_pos')
  t.task_data.update(path=path, group_field='', id_field='id', tag_map='')
  assert texts.train_texts(t) == [' '.join(by_id[i]['tokens']) for i in train_ids]


def test_cli_writes_a_corpus_that_mlm_reads(tmp_path):
  data = _write(tmp_path / 'pairs.jsonl', _pairs(50))
  out = tmp_path / 'tapt' / 'train.jsonl'
  texts.main(['texts', '--config', 'configs/finetune.py:retrieve_tiny',
              f'--config.task_data.path={data}', '--config.task_data.id_field=id', '--out', str(out)])
  written = [json.loads(line)['text'] for line in out.read_text().splitlines()]
  config = finetune.get_config('retrieve_tiny')
  config.task_data.update(path=data, id_field='id')
  assert written == texts.train_texts(config)
  assert not list(out.parent.glob('*.tmp'))

  d = pretrain.get_config('tiny_classic').data
  d.corpus, d.min_chars = str(out), 1
  docs, _ = corpus.load_documents(d)
  assert docs == [corpus.clean_document(t) for t in written]


def test_errors(tmp_path):
  data = _write(tmp_path / 'pairs.jsonl', _pairs(20))
  base = ['texts', '--config', 'configs/finetune.py:retrieve_tiny', f'--config.task_data.path={data}']
  with pytest.raises(SystemExit, match=r'--out .*train\.txt: name a \.jsonl file'):
    texts.main(base + ['--out', str(tmp_path / 'train.txt')])
  with pytest.raises(SystemExit, match='no task data to export'):
    texts.main(['texts', '--config', 'configs/pretrain.py:tiny', '--out', str(tmp_path / 'a.jsonl')])
  with pytest.raises(SystemExit, match='query_field'):
    texts.main(base + ['--config.task_data.query_field=q', '--out', str(tmp_path / 'b.jsonl')])
  with pytest.raises(SystemExit, match='the train split is empty'):
    texts.main(base + ['--config.task_data.val_fraction=0.5', '--config.task_data.test_fraction=0.49',
                       '--config.task_data.max_examples=1', '--out', str(tmp_path / 'c.jsonl')])
  with pytest.raises(SystemExit, match='usage'):
    texts.main(base)
  assert sorted(tmp_path.glob('*.jsonl*')) == [tmp_path / 'pairs.jsonl']


def test_title_and_text():
  assert classify.title_and_text('Budget set', 'The plan.') == 'Budget set. The plan.'
  assert classify.title_and_text('Why now?', 'Because.') == 'Why now? Because.'
  assert classify.title_and_text('', 'Body') == 'Body'
