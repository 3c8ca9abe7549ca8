"""Shared fixtures: quiet TensorFlow, faster XLA compiles, the optional ../shared/data folder."""

import os
import pathlib
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
# The suite is mostly XLA compiles of tiny models: less optimization compiles faster (also in the
# subprocesses and notebook kernels, which inherit it). A user's own XLA_FLAGS win.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0 '
                      '--xla_llvm_disable_expensive_passes=true')
# One persistent XLA compilation cache for the tests' processes (both xdist workers and every
# subprocess): most tests compile the same tiny shapes, and every run jits its own step. Entries
# are keyed by the computation, the versions and the flags; the least recently used go past 256 MB.
# Only compilations of a second or more are stored (JAX's default): writing every small one costs
# more than it saves.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'mlmjax-tests-xla-{os.getuid()}'))
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(256 << 20))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# MFU's denominator without timing matmuls in every process (tests/test_flops.py measures it).
os.environ.setdefault('MLMJAX_PEAK_FLOPS', '1e11')

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture
def shared_data():
  """Returns ../shared/data, or skips when this clone has none."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'{SHARED_DATA} is absent (a fresh clone has no ../shared)')
  return SHARED_DATA


@pytest.fixture(scope='session')
def topics_corpus(tmp_path_factory):
  """Returns a .txt corpus of Python's help topics (~460 KB that every Python ships)."""
  from pydoc_data.topics import topics
  path = tmp_path_factory.mktemp('corpus') / 'topics.txt'
  path.write_text('\n\n'.join(topics[k] for k in sorted(topics)), encoding='utf-8')
  return path


@pytest.fixture(scope='session')
def pydocs():
  """Returns the embedded pydocs corpus (raw documents), built once per session (~5 s)."""
  from mlmjax import pydocs as pydocs_lib
  return pydocs_lib.documents()


@pytest.fixture(scope='session')
def topics_tokenizer(tmp_path_factory):
  """Returns a 1,000-piece unigram tokenizer trained on Python's help topics."""
  from pydoc_data.topics import topics
  from mlmjax import tokenizer
  path = tmp_path_factory.mktemp('topics_tokenizer') / 'topics.model'
  return tokenizer.train_tokenizer([topics[k] for k in sorted(topics)], path, vocab_size=1000)


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory):
  """Returns one token/tokenizer cache directory shared by the whole test session."""
  return tmp_path_factory.mktemp('mlmjax_cache')


@pytest.fixture(scope='session')
def make_tiny_config(topics_corpus, cache_dir):
  """Returns a function building the tiny pretraining config shrunk to run a few steps in seconds."""

  def make():
    from configs import pretrain
    c = pretrain.get_config('tiny_classic')
    c.data.corpus = str(topics_corpus)
    c.data.cache_dir = str(cache_dir)
    c.tokenizer.vocab_size = 1000
    c.train.seq_len = 64
    c.train.batch_size = 8
    c.train.num_steps = 8
    c.train.log_every_steps = 1
    c.optim.warmup_steps = 2
    c.eval.every_steps = 4
    c.eval.batch_size = 8
    c.eval.num_batches = 2
    c.ckpt.every_steps = 4
    # The recipe these tests were written against (tiny's own is docs/tiny.md's).
    c.masking.rate, c.model.tie_embeddings = 0.15, True
    c.optim.decay, c.optim.decay_fraction = 'linear', 0.0
    return c

  return make


@pytest.fixture
def tiny_config(make_tiny_config):
  """Returns a fresh shrunk tiny config (see make_tiny_config) that a test may edit."""
  return make_tiny_config()


@pytest.fixture(scope='session')
def tiny_task_model():
  """Returns build(task, vocab_size, seq_len, seed) -> (graphdef, params): a 1-layer, 32-wide model."""
  import jax
  from flax import nnx
  from mlmjax import model

  def build(task, vocab_size: int, seq_len: int, seed: int = 0):
    enc = model.EncoderConfig(vocab_size=vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                              intermediate_size=64, max_position=seq_len, dropout_rate=0.1)
    # Eager construction compiles every initializer on its own; one jit of the whole init is faster.
    graphdef = nnx.split(nnx.eval_shape(lambda: task.build_model(enc, nnx.Rngs(seed))),
                         nnx.Param)[0]
    params = jax.jit(lambda: nnx.split(task.build_model(enc, nnx.Rngs(seed)), nnx.Param)[1])()
    return graphdef, params

  return build
