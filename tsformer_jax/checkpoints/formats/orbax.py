"""Our format: an orbax directory with a `params` and a `config` (JSON) item.

Training checkpoints (`checkpoints.training`) hold the params inside their
`state` item instead; both read back here, as does a `CheckpointManager`
directory (its latest step).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tsformer_jax.checkpoints import spec
from tsformer_jax.checkpoints.spec import CONFIG_ITEM
from tsformer_jax.checkpoints.spec import PARAMS_ITEM
from tsformer_jax.checkpoints.spec import STATE_ITEM


def find(path: str) -> tuple[str, str] | None:
  """`(directory, params item)` of the checkpoint at `path`, or None."""
  if os.path.isdir(os.path.join(path, CONFIG_ITEM)):
    for item in (PARAMS_ITEM, STATE_ITEM):
      if os.path.isdir(os.path.join(path, item)):
        return path, item
  steps = [int(n) for n in os.listdir(path)
           if n.isdigit() and os.path.isdir(os.path.join(path, n))]
  for step in sorted(steps, reverse=True):
    found = find(os.path.join(path, str(step)))
    if found:
      return found
  return None


def _checkpointer(item: str = PARAMS_ITEM, *, write: bool = False
                  ) -> ocp.Checkpointer:
  # Writes as `save_args` does; reads with the PyTree handler, which restores
  # parts of an item (the params of a training state).
  handler = (ocp.StandardCheckpointHandler() if write else
             ocp.PyTreeCheckpointHandler())
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      **{item: handler, CONFIG_ITEM: ocp.JsonCheckpointHandler()}))


def save_args(config, params) -> ocp.args.Composite:
  """Args for `ocp.CheckpointManager.save` whose steps `load_checkpoint`
  reads."""
  return ocp.args.Composite(**{
      PARAMS_ITEM: ocp.args.StandardSave(jax.device_get(params)),
      CONFIG_ITEM: ocp.args.JsonSave(spec.config_to_json(config))})


def save_checkpoint(path: str, config, params, *,
                    overwrite: bool = False) -> str:
  """Writes `params` (checked against `config`) and `config` at `path`.

  Written beside `path` and renamed into place when complete, so that a
  failure leaves nothing at `path`. Returns the absolute path.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True (--overwrite)'
                          ' to replace it.')
  params = jax.tree.map(lambda x: np.asarray(x, np.float32),
                        jax.device_get(params))
  spec.check_params(params, config, 'params to save')
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.tmp-',
                             dir=parent)
  try:
    written = os.path.join(staging, 'checkpoint')
    _checkpointer(write=True).save(written, args=save_args(config, params))
    replaced = os.path.join(staging, 'replaced')
    if os.path.exists(path):
      os.rename(path, replaced)
    try:
      os.rename(written, path)
    except OSError:
      if os.path.exists(replaced):
        os.rename(replaced, path)
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return path


def read(path: str) -> tuple[ml_collections.ConfigDict, dict]:
  """`(config, params)`, the params as float32 numpy arrays."""
  # Orbax takes absolute paths only; users type relative ones.
  directory, item = find(os.path.abspath(path))
  checkpointer = _checkpointer(item)
  config = spec.config_from_json(checkpointer.restore(
      directory, args=ocp.args.Composite(
          **{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM])
  metadata = checkpointer.metadata(directory).item_metadata[item]
  stored = getattr(metadata, 'tree', metadata)
  if item == STATE_ITEM:
    stored = stored[PARAMS_ITEM]
  spec.check_params({k: jax.ShapeDtypeStruct(tuple(v.shape), np.float32)
                     for k, v in flax.traverse_util.flatten_dict(
                         dict(stored), sep='/').items()}, config, directory)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  target = flax.traverse_util.unflatten_dict(
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cpu)
       for k, v in spec.template(config).items()}, sep='/')
  if item == STATE_ITEM:
    target = {PARAMS_ITEM: target}
  restore_args = jax.tree.map(
      lambda _: ocp.ArrayRestoreArgs(sharding=cpu), target)
  params = checkpointer.restore(directory, args=ocp.args.Composite(**{
      item: ocp.args.PyTreeRestore(target, restore_args=restore_args,
                                   partial_restore=item == STATE_ITEM)}))[item]
  if item == STATE_ITEM:
    params = params[PARAMS_ITEM]
  return config, jax.tree.map(np.asarray, jax.device_get(params))
