"""Device meshes and shardings: data parallelism and FSDP from the config.

Clips split along the batch over every mesh axis. With `fsdp` above 1, each
array of at least `fsdp_min_size` elements splits along its largest dimension
that `fsdp` divides; the rule looks only at shapes, so optimizer state
follows its parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
import math
import os

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

FSDP_AXIS = 'fsdp'


def mesh_shape(axes: Sequence[str], shape: Sequence[int],
               num_devices: int) -> tuple[int, ...]:
  """`shape` with its one -1 resolved so that the sizes use every device."""
  if len(axes) != len(shape):
    raise ValueError(f'sharding.axes {tuple(axes)} and sharding.shape '
                     f'{tuple(shape)} differ in length.')
  if list(shape).count(-1) > 1:
    raise ValueError(f'sharding.shape {tuple(shape)} has more than one -1.')
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape) or num_devices % known:
    raise ValueError(f'sharding.shape {tuple(shape)} does not fit '
                     f'{num_devices} devices: the sizes must multiply to '
                     f'{num_devices}, with at most one -1 for the rest.')
  resolved = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(resolved) != num_devices:
    raise ValueError(f'sharding.shape {tuple(shape)} uses '
                     f'{math.prod(resolved)} of the {num_devices} devices; '
                     'put -1 on one axis to take the rest.')
  return resolved


def create_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `config.sharding` over `devices` (default: all of them)."""
  devices = jax.devices() if devices is None else list(devices)
  axes = tuple(config.sharding.axes)
  shape = mesh_shape(axes, tuple(config.sharding.shape), len(devices))
  # Auto: XLA propagates shardings from the steps' inputs and outputs.
  axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
  if len(devices) == jax.device_count():
    # Lays the axes out along the physical topology (ICI rings on TPU).
    return jax.make_mesh(shape, axes, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), axes, axis_types=axis_types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis, the rest whole."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
  """Split the largest dimension `fsdp_size` divides; small arrays whole."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP_AXIS
      return P(*spec)
  return P()


def state_shardings(state, mesh: Mesh, config):
  """NamedShardings for every array of a pytree of parameters and optimizer
  state (concrete arrays or `jax.ShapeDtypeStruct`s): `fsdp_spec` of each."""
  fsdp_size = dict(mesh.shape).get(FSDP_AXIS, 1)
  min_size = config.sharding.fsdp_min_size
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size,
                                              min_size)), state)


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding
                 ) -> dict[str, jax.Array]:
  """This process's rows of the batch -> global arrays over the mesh."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'batch_size'
                     ) -> None:
  if batch_size % mesh.size:
    raise ValueError(f'{what} {batch_size} does not split over the '
                     f'{mesh.size} devices of the mesh {dict(mesh.shape)}; '
                     f'use a multiple of {mesh.size}.')


# Ask for a multi-process run (Cloud TPU and SLURM JAX detects itself).
COORDINATOR_ENV = 'TSFORMER_COORDINATOR'
NUM_PROCESSES_ENV = 'TSFORMER_NUM_PROCESSES'
PROCESS_ID_ENV = 'TSFORMER_PROCESS_ID'


def initialize_distributed(coordinator: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           auto: bool = False) -> bool:
  """Joins a multi-process job when the flags or the environment ask for it.

  Args:
    coordinator: `host:port` of process 0 (else `$TSFORMER_COORDINATOR`).
    num_processes: processes in the job (else `$TSFORMER_NUM_PROCESSES`).
    process_id: this process's index (else `$TSFORMER_PROCESS_ID`).
    auto: call `jax.distributed.initialize()` with no arguments, for the
      clusters JAX configures itself (Cloud TPU pods, SLURM, Kubernetes).

  Returns:
    Whether `jax.distributed.initialize` was called.
  """
  coordinator = coordinator or os.environ.get(COORDINATOR_ENV)
  if num_processes is None and NUM_PROCESSES_ENV in os.environ:
    num_processes = int(os.environ[NUM_PROCESSES_ENV])
  if process_id is None and PROCESS_ID_ENV in os.environ:
    process_id = int(os.environ[PROCESS_ID_ENV])
  if not (coordinator or auto):
    return False
  if coordinator and (num_processes is None or process_id is None):
    raise ValueError(
        f'A coordinator ({coordinator}) needs the number of processes and '
        f'this process\'s id: pass --num_processes and --process_id, or set '
        f'{NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}.')
  if coordinator:
    # CPU collectives go through gloo; GPUs and TPUs ignore this.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info('Process %d of %d, %d local of %d devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True
