"""The notebooks: stored with their outputs and Colab forms, the install cell's choices, and runs."""

import ast
import importlib.metadata
import json
import pathlib
import re
import subprocess
import sys
import tempfile

import nbformat
import pytest
from packaging.requirements import Requirement

from notebooks import render

QUICKSTART = render.NOTEBOOKS / 'quickstart.ipynb'
ABLATION = render.NOTEBOOKS / 'masking_ablation.ipynb'

# tag: what the stored cell must show ('stream' is printed text, the rest are MIME types)
EXPECTED = {
    QUICKSTART: {'setup': {'stream'}, 'config': {'stream'}, 'data': {'stream'},
                 'masking': {'stream', 'text/html'}, 'train': {'stream'}, 'plot': {'image/png'},
                 'summary': {'stream'}, 'fill-mask': {'stream'}},
    ABLATION: {'setup': {'stream'}, 'config': {'stream'}, 'strategies': {'stream', 'text/html'},
               'schedules': {'image/png'}, 'sweep': {'stream'},
               'report': {'text/markdown', 'image/png', 'stream'}},
}
SETTINGS = {QUICKSTART: {'STEPS', 'CORPUS', 'VOCAB_SIZE', 'WORKDIR', 'CACHE_DIR'},
            ABLATION: {'STEPS', 'STRATEGIES', 'RATES', 'CORPUS', 'VOCAB_SIZE', 'WORKDIR', 'CACHE_DIR'}}
# Directories that only a machine's own paths start with (Colab's /content included).
MACHINE_PATH = re.compile(r'(?<![\w.~-])/(?:work|tmp|home|root|Users|content|private|var|opt|usr|mnt)/')


def _tagged(nb, tag: str):
  """Returns the one code cell carrying `tag`."""
  cells = [c for c in nb.cells if tag in c.metadata.get('tags', [])]
  assert len(cells) == 1, f'expected one cell tagged {tag!r}, found {len(cells)}'
  return cells[0]


def _kinds(cell) -> list[str]:
  """Returns 'stream' per printed output and the MIME types of the displayed ones."""
  kinds = []
  for out in cell.outputs:
    kinds.extend(['stream'] if out.output_type == 'stream' else out.get('data', {}).keys())
  return kinds


def _text(cell) -> str:
  """Returns the stream and plain-text output of a code cell."""
  parts = []
  for out in cell.outputs:
    if out.output_type == 'stream':
      parts.append(out.text)
    elif 'data' in out:
      parts.append(out.data.get('text/plain', ''))
  return ''.join(parts)


def _only_definitions(source: str) -> bool:
  """True when a cell only imports, defines functions and assigns: it has nothing to show."""
  quiet = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.Assign, ast.AnnAssign)
  return all(isinstance(node, quiet) for node in ast.parse(source).body)


def _setup_definitions() -> dict:
  """Returns the imports, constants and functions that open the install cell, without its body."""
  nb = nbformat.read(QUICKSTART, as_version=4)
  body = []
  for node in ast.parse(_tagged(nb, 'setup').source).body:
    if isinstance(node, ast.If):
      break  # the body: installs on Colab, finds the checkout elsewhere
    if isinstance(node, ast.Assign):
      try:
        ast.literal_eval(node.value)
      except ValueError:
        continue
    elif not isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef)):
      continue
    body.append(node)
  namespace = {}
  exec(compile(ast.Module(body, type_ignores=[]), 'setup cell', 'exec'), namespace)  # pylint: disable=exec-used
  return namespace


def set_parameters(nb, **values) -> None:
  """Sets NAME = value in the notebook's parameters cell; each name must be assigned there."""
  cell = render.parameters_cell(nb)
  for name, value in values.items():
    cell.source, n = re.subn(rf'^{name} = .*?(\s+#@param.*)?$',
                             lambda m, v=value: f'{name} = {v!r}{m.group(1) or ""}',
                             cell.source, flags=re.M)
    assert n == 1, f'the parameters cell does not set {name}'
  assert render.parameters(nb) | values == render.parameters(nb)


@pytest.mark.parametrize('path', [QUICKSTART, ABLATION], ids=lambda p: p.stem)
def test_notebook_is_stored_with_outputs_and_colab_forms(path):
  assert path.stat().st_size < 1_500_000
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), 'run top to bottom once'

  for cell in code:
    kinds = _kinds(cell)
    assert 'error' not in [o.output_type for o in cell.outputs], cell.source[:60]
    assert not [o for o in cell.outputs if o.get('name') == 'stderr'], cell.source[:60]
    if not _only_definitions(cell.source):
      assert kinds, f'no stored output: {cell.source[:60]}'
  for tag, kinds in EXPECTED[path].items():
    assert kinds <= set(_kinds(_tagged(nb, tag))), tag
  if path == ABLATION:
    assert _kinds(_tagged(nb, 'report')).count('image/png') == 2

  stored = json.dumps([c.outputs for c in code] + [c.metadata for c in nb.cells] + [nb.metadata])
  stored = re.sub(r'"image/png": "[^"]*"', '', stored)
  for local in (str(render.REPO), str(pathlib.Path.home()), tempfile.gettempdir(), 'site-packages'):
    assert len(local) < 2 or local not in stored, local
  assert not MACHINE_PATH.findall(stored)

  setup = code[0]
  assert _tagged(nb, 'setup') is setup and setup.metadata.get('cellView') == 'form'
  assert "REPO_URL = 'https://github.com/mlmjax/mlmjax'  #@param {type:\"string\"}" in setup.source
  assert re.search(r'^REF = .*#@param', setup.source, re.M)
  assert setup.source == _tagged(nbformat.read(QUICKSTART, as_version=4), 'setup').source
  params = render.parameters_cell(nb)
  assert params.metadata.get('cellView') == 'form'
  lines = [line for line in params.source.splitlines() if line and not line.startswith('#@title')]
  assert all(re.fullmatch(r'[A-Z_]+ = .+  #@param \{type:"(string|integer)"\}', line) for line in lines)
  values = render.parameters(nb)
  assert set(values) == SETTINGS[path]
  assert not pathlib.Path(values['WORKDIR']).is_absolute()
  assert not pathlib.Path(values['CACHE_DIR']).is_absolute()
  assert 'MLMJAX_NOTEBOOK_' not in json.dumps([c.source for c in nb.cells])


def test_install_cell_choices():
  ns = _setup_definitions()
  kind = ns['runtime_kind']
  gvnic, host_bridge = ('0x1ae0', '0x0042'), ('0x8086', '0x1237')
  assert kind([gvnic, host_bridge], False, {}) == 'cpu'  # Google's vendor id alone is no TPU
  assert kind([gvnic, host_bridge], True, {}) == 'gpu'
  assert kind([gvnic, ('0x1ae0', '0x0063')], False, {}) == 'tpu'  # v5e
  assert kind([('0x1ae0', '0x0027')] * 4, True, {}) == 'tpu'  # v2/v3
  assert kind([('0x10de', '0x0063')], False, {}) == 'cpu'  # a TPU's device id, another vendor
  with pytest.raises(RuntimeError, match='legacy TPU Node'):
    kind([gvnic], False, {'COLAB_TPU_ADDR': '10.0.0.2:8470'})
  assert ns['probe_runtime']() in ('cpu', 'gpu', 'tpu')

  requires = importlib.metadata.requires('mlmjax')
  pick = ns['pip_requirements']
  cpu = pick(requires, 'cpu', None)
  assert len(cpu) == len([r for r in requires if ';' not in r])
  assert not [r for r in cpu if ';' in r or '[' in r]
  names = {Requirement(r).name for r in cpu}
  assert 'tensorflow-cpu' in names and not {'tensorflow', 'pytest', 'torch'} & names
  tpu = pick(requires, 'tpu', '2.19.0')
  plain, with_tpu = [Requirement(r) for r in tpu if r.startswith('jax')]
  assert (plain.name, plain.extras, with_tpu.name, with_tpu.extras) == ('jax', set(), 'jax', {'tpu'})
  assert str(plain.specifier) == str(with_tpu.specifier) != ''  # the pinned version, with the extra
  assert 'tensorflow==2.19.0' in tpu and 'tensorflow-cpu' not in {Requirement(r).name for r in tpu}
  gpu = pick(requires, 'gpu', None)
  assert [r for r in gpu if r.startswith('jax[')] == [f'jax[cuda12]{plain.specifier}']

  stale = ns['stale_modules']
  changed = {'numpy': ['numpy/__init__.py', 'numpy/linalg/linalg.py', 'numpy-2.4.dist-info/RECORD'],
             'protobuf': ['google/protobuf/__init__.py'], 'mlmjax': ['__editable__.mlmjax-0.1.0.pth']}
  assert stale(changed, {'sys', 'numpy', 'google', 'google.colab'}) == ['numpy']
  assert stale(changed, {'google.protobuf'}) == ['protobuf']
  real = {'packaging': [str(f) for f in importlib.metadata.distribution('packaging').files]}
  assert stale(real, set(sys.modules)) == ['packaging']  # imported by this test


@pytest.mark.slow
def test_install_cell_smoke_test_passes_here():
  import jax  # pylint: disable=g-import-not-at-top
  smoke = _setup_definitions()['SMOKE_TEST']
  result = subprocess.run([sys.executable, '-c', smoke], capture_output=True, text=True, timeout=120,
                          cwd=render.REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split()[-1] == jax.default_backend()


def _fresh(path):
  """Returns the notebook at path in memory with its stored outputs cleared (the file is kept)."""
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      cell.outputs, cell.execution_count = [], None
  return nb


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, topics_corpus, cache_dir):
  workdir = tmp_path / 'run'
  nb = _fresh(QUICKSTART)
  set_parameters(nb, STEPS=12, CORPUS=str(topics_corpus), VOCAB_SIZE=1000, WORKDIR=str(workdir),
                 CACHE_DIR=str(cache_dir))
  render.execute(nb, timeout=300)

  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not [o for o in cell.outputs if o.output_type == 'error'], cell.source[:60]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['step'] == 12 and summary['finished']
  assert (workdir / 'training_curves.png').stat().st_size > 0
  assert sorted(_kinds(_tagged(nb, 'plot'))) == ['image/png', 'text/plain']

  masking = _tagged(nb, 'masking')
  html = [o.data['text/html'] for o in masking.outputs if 'data' in o and 'text/html' in o.data]
  assert len(html) == 1 and '[MASK]' in html[0]
  assert 'rate 0.15:' in _text(masking) and 'rate 0.4:' in _text(masking)
  assert '[MASK|' in _text(masking)

  printed = _text(_tagged(nb, 'fill-mask'))
  assert '(step 12)' in printed
  assert printed.count('[MASK] #1:') == 3


@pytest.mark.slow
def test_masking_ablation_notebook_runs(tmp_path, topics_corpus, cache_dir):
  sweep_dir = tmp_path / 'abl'
  nb = _fresh(ABLATION)
  # 2 runs, not 4: each run is mostly its compile
  set_parameters(nb, STEPS=8, RATES='0.3', CORPUS=str(topics_corpus), VOCAB_SIZE=1000,
                 WORKDIR=str(sweep_dir), CACHE_DIR=str(cache_dir))
  render.execute(nb, timeout=600)

  strategies = _tagged(nb, 'strategies')
  html = [o.data['text/html'] for o in strategies.outputs if 'data' in o and 'text/html' in o.data]
  assert len(html) == 1
  for name in ('token', 'whole_word', 'span', 'pmi'):
    assert f'{name}: ' in _text(strategies) and f'<b>{name}: ' in html[0]
  sweep_text = _text(_tagged(nb, 'sweep'))
  for run in ('strategy=token,rate=0.3', 'strategy=whole_word,rate=0.3'):
    assert f'{run}: training' in sweep_text and f'{run} finished: step 8 |' in sweep_text
    assert json.loads((sweep_dir / run / 'summary.json').read_text())['finished']
  assert '2/2 runs finished' in sweep_text
  assert 'ETA' not in sweep_text and len(sweep_text.splitlines()) < 10  # no training lines
  assert not list(sweep_dir.glob('*rate=0.15*'))
  table = (sweep_dir / 'report' / 'report.md').read_text()
  assert '2 runs; varied settings: `masking.strategy`.' in table
  assert table.count('| whole_word |') == 1 and table.count('| token |') == 1
  assert len(list((sweep_dir / 'report').glob('*.png'))) == 2
  images = [o for o in _tagged(nb, 'report').outputs if 'data' in o and 'image/png' in o.data]
  assert len(images) == 2
