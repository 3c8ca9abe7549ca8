"""Tests for mlmjax/train_state.py: the model shape from config.model, where init_from points."""

import json

import pytest

from configs import pretrain
from mlmjax import experiment, model, train_state


def test_encoder_config_takes_the_named_size_then_the_non_zero_shape_keys():
  c = pretrain.get_config('tiny')
  enc = experiment.encoder_config(c, 1234)
  assert enc.vocab_size == 1234 and enc.hidden_size == model.SIZES['tiny']['hidden_size']
  c.model.num_layers = 5
  enc = experiment.encoder_config(c, 1234)
  assert enc.num_layers == 5 and enc.hidden_size == model.SIZES['tiny']['hidden_size']
  c.model.size = 'custom'
  with pytest.raises(ValueError, match=r"model.hidden_size must be set \(> 0\) when model.size='custom'"):
    experiment.encoder_config(c, 1234)


@pytest.fixture
def run_dir(tmp_path):
  """Returns a workdir as mlmjax.train leaves it, with two kept steps and a best/ step."""
  d = tmp_path / 'pre'
  for sub in ('checkpoints/100', 'checkpoints/200', 'best/150'):
    (d / sub).mkdir(parents=True)
  (d / 'config.json').write_text(json.dumps({'seed': 0, 'task': 'mlm'}))
  (d / 'tokenizer.model').write_bytes(b'not read here')
  return d


@pytest.mark.parametrize('where, ckpt, step', [('', 'checkpoints', None),
                                               ('checkpoints', 'checkpoints', None),
                                               ('best', 'best', None),
                                               ('checkpoints/100', 'checkpoints', 100),
                                               ('best/150', 'best', 150)])
def test_init_source_resolves_a_workdir_its_checkpoint_dirs_and_a_step(run_dir, where, ckpt, step):
  src = train_state.init_source(str(run_dir / where) if where else str(run_dir))
  assert (src.workdir, src.ckpt_dir, src.step) == (run_dir, run_dir / ckpt, step)
  assert src.tokenizer_path == run_dir / 'tokenizer.model' and src.config.task == 'mlm'


def test_init_source_errors_name_the_path_and_what_is_missing(run_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"init_from='.*nowhere': no such workdir"):
    train_state.init_source(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='no config.json in it or above it'):
    train_state.init_source(str(tmp_path / 'empty'))
  (run_dir / 'tokenizer.model').unlink()
  with pytest.raises(FileNotFoundError, match='holds no tokenizer'):
    train_state.init_source(str(run_dir))
