"""Token tagging (e.g. part of speech): one tag per word, predicted at the word's first piece.

Fields: task_data.tokens_field (a list of words), task_data.tags_field (one tag per word),
task_data.group_field / id_field (splits; see task_data). task_data.tag_map='' keeps the tags as
they are; 'brown_coarse' maps the Brown corpus tags to 13 coarse classes (BROWN_COARSE below). The
label names are the sorted set of (mapped) tags in the whole file (stats['labels']).

Row layout, W = 2 * train.seq_len, int32:
  columns [0, seq_len)         tokens: [CLS] pieces of word 1, pieces of word 2, ... [SEP] PAD...
  columns [seq_len, 2 seq_len) tag id at each word's first piece; -1 everywhere else (later pieces,
                               [CLS], [SEP], PAD), which loss and metrics ignore
Words that do not fit are dropped from the end of the sentence (stats['truncated_words']); metrics
count the words that were kept.
"""

import collections
import jax
import numpy as np

from mlmjax import heads
from mlmjax.tasks import metrics as metrics_lib, task_data as td
from mlmjax.tasks.base import LabelTask, TaskData

TAG_MAPS = ('', 'brown_coarse')
IGNORE = -1

# Brown corpus base tag -> coarse class, in the spirit of the universal POS tags (Petrov et al.
# 2012), with UD's choices for existential 'there' (PRON) and negation 'not'/"n't" (PRT).
# Base tags are what remains after brown_base() removes suffixes, compounds and markers.
BROWN_COARSE = {
    # nouns; nr = adverbial nouns (home, today, west)
    'nn': 'NOUN', 'nns': 'NOUN', 'nr': 'NOUN', 'nrs': 'NOUN',
    'np': 'PROPN', 'nps': 'PROPN',
    # verbs, including forms of be / do / have and modals
    'vb': 'VERB', 'vbd': 'VERB', 'vbg': 'VERB', 'vbn': 'VERB', 'vbz': 'VERB',
    'be': 'VERB', 'bed': 'VERB', 'bedz': 'VERB', 'beg': 'VERB', 'bem': 'VERB', 'ben': 'VERB',
    'ber': 'VERB', 'bez': 'VERB', 'do': 'VERB', 'dod': 'VERB', 'doz': 'VERB',
    'hv': 'VERB', 'hvd': 'VERB', 'hvg': 'VERB', 'hvn': 'VERB', 'hvz': 'VERB', 'md': 'VERB',
    # adjectives, including ordinals (first, 2nd)
    'jj': 'ADJ', 'jjr': 'ADJ', 'jjs': 'ADJ', 'jjt': 'ADJ', 'od': 'ADJ',
    # adverbs, qualifiers (very, enough), wh-adverbs, pre-qualifiers (quite, rather)
    'rb': 'ADV', 'rbr': 'ADV', 'rbt': 'ADV', 'rn': 'ADV', 'ql': 'ADV', 'qlp': 'ADV',
    'wql': 'ADV', 'wrb': 'ADV', 'abl': 'ADV',
    # pronouns: personal, possessive (pp$ -> pp), reflexive, nominal (nothing), wh-, existential
    'pn': 'PRON', 'pp': 'PRON', 'ppl': 'PRON', 'ppls': 'PRON', 'ppo': 'PRON', 'pps': 'PRON',
    'ppss': 'PRON', 'wp': 'PRON', 'wpo': 'PRON', 'wps': 'PRON', 'ex': 'PRON',
    # articles, determiners, post-determiners (many, next), pre-quantifiers (all, half, both)
    'at': 'DET', 'ap': 'DET', 'abn': 'DET', 'abx': 'DET', 'dt': 'DET', 'dti': 'DET',
    'dts': 'DET', 'dtx': 'DET', 'wdt': 'DET',
    'in': 'ADP',
    'cd': 'NUM',
    'cc': 'CONJ', 'cs': 'CONJ',
    # infinitival to, adverbial particles (up, out), negation (the bare '*' tag)
    'to': 'PRT', 'rp': 'PRT', '*': 'PRT',
    '.': 'PUNCT', ',': 'PUNCT', ':': 'PUNCT', '(': 'PUNCT', ')': 'PUNCT', '--': 'PUNCT',
    '``': 'PUNCT', "''": 'PUNCT', "'": 'PUNCT',
    # interjections and untagged words
    'uh': 'X', 'nil': 'X',
}
COARSE_TAGS = ('ADJ', 'ADP', 'ADV', 'CONJ', 'DET', 'NOUN', 'NUM', 'PRON', 'PROPN', 'PRT', 'PUNCT',
               'VERB', 'X')
_SUFFIXES = ('-tl', '-hl', '-nc')  # title, headline, cited word: the same part of speech
FOREIGN = 'fw-'


def brown_base(tag: str) -> str:
  """Returns the base of a Brown tag: suffixes off, a compound's first part, no '$' or '*' markers.

  'np$-tl' -> 'np', 'ppss+ber' -> 'ppss', 'md*' -> 'md', '*' -> '*'; foreign words ('fw-...')
  return 'fw'.
  """
  tag = tag.strip().lower()
  while tag.endswith(_SUFFIXES):
    tag = tag[:-3]
  if tag.startswith(FOREIGN):
    return 'fw'
  first = tag.split('+')[0]
  return first.rstrip('$*') or first  # the bare negation tag '*' stays '*'


def brown_coarse(tag: str) -> str | None:
  """Returns the coarse class of a Brown tag ('fw-...' is X), or None when the table lacks it."""
  base = brown_base(tag)
  return 'X' if base == 'fw' else BROWN_COARSE.get(base)


def map_tag(tag: str, tag_map: str, unmapped: collections.Counter) -> str:
  """Returns the tag under task_data.tag_map; a Brown tag the table lacks becomes X, counted."""
  if not tag_map:
    return tag
  coarse = brown_coarse(tag)
  if coarse is None:
    unmapped[tag] += 1
    return 'X'
  return coarse


def split_row_parts(rows: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (tokens (B, L), tag ids (B, L), weights (B, L) bool) of tagging rows (B, 2 L).

  A row whose first token is pad_id (the tokenizer's; evaluation padding) has no weight.
  """
  seq_len = rows.shape[1] // 2
  tokens, tags = rows[:, :seq_len], rows[:, seq_len:]
  return tokens, tags, (tags >= 0) & (tokens[:, :1] != pad_id)


class TagTask(LabelTask):
  """Token tagging with heads.TokenTagger (word accuracy, macro-F1 over tags, per-tag report)."""

  name = 'tag'
  best_metric = 'accuracy'
  best_mode = 'max'

  count_name = 'words'
  parts = staticmethod(split_row_parts)
  progress_metrics = (('train/loss', 'loss', '.4f'), ('train/accuracy', 'word acc', '.4f'),
                      ('train/lr', 'lr', '.2e'))
  eval_metrics = (('loss', 'loss', '.4f'), ('accuracy', 'word acc', '.4f'),
                  ('macro_f1', 'macro-F1', '.4f'), ('words', 'words', '.0f'))
  predict_modes = ('tag',)

  def __init__(self, config, tokenizer=None, log=print):
    super().__init__(config, tokenizer, log)
    # Per split: (lowercased words, tag ids) of the words kept in the rows, for the baseline.
    self.words: dict[str, tuple[list[str], np.ndarray]] = {}

  def _read(self, path: str) -> tuple[list[dict], list[list[str]], list[list[str]], dict]:
    """Returns the rows, their word lists, their (mapped) tag lists and the tag-map counts."""
    cfg = self.config.task_data
    tag_map = str(cfg.tag_map)
    if tag_map not in TAG_MAPS:
      raise ValueError(f'task_data.tag_map: {tag_map!r} is not a tag map; use one of {list(TAG_MAPS)}')
    rows = td.load_examples(self.config)  # tfds: reads data.tfds_* too
    words, tags = [], []
    unmapped: collections.Counter = collections.Counter()
    raw = 0
    for i, row in enumerate(rows, 1):
      w = td.field(row, cfg.tokens_field, i, path, key='tokens_field')
      t = td.field(row, cfg.tags_field, i, path, key='tags_field')
      if not isinstance(w, list) or not isinstance(t, list):
        raise ValueError(f'task_data.tokens_field / tags_field: {cfg.tokens_field!r} and '
                         f'{cfg.tags_field!r} must be lists in row {i} of {path}')
      if len(w) != len(t):
        raise ValueError(f'task_data.tags_field: row {i} of {path} has {len(t)} tags for '
                         f'{len(w)} words ({cfg.tags_field!r} vs {cfg.tokens_field!r})')
      raw += len(t)
      words.append([str(x) for x in w])
      tags.append([map_tag(str(x), tag_map, unmapped) for x in t])
    counts = {'tag_map': tag_map, 'words': raw,
              'unmapped_words': int(sum(unmapped.values())),
              'unmapped_tags': dict(unmapped.most_common())}
    if unmapped:
      self.log(f'tag: {counts["unmapped_words"]} words have tags the {tag_map} map lacks, tagged X: '
               f'{dict(unmapped.most_common(10))}')
    return rows, words, tags, counts

  def row_width(self) -> int:
    return 2 * int(self.config.train.seq_len)  # tokens, then the tag id at each word's first piece

  def label_names(self) -> list[str]:
    _, _, tags, _ = self._read(str(self.config.task_data.path))
    return sorted({t for ts in tags for t in ts})

  def unlabeled_texts(self, row: dict, i: int, path: str) -> list[str]:
    """Returns [the words joined by spaces]."""
    cfg = self.config.task_data
    words = td.field(row, cfg.tokens_field, i, path, key='tokens_field')
    if not isinstance(words, list):
      raise ValueError(f'task_data.tokens_field: {cfg.tokens_field!r} must be a list in row {i} '
                       f'of {path}')
    return [' '.join(str(w) for w in words)]

  def prepare(self, workdir) -> TaskData:
    self.load_tokenizer(workdir)  # nothing is cached on disk
    cfg, seq_len = self.config.task_data, int(self.config.train.seq_len)
    path = str(cfg.path)
    rows, words, tags, counts = self._read(path)
    splits = td.split_rows(rows, path, cfg)
    self.labels = sorted({t for ts in tags for t in ts})
    index = {n: k for k, n in enumerate(self.labels)}
    enc_stats: dict[str, int] = {}
    cache: dict[str, list[int]] = {}
    table = np.full((len(rows), 2 * seq_len), IGNORE, np.int32)
    kept_words: dict[str, list[str]] = {s: [] for s in td.SPLITS}
    kept_tags: dict[str, list[int]] = {s: [] for s in td.SPLITS}
    empty = 0
    for r, (ws, ts, split) in enumerate(zip(words, tags, splits)):
      empty += not ws
      ids, starts = td.encode_words(self.tokenizer, ws, seq_len, stats=enc_stats, cache=cache)
      table[r, :seq_len] = ids
      kept = starts >= 0
      tag_ids = [index[t] for t, k in zip(ts, kept) if k]
      table[r, seq_len + starts[kept]] = tag_ids
      kept_words[split] += [w.lower() for w, k in zip(ws, kept) if k]
      kept_tags[split] += tag_ids
    keep = np.array([bool(ws) for ws in words])
    where = np.array(splits)
    self.splits = {s: table[(where == s) & keep] for s in td.SPLITS}
    self.words = {s: (kept_words[s], np.array(kept_tags[s], np.int64)) for s in td.SPLITS}
    if not len(self.splits['train']):
      raise ValueError(f'{path}: the train split is empty; lower task_data.val_fraction / '
                       'task_data.test_fraction or add examples')
    x = self.labels.index('X') if 'X' in self.labels else -1
    all_tags = np.concatenate([self.words[s][1] for s in td.SPLITS])
    stats = {
        'source': path, 'examples': len(rows), 'labels': self.labels, **counts,
        'split_examples': {s: int(len(a)) for s, a in self.splits.items()},
        'split_words': {s: len(self.words[s][0]) for s in td.SPLITS},
        'empty_examples': int(empty),
        'truncated_examples': int(enc_stats.get('truncated', 0)),
        'truncated_words': int(enc_stats.get('truncated_words', 0)),
        'tag_counts': {n: int((all_tags == k).sum()) for k, n in enumerate(self.labels)},
        'x_fraction': float((all_tags == x).mean()) if counts['tag_map'] and len(all_tags) else 0.0,
        'seq_len': seq_len,
    }
    self.log(f'tag: {len(rows)} sentences ({counts["words"]} words) from {path}, '
             f'{len(self.labels)} tags; train/val/test sentences '
             f'{stats["split_examples"]["train"]}/{stats["split_examples"]["val"]}/'
             f'{stats["split_examples"]["test"]}; {stats["truncated_words"]} words in '
             f'{stats["truncated_examples"]} sentences cut at {seq_len} tokens')
    return self._task_data(stats)

  def build_model(self, enc_cfg, rngs):
    if not self.labels:
      raise RuntimeError('tag: no labels: call prepare() or load_meta() before build_model()')
    return heads.TokenTagger(enc_cfg, len(self.labels), **self.layout_ids(), rngs=rngs)

  def baselines(self) -> dict[str, float]:
    if self.splits is None:
      raise RuntimeError('tag: call prepare() before baselines()')
    split = 'test' if self.words['test'][0] else 'val'
    words, gold = self.words[split]
    if not words:
      return {}
    pred = most_frequent_tag_predict(*self.words['train'], words, len(self.labels))
    return {'most_frequent_tag_accuracy': metrics_lib.accuracy(gold, pred),
            'most_frequent_tag_macro_f1': metrics_lib.macro_f1(gold, pred, len(self.labels))}

  def final_text(self, record):
    found = metrics_lib.final_split(record)
    if found is None:
      return None
    split, m = found
    line = (f'{split} split: word accuracy {m["accuracy"]:.4f} | macro-F1 '
            f'{m.get("macro_f1", 0.0):.4f}')
    if 'baseline/most_frequent_tag_accuracy' in record:
      line += (f'   (most frequent tag per word: accuracy '
               f'{record["baseline/most_frequent_tag_accuracy"]:.4f}, macro-F1 '
               f'{record["baseline/most_frequent_tag_macro_f1"]:.4f})')
    lines = [line]
    if isinstance(m.get('per_class'), dict):
      lines += metrics_lib.class_table(m['per_class'])
    return '\n'.join(lines)


  def predict(self, graphdef, params, mode, inputs, top_k=0):
    """Returns per sentence its (word, tag) pairs; a word cut off by train.seq_len gets tag None.

    A sentence is a string (split on whitespace) or a list of words; each word's tag is the
    model's choice at the word's first piece.
    """
    if mode != 'tag':
      return super().predict(graphdef, params, mode, inputs, top_k)
    words = [s.split() if isinstance(s, str) else [str(w) for w in s] for s in inputs]
    if not words:
      return []
    seq_len = int(self.config.train.seq_len)
    encoded = [td.encode_words(self.tokenizer, w, seq_len) for w in words]
    probs = self.probabilities(graphdef, params, np.stack([ids for ids, _ in encoded]))
    return [[(w, self.labels[int(np.argmax(p[s]))] if s >= 0 else None) for w, s in zip(ws, starts)]
            for p, (_, starts), ws in zip(probs, encoded, words)]

  def format_prediction(self, mode, text, result) -> str:
    return ' '.join(f'{w}/{t if t is not None else "?"}' for w, t in result)


def most_frequent_tag_predict(train_words, train_tags, words, n: int) -> np.ndarray:
  """Returns each word's most frequent train tag id; unseen words get the most frequent tag overall.

  Ties go to the lowest tag id. Words are compared as given (TagTask passes them lowercased).
  """
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for w, t in zip(train_words, train_tags):
    counts[w][int(t)] += 1
  best = {w: max(c.items(), key=lambda kv: (kv[1], -kv[0]))[0] for w, c in counts.items()}
  train_tags = np.asarray(train_tags, np.int64)
  overall = int(np.argmax(np.bincount(train_tags, minlength=n))) if train_tags.size else 0
  return np.array([best.get(w, overall) for w in words], np.int64)
