"""Two processes on localhost train through jax.distributed and match a one-process 4-device run."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mlmjax import input_pipeline, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 5

# Each child builds the shrunk tiny config of conftest.make_tiny_config, edited by argv[1], trains
# with train.run, and prints what it saw. The token cache is built by the parent beforehand.
_CHILD = textwrap.dedent('''
    import hashlib, json, sys
    from configs import pretrain
    from mlmjax import input_pipeline, train

    args = json.loads(sys.argv[1])
    c = pretrain.get_config('tiny_classic')
    for key, value in args['config'].items():
      section, name = key.split('.')
      c[section][name] = tuple(tuple(v) for v in value) if key == 'mesh.shape' else value
    summary = train.run(c, args['workdir'])
    import jax
    data = input_pipeline.prepare_data(c, args['workdir'], log=lambda s: None)
    local = next(input_pipeline.train_batches(
        data.cache.train_rows, global_batch=c.train.batch_size, seed=c.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), prefetch=0))
    print('RESULT ' + json.dumps({
        'process_index': jax.process_index(), 'process_count': jax.process_count(),
        'devices': jax.device_count(), 'local_devices': jax.local_device_count(),
        'distributed': jax.distributed.is_initialized(), 'step': summary['step'],
        'first_local_batch': local.tolist()}), flush=True)
''')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  # Lower XLA optimization halves the compiles that dominate this test (same flags on both sides).
  flags = (f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 '
           '--xla_llvm_disable_expensive_passes=true')
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  return dict(env, XLA_FLAGS=flags, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
              TF_CPP_MIN_LOG_LEVEL='2', TF_ENABLE_ONEDNN_OPTS='0')


def _launch(script, overrides: dict, workdir, devices: int, log_dir) -> tuple:
  """Starts one child; its output goes to files, so that polling it can never block on a pipe."""
  arg = json.dumps({'config': overrides, 'workdir': str(workdir)})
  tag = f'{pathlib.Path(workdir).name}-{overrides.get("distributed.process_id", 0)}'
  out, err = pathlib.Path(log_dir) / f'{tag}.out', pathlib.Path(log_dir) / f'{tag}.err'
  with open(out, 'w') as fo, open(err, 'w') as fe:
    proc = subprocess.Popen([sys.executable, str(script), arg], cwd=REPO, env=_env(devices),
                            stdout=fo, stderr=fe, text=True)
  return proc, out, err


def _finish(children: list, timeout: float) -> list[dict]:
  """Returns each child's RESULT; kills all of them as soon as one fails or the time is up."""
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p, _, _ in children):
    failed = [c for c in children if c[0].returncode not in (None, 0)]
    if failed or time.monotonic() > deadline:
      for p, _, _ in children:
        if p.poll() is None:
          p.kill()
          p.wait()
      why = f'rc {failed[0][0].returncode}' if failed else f'hung past {timeout} s'
      tails = [err.read_text()[-2000:] for _, _, err in (failed or children)]
      pytest.fail(f'multi-process run failed ({why}); stderr tails: {tails}')
    time.sleep(0.5)
  results = []
  for p, out, err in children:
    assert p.returncode == 0, f'rc {p.returncode}: {err.read_text()[-3000:]}'
    line = [ln for ln in out.read_text().splitlines() if ln.startswith('RESULT ')][-1]
    results.append(json.loads(line[len('RESULT '):]))
  return results


def _losses(workdir) -> dict[int, float]:
  records = [json.loads(ln) for ln in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  steps = [r['step'] for r in records if 'train/loss' in r]
  assert len(steps) == len(set(steps)), f'duplicate metrics records (process 1 wrote too?): {steps}'
  return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


@pytest.fixture(scope='module')
def runs(make_tiny_config, tmp_path_factory):
  """Returns (reference, two-process) workdirs and child results after training STEPS steps."""
  base = make_tiny_config()
  root = tmp_path_factory.mktemp('multihost')
  # Build the tokenizer and token cache once here, so that the children only load them.
  (root / 'prepare').mkdir()
  input_pipeline.prepare_data(base, root / 'prepare', log=lambda s: None)
  script = root / 'child.py'
  script.write_text(_CHILD)
  overrides = {'data.corpus': base.data.corpus, 'data.cache_dir': base.data.cache_dir,
               'tokenizer.vocab_size': base.tokenizer.vocab_size,
               'train.seq_len': base.train.seq_len, 'train.batch_size': base.train.batch_size,
               'train.num_steps': STEPS, 'train.log_every_steps': 1,
               'optim.warmup_steps': base.optim.warmup_steps, 'eval.every_steps': STEPS,
               'eval.batch_size': base.eval.batch_size, 'eval.num_batches': base.eval.num_batches,
               'ckpt.every_steps': STEPS, 'mesh.shape': [['data', -1], ['fsdp', 1], ['tensor', 1]]}
  ref_dir, multi_dir = root / 'one_process', root / 'two_processes'
  port = _free_port()
  # The reference and the two processes run at once: each is mostly single-threaded compilation.
  procs = [_launch(script, overrides, ref_dir, 4, root)] + [
      _launch(script, {**overrides, 'distributed.coordinator_address': f'127.0.0.1:{port}',
                       'distributed.num_processes': 2, 'distributed.process_id': i,
                       'distributed.initialization_timeout': 60}, multi_dir, 2, root)
      for i in range(2)]
  ref, *multi = _finish(procs, timeout=400)
  return base, ref_dir, ref, multi_dir, multi


@pytest.mark.slow
def test_two_processes_form_one_four_device_run(runs):
  _, _, ref, _, multi = runs
  assert (ref['process_count'], ref['devices'], ref['distributed']) == (1, 4, False)
  assert sorted(r['process_index'] for r in multi) == [0, 1]
  for r in multi:
    assert (r['process_count'], r['devices'], r['local_devices'], r['distributed']) == (2, 4, 2, True)
    assert r['step'] == STEPS


@pytest.mark.slow
def test_losses_match_the_single_process_run(runs):
  _, ref_dir, _, multi_dir, _ = runs
  ref, multi = _losses(ref_dir), _losses(multi_dir)
  assert sorted(ref) == sorted(multi) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([multi[s] for s in sorted(multi)], [ref[s] for s in sorted(ref)],
                             rtol=1e-5)
  assert np.isfinite(list(ref.values())).all()


@pytest.mark.slow
def test_evaluation_and_checkpoints_are_collective(runs):
  _, ref_dir, _, multi_dir, _ = runs
  ref_summary = json.loads((ref_dir / 'summary.json').read_text())
  multi_summary = json.loads((multi_dir / 'summary.json').read_text())
  np.testing.assert_allclose(multi_summary['eval/loss'], ref_summary['eval/loss'], rtol=1e-5)
  # Both processes wrote their shards into one orbax checkpoint, committed at the last step.
  steps = sorted(int(p.name) for p in (multi_dir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [STEPS]
  for item in ('params', 'opt_state'):
    state = multi_dir / 'checkpoints' / str(STEPS) / item
    assert (state / 'ocdbt.process_0').is_dir() and (state / 'ocdbt.process_1').is_dir()


@pytest.mark.slow
def test_processes_read_disjoint_halves_of_the_global_batch(runs):
  base, _, _, multi_dir, multi = runs
  by_index = {r['process_index']: np.asarray(r['first_local_batch'], np.int32) for r in multi}
  half = base.train.batch_size // 2
  assert by_index[0].shape == by_index[1].shape == (half, base.train.seq_len)
  cache = input_pipeline.prepare_data(base, multi_dir, log=lambda s: None).cache
  expected = input_pipeline.global_batch_rows(cache.train_rows, 0, global_batch=base.train.batch_size,
                                              seed=base.seed)
  # Process 0 reads the first half of step 0's global batch, process 1 the second.
  np.testing.assert_array_equal(np.concatenate([by_index[0], by_index[1]]), expected)


def test_single_host_with_nothing_configured_stays_single_process(make_tiny_config, monkeypatch):
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(var, raising=False)
  assert sharding.maybe_initialize_distributed(make_tiny_config()) is False


def test_bad_distributed_settings_name_the_key(make_tiny_config, monkeypatch):
  monkeypatch.setenv('JAX_PROCESS_ID', 'first')
  with pytest.raises(ValueError, match='distributed'):
    sharding.maybe_initialize_distributed(make_tiny_config())
