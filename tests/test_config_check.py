"""Tests of mlmjax.config_check: types against the defaults, allowed values, ranges, combinations."""

import json

import ml_collections
import pytest

from configs import dapt, finetune, pretrain
from mlmjax import config_check, experiment, schema

FAMILIES = {'pretrain': (pretrain, pretrain._SIZES), 'finetune': (finetune, finetune._PRESETS),
            'dapt': (dapt, dapt._SIZES)}


def _set(config, key: str, value):
  *sections, field = key.split('.')
  node = config
  for section in sections:
    node = node[section]
  node[field] = value  # ConfigDict itself lets these through
  return config


@pytest.mark.parametrize('key,value,expected', [
    ('train.num_steps', True, 'train.num_steps=True: expected int'),  # bool is not an int
    ('data.dedup', None, 'data.dedup=None: expected bool'),
    ('optim.learning_rate', None, 'optim.learning_rate=None: expected float'),
    ('masking.split', (0.8, 0.1, '0.1'), "masking.split=(0.8, 0.1, '0.1'): expected tuple of float"),
    ('mesh.shape', (('data', 'all'),), "mesh.shape=(('data', 'all'),): expected tuple of (str, int)"),
    ('mesh.shape', (('data', -1, 2),), "mesh.shape=(('data', -1, 2),): expected tuple of (str, int)"),
    ('masking.schedule.rates', (0.3, None), 'masking.schedule.rates=(0.3, None): expected tuple of float'),
])
def test_wrong_types_name_key_value_and_expected_type(key, value, expected):
  config = _set(pretrain.get_config('tiny_classic'), key, value)
  with pytest.raises(ValueError) as e:
    config_check.check_config(config)
  assert str(e.value).startswith(expected)


def test_ints_pass_for_floats_and_lists_for_tuples():
  config = pretrain.get_config('base')
  config.optim.learning_rate = 1  # ConfigDict keeps the int's value; float() reads it later
  config.masking.split = [0.8, 0.1, 0.1]
  config.mesh.shape = [['data', 2], ['fsdp', -1]]  # any number of axes, each (name, size)
  config_check.check_config(config)


def test_a_dict_built_config_is_checked_against_its_variant_and_lists_the_choices():
  # Built without ConfigDict's type safety (e.g. from JSON or a plain dict): the reference catches these.
  config = ml_collections.ConfigDict(pretrain.get_config('mini').to_dict(), type_safe=False)
  config.masking.selection = 3
  with pytest.raises(ValueError) as e:
    config_check.check_config(config)
  assert str(e.value) == "masking.selection=3: expected str; one of ('exact', 'bernoulli')"
  config.masking.selection = 'exact'
  config.train.seq_len = 128.0
  with pytest.raises(ValueError, match=r'^train.seq_len=128.0: expected int$'):
    config_check.check_config(config)


def test_every_family_is_typed_against_the_schema_fine_tuning_keys_included():
  # A pretraining config holds the fine-tuning sections too (schema.defaults()), typed the same.
  config = ml_collections.ConfigDict(pretrain.get_config('tiny_classic').to_dict(), type_safe=False)
  config.task_data.val_fraction = '0.2'
  with pytest.raises(ValueError, match=r"^task_data.val_fraction='0.2': expected float$"):
    config_check.check_config(config)
  config = ml_collections.ConfigDict(finetune.get_config('bbc').to_dict(), type_safe=False)
  config.classify.pooling = 1
  with pytest.raises(ValueError) as e:
    config_check.check_config(config)
  assert str(e.value) == "classify.pooling=1: expected str; one of ('cls', 'mean')"


def test_missing_keys_are_named_and_unknown_keys_pass_untyped():
  raw = pretrain.get_config('tiny_classic').to_dict()
  del raw['masking']['span']
  with pytest.raises(ValueError, match=r'^masking.span.max: missing from the config \(3 key'):
    config_check.check_config(ml_collections.ConfigDict(raw))
  config = ml_collections.ConfigDict(pretrain.get_config('tiny_classic').to_dict())
  config.my_task = ml_collections.ConfigDict({'weight': 'high'})  # a custom task's own section
  config.task = 'my_package.my_task:MyTask'
  config_check.check_config(config)
  config.task = 'no_such_task'
  with pytest.raises(ValueError, match=r"^task='no_such_task': choose one of \('mlm', "):
    config_check.check_config(config)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_every_variant_of_every_family_passes(family):
  module, variants = FAMILIES[family]
  for variant in variants:
    config = module.get_config(variant)
    config_check.check_config(config)
    config_check.check_config(schema.upgrade(json.loads(config.to_json())))  # as read back


@pytest.mark.parametrize('key,value,expected', [
    ('optim.decay', 'step', "optim.decay='step': choose one of ('linear', 'cosine', '1-sqrt', 'constant')"),
    ('data.bad_input', 'ignore', "data.bad_input='ignore': choose one of ('skip', 'error')"),
    ('model.size', 'huge', "model.size='huge': choose one of ('tiny', 'mini', 'small', 'base', "
                           "'large', 'modern_tiny', 'modern_base', 'modern_large', 'custom') "
                           "('custom' takes"),
    ('data.val_fraction', 1.0, 'data.val_fraction=1.0 must be in [0, 1)'),
    ('optim.b2', 1.0, 'optim.b2=1.0 must be in [0, 1)'),
    ('optim.eps', 0.0, 'optim.eps=0.0 must be in (0, inf)'),
    ('ckpt.max_to_keep', 0, 'ckpt.max_to_keep=0 must be in [1, inf)'),
    ('train.max_skipped_batches', -1, 'train.max_skipped_batches=-1 must be in [0, inf)'),
    ('optim.warmup_steps', 3201, 'optim.warmup_steps=3201 exceeds train.num_steps=3200'),
    ('eval.split', (0.5, 0.5, 0.5), 'eval.split=(0.5, 0.5, 0.5) must be three fractions'),
    ('train.seq_len', 1024, 'train.seq_len=1024 exceeds model.max_position=512'),
    ('train.grad_accum_steps', 0, 'train.grad_accum_steps=0 must be in [1, inf)'),
    ('train.grad_accum_steps', 3, 'train.batch_size=16 must be divisible by train.grad_accum_steps=3'),
    ('model.remat', 'some', "model.remat='some': choose one of ('', 'full', 'dots', 'dots_no_batch')"),
    ('masking.schedule.kind', 'exp', "masking.schedule.kind='exp': choose one of ('constant', "),
    ('masking.span.p', 0.0, 'masking.span.p=0.0 must be in (0, 1]'),
    ('model.attention_dropout_rate', 1.0, 'model.attention_dropout_rate=1.0 must be in [0, 1)'),
    ('task_data.test_fraction', 0.95, 'task_data.val_fraction=0.1 + task_data.test_fraction=0.95'),
])
def test_values_and_combinations_name_the_key(key, value, expected):
  config = _set(pretrain.get_config('tiny_classic'), key, value)
  with pytest.raises(ValueError) as e:
    config_check.check_config(config)
  assert str(e.value).startswith(expected)
  assert len(str(e.value).splitlines()) == 1


def test_edges_that_are_allowed():
  config = pretrain.get_config('tiny_classic')
  config.optim.warmup_steps = config.train.num_steps  # the peak is reached at the last step
  config.eval.every_steps = config.ckpt.every_steps = 10 * config.train.num_steps  # end only
  config.data.val_fraction = 0.0
  config.train.max_skipped_batches = 5
  config.train.grad_accum_steps = config.train.batch_size  # one row per microbatch
  config.model.remat = 'dots_no_batch'
  config_check.check_config(config)


def test_every_variant_passes_and_train_validates_model_shape_up_front():
  for variant in ('tiny', 'mini', 'small', 'base', 'large'):
    experiment.validate_config(pretrain.get_config(variant))
  config = pretrain.get_config('tiny_classic')
  config.model.num_heads = 3  # 128 is not divisible by 3: caught before any data is read
  with pytest.raises(ValueError, match='num_heads 3'):
    experiment.validate_config(config)
