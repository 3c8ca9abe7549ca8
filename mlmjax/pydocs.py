"""The embedded corpus and fine-tuning tasks: Python's own documentation, walked offline.

`data.corpus='pydocs'` (sources.read_raw_documents reads `documents`) is the embedded corpus every
installation already has (no download): the text of `pydoc_data.topics` (Python's language
reference, one document per topic), then the docstrings of the standard library, then those of the
installed numpy and scipy, one document per docstring. Modules come from a fixed, sorted walk: the
top-level names of `sys.stdlib_module_names` (a constant of the interpreter), then `numpy` and
`scipy`, each with its public submodules in sorted order; modules with side effects (`antigravity`,
`this`, `tkinter`, `turtle`, `idlelib`, `readline`, ...), test packages, `distutils` (setuptools
replaces it), `lib2to3` (writes grammar caches), `numpy.f2py`, and scipy's machine-generated
wrapper signatures (`blas`, `lapack`, `cython_*`) are skipped, as is any module that fails to
import. Each module contributes its docstring and those of the classes, functions, methods and
properties it defines (sorted by name, each object once, exact duplicate texts once). Docstrings
stay reStructuredText / numpydoc; only output lines marked `# may vary` (random doctest output that
scipy generates at import) are dropped and set literals in generated deprecation notes are sorted,
so the corpus is the same in every process. With Python 3.11.7, numpy 2.4.6 and scipy 1.17.1 it is
9.75 M characters in 9,785 documents (9.2 M in 8,666 after cleaning with min_chars=40) of mostly
English text, built in 3-5 s on 2 CPU cores (cleaning adds 1-2 s). Its `corpus.corpus_key` holds
`corpus.CORPUS_BUILDER_VERSION` and the Python, numpy and scipy versions.

The same walk (stdlib only) gives `api_entries`: each public class, function and method with its
raw docstring and signature, from which task_data builds two offline fine-tuning tasks
(task_data.path='embedded:NAME'): 'pydoc_library' (which of 9 stdlib packages a docstring comes
from) and 'pydoc_signature' (retrieve a function's signature from its docstring's first paragraph).

Both walks run in a fresh interpreter. This module imports nothing of mlmjax: corpus reads
`documents` and cleans them, task_data reads `api_entries` and cleans them.
"""

import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import types
import warnings
from collections.abc import Iterator
from typing import Any


# ---------------------------------------------------------------------------------------------
# The embedded corpus

# Never imported: side effects (a browser, prints, a display, terminal state, setuptools' distutils
# shim, lib2to3's grammar-cache writes), tests, build tooling.
_SKIP_NAMES = frozenset({
    'antigravity', 'this', 'idlelib', 'tkinter', 'turtle', 'turtledemo', 'readline',
    'rlcompleter', 'distutils', 'lib2to3', 'test', 'tests', 'conftest', 'setup', 'f2py',
    'xxsubtype', 'xxlimited', 'xxlimited_35'})
# scipy's wrapper docstrings are generated signatures, not prose.
_SKIP_MODULES = frozenset({'scipy.linalg.blas', 'scipy.linalg.lapack', 'scipy.fftpack.convolve'})
_NO_SUBMODULES = frozenset({'encodings'})  # codec modules: one boilerplate line each
_THIRD_PARTY = ('numpy', 'scipy')
_MAY_VARY = re.compile(r'^[^\n]*# may vary[ \t]*$\n?', re.MULTILINE)
_SET_LITERAL = re.compile(r"``\{('[^'{}]*'(?:, '[^'{}]*')+)\}``")


def _skipped(name: str) -> bool:
  parts = name.split('.')
  return (name in _SKIP_MODULES or any(p in _SKIP_NAMES for p in parts)
          or any(p.startswith(('_', 'cython_')) for p in parts))


def _import_tree(root: str) -> list[types.ModuleType]:
  """Returns `root` and its public submodules, depth-first in sorted order; failures skipped."""
  try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
      module = importlib.import_module(root)
  except (Exception, SystemExit):  # pylint: disable=broad-except
    return []  # not on this platform (e.g. winreg) or missing an optional library
  modules = [module]
  path = getattr(module, '__path__', None)
  if path is not None and root not in _NO_SUBMODULES:
    for name in sorted(info.name for info in pkgutil.iter_modules(path)):
      if not _skipped(f'{root}.{name}'):
        modules.extend(_import_tree(f'{root}.{name}'))
  return modules


def _owned(obj: Any, allowed: frozenset[str]) -> bool:
  """Returns whether `obj` comes from the stdlib, numpy or scipy (or says nothing)."""
  home = getattr(obj, '__module__', None)
  if home is None:  # e.g. scipy.special ufuncs
    return True
  return isinstance(home, str) and home.partition('.')[0] in allowed


def _own_doc(obj: Any) -> str | None:
  """Returns the docstring written for `obj` itself (not its type's), or None."""
  obj = getattr(obj, '__func__', obj)  # classmethod / staticmethod
  doc = getattr(obj, '__doc__', None)
  if not isinstance(doc, str):
    return None
  if not isinstance(obj, type) and not inspect.isroutine(obj):
    if doc is getattr(type(obj), '__doc__', None):  # e.g. a float constant: float's docstring
      return None
  return doc


def _stable(doc: str) -> str:
  """Returns the cleandoc'ed docstring without the parts that change between processes."""
  doc = _MAY_VARY.sub('', inspect.cleandoc(doc))
  return _SET_LITERAL.sub(lambda m: '``{' + ', '.join(sorted(m[1].split(', '))) + '}``', doc)


def _object_docs(obj: Any, seen: set[int], allowed: frozenset[str]) -> Iterator[str]:
  """Yields the docstrings of `obj` and, for a class, of its own public members (each object once)."""
  target = getattr(obj, '__func__', obj)
  if id(target) in seen:
    return
  seen.add(id(target))
  doc = _own_doc(obj)
  if doc:
    yield doc
  if isinstance(obj, type):
    members = vars(obj)
    for name in sorted(members):
      # Methods other libraries attach to stdlib classes (e.g. logging.Logger) are not ours.
      if not name.startswith('_') and _owned(getattr(members[name], '__func__', members[name]),
                                             allowed):
        yield from _object_docs(members[name], seen, allowed)


def documents() -> list[str]:
  """Returns the embedded corpus: Python topics and stdlib/numpy/scipy docstrings, raw.

  Built in a fresh interpreter, so that nothing the calling process imported or patched (torch,
  transformers, pytest hooks) changes a docstring, and the thousands of modules it imports do not
  stay loaded in the caller.
  """
  return _in_fresh_interpreter('_walk_pydocs', 'the embedded pydocs corpus')


def _in_fresh_interpreter(function: str, what: str) -> Any:
  """Returns the JSON result of `pydocs.<function>()` run in a new Python process."""
  package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (package_parent, os.environ.get('PYTHONPATH', '')) if p))
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'out.json')
    code = ('import json, sys; from mlmjax import pydocs; '
            f'json.dump(pydocs.{function}(), open(sys.argv[1], "w", encoding="utf-8"))')
    proc = subprocess.run([sys.executable, '-c', code, out], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
      tail = (proc.stderr.strip().splitlines() or ['(no output)'])[-1]
      raise RuntimeError(f'building {what} failed: {tail}')
    with open(out, encoding='utf-8') as f:
      return json.load(f)


def _walk_pydocs() -> list[str]:
  """Returns the embedded corpus walked in this process (documents runs it in a fresh one)."""
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top
  topics = pydoc_data.topics.topics
  docs = [topics[key] for key in sorted(topics)]
  roots = [n for n in sorted(sys.stdlib_module_names) if not _skipped(n)] + list(_THIRD_PARTY)
  allowed = frozenset(sys.stdlib_module_names) | frozenset(_THIRD_PARTY)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # deprecated modules warn on import
    # Import everything first, so that what the walk sees does not depend on import order.
    modules = [m for root in roots for m in _import_tree(root)]
    seen: set[int] = set()
    for module in modules:
      if id(module) in seen:
        continue
      seen.add(id(module))
      if isinstance(module.__doc__, str):
        docs.append(module.__doc__)
      namespace = vars(module)
      for name in sorted(namespace):
        # Hooks that other code rebinds (sys.excepthook, threading.excepthook, ...) keep their
        # originals as `__name__`: take those, so a caller's pytest or debugger changes nothing.
        original = namespace.get(f'__{name}__')
        obj = original if callable(original) else namespace[name]
        if name.startswith('_') or isinstance(obj, types.ModuleType):
          continue
        with contextlib.suppress(Exception):  # an exotic object whose attributes raise
          if _owned(obj, allowed):
            docs.extend(_object_docs(obj, seen, allowed))
  texts = (_stable(d) for d in docs)
  return list(dict.fromkeys(t for t in texts if t.strip()))


# ---------------------------------------------------------------------------------------------
# The public API of the stdlib, for the embedded fine-tuning tasks (task_data.path='embedded:NAME')

_MAX_DEFAULT_CHARS = 30  # longer default values are written '...' in a signature
_ADDRESS = re.compile(r' at 0x[0-9a-fA-F]+')


def api_entries() -> list[dict]:
  """Returns the stdlib's public classes, functions and methods that have a docstring, in walk order.

  Each is {'id': 'module.qualname', 'module': the defining public module, 'qualname': 'Class.method',
  'doc': the stabilized (not cleaned) docstring, 'signature': 'qualname(parameters)' or None}.
  Built in a fresh interpreter (as `documents` is), so the entries are the same in every process.
  """
  return _in_fresh_interpreter('_walk_api', 'the embedded pydoc tasks')


def _walk_api() -> list[dict]:
  """Returns api_entries walked in this process (api_entries runs it in a fresh one)."""
  roots = [n for n in sorted(sys.stdlib_module_names) if not _skipped(n)]
  allowed = frozenset(sys.stdlib_module_names)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    modules = [m for root in roots for m in _import_tree(root)]
    entries = list(_api_objects(modules, allowed))
  found = []
  for entry in entries:
    doc = _own_doc(entry.obj)
    doc = _stable(doc) if doc else ''
    if doc:  # no task uses an object without a docstring
      found.append({'id': entry.ident, 'module': entry.module, 'qualname': entry.qualname,
                    'doc': doc, 'signature': _signature_text(entry)})
  return found


@dataclasses.dataclass
class _ApiObject:
  """A public class, function or method of the stdlib and where it is defined."""
  ident: str  # 'module.qualname'
  module: str  # the defining public module (the importing one for objects of private modules)
  qualname: str  # 'Class.method', 'function', 'Class'
  obj: Any
  method: bool  # found in a class namespace (its first parameter is self/cls unless static)


def _api_objects(modules: list[types.ModuleType],
                 allowed: frozenset[str]) -> Iterator[_ApiObject]:
  """Yields each public class, function and method of `modules` once, in walk order."""
  seen: set[int] = set()
  done: set[int] = set()
  for module in modules:
    if id(module) in done:
      continue
    done.add(id(module))
    namespace = vars(module)
    for name in sorted(namespace):
      original = namespace.get(f'__{name}__')  # sys.excepthook and the like: see _walk_pydocs
      obj = original if callable(original) else namespace[name]
      if name.startswith('_') or not (isinstance(obj, type) or inspect.isroutine(obj)):
        continue
      with contextlib.suppress(Exception):  # an exotic object whose attributes raise
        if _owned(obj, allowed):
          home = getattr(obj, '__module__', None)
          if not isinstance(home, str) or any(p.startswith('_') for p in home.split('.')):
            home = module.__name__  # e.g. asyncio.Future comes from _asyncio
          qualname = getattr(obj, '__qualname__', None)
          if not isinstance(qualname, str) or '<' in qualname:
            qualname = name
          yield from _members(obj, home, qualname, False, seen, allowed)


def _members(obj: Any, home: str, qualname: str, method: bool, seen: set[int],
             allowed: frozenset[str]) -> Iterator[_ApiObject]:
  """Yields `obj` and, for a class, its own public methods and nested classes (each object once)."""
  target = getattr(obj, '__func__', obj)
  if id(target) in seen:
    return
  seen.add(id(target))
  yield _ApiObject(f'{home}.{qualname}', home, qualname, obj, method)
  if isinstance(obj, type):
    members = vars(obj)
    for name in sorted(members):
      member = members[name]
      inner = getattr(member, '__func__', member)
      if (not name.startswith('_') and (isinstance(inner, type) or inspect.isroutine(inner))
          and _owned(inner, allowed)):
        yield from _members(member, home, f'{qualname}.{name}', not isinstance(inner, type),
                            seen, allowed)


class _Elided:
  """A default value written as '...' (its repr is long, an address, or hash-ordered)."""

  def __repr__(self) -> str:
    return '...'


def _signature_text(entry: _ApiObject) -> str | None:
  """Returns 'qualname(parameters)' without self/cls or annotations; None when trivial or absent."""
  obj = entry.obj
  static = isinstance(obj, (classmethod, staticmethod))
  try:  # a bound method (random.randint) has no self in its signature; a class's raw function has
    sig = inspect.signature(obj.__func__ if static else obj)
  except Exception:  # pylint: disable=broad-except  # no signature, or a text signature that fails
    return None
  params = list(sig.parameters.values())
  if entry.method and not isinstance(obj, staticmethod) and not inspect.ismethod(obj) and params:
    params = params[1:]  # self or cls
  kinds = {p.kind for p in params}
  if not params or kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
    return None
  clean = []
  for p in params:
    p = p.replace(annotation=inspect.Parameter.empty)
    if p.default is not inspect.Parameter.empty:
      text = repr(p.default)
      if (len(text) > _MAX_DEFAULT_CHARS or text.startswith('<') or _ADDRESS.search(text)
          or isinstance(p.default, (set, frozenset, dict))):
        p = p.replace(default=_Elided())
    clean.append(p)
  return entry.qualname + str(inspect.Signature(clean))
