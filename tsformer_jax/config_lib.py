"""Configs by name, and older saved configs brought up to date.

`get_config('divided', 'hr,ssv2')` is `configs/divided.py:hr,ssv2`: the
recipe in `configs/default.py` (installed as `tsformer_jax.configs`) with
that attention scheme. `upgrade` gives a saved or hand-made config every
field of today's recipe, so that code reads each field directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import copy
from typing import Any

import ml_collections

from tsformer_jax import attention
from tsformer_jax.configs import dataset_facts
from tsformer_jax.configs import default

VARIANTS = default.VARIANTS
DEFAULT_VARIANT = 'base'
# The weights the paper's configs start from, and the word for none.
IMAGENET_VIT = default.IMAGENET_VIT
SCRATCH = default.SCRATCH

# `config.data` fields added since configs were first saved whose recipe
# value would change an older run's numbers, with the value it used: RGB
# pixels, segments of the video's own frames, uniform scale jitter (all
# three differ for SSv2), antialiased resizing, softmax scores averaged over
# views. Every other field an older config lacks had, or has, its recipe's
# value in that run (`_recipe_of`); the ones that decide only how a job runs
# (workers, time bounds, sharding) take today's.
_OLDER_RUNS_DATA = {'channel_order': 'rgb', 'segment_fps': 0.0,
                    'scale_jitter': 'uniform', 'resize': 'antialias',
                    'test_view_scores': 'softmax_mean'}
# `config.model` fields added since, likewise: runs before `model.loss`
# trained and scored a softmax head.
_OLDER_RUNS_MODEL = {'loss': 'softmax'}
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


def upgrade(values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A saved or hand-made config (a dict or ConfigDict; not changed) in
  today's layout, with every field of today's recipe.

  The `dataset` section of older configs moves into `data`. A missing field
  takes the value its run used: in a saved config (one with a `data`
  section), `_OLDER_RUNS_DATA` and `_OLDER_RUNS_MODEL` for the fields whose
  recipe value changed those runs' numbers; otherwise the
  recipe of the config's own variant and dataset (a config without a `data`
  section was made by hand, not saved by a run). Fields the recipe lacks
  are kept. Upgrading twice changes nothing.
  """
  if isinstance(values, ml_collections.ConfigDict):
    values = values.to_dict()
  values = _moved_dataset_section(copy.deepcopy(dict(values)))
  return ml_collections.ConfigDict(_filled(values, _recipe_of(values)))


def _moved_dataset_section(values: dict[str, Any]) -> dict[str, Any]:
  old = values.pop('dataset', None)
  if isinstance(old, Mapping):
    data = dict(values.get('data', {}))
    for key, value in old.items():
      data.setdefault(_OLD_DATASET_FIELDS.get(key, key), value)
    values['data'] = data
  return values


def _recipe_of(values: Mapping[str, Any]) -> dict[str, Any]:
  """The recipe of `values`' variant and dataset (the defaults where they
  name none we know); a saved config's with `_OLDER_RUNS_DATA` and
  `_OLDER_RUNS_MODEL`."""
  variant = str(values.get('variant', DEFAULT_VARIANT)).lower()
  data = values.get('data')
  saved = isinstance(data, Mapping)
  dataset = str(data.get('dataset', '')).lower() if saved else ''
  arg = [f'variant={variant if variant in VARIANTS else DEFAULT_VARIANT}']
  if dataset in {*dataset_facts.DATASETS, *dataset_facts.ALIASES}:
    arg.append(f'dataset={dataset}')
  recipe = default.get_config(','.join(arg)).to_dict()
  if saved:
    recipe['data'].update(_OLDER_RUNS_DATA)
    recipe['model'].update(_OLDER_RUNS_MODEL)
  return recipe


def _filled(values: dict[str, Any], recipe: Mapping[str, Any]
            ) -> dict[str, Any]:
  """`values` with the fields of `recipe` it lacks, section by section."""
  filled = dict(values)
  for key, default_value in recipe.items():
    if key not in filled:
      filled[key] = default_value
    elif isinstance(default_value, Mapping) and isinstance(filled[key],
                                                           Mapping):
      filled[key] = _filled(dict(filled[key]), default_value)
  return filled
