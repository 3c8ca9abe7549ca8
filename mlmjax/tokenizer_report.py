"""How well a tokenizer fits a corpus: pieces per word, split words, byte fallback, vocabulary.

  python -m mlmjax.tokenizer_report --tokenizer runs/x --corpus '../shared/data/pretrain/*/*.txt'
  python -m mlmjax.tokenizer_report --tokenizer bert/vocab.txt --corpus data.jsonl \
      --max_documents 5000 --top 30 --compare_vocab_size 8000 --json runs/tokenizer.json

`--tokenizer` is a workdir or a tokenizer file (tokenizer.load_any), `--corpus` a data.corpus
value, cleaned as a run cleans it (corpus.load_documents). The figures, over the corpus's
whitespace-separated words:
- fertility: pieces per word (1.0: every word is one piece; higher means longer sequences).
- split: share of word occurrences cut into 2 or more pieces.
- byte fallback: share of pieces that are byte pieces <0xNN> (characters the vocabulary lacks).
- [UNK]: share of pieces that are the unknown id (WordPiece's answer to an unknown word).
- most split words: the words that add the most pieces, count x (pieces - 1), with their pieces.
- vocabulary overlap: a sentencepiece model of the same size (or --compare_vocab_size) trained on
  the corpus itself; the share of its text pieces that the tokenizer also has (word-initial and
  continuation pieces compared apart, so '▁foo' matches WordPiece 'foo' and 'foo' matches '##foo';
  an uncased vocabulary is compared case-folded). Low overlap: the corpus would choose a different
  vocabulary.

Each distinct word is encoded once, alone; for sentencepiece that is exact, because pieces never
cross whitespace. `rows_figures` gives the figures that need no text from packed token rows.
"""

import collections
import pathlib
import re
import tempfile
from typing import Sequence

import numpy as np
from sentencepiece import sentencepiece_model_pb2

from mlmjax import cli, corpus, schema
from mlmjax import tokenizer as tokenizer_lib

_BYTE_PIECE = re.compile(r'<0x[0-9A-F]{2}>')
_CHUNK = 20_000  # distinct words per encode_batch call
_BPE = 2  # sentencepiece's TrainerSpec.ModelType.BPE


def _ratio(a, b) -> float:
  """Returns a / b as a float, 0.0 when b is 0."""
  return float(a) / float(b) if b else 0.0


def _byte_table(tokenizer) -> np.ndarray:
  """Returns (vocab_size,) bool: True for byte-fallback pieces <0xNN>."""
  return np.array([bool(_BYTE_PIECE.fullmatch(tokenizer.id_to_piece(i) or ''))
                   for i in range(tokenizer.vocab_size)], dtype=bool)


def _normalized_pieces(tokenizer, byte_table: np.ndarray) -> list[tuple[bool, str]]:
  """Returns (is_word_start, text) of every non-special, non-byte piece of the tokenizer."""
  out = []
  wordpiece = isinstance(tokenizer, tokenizer_lib.WordPieceTokenizer)
  for i in np.flatnonzero(~tokenizer.special_mask & ~byte_table):
    piece = tokenizer.id_to_piece(i) or ''
    if wordpiece:
      out.append((False, piece[2:]) if piece.startswith('##') else (True, piece))
    else:
      out.append((True, piece[1:]) if piece.startswith('\u2581') else (False, piece))
  return out


def _model_type(tokenizer) -> str:
  """Returns 'bpe' for a sentencepiece BPE model, else 'unigram' (WordPiece compares to unigram)."""
  if not isinstance(tokenizer, tokenizer_lib.Tokenizer):
    return 'unigram'
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tokenizer.serialized_model)
  return 'bpe' if proto.trainer_spec.model_type == _BPE else 'unigram'


def _vocab_overlap(tokenizer, texts: Sequence[str], byte_table: np.ndarray, vocab_size: int,
                   compare_dir, seed: int) -> dict:
  """Returns {vocab_size, compared, shared, share} of a model trained on texts, or {error}."""
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(compare_dir or tmp) / f'corpus_{vocab_size}.model'
    try:
      fresh = tokenizer_lib.train_tokenizer(texts, path, vocab_size=vocab_size,
                                            model_type=_model_type(tokenizer), seed=seed)
    except ValueError as e:
      return {'error': str(e)}
  own = set(_normalized_pieces(tokenizer, byte_table))
  # An uncased WordPiece vocabulary holds lowercase pieces only: compare the corpus's pieces folded.
  fold = tokenizer.encode('A') == tokenizer.encode('a')
  theirs = [(start, text.lower() if fold else text)
            for start, text in _normalized_pieces(fresh, _byte_table(fresh))]
  # WordPiece splits punctuation off as words of its own: its word-initial ',' is the ',' that
  # continues a sentencepiece word.
  loose = isinstance(tokenizer, tokenizer_lib.WordPieceTokenizer)
  shared = sum(p in own or (loose and len(p[1]) == 1 and not p[1].isalnum() and (True, p[1]) in own)
               for p in theirs)
  return {'vocab_size': fresh.vocab_size, 'compared': len(theirs), 'shared': shared,
          'share': _ratio(shared, len(theirs))}


def report(tokenizer, texts: Sequence[str], *, top: int = 20, compare_vocab_size: int | None = None,
           compare_dir=None, seed: int = 0) -> dict:
  """Returns the fit figures of `tokenizer` on the whitespace-separated words of `texts`."""
  counts = collections.Counter(w for t in texts for w in t.split())
  if not counts:
    raise ValueError('tokenizer_report: the texts hold no words; check --corpus')
  words = list(counts)
  ids = []
  for i in range(0, len(words), _CHUNK):
    ids.extend(tokenizer.encode_batch(words[i:i + _CHUNK]))
  count = np.array([counts[w] for w in words], dtype=np.int64)
  length = np.array([len(x) for x in ids], dtype=np.int64)
  flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])
  weight = np.repeat(count, length)  # each piece weighted by its word's count
  byte_table = _byte_table(tokenizer)
  num_words, num_pieces = int(count.sum()), int((count * length).sum())
  extra = count * (length - 1)
  order = [i for i in np.lexsort((-count, -extra))[:top] if extra[i] > 0]
  out = {
      'tokenizer': tokenizer.model_path, 'vocab_size': tokenizer.vocab_size,
      'documents': len(texts), 'words': num_words, 'distinct_words': len(words),
      'pieces': num_pieces, 'fertility': _ratio(num_pieces, num_words),
      'split_share': _ratio(count[length > 1].sum(), num_words),
      'byte_fallback_rate': _ratio(weight[byte_table[flat]].sum(), num_pieces),
      'unk_rate': _ratio(weight[flat == tokenizer.unk_id].sum(), num_pieces),
      'most_split': [{'word': words[i], 'count': int(count[i]),
                      'pieces': [tokenizer.id_to_piece(j) for j in ids[i]]} for i in order],
  }
  out['vocab_overlap'] = _vocab_overlap(tokenizer, texts, byte_table,
                                        compare_vocab_size or tokenizer.vocab_size, compare_dir,
                                        seed)
  return out


def rows_figures(tokenizer, rows: np.ndarray) -> dict:
  """Returns pieces, words, fertility, split_share, unk_rate, byte_fallback_rate of packed rows."""
  rows = np.asarray(rows)
  unk = rows == tokenizer.unk_id
  content = ~tokenizer.special_mask[rows] | unk  # text pieces; [UNK] stands for text
  starts = tokenizer.word_starts(rows) & content
  # A word is split when its first piece is followed by a continuation in the same row (a word cut
  # by packing across rows is counted as whole).
  split = starts[:, :-1] & content[:, 1:] & ~starts[:, 1:]
  pieces, words = int(content.sum()), int(starts.sum())
  return {'pieces': pieces, 'words': words, 'fertility': _ratio(pieces, words),
          'split_share': _ratio(split.sum(), words), 'unk_rate': _ratio(unk.sum(), pieces),
          'byte_fallback_rate': _ratio((_byte_table(tokenizer)[rows] & content).sum(), pieces)}


def format_report(r: dict) -> str:
  """Returns the report as a few lines of text."""
  lines = [f'tokenizer {r["tokenizer"]} ({r["vocab_size"]:,} pieces) on {r["documents"]:,} '
           f'documents: {r["words"]:,} words, {r["distinct_words"]:,} distinct',
           f'fertility {r["fertility"]:.3f} pieces per word; {100 * r["split_share"]:.1f}% of '
           'words split into 2+ pieces',
           f'byte fallback {100 * r["byte_fallback_rate"]:.2f}% of pieces; [UNK] '
           f'{100 * r["unk_rate"]:.2f}% of pieces']
  overlap = r['vocab_overlap']
  if 'error' in overlap:
    lines.append(f'vocabulary overlap: not computed ({overlap["error"]})')
  else:
    lines.append(f'vocabulary overlap: {100 * overlap["share"]:.1f}% of the text pieces of a '
                 f'tokenizer trained on this corpus ({overlap["vocab_size"]:,} pieces; '
                 f'{overlap["shared"]:,} of {overlap["compared"]:,}) are pieces of this one')
  if r['most_split']:
    lines.append('most split words (count x (pieces - 1) largest): count  word  pieces')
    lines += [f'  {w["count"]:>9,}  {w["word"]}  {" ".join(w["pieces"])}' for w in r['most_split']]
  return '\n'.join(lines)


def main(argv=None) -> None:
  """Parses --tokenizer, --corpus and the options, prints the report and writes --json."""

  def define(flags, flag_values):
    flags.DEFINE_string('tokenizer', '', 'A workdir or a tokenizer file (.model, vocab.txt, '
                        'tokenizer.json).', flag_values=flag_values)
    flags.DEFINE_string('corpus', '', "A data.corpus value: 'pydocs', .txt/.jsonl paths or globs "
                        "(comma-separated), or 'tfds:NAME'.", flag_values=flag_values)
    flags.DEFINE_integer('max_documents', 20_000, 'Documents read after cleaning; 0 reads all.',
                         flag_values=flag_values)
    flags.DEFINE_integer('top', 20, 'Most split words listed.', flag_values=flag_values)
    flags.DEFINE_integer('compare_vocab_size', 0, 'Pieces of the tokenizer trained on the corpus '
                         "for the overlap; 0 = the tokenizer's size.", flag_values=flag_values)
    flags.DEFINE_string('json', '', 'Also write the report as JSON to this file.',
                        flag_values=flag_values)

  f = cli.parse_flags(argv, define, prog='mlmjax.tokenizer_report',
                      config_help='Not used: this report reads no run config.')
  if not f.tokenizer or not f.corpus:
    cli.fail('usage: python -m mlmjax.tokenizer_report --tokenizer RUN_OR_MODEL --corpus SOURCES '
             '[--max_documents 20000] [--top 20] [--compare_vocab_size 0] [--json OUT.json]')
  with cli.user_errors((ValueError, FileNotFoundError, PermissionError)):
    for name in ('max_documents', 'top', 'compare_vocab_size'):
      if f[name].value < 0:
        raise ValueError(f'--{name}={f[name].value} must be >= 0')
    tok = tokenizer_lib.load_any(f.tokenizer)
    data = schema.defaults().data
    data.corpus, data.max_documents = f.corpus, f.max_documents
    docs, _ = corpus.load_documents(data)
    out = report(tok, docs, top=f.top, compare_vocab_size=f.compare_vocab_size or None)
    print(format_report(out))
    if f.json:
      cli.write_json(f.json, out)


if __name__ == '__main__':
  main()
