"""Runs training on fake CPU devices for tests/test_sharding.py.

A separate process because the device count is fixed when JAX starts:

  python tests/sharding_worker.py steps OUT.npz
      A few train steps of a tiny model on 8 devices under three meshes
      (one device; data 8; data 2 x fsdp 4); saves losses, parameters and
      the FSDP parameter shardings.
  python tests/sharding_worker.py job WORKDIR DEVICES [PROCESS_ID PORT]
      A short demo training job (`train.train_and_evaluate`) with DEVICES
      local devices; with PROCESS_ID and PORT, as one of two processes that
      `jax.distributed` joins on 127.0.0.1. Then each process loads the
      checkpoint (`load_checkpoint`) into WORKDIR/loaded_<process>.npz.
"""

import os
import sys

os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=' +
                           (sys.argv[3] if sys.argv[1] == 'job' else '8'))

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

from tsformer_jax import checkpoints  # noqa: E402
from tsformer_jax import clip_lib  # noqa: E402
from tsformer_jax import config_lib  # noqa: E402
from tsformer_jax import sharding  # noqa: E402
from tsformer_jax import train  # noqa: E402

FSDP = sharding.FSDP_AXIS
MESHES = {'single': (1, 1), 'data': (8, 1), 'fsdp': (2, 4)}
STEPS = 3
# The job's bad videos (indices in the demo's train split): in seed 0's
# order, two in process 0's share of the first batches, one in process 1's.
BAD = (667, 570, 350)


def tiny_config():
  config = config_lib.get_config('divided', 'tiny')
  config.model.drop_path = 0.2  # Stochastic depth must not depend on layout.
  config.batch_size = 16
  config.grad_accum_steps = 2
  config.sharding.fsdp_min_size = 256
  return config


def run_steps(name: str) -> dict[str, np.ndarray]:
  config = tiny_config()
  config.sharding.shape = MESHES[name]
  devices = jax.devices()[:int(np.prod(MESHES[name]))]
  mesh = sharding.create_mesh(config, devices)
  state = train.create_train_state(config, jax.random.key(0), 10, mesh)
  step = train.jit_train_step(
      config, state, train.learning_rate_schedule(config, 10), mesh)
  rng = np.random.default_rng(0)
  m = config.model
  out = {}
  for i in range(STEPS):
    batch = dict(
        clips=rng.normal(size=(config.batch_size, m.num_frames,
                               *m.image_size, 3)).astype(np.float32),
        labels=rng.integers(0, m.num_classes, config.batch_size
                            ).astype(np.int32))
    state, metrics = step(state, sharding.global_batch(
        batch, sharding.batch_sharding(mesh)), jax.random.key(1))
    out[f'{name}/loss/{i}'] = np.asarray(metrics['loss'])
  out[f'{name}/opt_state_sharded'] = np.asarray(sum(
      FSDP in x.sharding.spec for x in jax.tree.leaves(state.opt_state)))
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  for path, value in flat:
    key = jax.tree_util.keystr(path)
    out[f'{name}/param/{key}'] = np.asarray(value)
    spec = value.sharding.spec
    out[f'{name}/spec/{key}'] = np.asarray(
        [str(axis) for axis in spec] + [''] * (value.ndim - len(spec)))
    out[f'{name}/shard/{key}'] = np.asarray(
        value.addressable_shards[0].data.shape)
  return out


class _WithBadVideos:
  """A source whose videos `BAD` fail to load, as corrupt files do."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    if index in BAD:
      raise clip_lib.BadVideoError(f'video {index} is corrupt')
    return self._source[index]


def run_job(workdir: str, process_id: int | None, port: int | None):
  if process_id is not None:
    sharding.initialize_distributed(f'127.0.0.1:{port}', 2, process_id)
  get_source = train.datasets.get_source
  train.datasets.get_source = lambda *args: _WithBadVideos(get_source(*args))
  config = config_lib.get_config('divided', 'demo')
  config.num_train_steps = 4
  config.batch_size = 16
  config.checkpoint_every_steps = 2
  config.data.num_workers = 1
  train.train_and_evaluate(config, workdir, mode='train')
  # Read back within the job, as predict or features would on every host.
  _, params = checkpoints.load_checkpoint(os.path.join(workdir, 'checkpoints'))
  np.savez(os.path.join(workdir, f'loaded_{jax.process_index()}.npz'),
           *jax.tree.leaves(params))


if __name__ == '__main__':
  if sys.argv[1] == 'steps':
    results = {}
    for mesh_name in MESHES:
      results.update(run_steps(mesh_name))
    np.savez(sys.argv[2], **results)
  else:
    extra = [int(a) for a in sys.argv[4:6]] or [None, None]
    run_job(sys.argv[2], *extra)
