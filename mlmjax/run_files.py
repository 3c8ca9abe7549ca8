"""The files of a run's workdir: log.txt, metrics.jsonl, TensorBoard, config.json, resume checks."""

import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import traceback
import uuid
from typing import Any, Callable, Sequence

import jax

_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'sentencepiece',
             'tensorflow-cpu', 'tensorflow', 'ml-collections', 'datasketch')


# ---------------------------------------------------------------------------------------------
# Logging: one progress line per window, metrics.jsonl, TensorBoard, all from process 0 only.


class Reporter:
  """Writes the progress line, log.txt, metrics.jsonl, TensorBoard events (and a W&B run) of a workdir.

  wandb: the config's wandb section; with a project named and the wandb package installed, every
  record and the settings also go to a W&B run, resumed with the workdir (its id is kept in
  workdir/wandb_run_id).
  """

  def __init__(self, workdir: pathlib.Path, *, enabled: bool, wandb=None):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    self._wandb_cfg = wandb if wandb is not None and wandb.project else None
    self._wandb = None

  def log(self, text: str) -> None:
    """Prints a line and appends it to log.txt."""
    if not self.enabled:
      return
    print(text, flush=True)
    with open(self.workdir / 'log.txt', 'a') as f:
      f.write(text + '\n')

  def truncate_metrics(self, step: int) -> None:
    """Drops metrics.jsonl records past step, the step restored (0, a fresh start: all of them)."""
    path = self.workdir / 'metrics.jsonl'
    if not self.enabled or not path.exists():
      return
    keep = []
    for line in path.read_text().splitlines():
      try:
        if step > 0 and json.loads(line).get('step', 0) <= step:
          keep.append(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a crash
    tmp = path.with_suffix('.jsonl.tmp')
    tmp.write_text(''.join(line + '\n' for line in keep))
    os.replace(tmp, path)

  def _writer(self):
    """Returns the TensorBoard writer of workdir/tensorboard, opening it on first use."""
    if self._tb is None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(self.workdir / 'tensorboard'))
    return self._tb

  def hparams(self, settings: dict[str, Any], metrics: Sequence[str]) -> None:
    """Writes the run's settings for TensorBoard's HParams view, beside its scalars.

    settings: dotted config keys -> values (numbers, booleans and strings are kept; tuples become
    strings); metrics: the scalar tags the view tabulates (e.g. 'eval/loss').
    """
    if not self.enabled:
      return
    from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
    kept = {k: (v if isinstance(v, (bool, int, float, str)) else str(v))
            for k, v in settings.items() if v is not None}
    writer = self._writer()
    for summary in hparams(kept, dict.fromkeys(metrics, 0.0)):  # the values are not written
      writer.file_writer.add_summary(summary)
    writer.flush()
    if self._wandb_cfg is not None:
      self._open_wandb(kept)

  def _open_wandb(self, settings: dict[str, Any]) -> None:
    """Starts (or resumes) the workdir's W&B run; without the wandb package, says so and goes on."""
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError:
      self.log(f'WARNING: wandb.project={self._wandb_cfg.project!r} but the wandb package is not '
               'installed (pip install wandb); metrics go to TensorBoard and metrics.jsonl only')
      self._wandb_cfg = None
      return
    cfg = self._wandb_cfg
    id_file = self.workdir / 'wandb_run_id'
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + '\n')
    self._wandb = wandb.init(project=cfg.project, entity=cfg.entity or None,
                             name=cfg.name or self.workdir.resolve().name, id=run_id,
                             resume='allow', dir=str(self.workdir), config=settings,
                             mode=cfg.mode or None)
    self.log(f'W&B run {run_id} of project {cfg.project!r}'
             + (f' ({cfg.mode})' if cfg.mode else ''))

  def write(self, step: int, record: dict[str, float]) -> None:
    """Appends one record to metrics.jsonl and TensorBoard."""
    if not self.enabled:
      return
    with open(self.workdir / 'metrics.jsonl', 'a') as f:
      f.write(json.dumps({'step': step, **record}) + '\n')
    self._writer()
    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(scalars, step=step)

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer (the W&B run stays open until finish())."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None  # a write after close (the evaluation after the loop) opens a new writer

  def finish(self, summary: dict[str, Any] | None = None) -> None:
    """Closes every writer; the W&B run gets the summary's numbers and ends."""
    self.close()
    if self._wandb is not None:
      if summary:
        self._wandb.summary.update({k: v for k, v in summary.items()
                                    if isinstance(v, (int, float, str, bool))})
      self._wandb.finish()
      self._wandb = None


# ---------------------------------------------------------------------------------------------
# Provenance: what produced a run, and how it ended when it failed.


def _git(*args: str) -> str | None:
  """Returns git's output in mlmjax's own checkout, or None (an installed copy, no git)."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  try:
    out = subprocess.run(['git', '-C', str(repo), *args], capture_output=True, text=True,
                         timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def provenance(argv: list[str] | None = None) -> dict:
  """Returns the commit (and whether the checkout has uncommitted changes), library versions,
  the command line, the devices and the process count of this invocation."""
  versions = {'python': platform.python_version()}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  device = jax.devices()[0]
  versions['runtime'] = getattr(device.client, 'platform_version', '') or device.platform
  commit = _git('rev-parse', 'HEAD')
  status = _git('status', '--porcelain', '--untracked-files=no') if commit else None
  return {'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'commit': commit, 'dirty': bool(status) if status is not None else None,
          'versions': versions, 'command': shlex.join(sys.argv if argv is None else argv),
          'devices': {'platform': device.platform, 'kind': device.device_kind,
                      'count': jax.device_count(), 'local_count': jax.local_device_count()},
          'process_count': jax.process_count(), 'host': platform.node()}


def record_provenance(workdir: pathlib.Path, entry: dict) -> None:
  """Appends this invocation's provenance to workdir/provenance.json (one entry per start)."""
  path = workdir / 'provenance.json'
  entries = []
  if path.exists():
    try:
      entries = json.loads(path.read_text())
    except json.JSONDecodeError:
      entries = []  # a file cut short by a crash: start the list again
  atomic_write_json(path, [*entries, entry] if isinstance(entries, list) else [entry])


def log_fatal(workdir, error: BaseException, user_errors: tuple[type[BaseException], ...]) -> None:
  """Appends the error that ended a run to log.txt: one line for a user's error, else the traceback."""
  path = pathlib.Path(workdir) / 'log.txt'
  if jax.process_index() != 0 or not path.parent.is_dir():
    return
  if isinstance(error, user_errors):
    text = f'error: {error}\n'
  else:
    text = 'fatal: ' + ''.join(traceback.format_exception(error))
  with open(path, 'a') as f:
    f.write(text)


def fmt_time(seconds: float) -> str:
  """Returns seconds as 1h02m or 3m04s."""
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def atomic_write_json(path: pathlib.Path, obj: Any, *, sort_keys: bool = True,
                      default: Callable[[Any], Any] | None = None) -> None:
  """Writes obj as indented JSON through a temporary file, so a reader never sees half of it."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, default=default) + '\n')
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# config.json and the checks of a resumed or reused workdir.


def check_writable(workdir: pathlib.Path) -> None:
  """Raises early when the workdir cannot be written."""
  # One probe per process: the hosts of a multi-host run share the workdir and probe at once.
  probe = workdir / f'.write_probe.{jax.process_index()}.{os.getpid()}'
  try:
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise PermissionError(f'workdir {workdir} is not writable ({e.strerror}); '
                          'choose another --workdir') from None


def write_config(workdir: pathlib.Path, config, log) -> None:
  """Writes config.json, noting keys that differ from a previous run in the same workdir."""
  path = workdir / 'config.json'
  new = json.loads(config.to_json_best_effort())
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError:
      old = {}
    diffs = sorted(_flat_diff(old, new))
    if diffs:
      log(f'note: config differs from the previous run in this workdir: {", ".join(diffs)}')
  atomic_write_json(path, new)


def _flat_diff(a: dict, b: dict, prefix: str = '') -> list[str]:
  out = []
  for k in set(a) | set(b):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _flat_diff(va, vb, f'{prefix}{k}.')
    elif va != vb:
      out.append(f'{prefix}{k}')
  return out


def check_resume_meta(meta: dict, data_key: str, tokenizer, config, log) -> None:
  """Warns when a resumed run's data or seed differ from what its checkpoint was trained with."""
  if meta.get('tokenizer') not in (None, tokenizer.fingerprint):
    raise ValueError('the checkpoint was trained with a different tokenizer than '
                     f'{tokenizer.model_path}; use a new --workdir')
  if meta.get('cache_key') not in (None, data_key):
    log('WARNING: the training data differ from those this checkpoint was trained on '
        '(data.* or task_data.* changed); the data order will not continue exactly')
  if meta.get('seed') not in (None, config.seed):
    log(f'WARNING: seed changed from {meta.get("seed")} to {config.seed} on resume')
