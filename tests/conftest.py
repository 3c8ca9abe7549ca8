"""Shared fixtures: quiet TensorFlow, the optional ../shared/data folder."""

import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture
def shared_data():
  """Returns ../shared/data, or skips when this clone has none."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'{SHARED_DATA} is absent (a fresh clone has no ../shared)')
  return SHARED_DATA
