"""Tests for mlmjax/average.py: choosing steps, the mean, and an averaged workdir that predicts."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mlmjax import average, predict, train


def test_choose_steps_names_what_is_missing():
  assert average.choose_steps([2, 4, 6, 8], last=2) == [6, 8]
  assert average.choose_steps([8, 2, 6, 4], steps=[6, 2, 6]) == [2, 6]
  with pytest.raises(ValueError, match=r'step\(s\) 5 \(steps there: 2, 4\)'):
    average.choose_steps([2, 4], steps=[4, 5])
  with pytest.raises(ValueError, match='--last 3: the run has 2 checkpoint'):
    average.choose_steps([2, 4], last=3)
  with pytest.raises(ValueError, match='give --last K'):
    average.choose_steps([2, 4])


def test_mean_params_equals_numpy():
  rng = np.random.default_rng(0)
  trees = [{'a': rng.normal(size=(3, 4)).astype(np.float32),
            'b': {'c': rng.normal(size=(5,)).astype(np.float32)}} for _ in range(3)]
  mean = average.mean_params(trees)
  np.testing.assert_allclose(mean['a'], np.mean([t['a'] for t in trees], axis=0), rtol=1e-6)
  np.testing.assert_allclose(mean['b']['c'], np.mean([t['b']['c'] for t in trees], axis=0),
                             rtol=1e-6)
  assert mean['a'].dtype == np.float32


@pytest.mark.slow
def test_averaged_workdir_holds_the_mean_and_predicts(tiny_config, tmp_path):
  c = tiny_config
  c.ckpt.every_steps, c.ckpt.max_to_keep, c.ckpt.keep_every = 2, 1, 2  # steps 0, 2, 4, 6, 8
  c.eval.every_steps = 100
  train.run(c, tmp_path / 'run')
  record = average.average(tmp_path / 'run', tmp_path / 'avg', last=3, log=lambda s: None)
  assert record['steps'] == [4, 6, 8]
  restore = ocp.StandardCheckpointer().restore
  sources = [restore(tmp_path / 'run' / 'checkpoints' / str(s) / 'params') for s in (4, 6, 8)]
  averaged = restore(tmp_path / 'avg' / 'checkpoints' / '8' / 'params')
  flat = [jax.tree.leaves(t) for t in sources]
  for i, leaf in enumerate(jax.tree.leaves(averaged)):
    expected = np.mean([np.asarray(f[i], np.float64) for f in flat], axis=0)
    np.testing.assert_allclose(np.asarray(leaf), expected, rtol=1e-6, atol=1e-7)
  assert json.loads((tmp_path / 'avg' / 'averaged.json').read_text())['steps'] == [4, 6, 8]
  run = predict.load_run(tmp_path / 'avg')
  assert run.step == 8 and predict.fill_mask(run, ['The [MASK] is here.'], top_k=3)[0][0]
  # The averaged workdir continues as the run would: finished, so it only evaluates the mean.
  evaluated = train.run(c, tmp_path / 'avg')
  assert evaluated['step'] == 8 and evaluated['finished'] and 'eval/loss' in evaluated
  with pytest.raises(FileExistsError, match='is not empty'):
    average.average(tmp_path / 'run', tmp_path / 'avg', last=2, log=lambda s: None)
