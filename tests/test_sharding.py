"""Meshes, FSDP and multi-process training on fake CPU devices.

The runs themselves happen in `sharding_worker.py` subprocesses, since the
number of CPU devices is fixed when JAX starts.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import types

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from tsformer_jax import checkpoints
from tsformer_jax import config_lib
from tsformer_jax import sharding

WORKER = pathlib.Path(__file__).parent / 'sharding_worker.py'
ROOT = WORKER.parent.parent


def _run(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)],
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=900):
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output[-3000:]


@pytest.mark.slow
def test_data_parallel_and_fsdp_train_like_one_device(tmp_path):
  _finish(_run('steps', tmp_path / 'steps.npz'))
  results = dict(np.load(tmp_path / 'steps.npz'))
  params = [k.split('/', 2)[2] for k in results
            if k.startswith('single/param/')]
  for mesh in ('data', 'fsdp'):
    for i in range(3):
      np.testing.assert_allclose(results[f'{mesh}/loss/{i}'],
                                 results[f'single/loss/{i}'], atol=1e-5)
    for name in params:
      np.testing.assert_allclose(results[f'{mesh}/param/{name}'],
                                 results[f'single/param/{name}'], atol=1e-6,
                                 err_msg=f'{mesh} {name}')
  # Data parallel: every parameter whole on every device.
  for name in params:
    assert 'fsdp' not in results[f'data/spec/{name}']
    assert tuple(results[f'data/shard/{name}']) == results[
        f'data/param/{name}'].shape
  # FSDP: the large arrays split 4 ways along one axis, the small ones not.
  sharded = 0
  for name in params:
    spec, shape = results[f'fsdp/spec/{name}'], results[f'fsdp/param/{name}']
    shard = tuple(results[f'fsdp/shard/{name}'])
    expected = list(shape.shape)
    if 'fsdp' in spec:
      sharded += 1
      expected[list(spec).index('fsdp')] //= 4
    else:
      assert shape.size < 256 or all(n % 4 for n in shape.shape), name
    assert shard == tuple(expected), (name, spec, shard)
  assert sharded >= 12  # qkv, proj, fc, fc1, fc2 of both blocks, ...
  # The optimizer's moments follow their parameters.
  assert int(results['fsdp/opt_state_sharded']) >= sharded
  assert int(results['data/opt_state_sharded']) == 0


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores(
    tmp_path):
  port = _free_port()
  single = _run('job', tmp_path / 'single', 8)
  pair = [_run('job', tmp_path / 'pair', 4, i, port) for i in range(2)]
  for process in [single, *pair]:
    _finish(process)
  results = [json.loads((tmp_path / run / 'results.json').read_text())
             for run in ('single', 'pair')]
  assert results[0]['step'] == results[1]['step'] == 4
  # Each process skips the bad videos of its own share; process 0 reports
  # them all.
  assert results[0]['skipped_videos'] == results[1]['skipped_videos'] == 3
  np.testing.assert_allclose(results[1]['train_loss'],
                             results[0]['train_loss'], atol=1e-6)
  # Restored here, in one process with one device.
  _, params = checkpoints.load_checkpoint(str(tmp_path / 'single' /
                                              'checkpoints'))
  _, pair_params = checkpoints.load_checkpoint(str(tmp_path / 'pair' /
                                                   'checkpoints'))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(pair_params),
                  strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # And in each process of the pair, jax.distributed still joined.
  for i in range(2):
    loaded = np.load(tmp_path / 'pair' / f'loaded_{i}.npz')
    for j, b in enumerate(jax.tree.leaves(pair_params)):
      np.testing.assert_array_equal(loaded[f'arr_{j}'], b)


def test_mesh_shape_takes_the_rest_and_explains_mistakes():
  assert sharding.mesh_shape(('data', 'fsdp'), (-1, 1), 8) == (8, 1)
  assert sharding.mesh_shape(('data', 'fsdp'), (2, -1), 8) == (2, 4)
  with pytest.raises(ValueError, match='more than one -1'):
    sharding.mesh_shape(('data', 'fsdp'), (-1, -1), 8)
  with pytest.raises(ValueError, match='multiply to 8'):
    sharding.mesh_shape(('data', 'fsdp'), (3, -1), 8)
  with pytest.raises(ValueError, match='uses 4 of the 8'):
    sharding.mesh_shape(('data', 'fsdp'), (2, 2), 8)
  with pytest.raises(ValueError, match='differ in length'):
    sharding.mesh_shape(('data',), (2, 4), 8)


def test_default_mesh_and_batch_size_check():
  config = config_lib.get_config('divided', 'tiny')
  mesh = sharding.create_mesh(config)
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1}
  eight = types.SimpleNamespace(size=8, shape={'data': 2, 'fsdp': 4})
  sharding.check_batch_size(16, eight)
  with pytest.raises(ValueError, match='batch_size 12 .* multiple of 8'):
    sharding.check_batch_size(12, eight)


def test_fsdp_spec_splits_the_largest_divisible_axis():
  assert sharding.fsdp_spec((768, 3, 12, 64), 4, 1) == P('fsdp', None, None,
                                                          None)
  assert sharding.fsdp_spec((3, 768), 4, 1) == P(None, 'fsdp')
  assert sharding.fsdp_spec((7, 9), 4, 1) == P()
  assert sharding.fsdp_spec((768,), 4, 10_000) == P()
  assert sharding.fsdp_spec((768, 768), 1, 1) == P()


def test_distributed_needs_all_three_settings(monkeypatch):
  for name in (sharding.COORDINATOR_ENV, sharding.NUM_PROCESSES_ENV,
               sharding.PROCESS_ID_ENV):
    monkeypatch.delenv(name, raising=False)
  assert not sharding.initialize_distributed()
  monkeypatch.setenv(sharding.COORDINATOR_ENV, '127.0.0.1:1234')
  with pytest.raises(ValueError, match='--num_processes and --process_id'):
    sharding.initialize_distributed()
