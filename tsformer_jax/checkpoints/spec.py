"""What every checkpoint must fit: the parameter shapes a config fixes.

Also what our own checkpoints hold: their orbax item names and the config
as JSON. Readers, writers and `adapt_params` all check against this.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import json
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

from tsformer_jax import config_lib
from tsformer_jax import model as model_lib

# Orbax items. Training checkpoints hold the params inside their `state`
# item, under the same name.
PARAMS_ITEM, CONFIG_ITEM, STATE_ITEM = 'params', 'config', 'state'


def config_to_json(config) -> dict:
  """`config` as JSON values (tuples become lists)."""
  return json.loads(config.to_json())


def config_from_json(value: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The inverse of `config_to_json`: lists become tuples again, and an
  older config gets the fields added since (`config_lib.upgrade`)."""
  return config_lib.upgrade(_tuples(value))


def _tuples(value):
  """JSON's lists as the config's tuples, at any depth."""
  if isinstance(value, Mapping):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def template(config) -> dict[str, jax.ShapeDtypeStruct]:
  """The flat ('block_0/mlp/fc1/kernel') parameter shapes of `config`."""
  return dict(_model_template(config.model.to_json()))


@functools.lru_cache(maxsize=16)
def _model_template(model_json: str) -> dict[str, jax.ShapeDtypeStruct]:
  # `config.model` alone: the shapes need no other section.
  config = ml_collections.ConfigDict(
      {'model': _tuples(json.loads(model_json))})
  shapes = jax.eval_shape(
      lambda: model_lib.init_params(config, jax.random.key(0)))
  return flax.traverse_util.flatten_dict(shapes, sep='/')


def patch_grid(model_config) -> tuple[int, int]:
  size = model_config.image_size
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  return h // model_config.patch_size, w // model_config.patch_size


def check_params(params, config, source: str = 'params') -> None:
  """Raises a ValueError naming every missing, extra or misshapen parameter.

  `params` is nested or flat ('block_0/mlp/fc1/kernel'); `source` names it.
  """
  flat = params
  if any(isinstance(v, Mapping) for v in params.values()):
    flat = flax.traverse_util.flatten_dict(params, sep='/')
  shapes = template(config)
  missing = sorted(set(shapes) - set(flat))
  unexpected = sorted(set(flat) - set(shapes))
  misshapen = [f'{path!r} has {list(np.shape(flat[path]))} but config.model '
               f'needs {list(shapes[path].shape)}'
               for path in sorted(set(flat) & set(shapes))
               if tuple(np.shape(flat[path])) != shapes[path].shape]
  if missing or unexpected or misshapen:
    problems = []
    for what, items in (('missing', missing), ('unexpected', unexpected),
                        ('misshapen', misshapen)):
      if items:
        more = f' and {len(items) - 8} more' if len(items) > 8 else ''
        problems.append(f'{what}: {", ".join(map(str, items[:8]))}{more}')
    m = config.model
    raise ValueError(
        f'{source} does not fit config.model (attention={m.attention!r}, '
        f'depth={m.depth}, hidden_size={m.hidden_size}, '
        f'patch_size={m.patch_size}): ' + '; '.join(problems) + '.')
