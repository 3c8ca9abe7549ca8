"""Tests for mlmjax/tasks/tag.py: the Brown coarse map, prepare, loss, evaluation, baselines."""

import collections
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import finetune
from mlmjax.tasks import tag
from mlmjax.tasks import metrics as metrics_lib, task_data as td

SEQ_LEN = 20
LEXICON = {'DET': ['the', 'a', 'every'],
           'NOUN': ['interpreter', 'exception', 'dictionary', 'Xylophone'],
           'VERB': ['raises', 'returns', 'imports'], 'PUNCT': ['.', ',', "''"]}


@pytest.fixture(scope='module')
def tok(topics_tokenizer):
  """Returns the session's 1,000-piece tokenizer of the pydoc topics."""
  return topics_tokenizer


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
  """Returns a JSON Lines file of 150 tagged sentences in 30 documents (3 to 9 words each)."""
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp('data') / 'tagged.jsonl'
  with open(path, 'w') as f:
    for i in range(150):
      tags = [str(t) for t in rng.choice(sorted(LEXICON), size=int(rng.integers(3, 10)))]
      words = [str(rng.choice(LEXICON[t])) for t in tags]
      f.write(json.dumps({'doc': f'd{i // 5}', 'tokens': words, 'tags': tags}) + '\n')
  return path


def make_config(path, **task_data):
  c = finetune.get_config('brown_pos')
  c.task_data.path = str(path)
  c.task_data.tag_map = ''
  c.task_data.val_fraction = 0.2
  c.task_data.test_fraction = 0.2
  for k, v in task_data.items():
    c.task_data[k] = v
  c.train.seq_len = SEQ_LEN
  c.eval.batch_size = 8
  return c


@pytest.fixture(scope='module')
def prepared(tok, data_path):
  task = tag.TagTask(make_config(data_path), tok, lambda s: None)
  return task, task.prepare(None)


@pytest.fixture(scope='module')
def net(prepared, tok, tiny_task_model):
  """Returns (graphdef, params, logits_fn) of a tiny random tagger; logits_fn is jitted."""
  graphdef, params = tiny_task_model(prepared[0], tok.vocab_size, SEQ_LEN, seed=5)
  logits_fn = jax.jit(lambda p, tokens: nnx.merge(graphdef, p)(tokens))
  return graphdef, params, logits_fn


def _np_nll(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  return lse - np.take_along_axis(logits, np.maximum(labels, 0)[..., None], -1)[..., 0]


# ---------------------------------------------------------------------------------------------
# The Brown coarse map


@pytest.mark.parametrize('raw, coarse', [
    ('np-tl', 'PROPN'), ('np$', 'PROPN'), ('vbd', 'VERB'), ('nn-hl', 'NOUN'), ('*', 'PRT'),
    ('ppss+ber', 'PRON'), ("'", 'PUNCT'), ('fw-nn', 'X'), ('fw-in+at-tl', 'X'), ('---hl', 'PUNCT'),
    ('pp$$', 'PRON'), ('md*', 'VERB'), ('nn-tl-hl', 'NOUN'), ('ppss+ber-n', 'PRON'), ('at', 'DET'),
    ('in', 'ADP'), ('cd-tl', 'NUM'), ('cs', 'CONJ'), ('to', 'PRT'), ('jjt', 'ADJ'), ('ql', 'ADV'),
    ('``', 'PUNCT'), ('uh', 'X'), ('NN', 'NOUN'), ('wp$', 'PRON'), ('dod*', 'VERB')])
def test_brown_coarse(raw, coarse):
  assert tag.brown_coarse(raw) == coarse


def test_brown_map_is_closed_and_counts_unknown_tags():
  assert set(tag.BROWN_COARSE.values()) <= set(tag.COARSE_TAGS)
  assert len(tag.COARSE_TAGS) == 13
  unmapped = collections.Counter()
  assert tag.map_tag('zz', 'brown_coarse', unmapped) == 'X'
  assert tag.map_tag('nn', 'brown_coarse', unmapped) == 'NOUN'
  assert tag.map_tag('zz', '', unmapped) == 'zz'
  assert unmapped == {'zz': 1}
  assert tag.brown_coarse('zz') is None


# ---------------------------------------------------------------------------------------------
# prepare


def test_prepare_layout_first_pieces(prepared, tok, data_path):
  task, data = prepared
  assert task.labels == sorted(LEXICON) == data.stats['labels']
  assert data.train.shape[1] == 2 * SEQ_LEN and data.train.dtype == np.int32
  rows = td.read_examples(str(data_path))
  splits = td.split_rows(rows, str(data_path), task.config.task_data)
  for s in td.SPLITS:
    assert data.stats['split_examples'][s] == splits.count(s) == len(getattr(data, s))
  # Sentences of one document share a split.
  for d in range(30):
    assert len(set(splits[5 * d:5 * d + 5])) == 1
  for row, example in zip(data.train, [r for r, s in zip(rows, splits) if s == 'train']):
    tokens, tags = row[:SEQ_LEN], row[SEQ_LEN:]
    labelled = np.flatnonzero(tags >= 0)
    assert (tags[tags < 0] == tag.IGNORE).all()
    assert tokens[0] == td.CLS_ID and tags[0] == tag.IGNORE
    assert tok.word_starts(tokens[labelled]).all()
    # Labelled positions are the first pieces of the kept words, in order, with their tags.
    kept = len(labelled)
    assert kept <= len(example['tokens'])
    assert [task.labels[t] for t in tags[labelled]] == example['tags'][:kept]
    ends = list(labelled[1:]) + [int(np.flatnonzero(tokens == td.SEP_ID)[0])]
    assert [tok.decode(tokens[a:b]) for a, b in zip(labelled, ends)] == example['tokens'][:kept]
    assert (tags[ends[-1]:] == tag.IGNORE).all()  # [SEP] and PAD carry no tag
  words = data.stats['words']
  assert words == sum(len(r['tokens']) for r in rows)
  assert sum(data.stats['split_words'].values()) + data.stats['truncated_words'] == words
  assert data.stats['truncated_words'] > 0  # 9 words of up to 4 pieces do not fit in 20
  json.dumps(data.stats)


def test_prepare_errors(tok, tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_text('{"doc": "a", "tokens": ["x", "y"], "tags": ["n"]}\n')
  with pytest.raises(ValueError, match=r'task_data\.tags_field: row 1 of .*d\.jsonl has 1 tags '
                                       r'for 2 words'):
    tag.TagTask(make_config(path), tok, print).prepare(None)
  path.write_text('{"doc": "a", "tokens": "x y", "tags": ["n", "n"]}\n')
  with pytest.raises(ValueError, match='must be lists in row 1'):
    tag.TagTask(make_config(path), tok, print).prepare(None)
  with pytest.raises(ValueError, match=r"task_data\.tag_map: 'upos' is not a tag map"):
    tag.TagTask(make_config(path, tag_map='upos'), tok, print).prepare(None)


# ---------------------------------------------------------------------------------------------
# Loss and evaluation on a tiny random model


@pytest.mark.slow
def test_batch_loss_matches_numpy_over_first_pieces(prepared, net):
  task, data = prepared
  graphdef, params, logits_fn = net
  rows = np.array(data.train[:6])
  fewer = rows.copy()
  labelled = np.argwhere(fewer[:, SEQ_LEN:] >= 0)[::2]  # every other labelled word
  fewer[labelled[:, 0], SEQ_LEN + labelled[:, 1]] = tag.IGNORE
  padded = np.concatenate([rows, np.zeros((2, 2 * SEQ_LEN), np.int32)])

  @jax.jit
  def losses(params, key):
    m = nnx.merge(graphdef, params)
    return [task.batch_loss(m, jnp.asarray(r), key, None, jnp.int32(0)) for r in (rows, fewer, padded)]

  (loss, weight, sums), (loss_fewer, weight_fewer, _), (loss_pad, weight_pad, _) = losses(
      params, jax.random.key(0))
  logits = np.asarray(logits_fn(params, jnp.asarray(rows[:, :SEQ_LEN])))
  for r, got_loss, got_weight in ((rows, loss, weight), (fewer, loss_fewer, weight_fewer)):
    tags = r[:, SEQ_LEN:]
    mask = tags >= 0
    assert float(got_weight) == mask.sum()
    np.testing.assert_allclose(float(got_loss), _np_nll(logits, tags)[mask].sum(), rtol=1e-5)
  assert float(weight_fewer) < float(weight)
  tags = rows[:, SEQ_LEN:]
  mask = tags >= 0
  assert float(sums['correct']) == float((logits.argmax(-1) == tags)[mask].sum())
  # All-zero padding rows (whose tag columns read 0, a real tag id) are ignored.
  assert float(weight_pad) == float(weight)
  np.testing.assert_allclose(float(loss_pad), float(loss), rtol=1e-5)
  record = task.window_record({k: float(v) for k, v in sums.items()})
  assert record['train/accuracy'] == pytest.approx(float(sums['correct']) / float(weight))


def test_evaluate_is_consistent_with_the_forward_pass(prepared, net):
  task, data = prepared
  graphdef, params, logits_fn = net
  task.config.eval.batch_size = next(b for b in (7, 8, 9, 11) if len(data.val) % b)
  metrics = task.evaluate(graphdef, params, 'val', jnp.asarray)
  logits = np.asarray(logits_fn(params, jnp.asarray(data.val[:, :SEQ_LEN])))
  tags = data.val[:, SEQ_LEN:]
  mask = tags >= 0
  gold, pred = tags[mask], logits.argmax(-1)[mask]
  assert metrics['words'] == mask.sum() == data.stats['split_words']['val']
  assert metrics['accuracy'] == pytest.approx(float(np.mean(gold == pred)))
  assert metrics['loss'] == pytest.approx(_np_nll(logits, tags)[mask].mean(), rel=1e-5)
  assert metrics['macro_f1'] == pytest.approx(metrics_lib.macro_f1(gold, pred, len(task.labels)))
  assert sum(v['support'] for v in metrics['per_class'].values()) == mask.sum()
  assert 'word acc' in task.eval_text(metrics)


# ---------------------------------------------------------------------------------------------
# Baselines


def test_most_frequent_tag_baseline():
  # ids: 0 DET, 1 NOUN, 2 VERB
  train_words = ['the', 'run', 'run', 'run', 'dog', 'the', 'dog', 'walk', 'walk']
  train_tags = [0, 2, 1, 2, 1, 0, 1, 1, 2]
  pred = tag.most_frequent_tag_predict(train_words, train_tags, ['run', 'the', 'cat', 'walk'], 3)
  # 'run' is VERB twice, NOUN once; 'cat' is unseen -> NOUN (most frequent overall); 'walk' ties
  # NOUN/VERB -> the lower id.
  assert pred.tolist() == [2, 0, 1, 1]


def test_baselines_on_a_constructed_split(prepared):
  task = tag.TagTask(prepared[0].config, None, print)
  task.labels = ['DET', 'NOUN', 'VERB']
  task.splits = {s: np.zeros((1, 2 * SEQ_LEN), np.int32) for s in td.SPLITS}
  task.words = {'train': (['the', 'dog', 'runs', 'the', 'cat', 'dog'], np.array([0, 1, 2, 0, 1, 1])),
                'val': ([], np.array([], np.int64)),
                'test': (['the', 'dog', 'runs', 'bird'], np.array([0, 1, 1, 1]))}
  b = task.baselines()
  # Predictions DET NOUN VERB NOUN (unseen 'bird' -> NOUN): 3 of 4 right.
  # F1: DET 1, NOUN p=1 r=2/3 -> 0.8, VERB p=0 -> 0; macro over the 3 classes present.
  assert b == pytest.approx({'most_frequent_tag_accuracy': 0.75,
                             'most_frequent_tag_macro_f1': (1 + 0.8 + 0) / 3})
  text = task.final_text({'test/accuracy': 0.9, 'test/macro_f1': 0.8,
                          'baseline/most_frequent_tag_accuracy': 0.75,
                          'baseline/most_frequent_tag_macro_f1': 0.6})
  assert text.startswith('test split: word accuracy 0.9000') and 'most frequent tag' in text


# ---------------------------------------------------------------------------------------------
# The real Brown corpus


def test_brown_coarse_map_covers_the_corpus(shared_data):
  path = shared_data / 'tasks' / 'brown_pos_tagged.jsonl'
  raw = collections.Counter()
  with open(path) as f:
    for line in f:
      raw.update(json.loads(line)['tags'])
  total = sum(raw.values())
  assert total == 1_161_192 and len(raw) == 472  # ../shared/data/README.md
  unmapped = sum(n for t, n in raw.items() if tag.brown_coarse(t) is None)
  assert unmapped == 0  # every tag has a rule: coverage without fallback X is 100% >= 99.9%
  x = sum(n for t, n in raw.items() if tag.brown_coarse(t) == 'X')  # fw-*, uh, nil by design
  assert x / total < 0.005
  coarse = collections.Counter()
  for t, n in raw.items():
    coarse[tag.brown_coarse(t)] += n
  assert set(coarse) == set(tag.COARSE_TAGS)
  assert coarse.most_common(1)[0][0] == 'NOUN'


def test_brown_prepare(shared_data, tok):
  c = make_config(shared_data / 'tasks' / 'brown_pos_tagged.jsonl', tag_map='brown_coarse',
                  max_examples=1500, val_fraction=0.1, test_fraction=0.1)
  c.train.seq_len = 64
  task = tag.TagTask(c, tok, print)
  data = task.prepare(None)
  assert set(data.stats['labels']) <= set(tag.COARSE_TAGS) and len(data.stats['labels']) >= 12
  assert data.stats['unmapped_words'] == 0 and data.stats['examples'] == 1500
  b = task.baselines()
  # The most-frequent-tag baseline is strong for coarse POS (about 0.9 on Brown).
  assert 0.75 < b['most_frequent_tag_accuracy'] < 1.0
  assert 0 < b['most_frequent_tag_macro_f1'] <= 1.0
  assert math.isfinite(sum(data.stats['tag_counts'].values()))
