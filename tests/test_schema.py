"""Tests of mlmjax/schema.py: the defaults every config has, and upgrade() of old config.json files."""

import dataclasses
import json

import ml_collections
import pytest

from configs import finetune, pretrain
from mlmjax import model, schema


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return out


def test_defaults_are_unlocked_and_the_model_section_is_the_encoders_fields():
  c = schema.defaults()
  assert not c.is_locked
  fields = [f.name for f in dataclasses.fields(model.EncoderConfig)]
  assert fields[0] == 'vocab_size' and set(c.model.keys()) == set(fields[1:])
  assert {'task_data', 'classify', 'retrieve', 'early_stop', 'distributed'} <= set(c.keys())


def test_attention_dropout_follows_dropout_unless_set_and_dumps_a_number():
  # The pretraining configs pin it to 0 (fused attention); the schema's default follows dropout.
  assert {pretrain.get_config(v).model.attention_dropout_rate for v in pretrain._SIZES} == {0.0}
  c = schema.defaults()
  c.model.dropout_rate = 0.0
  assert c.model.attention_dropout_rate == 0.0
  c.model.dropout_rate = 0.2
  assert c.model.attention_dropout_rate == 0.2
  dumped = json.loads(c.to_json_best_effort())['model']
  assert dumped['attention_dropout_rate'] == 0.2 and isinstance(dumped['attention_dropout_rate'], float)
  assert finetune.get_config('bbc').model.attention_dropout_rate == 0.1  # finetune sets dropout 0.1
  c.model.attention_dropout_rate = 0.05  # set on its own: one-way, dropout_rate stays
  assert (c.model.dropout_rate, c.model.attention_dropout_rate) == (0.2, 0.05)
  c.model.dropout_rate = 0.3
  assert c.model.attention_dropout_rate == 0.05


def test_encoder_config_from_the_model_section_of_every_variant():
  for variant in pretrain._SIZES:
    c = pretrain.get_config(variant)
    enc = model.EncoderConfig(vocab_size=c.tokenizer.vocab_size, **c.model)
    assert {k: getattr(enc, k) for k in model.SIZES[c.model.size]} == model.SIZES[c.model.size]
    assert (enc.attention_dropout_rate, enc.dropout_rate) == (0.0, c.model.dropout_rate)
    arch = {k: c.model[k] for k in model.MODERN} if c.model.size.startswith('modern') else {}
    assert enc == model.encoder_config(c.model.size, vocab_size=c.tokenizer.vocab_size,
                                       dropout_rate=c.model.dropout_rate,
                                       attention_dropout_rate=0.0,
                                       tie_embeddings=c.model.tie_embeddings, attention_impl=None,
                                       **arch)


# A tiny run's config.json as written before the masking sections, attention_dropout_rate,
# initializer_range, tie_embeddings, type_vocab_size, remat, grad_accum_steps, distributed,
# early_stop, task and the fine-tuning sections existed.
OLD = {
    'variant': 'tiny', 'seed': 3,
    'masking': {'rate': 0.3, 'split': [0.8, 0.1, 0.1], 'selection': 'exact', 'max_predictions': 0,
                'strategy': 'span', 'span_p': 0.25, 'span_max': 8, 'span_words': False,
                'pmi_vocab_size': 500, 'pmi_min_count': 3, 'rate_schedule': 'step',
                'rate_boundaries': [100, 200], 'rate_values': [0.4, 0.3, 0.15]},
    'model': {'size': 'mini', 'hidden_size': 0, 'num_layers': 0, 'num_heads': 0,
              'intermediate_size': 0, 'layer_norm_eps': 1e-12, 'pre_layer_norm': False,
              'dropout_rate': 0.1, 'dtype': 'float32', 'max_position': 512,
              'attention_impl': None},
    'train': {'num_steps': 100, 'batch_size': 8, 'seq_len': 64, 'log_every_steps': 10},
    'mesh': {'shape': [['data', -1], ['fsdp', 1], ['tensor', 1]]},
    'old_section': {'gone': 1}, 'optim': {'learning_rate': 1, 'no_longer_read': True},
}


def test_an_old_config_json_upgrades_to_what_its_missing_keys_meant():
  c = schema.upgrade(OLD)
  assert c.is_locked
  d = schema.defaults()
  assert (c.masking.span.p, c.masking.span.max, c.masking.span.words) == (0.25, 8, False)
  assert (c.masking.pmi.vocab_size, c.masking.pmi.min_count) == (500, 3)
  s = c.masking.schedule
  assert (s.kind, s.boundaries, s.rates, s.end) == ('step', (100, 200), (0.4, 0.3, 0.15), 0.3)
  assert c.masking.split == (0.8, 0.1, 0.1) and c.mesh.shape == d.mesh.shape  # lists -> tuples
  m = c.model
  assert (m.tie_embeddings, m.type_vocab_size, m.remat, m.attention_impl) == (True, 2, '', '')
  assert (m.attention_dropout_rate, m.initializer_range, m.pre_layer_norm) == (0.1, 0.02, False)
  assert c.train.grad_accum_steps == 1 and c.train.num_steps == 100
  assert c.task == 'mlm' and c.seed == 3
  assert c.optim.learning_rate == 1.0 and isinstance(c.optim.learning_rate, float)
  for section in ('distributed', 'early_stop', 'task_data', 'classify', 'retrieve', 'eval', 'data'):
    assert c[section].to_dict() == d[section].to_dict(), section
  enc = model.EncoderConfig(vocab_size=100, **c.model)
  assert (enc.hidden_size, enc.num_layers, enc.attention_dropout_rate) == (256, 4, 0.1)
  # Keys the schema does not know stay (a task from outside mlmjax keeps its own section).
  assert schema.unknown_keys(OLD) == ['old_section.gone', 'optim.no_longer_read']
  assert c.old_section.gone == OLD['old_section']['gone']


def test_old_unset_values_and_a_missing_schedule_end():
  raw = {'task': None, 'masking': {'rate': 0.25, 'rate_schedule': 'linear'},
         'model': {'dropout_rate': 0.2, 'attention_impl': None}, 'distributed': {}}
  c = schema.upgrade(raw)
  assert (c.task, c.model.attention_impl) == ('mlm', '')
  assert c.masking.schedule.end == 0.25  # linear without an end stayed at masking.rate
  assert c.model.attention_dropout_rate == 0.2
  assert schema.unknown_keys(raw) == []


@pytest.mark.parametrize('make', [lambda: pretrain.get_config('base'),
                                  lambda: finetune.get_config('brown_pos')])
def test_a_current_config_round_trips_through_json_and_upgrade(make):
  config = make()
  config.unlock()
  config.model.attention_dropout_rate = 0.05  # set apart from dropout_rate: kept apart
  config.lock()
  raw = json.loads(config.to_json_best_effort())
  back = schema.upgrade(raw)
  assert back.to_dict() == config.to_dict()
  assert json.loads(back.to_json_best_effort()) == raw
  assert schema.unknown_keys(raw) == []
  assert _flat(back.to_dict()).keys() == _flat(schema.defaults().to_dict()).keys()


def test_upgrade_keeps_a_wrong_type_for_config_check_to_name():
  c = schema.upgrade({'train': {'num_steps': 'many'}})
  assert c.train.num_steps == 'many'
  from mlmjax import config_check
  with pytest.raises(ValueError, match="^train.num_steps='many': expected int"):
    config_check.check_config(c)
  assert isinstance(schema.upgrade(ml_collections.ConfigDict(OLD)), ml_collections.ConfigDict)
