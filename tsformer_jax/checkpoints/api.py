"""Any checkpoint in, fitted to a config: the formats told apart and read."""

from __future__ import annotations

from collections.abc import Mapping
import copy
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tsformer_jax import config_lib
from tsformer_jax import model as model_lib
from tsformer_jax import tensor_io
from tsformer_jax.checkpoints import adapt
from tsformer_jax.checkpoints import hub
from tsformer_jax.checkpoints.formats import hf
from tsformer_jax.checkpoints.formats import orbax
from tsformer_jax.checkpoints.formats import original
from tsformer_jax.checkpoints.formats import state_dicts
from tsformer_jax.checkpoints.formats import vit
from tsformer_jax.checkpoints.spec import CONFIG_ITEM
from tsformer_jax.checkpoints.spec import PARAMS_ITEM

_LOG = logging.getLogger(__name__)

FORMATS = ('orbax', 'hf_timesformer', 'original', 'vit_npz', 'vit_hf',
           'vit_timm')
IMAGE_FORMATS = ('vit_npz', 'vit_hf', 'vit_timm')
_READERS = {'hf_timesformer': hf.read, 'original': original.read,
            'vit_timm': vit.read_timm, 'vit_hf': vit.read_hf,
            'vit_npz': vit.read_npz}


def detect_format(path: str) -> str:
  """The format (`FORMATS`) of a checkpoint file or directory."""
  path = hub.resolve(os.fspath(path))
  if os.path.isdir(path):
    return _directory_format(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file or directory.')
  if path.endswith('.npz'):
    return 'vit_npz'
  return _format_from_keys(
      state_dicts.state_dict(tensor_io.read_tensors(path), path), path)


def read_checkpoint(path: str, format: str = 'auto', hint=None
                    ) -> tuple[str, ml_collections.ConfigDict, dict]:
  """Reads a checkpoint in its own shapes: `(format, config, params)`.

  Args:
    path: a checkpoint file or directory (see `FORMATS`), or a Hugging
      Face Hub id, `owner/name[@revision]` (see `hub`).
    format: one of `FORMATS`, or 'auto' to detect it.
    hint: the config the weights are meant for, or None. Formats that do
      not record every size take from it what the weights cannot show: the
      number of heads (otherwise that of the ViT of that width), the number
      of frames of `space_only` (otherwise the file's cfg, else 8) and a
      non-square patch grid.

  Returns:
    The format, the config the weights fit, and the params (float32 numpy)
    of `create_model(config)`; image models (`IMAGE_FORMATS`) come back as
    one-frame `space_only` models.
  """
  path = os.fspath(path)
  if format != 'auto' and format not in FORMATS:
    raise ValueError(f'Unknown checkpoint format {format!r}; valid: '
                     f'{["auto", *FORMATS]}.')
  path = hub.resolve(path)  # A Hub id: its snapshot in the Hub's cache.
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file or directory.')
  hf_config, raw = None, None
  if os.path.isdir(path):
    found = _directory_format(path)
    if found == 'orbax':
      if format not in ('auto', 'orbax'):
        raise ValueError(f'{path} is an orbax checkpoint, not {format!r}.')
      return ('orbax',) + orbax.read(path)
    hf_config = hf.read_json(os.path.join(path, 'config.json'))
    state = hf.read_weights(path)
  else:
    if path.endswith('.npz'):
      state = tensor_io.read_npz(path)
    else:
      raw = tensor_io.read_tensors(path)
      state = state_dicts.state_dict(raw, path)
    found = 'vit_npz' if path.endswith('.npz') else _format_from_keys(state,
                                                                      path)
    sibling = os.path.join(os.path.dirname(path) or '.', 'config.json')
    if os.path.isfile(sibling):
      hf_config = hf.read_json(sibling)
  fmt = found if format == 'auto' else format
  if hf_config is not None and hf_config.get('model_type') != {
      'hf_timesformer': 'timesformer', 'vit_hf': 'vit'}.get(fmt):
    hf_config = None  # Not this checkpoint's config.json.
  if fmt == 'orbax':
    raise ValueError(f'{path}: an orbax checkpoint is a directory.')
  # Each reader takes the metadata its format keeps beside the weights.
  metadata = hf_config
  if fmt == 'original' and isinstance(raw, Mapping):
    metadata = raw.get('cfg')  # The original's training config (YAML).
  config, params = _READERS[fmt](state, metadata, hint, path)
  return fmt, config, params


def _directory_format(path: str) -> str:
  # A training run's checkpoints/ is orbax even when no step is whole.
  if orbax.find(path) or orbax.step_directories(path):
    return 'orbax'
  config_file = os.path.join(path, 'config.json')
  if os.path.isfile(config_file):
    model_type = hf.read_json(config_file).get('model_type')
    formats = {'timesformer': 'hf_timesformer', 'vit': 'vit_hf'}
    if model_type in formats:
      return formats[model_type]
    raise ValueError(f'{config_file}: unsupported model_type {model_type!r}; '
                     'valid: timesformer, vit.')
  raise ValueError(f'{path}: unknown checkpoint format: a directory with '
                   f'neither {PARAMS_ITEM}/ and {CONFIG_ITEM}/ (orbax) nor '
                   'config.json (Hugging Face).')


def _format_from_keys(state: Mapping[str, Any], path: str) -> str:
  keys = list(state)
  # HF TimeSformer fuses q, k, v (HF ViT does not); a `TimesformerModel`'s
  # names have no 'timesformer.' prefix.
  if any(k.startswith('timesformer.') or
         k.endswith('attention.attention.qkv.weight') for k in keys):
    return 'hf_timesformer'
  if any(k.endswith('attention.attention.query.weight') for k in keys):
    return 'vit_hf'
  embed = [k for k in keys if k.endswith('patch_embed.proj.weight')]
  if embed:
    prefix = embed[0][:-len('patch_embed.proj.weight')]
    video = any('temporal_attn.' in k or k.endswith('time_embed')
                for k in keys)
    return 'original' if prefix.endswith('model.') or video else 'vit_timm'
  raise ValueError(f'{path}: unknown checkpoint format; valid: {FORMATS} '
                   f'(its first names: {keys[:5]}).')


def load_checkpoint(path: str, config=None, *, format: str = 'auto',
                    num_classes: int | None = None,
                    rng: jax.Array | None = None,
                    pos_resize: str = '2d', fit: bool = True
                    ) -> tuple[ml_collections.ConfigDict, dict]:
  """`(config, params)` from a checkpoint of any format in `FORMATS`.

  Args:
    path: a checkpoint file or directory, or a Hugging Face Hub id.
    config: the config to load into (fields it lacks take their values as
      `config_lib.upgrade` gives them), or None for the checkpoint's own
      (for an image ViT: the recipe's divided attention over 8 frames of
      its frame size, its class count, or the recipe's when it has no
      head).
    format: one of `FORMATS`, or 'auto' to detect it.
    num_classes: overrides `config.model.num_classes`.
    rng: PRNG key for a new head; from `config.seed` when None.
    pos_resize: '2d' (default) or '1d', see `resample_pos_embedding`.
    fit: fit a video checkpoint's weights to a `config` they do not match
      (resample embeddings, inflate, a new head); False fails instead,
      naming each change, except a new head that `num_classes` asks for.
      Image weights always become a video model.

  Returns:
    The config (a copy; never the one passed) and the params (float32 numpy)
    of `create_model(config)`.
  """
  if config is not None:
    config = config_lib.upgrade(config)  # A copy, whole.
  fmt, src_config, params = read_checkpoint(path, format, hint=config)
  if config is None:
    config = _default_config(fmt, src_config)
  if num_classes is not None:
    config.model.num_classes = int(num_classes)
  if rng is None:
    rng = jax.random.key(config.seed)
  allowed = None
  if not fit and fmt not in IMAGE_FORMATS:
    allowed = ('head',) if num_classes is not None else ()
  params = adapt.adapt_params(params, src_config, config, rng=rng,
                              pos_resize=pos_resize, source=os.fspath(path),
                              allowed=allowed)
  if fmt not in IMAGE_FORMATS:  # ImageNet's are RGB, and only a start.
    _log_channel_order(config, src_config, os.fspath(path))
  return _name_classes(config, src_config), params


def _log_channel_order(config, src_config, source: str):
  """Warns where `config` gives the weights pixels in another channel order
  than theirs (`config.data.channel_order`; the checkpoint's own config
  keeps theirs)."""
  ours, theirs = config.data.channel_order, src_config.data.channel_order
  if ours != theirs:
    _LOG.warning(
        '%s takes %s pixels but config.data.channel_order is %r, so it will '
        'be given %s (--config.data.channel_order=%s keeps its own).', source,
        theirs.upper(), ours, ours.upper(), theirs)


def _name_classes(config, src_config) -> ml_collections.ConfigDict:
  """`config` with the class names that fit its head: its own, else the
  checkpoint's; none where the head has another size."""
  count = config.model.num_classes
  names = [n for n in (config.data.class_names, src_config.data.class_names)
           if n and len(n) == count]
  with config.unlocked():
    config.data.class_names = tuple(names[0]) if names else ()
  return config


def _default_config(fmt, src_config) -> ml_collections.ConfigDict:
  if fmt not in IMAGE_FORMATS:
    return copy.deepcopy(src_config)
  config = config_lib.get_config('divided')
  config.model.update({k: src_config.model[k] for k in (
      'image_size', 'patch_size', 'hidden_size', 'depth', 'num_heads',
      'mlp_dim')})
  # A headless image model gets the recipe's classes.
  if src_config.model.num_classes:
    config.model.num_classes = src_config.model.num_classes
  return config


def init_source(config) -> str | None:
  """Where `config.init_from.path` is on disk (a Hub id: fetched into the
  Hub's cache now, if missing), or None for random weights (`SCRATCH`).

  Training calls it before anything else costly, so that weights that
  cannot be had stop the job at once, in one line.

  Raises:
    ValueError: the path is empty (it must name weights, or `SCRATCH`), an
      unknown format or pos_resize, or a Hub id that cannot be read here.
    FileNotFoundError: no such file, and no such Hub repo, or not in the
      Hub's cache and the Hub cannot be asked (`HF_HUB_OFFLINE`, no
      network). Each message says how to fetch the weights and how to
      start from random ones instead.
  """
  init_from = config.init_from
  path = os.fspath(init_from.path)
  scratch = f'--config.init_from.path={config_lib.SCRATCH}'
  if not path:
    raise ValueError(
        'config.init_from.path is empty: set it to the weights to start from '
        '(a checkpoint or a Hugging Face Hub id; the paper\'s is '
        f'{config_lib.IMAGENET_VIT}), or train from random weights: '
        f'{scratch}.')
  fmt = init_from.format
  if fmt not in ('auto', *FORMATS):
    raise ValueError(f'Unknown config.init_from.format {fmt!r}; valid: '
                     f'{["auto", *FORMATS]}.')
  pos_resize = init_from.pos_resize
  if pos_resize not in adapt.POS_RESIZE_MODES:
    raise ValueError(f'Unknown config.init_from.pos_resize {pos_resize!r}; '
                     f'valid: {list(adapt.POS_RESIZE_MODES)}.')
  if path == config_lib.SCRATCH:
    return None
  # The Hub's messages end with how to fetch; training adds the other way.
  instead = f'; to train from random weights instead: {scratch}.'
  try:
    local = hub.resolve(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f'config.init_from.path={str(e).rstrip(".")}{instead}') from e
  except ValueError as e:
    raise ValueError(
        f'config.init_from.path={str(e).rstrip(".")}{instead}') from e
  if not os.path.exists(local):
    raise FileNotFoundError(f'config.init_from.path={path}: no such file or '
                            f'directory{instead}')
  return local


def init_params_from(config, rng: jax.Array):
  """The params training starts from, as `config.init_from` says.

  `SCRATCH`: `init_params(config, rng)`. Otherwise the checkpoint at
  `init_source(config)`, of `config.init_from.format` ('auto' detects it),
  fitted to `config.model` (see `load_checkpoint`; `rng` draws a new head).
  """
  source = init_source(config)
  if source is None:
    return model_lib.init_params(config, rng)
  init_from = config.init_from
  _, params = load_checkpoint(
      source, config, format=init_from.format, rng=rng,
      pos_resize=init_from.pos_resize)
  _LOG.info('Initialised from %s.', init_from.path)
  return jax.tree.map(jnp.asarray, params)
