"""Tests of mlmjax.checkpoint: round trips, async commits, falling back past damage, mismatches."""

import os
import pathlib
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import pretrain
from mlmjax import checkpoint, optim


def _params(kernel_shape=(128, 128)) -> dict:
  """Returns a small parameter tree; the kernel is large enough to get its own data file."""
  rng = np.random.default_rng(0)
  return {'dense': {'kernel': jnp.asarray(rng.normal(size=kernel_shape), jnp.float32),
                    'bias': jnp.asarray(rng.normal(size=kernel_shape[-1:]), jnp.float32)},
          'norm': {'scale': jnp.ones(kernel_shape[-1:], jnp.float32)}}


def _train_state(shift: float = 0.0, kernel_shape=(128, 128)) -> dict:
  """Returns {params, opt_state, step} after one real AdamW update, so the moments are non-zero."""
  cfg = pretrain.get_config('tiny_classic').optim
  cfg.warmup_steps = 0
  tx = optim.make_optimizer(cfg, 10)
  params = jax.tree.map(lambda x: x + shift, _params(kernel_shape))
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda x: 0.1 * x + 0.01, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return {'params': optax.apply_updates(params, updates), 'opt_state': opt_state,
          'step': jnp.asarray(7 + int(shift), jnp.int32)}


def _target(state) -> dict:
  """Returns the abstract restore target: shapes, dtypes and a sharding per leaf."""
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), state)


def _assert_same(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _adam_states(tree) -> list:
  return [s for s in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]


def _two_steps(ckpt_dir) -> dict:
  """Saves steps 1 and 2 (a different state) in ckpt_dir; returns step 1's state."""
  good = _train_state(0.0)
  ck = _checkpointer(ckpt_dir, async_save=False)
  ck.save(1, good, {'step': 1})
  ck.save(2, _train_state(1.0), {'step': 2})
  ck.close()
  return good


def _checkpointer(directory, log: list | None = None, **kw) -> checkpoint.Checkpointer:
  sink = [] if log is None else log
  return checkpoint.Checkpointer(directory, log=sink.append, **kw)


def _items(step_dir: pathlib.Path) -> list[str]:
  """Returns the item directories of a step, sorted."""
  return sorted(p.name for p in step_dir.iterdir() if p.is_dir())


def test_round_trip_keeps_optax_namedtuples_and_shardings(tmp_path):
  state = _train_state()
  ck = _checkpointer(tmp_path / 'checkpoints', async_save=False)
  ck.save(3, state, {'progress': {'tokens_seen': 12.0}, 'seed': 0})
  ck.close()
  # Parameters and optimizer state are separate items, so the parameters read alone.
  assert _items(tmp_path / 'checkpoints' / '3') == ['meta', 'opt_state', 'params']
  ck = _checkpointer(tmp_path / 'checkpoints', async_save=False)
  target = _target(state)
  restored, meta = ck.restore(3, target)
  ck.close()
  assert meta == {'progress': {'tokens_seen': 12.0}, 'seed': 0}
  _assert_same(restored, state)  # tree structures compare node types: namedtuples stay namedtuples
  (adam,) = _adam_states(restored)
  assert float(jnp.abs(adam.mu['dense']['kernel']).sum()) > 0  # a real, non-zero moment came back
  assert int(adam.count) == 1
  for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert x.sharding == t.sharding


def test_async_save_then_close_commits(tmp_path):
  states = {1: _train_state(0.0), 2: _train_state(1.0)}
  ck = _checkpointer(tmp_path / 'checkpoints', async_save=True)
  for step, state in states.items():
    ck.save(step, state, {'step': step})
  ck.close()
  names = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  assert names == ['1', '2']  # no *.orbax-checkpoint-tmp left behind
  ck = _checkpointer(tmp_path / 'checkpoints', async_save=True)
  assert ck.all_steps() == [1, 2] and ck.latest_step() == 2
  step, restored, meta = ck.restore_latest(_target(states[2]))
  ck.close()
  assert step == 2 and meta == {'step': 2}
  _assert_same(restored, states[2])


def test_max_to_keep_prunes_old_steps(tmp_path):
  state = _train_state()
  ck = _checkpointer(tmp_path / 'checkpoints', async_save=False, max_to_keep=2)
  for step in (1, 2, 3):
    ck.save(step, state, {})
  ck.close()
  ck = _checkpointer(tmp_path / 'checkpoints')
  assert ck.all_steps() == [2, 3]
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2', '3']
  ck.close()


def test_milestones_survive_pruning_and_restore(tmp_path):
  ck = _checkpointer(tmp_path / 'checkpoints', async_save=False, max_to_keep=2, keep_every=4)
  for step in range(11):
    ck.save(step, _train_state(float(step)), {'step': step})
  ck.close()
  ck = _checkpointer(tmp_path / 'checkpoints')
  assert ck.all_steps() == [0, 4, 8, 9, 10]
  state, meta = ck.restore(4, _train_state(0.0))
  assert meta['step'] == 4
  jax.tree.map(np.testing.assert_array_equal, state, _train_state(4.0))
  ck.close()


def test_restore_latest_of_an_empty_directory_is_none(tmp_path):
  ck = _checkpointer(tmp_path / 'checkpoints')
  assert ck.latest_step() is None
  assert ck.restore_latest(_target(_train_state())) is None
  ck.close()


# ---------------------------------------------------------------------------------------------
# Damage. Orbax writes, per step: _CHECKPOINT_METADATA, meta/ (JSON), and params/ and opt_state/,
# each with _METADATA (the tree), manifest.ocdbt and d/ (the OCDBT index), ocdbt.process_0/d/
# (array data files).


def _data_files(step_dir: pathlib.Path, item: str = 'params') -> list[pathlib.Path]:
  """Returns an item's data files, largest first."""
  files = [p for p in (step_dir / item).rglob('*') if p.is_file() and p.parent.name == 'd']
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _remove_data_file(step_dir):
  big = _data_files(step_dir)[0]
  assert big.stat().st_size > 32_000  # the kernel's bytes are in it, not just an index node
  big.unlink()


def _truncate_data_file(step_dir):
  big = _data_files(step_dir)[0]
  assert big.stat().st_size > 32_000
  os.truncate(big, big.stat().st_size // 2)


def _remove_metadata(step_dir):
  # Without its _METADATA a plain dict of arrays still reads against the target; opt_state does not.
  for item in ('params', 'opt_state'):
    (step_dir / item / '_METADATA').unlink()
  (step_dir / '_CHECKPOINT_METADATA').unlink()


def _remove_params_item(step_dir):
  shutil.rmtree(step_dir / 'params')


def _remove_opt_state_data_file(step_dir):
  big = _data_files(step_dir, 'opt_state')[0]
  assert big.stat().st_size > 32_000  # the moments of the kernel
  big.unlink()


def _remove_meta_json(step_dir):
  # A read error (FileNotFoundError) that does not go away: retried, then damage like the rest.
  (step_dir / 'meta' / 'metadata').unlink()


# Orbax's reads of a damaged step can leave a failed coroutine behind that Python reports later.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', [_remove_data_file, _truncate_data_file, _remove_metadata,
                                    _remove_params_item, _remove_opt_state_data_file,
                                    _remove_meta_json],
                         ids=lambda f: f.__name__.strip('_'))
def test_restore_latest_falls_back_past_a_damaged_step(tmp_path, damage):
  ckpt_dir = tmp_path / 'checkpoints'
  good = _two_steps(ckpt_dir)
  damage(ckpt_dir / '2')
  files_left = sorted(p.relative_to(ckpt_dir / '2') for p in (ckpt_dir / '2').rglob('*'))

  log = []
  ck = _checkpointer(ckpt_dir, log, async_save=False)
  assert ck.latest_step() == 2  # orbax does not notice the damage by itself
  step, restored, meta = ck.restore_latest(_target(good))
  assert (step, meta) == (1, {'step': 1})
  _assert_same(restored, good)
  assert ck.all_steps() == [1] and ck.latest_step() == 1
  ck.close()
  # The damaged step is moved aside whole, never deleted; the good one stays in place.
  (aside,) = (tmp_path / 'checkpoints_damaged').iterdir()
  assert aside.name.startswith('2.')
  assert sorted(p.relative_to(aside) for p in aside.rglob('*')) == files_left
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ['1']
  assert len(log) == 1 and 'step 2' in log[0] and str(aside) in log[0]


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_restore_latest_with_every_step_damaged_is_none(tmp_path):
  ckpt_dir = tmp_path / 'checkpoints'
  ck = _checkpointer(ckpt_dir, async_save=False)
  ck.save(1, _train_state(0.0), {})
  ck.save(2, _train_state(1.0), {})
  ck.close()
  for step in ('1', '2'):
    _remove_params_item(ckpt_dir / step)
  ck = _checkpointer(ckpt_dir, async_save=False)
  assert ck.restore_latest(_target(_train_state())) is None
  ck.close()
  assert len(list((tmp_path / 'checkpoints_damaged').iterdir())) == 2


def _away_for(path: pathlib.Path, seconds: float) -> threading.Timer:
  """Renames path away now and back after `seconds` from a timer thread (a filesystem hiccup)."""
  hidden = path.with_name(path.name + '.away')
  path.rename(hidden)
  timer = threading.Timer(seconds, hidden.rename, args=(path,))
  timer.start()
  return timer


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('what', ['2', '2/params/d', '2/meta/metadata'],
                         ids=['step_directory', 'ocdbt_index', 'meta_json'])
def test_a_transient_read_error_is_retried_and_the_step_is_not_moved(tmp_path, what):
  # The step directory and the meta JSON fail as FileNotFoundError, the OCDBT index of the
  # parameters as TensorStore's NOT_FOUND inside orbax's bare Exception.
  ckpt_dir = tmp_path / 'checkpoints'
  newer = _train_state(1.0)
  _save_steps_1_and_2(ckpt_dir, newer)
  log = []
  ck = _checkpointer(ckpt_dir, log, async_save=False)  # lists steps 1 and 2
  # Back after 1 s: the first attempt fails (the tests run as root, so a rename, not a chmod),
  # a retry after checkpoint.IO_RETRY_DELAYS_S (3.5 s in all) finds it again.
  assert sum(checkpoint.IO_RETRY_DELAYS_S) > 2.0
  timer = _away_for(ckpt_dir / what, 1.0)
  try:
    step, restored, _ = ck.restore_latest(_target(newer))
  finally:
    timer.join()
  assert step == 2 and ck.all_steps() == [1, 2]
  ck.close()
  _assert_same(restored, newer)
  assert log == []
  _assert_untouched(tmp_path)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_keep_unrestorable_raises_naming_the_directory_and_moves_nothing(tmp_path):
  ckpt_dir = tmp_path / 'checkpoints'
  state = _train_state()
  _save_steps_1_and_2(ckpt_dir, state)
  for step in ('1', '2'):
    _truncate_data_file(ckpt_dir / step)
  log = []
  ck = _checkpointer(ckpt_dir, log, async_save=False)
  with pytest.raises(checkpoint.UnrestorableError) as e:
    ck.restore_latest(_target(state), keep_unrestorable=True)
  msg = str(e.value)
  assert str(ckpt_dir) in msg and 'ckpt.restart_if_unrestorable=True' in msg, msg
  assert 'steps [1, 2]' in msg and len(msg.splitlines()) <= 2
  assert log == [] and ck.all_steps() == [1, 2]
  _assert_untouched(tmp_path)
  # Without it (ckpt.restart_if_unrestorable=True), both are moved aside, with a warning each.
  assert ck.restore_latest(_target(state)) is None
  ck.close()
  assert len(log) == 2 and all('no step restores' in line for line in log)
  assert len(list((tmp_path / 'checkpoints_damaged').iterdir())) == 2


# ---------------------------------------------------------------------------------------------
# A checkpoint of another model is not damage: a clear error, and nothing is moved.


def _save_steps_1_and_2(ckpt_dir, state):
  ck = _checkpointer(ckpt_dir, async_save=False)
  ck.save(1, state, {})
  ck.save(2, state, {})
  ck.close()


def _assert_untouched(tmp_path):
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1', '2']
  assert not (tmp_path / 'checkpoints_damaged').exists()


def test_shape_mismatch_names_the_parameter_and_moves_nothing(tmp_path):
  ckpt_dir = tmp_path / 'checkpoints'
  state = _train_state()
  _save_steps_1_and_2(ckpt_dir, state)
  log = []
  ck = _checkpointer(ckpt_dir, log, async_save=False)
  other = _target(_train_state(kernel_shape=(96, 128)))
  with pytest.raises(ValueError) as e:
    ck.restore_latest(other)
  msg = str(e.value)
  assert 'params/dense/kernel' in msg and '(128, 128)' in msg and '(96, 128)' in msg, msg
  assert str(ckpt_dir / '2') in msg and len(msg.splitlines()) <= 2
  with pytest.raises(ValueError, match='params/dense/kernel'):
    ck.restore(1, other)
  assert log == []
  _assert_untouched(tmp_path)
  # The intact checkpoints still restore into the model they were written for.
  step, restored, _ = ck.restore_latest(_target(state))
  ck.close()
  assert step == 2
  _assert_same(restored, state)


def test_structure_mismatch_is_an_error_not_damage(tmp_path):
  ckpt_dir = tmp_path / 'checkpoints'
  state = _train_state()
  _save_steps_1_and_2(ckpt_dir, state)
  fewer = _target(state)
  del fewer['params']['norm']  # e.g. a post-LN model against a pre-LN checkpoint
  ck = _checkpointer(ckpt_dir, async_save=False)
  with pytest.raises(ValueError, match='params/norm/scale') as e:
    ck.restore_latest(fewer)
  ck.close()
  assert len(str(e.value).splitlines()) <= 2
  _assert_untouched(tmp_path)


# ---------------------------------------------------------------------------------------------
# Parameters only: inference, init_from and conversion build no optimizer to read weights.


def _assert_params(restored, state, target) -> None:
  _assert_same(restored, state['params'])
  for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target['params'])):
    assert x.sharding == t.sharding


def test_params_restore_alone_also_after_the_optimizer_state_is_deleted(tmp_path):
  ckpt_dir = tmp_path / 'checkpoints'
  state = _train_state()
  target = _target(state)
  _save_steps_1_and_2(ckpt_dir, state)
  ck = _checkpointer(ckpt_dir, async_save=False)
  params, meta = ck.restore_params(2, target['params'])
  assert meta == {}
  _assert_params(params, state, target)

  shutil.rmtree(ckpt_dir / '2' / 'opt_state')  # e.g. to keep only the weights of an old run
  params, _ = ck.restore_params(2, target['params'])
  _assert_params(params, state, target)
  step, params, _ = ck.restore_latest_params(target['params'])
  assert step == 2
  _assert_params(params, state, target)
  ck.close()
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ['1', '2']  # nothing moved aside
  log = []
  step, params, _ = checkpoint.restore_params_in(ckpt_dir, target['params'], what='init_from',
                                                 log=log.append)
  assert step == 2 and log == []
  _assert_params(params, state, target)
  step, params, _ = checkpoint.restore_params_in(ckpt_dir, target['params'], what='init_from',
                                                 log=log.append, step=1)
  assert step == 1
  _assert_params(params, state, target)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_restore_latest_params_falls_back_past_a_damaged_step(tmp_path):
  ckpt_dir = tmp_path / 'checkpoints'
  good = _two_steps(ckpt_dir)
  _remove_data_file(ckpt_dir / '2')
  target = _target(good)

  # Another run's directory is only read: the damaged step is skipped, not moved.
  log = []
  step, params, meta = checkpoint.restore_params_in(ckpt_dir, target['params'], what='init_from',
                                                    log=log.append)
  assert (step, meta) == (1, {'step': 1})
  _assert_params(params, good, target)
  assert len(log) == 1 and 'step 2' in log[0] and 'skipping' in log[0]
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ['1', '2']
  with pytest.raises(FileNotFoundError, match=r'^init_from: checkpoint step 2 .* does not restore'):
    checkpoint.restore_params_in(ckpt_dir, target['params'], what='init_from', log=log.append,
                                 step=2)

  # The run's own checkpointer moves it aside, as restore_latest does.
  log = []
  ck = _checkpointer(ckpt_dir, log, async_save=False)
  step, params, meta = ck.restore_latest_params(target['params'])
  assert (step, meta) == (1, {'step': 1})
  _assert_params(params, good, target)
  assert ck.all_steps() == [1]
  ck.close()
  (aside,) = (tmp_path / 'checkpoints_damaged').iterdir()
  assert aside.name.startswith('2.') and len(log) == 1 and str(aside) in log[0]


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_restore_params_in_names_what_when_nothing_restores(tmp_path):
  ckpt_dir = tmp_path / 'checkpoints'
  target = _target(_train_state())
  with pytest.raises(FileNotFoundError, match=r"^init_from='runs/x': no checkpoint directory"):
    checkpoint.restore_params_in(ckpt_dir, target['params'], what="init_from='runs/x'")
  assert not ckpt_dir.exists()  # read-only: not even the directory is created
  _save_steps_1_and_2(ckpt_dir, _train_state())
  with pytest.raises(FileNotFoundError, match=r"^init_from='runs/x': no checkpoint step 5 .*1, 2"):
    checkpoint.restore_params_in(ckpt_dir, target['params'], what="init_from='runs/x'", step=5)
  for step in ('1', '2'):
    _remove_params_item(ckpt_dir / step)
  log = []
  with pytest.raises(FileNotFoundError) as e:
    checkpoint.restore_params_in(ckpt_dir, target['params'], what="init_from='runs/x'",
                                 log=log.append)
  assert str(e.value).startswith("init_from='runs/x': no restorable checkpoint in ")
  assert len(log) == 2
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ['1', '2']


def test_params_shape_mismatch_is_a_mismatch_error(tmp_path):
  ckpt_dir = tmp_path / 'checkpoints'
  _save_steps_1_and_2(ckpt_dir, _train_state())
  other = _target(_train_state(kernel_shape=(96, 128)))['params']
  ck = _checkpointer(ckpt_dir, async_save=False)
  for restore in (lambda: ck.restore_params(2, other), lambda: ck.restore_latest_params(other),
                  lambda: checkpoint.restore_params_in(ckpt_dir, other, what='x')):
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
      restore()
    msg = str(e.value)
    assert 'params/dense/kernel' in msg and '(128, 128)' in msg and '(96, 128)' in msg, msg
    assert 'more arrays' not in msg  # the moments of the kernel are not read, so not compared
  ck.close()
  _assert_untouched(tmp_path)


# ---------------------------------------------------------------------------------------------
# Workdirs written before the split hold one item 'state' = {params, opt_state, step}.


def _save_pre_split(ckpt_dir, step: int, state, meta: dict) -> None:
  """Writes a step exactly as the checkpointer did before params and opt_state were split."""
  manager = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(
          max_to_keep=3, enable_async_checkpointing=True, create=True),
      item_names=('state', 'meta'))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()
  manager.close()


def test_a_pre_split_checkpoint_restores_whole_and_params_only(tmp_path):
  ckpt_dir = tmp_path / 'checkpoints'
  old, new = _train_state(0.0), _train_state(1.0)
  target = _target(old)
  _save_pre_split(ckpt_dir, 1, old, {'step': 1})
  assert _items(ckpt_dir / '1') == ['meta', 'state']

  ck = _checkpointer(ckpt_dir, async_save=False)
  params, meta = ck.restore_params(1, target['params'])
  assert meta == {'step': 1}
  _assert_params(params, old, target)
  restored, meta = ck.restore(1, target)  # after a params-only read of the same item
  assert meta == {'step': 1}
  _assert_same(restored, old)
  (adam,) = _adam_states(restored)
  assert int(adam.count) == 1
  for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert x.sharding == t.sharding
  # A resumed old run goes on in the new layout, beside its old steps.
  ck.save(2, new, {'step': 2})
  ck.close()
  assert _items(ckpt_dir / '2') == ['meta', 'opt_state', 'params']

  ck = _checkpointer(ckpt_dir, async_save=False)
  assert ck.all_steps() == [1, 2]
  restored, _ = ck.restore(1, target)
  _assert_same(restored, old)
  step, restored, _ = ck.restore_latest(target)
  assert step == 2
  _assert_same(restored, new)
  ck.close()
  step, params, meta = checkpoint.restore_params_in(ckpt_dir, target['params'], what='x', step=1)
  assert (step, meta) == (1, {'step': 1})
  _assert_params(params, old, target)
  step, restored, _ = checkpoint.restore_latest_in(ckpt_dir, target, what='x')
  assert step == 2
  _assert_same(restored, new)


def test_a_pre_split_checkpoint_of_another_model_is_a_mismatch(tmp_path):
  ckpt_dir = tmp_path / 'checkpoints'
  _save_pre_split(ckpt_dir, 1, _train_state(), {})
  other = _target(_train_state(kernel_shape=(96, 128)))
  ck = _checkpointer(ckpt_dir, async_save=False)
  mismatch = checkpoint.CheckpointMismatchError
  with pytest.raises(mismatch, match=r'params/dense/kernel .*\(and 2 more'):
    ck.restore_latest(other)  # the kernel, then its two moments
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    ck.restore_latest_params(other['params'])
  assert 'params/dense/kernel' in str(e.value) and 'more arrays' not in str(e.value)
  ck.close()
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ['1']


def _remove_data_files_of(item_dir: pathlib.Path) -> None:
  # All of them: which file holds the parameters and which the moments varies from save to save.
  files = [p for p in item_dir.rglob('*') if p.is_file() and p.parent.name == 'd']
  assert sum(p.stat().st_size for p in files) > 100_000  # the kernel and its moments
  for p in files:
    p.unlink()


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_damaged_pre_split_step_is_fallen_back_past(tmp_path):
  ckpt_dir = tmp_path / 'checkpoints'
  good = _train_state(0.0)
  _save_pre_split(ckpt_dir, 1, good, {'step': 1})
  _save_pre_split(ckpt_dir, 2, _train_state(1.0), {'step': 2})
  _remove_data_files_of(ckpt_dir / '2' / 'state')
  target = _target(good)
  ck = _checkpointer(ckpt_dir, async_save=False)
  step, params, _ = ck.restore_latest_params(target['params'])
  assert step == 1
  _assert_params(params, good, target)
  step, restored, _ = ck.restore_latest(target)
  assert step == 1
  _assert_same(restored, good)
  ck.close()


# ---------------------------------------------------------------------------------------------
# Disk space, checked before training starts.


def test_state_bytes_counts_params_and_both_adam_moments():
  state = _train_state()
  abstract = jax.eval_shape(lambda: state)
  n_params = sum(x.size for x in jax.tree.leaves(state['params']))
  counters = [x for x in jax.tree.leaves(abstract) if x.shape == ()]
  assert len(counters) == 3 and all(x.dtype == jnp.int32 for x in counters)  # step, Adam, schedule
  # float32 params, mu and nu, plus the three int32 counters.
  assert checkpoint.state_bytes(abstract) == 3 * 4 * n_params + 3 * 4
  assert checkpoint.state_bytes(abstract) == sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))


def test_disk_check_reports_workdir_need_and_free_space(tmp_path, monkeypatch):
  state = _train_state()
  abstract = jax.eval_shape(lambda: state)
  per_step = checkpoint.state_bytes(abstract)
  needed, free = checkpoint.check_disk_space(tmp_path, abstract, max_to_keep=3)
  assert needed == 4 * per_step and free == shutil.disk_usage(tmp_path).free

  # The disk is the environment, not the thing under test: make it nearly full.
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda path: usage._replace(free=4 * per_step - 1))
  with pytest.raises(checkpoint.DiskSpaceError) as e:
    checkpoint.check_disk_space(tmp_path, abstract, max_to_keep=3)
  msg = str(e.value)
  assert str(tmp_path) in msg and 'ckpt.max_to_keep' in msg and '\n' not in msg
  assert f'{(4 * per_step - 1) / 2**20:.1f} MiB free' in msg
  assert f'need {4 * per_step / 2**20:.1f} MiB more' in msg
  assert checkpoint.check_disk_space(tmp_path, abstract, max_to_keep=2)[0] == 3 * per_step

  # Steps already written hold their share: a resumed run needs room for one more.
  ck = _checkpointer(tmp_path / 'checkpoints', async_save=False)
  for step in (1, 2, 3):
    ck.save(step, state, {'step': step})
  ck.close()
  needed, _ = checkpoint.check_disk_space(tmp_path, abstract, max_to_keep=3)
  assert per_step <= needed < 2 * per_step


def test_disk_check_passes_where_free_space_is_unknown(tmp_path, monkeypatch):
  def unreadable(path):
    raise FileNotFoundError(path)
  monkeypatch.setattr(shutil, 'disk_usage', unreadable)
  assert checkpoint.check_disk_space(tmp_path / 'gs:' / 'bucket', jax.eval_shape(_train_state),
                                     max_to_keep=3) is None


def test_a_step_without_opt_state_is_not_resumed_from_scratch(tmp_path):
  """Deleting opt_state/ keeps the weights for predict and init_from; resuming from it is refused."""
  ckpt = _checkpointer(tmp_path / 'ckpt', async_save=False)
  state = _train_state()
  ckpt.save(3, state, {'step': 3})
  ckpt.wait()
  shutil.rmtree(tmp_path / 'ckpt' / '3' / 'opt_state')
  with pytest.raises(checkpoint.CheckpointMismatchError, match='holds parameters only'):
    ckpt.restore_latest(_target(state))
  assert (tmp_path / 'ckpt' / '3' / 'params').is_dir()  # left in place, not moved aside
  step, params, _ = ckpt.restore_latest_params(_target(state)['params'])
  assert step == 3
  _assert_same(params, state['params'])
  ckpt.close()
