"""Tests for mlmjax/pydocs.py: the embedded corpus and the embedded fine-tuning tasks."""

import collections
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.optimize
import scipy.special

from mlmjax import corpus
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
# Embedded fine-tuning tasks

@pytest.fixture(scope='module')
def embedded_tasks():
  return {name: pydocs_lib.task_examples(name) for name in pydocs_lib.EMBEDDED_TASKS}


def _tasks_digest(tasks):
  return hashlib.sha256(json.dumps(tasks, sort_keys=True).encode()).hexdigest()


def test_pydoc_library_holds_balanced_labelled_docstrings(embedded_tasks):
  import asyncio  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  import unittest  # pylint: disable=g-import-not-at-top
  import xml.etree.ElementTree  # pylint: disable=g-import-not-at-top
  rows = embedded_tasks['pydoc_library']
  assert all(set(r) == {'id', 'text', 'label'} for r in rows)
  counts = collections.Counter(r['label'] for r in rows)
  assert set(counts) == set(pydocs_lib.PYDOC_LIBRARIES)
  assert 100 <= min(counts.values()) and max(counts.values()) <= 400
  ids = [r['id'] for r in rows]
  assert ids == sorted(ids) and len(set(ids)) == len(ids)
  assert len({r['text'] for r in rows}) == len(rows)
  assert min(len(r['text']) for r in rows) >= 40
  # The label is the package the object is defined in, so it is the first part of its id.
  assert all(r['id'].partition('.')[0] == r['label'] for r in rows)
  by_id = {r['id']: r for r in rows}
  for obj, ident in ((logging.Logger.warning, 'logging.Logger.warning'),
                     (asyncio.gather, 'asyncio.tasks.gather'),  # re-exported by asyncio
                     (unittest.TestCase.assertEqual, 'unittest.case.TestCase.assertEqual'),
                     (xml.etree.ElementTree.fromstring, 'xml.etree.ElementTree.XML')):
    assert by_id[ident]['text'] == corpus.clean_document(inspect.cleandoc(obj.__doc__)), ident


def test_pydoc_signature_pairs_docstring_summaries_with_signatures(embedded_tasks):
  import collections as coll  # pylint: disable=g-import-not-at-top
  rows = embedded_tasks['pydoc_signature']
  assert len(rows) >= 2000
  assert all(set(r) == {'id', 'query', 'document'} for r in rows)
  ids = [r['id'] for r in rows]
  assert ids == sorted(ids) and len(set(ids)) == len(ids)
  assert len({r['query'] for r in rows}) == len({r['document'] for r in rows}) == len(rows)
  assert min(len(r['query']) for r in rows) >= 20
  assert all(re.fullmatch(r'[A-Za-z_][\w.]*\(.+\)', r['document']) for r in rows)
  by_id = {r['id']: r for r in rows}
  assert not any(' at 0x' in r['document'] for r in rows)
  # self and cls go, from methods in classes and from bound methods bound to module names alike.
  assert not any(re.search(r'\.\w+\(self\b', r['document']) for r in rows)
  assert by_id['random.Random.randint']['document'] == 'Random.randint(a, b)'
  assert by_id['multiprocessing.context.BaseContext.Pipe']['document'] == 'BaseContext.Pipe(duplex=True)'
  assert by_id['builtins.dict.fromkeys']['document'] == 'dict.fromkeys(iterable, value=None, /)'
  assert by_id['json.dumps'] == {
      'id': 'json.dumps', 'query': 'Serialize ``obj`` to a JSON formatted ``str``.',
      'document': 'dumps' + str(inspect.signature(json.dumps))}
  summary = ' '.join(inspect.cleandoc(coll.Counter.most_common.__doc__).split('\n\n')[0].split())
  assert by_id['collections.Counter.most_common'] == {
      'id': 'collections.Counter.most_common', 'query': summary,
      'document': 'Counter.most_common(n=None)'}


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
  assert pydocs_lib._first_paragraph('put(item) -> None\nPut an item\nin the box.\n\nMore.',
                                     'put') == 'Put an item in the box.'


def test_embedded_tasks_are_the_same_in_every_process(embedded_tasks, monkeypatch):
  import logging  # pylint: disable=g-import-not-at-top
  code = ('import hashlib, json; from mlmjax import pydocs; '
          'print(hashlib.sha256(json.dumps(pydocs._walk_tasks(), sort_keys=True).encode())'
          '.hexdigest())')
  assert _print_in_fresh_process(code, hash_seed='4321') == _tasks_digest(embedded_tasks)

  def shout(self, msg):
    """Log msg very loudly: a method some library attached to logging.Logger, not the stdlib's."""

  monkeypatch.setattr(logging.Logger, 'shout', shout, raising=False)
  assert _tasks_digest(pydocs_lib._embedded_tasks.__wrapped__()) == _tasks_digest(embedded_tasks)


def test_embedded_tasks_are_cached_copies_and_names_are_checked(embedded_tasks):
  start = time.perf_counter()
  rows = pydocs_lib.task_examples('pydoc_library')
  assert time.perf_counter() - start < 0.5  # the walk ran once, for the fixture
  assert rows == embedded_tasks['pydoc_library']
  rows[0]['label'] = 'changed'
  assert pydocs_lib.task_examples('pydoc_library')[0] == embedded_tasks['pydoc_library'][0]
  with pytest.raises(ValueError, match='embedded:nope.*pydoc_library, pydoc_signature'):
    pydocs_lib.task_examples('nope')
