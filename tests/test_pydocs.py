"""Tests for mlmjax/pydocs.py: the embedded corpus and the stdlib API walk (tasks: test_task_data.py)."""

import collections
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize
import scipy.special

from mlmjax import pydocs as pydocs_lib  # `pydocs` is the conftest fixture: the corpus itself

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest(docs):
  return hashlib.sha256('\x00'.join(docs).encode()).hexdigest()


def _print_in_fresh_process(code: str, hash_seed: str) -> str:
  """Returns what `code` prints in a new interpreter with another string-hash seed."""
  env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=120, check=True)
  return out.stdout.strip()


# ---------------------------------------------------------------------------------------------
# The embedded corpus (the session's `pydocs` fixture is in conftest.py)

@pytest.mark.slow
def test_pydocs_is_deterministic_in_and_across_processes(pydocs):
  assert pydocs_lib.documents() == pydocs
  # A fresh interpreter with another string-hash seed and nothing imported beforehand.
  code = ('import hashlib; from mlmjax import pydocs; '
          "print(hashlib.sha256('\\x00'.join(pydocs._walk_pydocs()).encode()).hexdigest())")
  assert _print_in_fresh_process(code, hash_seed='12345') == _digest(pydocs)


def test_pydocs_ignores_what_the_caller_patched_into_the_stdlib(pydocs, monkeypatch):
  import inspect
  import logging

  def shout(self):
    """A method some library attached to logging.Logger: not part of the embedded corpus."""

  def getsourcefile(obj):
    """A replacement some library installed over inspect.getsourcefile."""

  monkeypatch.setattr(logging.Logger, 'shout', shout, raising=False)
  monkeypatch.setattr(inspect, 'getsourcefile', getsourcefile)
  assert pydocs_lib.documents() == pydocs


def test_pydocs_is_several_mb_of_english(pydocs):
  text = '\n'.join(pydocs)
  assert len(text) > 4_000_000
  assert len(pydocs) == len(set(pydocs))
  non_space = len(re.sub(r'\s+', '', text))
  letters = len(re.sub(r'[^A-Za-z]+', '', text))
  assert letters / non_space > 0.6  # prose with some code and math, not symbol soup
  counts = collections.Counter(re.findall(r'[a-z]+', text.lower()))
  top = [w for w, _ in counts.most_common(20)]
  assert top[0] == 'the'
  assert {'of', 'and', 'to', 'is', 'a'} <= set(top)


def test_pydocs_holds_topics_stdlib_numpy_and_scipy_docstrings(pydocs):
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top
  docs = set(pydocs)
  assert inspect.cleandoc(pydoc_data.topics.topics['assert']) in docs
  for obj in (json.dumps, collections.OrderedDict.move_to_end, np.linalg.solve,
              np.ndarray.reshape, scipy.optimize.brentq, scipy.special.gamma):
    assert '# may vary' not in obj.__doc__  # such lines are dropped: the rest would differ
    assert inspect.cleandoc(obj.__doc__) in docs, obj


def test_pydocs_skips_modules_with_side_effects(pydocs):
  del pydocs  # built: nothing it walked may have opened a browser or printed the Zen
  assert 'antigravity' not in sys.modules and 'this' not in sys.modules


# ---------------------------------------------------------------------------------------------
# The stdlib API walk (the embedded fine-tuning tasks built from it: test_task_data.py)

@pytest.fixture(scope='module')
def api_entries():
  return pydocs_lib.api_entries()


def _entries_digest(entries):
  return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def test_api_entries_hold_raw_docstrings_and_signatures(api_entries):
  assert len(api_entries) > 3000
  assert all(set(e) == {'id', 'module', 'qualname', 'doc', 'signature'} for e in api_entries)
  assert all(e['doc'] and e['id'] == f'{e["module"]}.{e["qualname"]}' for e in api_entries)
  by_id = {e['id']: e for e in api_entries}
  assert by_id['json.dumps']['doc'] == inspect.cleandoc(json.dumps.__doc__)  # stabilized, not cleaned
  assert by_id['json.dumps']['signature'] == 'dumps' + str(inspect.signature(json.dumps))
  assert by_id['logging.Logger']['signature'] == 'Logger(name, level=0)'
  assert by_id['random.Random.randint']['signature'] == 'Random.randint(a, b)'  # no self
  assert by_id['asyncio.tasks.gather']['module'] == 'asyncio.tasks'  # re-exported by asyncio


def test_signature_text_drops_self_annotations_and_unstable_defaults():
  sentinel = object()

  class Box:
    def put(self, item: int, where=sentinel, tags=frozenset({'a', 'b'}), *, mode='w') -> None:
      """Put an item in the box."""

    @staticmethod
    def make(size, fill=0):
      """Make a box."""

    @classmethod
    def empty(cls, *args, **kwargs):
      """Make an empty box."""

  def entry(name):
    return pydocs_lib._ApiObject(f'm.Box.{name}', 'm', f'Box.{name}', vars(Box)[name], True)

  assert (pydocs_lib._signature_text(entry('put'))
          == "Box.put(item, where=..., tags=..., *, mode='w')")
  assert pydocs_lib._signature_text(entry('make')) == 'Box.make(size, fill=0)'
  assert pydocs_lib._signature_text(entry('empty')) is None  # (*args, **kwargs) says nothing
  assert pydocs_lib._signature_text(pydocs_lib._ApiObject('m.Box', 'm', 'Box', Box, False)) is None


def test_api_entries_are_the_same_in_every_process(api_entries, monkeypatch):
  import logging  # pylint: disable=g-import-not-at-top
  code = ('import hashlib, json; from mlmjax import pydocs; '
          'print(hashlib.sha256(json.dumps(pydocs._walk_api(), sort_keys=True).encode())'
          '.hexdigest())')
  assert _print_in_fresh_process(code, hash_seed='4321') == _entries_digest(api_entries)

  def shout(self, msg):
    """Log msg very loudly: a method some library attached to logging.Logger, not the stdlib's."""

  monkeypatch.setattr(logging.Logger, 'shout', shout, raising=False)
  assert _entries_digest(pydocs_lib.api_entries()) == _entries_digest(api_entries)
