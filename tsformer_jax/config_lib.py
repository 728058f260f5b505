"""Configs by name, and older saved configs brought up to date.

`get_config('divided', 'hr,ssv2')` is `configs/divided.py:hr,ssv2`: the
recipe in `configs/default.py` (installed as `tsformer_jax.configs`) with
that attention scheme.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import copy
from typing import Any

import ml_collections

from tsformer_jax import attention
from tsformer_jax.configs import default

VARIANTS = default.VARIANTS
DEFAULT_VARIANT = 'base'
# The weights the paper's configs start from, and the word for none.
IMAGENET_VIT = default.IMAGENET_VIT
SCRATCH = default.SCRATCH

# `config.data` fields that configs saved before them lack, with the value
# those runs used: RGB pixels, segments of the video's own frames, uniform
# scale jitter.
_ADDED_DATA_FIELDS = {'channel_order': 'rgb', 'segment_fps': 0.0,
                      'scale_jitter': 'uniform'}
# `config.dataset` of configs saved before it joined `config.data`: old
# field -> new field.
_OLD_DATASET_FIELDS = {'name': 'dataset', 'data_dir': 'data_dir',
                       'train_split': 'train_split',
                       'eval_split': 'eval_split', 'format': 'format',
                       'tfds_dir': 'tfds_dir'}


def get_config(scheme: str, arg: str | None = None
               ) -> ml_collections.ConfigDict:
  """The config of `scheme` (a key of `attention.SCHEMES`) at `arg` (a
  variant and/or dataset, as after the colon of a config file)."""
  attention.get_scheme(scheme)  # Fails early, listing the valid schemes.
  return default.get_config(arg, attention=scheme)


def with_class_names(config: ml_collections.ConfigDict,
                     names: Sequence[str]) -> ml_collections.ConfigDict:
  """A copy of `config` whose classes are called `names`, by index.

  Raises:
    ValueError: `names` does not hold one name per class of the model.
  """
  names = tuple(str(n) for n in names)
  if len(names) != config.model.num_classes:
    raise ValueError(f'{len(names)} class names for a model of '
                     f'{config.model.num_classes} classes.')
  config = copy.deepcopy(config)
  with config.unlocked():
    config.data.class_names = names
  return config


def upgrade(values: Mapping[str, Any]) -> dict[str, Any]:
  """A saved config's dict in today's layout: the `dataset` section of
  older configs moves into `data`, and `data` fields added since take the
  values that older runs used (`_ADDED_DATA_FIELDS`)."""
  values = dict(values)
  old = values.pop('dataset', None)
  if isinstance(old, Mapping):
    data = dict(values.get('data', {}))
    for key, value in old.items():
      data.setdefault(_OLD_DATASET_FIELDS.get(key, key), value)
    values['data'] = data
  if isinstance(values.get('data'), Mapping):
    values['data'] = {**_ADDED_DATA_FIELDS, **values['data']}
  return values
