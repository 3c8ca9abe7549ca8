"""Tests for mlmjax/tokenizer_report.py: fertility, split words, byte fallback, vocab overlap."""

import json
import random

import numpy as np
import pytest

from mlmjax import input_pipeline
from mlmjax import tokenizer as tokenizer_lib
from mlmjax import tokenizer_report

ENGLISH = ['Return a sorted list of the values in the dictionary.',
           'The interpreter reads the statement, evaluates the expression and binds the name.',
           'Exceptions raised inside a generator propagate to the caller of next().']


def _random_words(num_docs: int, words_per_doc: int, seed: int = 0) -> list[str]:
  """Returns documents of random lowercase letter words, unrelated to any real text."""
  rng = random.Random(seed)
  letters = 'abcdefghijklmnopqrstuvwxyz'
  return [' '.join(''.join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
                   for _ in range(words_per_doc)) for _ in range(num_docs)]


def test_fertility_and_split_share_match_a_direct_count(topics_tokenizer):
  tok = topics_tokenizer
  r = tokenizer_report.report(tok, ENGLISH, compare_vocab_size=2000)
  words = [w for t in ENGLISH for w in t.split()]
  lengths = [len(tok.encode(w)) for w in words]
  assert r['words'] == len(words) and r['distinct_words'] == len(set(words))
  assert r['pieces'] == sum(lengths)
  # Sentencepiece pieces never cross whitespace: the words alone make the whole texts' pieces.
  assert r['pieces'] == sum(len(tok.encode(t)) for t in ENGLISH)
  assert r['fertility'] == pytest.approx(sum(lengths) / len(words))
  assert r['split_share'] == pytest.approx(sum(n > 1 for n in lengths) / len(words))
  assert 0 < r['split_share'] < 1
  assert r['byte_fallback_rate'] == 0 and r['unk_rate'] == 0
  # Three sentences cannot train 2,000 pieces: noted in the report, not raised.
  assert 'vocab_size' in r['vocab_overlap']['error']


def test_characters_outside_the_training_text_fall_back_to_bytes(topics_tokenizer):
  tok = topics_tokenizer
  texts = ENGLISH + ['数据 字符 \U0001f600']
  r = tokenizer_report.report(tok, texts, top=100, compare_vocab_size=300)
  ids = [i for w in texts[-1].split() for i in tok.encode(w)]
  num_bytes = sum(tok.id_to_piece(i).startswith('<0x') for i in ids)
  assert num_bytes == 3 * 2 + 3 * 2 + 4  # UTF-8 bytes of the CJK characters and the emoji
  assert r['byte_fallback_rate'] == pytest.approx(num_bytes / r['pieces'])
  emoji = next(w for w in r['most_split'] if w['word'] == '\U0001f600')
  assert emoji['pieces'] == ['\u2581', '<0xF0>', '<0x9F>', '<0x98>', '<0x80>']
  assert tokenizer_report.report(tok, ENGLISH, compare_vocab_size=300)['byte_fallback_rate'] == 0


def test_most_split_orders_by_count_times_extra_pieces(topics_tokenizer):
  tok = topics_tokenizer
  texts = ['qzxjvkw ' * 20 + 'the ' * 50, 'zzqxjk ' * 2 + 'a ' * 7]
  r = tokenizer_report.report(tok, texts, top=5, compare_vocab_size=300)
  extra = [w['count'] * (len(w['pieces']) - 1) for w in r['most_split']]
  assert extra == sorted(extra, reverse=True) and all(e > 0 for e in extra)
  assert [w['word'] for w in r['most_split']] == ['qzxjvkw', 'zzqxjk']  # one-piece words omitted
  first = r['most_split'][0]
  assert first['count'] == 20
  assert first['pieces'] == [tok.id_to_piece(i) for i in tok.encode('qzxjvkw')]
  assert len(tokenizer_report.report(tok, texts, top=1, compare_vocab_size=300)['most_split']) == 1


def test_vocab_overlap_is_high_on_the_training_text_and_low_on_unrelated_text(
    topics_tokenizer, topics_corpus, tmp_path):
  tok = topics_tokenizer
  own = topics_corpus.read_text(encoding='utf-8').split('\n\n')
  same = tokenizer_report.report(tok, own, compare_vocab_size=500, compare_dir=tmp_path)
  other = tokenizer_report.report(tok, _random_words(30, 200), compare_vocab_size=500)
  assert (tmp_path / 'corpus_500.model').is_file()
  for r in (same, other):
    overlap = r['vocab_overlap']
    assert overlap['vocab_size'] == 500
    assert 0 < overlap['compared'] < 500 - tokenizer_lib.NUM_SPECIAL - 256 + 1
    assert overlap['share'] == pytest.approx(overlap['shared'] / overlap['compared'])
  assert same['vocab_overlap']['share'] > 0.8
  assert other['vocab_overlap']['share'] < 0.4
  assert other['fertility'] > same['fertility']  # random words split more


def _pack(tok, texts: list[str], one_per_row: bool) -> np.ndarray:
  """Returns pack_documents rows of the texts: back to back, or each text in rows of its own."""
  lists = tok.encode_batch(texts)
  groups = [[l] for l in lists] if one_per_row else [lists]
  return np.concatenate([input_pipeline.pack_documents(g, 64, cls_id=tok.cls_id, sep_id=tok.sep_id)
                         for g in groups])


def test_rows_figures_agree_with_the_report(topics_tokenizer, topics_corpus):
  tok = topics_tokenizer
  paragraphs = [p for p in topics_corpus.read_text(encoding='utf-8').split('\n\n') if p.strip()]
  lines = [' '.join(l.split()) for p in paragraphs for l in p.split('\n')]
  short = [l for l in lines if 5 <= len(tok.encode(l)) <= 62][:400]  # each fits one 64-token row
  r = tokenizer_report.report(tok, short, compare_vocab_size=300)
  f = tokenizer_report.rows_figures(tok, _pack(tok, short, one_per_row=True))
  assert (f['pieces'], f['words']) == (r['pieces'], r['words'])
  for key in ('fertility', 'split_share', 'unk_rate', 'byte_fallback_rate'):
    assert f[key] == pytest.approx(r[key], rel=1e-12, abs=1e-15), key

  # Back to back, packing cuts a text at the end of a row when it does not fit the room left:
  # pieces and words stay exact, but a word cut there no longer shows as split, so the rows lose
  # at most one split word per row.
  for texts in (short, paragraphs[:20]):
    rows = _pack(tok, texts, one_per_row=False)
    r = tokenizer_report.report(tok, texts, compare_vocab_size=300)
    f = tokenizer_report.rows_figures(tok, rows)
    assert (f['pieces'], f['words']) == (r['pieces'], r['words'])
    assert f['fertility'] == pytest.approx(r['fertility'], rel=1e-12)
    assert f['byte_fallback_rate'] == pytest.approx(r['byte_fallback_rate'], rel=1e-12, abs=1e-15)
    lost = round(r['split_share'] * r['words']) - round(f['split_share'] * f['words'])
    assert 0 <= lost <= len(rows)


def test_wordpiece_unknown_words_and_overlap_in_normalized_pieces(topics_corpus, tmp_path):
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'of', 'a', 'is', 'to', 'in',
           'list', 'return', '##s', '##ed', '.', ',']
  path = tmp_path / 'vocab.txt'
  path.write_text('\n'.join(vocab) + '\n')
  wp = tokenizer_lib.load_any(path)
  r = tokenizer_report.report(wp, ['The lists returned zebra.'], compare_vocab_size=300)
  assert r['words'] == 4 and r['pieces'] == 7  # the | list ##s | return ##ed | [UNK] .
  assert r['unk_rate'] == pytest.approx(1 / 7) and r['split_share'] == pytest.approx(3 / 4)
  own = topics_corpus.read_text(encoding='utf-8').split('\n\n')
  overlap = tokenizer_report.report(wp, own, compare_vocab_size=500)['vocab_overlap']
  # '▁the', '▁The' (an uncased vocabulary), '▁of', ... match word-initial pieces, 's' matches '##s'
  # and a continuing ',' matches WordPiece's word-initial ','.
  assert 12 <= overlap['shared'] <= 30 and overlap['share'] < 0.15


def test_cli_writes_json_and_fails_in_one_line(topics_tokenizer, topics_corpus, tmp_path, capsys):
  out = tmp_path / 'sub' / 'report.json'
  tokenizer_report.main(['tokenizer_report', f'--tokenizer={topics_tokenizer.model_path}',
                         f'--corpus={topics_corpus}', '--max_documents=30', '--top=3',
                         '--compare_vocab_size=500', f'--json={out}'])
  text = capsys.readouterr().out
  r = json.loads(out.read_text())
  assert {'words', 'distinct_words', 'pieces', 'fertility', 'split_share', 'byte_fallback_rate',
          'unk_rate', 'most_split', 'vocab_overlap'} <= set(r)
  assert r['documents'] == 30 and len(r['most_split']) == 3
  assert f'fertility {r["fertility"]:.3f} pieces per word' in text
  with pytest.raises(SystemExit) as e:
    tokenizer_report.main(['tokenizer_report', f'--tokenizer={tmp_path / "nope.model"}',
                           f'--corpus={topics_corpus}'])
  assert str(e.value.code).startswith('error:') and '\n' not in str(e.value.code)
  assert 'nope.model' in str(e.value.code)
  with pytest.raises(SystemExit) as e:
    tokenizer_report.main(['tokenizer_report', f'--tokenizer={topics_tokenizer.model_path}'])
  assert str(e.value.code).startswith('usage:')


def test_rows_figures_count_nothing_in_padding(topics_tokenizer):
  tok = topics_tokenizer
  f = tokenizer_report.rows_figures(tok, np.zeros((2, 8), np.int32))
  assert f['pieces'] == f['words'] == 0 and f['fertility'] == 0.0
