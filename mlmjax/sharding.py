"""Device mesh from the config, logical-axis rules, and host batches as global arrays."""

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
# Logical parameter/activation axis -> mesh axis (or a tuple of them, or None to replicate).
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
)


def mesh_shape(mesh_cfg_shape, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Returns (axis names, sizes) with the one -1 axis resolved to the remaining devices."""
  names = tuple(str(n) for n, _ in mesh_cfg_shape)
  sizes = [int(s) for _, s in mesh_cfg_shape]
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown or len(set(names)) != len(names):
    raise ValueError(f'mesh.shape: axis names {names} must be distinct names from {MESH_AXES}')
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh.shape: sizes {sizes} must be positive, with at most one -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh.shape: {num_devices} devices do not divide into fixed axes of {known}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh.shape: {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, '
                     f'but {num_devices} are available')
  return names, tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Returns a Mesh (Auto axis types) over all devices, shaped by mesh_cfg.shape."""
  devices = jax.devices() if devices is None else devices
  names, sizes = mesh_shape(mesh_cfg.shape, len(devices))
  grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def logical_to_spec(logical: P | tuple | None, shape, mesh: Mesh, rules=DEFAULT_RULES) -> P:
  """Returns the mesh PartitionSpec for logical axis names; a dim that does not divide is replicated."""
  table = dict(rules)
  if logical is None:
    return P()
  out, used = [], set()
  for dim, name in zip(shape, tuple(logical)):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.shape and a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or size == 1 or dim % size:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def tree_shardings(logical_specs, abstract_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """Returns NamedShardings for a tree from matching trees of logical specs and shapes."""
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_spec(spec, x.shape, mesh, rules)),
      logical_specs, abstract_tree, is_leaf=lambda s: isinstance(s, P) or s is None)


def replicated(mesh: Mesh) -> NamedSharding:
  """Returns the fully replicated sharding on mesh."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Returns the sharding of a (batch, ...) array: batch split over the data-parallel axes."""
  axes = tuple(a for a in ('data', 'fsdp') if a in mesh.shape)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  """Returns how many ways a batch is split on this mesh."""
  return math.prod(mesh.shape[a] for a in ('data', 'fsdp') if a in mesh.shape)


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """Returns this process's rows as its part of one global array sharded over the batch axes."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)


def _cluster_detected() -> bool:
  """Returns True when one of the cluster environments JAX auto-detects is present (TPU VM, SLURM...)."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top  (JAX's own detection list)
    return any(not env.opt_in_only_method and env.is_env_present()
               for env in clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except  (a moved private API, or a metadata query failing)
    return False


def maybe_initialize_distributed(config) -> bool:
  """Starts jax.distributed from config.distributed, the environment or cluster auto-detection.

  Returns whether jax.distributed is up. Explicit settings win: distributed.coordinator_address
  (else $JAX_COORDINATOR_ADDRESS), distributed.num_processes (else $JAX_NUM_PROCESSES) and
  distributed.process_id (else $JAX_PROCESS_ID); JAX fills what is unset from its cluster detection.
  With nothing set, it starts only where JAX detects a cluster (a multi-host TPU VM, SLURM, Open
  MPI, Kubernetes), by calling jax.distributed.initialize() with no arguments; a single host with
  nothing configured stays single-process.
  """
  if jax.distributed.is_initialized():
    return True
  cfg = config.distributed
  env = os.environ
  address = str(cfg.coordinator_address or env.get('JAX_COORDINATOR_ADDRESS', ''))
  try:
    num = int(cfg.num_processes or env.get('JAX_NUM_PROCESSES', 0) or 0)
    pid = int(cfg.process_id)
    pid = int(env['JAX_PROCESS_ID']) if pid < 0 and env.get('JAX_PROCESS_ID') else pid
  except ValueError as e:
    raise ValueError(f'distributed: num_processes/process_id (or $JAX_NUM_PROCESSES/$JAX_PROCESS_ID) '
                     f'must be integers ({e})') from None
  if not (address or num > 0 or pid >= 0 or _cluster_detected()):
    return False
  kwargs = dict(coordinator_address=address or None, num_processes=num if num > 0 else None,
                process_id=pid if pid >= 0 else None)
  timeout = int(cfg.initialization_timeout or 0)
  if timeout > 0:
    kwargs['initialization_timeout'] = timeout
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError) as e:
    raise ValueError(f'distributed: {e} (set distributed.coordinator_address, num_processes and '
                     'process_id, or the JAX_* environment variables)') from None
  except RuntimeError as e:
    if 'must be called before' in str(e):
      raise RuntimeError('distributed: jax.distributed must start before JAX touches a device; '
                         'call train.run (or sharding.maybe_initialize_distributed) first in the '
                         'process') from None
    raise
  return True
