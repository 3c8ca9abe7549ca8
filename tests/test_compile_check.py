"""Tests of mlmjax.compile_check: the train step compiled from abstract shapes, on 1 and 8 devices."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from flax import nnx

from configs import finetune, pretrain
from mlmjax import compile_check, experiment, flops, model, tasks, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _small(config):
  """Shrinks a config's step so that it compiles in seconds (no corpus, no tokenizer needed)."""
  config.tokenizer.vocab_size = 1024
  config.train.seq_len, config.train.batch_size = 32, 8
  return config


@pytest.mark.slow
def test_compile_report_on_one_device():
  c = _small(pretrain.get_config('tiny_classic'))
  c.data.corpus = '/nonexistent/never-read.txt'  # proves the corpus is not touched
  r = compile_check.compile_report(c)
  assert r['num_devices'] == 1 and r['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 1}
  assert r['params_bytes_per_device'] == 4 * r['num_params']  # float32 parameters, unsharded
  # AdamW keeps two float32 moments per parameter, plus a few scalar counters.
  assert 2 * r['params_bytes_per_device'] <= r['opt_state_bytes_per_device'] < (
      2 * r['params_bytes_per_device'] + 1024)
  mem = r['memory_per_device']
  assert mem['argument_bytes'] >= r['params_bytes_per_device'] + r['opt_state_bytes_per_device']
  assert mem['temp_bytes'] > 0 and mem['output_bytes'] > 0
  assert mem['alias_bytes'] > 0  # the donated state is reused for the new state
  assert r['analytic_flops_per_step'] == flops.train_flops_per_step(
      experiment.encoder_config(c, 1024), batch=8, seq_len=32, max_predictions=r['max_predictions'])
  # XLA counts the matmuls plus elementwise work (tests/test_flops.py bounds the share).
  assert 1.0 <= r['xla_flops_per_step'] / r['analytic_flops_per_step'] < 1.25
  text = compile_check.format_report(r)
  for label in ('parameters', 'optimizer state', 'temporaries', 'generated code', 'XLA cost analysis',
                'analytic', "mesh {'data': 1"):
    assert label in text


_SCRIPT = textwrap.dedent('''
    import json, sys
    from configs import pretrain
    from mlmjax import compile_check
    out = {}
    for name, shape in json.loads(sys.argv[1]).items():
      c = pretrain.get_config('tiny_classic')
      c.tokenizer.vocab_size, c.train.seq_len, c.train.batch_size = 1024, 32, 8
      c.mesh.shape = tuple(tuple(a) for a in shape)
      out[name] = compile_check.compile_report(c)
    print('RESULT ' + json.dumps(out))
''')

_MESHES = {'data8': [['data', 8]], 'fsdp8': [['fsdp', 8]],
           'd2f2t2': [['data', 2], ['fsdp', 2], ['tensor', 2]]}


@pytest.fixture(scope='module')
def eight_device_reports(tmp_path_factory):
  """Returns compile reports of three 8-device meshes, from a subprocess with 8 host devices."""
  script = tmp_path_factory.mktemp('compile_check') / 'eight.py'
  script.write_text(_SCRIPT)
  # Lower LLVM optimization shortens the three compiles (33 s -> 19 s for one here); XLA's memory
  # and FLOP analyses of the step came out identical with and without it.
  flags = ('--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 '
           '--xla_llvm_disable_expensive_passes=true')
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu',
             PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run([sys.executable, str(script), json.dumps(_MESHES)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')][-1][7:])


@pytest.mark.slow
def test_eight_device_meshes_report_memory_and_flops(eight_device_reports):
  for name, r in eight_device_reports.items():
    assert r['num_devices'] == 8, name
    assert r['memory_per_device']['temp_bytes'] > 0, name
    assert r['xla_flops_per_device'] > 0, name
  assert eight_device_reports['d2f2t2']['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}


@pytest.mark.slow
def test_parameter_bytes_per_device_shrink_under_fsdp(eight_device_reports):
  full = eight_device_reports['data8']['params_bytes_per_device']
  assert full == 4 * eight_device_reports['data8']['num_params']  # data parallel replicates
  # fsdp=8 splits every 'embed' dim (all but a few biases): close to an eighth.
  fsdp8 = eight_device_reports['fsdp8']
  assert fsdp8['params_bytes_per_device'] < full / 7
  assert fsdp8['opt_state_bytes_per_device'] < 2 * full / 7  # Adam's moments follow the params
  # fsdp=2 x tensor=2 splits most parameters 4 ways (vocab, heads, mlp by tensor; embed by fsdp).
  assert eight_device_reports['d2f2t2']['params_bytes_per_device'] < full / 3


@pytest.mark.slow
def test_data_parallel_splits_the_step_flops(eight_device_reports):
  r = eight_device_reports['data8']
  # Each of 8 devices runs the matmuls of one row of 8; the elementwise work that every device
  # repeats (AdamW on the replicated parameters) keeps the per-device count above an eighth.
  eighth = r['analytic_flops_per_step'] / 8
  assert eighth <= r['xla_flops_per_device'] < 1.5 * eighth


def test_topology_needs_libtpu_or_compiles_for_it():
  c = _small(pretrain.get_config('tiny_classic'))
  c.mesh.shape = (('data', -1), ('fsdp', 1), ('tensor', 1))
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    with pytest.raises(RuntimeError, match='libtpu') as e:
      compile_check.compile_report(c, topology='v5e:2x2')
    assert len(str(e.value).splitlines()) == 1
    return
  r = compile_check.compile_report(c, topology='v5e:2x2')
  assert r['device_kind'] == 'TPU v5 lite' and r['num_devices'] == 4
  assert r['memory_per_device']['temp_bytes'] > 0 and r['xla_flops_per_device'] > 0


@pytest.mark.slow
def test_modern_encoder_with_splash_attention_compiles_for_a_tpu_topology():
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): nothing to compile for a TPU")
  c = pretrain.get_config('tiny')
  c.tokenizer.vocab_size, c.train.batch_size, c.train.seq_len = 1024, 8, 256
  c.model.attention_impl = 'splash'
  # Two rows per device and both heads on one: the kernel runs per shard (XLA cannot partition it).
  c.mesh.shape = (('data', 2), ('fsdp', 1), ('tensor', 2))
  r = compile_check.compile_report(c, topology='v5e:2x2')
  assert r['device_kind'] == 'TPU v5 lite' and r['num_devices'] == 4
  assert r['memory_per_device']['temp_bytes'] > 0
  # The Pallas kernel lowered for the TPU (Mosaic), not interpreted: forward and backward kernels
  # in each of the encoder's layers.
  assert r['tpu_kernels'] >= r['model']['layers']


@pytest.mark.slow
def test_dry_run_flag_prints_the_report_of_a_fine_tuning_config(capsys):
  # The command of the issue that found the compile check ignoring the task (a fine-tuning config).
  train.main(['train', '--config', str(REPO / 'configs/finetune.py:retrieve_tiny'), '--dry_run',
              '--config.tokenizer.vocab_size=1024', '--config.train.seq_len=32',
              '--config.train.batch_size=8'])
  out = capsys.readouterr().out
  assert 'compile check:' in out and 'optimizer state' in out and 'XLA cost analysis' in out
  assert 'step (retrieve): batch 8 rows of 64 columns' in out


def test_topology_without_dry_run_is_refused():
  with pytest.raises(SystemExit, match='--topology only applies with --dry_run'):
    train.main(['train', '--config', str(REPO / 'configs/pretrain.py:tiny'), '--workdir', '/tmp/x',
                '--topology', 'v5e:2x2'])


# ---------------------------------------------------------------------------------------------
# --dry_run compiles each task's own model and step.


def _tag_file(path):
  rows = [{'id': str(i), 'doc': f'd{i % 5}', 'tokens': ['The', 'cat', 'sat', 'on', 'a', 'mat', '.'],
           'tags': ['DET', 'NOUN', 'VERB', 'ADP', 'DET', 'NOUN', '.']} for i in range(20)]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


@pytest.mark.slow
@pytest.mark.parametrize('preset,task,width', [('tiny', 'classify', 33), ('brown_pos', 'tag', 64),
                                               ('retrieve_tiny', 'retrieve', 64)])
def test_dry_run_compiles_the_tasks_model_and_step(preset, task, width, tmp_path, topics_tokenizer):
  c = _small(finetune.get_config(preset))
  c.tokenizer.path = topics_tokenizer.model_path  # sizes the vocabulary; nothing is tokenized
  if task == 'tag':
    c.task_data.path, c.task_data.tag_map = _tag_file(tmp_path / 'tags.jsonl'), ''
  r = compile_check.compile_report(c)
  assert r['task'] == task and r['row_width'] == width
  # The parameters are those of the task's model (heads included), not of the MLM model.
  t = tasks.create(c, topics_tokenizer)
  t.prepare_shapes()
  built = t.build_model(experiment.encoder_config(c, 1000), nnx.Rngs(0))
  assert r['num_params'] == model.count_params(nnx.to_pure_dict(nnx.split(built, nnx.Param)[1]))
  if task == 'tag':
    assert t.labels == ['.', 'ADP', 'DET', 'NOUN', 'VERB']
  # The memory report is that of the compiled step: its arguments are the state and the batch.
  mem = r['memory_per_device']
  state = r['params_bytes_per_device'] + r['opt_state_bytes_per_device']
  assert r['batch_bytes_per_device'] == 8 * width * 4
  assert state + r['batch_bytes_per_device'] <= mem['argument_bytes'] <= (
      state + r['batch_bytes_per_device'] + 64)  # + the step counter and the seed key
  assert mem['output_bytes'] >= state and mem['alias_bytes'] >= r['params_bytes_per_device']
  assert f'step ({task})' in compile_check.format_report(r)

