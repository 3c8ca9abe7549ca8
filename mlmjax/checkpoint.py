"""Orbax checkpoints: params and optimizer state as separate items; resume, fall back past damage.

A step directory holds params/ (the parameters), opt_state/ (everything else of the train state:
the optimizer state and the step counter) and meta/ (JSON), so inference, init_from and conversion
read parameters alone, also where opt_state/ has been deleted to save disk.
"""

import math
import pathlib
import shutil
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

PARAMS, OPT_STATE, META = 'params', 'opt_state', 'meta'
# The one pytree item of checkpoints written before params and opt_state were split (read only).
PRE_SPLIT_STATE = 'state'


class CheckpointMismatchError(ValueError):
  """A checkpoint that is intact but was written for a different model or optimizer."""


class DiskSpaceError(ValueError):
  """Too little free disk for the checkpoints a run keeps, found before training starts."""


class UnrestorableError(ValueError):
  """Committed checkpoints exist but none restores; they were left in place."""


# Waits before each retry of a restore that failed reading files (an NFS or gcsfuse hiccup, a
# remount): about 3.5 s in all before the step counts as damaged.
IO_RETRY_DELAYS_S = (0.5, 1.0, 2.0)
# TensorStore raises ValueError('CODE: ...'); these codes are those of a failed file or object
# store read (an OS errno maps to NOT_FOUND, PERMISSION_DENIED, UNAVAILABLE, ...). Contents that do
# not decode are FAILED_PRECONDITION, OUT_OF_RANGE or DATA_LOSS (with tensorstore 0.1.86, orbax
# 0.12.8 also an OCDBT data file that is missing: it reads as empty), not retried.
_TENSORSTORE_IO_CODES = ('NOT_FOUND:', 'PERMISSION_DENIED:', 'UNAVAILABLE:', 'DEADLINE_EXCEEDED:',
                         'RESOURCE_EXHAUSTED:', 'ABORTED:')


def _split(state: dict) -> tuple[Any, dict]:
  """Returns (params, the rest of the state): the payloads of the params and opt_state items."""
  return state[PARAMS], {k: v for k, v in state.items() if k != PARAMS}


class Checkpointer:
  """Wraps an orbax CheckpointManager with items 'params', 'opt_state' (pytrees) and 'meta' (JSON).

  read_only: never writes (no save, no directory created, damaged steps are skipped, not moved).
  keep_every: N > 0 also keeps every step divisible by N (step 0 too) whatever max_to_keep prunes.
  """

  def __init__(self, directory, *, max_to_keep: int = 3, async_save: bool = True,
               log: Callable[[str], None] = print, read_only: bool = False, keep_every: int = 0):
    self.directory = pathlib.Path(directory).absolute()
    self.log = log
    self.read_only = read_only
    if read_only:
      # Not orbax's read_only option, which logs two warnings per open: nothing here saves or
      # deletes (save refuses, max_to_keep=None), and create=False makes no directory.
      self._options = ocp.CheckpointManagerOptions(
          max_to_keep=None, enable_async_checkpointing=False, create=False)
    else:
      self._options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
          keep_period=keep_every or None)
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=(PARAMS, OPT_STATE, META, PRE_SPLIT_STATE))

  def all_steps(self) -> list[int]:
    """Returns the committed step numbers, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Returns the newest committed step (not verified to restore), or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving state ({'params', 'opt_state', 'step'}) and meta at step (async if enabled)."""
    if self.read_only:
      raise ValueError(f'checkpoint directory {self.directory} was opened read-only')
    params, rest = _split(state)
    self._manager.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params), OPT_STATE: ocp.args.StandardSave(rest),
        META: ocp.args.JsonSave(meta)}), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Returns (state, meta) of step, restored onto the shardings in abstract_state."""
    where = self.directory / str(step)
    if (where / PARAMS).is_dir() and (where / META).is_dir() and not (where / OPT_STATE).exists():
      # Deleted on purpose (to keep the weights only): not damage, and not a state to resume.
      raise CheckpointMismatchError(
          f'checkpoint {where} holds parameters only (no {OPT_STATE}/), so training cannot resume '
          'from it; use it as init_from or for predict, or choose a new --workdir')
    self._check_fits(step, abstract_state, params_only=False)
    if self._is_pre_split(step):
      return self._restore_pre_split(step, abstract_state, params_only=False)
    params, rest = _split(abstract_state)
    out = self._manager.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(params), OPT_STATE: ocp.args.StandardRestore(rest),
        META: ocp.args.JsonRestore()}))
    return {PARAMS: out[PARAMS], **out[OPT_STATE]}, dict(out[META])

  def restore_params(self, step: int, abstract_params: Any) -> tuple[Any, dict]:
    """Returns (params, meta) of step without reading opt_state/ (which may have been deleted)."""
    self._check_fits(step, {PARAMS: abstract_params}, params_only=True)
    if self._is_pre_split(step):
      return self._restore_pre_split(step, abstract_params, params_only=True)
    out = self._manager.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(abstract_params), META: ocp.args.JsonRestore()}))
    return out[PARAMS], dict(out[META])

  def _is_pre_split(self, step: int) -> bool:
    """Returns True where step was written in the old layout: one 'state' item, no 'params'."""
    return (self.directory / str(step) / PRE_SPLIT_STATE).is_dir()

  def _restore_pre_split(self, step: int, abstract: Any, *, params_only: bool) -> tuple[Any, dict]:
    """Returns (state or params, meta) of a step written before the split, in one 'state' item.

    Compatibility with old workdirs. The item {'params', 'opt_state', 'step'} was written by a
    StandardSave; PyTreeRestore reads the same files, and with partial_restore=True it reads only
    the leaves of the target (here the params subtree), skipping the optimizer state.
    """
    target = {PARAMS: abstract} if params_only else abstract
    out = self._manager.restore(step, args=ocp.args.Composite(**{
        PRE_SPLIT_STATE: ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=params_only),
        META: ocp.args.JsonRestore()}))
    state = out[PRE_SPLIT_STATE]
    return (state[PARAMS] if params_only else state), dict(out[META])

  def restore_latest(self, abstract_state: Any, *,
                     keep_unrestorable: bool = False) -> tuple[int, Any, dict] | None:
    """Returns (step, state, meta) of the newest step that restores, moving damaged ones aside.

    Returns None where there are no steps. Where steps exist but none restores, they are moved
    aside and None is returned; with keep_unrestorable, UnrestorableError is raised, nothing moved.
    """
    return self._newest(lambda step: self.restore(step, abstract_state), keep_unrestorable)

  def restore_latest_params(self, abstract_params: Any) -> tuple[int, Any, dict] | None:
    """Returns (step, params, meta) of the newest step whose params restore (damage as above)."""
    return self._newest(lambda step: self.restore_params(step, abstract_params), False)

  def _newest(self, restore_one: Callable[[int], tuple[Any, dict]],
              keep_unrestorable: bool) -> tuple[int, Any, dict] | None:
    """Returns (step, *restore_one(step)) of the newest step that restores, or None."""
    damaged, found = [], None  # damaged: (step, why) of the steps newer than the one found
    for step in reversed(self.all_steps()):
      try:
        tree, meta = _retrying_io(lambda: restore_one(step))  # pylint: disable=cell-var-from-loop
        found = step, tree, meta
        break
      except CheckpointMismatchError:
        raise  # an intact checkpoint of another model: not damage, leave it in place
      except Exception as e:  # orbax raises ValueError, KeyError or bare Exception for damage.
        damaged.append((step, _why(e)))
    if found is None and damaged and keep_unrestorable:
      step, why = damaged[0]
      raise UnrestorableError(
          f'no checkpoint in {self.directory} restores (steps {sorted(s for s, _ in damaged)}; '
          f'step {step}: {why}); nothing was moved.\nIf the files are back (a disk or network '
          'hiccup), rerun; else set ckpt.restart_if_unrestorable=True to move them aside and '
          'start over')
    used = f'; step {found[0]} restores' if found else '; no step restores'
    for step, why in damaged:
      why = f'checkpoint step {step} does not restore ({why})'
      if self.read_only:
        self.log(f'WARNING: {why}; skipping it (read-only){used}')
      else:
        self.log(f'WARNING: {why}; moved to {self._move_aside(step)}{used}')
    return found

  def _check_fits(self, step: int, abstract: Any, *, params_only: bool) -> None:
    """Raises CheckpointMismatchError naming a leaf whose stored shape or presence differs.

    abstract is the train state, or {'params': params} where params_only; leaves are compared by
    their path in the train state ('params/...', 'opt_state/...', 'step'), item by item. An item
    whose metadata does not read is damage: its leaves are left to the restore attempt to report.
    """
    step_dir = self.directory / str(step)
    in_params = lambda p: p.startswith(PARAMS + '/')
    if self._is_pre_split(step):
      items = [(step_dir / PRE_SPLIT_STATE, '', lambda p: True)]
    else:
      items = [(step_dir / PARAMS, PARAMS + '/', in_params)]
      if not params_only:
        items.append((step_dir / OPT_STATE, '', lambda p: not in_params(p)))
    wanted = {_path_str(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
    stored, unread = {}, []
    for item_dir, prefix, covers in items:
      shapes = _stored_shapes(item_dir)
      if shapes is None:
        unread.append(covers)
      else:
        stored.update({prefix + p: s for p, s in shapes.items()
                       if in_params(prefix + p) or not params_only})
    wanted = {p: s for p, s in wanted.items() if not any(covers(p) for covers in unread)}
    where = f'checkpoint {step_dir} does not fit this model'
    fix = 'use a new --workdir, or the config the checkpoint was trained with'
    bad = [p for p, shape in wanted.items() if stored.get(p, shape) not in (shape, None)]
    if bad:
      bad.sort(key=lambda p: not in_params(p))  # name a parameter before its moments
      more = f' (and {len(bad) - 1} more arrays)' if len(bad) > 1 else ''
      raise CheckpointMismatchError(
          f'{where}: {bad[0]} has shape {stored[bad[0]]} in the checkpoint but {wanted[bad[0]]} '
          f'in the model{more};\n{fix}')
    missing, extra = sorted(wanted.keys() - stored.keys()), sorted(stored.keys() - wanted.keys())
    if missing or extra:
      raise CheckpointMismatchError(
          f'{where}: the model has {len(missing)} arrays the checkpoint lacks ({missing[:2]}) and '
          f'the checkpoint {len(extra)} the model lacks ({extra[:2]});\n{fix}')

  def _move_aside(self, step: int) -> pathlib.Path:
    """Moves a damaged step directory out of the manager's view (never deletes it)."""
    self._manager.wait_until_finished()
    src = self.directory / str(step)
    dst_root = self.directory.parent / (self.directory.name + '_damaged')
    dst_root.mkdir(parents=True, exist_ok=True)
    dst = dst_root / f'{step}.{time.strftime("%Y%m%d-%H%M%S")}'
    shutil.move(str(src), str(dst))
    self._manager.close()
    self._manager = self._open()
    return dst

  def wait(self) -> None:
    """Blocks until pending background saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Commits pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


class RunCheckpoints:
  """A run's checkpoints/ and (when kept) best/ managers; leaving the block commits and closes them."""

  def __init__(self, workdir: pathlib.Path, ckpt_cfg, *, keep_best: bool, log):
    quiet = log if jax.process_index() == 0 else (lambda s: None)
    self.latest = Checkpointer(workdir / 'checkpoints', max_to_keep=ckpt_cfg.max_to_keep,
                               async_save=ckpt_cfg.async_save, log=quiet,
                               keep_every=int(ckpt_cfg.keep_every))
    self.best = None
    if keep_best:  # the best evaluation's step, for fine-tuning and early stopping
      self.best = Checkpointer(workdir / 'best', max_to_keep=1, async_save=ckpt_cfg.async_save,
                               log=quiet)
    self.last_good: int | None = None
    self.closed = False

  def __enter__(self) -> 'RunCheckpoints':
    return self

  def __exit__(self, *exc) -> None:
    self.closed = True
    try:
      self.latest.close()  # commits pending asynchronous saves, also when an exception ends the loop
    finally:
      if self.best is not None:
        self.best.close()

  def where(self) -> str:
    """Returns the last good checkpoint in words, for error messages."""
    if self.last_good is None:
      return 'no checkpoint yet'
    return f'checkpoint step {self.last_good} in {self.latest.directory}'

  def save(self, step: int, state, meta: dict) -> None:
    """Starts saving step to checkpoints/."""
    self.latest.save(step, state, meta)
    self.last_good = step

  def save_best(self, step: int, state, meta: dict) -> None:
    """Starts saving step to best/ (when kept, and not after the run's loop has closed)."""
    if self.best is not None and not self.closed:  # an evaluation after the loop saves nothing
      self.best.save(step, state, meta)


def state_bytes(abstract_state: Any) -> int:
  """Returns the bytes of all arrays of a (abstract) train state: one checkpoint's payload."""
  leaves = jax.tree.leaves(abstract_state)
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


def check_disk_space(directory, abstract_state: Any, *, max_to_keep: int) -> tuple[int, int] | None:
  """Raises DiskSpaceError when directory's disk cannot hold the checkpoints a run keeps.

  Orbax writes a new step before it deletes the oldest, so a run holds max_to_keep + 1 steps at
  once; the steps already in directory/checkpoints count as written. Returns (needed, free) bytes,
  or None where the free space cannot be read (e.g. a gs:// path).
  """
  directory = pathlib.Path(directory)
  per_step = state_bytes(abstract_state)
  written = sum(f.stat().st_size for d in (directory / 'checkpoints').glob('*')
                if d.is_dir() and d.name.isdigit() for f in d.rglob('*') if f.is_file())
  needed = max(per_step * (max_to_keep + 1) - written, per_step)
  try:
    free = shutil.disk_usage(directory).free
  except OSError:
    return None
  if needed > free:
    raise DiskSpaceError(
        f'workdir {directory} has {_size_text(free)} free but the checkpoints need '
        f'{_size_text(needed)} more ({max_to_keep} + 1 steps of {_size_text(per_step)}); '
        'free space, lower ckpt.max_to_keep or choose another --workdir')
  return needed, free


def _size_text(n: int) -> str:
  """Returns n bytes as 'x.xx GiB' or 'x.x MiB'."""
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def restore_latest_in(directory, abstract_state: Any, *, what: str,
                      log: Callable[[str], None] = print) -> tuple[int, Any, dict]:
  """Returns (step, state, meta) of the newest restorable step in another run's directory.

  Raises FileNotFoundError starting with `what` (e.g. "init_from='runs/x'") when there is none.
  """
  ckpt = Checkpointer(directory, async_save=False, log=log)
  try:
    restored = ckpt.restore_latest(abstract_state)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'{what}: no restorable checkpoint in {directory}')
  return restored


def restore_params_in(directory, abstract_params: Any, *, what: str,
                      log: Callable[[str], None] = print,
                      step: int | None = None) -> tuple[int, Any, dict]:
  """Returns (step, params, meta) from another run's directory, reading no optimizer state.

  step=None takes the newest step whose parameters restore, skipping damaged ones; an int takes that
  step. Read-only: nothing in directory is moved or written. Raises FileNotFoundError starting with
  `what` (e.g. "init_from='runs/x'") when no step restores, CheckpointMismatchError for a checkpoint
  of another model.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f'{what}: no checkpoint directory {directory}')
  ckpt = Checkpointer(directory, log=log, read_only=True)
  try:
    if step is None:
      restored = ckpt.restore_latest_params(abstract_params)
      if restored is None:
        raise FileNotFoundError(f'{what}: no restorable checkpoint in {directory}')
      return restored
    steps = ckpt.all_steps()
    if step not in steps:
      raise FileNotFoundError(f'{what}: no checkpoint step {step} in {directory} '
                              f'(steps there: {", ".join(map(str, steps)) or "none"})')
    try:
      params, meta = _retrying_io(lambda: ckpt.restore_params(step, abstract_params))
    except CheckpointMismatchError:
      raise
    except Exception as e:  # damage, as in Checkpointer._newest
      raise FileNotFoundError(f'{what}: checkpoint step {step} in {directory} does not restore '
                              f'({_why(e)})') from e
    return step, params, meta
  finally:
    ckpt.close()


def _retrying_io(restore: Callable[[], Any]) -> Any:
  """Returns restore(), retried after each of IO_RETRY_DELAYS_S while it fails reading files."""
  for delay in IO_RETRY_DELAYS_S:
    try:
      return restore()
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if not _is_io_error(e):
        raise
      time.sleep(delay)
  return restore()


def _is_io_error(e: BaseException) -> bool:
  """Returns True where e, or an exception it was raised from, is a failure to read files."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) or (isinstance(e, ValueError) and (
        str(e).startswith(_TENSORSTORE_IO_CODES) or '[OS error' in str(e))):
      return True
    e = e.__cause__ or e.__context__
  return False


def _why(e: BaseException) -> str:
  """Returns 'Type: first line' of the exception e was raised from, innermost (orbax wraps it)."""
  while e.__cause__ is not None:
    e = e.__cause__
  return f'{type(e).__name__}: {_first_line(e)}'


def _first_line(e: BaseException) -> str:
  text = str(e).strip().split(' [tensorstore_spec')[0].splitlines()  # the spec is a JSON page
  return text[0][:300] if text else ''


def _path_str(path) -> str:
  """Returns 'a/b/0/c' for a pytree key path (dict keys, indices, namedtuple fields alike)."""
  parts = []
  for k in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def _stored_shapes(item_dir: pathlib.Path) -> dict[str, tuple | None] | None:
  """Returns {leaf path: shape or None} from a saved pytree's metadata, or None if unreadable."""
  # The handler alone reads the _METADATA file: no async machinery, no cross-host barriers.
  reader = ocp.StandardCheckpointHandler()
  try:
    tree = reader.metadata(item_dir)
  except Exception:  # pylint: disable=broad-except  # missing or corrupt metadata: damage
    return None
  finally:
    reader.close()
  leaves = jax.tree_util.tree_leaves_with_path(tree) if tree is not None else []
  if not leaves:
    return None
  return {_path_str(p): (tuple(x.shape) if getattr(x, 'shape', None) is not None else None)
          for p, x in leaves}


# ---------------------------------------------------------------------------------------------
# Preemption: when the loop stops to save.


class StopRequest:
  """Context manager turning SIGTERM/SIGINT into a flag the loop polls; restores the old handlers.

  Installs nothing outside the main thread, or in a jax.distributed run, where JAX's preemption
  notifier owns SIGTERM and every host must stop at the step reached_preemption_sync_point agrees on.
  A second SIGINT raises KeyboardInterrupt (abort without waiting for the checkpoint).
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread() and not jax.distributed.is_initialized():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      # None means a handler installed outside Python; the default is the closest restorable one.
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()


def reached_preemption_sync_point(step: int) -> bool:
  """Returns True at the step JAX's preemption service picked for saving (False where it is off)."""
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # jax.distributed is up but jax_enable_preemption_service is off
    return False
