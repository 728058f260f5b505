"""The original TimeSformer's `.pyth`: its `model_state`, names `model.*`,
and its training config `cfg` (a YAML dump of the original's yacs config).

The cfg's `TRAIN.DATASET` also tells the channel order the model takes
(`channel_order`): the original's SSv2 loader reads JPEGs with cv2, which
gives BGR, and its ViT never reverses them (`DATA.REVERSE_INPUT_CHANNEL`
acts only in the other architectures' `pack_pathway_output`), so its SSv2
models take BGR; its Kinetics and Diving-48 loaders decode with PyAV: RGB.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import yaml

from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax.checkpoints.formats import state_dicts
from tsformer_jax.configs import dataset_facts

# Ours -> the original's `TRAIN.DATASET`, which names Kinetics without its
# class count.
DATASETS = {name: facts.original_name
            for name, facts in dataset_facts.DATASETS.items()
            if facts.original_name}
# Where a `.pyth` of ours records a head count that no model name fixes. The
# original has no such key, and yacs refuses unknown keys in a cfg it
# merges, so it is written only for models the original cannot build.
HEADS_KEY = ('TIMESFORMER', 'NUM_HEADS')
# Where a `.pyth` of ours records a channel order other than its dataset's
# (`channel_order`), as `HEADS_KEY` only where needed: an SSv2 model in RGB.
CHANNELS_KEY = ('DATA', 'CHANNEL_ORDER')


def channel_order(dataset: str | None) -> str:
  """The channel order of the original's models trained on `dataset` (its
  `TRAIN.DATASET`): that of our dataset of that name ('bgr' for 'ssv2',
  cv2's JPEGs), else 'rgb'."""
  orders = {dataset_facts.DATASETS[ours].channel_order
            for ours, theirs in DATASETS.items() if theirs == dataset}
  return orders.pop() if len(orders) == 1 else 'rgb'


def params_from_original_state_dict(state_dict: Mapping[str, Any], config,
                                    source: str = 'state dict',
                                    prefix: str = 'model.') -> dict:
  """Our `params` from the original TimeSformer's `model_state`.

  Also reads timm's ViT (`prefix=''`, `config.model.attention='space_only'`),
  whose names the original kept.
  """
  modules, parameters = state_dicts.torch_names(config.model, 'original',
                                                prefix)
  return state_dicts.params_from_torch_state_dict(state_dict, config, modules,
                                                  parameters, source)


def _cfg_values(text: str, source: str):
  """`get(section, key)` of the original's `cfg` (YAML), None if absent."""
  try:
    cfg = yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise ValueError(f'{source}: its cfg is not readable YAML ({e}).'
                     ) from e
  cfg = cfg if isinstance(cfg, Mapping) else {}
  return lambda section, key: (cfg.get(section) or {}).get(key)


def config_from_cfg(text: str, scheme: str, source: str
                    ) -> ml_collections.ConfigDict:
  """Our config of `scheme` as the original's `cfg` describes the job:
  frames, crop size, classes, dataset, sampling, scale jitter, test views
  and the channel order (`channel_order`, else `CHANNELS_KEY`)."""
  get = _cfg_values(text, source)
  attention_type = get('TIMESFORMER', 'ATTENTION_TYPE')
  named = state_dicts.HF_ATTENTION_TYPES.get(attention_type, scheme)
  if named != scheme:
    raise ValueError(f'{source}: its cfg says {attention_type!r} but its '
                     f'weights are {scheme!r} attention.')
  classes = get('MODEL', 'NUM_CLASSES')
  theirs = str(get('TRAIN', 'DATASET') or '').lower()
  dataset = f'kinetics{classes}' if theirs == 'kinetics' else theirs
  if DATASETS.get(dataset) != theirs:
    dataset = ''  # None of ours: the recipe's default.
  config = config_lib.get_config(scheme, f'dataset={dataset}' if dataset
                                 else None)
  size = get('DATA', 'TRAIN_CROP_SIZE')
  for section, key, value in (
      ('model', 'num_frames', get('DATA', 'NUM_FRAMES')),
      ('model', 'image_size', size and (int(size), int(size))),
      ('model', 'num_classes', classes),
      ('data', 'sampling_rate', get('DATA', 'SAMPLING_RATE')),
      ('data', 'mean', get('DATA', 'MEAN')),
      ('data', 'std', get('DATA', 'STD')),
      ('data', 'test_num_clips', get('TEST', 'NUM_ENSEMBLE_VIEWS')),
      ('data', 'test_num_crops', get('TEST', 'NUM_SPATIAL_CROPS'))):
    if value is not None:
      config[section][key] = type(config[section][key])(value)
  inverse = get('DATA', 'INV_UNIFORM_SAMPLE')
  if inverse is not None:
    config.data.scale_jitter = 'inverse_uniform' if inverse else 'uniform'
  order = get(*CHANNELS_KEY)
  config.data.channel_order = channel_order(theirs)
  if order is not None:
    config.data.channel_order = clip_lib.check_channel_order(
        order, f'{source}: its cfg gives {".".join(CHANNELS_KEY)}')
  return config


def read(state, cfg, hint, source):
  """`(config, params)`: sizes from the weights, the head count and the rest
  from `cfg` (the file's training config, if it has one) or else `hint`."""
  prefix = state_dicts.prefix_of(state, 'patch_embed.proj.weight', source)
  state = state_dicts.conv_kernel_from_linear(
      state, prefix + 'patch_embed.proj.weight')
  scheme = state_dicts.torch_scheme(state, 'temporal_attn.', 'time_embed')
  recipe, heads = None, None
  if isinstance(cfg, str):
    recipe = config_from_cfg(cfg, scheme, source)
    heads = _cfg_values(cfg, source)(*HEADS_KEY)
    if heads is not None and (not isinstance(heads, int) or heads < 1):
      raise ValueError(f'{source}: its cfg gives {".".join(HEADS_KEY)} '
                       f'{heads!r}; it must be a positive integer.')
  config = state_dicts.torch_layout_config(
      state, 'original', prefix, prefix, scheme, hint or recipe, source,
      heads=heads)
  if recipe is not None:
    recipe.model.update(config.model)
    config = recipe
  return config, params_from_original_state_dict(state, config, source,
                                                 prefix)
