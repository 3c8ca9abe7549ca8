"""Tests for mlmjax/cli.py: --config parsing on a real config file, and one-line errors."""

import ast
import json
import pathlib
import sys

import pytest

from mlmjax import cli

REPO = pathlib.Path(__file__).resolve().parent.parent
PRETRAIN = str(REPO / 'configs' / 'pretrain.py')


def _define(flags, flag_values):
  flags.DEFINE_string('workdir', None, 'Where to write.', flag_values=flag_values)
  flags.DEFINE_bool('dry_run', False, 'Only print.', flag_values=flag_values)


def _error(argv, define=_define) -> str:
  """Returns the message parse_flags exits with, checking that it is one 'error:' line."""
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(argv, define)
  msg = str(e.value.code)
  assert msg.startswith('error: ') and len(msg.splitlines()) == 1, msg
  return msg


def test_parses_a_real_config_file_with_overrides_and_own_flags(monkeypatch):
  # Overrides come from argv, never from sys.argv (config_flags' default).
  monkeypatch.setattr(sys, 'argv', ['pytest', '--config.masking.rate=0.9'])
  f = cli.parse_flags(['train', '--config', f'{PRETRAIN}:tiny', '--config.masking.rate=0.4',
                       '--config.train.num_steps=7', '--workdir', 'runs/x', '--dry_run'], _define)
  assert f.config.masking.rate == 0.4 and f.config.train.num_steps == 7
  assert f.config.model.size == 'modern_tiny' and f.workdir == 'runs/x' and f.dry_run
  with pytest.raises(AttributeError):  # locked: a typo in code cannot add a key
    f.config.masking.nope = 1
  # No define: only --config; argv None reads sys.argv.
  monkeypatch.setattr(sys, 'argv', ['train', f'--config={PRETRAIN}:tiny'])
  f = cli.parse_flags(None)
  assert f.config.masking.rate == 0.4 and 'workdir' not in f  # tiny's recipe


def test_unknown_config_key_is_one_line_naming_the_key_and_file():
  msg = _error(['train', '--config', f'{PRETRAIN}:tiny', '--config.masking.nope=1'])
  assert "unknown config key 'masking.nope'" in msg and f'see {PRETRAIN} for the keys' in msg
  msg = _error(['train', f'--config={PRETRAIN}:tiny', '--config.masking.rat=0.2'])
  assert "'masking.rat'" in msg and 'Did you mean "rate"' in msg
  assert "unknown config key 'nosection.rate'" in _error(
      ['train', f'--config={PRETRAIN}:tiny', '--config.nosection.rate=0.2'])


def test_missing_config_file_is_one_line(tmp_path):
  missing = str(tmp_path / 'nope.py')
  for argv in (['train', '--config', f'{missing}:tiny'], ['train', f'--config={missing}']):
    assert _error(argv).startswith(f'error: --config: no such config file {missing!r}; shipped configs')


def test_bad_flags_and_values_are_one_line():
  assert "Unknown command line flag 'bogus'" in _error(
      ['train', f'--config={PRETRAIN}:tiny', '--bogus=1'])
  assert 'masking.rate=abc' in _error(['train', f'--config={PRETRAIN}:tiny', '--config.masking.rate=abc'])
  assert "unknown variant 'huge'" in _error(['train', f'--config={PRETRAIN}:huge'])


def test_help_lists_the_flags_and_exits_zero(capsys):
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(['train', '--help'], _define, prog='mlmjax.train')
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith('python -m mlmjax.train flags:')
  assert '--config: A config file and variant' in out and '--workdir: Where to write.' in out


def test_user_errors_are_one_line_and_bugs_keep_their_traceback():
  with pytest.raises(SystemExit) as e:
    with cli.user_errors():
      raise ValueError('train.seq_len=2 is too short')
  assert e.value.code == 'error: train.seq_len=2 is too short'
  with pytest.raises(KeyError):
    with cli.user_errors():
      raise KeyError('a bug')
  with pytest.raises(RuntimeError):  # a narrower set, as an entry point chooses
    with cli.user_errors((ValueError,)):
      raise RuntimeError('not mine to report')
  with pytest.raises(SystemExit) as e:
    cli.fail('usage: python -m mlmjax.train --config FILE')
  assert e.value.code == 'usage: python -m mlmjax.train --config FILE'


def test_cli_imports_nothing_of_mlmjax():
  tree = ast.parse((REPO / 'mlmjax' / 'cli.py').read_text())
  names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  names += [n.module or '' for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
  assert not any(n == 'mlmjax' or n.startswith('mlmjax.') for n in names), names
  assert not any(n.level for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))


def test_flagfile_supplies_the_config_its_overrides_and_flags(tmp_path):
  flagfile = tmp_path / 'run.flags'
  flagfile.write_text(f'--config={PRETRAIN}:tiny\n--config.train.num_steps=7\n--workdir=runs/x\n')
  f = cli.parse_flags(['train', f'--flagfile={flagfile}', '--config.masking.rate=0.3'], _define)
  assert (f.config.train.num_steps, f.config.masking.rate, f.workdir) == (7, 0.3, 'runs/x')
  missing = tmp_path / 'nope.flags'
  assert _error(['train', f'--flagfile={missing}']).startswith('error: Unable to open flagfile')
  (tmp_path / 'bad.flags').write_text(f'--config={tmp_path}/nope.py:tiny\n')
  assert _error(['train', f'--flagfile={tmp_path}/bad.flags']).startswith(
      f"error: --config: no such config file '{tmp_path}/nope.py'")


def test_shipped_configs_are_named_without_a_path(tmp_path, monkeypatch):
  assert cli.shipped_configs() == ['dapt', 'finetune', 'pretrain']
  monkeypatch.chdir(tmp_path)  # no configs/ here
  shipped = cli.SHIPPED_CONFIGS / 'finetune.py'
  for spec in ('finetune:bbc', 'finetune.py:bbc', 'configs/finetune.py:bbc'):
    assert cli.resolve_config(spec) == f'{shipped}:bbc'
  assert cli.resolve_config('finetune') == str(shipped)
  for spec in ('nope:tiny', '_private:x', 'other/finetune.py:bbc', ''):
    assert cli.resolve_config(spec) == spec
  (tmp_path / 'configs').mkdir()  # a file that exists wins over the shipped one
  (tmp_path / 'configs' / 'finetune.py').write_text(
      'from mlmjax.configs import finetune\n'
      'def get_config(arg):\n  c = finetune.get_config(arg)\n  c.seed = 7\n  return c\n')
  assert cli.resolve_config('configs/finetune.py:bbc') == 'configs/finetune.py:bbc'
  assert cli.load_config('configs/finetune.py:bbc').seed == 7
  assert cli.load_config('finetune:bbc').seed == 0
  f = cli.parse_flags(['train', '--config', 'finetune:bible', '--config.seed=3'], _define)
  assert (f.config.task, f.config.task_data.path.endswith('bible_kjv_web_verses.jsonl'),
          f.config.seed) == ('retrieve', True, 3)
  f = cli.parse_flags(['train', '--config=dapt:tiny'], _define)
  assert f.config.init_from == cli.load_config('dapt:tiny').init_from
  msg = _error(['train', '--config', 'pretrian:tiny'])
  assert "no such config file 'pretrian'" in msg and 'dapt, finetune, pretrain' in msg


@pytest.mark.slow  # eight interpreters importing jax
@pytest.mark.parametrize('script', ['mlmjax-train', 'mlmjax-predict', 'mlmjax-sweep',
                                    'mlmjax-report', 'mlmjax-convert', 'mlmjax-task-texts',
                                    'mlmjax-corpus-report', 'mlmjax-tokenizer-report',
                                    'mlmjax-average', 'mlmjax-probe', 'mlmjax-branch',
                                    'mlmjax-evalsuite'])
def test_console_scripts_answer_help(script):
  import subprocess
  path = pathlib.Path(sys.executable).parent / script  # installed with the package (setup.cfg)
  assert path.is_file(), f'{path} is missing: reinstall the package (python3 quickstart.py test)'
  out = subprocess.run([str(path), '--help'], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'usage' in out.stdout or 'flags:' in out.stdout


@pytest.mark.slow  # builds a wheel and trains two steps in a fresh interpreter
def test_installed_package_runs_a_shipped_config_from_any_directory(tmp_path, topics_corpus,
                                                                     cache_dir):
  import os
  import subprocess
  pytest.importorskip('setuptools')  # builds the wheel without fetching a build environment
  wheels, site = tmp_path / 'wheels', tmp_path / 'site'
  pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
  subprocess.run([*pip, 'wheel', '--no-deps', '--no-build-isolation', '-w', str(wheels), str(REPO)],
                 check=True, timeout=300)
  subprocess.run([*pip, 'install', '--no-deps', '--target', str(site), *map(str, wheels.glob('*.whl'))],
                 check=True, timeout=300)
  assert (site / 'mlmjax' / 'configs' / 'pretrain.py').is_file()
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = {**os.environ, 'PYTHONPATH': str(site), 'MLMJAX_CACHE': str(cache_dir)}
  where = subprocess.run([sys.executable, '-c', 'import mlmjax; print(mlmjax.__file__)'], cwd=elsewhere,
                         env=env, capture_output=True, text=True, check=True)
  assert where.stdout.startswith(str(site)), where.stdout  # the installed copy, not the checkout
  out = subprocess.run(
      [sys.executable, '-m', 'mlmjax.train', '--config', 'pretrain:tiny_classic', '--workdir', 'run',
       f'--config.data.corpus={topics_corpus}', '--config.tokenizer.vocab_size=1000',
       '--config.train.num_steps=2', '--config.train.seq_len=64', '--config.train.batch_size=4',
       '--config.optim.warmup_steps=1', '--config.eval.num_batches=1', '--config.eval.batch_size=4'],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads((elsewhere / 'run' / 'summary.json').read_text())['finished']
  # The README's spelling, configs/NAME.py, also works where there is no configs/ folder.
  task = subprocess.run([sys.executable, '-c', 'from mlmjax import cli; '
                         'print(cli.load_config("configs/finetune.py:bible").task)'],
                        cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  assert task.stdout.strip() == 'retrieve'
