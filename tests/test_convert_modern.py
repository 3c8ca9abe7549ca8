"""Hugging Face ModernBERT interop: parity with ModernBertForMaskedLM (global and sliding-window
layers), BPE tokenizer.json files, exports of rotary runs, round trips, and what is refused."""

import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='torch (test extra) is not installed')
transformers = pytest.importorskip('transformers', reason='transformers (test extra) is not installed')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import tokenizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from mlmjax import convert, hf_models, input_pipeline, model, model_card, predict, train, train_state  # pylint: disable=wrong-import-position
from mlmjax import tokenizer as tok  # pylint: disable=wrong-import-position
from mlmjax.tasks import mlm  # pylint: disable=wrong-import-position
from tests.test_convert import assert_round_trip, assert_same_fill_mask, shrunk_classify_config  # pylint: disable=wrong-import-position

TOL = 1e-4  # float32 on both sides: differences are summation order only
PAD, CLS, SEP = 0, 1, 2  # the random checkpoints' layout ids
LENGTHS = (40, 29, 12)  # one [CLS] ... [SEP] unit per row, right-padded; 40 > every window

# Random ModernBertConfigs: global every 3rd / 2nd layer, windows of 16 / 8 (both shorter than
# the rows), biases on and off, decoder bias off, untied decoder, other rotary bases.
SHAPES = {
    'every3_w16': dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=48, local_attention=16, global_attn_every_n_layers=3),
    'every2_w8_biases': dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=48, local_attention=8, global_attn_every_n_layers=2, attention_bias=True,
        mlp_bias=True, classifier_bias=True, norm_bias=True, decoder_bias=False,
        tie_word_embeddings=False, norm_eps=1e-6,
        rope_parameters={'full_attention': {'rope_type': 'default', 'rope_theta': 5000.0},
                         'sliding_attention': {'rope_type': 'default', 'rope_theta': 500.0}}),
}


def modern_dir(tmp_path: pathlib.Path, shape: dict, seed: int = 0, name: str = 'hf') -> pathlib.Path:
  """Returns a directory holding a random ModernBertForMaskedLM, every parameter moved off its init."""
  cfg = transformers.ModernBertConfig(pad_token_id=PAD, cls_token_id=CLS, sep_token_id=SEP,
                                      bos_token_id=CLS, eos_token_id=SEP, **shape)
  torch.manual_seed(seed)
  m = transformers.ModernBertForMaskedLM(cfg)
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.05 * torch.randn_like(p))
  d = tmp_path / name
  m.save_pretrained(d)
  return d


def rows(vocab_size: int, seed: int = 0):
  """Returns (ids, mask), (3, 40): [CLS] random ids [SEP] then [PAD], of LENGTHS tokens."""
  rng = np.random.default_rng(seed)
  ids = np.full((len(LENGTHS), max(LENGTHS)), PAD, np.int64)
  for r, n in enumerate(LENGTHS):
    ids[r, :n] = [CLS, *rng.integers(SEP + 1, vocab_size, n - 2), SEP]
  return ids, (ids != PAD).astype(np.int64)


def merged(enc_cfg, params):
  """Returns a BertForMLM module holding `params` (a pure dict)."""
  graphdef, state = train_state.abstract_model(enc_cfg, 0)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def ours(module, ids, cls_id=CLS, pad_id=PAD):
  """Returns (hidden, logits) of our model on rows laid out by their [CLS] and [PAD] ids."""
  graphdef, state = nnx.split(module)

  def forward(state, x):  # one compile, not one per operation
    m = nnx.merge(graphdef, state)
    hidden = m.encoder(x, cls_id=cls_id, pad_id=pad_id)
    return hidden, m.mlm_head(hidden, m.encoder.token_embed[...])
  return tuple(map(np.asarray, jax.jit(forward)(state, jnp.asarray(ids, jnp.int32))))


def reference(ref, ids, mask):
  """Returns transformers' (last_hidden_state, logits)."""
  with torch.no_grad():
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return ref.model(**kw).last_hidden_state.numpy(), ref(**kw).logits.numpy()


def assert_parity(mask, got, want, what: str) -> tuple[float, float]:
  """Asserts hidden states and logits within TOL at real tokens; returns the two max differences."""
  real = mask.astype(bool)
  diff_h = np.abs(got[0][real] - want[0][real]).max()
  vocab = got[1].shape[-1]  # transformers also scores the padding rows of a padded vocabulary
  diff_l = np.abs(got[1][real] - want[1][real][:, :vocab]).max()
  print(f'{what}: max |hidden - transformers| = {diff_h:.2e}, max |logits - transformers| = '
        f'{diff_l:.2e}')
  assert diff_h <= TOL and diff_l <= TOL
  return diff_h, diff_l


# The second shape (biases, untied) runs in the slow tier: the fast tier keeps one of each check.
@pytest.mark.parametrize('name', [pytest.param(n, marks=[pytest.mark.slow] if i else [])
                                  for i, n in enumerate(SHAPES)])
def test_import_matches_transformers_and_exports_the_same_tensors(tmp_path, name):
  d = modern_dir(tmp_path, SHAPES[name])
  hf_cfg = json.loads((d / 'config.json').read_text())
  enc_cfg = hf_models.encoder_config(hf_cfg)
  every = SHAPES[name]['global_attn_every_n_layers']
  assert (enc_cfg.global_every, enc_cfg.local_window) == (every, SHAPES[name]['local_attention'])
  assert [enc_cfg.is_local(i) for i in range(enc_cfg.num_layers)] == [
      t == 'sliding_attention' for t in hf_cfg['layer_types']]
  original = convert.read_weights(d)
  params = hf_models.params_from_hf(original, enc_cfg, log=lambda s: None)
  ids, mask = rows(enc_cfg.vocab_size)
  ref = transformers.ModernBertForMaskedLM.from_pretrained(d, attn_implementation='eager').eval()
  assert_parity(mask, ours(merged(enc_cfg, params), ids), reference(ref, ids, mask), name)
  # Export gives the original tensors, bit for bit (plus the tied decoder and a zero decoder bias).
  back = hf_models.params_to_hf(params, enc_cfg)
  assert set(back) - set(original) <= {'decoder.weight', 'decoder.bias'}
  for k, v in original.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  jax.tree.map(np.testing.assert_array_equal, hf_models.params_from_hf(back, enc_cfg), params)
  # A ModernBertModel (no head): the same encoder, a fresh head.
  ref.model.save_pretrained(tmp_path / 'base')
  notes, fresh = [], jax.tree.map(np.zeros_like, params['mlm_head'])
  base = hf_models.params_from_hf(convert.read_weights(tmp_path / 'base'), enc_cfg, fresh,
                                  log=notes.append)
  assert any('freshly initialized' in n for n in notes) and base['mlm_head'] is fresh
  jax.tree.map(np.testing.assert_array_equal, base['encoder'], params['encoder'])
  # Our config of it gives transformers the same model.
  again = transformers.ModernBertConfig(**hf_models.hf_config_from(enc_cfg, PAD, cls_id=CLS,
                                                                    sep_id=SEP))
  for key in ('layer_types', 'local_attention', 'rope_parameters', 'norm_eps', 'norm_bias',
              'attention_bias', 'mlp_bias', 'classifier_bias', 'tie_word_embeddings'):
    assert getattr(again, key) == getattr(ref.config, key), key


def random_params(enc_cfg, seed: int = 0) -> dict:
  """Returns BertForMLM params (pure dict) drawn at random: norm scales near 1, the rest near 0."""
  rng = np.random.default_rng(seed)
  shapes = nnx.to_pure_dict(train_state.abstract_model(enc_cfg, seed)[1])
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (path[-1].key == 'scale') + 0.1 * rng.standard_normal(x.shape, np.float32),
      shapes)


@pytest.mark.parametrize('overrides', [
    dict(vocab_multiple=16),  # model.MODERN: no biases, global every 3rd layer, padded rows
    pytest.param(dict(use_bias=True, norm_bias=True, global_every=1, local_window=0,
                      tie_embeddings=False, rope_theta=20_000.0), marks=pytest.mark.slow)],
    ids=['modern', 'biases_global_untied'])
def test_export_of_a_modern_model_loads_in_transformers_and_computes_the_same(tmp_path, overrides):
  enc_cfg = model.EncoderConfig(vocab_size=90, hidden_size=32, num_layers=3, num_heads=2,
                                intermediate_size=48, **{**model.MODERN, 'local_window': 8,
                                                         **overrides})
  params = random_params(enc_cfg)
  out = tmp_path / 'hf'
  out.mkdir()
  hf_cfg = hf_models.hf_config_from(enc_cfg, PAD, cls_id=CLS, sep_id=SEP)
  assert hf_cfg['vocab_size'] == enc_cfg.padded_vocab_size  # 96 rows with vocab_multiple=16
  (out / 'config.json').write_text(json.dumps(hf_cfg))
  (out / 'model.safetensors').write_bytes(convert.safetensors_bytes(
      hf_models.params_to_hf(params, enc_cfg)))
  ref, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert type(ref).__name__ == 'ModernBertForMaskedLM'
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  ids, mask = rows(enc_cfg.vocab_size, seed=1)
  assert_parity(mask, ours(merged(enc_cfg, params), ids), reference(ref.eval(), ids, mask),
                f'fresh export {"-".join(overrides)}')
  # Importing the export gives the same EncoderConfig, up to the padding (import sees rows only).
  back = hf_models.encoder_config(json.loads((out / 'config.json').read_text()))
  rows_only = dict(vocab_size=enc_cfg.padded_vocab_size, vocab_multiple=1)
  assert back == model.EncoderConfig(**{**enc_cfg.__dict__, **rows_only, 'size': ''})


# ---------------------------------------------------------------------------------------------
# BPE tokenizer.json (byte-level, with ModernBERT's special tokens).

TEXTS = ['The capital of France is Paris.', 'def sort(values):\n    return sorted(values)',
         'Return the value of the list, sorted.', 'Paris is a city in France; its capital.',
         'Café naïve ½ 日本 😀 and    four spaces\tand a tab.']
# ModernBERT's added tokens: a padding token, a whitespace run (vocabulary, not special), the
# five specials ([MASK] takes the space before it) and reserved [unusedN] pieces.
SPECIALS = ['[UNK]', '[CLS]', '[SEP]', '[PAD]']


def bpe_tokenizer_json(path: pathlib.Path) -> tokenizers.Tokenizer:
  """Writes a small byte-level BPE tokenizer.json laid out as ModernBERT's; returns it."""
  t = tokenizers.Tokenizer(tokenizers.models.BPE())
  t.normalizer = tokenizers.normalizers.NFC()
  t.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<|padding|>'], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  t.train_from_iterator(TEXTS * 5, trainer)
  t.add_tokens([tokenizers.AddedToken('    ', normalized=True)])
  t.add_special_tokens([tokenizers.AddedToken(p, special=True, normalized=False) for p in SPECIALS])
  t.add_special_tokens([tokenizers.AddedToken('[MASK]', special=True, normalized=False,
                                              lstrip=True)])
  t.add_special_tokens([tokenizers.AddedToken(f'[unused{i}]', special=True, normalized=False)
                        for i in range(3)])
  cls, sep = t.token_to_id('[CLS]'), t.token_to_id('[SEP]')
  t.post_processor = tokenizers.processors.TemplateProcessing(
      single='[CLS]:0 $A:0 [SEP]:0', pair='[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1',
      special_tokens=[('[CLS]', cls), ('[SEP]', sep)])
  t.save(str(path))
  return t


def test_bpe_tokenizer_json_encodes_as_tokenizers_with_its_own_special_ids(tmp_path):
  ref = bpe_tokenizer_json(tmp_path / 'tokenizer.json')
  t = tok.load_any(tmp_path)
  assert isinstance(t, tok.BpeTokenizer) and t.vocab_size == ref.get_vocab_size() == 309
  assert (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id) == tuple(
      ref.token_to_id(p) for p in tok.SPECIAL_PIECES)
  assert t.pad_id != 0  # any id: the tokenizer's own
  assert np.flatnonzero(t.special_mask).tolist() == [0, *range(301, 309)]  # '    ' is text
  for text in TEXTS:  # no special literal: the tokenizer's own ids, whitespace runs included
    assert t.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
  assert t.piece_to_id('    ') in t.encode(TEXTS[1])
  text = 'A literal [MASK], [CLS] and <|padding|> stay text.'
  literal = t.encode(text)
  assert not t.special_mask[literal].any() and t.decode(literal) == text
  # encode_with_specials reads the three as the tokenizer does, other specials as text.
  text = 'A literal [MASK], [CLS] and [SEP] are specials here.'
  assert t.encode_with_specials(text) == ref.encode(text, add_special_tokens=False).ids
  assert not t.special_mask[t.encode_with_specials('x <|padding|> [PAD] y')].any()
  masked = t.encode_with_specials('The capital of France is [MASK].')
  assert masked == ref.encode('The capital of France is [MASK].', add_special_tokens=False).ids
  assert t.id_to_piece(masked[-3]) == 'Ġis' and masked[-2] == t.mask_id  # [MASK] took the space
  assert t.encode_batch(TEXTS) == [t.encode(x) for x in TEXTS]
  pieces = [t.id_to_piece(i) for i in t.encode('Paris is\na city')]
  assert t.word_starts(t.encode('Paris is\na city')).tolist() == [
      p[0] in 'ĠĊ' for p in pieces]
  assert t.decode([t.cls_id, *t.encode('The capital'), t.sep_id, t.pad_id]) == '[CLS]The capital[SEP]'
  # The exported tokenizer files: transformers reads [CLS] text [SEP] with the same ids.
  out = tmp_path / 'export'
  out.mkdir()
  for name, data in convert._tokenizer_files(t, 128, print).items():  # pylint: disable=protected-access
    (out / name).write_bytes(data)
  hf = transformers.AutoTokenizer.from_pretrained(out)
  assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (
      t.pad_id, t.cls_id, t.sep_id, t.mask_id)
  for text in [*TEXTS, 'The capital of France is [MASK].', 'Sort the [MASK] list.']:
    assert hf(text)['input_ids'] == [t.cls_id, *t.encode_with_specials(text), t.sep_id], text
  assert tok.load_any(out / 'tokenizer.json').fingerprint == t.fingerprint


def test_fill_mask_shows_bpe_tokens_as_text(tmp_path):
  bpe_tokenizer_json(tmp_path / 'tokenizer.json')
  t = tok.load_any(tmp_path / 'tokenizer.json')
  ids = t.encode('The capital of France is Paris.')
  assert [t.id_to_piece(i) for i in ids] == ['T', 'he', 'Ġcapital', 'Ġof', 'ĠFrance', 'Ġis', 'Ġ',
                                              'Paris', '.']
  # Decoded, the word-start space dropped; whitespace alone shows as its piece.
  assert [mlm.display_token(t, i) for i in ids] == ['T', 'he', 'capital', 'of', 'France', 'is',
                                                     'Ġ', 'Paris', '.']
  assert mlm.display_token(t, t.piece_to_id('Ċ')) == 'Ċ'
  lead = t.encode('日')[0]  # a piece of part of the character's bytes: the piece, not U+FFFD
  assert mlm.display_token(t, lead) == t.id_to_piece(lead) != '\ufffd'
  # Sentencepiece and WordPiece pieces show as before: the word-start mark dropped, '##' kept.
  for piece in ('\u2581capital', 'capital', '##ing', '\u2581'):
    assert mlm.display_piece(piece) == {'\u2581capital': 'capital',
                                        '\u2581': '\u2581'}.get(piece, piece)


def test_bpe_tokenizer_needs_the_five_specials(tmp_path):
  t = tokenizers.Tokenizer(tokenizers.models.BPE())
  t.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.train_from_iterator(TEXTS, tokenizers.trainers.BpeTrainer(vocab_size=280, show_progress=False))
  t.add_special_tokens(SPECIALS)
  t.save(str(tmp_path / 'tokenizer.json'))
  with pytest.raises(ValueError, match=r'tokenizer\.json: the vocabulary has no \[MASK\] piece'):
    tok.load_any(tmp_path / 'tokenizer.json')


# ---------------------------------------------------------------------------------------------
# What is refused, naming the config.json field or the model key.


def small_modern_config(**fields) -> dict:
  cfg = transformers.ModernBertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                      num_attention_heads=2, intermediate_size=32,
                                      pad_token_id=0).to_dict()
  return {**cfg, **fields}


@pytest.mark.parametrize('fields,message', [
    (dict(hidden_activation='silu'), 'hidden_activation'),
    (dict(classifier_activation='relu'), 'classifier_activation'),
    (dict(attention_bias=True), 'attention_bias=True, mlp_bias=False, classifier_bias=False differ'),
    (dict(layer_types=['full_attention', 'full_attention', 'sliding_attention']), 'layer_types'),
    (dict(layer_types=['sliding_attention'] * 3), 'layer_types'),
    (dict(rope_parameters={'full_attention': {'rope_type': 'linear', 'rope_theta': 1e4,
                                              'factor': 2.0}}), 'rope_type'),
    (dict(local_attention=7), 'local_attention=7'),
    (dict(num_attention_heads=16), 'must be even'),
])
def test_unsupported_modernbert_configs_name_the_field(fields, message):
  hf_models.check_supported(small_modern_config())
  with pytest.raises(ValueError, match=message):
    hf_models.check_supported(small_modern_config(**fields))


def test_older_modernbert_configs_give_the_period_and_rotary_bases():
  cfg = small_modern_config(global_attn_every_n_layers=2, global_rope_theta=1e5,
                            local_rope_theta=1e3, local_attention=64)
  del cfg['layer_types'], cfg['rope_parameters']
  enc = hf_models.encoder_config(cfg)
  assert (enc.global_every, enc.local_window, enc.rope_theta, enc.rope_local_theta) == (
      2, 64, 1e5, 1e3)


@pytest.mark.parametrize('overrides,key', [
    (dict(mlp_type='swiglu'), 'mlp_type'),
    (dict(norm='rmsnorm'), 'norm'),
    (dict(type_vocab_size=2), 'type_vocab_size'),
    (dict(first_attention_norm=True), 'first_attention_norm'),
    (dict(pre_layer_norm=False, first_attention_norm=True), 'pre_layer_norm'),
    (dict(position_embedding='learned'), 'mlp_type'),  # rope off: BERT has no GeGLU
    (dict(position_embedding='learned', mlp_type='gelu'), 'norm_bias'),
    (dict(position_embedding='learned', mlp_type='gelu', norm_bias=True, use_bias=True,
          global_every=1, local_window=0, first_attention_norm=True), 'type_vocab_size'),
])
def test_unexportable_architectures_name_the_model_key(overrides, key):
  enc = model.EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                            intermediate_size=32, **{**model.MODERN, **overrides})
  with pytest.raises(ValueError, match=rf'^model\.{key}='):
    hf_models.hf_config_from(enc)


# ---------------------------------------------------------------------------------------------
# The model card describes the exported class.


@pytest.mark.parametrize('overrides,tag,says', [
    ({}, 'modernbert', [
        '| class | `ModernBertForMaskedLM` |',
        '| layer norm | pre-LN LayerNorm without bias: after the embeddings, before attention '
        '(not in layer 0) and the MLP, plus a final one |',
        '| layers, hidden, heads, MLP | 3, 32, 2, 48 (GeGLU) |',
        '| attention | global in every 3rd layer from layer 0, the others local: a sliding window '
        'of 16 tokens (8 on each side) |',
        '| positions | rotary, base 160,000 in the global layers and 10,000 in the local ones; up '
        'to 8,192 tokens, no token types |',
        '| biases | none in attention, MLP and the head transform (the decoder keeps its bias) |',
        '| vocabulary rows | 128: 90 ids padded to a multiple of 64 (no token is a padding '
        'row) |']),
    (dict(use_bias=True, norm_bias=True, global_every=1, local_window=0, vocab_multiple=1),
     'modernbert', [
        '| layer norm | pre-LN LayerNorm: after the embeddings',
        '| attention | global in every layer |', '| positions | rotary, base 160,000; up to',
        '| biases | in attention, MLP and the head transform |']),
    (dict(position_embedding='learned', mlp_type='gelu', norm_bias=True, use_bias=True,
          global_every=1, local_window=0, first_attention_norm=True, type_vocab_size=2,
          max_position=128), 'roberta-prelayernorm', [
        '| class | `RobertaPreLayerNormForMaskedLM` |',
        '| layer norm | pre-LN: before attention and MLP, plus a final LayerNorm |',
        '| layers, hidden, heads, MLP | 3, 32, 2, 48 |', '| positions, token types | 128, 2 |']),
    (dict(position_embedding='learned', mlp_type='gelu', norm_bias=True, use_bias=True,
          global_every=1, local_window=0, first_attention_norm=True, type_vocab_size=2,
          max_position=128, pre_layer_norm=False), 'bert', [
        '| class | `BertForMaskedLM` |', '| layer norm | post-LN (BERT) |']),
], ids=['modern', 'modern_biases_global', 'pre_ln', 'post_ln'])
def test_model_card_describes_the_exported_architecture(tmp_path, overrides, tag, says):
  import yaml  # pylint: disable=g-import-not-at-top
  enc_cfg = model.EncoderConfig(vocab_size=90, hidden_size=32, num_layers=3, num_heads=2,
                                intermediate_size=48, **{**model.MODERN, 'local_window': 16,
                                                         **overrides})
  arch = hf_models.arch_of(enc_cfg).architecture
  facts = model_card.gather(  # what export_hf gathers, from a workdir that recorded nothing
      tmp_path, {}, step=0, architecture=arch,
      model_shape=convert._model_shape(enc_cfg, random_params(enc_cfg)),  # pylint: disable=protected-access
      tokenizer={'kind': 'BPE', 'vocab_size': 90, 'fingerprint': '0' * 64}, model_sha256='0' * 64)
  card = model_card.render(facts)
  assert yaml.safe_load(card.split('---\n')[1])['tags'] == [
      'mlmjax', 'fill-mask', 'masked-language-modeling', tag, 'jax', 'flax']
  for text in says:
    assert text in card, text
  modern = tag == 'modernbert'
  assert ('pre-LN: before attention' in card) is (tag == 'roberta-prelayernorm')
  assert ('| positions, token types |' in card) is not modern
  assert ('| attention |' in card) is modern


# ---------------------------------------------------------------------------------------------
# Workdirs: an imported ModernBERT predicts, fine-tunes and exports; a rotary run exports.


@pytest.mark.slow
def test_imported_modernbert_predicts_fine_tunes_and_exports_its_tensors(tmp_path,
                                                                         make_tiny_config):
  bpe_tokenizer_json(tmp_path / 'tokenizer.json')
  t = tok.load_any(tmp_path / 'tokenizer.json')
  shape = dict(SHAPES['every3_w16'], vocab_size=320)  # 309 tokenizer ids, padded rows
  cfg = transformers.ModernBertConfig(pad_token_id=t.pad_id, cls_token_id=t.cls_id,
                                      sep_token_id=t.sep_id, bos_token_id=t.cls_id,
                                      eos_token_id=t.sep_id, **shape)
  torch.manual_seed(0)
  m = transformers.ModernBertForMaskedLM(cfg)
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.05 * torch.randn_like(p))
  src = tmp_path / 'hf'
  m.save_pretrained(src)
  for name, data in convert._tokenizer_files(t, 128, print).items():  # pylint: disable=protected-access
    (src / name).write_bytes(data)

  work = tmp_path / 'imported'
  written = convert.import_hf(src, work, log=lambda s: None)
  mc = written['model']
  assert (mc['position_embedding'], mc['mlp_type'], mc['global_every'], mc['local_window']) == (
      'rope', 'geglu', 3, 16)
  assert (mc['vocab_multiple'], written['tokenizer']['vocab_size']) == (16, 309)  # 309 -> 320 rows
  assert (work / 'tokenizer.json').is_file() and not (work / 'tokenizer.model').exists()
  run = predict.load_run(work)
  assert isinstance(run.tokenizer, tok.BpeTokenizer) and run.tokenizer.mask_id == t.mask_id
  # The workdir computes what transformers does, on rows laid out by the tokenizer's own ids.
  hf_tok = transformers.AutoTokenizer.from_pretrained(src)
  enc = hf_tok(TEXTS, padding=True, return_tensors='np')
  ids, mask = enc['input_ids'], enc['attention_mask']
  assert ids.shape[1] > 16  # longer than the window
  ref = transformers.ModernBertForMaskedLM.from_pretrained(src).eval()
  assert_parity(mask, ours(nnx.merge(run.graphdef, run.params), ids, t.cls_id, t.pad_id),
                reference(ref, ids, mask), 'imported workdir')
  assert_same_fill_mask(run, ref, hf_tok, ['The capital of France is [MASK].',
                                           'def [MASK](values): return [MASK](values)'])

  # Export: transformers loads it with nothing missing or unexpected, the original tensors.
  out = convert.export_hf(work, tmp_path / 'exported', log=lambda s: None)
  assert sorted(p.name for p in out.iterdir()) == [
      'README.md', 'config.json', 'mlmjax.json', 'model.safetensors', 'special_tokens_map.json',
      'tokenizer.json', 'tokenizer_config.json']
  loaded, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  original, exported = convert.read_weights(src), convert.read_weights(out)
  assert set(exported) - set(original) <= {'decoder.weight'}
  for k, v in original.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  assert transformers.AutoTokenizer.from_pretrained(out)(TEXTS)['input_ids'] == hf_tok(TEXTS)['input_ids']
  assert_round_trip(out, tmp_path)

  # Fine-tuning from it: rows are [CLS] ... [SEP] [PAD]... in the tokenizer's ids ([PAD] != 0).
  c = shrunk_classify_config(make_tiny_config().data.cache_dir)
  c.optim.learning_rate = 1e-9  # after two steps the encoder is still the imported one
  c.model.update({k: mc[k] for k in (*train_state.ARCHITECTURE_KEYS, 'dropout_rate',
                                     'attention_dropout_rate')})
  c.init_from = str(work)
  summary = train.run(c, tmp_path / 'cls')
  assert summary['finished'] and summary['task'] == 'classify'
  tuned = predict.load_run(tmp_path / 'cls', 'latest')
  text = 'Return the value of the list, sorted.'
  ids = hf_tok(text, return_tensors='pt')
  with torch.no_grad():
    want = ref.model(**ids).last_hidden_state[0, 0].numpy()
  for r in (run, tuned):
    diff = np.abs(predict.embed(r, text, pooling='cls') - want).max()
    print(f'{r.workdir}: max |[CLS] vector - transformers| = {diff:.2e}')
    assert diff <= TOL

  # Continued MLM from it: rows packed and padded in the tokenizer's ids, padding not counted.
  c = make_tiny_config()
  c.train.num_steps, c.train.seq_len, c.eval.every_steps, c.ckpt.every_steps = 2, 32, 2, 2
  c.data.max_documents = 200  # a small cache: the padding is what is checked
  c.model.update({k: mc[k] for k in (*train_state.ARCHITECTURE_KEYS, 'dropout_rate',
                                     'attention_dropout_rate')})
  c.init_from = str(work)
  summary = train.run(c, tmp_path / 'mlm')
  assert summary['finished'] and np.isfinite(summary['eval/loss'])
  cache = input_pipeline.prepare_data(c, tmp_path / 'mlm', log=lambda s: None).cache
  for split in (cache.train_rows, cache.val_rows):
    split = np.asarray(split)
    after_sep = np.cumsum((split == t.sep_id)[:, ::-1], axis=1)[:, ::-1] == 0
    assert after_sep.any() and (split[after_sep] == t.pad_id).all()  # the row ends: padding
    assert not (split == 0).any()  # id 0 ('<|padding|>' here) is text, never in pydocs rows
  seen = sum(int((input_pipeline.global_batch_rows(cache.train_rows, s, global_batch=8,
                                                   seed=c.seed) != t.pad_id).sum())
             for s in range(2))
  assert summary['tokens_seen'] == seen


@pytest.mark.slow
def test_modern_run_exports_as_modernbert_with_the_same_fill_mask(tmp_path, make_tiny_config):
  c = make_tiny_config()
  for key, value in {**model.MODERN, 'local_window': 16}.items():  # rows of 64 tokens
    c.model[key] = value
  c.model.dropout_rate = c.model.attention_dropout_rate = 0.0
  c.train.num_steps = 10
  work = tmp_path / 'modern'
  assert train.run(c, work)['finished']
  run = predict.load_run(work)
  assert run.tokenizer.vocab_size == 1000  # 1,024 rows with vocab_multiple 64
  out = convert.export_hf(work, tmp_path / 'hf', log=lambda s: None)
  hf_cfg = json.loads((out / 'config.json').read_text())
  assert hf_cfg['architectures'] == ['ModernBertForMaskedLM'] and hf_cfg['vocab_size'] == 1024
  ref, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  texts = ['The import statement binds a name in the local namespace.',
           'A class definition defines a class object; its suite is executed in a new frame.']
  enc = hf_tok(texts, padding=True, return_tensors='np')
  ids, mask = enc['input_ids'], enc['attention_mask']
  assert ids.shape[1] > 16
  t = run.tokenizer
  assert_parity(mask, ours(nnx.merge(run.graphdef, run.params), ids, t.cls_id, t.pad_id),
                reference(ref.eval(), ids, mask), 'modern tiny run')
  assert_same_fill_mask(run, ref, hf_tok, ['Return the [MASK] of the list.',
                                           'The [MASK] statement [MASK] a function.',
                                           'A class [MASK] defines a class object.'])
  card = (out / 'README.md').read_text()
  assert '- modernbert\n' in card and 'sliding window of 16 tokens' in card
  assert 'roberta-prelayernorm' not in card and 'ModernBertForMaskedLM' in card
  assert_round_trip(out, tmp_path)
