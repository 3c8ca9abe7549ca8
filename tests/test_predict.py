"""Tests for mlmjax/predict.py: fill-mask, classify, tag and embed from workdirs built by hand.

The workdirs are written here (config.json, tokenizer.model, task.json, checkpoints/ and best/),
not by train.py, with parameters from a seed the loader's own init does not use: a prediction can
only match the model's forward output when the checkpoint was really restored.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import finetune, pretrain
from mlmjax import checkpoint, experiment, heads, model, optim, predict, train_state
from mlmjax import tasks as tasks_lib
from mlmjax import tokenizer as tok
from mlmjax.tasks import mlm, task_data

SEQ_LEN = 16
CLASSES = ['asyncio', 'email', 'logging']
TAGS = ['DET', 'NOUN', 'PUNCT', 'VERB']
TEXTS = ['Return a new event loop.', 'Parse an e-mail message from a string.',
         'Log a message with severity ERROR on the root logger.', 'Close the transport.',
         'Create a handler that writes records to a stream, one line each, with a formatter.']


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  """Returns a 400-piece unigram tokenizer trained on 40 of Python's help topics (~200 KB)."""
  from pydoc_data.topics import topics
  path = tmp_path_factory.mktemp('tok') / 'tokenizer.model'
  return tok.train_tokenizer([topics[k] for k in sorted(topics)[:40]], path, vocab_size=400)


def _shrink(c):
  c.unlock()
  c.model.size = 'custom'
  c.model.hidden_size, c.model.num_layers, c.model.num_heads, c.model.intermediate_size = 32, 1, 2, 64
  c.model.max_position = 64
  c.train.seq_len = SEQ_LEN
  c.lock()
  return c


def _task_config(task):
  c = finetune.get_config('tiny' if task == 'classify' else 'retrieve_tiny')
  c.unlock()
  c.task = task
  c.classify.pooling = 'cls'
  return _shrink(c)


class _Saved:
  """A saved model: call it like the nnx module (jitted) on token rows."""

  def __init__(self, graphdef, params):
    self.graphdef, self.params = graphdef, params
    self._call = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
    self._encode = jax.jit(lambda p, ids: nnx.merge(graphdef, p).encoder(ids))

  def __call__(self, *args):
    return np.asarray(self._call(self.params, *(jnp.asarray(a) for a in args)))

  def encoder(self, ids):
    return self._encode(self.params, jnp.asarray(ids))


def _workdir(path, config, tokenizer, stats=None, *, latest=(10, 101), best=(5, 202)):
  """Returns {'latest'|'best': _Saved} written under path as train.py lays out a workdir.

  Each checkpoint holds a state shaped like train_state.make_init_fn's ({'params', 'opt_state', 'step'})
  with parameters drawn from its own seed, so only a real restore reproduces them.
  """
  path.mkdir(parents=True, exist_ok=True)
  (path / 'checkpoints').mkdir(exist_ok=True)
  (path / 'config.json').write_text(config.to_json_best_effort())
  (path / 'tokenizer.model').write_bytes(tokenizer.serialized_model)
  enc_cfg = experiment.encoder_config(config, tokenizer.vocab_size)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  if config.task == 'mlm':
    build = lambda cfg, rngs: model.BertForMLM(cfg, rngs=rngs)
  else:
    (path / 'task.json').write_text(json.dumps({'task': config.task, **stats}))
    task = tasks_lib.get_task_class(config.task)(config, tokenizer, lambda _: None)
    task.load_meta(stats)
    build = task.build_model
  graphdef, _ = train_state.abstract_model(enc_cfg, 0, build)
  abstract = jax.eval_shape(train_state.make_init_fn(enc_cfg, tx, 0, build))
  models = {}
  for name, where, spec in (('latest', 'checkpoints', latest), ('best', 'best', best)):
    if spec:
      step, seed = spec
      rng = np.random.default_rng(seed)  # numpy draws: no XLA compile for an init
      state = {
          'params': jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.1, a.shape), a.dtype),
                                 abstract['params']),
          'opt_state': jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract['opt_state']),
          'step': jnp.asarray(step, jnp.int32)}
      ckpt = checkpoint.Checkpointer(path / where, async_save=False)
      ckpt.save(step, state, {'step': step})
      ckpt.close()
      models[name] = _Saved(graphdef, state['params'])
  return models


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope='module')
def classify_dir(tmp_path_factory, tokenizer):
  """Returns (workdir, saved models, {'best'|'latest': LoadedRun}) of a classify run."""
  path = tmp_path_factory.mktemp('classify')
  models = _workdir(path, _task_config('classify'), tokenizer, {'labels': CLASSES})
  return path, models, {'best': predict.load_run(path), 'latest': predict.load_run(path, 'latest')}


@pytest.fixture(scope='module')
def tag_dir(tmp_path_factory, tokenizer):
  """Returns (workdir, saved models) of a tag run without best/."""
  path = tmp_path_factory.mktemp('tag')
  return path, _workdir(path, _task_config('tag'), tokenizer, {'labels': TAGS}, best=None)


@pytest.mark.slow
def test_classify_reproduces_the_chosen_checkpoints_forward(classify_dir, tokenizer):
  _, models, runs = classify_dir
  assert (runs['best'].task, runs['best'].step, runs['best'].labels) == ('classify', 5, CLASSES)
  assert runs['best'].checkpoint_dir.endswith('best') and runs['latest'].step == 10
  ids = task_data.encode_texts(tokenizer, TEXTS, SEQ_LEN)
  got = {}
  for name, run in runs.items():
    want = _softmax(models[name](ids))
    got[name] = predict.classify(run, TEXTS, top_k=len(CLASSES))
    assert len(got[name]) == len(TEXTS)
    for probs, pairs in zip(want, got[name]):
      assert [label for label, _ in pairs] == [CLASSES[i] for i in np.argsort(-probs, kind='stable')]
      np.testing.assert_allclose([p for _, p in pairs], np.sort(probs)[::-1], rtol=1e-5, atol=1e-6)
  # The two checkpoints differ, so matching each one's forward shows each was restored.
  assert not np.allclose([p for _, p in got['best'][0]], [p for _, p in got['latest'][0]], atol=1e-4)
  assert predict.classify(runs['best'], TEXTS[0], top_k=2) == [
      (label, pytest.approx(p, rel=1e-5)) for label, p in got['best'][0][:2]]


def test_embed_is_the_pooled_vector_the_classifier_reads(classify_dir, tokenizer):
  _, models, runs = classify_dir
  texts = TEXTS * 8  # 40 texts: two batches of 32, the second mostly padding
  ids = task_data.encode_texts(tokenizer, texts, SEQ_LEN)
  hidden = models['best'].encoder(ids)
  got = predict.embed(runs['best'], texts)
  assert got.shape == (40, 32) and got.dtype == np.float32
  np.testing.assert_allclose(got, np.asarray(hidden[:, 0]), rtol=1e-5, atol=1e-5)
  mean = predict.embed(runs['best'], texts, pooling='mean')
  np.testing.assert_allclose(mean, np.asarray(heads.mean_pool(hidden, jnp.asarray(ids) != 0)),
                             rtol=1e-5, atol=1e-5)
  assert predict.embed(runs['best'], []).shape == (0, 32)
  with pytest.raises(ValueError, match='--pooling'):
    predict.embed(runs['best'], TEXTS, pooling='max')


def test_tag_reproduces_the_forward_at_each_words_first_piece(tag_dir, tokenizer):
  path, models = tag_dir
  run = predict.load_run(path)  # no best/: the latest checkpoint
  assert (run.step, run.checkpoint_dir.endswith('checkpoints')) == (10, True)
  sentences = ['The cat sat .', 'Return the value of the named attribute of an object , with a '
               'default when it is missing entirely from the instance .']
  got = predict.tag(run, sentences)
  for sentence, pairs in zip(sentences, got):
    words = sentence.split()
    ids, starts = task_data.encode_words(tokenizer, words, SEQ_LEN)
    logits = models['latest'](ids[None])[0]
    assert [w for w, _ in pairs] == words
    assert [t for _, t in pairs] == [TAGS[int(np.argmax(logits[s]))] if s >= 0 else None
                                     for s in starts]
  assert got[1][-1][1] is None and got[0][-1][1] is not None  # the long sentence was cut
  assert predict.tag(run, [['The', 'cat', 'sat', '.']]) == got[:1]  # a sentence as a word list
  assert predict.tag(run, 'The cat sat .') == got[0]


def test_retrieve_embeddings_are_the_dual_encoders(tmp_path, tokenizer, capsys):
  models = _workdir(tmp_path, _task_config('retrieve'), tokenizer, {'counts': {}}, latest=None)
  run = predict.load_run(tmp_path)
  want = models['best'](task_data.encode_texts(tokenizer, TEXTS, SEQ_LEN))
  np.testing.assert_allclose(predict.embed(run, TEXTS), want, rtol=1e-5, atol=1e-5)
  out = tmp_path / 'emb.npy'
  predict.main(['--workdir', str(tmp_path), '--mode', 'embed', '--out', str(out), *TEXTS[:2]])
  np.testing.assert_allclose(np.load(out), want[:2], rtol=1e-5, atol=1e-5)
  assert 'saved 2 x 32' in capsys.readouterr().out
  predict.main(['--workdir', str(tmp_path), '--mode', 'embed', TEXTS[0]])
  assert f'dim 32: {want[0, 0]:.4f}' in capsys.readouterr().out
  with pytest.raises(ValueError, match='--mode embed'):
    predict.classify(run, TEXTS)


def test_cli_prints_labels_and_tags(classify_dir, tag_dir, capsys):
  path, _, runs = classify_dir
  predict.main(['--workdir', str(path), '--mode', 'classify', TEXTS[0]])
  printed = capsys.readouterr().out.splitlines()
  top = predict.classify(runs['best'], TEXTS[0])
  assert printed[1:] == [TEXTS[0], '  ' + '  '.join(f'{l} {p:.3f}' for l, p in top)]
  predict.main(['--workdir', str(tag_dir[0]), '--mode', 'tag', 'The cat sat .'])
  line = capsys.readouterr().out.splitlines()[1]
  assert [p.split('/')[0] for p in line.split()] == ['The', 'cat', 'sat', '.']
  assert all(p.split('/')[1] in TAGS for p in line.split())
  with pytest.raises(SystemExit, match="fill_mask needs a workdir trained with a task that predicts it.*task 'classify'; use --mode classify or embed"):
    predict.main(['--workdir', str(path), 'The [MASK] sat.'])
  with pytest.raises(SystemExit):
    predict.main(['--workdir', str(path), '--mode', 'classify', '--out', 'x.npy', TEXTS[0]])
  assert '--out and --pooling apply to --mode embed only' in capsys.readouterr().err


@pytest.mark.slow
def test_mlm_workdir_keeps_fill_mask_and_refuses_task_modes(tmp_path, tokenizer, capsys):
  config = _shrink(pretrain.get_config('tiny_classic'))
  models = _workdir(tmp_path, config, tokenizer, best=None)
  stored = json.loads((tmp_path / 'config.json').read_text())
  del stored['task']  # a workdir written before fine-tuning existed
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  run = predict.load_run(tmp_path)
  assert (run.task, run.step, run.labels) == ('mlm', 10, [])
  text = 'Return the [MASK] of the [MASK].'
  out = predict.fill_mask(run, text, top_k=3)
  assert len(out) == 2 and all(len(c) == 3 for c in out)
  ids = [tokenizer.cls_id] + tokenizer.encode_with_specials(text) + [tokenizer.sep_id]
  ids = np.asarray(ids + [0] * (SEQ_LEN - len(ids)), np.int32)[None]
  pos = np.flatnonzero(ids[0] == tokenizer.mask_id)[None].astype(np.int32)
  logits = np.array(models['latest'](ids, pos))[0, 0]
  logits[:tok.NUM_SPECIAL] = -np.inf
  best = np.argsort(-logits)[:3]
  assert [w for w, _ in out[0]] == [mlm.display_token(tokenizer, i) for i in best]
  np.testing.assert_allclose([p for _, p in out[0]], _softmax(logits)[best], rtol=1e-5)
  row = task_data.encode_texts(tokenizer, TEXTS[:1], SEQ_LEN)
  want = heads.mean_pool(models['latest'].encoder(row), jnp.asarray(row) != 0)[0]
  np.testing.assert_allclose(predict.embed(run, TEXTS[0]), np.asarray(want), rtol=1e-5, atol=1e-5)
  for fn in (predict.classify, predict.tag):
    with pytest.raises(ValueError, match="was trained with task 'mlm'; use --mode fill_mask or embed"):
      fn(run, TEXTS)
  predict.main(['--workdir', str(tmp_path), 'The [MASK] is here.'])
  assert capsys.readouterr().out.startswith(f'{tmp_path} (step 10)\nThe [MASK] is here.\n  [MASK] #1:')


def test_missing_pieces_are_named(tmp_path, tokenizer):
  with pytest.raises(FileNotFoundError, match='config.json is missing'):
    predict.load_run(tmp_path)
  _workdir(tmp_path, _task_config('classify'), tokenizer, {'labels': CLASSES}, latest=None,
           best=None)  # no checkpoint: every check below fails before a restore
  (tmp_path / 'task.json').write_text(json.dumps({'task': 'classify'}))
  with pytest.raises(ValueError, match='task.json lists no "labels"'):
    predict.load_run(tmp_path)
  (tmp_path / 'task.json').unlink()
  with pytest.raises(FileNotFoundError, match='task.json is missing'):
    predict.load_run(tmp_path)
  with pytest.raises(ValueError, match='--checkpoint'):
    predict.load_run(tmp_path, 'newest')
  (tmp_path / 'task.json').write_text(json.dumps({'task': 'classify', 'labels': CLASSES}))
  with pytest.raises(FileNotFoundError, match='no restorable checkpoint'):
    predict.load_run(tmp_path)
