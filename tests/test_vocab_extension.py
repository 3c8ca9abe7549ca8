"""Vocabulary extension: old ids keep their meaning, new rows are means, outputs unchanged, DAPT runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sentencepiece import sentencepiece_model_pb2 as sp_model

from mlmjax import model, train, train_state, vocab_extension
from mlmjax import tokenizer as tokenizer_lib

NEW = 60


@pytest.fixture(scope='module')
def domain_texts(pydocs):
  """Return-value and parameter prose: text whose words the help-topics tokenizer cuts finely."""
  return pydocs[:600]


@pytest.fixture(scope='module')
def extension(topics_tokenizer, domain_texts):
  return vocab_extension.extend(topics_tokenizer, domain_texts, NEW, log=lambda _: None)


def _pieces(tok):
  proto = sp_model.ModelProto()
  proto.ParseFromString(tok.serialized_model)
  return [(p.piece, p.score, p.type) for p in proto.pieces]


def test_old_ids_keep_their_piece_score_and_type(topics_tokenizer, extension):
  old, new = _pieces(topics_tokenizer), _pieces(extension.tokenizer)
  assert len(new) == len(old) + NEW and new[:len(old)] == old
  assert extension.tokenizer.vocab_size == topics_tokenizer.vocab_size + NEW
  assert len(set(extension.pieces)) == NEW and not set(extension.pieces) & {p for p, _, _ in old}


def test_extension_cuts_domain_text_shorter_and_round_trips(topics_tokenizer, extension,
                                                            domain_texts):
  before = sum(len(topics_tokenizer.encode(t)) for t in domain_texts[:200])
  after = sum(len(extension.tokenizer.encode(t)) for t in domain_texts[:200])
  assert after < 0.97 * before
  for text in domain_texts[:50]:
    ids = extension.tokenizer.encode(text)
    assert extension.tokenizer.decode(ids) == topics_tokenizer.decode(topics_tokenizer.encode(text))


def test_text_without_new_pieces_is_cut_as_before(topics_tokenizer, extension, topics_corpus):
  paragraphs = topics_corpus.read_text().split('\n\n')[:300]
  unchanged = 0
  for text in paragraphs:
    ids = extension.tokenizer.encode(text)
    if max(ids, default=0) < topics_tokenizer.vocab_size:
      assert ids == topics_tokenizer.encode(text)
      unchanged += 1
  assert unchanged >= 10


def test_sources_are_the_old_tokenizers_cut_of_each_new_piece(topics_tokenizer, extension):
  assert vocab_extension.sources(topics_tokenizer, extension.tokenizer) == extension.sources
  for piece, ids in zip(extension.pieces, extension.sources):
    text = ''.join(topics_tokenizer.id_to_piece(i) for i in ids)
    assert text.replace('\u2581', '') == piece.replace('\u2581', '') or any(
        topics_tokenizer.id_to_piece(i).startswith('<0x') for i in ids)


def test_sources_refuses_a_tokenizer_that_is_not_an_extension(topics_tokenizer, tmp_path,
                                                              domain_texts):
  other = tokenizer_lib.train_tokenizer(domain_texts, tmp_path / 'other.model', vocab_size=1200)
  with pytest.raises(ValueError, match='not an extension: id'):
    vocab_extension.sources(topics_tokenizer, other)
  with pytest.raises(ValueError, match='not an extension'):
    vocab_extension.sources(other, topics_tokenizer)


@pytest.mark.parametrize('tie', [pytest.param(True, marks=pytest.mark.slow), False])
def test_extended_model_computes_what_the_original_did_on_old_ids(topics_tokenizer, extension,
                                                                  topics_corpus, tie):
  base_v, ext_v = topics_tokenizer.vocab_size, extension.tokenizer.vocab_size
  shape = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position=64,
               tie_embeddings=tie)
  cfg = model.EncoderConfig(vocab_size=base_v, **shape)
  base = model.BertForMLM(cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
  # A non-zero bias, so that the bias rows are checked too.
  params['mlm_head']['bias'] = jax.random.normal(jax.random.key(1), (base_v,))
  nnx.update(base, params)
  _, param_state = train_state.abstract_model(cfg, 0)
  axes = vocab_extension.vocab_axes(nnx.to_pure_dict(nnx.get_partition_spec(param_state)))
  assert sorted(axes) == sorted(["['encoder']['token_embed']", "['mlm_head']['bias']"]
                                + ([] if tie else ["['mlm_head']['decoder']"]))
  grown = vocab_extension.extend_params(params, axes, extension.sources)
  ext = model.BertForMLM(model.EncoderConfig(vocab_size=ext_v, **shape), rngs=nnx.Rngs(1))
  nnx.update(ext, grown)
  # A new row is the mean of its old rows, in every vocabulary-sized parameter.
  k = int(np.argmax([len(s) for s in extension.sources]))
  src = extension.sources[k]
  emb = np.asarray(grown['encoder']['token_embed'])
  np.testing.assert_allclose(emb[base_v + k], emb[src].mean(0), rtol=1e-6, atol=1e-7)
  bias = np.asarray(grown['mlm_head']['bias'])
  np.testing.assert_allclose(bias[base_v + k], bias[src].mean(), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(emb[:base_v], np.asarray(params['encoder']['token_embed']))
  # Text the extended tokenizer cuts with old pieces only: the same hidden states and old logits.
  texts = [t for t in topics_corpus.read_text().split('\n\n')[:300]
           if max(extension.tokenizer.encode(t)) < base_v][:4]
  rows = np.zeros((len(texts), 64), np.int32)
  for r, t in enumerate(texts):
    ids = [topics_tokenizer.cls_id] + extension.tokenizer.encode(t)[:62] + [topics_tokenizer.sep_id]
    rows[r, :len(ids)] = ids
  rows = jnp.asarray(rows)
  h_base, h_ext = base.encoder(rows), ext.encoder(rows)
  np.testing.assert_allclose(np.asarray(h_ext), np.asarray(h_base), rtol=0, atol=1e-6)
  l_base, l_ext = base.dense_logits(rows), ext.dense_logits(rows)
  assert l_ext.shape[-1] == ext_v
  np.testing.assert_allclose(np.asarray(l_ext[..., :base_v]), np.asarray(l_base), rtol=0, atol=1e-6)


def test_a_wordpiece_tokenizer_is_refused(tmp_path):
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'b', '##c']) + '\n')
  with pytest.raises(ValueError, match='only sentencepiece unigram tokenizers'):
    vocab_extension.extend(tokenizer_lib.load_any(vocab), ['a b c'], 5)


@pytest.mark.slow
def test_dapt_with_an_extended_tokenizer_resumes_and_exports(tmp_path, make_tiny_config,
                                                             domain_texts):
  from mlmjax import convert, predict
  pre = make_tiny_config()
  pre.model.pre_layer_norm = False  # exported as BERT (pre-LN runs export as RoBERTa-PreLayerNorm)
  pre.train.num_steps, pre.ckpt.every_steps, pre.eval.every_steps = 2, 2, 2
  train.run(pre, tmp_path / 'pre')
  domain = tmp_path / 'domain.txt'
  domain.write_text('\n\n'.join(' '.join(d.split()) for d in domain_texts[:600]) + '\n')
  c = make_tiny_config()
  c.model.pre_layer_norm = False
  c.init_from = str(tmp_path / 'pre')
  c.data.corpus = str(domain)
  c.tokenizer.extend_pieces = NEW
  c.train.num_steps, c.ckpt.every_steps, c.eval.every_steps = 2, 1, 2
  work = tmp_path / 'dapt'
  assert train.run(c, work)['finished']
  log = (work / 'log.txt').read_text()
  assert 'new pieces after its' in log and 'tokenizer on validation:' in log
  base = tokenizer_lib.load_any(tmp_path / 'pre' / 'tokenizer.model')
  ext = tokenizer_lib.load_any(work / 'tokenizer.model')
  assert ext.vocab_size == base.vocab_size + NEW
  assert len(vocab_extension.sources(base, ext)) == NEW
  # Resume: the same command with more steps continues from step 2 with the stored tokenizer.
  c.train.num_steps = 3
  summary = train.run(c, work)
  assert summary['finished'] and summary['step'] == 3
  assert 'resumed from step 2' in (work / 'log.txt').read_text()
  assert tokenizer_lib.load_any(work / 'tokenizer.model').fingerprint == ext.fingerprint
  run = predict.load_run(work)
  assert run.params['encoder']['token_embed'].shape[0] == ext.vocab_size
  # Export carries the extended tokenizer and vocabulary.
  out = convert.export_hf(work, tmp_path / 'hf', log=lambda s: None)
  assert json.loads((out / 'config.json').read_text())['vocab_size'] == ext.vocab_size
  assert (out / 'tokenizer.model').read_bytes() == ext.serialized_model
