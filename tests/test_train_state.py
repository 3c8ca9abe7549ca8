"""Tests for mlmjax/train_state.py: the model shape from config.model, where init_from points."""

import json

import pytest

from configs import pretrain
from mlmjax import experiment, model, train_state


def test_encoder_config_takes_the_named_size_then_the_non_zero_shape_keys():
  c = pretrain.get_config('tiny_classic')
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


@pytest.mark.slow
def test_context_extension_continues_a_rotary_run_at_a_longer_length_and_larger_base(
    tiny_config, tmp_path):
  from mlmjax import predict, train  # pylint: disable=g-import-not-at-top
  short = tiny_config
  for key, value in {**model.MODERN, 'local_window': 16, 'vocab_multiple': 8}.items():
    short.model[key] = value
  short.model.size = 'modern_tiny'
  short.train.num_steps = 4
  train.run(short, tmp_path / 'short')
  long = pretrain.get_config('tiny_classic')
  long.data.corpus, long.data.cache_dir = short.data.corpus, short.data.cache_dir
  long.init_from = str(tmp_path / 'short')
  long.train.seq_len, long.train.batch_size, long.train.num_steps = 256, 4, 1
  long.eval.batch_size, long.eval.num_batches, long.eval.every_steps = 4, 1, 1
  long.optim.learning_rate, long.optim.warmup_steps = 1e-12, 0  # the step leaves the weights
  long.model.rope_theta = 640_000.0
  train.run(long, tmp_path / 'long',
            explicit=('model.rope_theta', 'train.seq_len', 'init_from'))
  saved = json.loads((tmp_path / 'long' / 'config.json').read_text())['model']
  # The architecture comes from the short run, the larger base from this config.
  assert saved['position_embedding'] == 'rope' and saved['rope_theta'] == 640_000.0
  assert saved['local_window'] == 16 and saved['size'] == 'modern_tiny'
  before = predict.load_run(tmp_path / 'short', 'latest').params['encoder']['token_embed']
  after = predict.load_run(tmp_path / 'long', 'latest').params['encoder']['token_embed']
  assert abs(before - after).max() < 1e-6
  records = [json.loads(line) for line in (tmp_path / 'long' / 'metrics.jsonl').open()]
  assert any(k.endswith('loss_by_position/128-256') for r in records for k in r), records[-1]
