"""The corpus report: cleaning, near-duplicate groups, validation text in training, overlap."""

import json

import pytest

from mlmjax import corpus_report
from tests.toy import planted as text


@pytest.fixture
def corpus(tmp_path):
  """A .txt corpus of 40 unrelated pieces, 20 of them twice (punctuation-edited)."""
  base = [' '.join(d.split()) for d in text.long_docs(40)]
  path = tmp_path / 'planted.txt'
  path.write_text('\n\n'.join(base + [text.punctuation_edit(d) for d in base[:20]]) + '\n')
  return path, base


def test_corpus_report_prints_and_writes_the_counts(corpus, tmp_path, capsys):
  path, _ = corpus
  out = tmp_path / 'report.json'
  argv = ['corpus_report', '--config', 'configs/pretrain.py:tiny', f'--config.data.corpus={path}',
          '--config.data.val_fraction=0.3', f'--json={out}']
  corpus_report.main(argv)
  text = capsys.readouterr().out
  report = json.loads(out.read_text())
  assert report['near_dups']['documents_in_groups'] == 2 * report['near_dups']['groups'] > 0
  assert f"{report['near_dups']['groups']:,} groups" in text
  grouped, alone = report['val_in_train']['grouped'], report['val_in_train']['alone']
  assert grouped['documents_90pct_in_train'] == 0 < alone['documents_90pct_in_train']




def test_corpus_report_counts_fine_tuning_texts_inside_the_corpus(corpus, tmp_path, capsys):
  path, base = corpus
  rows = [{'id': f'r{i}', 'text': ' '.join(base[i].split()[20:80]), 'label': 'ab'[i % 2]}
          for i in range(10)] + [{'id': f'u{i}', 'text': f'unrelated words number {i} ' * 8,
                                  'label': 'ab'[i % 2]} for i in range(10)]
  spec = text.finetune_config_file(tmp_path, rows)
  out = tmp_path / 'report.json'
  corpus_report.main(['corpus_report', '--config', 'configs/pretrain.py:tiny',
                      f'--config.data.corpus={path}', f'--against={spec}', f'--json={out}'])
  overlap = json.loads(out.read_text())['overlap']
  from mlmjax.tasks import texts
  held = texts.eval_texts(spec)
  inside = sum(t.startswith(tuple(' '.join(b.split()[20:30]) for b in base)) for t in held)
  assert overlap['of_texts'] == len(held) and overlap['texts'] == inside > 0
  assert overlap['by_config'][spec]['texts'] == inside
  assert 'hold >= 0.5 of their 8-grams' in capsys.readouterr().out


def test_corpus_report_without_config_prints_usage():
  with pytest.raises(SystemExit) as e:
    corpus_report.main(['corpus_report'])
  assert str(e.value.code).startswith('usage: python -m mlmjax.corpus_report')
