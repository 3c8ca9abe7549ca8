"""Decay branches: which steps may branch, and a branch's first step is the source's."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mlmjax import branch, optim, schema


def _wsd(num_steps=100, warmup=10, decay_steps=20, decay='linear'):
  c = schema.defaults()
  c.train.num_steps = num_steps
  c.optim.warmup_steps, c.optim.decay_steps, c.optim.decay = warmup, decay_steps, decay
  return c


def test_a_branch_decays_over_its_own_steps_from_the_stable_phase():
  new = branch.branch_config(_wsd(), 50, 30, 'cosine')
  assert (new.train.num_steps, new.optim.decay_steps, new.optim.decay) == (80, 30, 'cosine')
  schedule = optim.learning_rate_schedule(new.optim, new.train.num_steps)
  peak = new.optim.learning_rate
  assert float(schedule(50)) == pytest.approx(peak)
  assert float(schedule(65)) == pytest.approx(peak / 2, rel=1e-5)  # cosine's midpoint
  assert float(schedule(80)) == pytest.approx(0.0, abs=1e-9)
  assert branch.branch_config(_wsd(), 50, 30).optim.decay == 'linear'  # the run's own shape
  assert branch.branch_config(_wsd(decay='constant'), 50, 30).optim.decay == '1-sqrt'


@pytest.mark.parametrize('step, why', [(5, 'step 5 is not in the stable phase'),
                                       (90, 'step 90 is not in the stable phase')])
def test_branch_points_outside_the_stable_phase_are_refused(step, why):
  with pytest.raises(ValueError, match=why):
    branch.branch_config(_wsd(), step, 10)


def test_phases_that_would_move_are_refused():
  c = _wsd()
  c.phases = ({'until': 0.4, 'masking.rate': 0.3}, {})
  with pytest.raises(ValueError, match="'until' as a fraction"):
    branch.branch_config(c, 50, 30)  # phase 1 would end at 32 instead of 40
  c.phases = ({'until': 40, 'masking.rate': 0.3}, {})
  assert branch.branch_config(c, 50, 30).train.num_steps == 80


def _records(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return {r['step']: r for r in map(json.loads, lines) if 'train/loss' in r}


@pytest.mark.slow
def test_a_branch_starts_from_the_source_checkpoint(make_tiny_config, tmp_path, capsys):
  from mlmjax import train
  c = make_tiny_config()  # 8 steps: warmup 2, stable 2..6, decay 6..8
  c.optim.decay_steps = 2
  c.ckpt.every_steps, c.ckpt.max_to_keep = 2, 5
  src = tmp_path / 'src'
  train.run(c, src)
  out = tmp_path / 'branch'
  summary = branch.branch(src, out, step=4, decay_steps=2)
  assert summary['finished'] and summary['step'] == 6
  for item in ('params', 'opt_state'):
    a = ocp.StandardCheckpointer().restore(src / 'checkpoints' / '4' / item)
    b = ocp.StandardCheckpointer().restore(out / 'checkpoints' / '4' / item)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ref, got = _records(src), _records(out)
  assert sorted(got) == [1, 2, 3, 4, 5, 6]  # the source's history, then the branch's
  # Step 5 trains the same state on the same batch and masks at the same (peak) learning rate.
  assert got[5]['train/loss'] == ref[5]['train/loss']
  assert got[5]['train/lr'] == ref[5]['train/lr'] == pytest.approx(c.optim.learning_rate)
  assert got[6]['train/lr'] < ref[6]['train/lr']  # the branch decays, the source is still stable
  assert json.loads((out / 'branch.json').read_text())['step'] == 4
  # Rerunning the command resumes the branch (here: finished, nothing to train).
  assert branch.branch(src, out, step=4, decay_steps=2)['step'] == 6
  with pytest.raises(SystemExit, match='^error: step 8 is not in the stable phase'):
    branch.main(['--workdir', str(src), '--step', '8', '--decay_steps', '2',
                 '--out', str(tmp_path / 'b2')])
  with pytest.raises(SystemExit, match='--out .* holds another branch'):
    branch.main(['--workdir', str(src), '--step', '4', '--decay_steps', '3', '--out', str(out)])
