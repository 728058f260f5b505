"""Our format: an orbax directory with a `params` and a `config` (JSON) item.

Training checkpoints (`checkpoints.training`) hold the params inside their
`state` item instead; both read back here, as does a `CheckpointManager`
directory: its newest step that reads, with a warning naming each newer
step that does not (damaged: a truncated or missing file, garbage).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import gc
import logging
import os
import re
import sys

from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tsformer_jax import tensor_io
from tsformer_jax.checkpoints import spec
from tsformer_jax.checkpoints.spec import CONFIG_ITEM
from tsformer_jax.checkpoints.spec import PARAMS_ITEM
from tsformer_jax.checkpoints.spec import STATE_ITEM

_LOG = logging.getLogger(__name__)
_muted = False  # See `_mute_abandoned_reads`.


class CheckpointError(ValueError):
  """A checkpoint that cannot be read (damaged, incomplete) or written."""


def find(path: str) -> tuple[str, str] | None:
  """`(directory, params item)` of the checkpoint at `path`, or None."""
  item = _params_item(path)
  if item:
    return path, item
  for step in step_directories(path):
    found = find(step)
    if found:
      return found
  return None


def _params_item(path: str) -> str | None:
  if os.path.isdir(os.path.join(path, CONFIG_ITEM)):
    for item in (PARAMS_ITEM, STATE_ITEM):
      if os.path.isdir(os.path.join(path, item)):
        return item
  return None


def step_directories(path: str) -> list[str]:
  """The step directories of a `CheckpointManager` directory, newest first.

  Only committed steps: orbax writes a step under a temporary name and
  renames it when complete; `<step>.damaged` ones are set aside.
  """
  if not os.path.isdir(path):
    return []
  steps = [int(n) for n in os.listdir(path)
           if n.isdigit() and os.path.isdir(os.path.join(path, n))]
  return [os.path.join(path, str(s)) for s in sorted(steps, reverse=True)]


def describe_failure(error: BaseException) -> str:
  """One line on why orbax could not read something, from its error.

  Orbax wraps a TensorStore error about an unreadable array in an exception
  that prints the whole TensorStore spec; the cause says which array and
  why.
  """
  root = error
  while (root.__cause__ is not None and
         type(root.__cause__).__name__ != 'UnfilteredStackTrace'):
    root = root.__cause__
  lines = str(root).strip().splitlines()
  text = lines[0] if lines else type(root).__name__
  # TensorStore: 'STATUS: ... Error reading "ARRAY/CHUNK" in OCDBT database
  # at local file "DIR": why [tensorstore_spec=...]'.
  text = re.sub(r'\s*\[tensorstore_spec=.*', '', text)
  text = re.sub(r' in OCDBT database at local file "[^"]*"', '', text)
  status = re.match(r'[A-Z_]{4,}: (.*)', text)
  text = status[1] if status else text
  array = re.search(r'Error reading "([^"/]+)/[^"]*": (.*)', text)
  if array:
    text = f'cannot read array {array[1]}: {array[2]}'
  elif isinstance(root, KeyError) and root.args:
    text = str(root.args[0])
  if not (status or array or isinstance(root, (OSError, CheckpointError))):
    text = f'{type(root).__name__}: {text}'
  return text.rstrip('.')


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
  """Turns any failure to read `what` into a `CheckpointError` saying why.

  Orbax and TensorStore raise many types (bare `Exception` among them) for
  a damaged file, so every exception counts here.
  """
  _mute_abandoned_reads()
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    gc.collect()  # The reads it abandoned report now, muted.
    raise CheckpointError(f'{what}: {describe_failure(e)}') from e


def _mute_abandoned_reads():
  """Silences the echoes of failed orbax reads in this process.

  When one array cannot be read, orbax abandons the reads of the others;
  each then reports on stderr, with pages of TensorStore spec, as it is
  collected or as TensorStore's threads finish (even after the failure has
  raised). The failure itself raises (see `reading`); other errors are
  reported as before.
  """
  global _muted
  if not _muted:
    previous = sys.unraisablehook

    def hook(unraisable):
      if not _abandoned_read(unraisable.exc_value):
        previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger('asyncio').addFilter(
        lambda r: not (r.exc_info and _abandoned_read(r.exc_info[1])))
    _muted = True


def _abandoned_read(error: BaseException | None) -> bool:
  message = str(error)
  return (message.startswith('Encountered error while reading array') or
          message == 'Event loop is closed' or
          re.match(r'[A-Z_]{4,}: Error (reading|opening) ', message)
          is not None)


def item_tree(directory: str, item: str):
  """The stored tree (shapes and dtypes) of a PyTree item of the checkpoint
  at `directory`; raises if its metadata cannot be read."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(epath.Path(directory) / item)
  finally:
    handler.close()
  return getattr(metadata, 'tree', metadata)


def nonfinite_leaves(tree) -> list[str]:
  """The paths ('params/head/kernel') of the leaves of `tree` holding a NaN
  or an Inf."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  if not leaves:
    return []
  finite = jax.device_get(_all_finite([x for _, x in leaves]))
  return [jax.tree_util.keystr(path, simple=True, separator='/')
          for (path, _), ok in zip(leaves, finite, strict=True) if not ok]


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
  return jnp.stack([jnp.isfinite(x).all() for x in leaves])


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
  params = jax.tree.map(lambda x: np.asarray(x, np.float32),
                        jax.device_get(params))
  spec.check_params(params, config, 'params to save')
  return tensor_io.write_atomically(
      path, lambda staging: _checkpointer(write=True).save(
          staging, args=save_args(config, params)), overwrite)


def read(path: str) -> tuple[ml_collections.ConfigDict, dict]:
  """`(config, params)`, the params as float32 numpy arrays.

  `path` is one checkpoint, or a `CheckpointManager` directory: then its
  newest step that reads, with a warning naming each newer one skipped.

  Raises:
    CheckpointError: the checkpoint (or every step) cannot be read; the
      message says why, for each step.
  """
  # Orbax takes absolute paths only; users type relative ones.
  path = os.path.abspath(path)
  if _params_item(path):
    try:
      return _read(path, _params_item(path))
    except CheckpointError as e:
      raise CheckpointError(f'{path}: damaged checkpoint: {e}.') from e
  skipped = []
  for step in step_directories(path):
    try:
      result = _read(step, _params_item(step))
    except CheckpointError as e:
      skipped.append(f'step {os.path.basename(step)}: {e}')
      continue
    for why in skipped:
      _LOG.warning('%s: skipped damaged %s; read step %s instead.', path,
                   why, os.path.basename(step))
    return result
  if not skipped:
    raise CheckpointError(f'{path}: no orbax checkpoint here.')
  raise CheckpointError(f'{path}: no step can be read: '
                        f'{"; ".join(skipped)}.')


def _read(directory: str, item: str | None
          ) -> tuple[ml_collections.ConfigDict, dict]:
  if item is None:
    raise CheckpointError(f'has no {CONFIG_ITEM}/ with a {PARAMS_ITEM}/ '
                          f'or {STATE_ITEM}/ item')
  checkpointer = _checkpointer(item)
  with reading(f'{CONFIG_ITEM}/'):
    config = spec.config_from_json(checkpointer.restore(
        directory, args=ocp.args.Composite(
            **{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM])
  with reading(f'{item}/ metadata'):
    stored = item_tree(directory, item)
    if item == STATE_ITEM:
      stored = stored[PARAMS_ITEM]
    shapes = {k: jax.ShapeDtypeStruct(tuple(v.shape), np.float32)
              for k, v in flax.traverse_util.flatten_dict(
                  dict(stored), sep='/').items()}
  spec.check_params(shapes, config, directory)
  # This process's own CPU: in a multi-process job jax.devices() are all
  # processes' devices, and another's would leave nothing to read here.
  cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend='cpu')[0])
  target = flax.traverse_util.unflatten_dict(
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cpu)
       for k, v in spec.template(config).items()}, sep='/')
  if item == STATE_ITEM:
    target = {PARAMS_ITEM: target}
  restore_args = jax.tree.map(
      lambda _: ocp.ArrayRestoreArgs(sharding=cpu), target)
  with reading(f'{item}/'):
    restored = checkpointer.restore(directory, args=ocp.args.Composite(**{
        item: ocp.args.PyTreeRestore(target, restore_args=restore_args,
                                     partial_restore=item == STATE_ITEM)}))
  params = restored[item]
  if item == STATE_ITEM:
    params = params[PARAMS_ITEM]
  return config, jax.tree.map(np.asarray, jax.device_get(params))
