"""Executes notebooks/quickstart.ipynb end to end on a tiny budget with nbclient."""

import json
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / 'notebooks' / 'quickstart.ipynb'


def _tagged(nb, tag: str):
  """Returns the one code cell carrying `tag`."""
  cells = [c for c in nb.cells if tag in c.metadata.get('tags', [])]
  assert len(cells) == 1, f'expected one cell tagged {tag!r}, found {len(cells)}'
  return cells[0]


def _text(cell) -> str:
  """Returns the stream and plain-text output of a code cell."""
  parts = []
  for out in cell.outputs:
    if out.output_type == 'stream':
      parts.append(out.text)
    elif 'data' in out:
      parts.append(out.data.get('text/plain', ''))
  return ''.join(parts)


def test_notebook_is_valid_and_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, topics_corpus, cache_dir, monkeypatch):
  workdir = tmp_path / 'run'
  monkeypatch.setenv('MLMJAX_NOTEBOOK_STEPS', '12')
  monkeypatch.setenv('MLMJAX_NOTEBOOK_CORPUS', str(topics_corpus))
  monkeypatch.setenv('MLMJAX_NOTEBOOK_VOCAB', '1000')
  monkeypatch.setenv('MLMJAX_NOTEBOOK_WORKDIR', str(workdir))
  monkeypatch.setenv('MLMJAX_CACHE', str(cache_dir))
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  # With no kernel directories the spec manager falls back to ipykernel's own python3 spec, which
  # launches this interpreter (the venv), whatever other kernelspecs the machine has.
  km = KernelManager(kernel_name='python3', kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
  assert km.kernel_spec.argv[0] == sys.executable
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, km=km, timeout=300, resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  client.execute()  # raises CellExecutionError on the first failing cell

  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not [o for o in cell.outputs if o.output_type == 'error'], cell.source[:60]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['step'] == 12 and summary['finished']
  assert (workdir / 'training_curves.png').stat().st_size > 0

  masking = _tagged(nb, 'masking')
  html = [o.data['text/html'] for o in masking.outputs if 'data' in o and 'text/html' in o.data]
  assert len(html) == 1 and '[MASK]' in html[0]
  assert 'rate 0.15:' in _text(masking) and 'rate 0.4:' in _text(masking)
  assert '[MASK|' in _text(masking)

  printed = _text(_tagged(nb, 'fill-mask'))
  assert '(step 12)' in printed
  assert printed.count('[MASK] #1:') == 3


ABLATION = NOTEBOOK.parent / 'masking_ablation.ipynb'


@pytest.mark.slow
def test_masking_ablation_notebook_runs(tmp_path, topics_corpus, cache_dir, monkeypatch):
  nb = nbformat.read(ABLATION, as_version=4)
  nbformat.validate(nb)
  assert all(c.outputs == [] for c in nb.cells if c.cell_type == 'code')
  sweep_dir = tmp_path / 'abl'
  monkeypatch.setenv('MLMJAX_NOTEBOOK_STEPS', '8')
  monkeypatch.setenv('MLMJAX_NOTEBOOK_RATES', '0.3')  # 2 runs, not 4: each run is mostly its compile
  monkeypatch.setenv('MLMJAX_NOTEBOOK_CORPUS', str(topics_corpus))
  monkeypatch.setenv('MLMJAX_NOTEBOOK_VOCAB', '1000')
  monkeypatch.setenv('MLMJAX_NOTEBOOK_WORKDIR', str(sweep_dir))
  monkeypatch.setenv('MLMJAX_CACHE', str(cache_dir))
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  km = KernelManager(kernel_name='python3', kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
  client = NotebookClient(nb, km=km, timeout=600, resources={'metadata': {'path': str(ABLATION.parent)}})
  client.execute()

  strategies = _tagged(nb, 'strategies')
  html = [o.data['text/html'] for o in strategies.outputs if 'data' in o and 'text/html' in o.data]
  assert len(html) == 1
  for name in ('token', 'whole_word', 'span', 'pmi'):
    assert f'{name}: ' in _text(strategies) and f'<b>{name}: ' in html[0]
  sweep_text = _text(_tagged(nb, 'sweep'))
  assert sweep_text.count('finished') == 2
  for run in ('strategy=token,rate=0.3', 'strategy=whole_word,rate=0.3'):
    assert run in sweep_text
    assert json.loads((sweep_dir / run / 'summary.json').read_text())['finished']
  assert not list(sweep_dir.glob('*rate=0.15*'))
  table = (sweep_dir / 'report' / 'report.md').read_text()
  assert '2 runs; varied settings: `masking.strategy`.' in table
  assert table.count('| whole_word |') == 1 and table.count('| token |') == 1
  for png in ('curves', 'final_vs_rate'):
    assert list((sweep_dir / 'report').glob('*.png'))
  images = [o for o in _tagged(nb, 'report').outputs if 'data' in o and 'image/png' in o.data]
  assert len(images) == 2
