"""Tests for the import graph of mlmjax/: a tree (no cycles, even through function-level imports).

DESIGN.md: "Imports form a tree: no module imports one above it, not even inside a function", and
the core (masking, model, losses, optim, sharding, checkpoint, flops) imports nothing of mlmjax.
The graph comes from the source with `ast`, so every import counts, module-level or in a function.
"""

import ast
import pathlib

PACKAGE = 'mlmjax'
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE
CORE = ('masking', 'model', 'losses', 'optim', 'sharding', 'checkpoint', 'flops')


def _module_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Returns {dotted module name: file} for every .py under package `root` (a package is its __init__)."""
  modules = {}
  for path in sorted(root.rglob('*.py')):
    parts = list(path.relative_to(root.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts.pop()
    modules['.'.join(parts)] = path
  return modules


def _imported(name: str, modules: dict) -> str | None:
  """Returns the project module that importing dotted `name` loads last (None: not mlmjax)."""
  parts = name.split('.')
  while parts and '.'.join(parts) not in modules:
    parts.pop()  # `import mlmjax.tasks.Task`-like names resolve to the module that defines them
  return '.'.join(parts) or None


def _imports_of(module: str, path: pathlib.Path, modules: dict) -> set[str]:
  """Returns the project modules `module` imports anywhere in its file (functions included)."""
  package = module if path.name == '__init__.py' else module.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'), str(path))):
    if isinstance(node, ast.Import):
      found.update(_imported(a.name, modules) for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: level 1 is this module's package, 2 its parent, ...
        base = package.split('.')[:len(package.split('.')) - node.level + 1]
        source = '.'.join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ''
      # `from mlmjax.tasks import task_data` reads the package mlmjax.tasks (its __init__ runs
      # and the name is looked up there) and loads the module mlmjax.tasks.task_data: both count.
      found.add(_imported(source, modules))
      for alias in node.names:
        sub = f'{source}.{alias.name}'
        if sub in modules:
          found.add(sub)
  found.discard(None)
  found.discard(module)
  return found


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
  """Returns {module: the modules of package `root` it imports} for every module of it (mlmjax/)."""
  modules = _module_files(root)
  return {m: _imports_of(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Returns one cycle [a, b, ..., a] per strongly connected group of modules (Tarjan's DFS)."""
  index, low, on_stack, stack, groups = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.add(w)
        if w == v:
          break
      if len(group) > 1:
        groups.append(group)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
  """Returns a shortest cycle through the alphabetically first module of a strongly connected group."""
  start = min(group)
  paths, frontier = {start: [start]}, [start]
  while frontier:  # breadth first inside the group, back to start
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & group):
        if w == start:
          return paths[v] + [start]
        if w not in paths:
          paths[w] = paths[v] + [w]
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f'{group} is not strongly connected')


def test_the_graph_sees_every_kind_of_import(tmp_path):
  files = {
      '__init__.py': 'import os\n',
      'core.py': 'import numpy as np\n',
      'mid.py': 'from pkg import core\nimport pkg.core as c2\n',
      'top.py': 'import json\n\ndef main():\n  from pkg import mid, sub  # lazily\n',
      'sub/__init__.py': 'from pkg.sub.base import Base\nfrom . import leaf\n',
      'sub/base.py': 'from .. import core\nfrom ..mid import thing\n',
      'sub/leaf.py': 'from pkg.sub import Base\nfrom . import base\nimport pkg\n',
  }
  for name, text in files.items():
    (tmp_path / 'pkg' / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / 'pkg' / name).write_text(text)
  assert import_graph(tmp_path / 'pkg') == {
      'pkg': set(),
      'pkg.core': set(),
      # `from pkg import core` reads the package pkg and loads pkg.core; import pkg.core
      'pkg.mid': {'pkg', 'pkg.core'},
      'pkg.top': {'pkg', 'pkg.mid', 'pkg.sub'},  # inside a function; a package is its __init__
      'pkg.sub': {'pkg.sub.base', 'pkg.sub.leaf'},  # absolute and relative submodules
      'pkg.sub.base': {'pkg', 'pkg.core', 'pkg.mid'},  # `from ..mid import thing`: a name of pkg.mid
      'pkg.sub.leaf': {'pkg.sub', 'pkg.sub.base', 'pkg'},  # a name of the package: its __init__
  }
  graph = import_graph()
  assert {'mlmjax', 'mlmjax.tasks', 'mlmjax.tasks.mlm', 'mlmjax.masking'} <= set(graph)


def test_a_submodule_that_imports_from_its_importing_package_is_a_cycle(tmp_path):
  # pkg/__init__ imports pkg.base, and pkg.base reads a sibling through the package: a circle
  # that works only because Python finds the sibling while pkg is half initialized.
  files = {'__init__.py': 'from pkg.base import Base\n', 'util.py': 'X = 1\n',
           'base.py': 'from pkg import util\n'}
  for name, text in files.items():
    (tmp_path / 'pkg' / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / 'pkg' / name).write_text(text)
  assert find_cycles(import_graph(tmp_path / 'pkg')) == [['pkg', 'pkg.base', 'pkg']]
  (tmp_path / 'pkg' / 'base.py').write_text('import pkg.util as util\n')
  assert find_cycles(import_graph(tmp_path / 'pkg')) == []


def test_find_cycles_reports_each_cycle_once():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a', 'e'}, 'e': {'d'}, 'f': set()}
  assert sorted(find_cycles(graph)) == [['a', 'b', 'c', 'a'], ['d', 'e', 'd']]
  assert find_cycles({'a': {'b'}, 'b': set()}) == []


def test_core_modules_import_nothing_of_mlmjax():
  graph = import_graph()
  for name in CORE:
    assert not graph[f'{PACKAGE}.{name}'], f'{PACKAGE}.{name} imports {sorted(graph[f"{PACKAGE}.{name}"])}'


def test_imports_form_a_tree():
  cycles = find_cycles(import_graph())
  assert not cycles, 'import cycles (DESIGN.md: imports form a tree):\n' + '\n'.join(
      ' -> '.join(c) for c in cycles)
