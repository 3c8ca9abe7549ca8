"""Tests for mlmjax/adapt.py and the first-run adaptations of data preparation and train.run."""

import json

import pytest

from mlmjax import adapt, cli, corpus
from mlmjax import input_pipeline as ip
from mlmjax import tokenizer as tok_lib
from mlmjax.configs import finetune, pretrain


def _notes():
  lines = []
  return lines, lines.append


def test_budget_adapts_defaults_and_leaves_explicit_keys():
  c = pretrain.get_config('tiny_classic')
  c.train.num_steps = 200
  lines, log = _notes()
  a = adapt.Adaptations(log=log)
  a.budget(c)
  assert (c.optim.warmup_steps, c.eval.every_steps) == (20, 800)  # a late evaluation is no error
  assert a.changes['optim.warmup_steps'] == {
      'from': 300, 'to': 20, 'why': 'the default warmup is longer than the 200-step run; a tenth of it'}
  assert len(lines) == 1 and lines[0].startswith('note: ')
  assert 'optim.warmup_steps 300 -> 20' in lines[0] and '--config.optim.warmup_steps' in lines[0]
  recorded = pretrain.get_config('tiny_classic')
  a.apply(recorded)
  assert recorded.optim.warmup_steps == 20

  c = pretrain.get_config('tiny_classic')
  c.train.num_steps, c.optim.warmup_steps = 200, 300
  a = adapt.Adaptations(explicit={'optim.warmup_steps'}, log=log)
  a.budget(c)
  assert c.optim.warmup_steps == 300 and not a.changes
  c = finetune.get_config('tiny')  # a 10-step fine-tune: warmup 40 of 400 steps
  c.train.num_steps = 10
  a = adapt.Adaptations(log=log)
  a.budget(c)
  assert c.optim.warmup_steps == 1
  c = pretrain.get_config('tiny_classic')  # fits: nothing changes, nothing is said
  lines.clear()
  adapt.Adaptations(log=log).budget(c)
  assert c.optim.warmup_steps == 300 and not lines


def test_override_keys_read_the_command_line_and_flagfiles(tmp_path):
  flagfile = tmp_path / 'run.flags'
  flagfile.write_text('--config.train.num_steps=7\n--workdir=runs/x\n')
  keys = cli.override_keys(['train', '--config', 'pretrain:tiny', '--config.optim.warmup_steps=5',
                            f'--flagfile={flagfile}', '--config.masking.rate', '0.3'])
  assert keys == {'optim.warmup_steps', 'train.num_steps', 'masking.rate'}


def test_passages_cut_long_documents_at_natural_breaks():
  text = ' '.join(f'Sentence number {i} says something about topic {i % 7}.' for i in range(300))
  paragraph = 'y ' * 150 + 'end of paragraph.'  # its break lies in the second half of a passage
  docs = ['short document stays whole.', text, paragraph + '\n\n' + 'x ' * 400]
  out = corpus.passages(docs, 500)
  assert out[0] == docs[0]
  assert all(len(p) <= 500 for p in out)
  middle = [p for p in out if p.startswith('Sentence') or p[0].isupper() and 'topic' in p]
  assert ' '.join(middle) == text  # nothing lost or reordered, cuts only at spaces
  assert all(p.endswith('.') for p in middle)  # at sentence ends
  assert paragraph in out  # a paragraph break wins over later spaces
  assert corpus.passages(['a' * 1200], 500) == ['a' * 500, 'a' * 500, 'a' * 200]  # no break at all


def _one_document_corpus(tmp_path, chars: int):
  """Returns a .txt file whose text (real help topics) is one document: no blank lines."""
  from pydoc_data.topics import topics
  lines = [' '.join(t.split()) for k, t in sorted(topics.items())]
  text = '\n'.join(lines)[:chars]
  path = tmp_path / 'mine.txt'
  path.write_text(text, encoding='utf-8')
  return path


def test_prepare_data_adapts_vocabulary_and_passages_of_a_small_text(tmp_path, cache_dir):
  c = pretrain.get_config('tiny_classic')
  c.data.corpus = str(_one_document_corpus(tmp_path, 40_000))
  c.data.cache_dir = str(cache_dir)
  lines, log = _notes()
  a = adapt.Adaptations(log=log)
  data = ip.prepare_data(c, tmp_path / 'run', log=log, adapt=a)
  assert set(a.changes) == {'tokenizer.vocab_size', 'data.passage_chars'}
  limit = a.changes['tokenizer.vocab_size']['to']
  assert 1000 < limit < 8000 == a.changes['tokenizer.vocab_size']['from']
  assert data.tokenizer.vocab_size == limit == c.tokenizer.vocab_size
  assert 200 <= c.data.passage_chars <= ip.PASSAGE_CHARS
  assert len(data.cache.val_rows) and len(data.cache.train_rows)
  assert data.cache.stats['val']['documents'] + data.cache.stats['train']['documents'] > 20
  assert sum(l.startswith('note: ') for l in lines) >= 2
  # The run's stored tokenizer is the adapted one, and a resumed run says so again.
  assert tok_lib.load_any(tmp_path / 'run' / 'tokenizer.model').vocab_size == limit
  c2 = pretrain.get_config('tiny_classic')
  c2.data.corpus, c2.data.cache_dir, c2.data.passage_chars = c.data.corpus, str(cache_dir), c.data.passage_chars
  a2 = adapt.Adaptations(log=log)
  assert ip.prepare_data(c2, tmp_path / 'run', log=log, adapt=a2).cache.key == data.cache.key
  assert a2.changes['tokenizer.vocab_size']['to'] == limit

  # Explicit settings are never overridden: the vocabulary error and an empty validation stay.
  c3 = pretrain.get_config('tiny_classic')
  c3.data.corpus, c3.data.cache_dir = c.data.corpus, str(cache_dir)
  explicit = adapt.Adaptations(explicit={'tokenizer.vocab_size'}, log=log)
  with pytest.raises(tok_lib.VocabTooLarge, match=r'tokenizer.vocab_size=8000 does not fit') as e:
    ip.prepare_data(c3, tmp_path / 'explicit', log=log, adapt=explicit)
  assert e.value.limit is not None and list(explicit.changes) == ['data.passage_chars']
  assert c3.data.passage_chars > 0  # changed before the tokenizer failed
  c3 = pretrain.get_config('tiny_classic')
  c3.data.corpus, c3.data.cache_dir, c3.tokenizer.vocab_size = c.data.corpus, str(cache_dir), 1000
  explicit = adapt.Adaptations(explicit={'data.passage_chars'}, log=log)
  kept = ip.prepare_data(c3, tmp_path / 'explicit2', log=log, adapt=explicit)
  assert not len(kept.cache.val_rows) and c3.data.passage_chars == 0 and not explicit.changes
  assert ip.prepare_data(c3, tmp_path / 'plain', log=log).cache.key == kept.cache.key  # no adapt


def _main(argv, capsys) -> str:
  """Runs `python -m mlmjax.train ARGV` in this process; returns what it printed."""
  from mlmjax import train
  train.main(['mlmjax.train', *argv])
  return capsys.readouterr().out


@pytest.mark.slow  # a 60-step run and a 10-step fine-tune from the command line
def test_first_runs_on_defaults_complete_with_their_notes(tmp_path, cache_dir, pydocs, capsys,
                                                          monkeypatch):
  # A user's own 250 KB text file: embedded documentation, one document per line, no blank lines
  # (so one document for the .txt reader).
  text = tmp_path / 'mine.txt'
  text.write_text('\n'.join(' '.join(d.split()) for d in pydocs)[:250_000], encoding='utf-8')
  monkeypatch.setenv('MLMJAX_CACHE', str(cache_dir))
  out = _main(['--config', 'pretrain:tiny_classic', f'--config.data.corpus={text}',
               '--config.train.num_steps=60', '--workdir', str(tmp_path / 'pre')], capsys)
  notes = [l for l in out.splitlines() if l.startswith('note: ')]
  assert any(l.startswith('note: optim.warmup_steps 300 -> 6') for l in notes), notes
  assert any(l.startswith('note: data.passage_chars 0 -> ') for l in notes), notes
  summary = json.loads((tmp_path / 'pre' / 'summary.json').read_text())
  assert summary['finished'] and summary['step'] == 60 and 'eval/accuracy_at_mask' in summary
  assert {'optim.warmup_steps', 'data.passage_chars'} <= set(summary['adapted'])
  recorded = json.loads((tmp_path / 'pre' / 'config.json').read_text())
  assert recorded['optim']['warmup_steps'] == 6 and recorded['data']['passage_chars'] > 0

  finetune_argv = ['--config', 'finetune:tiny', f'--config.init_from={tmp_path / "pre"}',
                   '--config.train.num_steps=10']
  out = _main([*finetune_argv, '--workdir', str(tmp_path / 'ft')], capsys)
  assert 'note: optim.warmup_steps 40 -> 1' in out
  assert json.loads((tmp_path / 'ft' / 'summary.json').read_text())['finished']
  # Set explicitly, the same warmup is a one-line error naming the key.
  with pytest.raises(SystemExit) as e:
    _main([*finetune_argv, '--config.optim.warmup_steps=40', '--workdir', str(tmp_path / 'ft2')],
          capsys)
  assert str(e.value.code).startswith('error: optim.warmup_steps=40 exceeds train.num_steps=10')
