"""What every `python -m mlmjax.*` entry point shares: --config flag parsing and one-line errors.

    f = cli.parse_flags(argv, define, prog='mlmjax.train')  # --config plus define's flags
    with cli.user_errors():  # ValueError & co. -> 'error: ...' on one line, exit status 1
      run(f.config, f.workdir)

`--config` is an ml_collections config file (`configs/pretrain.py:tiny`), locked, with
`--config.KEY=VALUE` overrides read from `argv` (not from sys.argv). The configs shipped with the
package (the repository's configs/, installed as mlmjax.configs) can also be named without a path
(`pretrain:tiny`); `configs/NAME.py` falls back to the shipped file when no such file is here.
A bad flag, an unknown config key or a missing config file exits with one `error: ...` line,
never a traceback. This module imports nothing of mlmjax: train, sweep and the task exporters
all sit above it.
"""

import contextlib
import importlib.util
import json
import os
import pathlib
import sys
from typing import Callable, Iterator, NoReturn, Sequence

from absl import flags
from ml_collections import config_flags

DEFAULT_CONFIG_HELP = ('A config file and variant, e.g. configs/pretrain.py:tiny, or a shipped '
                       'config by name: pretrain:tiny, finetune:bbc, dapt:tiny.')
SHIPPED_CONFIGS = pathlib.Path(__file__).resolve().parent / 'configs'
# What a user's mistake raises inside a run (a bad value, a missing file, a diverged loss): shown
# as one line. Anything else is a bug in mlmjax and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, FloatingPointError, RuntimeError)
# What parsing raises for a bad flag or override (config_flags wraps some in AttributeError or
# TypeError, and a locked config raises KeyError for an unknown key).
_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, ValueError, TypeError)


def fail(message: str) -> NoReturn:
  """Exits with status 1 after printing `message` ('error: ...' or 'usage: ...') to stderr."""
  sys.exit(message)


def shipped_configs() -> list[str]:
  """Returns the names of the configs installed with the package (dapt, finetune, pretrain)."""
  return sorted(p.stem for p in SHIPPED_CONFIGS.glob('*.py') if not p.name.startswith('_'))


def resolve_config(spec: str) -> str:
  """Returns 'file:variant' for a config spec: a path as given, else the shipped config it names.

  'pretrain:tiny', 'pretrain.py:tiny' and 'configs/pretrain.py:tiny' (from a directory without
  that file) name the shipped configs/pretrain.py; a spec matching nothing is returned unchanged.
  """
  path, sep, arg = spec.strip().partition(':')
  if os.path.isfile(path):
    return spec.strip()
  name = path.removeprefix('configs/').removesuffix('.py')
  shipped = SHIPPED_CONFIGS / f'{name}.py'
  if name and '/' not in name and not name.startswith('_') and shipped.is_file():
    return f'{shipped}{sep}{arg}'
  return spec.strip()


def _missing_config(path: str, key: str = '--config') -> str:
  """Returns the one-line message for a config file that does not exist."""
  return (f'{key}: no such config file {path!r}; shipped configs, named without a path: '
          f'{", ".join(shipped_configs())} (e.g. pretrain:tiny)')


def _config_arg(argv: Sequence[str]) -> int | None:
  """Returns the index in argv of the --config value ('--config=X' or the word after '--config')."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return i
    if arg == '--config' and i + 1 < len(argv):
      return i + 1
  return None


def _config_file(argv: Sequence[str]) -> str | None:
  """Returns the file part of the --config value in argv ('configs/pretrain.py'), or None."""
  i = _config_arg(argv)
  if i is None:
    return None
  return argv[i].removeprefix('--config=').split(':', 1)[0]


def flag_error(e: BaseException, argv: Sequence[str] = ()) -> str:
  """Returns a one-line message for a flag or config-override error (no traceback).

  With the command line `argv`, an unknown key is named by its whole path ('masking.nope', not
  'nope') and the message points at the config file given.
  """
  while not isinstance(e, KeyError) and isinstance(e.__cause__ or e.__context__, KeyError):
    e = e.__cause__ or e.__context__
  if isinstance(e, KeyError) and e.args:
    lines = [l.strip() for l in str(e.args[0]).splitlines() if l.strip()]
    hint = f' ({lines[1]})' if len(lines) > 1 else ''
    key, name = lines[0], lines[0].strip('\'"')
    for arg in argv:  # the override that holds the unknown name: its whole path
      path = arg[len('--config.'):].split('=', 1)[0] if arg.startswith('--config.') else ''
      if name in path.split('.'):
        key = repr(path)
        break
    where = _config_file(argv) or 'configs/pretrain.py'
    return f'unknown config key {key}{hint}; see {where} for the keys'
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  useful = [l for l in lines if not l.startswith(('Traceback', 'File ', '^', '~'))]
  last = useful[-1] if useful else str(e)
  return last if last == lines[0] else f'{lines[0].rstrip(":")}: {last}'


def cpu_count() -> int:
  """Returns the CPUs this process may run on (its affinity where the OS gives it)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def write_json(path, obj) -> None:
  """Writes obj as indented JSON to path (parent folders created): a report's --json file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')


def load_config(spec: str, *, key: str = '--config'):
  """Returns the config of 'path/to/config.py:variant' or 'name:variant' (get_config(variant))."""
  path, _, arg = resolve_config(spec).partition(':')
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(_missing_config(path, key))
  module_spec = importlib.util.spec_from_file_location(f'_mlmjax_config_{file.stem}', file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_config_path(argv: Sequence[str]) -> None:
  """Exits with a one-line error when --config names a file that does not exist."""
  path = _config_file(argv)
  if path is not None and not os.path.isfile(path):
    fail(f'error: {_missing_config(path)}')


def expand_flagfiles(argv: Sequence[str] | None) -> list[str]:
  """Returns argv (None: sys.argv) with each --flagfile=FILE replaced by the flags FILE holds."""
  try:
    return flags.FlagValues().read_flags_from_files(list(sys.argv if argv is None else argv),
                                                    force_gnu=False)
  except flags.Error as e:
    fail(f"error: {str(e).removeprefix('ERROR:: ')}")


def override_keys(argv: Sequence[str] | None) -> frozenset[str]:
  """Returns the dotted keys a command line sets explicitly (--config.KEY=VALUE, flagfiles read)."""
  return frozenset(a[len('--config.'):].split('=', 1)[0] for a in expand_flagfiles(argv)
                   if a.startswith('--config.'))


def parse_flags(argv: Sequence[str] | None,
                define: Callable[..., None] | None = None, *, prog: str = '',
                config_help: str = DEFAULT_CONFIG_HELP) -> flags.FlagValues:
  """Returns parsed FlagValues: --config (a locked config file) plus the flags `define` adds.

  argv: the command line, program name first (None: sys.argv). define(flags, flag_values) adds
  the entry point's own flags, with `flags` the absl flags module. --help prints every flag and
  exits; a bad flag, an unknown config key or a missing config file exits with one 'error:' line.
  prog names the program in --help ('mlmjax.train': 'python -m mlmjax.train'). --flagfile=FILE
  reads flags (one per line, config overrides included) from FILE.
  """
  argv = expand_flagfiles(argv)  # first, so that --config and its overrides in a file are seen
  i = _config_arg(argv)
  if i is not None:  # a shipped config named without a path becomes its file
    value = argv[i].removeprefix('--config=')
    argv[i] = argv[i][:len(argv[i]) - len(value)] + resolve_config(value)
  flag_values = flags.FlagValues()
  # sys_argv: config_flags otherwise reads --config.KEY overrides from sys.argv, not from argv.
  config_flags.DEFINE_config_file('config', None, config_help, flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  if define is not None:
    define(flags, flag_values)
  if any(a in ('--help', '-h', '--helpfull') for a in argv[1:]):
    name = f'python -m {prog}' if prog else os.path.basename(argv[0]) if argv else 'mlmjax'
    print(f'{name} flags:\n{flag_values.get_help(include_special_flags=False)}')
    sys.exit(0)
  check_config_path(argv)
  try:
    flag_values(argv)
  except _FLAG_ERRORS as e:
    fail(f'error: {flag_error(e, argv)}')
  return flag_values


@contextlib.contextmanager
def user_errors(kinds: tuple[type[BaseException], ...] = USER_ERRORS) -> Iterator[None]:
  """Turns the listed exceptions raised inside the block into one 'error: ...' line and exit 1."""
  try:
    yield
  except kinds as e:
    fail(f'error: {e}')
