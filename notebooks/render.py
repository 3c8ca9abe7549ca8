"""Runs the notebooks top to bottom and stores them with their outputs.

  .venv/bin/python notebooks/render.py                    # both notebooks
  .venv/bin/python notebooks/render.py quickstart.ipynb   # one

Each notebook runs with the settings in its parameters cell, in a fresh kernel of this interpreter,
from scratch: the workdir its parameters name is deleted first (and, before the quickstart, the
cache it names), so the stored outputs are those a new user sees. The workdirs are relative to the
repository, so no machine's paths end up in the outputs. On 2 CPU cores both take about 7 minutes.
"""

import os
import pathlib
import shutil
import sys
import time

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent
REPO = NOTEBOOKS.parent
ORDER = ('quickstart.ipynb', 'masking_ablation.ipynb')  # the ablation reuses the quickstart's cache


def parameters_cell(nb):
  """Returns the code cell tagged 'parameters'."""
  cells = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  if len(cells) != 1:
    raise ValueError(f'expected one cell tagged parameters, found {len(cells)}')
  return cells[0]


def parameters(nb) -> dict:
  """Returns the names and values that the notebook's parameters cell assigns."""
  values = {}
  exec(parameters_cell(nb).source, {}, values)  # pylint: disable=exec-used
  return values


def execute(nb, timeout: int = 1200) -> None:
  """Runs every cell of nb in place, in a fresh kernel started in notebooks/."""
  # With no kernel directories the spec manager falls back to ipykernel's own python3 spec, which
  # launches this interpreter, whatever other kernelspecs the machine has.
  km = KernelManager(kernel_name='python3', kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
  env = dict(os.environ)
  env.pop('MPLBACKEND', None)  # ipykernel then picks the inline backend: figures become PNG outputs
  client = NotebookClient(nb, km=km, timeout=timeout, record_timing=False,
                          resources={'metadata': {'path': str(NOTEBOOKS)}})
  client.execute(env=env)  # raises CellExecutionError on the first failing cell


def remove_run_dir(relative: str) -> None:
  """Deletes REPO/relative, refusing anything outside REPO/runs."""
  path = (REPO / relative).resolve()
  if not relative or not path.is_relative_to(REPO / 'runs'):
    raise ValueError(f'{relative!r}: render.py only deletes directories under runs/')
  if path.exists():
    print(f'  removing {path.relative_to(REPO)}')
    shutil.rmtree(path)


def render(name: str) -> None:
  """Executes notebooks/name from scratch and writes it back with its outputs."""
  path = NOTEBOOKS / name
  nb = nbformat.read(path, as_version=4)
  params = parameters(nb)
  print(f'{name}: {params}')
  remove_run_dir(params['WORKDIR'])
  if name == ORDER[0] and params.get('CACHE_DIR'):
    remove_run_dir(params['CACHE_DIR'])
  start = time.perf_counter()
  execute(nb)
  nb.metadata['language_info'] = {'name': 'python'}  # not the rendering machine's Python version
  nbformat.validate(nb)
  nbformat.write(nb, path)
  print(f'  {time.perf_counter() - start:.0f} s, {path.stat().st_size / 1e6:.2f} MB')


def main(argv: list[str]) -> None:
  """Renders the notebooks named in argv (all of them when none)."""
  names = argv or list(ORDER)
  unknown = sorted(set(names) - set(ORDER))
  if unknown:
    raise SystemExit(f'unknown notebook(s) {unknown}; choose from {list(ORDER)}')
  for name in sorted(names, key=ORDER.index):
    render(name)


if __name__ == '__main__':
  main(sys.argv[1:])
