"""Tests of mlmjax.config_check: types against the defaults, allowed values, ranges, combinations."""

import ml_collections
import pytest

from configs import pretrain
from mlmjax import config_check, train


def _set(config, key: str, value):
  section, field = key.split('.')
  getattr(config, section)[field] = value  # ConfigDict itself lets these through
  return config


@pytest.mark.parametrize('key,value,expected', [
    ('train.num_steps', True, 'train.num_steps=True: expected int'),  # bool is not an int
    ('data.dedup', None, 'data.dedup=None: expected bool'),
    ('optim.learning_rate', None, 'optim.learning_rate=None: expected float'),
    ('masking.split', (0.8, 0.1, '0.1'), "masking.split=(0.8, 0.1, '0.1'): expected tuple of float"),
    ('mesh.shape', (('data', 'all'),), "mesh.shape=(('data', 'all'),): expected tuple of (str, int)"),
    ('mesh.shape', (('data', -1, 2),), "mesh.shape=(('data', -1, 2),): expected tuple of (str, int)"),
])
def test_wrong_types_name_key_value_and_expected_type(key, value, expected):
  config = _set(pretrain.get_config('tiny'), key, value)
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


def test_reference_is_the_variant_of_the_named_file_and_extra_keys_pass(tmp_path):
  family = tmp_path / 'dapt.py'
  family.write_text(
      'import ml_collections\n'
      'import importlib.util\n'
      f'spec = importlib.util.spec_from_file_location("p", {str(config_check.PRETRAIN_CONFIG)!r})\n'
      'pretrain = importlib.util.module_from_spec(spec); spec.loader.exec_module(pretrain)\n'
      'def get_config(arg="tiny"):\n'
      '  c = pretrain.get_config(arg)\n'
      '  c.unlock()\n'
      '  c.dapt = ml_collections.ConfigDict({"domain_weight": 0.5})\n'
      '  return c.lock()\n')
  config = config_check.load_config(f'{family}:mini')
  assert config_check.reference_config(config, str(family)).model.size == 'mini'
  config.dapt.domain_weight = 2  # an int for a float: fine
  config_check.check_config(config, config_file=str(family))
  config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  config.dapt.domain_weight = 'high'
  with pytest.raises(ValueError, match="dapt.domain_weight='high': expected float"):
    config_check.check_config(config, config_file=str(family))
  config_check.check_config(config)  # against configs/pretrain.py, dapt.* is unknown: not typed
  config.variant = 'no-such-variant'  # falls back to get_config()
  assert config_check.reference_config(config, str(family)).variant == 'tiny'
  assert config_check.reference_config(config, str(tmp_path / 'missing.py')) is None


@pytest.mark.parametrize('key,value,expected', [
    ('optim.decay', 'step', "optim.decay='step': choose one of ('linear', 'cosine', 'constant')"),
    ('data.bad_input', 'ignore', "data.bad_input='ignore': choose one of ('skip', 'error')"),
    ('model.size', 'huge', "model.size='huge': choose one of ('tiny', 'mini', 'small', 'base', "
                           "'large', 'custom') ('custom' takes"),
    ('data.val_fraction', 1.0, 'data.val_fraction=1.0 must be in [0, 1)'),
    ('optim.b2', 1.0, 'optim.b2=1.0 must be in [0, 1)'),
    ('optim.eps', 0.0, 'optim.eps=0.0 must be in (0, inf)'),
    ('ckpt.max_to_keep', 0, 'ckpt.max_to_keep=0 must be in [1, inf)'),
    ('train.max_skipped_batches', -1, 'train.max_skipped_batches=-1 must be in [0, inf)'),
    ('optim.warmup_steps', 5001, 'optim.warmup_steps=5001 exceeds train.num_steps=5000'),
    ('eval.split', (0.5, 0.5, 0.5), 'eval.split=(0.5, 0.5, 0.5) must be three fractions'),
    ('train.seq_len', 1024, 'train.seq_len=1024 exceeds model.max_position=512'),
    ('train.grad_accum_steps', 0, 'train.grad_accum_steps=0 must be in [1, inf)'),
    ('train.grad_accum_steps', 3, 'train.batch_size=16 must be divisible by train.grad_accum_steps=3'),
    ('model.remat', 'some', "model.remat='some': choose one of ('', 'full', 'dots', 'dots_no_batch')"),
])
def test_values_and_combinations_name_the_key(key, value, expected):
  config = _set(pretrain.get_config('tiny'), key, value)
  with pytest.raises(ValueError) as e:
    config_check.check_config(config)
  assert str(e.value).startswith(expected)
  assert len(str(e.value).splitlines()) == 1


def test_edges_that_are_allowed():
  config = pretrain.get_config('tiny')
  config.optim.warmup_steps = config.train.num_steps  # the peak is reached at the last step
  config.eval.every_steps = config.ckpt.every_steps = 10 * config.train.num_steps  # end only
  config.data.val_fraction = 0.0
  config.train.max_skipped_batches = 5
  config.train.grad_accum_steps = config.train.batch_size  # one row per microbatch
  config.model.remat = 'dots_no_batch'
  config_check.check_config(config)


def test_every_variant_passes_and_train_validates_model_shape_up_front():
  for variant in ('tiny', 'mini', 'small', 'base', 'large'):
    train.validate_config(pretrain.get_config(variant))
  config = pretrain.get_config('tiny')
  config.model.num_heads = 3  # 128 is not divisible by 3: caught before any data is read
  with pytest.raises(ValueError, match='num_heads 3'):
    train.validate_config(config)
