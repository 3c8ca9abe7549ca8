"""Phases of one run: the plan, its checks, budgets, and exact resume across a boundary."""

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mlmjax import experiment, optim, phases, schema, train


def _config(num_steps=100, batch=16, seq_len=64, phase_list=(), **train_keys):
  c = schema.defaults()
  c.train.num_steps, c.train.batch_size, c.train.seq_len = num_steps, batch, seq_len
  c.optim.warmup_steps = 10
  c.phases = tuple(phase_list)
  for k, v in train_keys.items():
    c.train[k] = v
  return c


def _spans(segments):
  return [(s.start, s.end, s.overrides) for s in segments]


# ---------------------------------------------------------------------------------------------
# The plan.


def test_a_run_without_phases_is_one_segment():
  assert _spans(phases.plan(_config())) == [(0, 100, {})]


def test_phases_end_at_steps_or_fractions_and_the_batch_warmup_cuts_them():
  c = _config(phase_list=[{'until': 0.5, 'masking.rate': 0.3}, {'masking.rate': 0.15}],
              batch_warmup_steps=6, batch_warmup_from=4)
  assert _spans(phases.plan(c)) == [
      (0, 3, {'masking.rate': 0.3, 'train.batch_size': 4}),
      (3, 6, {'masking.rate': 0.3, 'train.batch_size': 8}),
      (6, 50, {'masking.rate': 0.3}),
      (50, 100, {'masking.rate': 0.15})]
  # The same run at another length keeps its fractions.
  assert [s.end for s in phases.plan(c, 1000)] == [3, 6, 500, 1000]


def test_the_batch_warmup_doubles_in_equal_shares():
  c = _config(batch=64, batch_warmup_steps=90, batch_warmup_from=8)
  assert [(s.end, s.overrides.get('train.batch_size', 64)) for s in phases.plan(c)] == [
      (30, 8), (60, 16), (90, 32), (100, 64)]


@pytest.mark.parametrize('phase_list, words', [
    ([{'until': 50, 'model.num_layers': 2}, {}], "phases[0]: 'model.num_layers' cannot change"),
    ([{'until': 50}, {'until': 40}], "phases[1]: 'until' ends at step 40, not after"),
    ([{'until': 50}, {'until': 90}], 'phases[1]: the last phase ends at step 90'),
    ([{'masking.rate': 0.3}, {}], "phases[0]: needs 'until'"),
    ([{'until': 1.5}, {}], "phases[0]: 'until'=1.5 as a fraction"),
    ([{'until': '50'}, {}], "phases[0]: 'until'='50' must be a step"),
    (['train.seq_len=128'], 'phases[0]='),
])
def test_bad_phases_name_the_phase(phase_list, words):
  with pytest.raises(ValueError, match='^' + words.replace('[', r'\[').replace(']', r'\]')
                     .replace('(', r'\(').replace(')', r'\)')):
    phases.plan(_config(phase_list=phase_list))


def test_bad_batch_warmups_are_refused():
  with pytest.raises(ValueError, match='train.batch_warmup_from=6 must be train.batch_size=16 '
                     'divided by a power of two'):
    phases.plan(_config(batch_warmup_steps=10, batch_warmup_from=6))
  with pytest.raises(ValueError, match=r'phases\[0\] sets train.batch_size during'):
    phases.plan(_config(phase_list=[{'until': 5, 'train.batch_size': 8}, {}],
                        batch_warmup_steps=10, batch_warmup_from=4))


def test_a_phase_value_is_checked_like_the_run_config_and_names_the_phase():
  c = _config(phase_list=[{'until': 50}, {'train.seq_len': 1024}])
  with pytest.raises(ValueError, match=r'^phase 2/2 \(steps 50..100\): train.seq_len=1024 '
                     'exceeds model.max_position=512'):
    experiment.validate_config(c)
  c = _config(phase_list=[{'until': 50, 'masking.rate': 1.5}, {}])
  with pytest.raises(ValueError, match=r'^phase 1/2 \(steps 0..50\): .*masking.rate'):
    experiment.validate_config(c)
  c = _config(budget_tokens=10_000, budget_minutes=1.0)
  with pytest.raises(ValueError, match='^train.budget_tokens=10000 and train.budget_minutes=1.0 '
                     'both set'):
    experiment.validate_config(c)


def test_a_token_budget_buys_the_largest_affordable_run():
  c = _config(phase_list=[{'until': 0.9, 'train.seq_len': 32}, {}], batch_warmup_steps=10,
              batch_warmup_from=8)

  def tokens(n):
    return sum((s.end - s.start) * phases.tokens_per_step(phases.config_of(c, s))
               for s in phases.plan(c, n))

  for budget in (10_000, 123_457, 1_000_000):
    n = phases.budget_steps(c, phases.tokens_per_step, budget)
    assert tokens(n) <= budget < tokens(n + 1), budget
  # Without phases it is the closed form.
  assert phases.budget_steps(_config(), phases.tokens_per_step, 1_000_000) == 1_000_000 // 1024


# ---------------------------------------------------------------------------------------------
# Runs.


def _stored(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
  """Returns the leaves of a checkpoint's {params, opt_state}."""
  d = workdir / 'checkpoints' / str(step)
  params = ocp.StandardCheckpointer().restore(d / 'params')
  opt_state = ocp.StandardCheckpointer().restore(d / 'opt_state')['opt_state']
  return [np.asarray(x) for x in jax.tree.leaves((params, opt_state))]


def _records(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


@pytest.mark.slow
def test_a_two_phase_run_cut_anywhere_resumes_bitwise(make_tiny_config, tmp_path):
  def config():
    c = make_tiny_config()  # 8 steps of 8 x 64 tokens
    c.train.seq_len = 128
    c.phases = ({'until': 4, 'train.seq_len': 64, 'masking.rate': 0.3},
                {'masking.rate': 0.15})
    c.ckpt.every_steps = 2
    c.train.batch_warmup_steps, c.train.batch_warmup_from = 2, 4
    return c

  whole = train.run(config(), tmp_path / 'whole')
  assert whole['finished'] and whole['step'] == 8
  cut = tmp_path / 'cut'
  for stop_after, reached in ((3, 3), (1, 4), (None, 8)):  # the phases' boundary is step 4
    assert train.run(config(), cut, stop_after=stop_after)['step'] == reached
  for step in (4, 8):
    for a, b in zip(_stored(tmp_path / 'whole', step), _stored(cut, step)):
      np.testing.assert_array_equal(a, b)
  ref = {r['step']: r for r in _records(tmp_path / 'whole') if 'train/loss' in r}
  got = {r['step']: r for r in _records(cut) if 'train/loss' in r}
  assert sorted(got) == list(range(1, 9))
  for step in range(1, 9):
    assert got[step]['train/loss'] == ref[step]['train/loss'], step
  # Each phase trained its own shape and rate; the schedule went on across the boundary.
  assert [ref[s]['train/mask_rate'] for s in (4, 5)] == pytest.approx([0.3, 0.15])
  schedule = optim.learning_rate_schedule(config().optim, 8)
  for step in (4, 5, 6):
    assert ref[step]['train/lr'] == pytest.approx(float(schedule(step - 1)), rel=1e-6)
  text = (tmp_path / 'whole' / 'log.txt').read_text()
  assert 'training steps 0..2 (phase 1/2 (batch warmup: 4)) | batch 4 x 64 tokens' in text
  assert 'training steps 2..4 (phase 1/2) | batch 8 x 64 tokens' in text
  assert 'training steps 4..8 (phase 2/2) | batch 8 x 128 tokens' in text
  # The Adam moments at the boundary are those of phase 1's last step: the stored state of
  # step 4 (end of phase 1) restores into phase 2, whose first update reads them.
  opt = ocp.StandardCheckpointer().restore(tmp_path / 'whole' / 'checkpoints' / '4' / 'opt_state')
  counts = [int(np.asarray(x)) for x in jax.tree.leaves(opt) if np.asarray(x).shape == ()]
  assert 4 in counts
  meta = json.loads((tmp_path / 'whole' / 'checkpoints' / '8' / 'meta' / 'metadata').read_text())
  assert meta['data']['segment'] == 2  # batch warmup 4, batch warmup 8 (phase 1), phase 2


@pytest.mark.slow
def test_a_token_budget_run_ends_annealed(make_tiny_config, tmp_path):
  c = make_tiny_config()
  c.phases = ({'until': 0.5, 'train.seq_len': 32}, {})
  c.train.budget_tokens = 8 * 32 * 3 + 8 * 64 * 3 + 100  # 3 + 3 steps and a remainder
  c.optim.decay = 'cosine'
  summary = train.run(c, tmp_path)
  assert summary['finished'] and summary['step'] == summary['num_steps'] == 6
  assert summary['adapted']['train.num_steps'] == {
      'from': 8, 'to': 6, 'why': f'train.budget_tokens={c.train.budget_tokens:,}'}
  recorded = json.loads((tmp_path / 'config.json').read_text())
  assert recorded['train']['num_steps'] == 6
  schedule = optim.learning_rate_schedule(c.optim, 6)
  lrs = {r['step']: r['train/lr'] for r in _records(tmp_path) if 'train/lr' in r}
  assert lrs[6] == pytest.approx(float(schedule(5)), rel=1e-6)
  assert float(schedule(6)) == pytest.approx(c.optim.learning_rate * c.optim.end_lr_fraction)


@pytest.mark.slow
def test_a_time_budget_is_measured_once_and_kept_on_resume(make_tiny_config, tmp_path):
  c = make_tiny_config()
  c.train.budget_minutes = 0.05
  c.eval.every_steps = c.ckpt.every_steps = 1000
  first = train.run(c, tmp_path, stop_after=2)
  record = json.loads((tmp_path / 'budget.json').read_text())
  steps = record['num_steps']
  assert first['num_steps'] == steps >= 1
  assert set(record['step_seconds']) == {'(8, 64, 1)'}
  second = train.run(c, tmp_path)
  assert second['finished'] and second['step'] == second['num_steps'] == steps
  schedule = optim.learning_rate_schedule(c.optim, steps)
  lrs = {r['step']: r['train/lr'] for r in _records(tmp_path) if 'train/lr' in r}
  assert lrs[steps] == pytest.approx(float(schedule(steps - 1)), rel=1e-5)
