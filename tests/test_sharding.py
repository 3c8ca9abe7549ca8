"""Tests of mlmjax.sharding: mesh shapes, logical-axis rules, global batches, multi-device steps."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from mlmjax import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# mesh_shape


@pytest.mark.parametrize('shape,devices,expected', [
    ((('data', -1), ('fsdp', 1), ('tensor', 1)), 8, (8, 1, 1)),
    ((('data', 2), ('fsdp', -1), ('tensor', 2)), 8, (2, 2, 2)),
    ((('data', 1), ('fsdp', 1), ('tensor', -1)), 4, (1, 1, 4)),
    ((('data', 4), ('fsdp', 2)), 8, (4, 2)),
    ((('data', -1),), 1, (1,)),
])
def test_mesh_shape_resolves_the_minus_one_axis(shape, devices, expected):
  names, sizes = sharding.mesh_shape(shape, devices)
  assert names == tuple(n for n, _ in shape)
  assert sizes == expected


@pytest.mark.parametrize('shape,devices', [
    ((('data', -1), ('fsdp', -1)), 8),  # two -1 axes
    ((('data', 0), ('fsdp', -1)), 8),  # a zero axis
    ((('data', -2), ('fsdp', 4)), 8),  # a negative size other than -1
    ((('data', 3), ('fsdp', -1)), 8),  # 3 does not divide 8
    ((('data', 2), ('fsdp', 2)), 8),  # 4 devices asked, 8 present
    ((('data', 2), ('data', -1)), 8),  # repeated name
    ((('batch', -1),), 8),  # not a mesh axis
])
def test_mesh_shape_rejects_bad_shapes_naming_the_key(shape, devices):
  with pytest.raises(ValueError, match='mesh.shape') as e:
    sharding.mesh_shape(shape, devices)
  assert len(str(e.value).splitlines()) == 1


def test_make_mesh_on_the_local_devices():
  cfg = ml_collections.ConfigDict({'shape': (('data', -1), ('fsdp', 1), ('tensor', 1))})
  mesh = sharding.make_mesh(cfg)
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1, 'tensor': 1}
  assert sharding.data_parallel_size(mesh) == jax.device_count()
  too_many = ml_collections.ConfigDict({'shape': (('data', jax.device_count() + 1),)})
  with pytest.raises(ValueError, match='mesh.shape'):
    sharding.make_mesh(too_many)


# ---------------------------------------------------------------------------------------------
# logical_to_spec (on abstract meshes: the rules need only axis sizes, not devices)

MESH_222 = AbstractMesh((2, 2, 2), ('data', 'fsdp', 'tensor'))


@pytest.mark.parametrize('logical,shape,expected', [
    (P('vocab', 'embed'), (512, 128), P('tensor', 'fsdp')),  # token embedding
    ((None, 'embed'), (512, 128), P(None, 'fsdp')),  # position embedding
    (('embed', 'heads', 'kv'), (128, 2, 64), P('fsdp', 'tensor', None)),  # query kernel
    (('heads', 'kv', 'embed'), (2, 64, 128), P('tensor', None, 'fsdp')),  # attention output
    (('embed', 'mlp'), (128, 512), P('fsdp', 'tensor')),
    (('embed',), (128,), P('fsdp')),  # LayerNorm scale
    (('batch', 'length'), (8, 32), P(('data', 'fsdp'), None)),
    (None, (3, 4), P()),
])
def test_logical_to_spec_follows_the_rules(logical, shape, expected):
  assert sharding.logical_to_spec(logical, shape, MESH_222) == expected


def test_logical_to_spec_replicates_dims_that_do_not_divide():
  assert sharding.logical_to_spec(('vocab', 'embed'), (511, 129), MESH_222) == P(None, None)
  assert sharding.logical_to_spec(('vocab', 'embed'), (511, 128), MESH_222) == P(None, 'fsdp')
  # The batch rule splits over data x fsdp = 4: a batch of 6 does not divide, so it is replicated.
  assert sharding.logical_to_spec(('batch', 'length'), (6, 32), MESH_222) == P(None, None)
  # Axes of size 1 and axes absent from the mesh shard nothing.
  mesh_41 = AbstractMesh((4, 1), ('data', 'fsdp'))
  assert sharding.logical_to_spec(('vocab', 'embed'), (512, 128), mesh_41) == P(None, None)
  mesh_4 = AbstractMesh((4,), ('data',))
  assert sharding.logical_to_spec(('batch', 'embed'), (8, 128), mesh_4) == P('data', None)


@pytest.mark.parametrize('logical', [
    ('embed', 'embed'), ('mlp', 'vocab'), ('heads', 'mlp', 'vocab'), ('batch', 'embed'),
    ('embed', 'batch'), ('batch', 'batch'),
])
def test_logical_to_spec_never_uses_a_mesh_axis_twice(logical):
  shape = (16,) * len(logical)
  spec = sharding.logical_to_spec(logical, shape, MESH_222)
  used = [a for entry in spec if entry is not None
          for a in (entry if isinstance(entry, tuple) else (entry,))]
  assert len(used) == len(set(used)), spec
  assert used  # the first dim always gets its axes: every rule here names a mesh axis


def test_custom_rules_table():
  rules = (('embed', ('fsdp', 'tensor')), ('vocab', None))
  assert sharding.logical_to_spec(('vocab', 'embed'), (512, 128), MESH_222, rules) == (
      P(None, ('fsdp', 'tensor')))
  assert sharding.logical_to_spec(('unknown',), (8,), MESH_222, rules) == P(None)


# ---------------------------------------------------------------------------------------------
# Host batches onto the mesh (local devices)


def test_global_batch_puts_host_rows_on_the_mesh():
  cfg = ml_collections.ConfigDict({'shape': (('data', -1), ('fsdp', 1), ('tensor', 1))})
  mesh = sharding.make_mesh(cfg)
  n = jax.device_count()
  rows = np.arange(2 * n * 5, dtype=np.int32).reshape(2 * n, 5)
  assert sharding.batch_sharding(mesh).spec == P(('data', 'fsdp'), None)
  assert sharding.batch_sharding(mesh, ndim=3).spec == P(('data', 'fsdp'), None, None)
  arr = sharding.global_batch(rows, mesh)
  assert isinstance(arr, jax.Array) and arr.shape == rows.shape and arr.dtype == rows.dtype
  assert arr.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
  np.testing.assert_array_equal(np.asarray(arr), rows)
  for shard in arr.addressable_shards:
    assert shard.data.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(shard.data), rows[shard.index])
  assert sharding.replicated(mesh).spec == P()


# ---------------------------------------------------------------------------------------------
# Multi-device: the train step of train.run on 8 forced host devices, the four meshes of the
# scale-out acceptance, 20 steps each, the same losses as one device.

_MESHES = {
    'data8': (('data', 8),),
    'fsdp8': (('data', 1), ('fsdp', 8), ('tensor', 1)),
    'd2f2t2': (('data', 2), ('fsdp', 2), ('tensor', 2)),
    'd4t2': (('data', 4), ('fsdp', 1), ('tensor', 2)),
    'single': (('data', 1), ('fsdp', 1), ('tensor', 1)),
}
_SHARDED = ('data8', 'fsdp8', 'd2f2t2', 'd4t2')
_STEPS = 20

_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax
    import numpy as np
    import optax
    from configs import pretrain
    from mlmjax import experiment, masking, optim, sharding, train_state
    from mlmjax.tasks import mlm as mlm_task
    from mlmjax import tokenizer as tok

    MESHES = json.loads(sys.argv[1])
    VOCAB, SEQ, BATCH, STEPS = 512, 32, 8, int(sys.argv[2])

    def packed_rows(rng):
      """Rows of [CLS] ids [SEP] units, 1-2 per row, PAD tails; ids < 64: learnable in 20 steps."""
      rows = np.zeros((BATCH, SEQ), np.int32)
      for r in range(BATCH):
        used = 0
        for n in rng.integers(4, SEQ // 2 - 2, size=2):
          if used + n + 2 > SEQ:
            break
          rows[r, used] = tok.CLS_ID
          rows[r, used + 1:used + 1 + n] = rng.integers(tok.NUM_SPECIAL, 64, n)
          rows[r, used + 1 + n] = tok.SEP_ID
          used += n + 2
      return rows

    rng = np.random.default_rng(0)
    batches = [packed_rows(rng) for _ in range(STEPS)]
    config = pretrain.get_config('tiny_classic')
    config.tokenizer.vocab_size = VOCAB
    config.train.seq_len, config.train.batch_size, config.train.num_steps = SEQ, BATCH, STEPS
    config.optim.warmup_steps, config.optim.decay = 0, 'constant'
    out = {'devices': jax.device_count()}
    for name, shape in MESHES.items():
      config.mesh.shape = tuple(tuple(a) for a in shape)
      n = int(np.prod([size for _, size in config.mesh.shape]))
      mesh = sharding.make_mesh(config.mesh, jax.devices()[:n])
      enc_cfg = experiment.encoder_config(config, VOCAB)
      spec = masking.spec_from_config(config.masking, vocab_size=VOCAB, seq_len=SEQ)
      schedule = optim.learning_rate_schedule(config.optim, STEPS)
      tx = optim.make_optimizer(config.optim, STEPS)
      graphdef, param_state = train_state.abstract_model(enc_cfg, config.seed)
      init_fn = train_state.make_init_fn(enc_cfg, tx, config.seed)
      abstract_state = jax.eval_shape(init_fn)
      shardings = train_state.state_shardings(param_state, abstract_state, tx, mesh)
      state = jax.jit(init_fn, out_shardings=shardings)()
      step_fn = jax.jit(mlm_task.make_train_step(graphdef, tx, spec, schedule, False),
                        in_shardings=(shardings, sharding.batch_sharding(mesh), None),
                        out_shardings=(shardings, None), donate_argnums=0)
      key = jax.random.key(config.seed)
      losses, batch_shards = [], None
      for rows in batches:
        tokens = sharding.global_batch(rows, mesh)
        batch_shards = sorted({tuple(s.data.shape) for s in tokens.addressable_shards})
        state, sums = step_fn(state, tokens, key)
        losses.append(float(sums['loss_sum']) / float(sums['weight']))
      def shards(a):
        return sorted({tuple(s.data.shape) for s in a.addressable_shards})

      def by_path(tree):
        return {jax.tree_util.keystr(p): shards(a)
                for p, a in jax.tree_util.tree_leaves_with_path(tree)}

      adam_state = [optax.tree_utils.tree_get(state['opt_state'], m) for m in ('mu', 'nu')]
      counts = optax.tree_utils.tree_get_all_with_path(state['opt_state'], 'count')
      enc = state['params']['encoder']
      layer = enc['layers'][0]
      arrays = {
          'token_embed': enc['token_embed'], 'position_embed': enc['position_embed'],
          'type_embed': enc['type_embed'], 'query_kernel': layer['attention']['query']['kernel'],
          'mlp_in_kernel': layer['mlp']['intermediate']['kernel'],
          'embed_norm_scale': enc['embed_norm']['scale'],
          'mlm_bias': state['params']['mlm_head']['bias'],
          'adam_mu_token_embed': optax.tree_utils.tree_get(
              state['opt_state'], 'mu')['encoder']['token_embed'],
      }
      out[name] = {
          'losses': losses, 'step': int(state['step']), 'batch_shards': batch_shards,
          'num_devices': {k: len(a.sharding.device_set) for k, a in arrays.items()},
          'shards': {k: shards(a) for k, a in arrays.items()},
          # Every parameter beside Adam's two moments of it, and the optimizer's step counters.
          'param_shards': by_path(state['params']), 'mu_shards': by_path(adam_state[0]),
          'nu_shards': by_path(adam_state[1]),
          'count_shards': [shards(c) for _, c in counts],
          'count_devices': [len(c.sharding.device_set) for _, c in counts],
      }
    print('RESULT ' + json.dumps(out))
''')


@pytest.fixture(scope='module')
def multi_device_run(tmp_path_factory) -> dict:
  """Returns the JSON printed by the 8-device subprocess that trains 20 steps on each mesh."""
  script = tmp_path_factory.mktemp('sharding') / 'meshes.py'
  script.write_text(_SCRIPT)
  # The step's compile dominates this test; lower XLA optimization halves it (same on every mesh).
  xla_flags = ('--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 '
               '--xla_llvm_disable_expensive_passes=true')
  env = dict(os.environ, XLA_FLAGS=xla_flags,
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL='2')
  # About 2 CPU-minutes (5 compiles); the timeout is for a hang, on a machine shared with others.
  proc = subprocess.run([sys.executable, str(script), json.dumps(_MESHES), str(_STEPS)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


@pytest.mark.slow
def test_losses_agree_across_meshes(multi_device_run):
  r = multi_device_run
  assert r['devices'] == 8
  ref = r['single']['losses']
  assert len(ref) == _STEPS and all(np.isfinite(ref))
  assert abs(ref[0] - np.log(512)) < 1.0  # a fresh model is near-uniform over the vocabulary
  # The 20 steps train (the rows use 59 of the 512 ids): this is agreement of a moving model.
  assert np.mean(ref[-5:]) < ref[0] - 1.0
  for name in _SHARDED:
    np.testing.assert_allclose(r[name]['losses'], ref, rtol=1e-5, err_msg=name)
    assert r[name]['step'] == _STEPS


@pytest.mark.slow
def test_batch_is_split_over_the_data_parallel_axes(multi_device_run):
  # 8 rows of 32 over data x fsdp (tensor replicates): 8 -> 1 row per device, 4 -> 2 rows.
  expected = {'data8': [[1, 32]], 'fsdp8': [[1, 32]], 'd2f2t2': [[2, 32]], 'd4t2': [[2, 32]],
              'single': [[8, 32]]}
  for name, shards in expected.items():
    assert multi_device_run[name]['batch_shards'] == shards, name


# Full shapes: vocab 512, hidden 128, 2 heads of 64, MLP 512, 512 positions, 2 token types.
_FULL = {'token_embed': [512, 128], 'position_embed': [512, 128], 'type_embed': [2, 128],
         'query_kernel': [128, 2, 64], 'mlp_in_kernel': [128, 512], 'embed_norm_scale': [128],
         'mlm_bias': [512], 'adam_mu_token_embed': [512, 128]}
# 'vocab'->tensor, 'embed'->fsdp, 'mlp'->tensor, 'heads'->tensor, 'kv'/None replicated.
_EXPECTED_SHARDS = {
    'single': _FULL,
    'data8': _FULL,  # pure data parallelism replicates every parameter
    'fsdp8': {'token_embed': [512, 16], 'position_embed': [512, 16], 'type_embed': [2, 16],
              'query_kernel': [16, 2, 64], 'mlp_in_kernel': [16, 512], 'embed_norm_scale': [16],
              'mlm_bias': [512], 'adam_mu_token_embed': [512, 16]},
    'd2f2t2': {'token_embed': [256, 64], 'position_embed': [512, 64], 'type_embed': [2, 64],
               'query_kernel': [64, 1, 64], 'mlp_in_kernel': [64, 256], 'embed_norm_scale': [64],
               'mlm_bias': [256], 'adam_mu_token_embed': [256, 64]},
    'd4t2': {'token_embed': [256, 128], 'position_embed': [512, 128], 'type_embed': [2, 128],
             'query_kernel': [128, 1, 64], 'mlp_in_kernel': [128, 256], 'embed_norm_scale': [128],
             'mlm_bias': [256], 'adam_mu_token_embed': [256, 128]},
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(_EXPECTED_SHARDS))
def test_parameter_and_optimizer_shards_follow_the_rules(multi_device_run, name):
  r = multi_device_run[name]
  for param, shape in _EXPECTED_SHARDS[name].items():
    assert r['shards'][param] == [shape], (name, param, r['shards'][param])
  # Adam's moments of every parameter are split exactly like the parameter (FSDP shards both).
  params = r['param_shards']
  assert len(params) > 30 and params.keys() == r['mu_shards'].keys() == r['nu_shards'].keys()
  for path, shards in params.items():
    assert len(shards) == 1, (name, path, shards)  # equal shards on every device
    assert r['mu_shards'][path] == r['nu_shards'][path] == shards, (name, path)
  # The optimizer's step counters are scalars replicated on every device of the mesh.
  assert r['count_shards'] == [[[]], [[]]]
  devices = 1 if name == 'single' else 8
  assert r['count_devices'] == [devices, devices]
  # Every array lives on all devices of its mesh (replicated or split), not on one.
  assert set(r['num_devices'].values()) == {devices}
