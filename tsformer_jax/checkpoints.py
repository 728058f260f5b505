"""Checkpoints: read every source of weights, fit it to a config, write orbax.

Sources (`FORMATS`; `detect_format` tells them apart by their contents):

| format           | what                                                  |
|------------------|-------------------------------------------------------|
| `orbax`          | ours: a directory with `params/` and `config/` (JSON) |
| `hf_timesformer` | Hugging Face TimeSformer: a directory with            |
|                  | `config.json` and `model.safetensors` (or             |
|                  | `pytorch_model.bin`, or shards of either)             |
| `original`       | the original implementation's `.pyth` (`model_state`) |
| `vit_npz`        | ImageNet ViT of the original ViT release (`.npz`)     |
| `vit_hf`         | ViT in Hugging Face `ViTModel` layout                 |
| `vit_timm`       | ViT in timm layout: the file the original TimeSformer |
|                  | initialises from (`jx_vit_base_p16_224-80ecf9dd.pth`) |

Every reader returns its weights in our parameter tree together with the
config they fit (`read_checkpoint`). An image model comes back as what it is:
a one-frame `space_only` TimeSformer. `adapt_params` then fits the weights to
the config asked for, logging every change:

- position embedding resampled to the new patch grid (`resample_pos_embedding`:
  nearest neighbour on the 2D grid by default, or the original's 1D resize of
  the flattened sequence), time embedding resampled along time
  (`resample_time_embedding`, nearest) or started at zero;
- a single-step scheme (ViT, `space_only`, `joint`) inflated into any other:
  the last attention step of every block takes the image attention, every
  earlier step a copy of it, as the original does for `temporal_attn` and
  `temporal_norm1`, and the steps' output layers (`temporal_fc`) start at
  zero, so the inflated model begins as the image model. The original only
  did this for divided attention; we do the same for sparse local-global and
  axial, whose first steps then start as the same attention over their groups;
- a new head (truncated normal, std 0.02) when the class count differs.

Torch weights carry no token order: the original's `(h, w, t)` order only
concerns activations, and our model lays tokens out as `[B, T, N, D]` itself.
So converting torch layouts is renaming plus transposing, checked leaf by leaf.

Pickled files (`.pyth`, `.bin`, `.pth`) are read by `tensor_io.read_torch`,
which never runs pickled code, and nothing here needs torch.
"""

from __future__ import annotations

from collections.abc import Mapping
import copy
import functools
import json
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tsformer_jax import attention
from tsformer_jax import config_lib
from tsformer_jax import model as model_lib
from tsformer_jax import tensor_io

_LOG = logging.getLogger(__name__)

FORMATS = ('orbax', 'hf_timesformer', 'original', 'vit_npz', 'vit_hf',
           'vit_timm')
IMAGE_FORMATS = ('vit_npz', 'vit_hf', 'vit_timm')
POS_RESIZE_MODES = ('2d', '1d')
# The items of our orbax checkpoints; the training loop's hold the params
# inside its `state` item.
PARAMS_ITEM, CONFIG_ITEM, STATE_ITEM = 'params', 'config', 'state'

# Hugging Face `TimesformerConfig.attention_type` -> our scheme names.
HF_ATTENTION_TYPES = {
    'divided_space_time': 'divided',
    'joint_space_time': 'joint',
    'space_only': 'space_only',
}
# The schemes that PyTorch implementations have (and so torch names).
TORCH_SCHEMES = tuple(HF_ATTENTION_TYPES.values())


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Our config for a Hugging Face `TimesformerConfig` (its `to_dict()`)."""
  attention_type = hf_config.get('attention_type', 'divided_space_time')
  if attention_type not in HF_ATTENTION_TYPES:
    raise ValueError(f'Unknown Hugging Face attention_type '
                     f'{attention_type!r}; valid: '
                     f'{sorted(HF_ATTENTION_TYPES)}.')
  if hf_config.get('hidden_act', 'gelu') != 'gelu':
    raise ValueError(f'hidden_act {hf_config["hidden_act"]!r} is not '
                     'supported; TimeSformer uses exact GELU ("gelu").')
  if not hf_config.get('qkv_bias', True):
    raise ValueError('qkv_bias=False is not supported.')
  config = config_lib.get_config(HF_ATTENTION_TYPES[attention_type])
  size = hf_config.get('image_size', 224)
  num_labels = hf_config.get('num_labels')
  if num_labels is None:
    num_labels = len(hf_config.get('id2label') or {}) or 2
  config.model.update(dict(
      num_classes=int(num_labels),
      num_frames=int(hf_config.get('num_frames', 8)),
      image_size=(size, size) if isinstance(size, int) else tuple(size),
      patch_size=int(hf_config.get('patch_size', 16)),
      hidden_size=int(hf_config.get('hidden_size', 768)),
      depth=int(hf_config.get('num_hidden_layers', 12)),
      num_heads=int(hf_config.get('num_attention_heads', 12)),
      mlp_dim=int(hf_config.get('intermediate_size', 3072)),
      dropout=float(hf_config.get('hidden_dropout_prob', 0.0)),
      attention_dropout=float(hf_config.get('attention_probs_dropout_prob',
                                            0.0)),
      drop_path=float(hf_config.get('drop_path_rate', 0.0)),
      layer_norm_eps=float(hf_config.get('layer_norm_eps', 1e-6)),
  ))
  return config


# ----------------------------------------------------------------------------
# Torch names

# The module and parameter names of the PyTorch implementations, relative to
# their backbone prefix. `attention` is the ViT attention (our last step),
# `temporal` the divided block's temporal step.
TORCH_NAMES = {
    'hf': dict(
        embedding='embeddings.patch_embeddings.projection', norm='layernorm',
        head='classifier', block='encoder.layer.{i}',
        attention=dict(norm='layernorm_before',
                       qkv='attention.attention.qkv',
                       proj='attention.output.dense'),
        temporal=dict(norm='temporal_layernorm',
                      qkv='temporal_attention.attention.qkv',
                      proj='temporal_attention.output.dense',
                      fc='temporal_dense'),
        mlp_norm='layernorm_after', fc1='intermediate.dense',
        fc2='output.dense',
        parameters=dict(cls='embeddings.cls_token',
                        pos_embedding='embeddings.position_embeddings',
                        time_embedding='embeddings.time_embeddings')),
    'original': dict(
        embedding='patch_embed.proj', norm='norm', head='head',
        block='blocks.{i}',
        attention=dict(norm='norm1', qkv='attn.qkv', proj='attn.proj'),
        temporal=dict(norm='temporal_norm1', qkv='temporal_attn.qkv',
                      proj='temporal_attn.proj', fc='temporal_fc'),
        mlp_norm='norm2', fc1='mlp.fc1', fc2='mlp.fc2',
        parameters=dict(cls='cls_token', pos_embedding='pos_embed',
                        time_embedding='time_embed')),
}


def torch_names(model_config, layout: str, prefix: str = '',
                head_prefix: str | None = None
                ) -> tuple[dict[str, str], dict[str, str]]:
  """Torch names of our modules and top-level parameters.

  Args:
    model_config: `config.model`; its attention must be one of
      `TORCH_SCHEMES`.
    layout: 'hf' (Hugging Face TimeSformer and ViT) or 'original' (the
      original TimeSformer, and timm's ViT).
    prefix: the backbone's prefix, e.g. 'timesformer.' or 'model.'.
    head_prefix: the head's prefix; `prefix` when None.

  Returns:
    `(module_names, parameter_names)`: our module path
    ('block_0/space_attention/qkv') -> torch module name, and our
    top-level parameter ('pos_embedding') -> torch parameter name.
  """
  if model_config.attention not in TORCH_SCHEMES:
    raise ValueError(f'PyTorch TimeSformers have no {model_config.attention!r}'
                     f' attention; they have {list(TORCH_SCHEMES)}.')
  names = TORCH_NAMES[layout]
  head_prefix = prefix if head_prefix is None else head_prefix
  modules = {'embedding': prefix + names['embedding'],
             'norm': prefix + names['norm'],
             'head': head_prefix + names['head']}
  last = attention.get_scheme(model_config.attention).steps[-1].grouping
  for i in range(model_config.depth):
    ours, theirs = f'block_{i}', prefix + names['block'].format(i=i)
    for part, name in names['attention'].items():
      modules[f'{ours}/{last}_attention/{part}'] = f'{theirs}.{name}'
    if model_config.attention == 'divided':
      for part, name in names['temporal'].items():
        modules[f'{ours}/time_attention/{part}'] = f'{theirs}.{name}'
    modules[f'{ours}/mlp_norm'] = f'{theirs}.{names["mlp_norm"]}'
    modules[f'{ours}/mlp/fc1'] = f'{theirs}.{names["fc1"]}'
    modules[f'{ours}/mlp/fc2'] = f'{theirs}.{names["fc2"]}'
  parameters = {ours: prefix + theirs
                for ours, theirs in names['parameters'].items()}
  return modules, parameters


def hf_module_names(model_config) -> dict[str, str]:
  """Our module path ('block_0/space_attention/qkv') -> HF module name."""
  return torch_names(model_config, 'hf', 'timesformer.', '')[0]


HF_PARAMETER_NAMES = torch_names(
    ml_collections.ConfigDict(dict(attention='divided', depth=0)), 'hf',
    'timesformer.')[1]


# ----------------------------------------------------------------------------
# State dicts -> our parameter tree

def params_from_hf_state_dict(state_dict: Mapping[str, Any], config,
                              source: str = 'state dict') -> dict:
  """Our `params` from a Hugging Face `TimesformerForVideoClassification`.

  Args:
    state_dict: parameter name -> array (numpy, or anything `np.asarray`
      takes, such as CPU torch tensors).
    config: our config; `config_from_hf` makes it from the HF config.
    source: names the checkpoint in error messages.

  Returns:
    The `params` pytree of `create_model(config)`.
  """
  modules, parameters = torch_names(config.model, 'hf', 'timesformer.', '')
  return params_from_torch_state_dict(state_dict, config, modules,
                                      parameters, source)


def params_from_original_state_dict(state_dict: Mapping[str, Any], config,
                                    source: str = 'state dict',
                                    prefix: str = 'model.') -> dict:
  """Our `params` from the original TimeSformer's `model_state`.

  Also reads timm's ViT (`prefix=''`, `config.model.attention='space_only'`),
  whose names the original kept.
  """
  modules, parameters = torch_names(config.model, 'original', prefix)
  return params_from_torch_state_dict(state_dict, config, modules,
                                      parameters, source)


def params_from_torch_state_dict(state_dict: Mapping[str, Any], config,
                                 module_names: Mapping[str, str],
                                 parameter_names: Mapping[str, str],
                                 source: str) -> dict:
  """Fills our parameter tree from torch names, checking every shape.

  Args:
    state_dict: torch parameter name -> array.
    config: our config, whose `config.model` fixes every expected shape.
    module_names: our module path -> torch module name; its `kernel`,
      `scale` and `bias` come from the torch module's `weight` and `bias`.
    parameter_names: our top-level parameter -> torch parameter name.
    source: names the checkpoint in error messages.

  Raises:
    ValueError: naming the missing, unused or misshapen parameters.
  """
  return params_from_state_dict(state_dict, config, module_names,
                                parameter_names, source=source,
                                layout='torch')


def params_from_state_dict(state_dict: Mapping[str, Any], config,
                           module_names: Mapping[str, str],
                           parameter_names: Mapping[str, str], *,
                           source: str, layout: str) -> dict:
  """`params_from_torch_state_dict` for torch or flax layouts.

  `layout='torch'`: modules hold `.weight` and `.bias` in torch's layout.
  `layout='flax'`: modules hold `/kernel`, `/scale` and `/bias` in ours.
  """
  template = _template(config)
  state = dict(state_dict)
  used, missing, params = set(), [], {}
  for path, leaf in template.items():
    module, _, kind = path.rpartition('/')
    if path in parameter_names:
      key = parameter_names[path]
    elif module in module_names and layout == 'torch':
      key = module_names[module] + ('.bias' if kind == 'bias' else '.weight')
    elif module in module_names:
      key = f'{module_names[module]}/{kind}'
    else:
      raise ValueError(f'No {layout} name known for parameter {path!r}.')
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    value = np.asarray(state[key], np.float32)
    if layout == 'torch':
      params[path] = _to_flax(value, leaf.shape, kind, path, key, source)
    elif value.shape != leaf.shape:
      raise ValueError(f'{source}: parameter {key!r} has shape '
                       f'{list(value.shape)} but {path!r} needs '
                       f'{list(leaf.shape)}.')
    else:
      params[path] = value
  unused = sorted(set(state) - used)
  if missing or unused:
    raise ValueError(f'{source} does not fit config.model '
                     f'(attention={config.model.attention!r}, '
                     f'depth={config.model.depth}): missing {missing}, '
                     f'unused {unused}.')
  return flax.traverse_util.unflatten_dict(params, sep='/')


def _to_flax(value: np.ndarray, shape: tuple[int, ...], kind: str, path: str,
             key: str, source: str) -> np.ndarray:
  """One torch tensor in our layout, or an error naming both shapes."""
  if kind == 'kernel' and value.ndim == 4:  # Conv: [D, 3, p, p] -> [p, p, 3, D]
    value = value.transpose(2, 3, 1, 0)
  elif kind == 'kernel':  # Linear: [out, in] -> [in, out], then split heads.
    value = value.T
  if not _fits(value.shape, shape):
    raise ValueError(f'{source}: parameter {key!r} has shape '
                     f'{list(value.shape)} in our layout but {path!r} needs '
                     f'{list(shape)}.')
  return value.reshape(shape)


def _fits(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
  """Whether `have` reshapes to `want` without mixing axes."""
  if len(have) == 1:  # Biases split into heads: [3 * D] -> [3, H, Dh].
    return have[0] == int(np.prod(want))
  if len(have) == 2:  # Kernels [in, out] with heads split on either side.
    return any(int(np.prod(want[:s])) == have[0] and
               int(np.prod(want[s:])) == have[1] for s in range(len(want) + 1))
  return tuple(have) == tuple(want)


def _template(config) -> dict[str, jax.ShapeDtypeStruct]:
  """The flat ('block_0/mlp/fc1/kernel') parameter shapes of `config`."""
  return dict(_model_template(config.model.to_json()))


@functools.lru_cache(maxsize=16)
def _model_template(model_json: str) -> dict[str, jax.ShapeDtypeStruct]:
  config = ml_collections.ConfigDict(
      {'model': config_from_json(json.loads(model_json))})
  shapes = jax.eval_shape(
      lambda: model_lib.init_params(config, jax.random.key(0)))
  return flax.traverse_util.flatten_dict(shapes, sep='/')


# ----------------------------------------------------------------------------
# Resampling

def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output index, as torch's `mode='nearest'`.

  `floor(i * in_size / out_size)` in float32, like PyTorch's (and the
  original TimeSformer's) `F.interpolate(..., mode='nearest')`.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  index = np.floor(np.arange(out_size, dtype=np.float32) * scale)
  return np.minimum(index.astype(np.int64), in_size - 1)


def resample_pos_embedding(pos: np.ndarray, old_grid: tuple[int, int],
                           new_grid: tuple[int, int],
                           mode: str = '2d') -> np.ndarray:
  """`[1, 1 + h*w, D]` -> `[1, 1 + h'*w', D]`; the class entry is kept.

  Args:
    pos: the position embedding, class token's entry first, then the
      patches row by row.
    old_grid: `(h, w)` patches of `pos`.
    new_grid: `(h', w')` patches wanted.
    mode: '2d' resizes the patch grid with nearest-neighbour interpolation
      (what the original does when it meets a new frame size at inference);
      '1d' resizes the flattened sequence of h*w entries with nearest
      interpolation (what the original does when loading ImageNet weights),
      which scrambles rows when the grid changes but reproduces it exactly.
  """
  if mode not in POS_RESIZE_MODES:
    raise ValueError(f'Unknown position embedding resize {mode!r}; valid: '
                     f'{list(POS_RESIZE_MODES)}.')
  (h, w), (nh, nw) = old_grid, new_grid
  if pos.ndim != 3 or pos.shape[:2] != (1, 1 + h * w):
    raise ValueError(f'Position embedding of shape {list(pos.shape)} does '
                     f'not fit a {h} x {w} patch grid: expected '
                     f'[1, {1 + h * w}, D].')
  cls, patches = pos[:, :1], pos[:, 1:]
  if mode == '1d':
    patches = patches[:, nearest_indices(h * w, nh * nw)]
  else:
    grid = patches.reshape(1, h, w, -1)
    grid = grid[:, nearest_indices(h, nh)][:, :, nearest_indices(w, nw)]
    patches = grid.reshape(1, nh * nw, -1)
  return np.concatenate([cls, patches], axis=1)


def resample_time_embedding(time: np.ndarray, num_frames: int) -> np.ndarray:
  """`[1, T, D]` -> `[1, num_frames, D]`, nearest along time."""
  return time[:, nearest_indices(time.shape[1], num_frames)]


# ----------------------------------------------------------------------------
# Adapting weights to a config

_TRUNC_NORMAL = nn.initializers.truncated_normal(stddev=0.02)  # The model's.


def adapt_params(params, src_config, config, *, rng: jax.Array | None = None,
                 pos_resize: str = '2d', source: str = 'checkpoint') -> dict:
  """Fits `params` of `src_config` to `config`, or names what does not fit.

  Args:
    params: our parameter tree for `create_model(src_config)`.
    src_config: the config the params were trained with.
    config: the config wanted; size, depth, width and patch size must agree
      with `src_config`, frames, frame size, class count and (from a
      single-step scheme) attention scheme may differ.
    rng: PRNG key for a new head; key 0 when None.
    pos_resize: see `resample_pos_embedding`.
    source: names the checkpoint in errors and logs.

  Returns:
    Parameters (float32 numpy) for `create_model(config)`.

  Raises:
    ValueError: the schemes cannot be mapped, or parameters are missing,
      unexpected or misshapen (each named with both shapes).
  """
  src, dst = src_config.model, config.model
  sizes = ('hidden_size', 'depth', 'num_heads', 'mlp_dim', 'patch_size')
  if any(src[k] != dst[k] for k in sizes):
    raise ValueError(
        f'{source} does not fit config.model: the checkpoint has '
        f'{", ".join(f"{k}={src[k]}" for k in sizes)} but config.model '
        f'{", ".join(f"{k}={dst[k]}" for k in sizes)}.')
  src_scheme = attention.get_scheme(src.attention)
  dst_scheme = attention.get_scheme(dst.attention)
  flat = {k: np.asarray(v, np.float32) for k, v in
          flax.traverse_util.flatten_dict(params, sep='/').items()}
  same = src.attention == dst.attention
  if not same and len(src_scheme.steps) != 1:
    raise ValueError(f'{source}: cannot load {src.attention!r} weights into '
                     f'a {dst.attention!r} model: only single-step weights '
                     '(an image ViT, space_only or joint) inflate into '
                     'another scheme.')
  if not same:
    flat = _inflate(flat, src_scheme, dst_scheme, source)
    _LOG.info('%s: inflated %s into %s: steps %s start as copies of its '
                 'attention, their output layers at zero.', source,
                 src.attention, dst.attention,
                 [s.grouping for s in dst_scheme.steps])

  old, new = _patch_grid(src), _patch_grid(dst)
  pos = flat.get('pos_embedding')
  if old != new and pos is not None and pos.shape[1] == 1 + old[0] * old[1]:
    flat['pos_embedding'] = resample_pos_embedding(pos, old, new, pos_resize)
    _LOG.info('%s: resampled pos_embedding from %s to %s patches '
                 '(nearest, %s).', source, old, new, pos_resize)

  time = flat.pop('time_embedding', None)
  if not dst_scheme.per_frame:
    if time is None:
      width = flat['cls'].shape[-1] if 'cls' in flat else dst.hidden_size
      time = np.zeros((1, dst.num_frames, width), np.float32)
      _LOG.info('%s: time_embedding starts at zero.', source)
    elif time.shape[1] != dst.num_frames:
      _LOG.info('%s: resampled time_embedding from %d to %d frames '
                   '(nearest).', source, time.shape[1], dst.num_frames)
      time = resample_time_embedding(time, dst.num_frames)
    flat['time_embedding'] = time
  elif time is not None:
    _LOG.info('%s: dropped time_embedding (%s has none).', source,
                 dst.attention)

  kernel = flat.pop('head/kernel', None)
  bias = flat.pop('head/bias', None)
  if dst.num_classes:
    if kernel is not None and kernel.shape[-1] == dst.num_classes:
      flat['head/kernel'], flat['head/bias'] = kernel, bias
    else:
      width = flat['cls'].shape[-1] if 'cls' in flat else dst.hidden_size
      rng = jax.random.key(0) if rng is None else rng
      flat['head/kernel'] = np.asarray(
          _TRUNC_NORMAL(rng, (width, dst.num_classes)), np.float32)
      flat['head/bias'] = np.zeros((dst.num_classes,), np.float32)
      _LOG.info('%s: new head for %d classes (checkpoint: %s).', source,
                   dst.num_classes,
                   'no head' if kernel is None else kernel.shape[-1])
  elif kernel is not None:
    _LOG.info('%s: dropped the head (num_classes=0).', source)

  check_params(flat, config, source)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def _inflate(flat: dict[str, np.ndarray], src_scheme: attention.Scheme,
             dst_scheme: attention.Scheme, source: str
             ) -> dict[str, np.ndarray]:
  """A single-step scheme's blocks into `dst_scheme`'s steps."""
  src_step = f'{src_scheme.steps[0].grouping}_attention'
  out, blocks = {}, set()
  for path, value in flat.items():
    parts = path.split('/')
    if not (parts[0].startswith('block_') and parts[1] == src_step):
      out[path] = value
      continue
    blocks.add(parts[0])
    for step in dst_scheme.steps:
      out['/'.join([parts[0], f'{step.grouping}_attention'] + parts[2:])] = (
          value)
  for block in blocks:
    width = flat[f'{block}/{src_step}/proj/bias'].shape[-1]
    for step in dst_scheme.steps:
      if step.output_fc:  # Zero, so that the copied step adds nothing.
        fc = f'{block}/{step.grouping}_attention/fc'
        out[f'{fc}/kernel'] = np.zeros((width, width), np.float32)
        out[f'{fc}/bias'] = np.zeros((width,), np.float32)
  for step in dst_scheme.steps[:-1]:
    if not step.output_fc:
      _LOG.warning('%s: step %s has no output layer to zero; the '
                      'inflated model differs from the image model.', source,
                      step.grouping)
  return out


def _patch_grid(model_config) -> tuple[int, int]:
  size = model_config.image_size
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  return h // model_config.patch_size, w // model_config.patch_size


def check_params(params, config, source: str = 'params') -> None:
  """Raises a ValueError naming every missing, extra or misshapen parameter.

  Args:
    params: a nested or flat ('block_0/mlp/fc1/kernel') parameter tree.
    config: the config whose model the params must fit.
    source: names the checkpoint in the error.
  """
  flat = params
  if any(isinstance(v, Mapping) for v in params.values()):
    flat = flax.traverse_util.flatten_dict(params, sep='/')
  template = _template(config)
  missing = sorted(set(template) - set(flat))
  unexpected = sorted(set(flat) - set(template))
  misshapen = [f'{path!r} has {list(np.shape(flat[path]))} but config.model '
               f'needs {list(template[path].shape)}'
               for path in sorted(set(flat) & set(template))
               if tuple(np.shape(flat[path])) != template[path].shape]
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


# ----------------------------------------------------------------------------
# Reading each format

def detect_format(path: str) -> str:
  """The format (`FORMATS`) of a checkpoint file or directory."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return _directory_format(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file or directory.')
  if path.endswith('.npz'):
    return 'vit_npz'
  return _format_from_keys(_state_dict(tensor_io.read_tensors(path), path),
                           path)


def read_checkpoint(path: str, format: str = 'auto', hint=None
                    ) -> tuple[str, ml_collections.ConfigDict, dict]:
  """Reads a checkpoint in its own shapes: `(format, config, params)`.

  Args:
    path: a checkpoint file or directory (see `FORMATS`).
    format: one of `FORMATS`, or 'auto' to detect it.
    hint: the config the weights are meant for, or None. Formats that do
      not record every size take from it what the weights cannot show: the
      number of heads (otherwise width / 64, as in every ViT-B), the number
      of frames of `space_only` (otherwise 8) and a non-square patch grid.

  Returns:
    The format, the config the weights fit, and the params (float32 numpy)
    of `create_model(config)`; image models (`IMAGE_FORMATS`) come back as
    one-frame `space_only` models.
  """
  path = os.fspath(path)
  if format != 'auto' and format not in FORMATS:
    raise ValueError(f'Unknown checkpoint format {format!r}; valid: '
                     f'{["auto", *FORMATS]}.')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file or directory.')
  hf_config = None
  if os.path.isdir(path):
    found = _directory_format(path)
    if found == 'orbax':
      if format not in ('auto', 'orbax'):
        raise ValueError(f'{path} is an orbax checkpoint, not {format!r}.')
      return ('orbax',) + _read_orbax(path)
    hf_config = _read_json(os.path.join(path, 'config.json'))
    state = _read_hf_weights(path)
  else:
    if path.endswith('.npz'):
      state = tensor_io.read_npz(path)
    else:
      state = _state_dict(tensor_io.read_tensors(path), path)
    found = 'vit_npz' if path.endswith('.npz') else _format_from_keys(state,
                                                                      path)
    sibling = os.path.join(os.path.dirname(path) or '.', 'config.json')
    if os.path.isfile(sibling):
      hf_config = _read_json(sibling)
  fmt = found if format == 'auto' else format
  if hf_config is not None and hf_config.get('model_type') != {
      'hf_timesformer': 'timesformer', 'vit_hf': 'vit'}.get(fmt):
    hf_config = None  # Not this checkpoint's config.json.
  if fmt == 'orbax':
    raise ValueError(f'{path}: an orbax checkpoint is a directory.')
  reader = {'hf_timesformer': _read_hf_timesformer,
            'original': _read_original, 'vit_timm': _read_vit_timm,
            'vit_hf': _read_vit_hf, 'vit_npz': _read_vit_npz}[fmt]
  config, params = reader(state, hf_config, hint, path)
  return fmt, config, params


def _directory_format(path: str) -> str:
  if _orbax_directory(path):
    return 'orbax'
  config_file = os.path.join(path, 'config.json')
  if os.path.isfile(config_file):
    model_type = _read_json(config_file).get('model_type')
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
  if any(k.startswith('timesformer.') for k in keys):
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


def _state_dict(obj: Any, path: str) -> dict[str, Any]:
  """The state dict of a loaded file: itself, or its model entry."""
  if isinstance(obj, Mapping):
    for key in ('model_state', 'state_dict', 'model'):
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
    arrays = {k: v for k, v in obj.items()
              if isinstance(v, (tensor_io.LazyArray, np.ndarray))}
    if arrays and len(arrays) == len(obj):
      return dict(arrays)
  raise ValueError(f'{path}: unknown checkpoint format: no state dict of '
                   'tensors (looked for model_state, state_dict, model).')


def _read_json(path: str) -> dict:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _read_hf_weights(path: str) -> dict[str, Any]:
  """A Hugging Face model directory's tensors (single file or shards)."""
  for name in ('model.safetensors', 'pytorch_model.bin'):
    if os.path.isfile(os.path.join(path, name)):
      return _state_dict(tensor_io.read_tensors(os.path.join(path, name)),
                         os.path.join(path, name))
    index = os.path.join(path, name + '.index.json')
    if os.path.isfile(index):
      state = {}
      for shard in sorted(set(_read_json(index)['weight_map'].values())):
        shard = os.path.join(path, shard)
        state.update(_state_dict(tensor_io.read_tensors(shard), shard))
      return state
  raise ValueError(f'{path}: a Hugging Face directory without '
                   'model.safetensors or pytorch_model.bin.')


def _read_hf_timesformer(state, hf_config, hint, source):
  if hf_config is not None:
    config = config_from_hf(hf_config)
  else:
    scheme = _torch_scheme(state, 'temporal_attention.', 'time_embeddings')
    config = _torch_layout_config(state, 'hf', 'timesformer.', '', scheme,
                                  hint, source)
  return config, params_from_hf_state_dict(state, config, source)


def _read_original(state, hf_config, hint, source):
  del hf_config
  prefix = _prefix(state, 'patch_embed.proj.weight', source)
  state = _conv_kernel_from_linear(state, prefix + 'patch_embed.proj.weight')
  scheme = _torch_scheme(state, 'temporal_attn.', 'time_embed')
  config = _torch_layout_config(state, 'original', prefix, prefix, scheme,
                                hint, source)
  return config, params_from_original_state_dict(state, config, source,
                                                 prefix)


def _read_vit_timm(state, hf_config, hint, source):
  del hf_config
  prefix = _prefix(state, 'patch_embed.proj.weight', source)
  state = _conv_kernel_from_linear(state, prefix + 'patch_embed.proj.weight')
  state = _without_pre_logits(state, r'pre_logits\.', prefix + 'head.',
                              source)
  config = _torch_layout_config(state, 'original', prefix, prefix,
                                'space_only', hint, source, frames=1)
  return config, params_from_original_state_dict(state, config, source,
                                                 prefix)


def _read_vit_hf(state, hf_config, hint, source):
  """HF `ViTModel` / `ViTForImageClassification`: q, k, v fused first."""
  prefix = _prefix(state, 'embeddings.patch_embeddings.projection.weight',
                   source)
  state = {k: v for k, v in state.items()
           if not (k.startswith(prefix + 'pooler.') or
                   k == prefix + 'embeddings.mask_token')}
  for key in [k for k in state if '.attention.attention.query.' in k]:
    parts = [state.pop(key.replace('.query.', f'.{n}.'))
             for n in ('query', 'key', 'value')]
    state[key.replace('.query.', '.qkv.')] = np.concatenate(
        [np.asarray(p, np.float32) for p in parts])
  heads = None
  if hf_config is not None:
    heads = int(hf_config.get('num_attention_heads', 12))
  config = _torch_layout_config(state, 'hf', prefix, '', 'space_only', hint,
                                source, frames=1, heads=heads)
  modules, parameters = torch_names(config.model, 'hf', prefix, '')
  return config, params_from_torch_state_dict(state, config, modules,
                                              parameters, source)


# The original ViT release's names, per block `{i}`.
_NPZ_BLOCK = 'Transformer/encoderblock_{i}'
_NPZ_NAMES = dict(norm='LayerNorm_0',
                  attention='MultiHeadDotProductAttention_1',
                  mlp_norm='LayerNorm_2', fc1='MlpBlock_3/Dense_0',
                  fc2='MlpBlock_3/Dense_1')


def _read_vit_npz(state, hf_config, hint, source):
  """The original ViT release: flax layout, q, k, v stacked here."""
  del hf_config
  state = _without_pre_logits(dict(state), r'pre_logits/', 'head/', source)
  for name in ('embedding/kernel', 'Transformer/posembed_input/pos_embedding',
               _NPZ_BLOCK.format(i=0) + '/MlpBlock_3/Dense_0/kernel',
               _NPZ_BLOCK.format(i=0) + '/' + _NPZ_NAMES['attention'] +
               '/query/kernel'):
    if name not in state:
      raise ValueError(f'{source}: not an original ViT .npz: {name!r} is '
                       'missing.')
  depth = 1 + max(int(m.group(1)) for k in state
                  if (m := re.match(r'Transformer/encoderblock_(\d+)/', k)))
  for i in range(depth):
    attn = f'{_NPZ_BLOCK.format(i=i)}/{_NPZ_NAMES["attention"]}'
    for kind, axis in (('kernel', 1), ('bias', 0)):
      names = [f'{attn}/{n}/{kind}' for n in ('query', 'key', 'value')]
      if all(n in state for n in names):
        state[f'{attn}/qkv/{kind}'] = np.stack(
            [np.asarray(state.pop(n)) for n in names], axis=axis)
  patch, _, _, width = np.shape(state['embedding/kernel'])
  heads = np.shape(state[f'{_NPZ_BLOCK.format(i=0)}/'
                         f'{_NPZ_NAMES["attention"]}/qkv/kernel'])[2]
  config = _model_config(
      'space_only', width=width, depth=depth, heads=heads,
      mlp=np.shape(state[f'{_NPZ_BLOCK.format(i=0)}/MlpBlock_3/Dense_0/'
                         'kernel'])[1],
      patch=patch,
      num_patches=np.shape(
          state['Transformer/posembed_input/pos_embedding'])[1] - 1,
      frames=1,
      classes=np.shape(state['head/kernel'])[1] if 'head/kernel' in state
      else 0, hint=hint, source=source)
  modules = {'embedding': 'embedding', 'norm': 'Transformer/encoder_norm',
             'head': 'head'}
  for i in range(depth):
    theirs = _NPZ_BLOCK.format(i=i)
    modules.update({
        f'block_{i}/space_attention/norm': f'{theirs}/{_NPZ_NAMES["norm"]}',
        f'block_{i}/space_attention/qkv':
            f'{theirs}/{_NPZ_NAMES["attention"]}/qkv',
        f'block_{i}/space_attention/proj':
            f'{theirs}/{_NPZ_NAMES["attention"]}/out',
        f'block_{i}/mlp_norm': f'{theirs}/{_NPZ_NAMES["mlp_norm"]}',
        f'block_{i}/mlp/fc1': f'{theirs}/{_NPZ_NAMES["fc1"]}',
        f'block_{i}/mlp/fc2': f'{theirs}/{_NPZ_NAMES["fc2"]}',
    })
  parameters = {'cls': 'cls',
                'pos_embedding': 'Transformer/posembed_input/pos_embedding'}
  return config, params_from_state_dict(state, config, modules, parameters,
                                        source=source, layout='flax')


def _without_pre_logits(state, pattern: str, head: str, source: str):
  """ImageNet-21k files put a tanh layer before the head: drop both."""
  if not any(re.search(pattern, k) for k in state):
    return state
  _LOG.info('%s: dropped pre_logits and the head on top of it.', source)
  return {k: v for k, v in state.items()
          if not (re.search(pattern, k) or k.startswith(head))}


def _prefix(state, suffix: str, source: str) -> str:
  found = sorted(k[:-len(suffix)] for k in state if k.endswith(suffix))
  if not found:
    raise ValueError(f'{source}: missing {suffix!r}.')
  return found[0]


def _conv_kernel_from_linear(state, key):
  """Old timm files store the patch embedding as a linear `[D, 3*p*p]`."""
  value = state[key]
  if len(np.shape(value)) == 2:
    d, n = np.shape(value)
    p = math.isqrt(n // 3)
    state = dict(state)
    state[key] = np.asarray(value, np.float32).reshape(d, 3, p, p)
  return state


def _torch_scheme(state, temporal: str, time: str) -> str:
  if any(temporal in k for k in state):
    return 'divided'
  return 'joint' if any(k.endswith(time) for k in state) else 'space_only'


def _torch_layout_config(state, layout, prefix, head_prefix, scheme, hint,
                         source, frames=None, heads=None
                         ) -> ml_collections.ConfigDict:
  """The config of a torch state dict, from its shapes (and `hint`)."""
  names = TORCH_NAMES[layout]

  def shape(name):
    if name not in state:
      raise ValueError(f'{source}: parameter {name!r} is missing.')
    return tuple(np.shape(state[name]))

  block = re.escape(prefix + names['block'].split('{')[0]) + r'(\d+)\.'
  indices = [int(m.group(1)) for k in state if (m := re.match(block, k))]
  if not indices:
    raise ValueError(f'{source}: no blocks named {prefix}{names["block"]}.')
  params = names['parameters']
  width = shape(prefix + params['pos_embedding'])[-1]
  head = head_prefix + names['head'] + '.weight'
  if frames is None and scheme != 'space_only':
    frames = shape(prefix + params['time_embedding'])[1]
  return _model_config(
      scheme, width=width, depth=max(indices) + 1,
      heads=heads, mlp=shape(
          f'{prefix}{names["block"].format(i=0)}.{names["fc1"]}.weight')[0],
      patch=shape(prefix + names['embedding'] + '.weight')[-1],
      num_patches=shape(prefix + params['pos_embedding'])[1] - 1,
      frames=frames, classes=shape(head)[0] if head in state else 0,
      hint=hint, source=source)


def _model_config(scheme, *, width, depth, heads, mlp, patch, num_patches,
                  frames, classes, hint, source) -> ml_collections.ConfigDict:
  """A config of `scheme` with the given sizes; `hint` fills the gaps."""
  hint_model = hint.model if hint is not None else None
  if heads is None:
    if hint_model is not None and hint_model.hidden_size == width:
      heads = hint_model.num_heads
    else:
      heads = max(1, width // 64)
      _LOG.warning('%s: the file does not record the number of heads; '
                      'assuming %d (head dim 64). Pass a config to set it.',
                      source, heads)
  if frames is None:
    frames = hint_model.num_frames if hint_model is not None else 8
  grid = None
  if hint_model is not None:
    hint_grid = _patch_grid(hint_model)
    if hint_grid[0] * hint_grid[1] == num_patches:
      grid = hint_grid
  if grid is None:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
      raise ValueError(f'{source}: {num_patches} patches do not form a '
                       'square grid; pass a config with the image size.')
    grid = (side, side)
  config = config_lib.get_config(scheme)
  config.model.update(dict(
      num_classes=int(classes), num_frames=int(frames),
      image_size=(grid[0] * int(patch), grid[1] * int(patch)),
      patch_size=int(patch), hidden_size=int(width), depth=int(depth),
      num_heads=int(heads), mlp_dim=int(mlp)))
  return config


# ----------------------------------------------------------------------------
# Orbax

def _orbax_directory(path: str) -> tuple[str, str] | None:
  """`(directory, params item)` of the checkpoint at `path`, or None.

  `path` is a checkpoint (items `params` and `config`, as `save_checkpoint`
  writes; or `state`, holding `params`, and `config`, as the training loop
  writes) or a `CheckpointManager` directory, whose latest step is taken.
  """
  if os.path.isdir(os.path.join(path, CONFIG_ITEM)):
    for item in (PARAMS_ITEM, STATE_ITEM):
      if os.path.isdir(os.path.join(path, item)):
        return path, item
  steps = [int(n) for n in os.listdir(path)
           if n.isdigit() and os.path.isdir(os.path.join(path, n))]
  for step in sorted(steps, reverse=True):
    found = _orbax_directory(os.path.join(path, str(step)))
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


def config_to_json(config) -> dict:
  """`config` as JSON values (tuples become lists)."""
  return json.loads(config.to_json())


def config_from_json(value: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The inverse of `config_to_json`: lists become tuples again."""
  def tuples(v):
    if isinstance(v, Mapping):
      return {k: tuples(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(tuples(x) for x in v)
    return v
  return ml_collections.ConfigDict(tuples(value))


def save_args(config, params) -> ocp.args.Composite:
  """Orbax save args of our layout, for `ocp.CheckpointManager.save`.

  A manager that saves these (plus its own items) writes step directories
  that `load_checkpoint` reads.
  """
  return ocp.args.Composite(**{
      PARAMS_ITEM: ocp.args.StandardSave(jax.device_get(params)),
      CONFIG_ITEM: ocp.args.JsonSave(config_to_json(config))})


def save_checkpoint(path: str, config, params, *,
                    overwrite: bool = False) -> str:
  """Writes `params` and `config` as an orbax checkpoint directory.

  The checkpoint is written beside `path` and renamed into place when
  complete, so a failure leaves nothing at `path`.

  Args:
    path: the directory to create (local filesystem).
    config: the config the params belong to; stored as JSON.
    params: the `params` pytree; checked against `config` first.
    overwrite: replace an existing `path`.

  Returns:
    The absolute path written.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True (--overwrite)'
                          ' to replace it.')
  params = jax.tree.map(lambda x: np.asarray(x, np.float32),
                        jax.device_get(params))
  check_params(params, config, 'params to save')
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


def _read_orbax(path: str) -> tuple[ml_collections.ConfigDict, dict]:
  # Orbax takes absolute paths only; users type relative ones.
  directory, item = _orbax_directory(os.path.abspath(path))
  checkpointer = _checkpointer(item)
  config = config_from_json(checkpointer.restore(
      directory, args=ocp.args.Composite(
          **{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM])
  metadata = checkpointer.metadata(directory).item_metadata[item]
  stored = getattr(metadata, 'tree', metadata)
  if item == STATE_ITEM:
    stored = stored[PARAMS_ITEM]
  check_params({k: jax.ShapeDtypeStruct(tuple(v.shape), np.float32)
                for k, v in flax.traverse_util.flatten_dict(
                    dict(stored), sep='/').items()}, config, directory)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  target = flax.traverse_util.unflatten_dict(
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cpu)
       for k, v in _template(config).items()}, sep='/')
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


# ----------------------------------------------------------------------------
# The API

def load_checkpoint(path: str, config=None, *, format: str = 'auto',
                    num_classes: int | None = None,
                    rng: jax.Array | None = None,
                    pos_resize: str = '2d'
                    ) -> tuple[ml_collections.ConfigDict, dict]:
  """`(config, params)` from a checkpoint of any format in `FORMATS`.

  Args:
    path: a checkpoint file or directory.
    config: the config to load into, or None for the checkpoint's own (for
      an image ViT: divided attention over 8 frames of its frame size, its
      class count, or 400 classes when it has no head).
    format: one of `FORMATS`, or 'auto' to detect it.
    num_classes: overrides `config.model.num_classes`.
    rng: PRNG key for a new head; from `config.seed` when None.
    pos_resize: '2d' (default) or '1d', see `resample_pos_embedding`.

  Returns:
    The config (a copy; never the one passed) and the params (float32 numpy)
    of `create_model(config)`.
  """
  fmt, src_config, params = read_checkpoint(path, format, hint=config)
  if config is None:
    config = _default_config(fmt, src_config)
  else:
    config = copy.deepcopy(config)
  if num_classes is not None:
    config.model.num_classes = int(num_classes)
  if rng is None:
    rng = jax.random.key(config.get('seed', 0))
  params = adapt_params(params, src_config, config, rng=rng,
                        pos_resize=pos_resize, source=os.fspath(path))
  return config, params


def _default_config(fmt, src_config) -> ml_collections.ConfigDict:
  if fmt not in IMAGE_FORMATS:
    return copy.deepcopy(src_config)
  config = config_lib.get_config('divided')
  sizes = {k: src_config.model[k] for k in (
      'image_size', 'patch_size', 'hidden_size', 'depth', 'num_heads',
      'mlp_dim', 'num_classes')}
  config.model.update(sizes)
  config.model.num_classes = sizes['num_classes'] or 400
  return config


def init_params_from(config, rng: jax.Array):
  """The params training starts from: `config.init_from`, or fresh ones.

  `config.init_from.path` empty: `init_params(config, rng)`. Otherwise the
  checkpoint there, of `config.init_from.format` ('auto' detects it),
  fitted to `config.model` (see `load_checkpoint`; `rng` draws a new head).
  """
  init_from = config.get('init_from')
  if init_from is None or not init_from.get('path'):
    return model_lib.init_params(config, rng)
  _, params = load_checkpoint(
      init_from.path, config, format=init_from.get('format', 'auto'),
      rng=rng, pos_resize=init_from.get('pos_resize', '2d'))
  _LOG.info('Initialised from %s.', init_from.path)
  return jax.tree.map(jnp.asarray, params)
