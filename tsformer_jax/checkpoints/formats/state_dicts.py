"""State dicts (name -> array) into our parameter tree, and their config.

Torch weights carry no token order (the original's `(h, w, t)` order
concerns activations only), so converting them is renaming and transposing.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
import re
from typing import Any

import flax
import ml_collections
import numpy as np

from tsformer_jax import attention
from tsformer_jax import config_lib
from tsformer_jax import tensor_io
from tsformer_jax.checkpoints import spec

# Hugging Face `TimesformerConfig.attention_type` -> our scheme names.
HF_ATTENTION_TYPES = {
    'divided_space_time': 'divided',
    'joint_space_time': 'joint',
    'space_only': 'space_only',
}
# The schemes that PyTorch implementations have (and so torch names).
TORCH_SCHEMES = tuple(HF_ATTENTION_TYPES.values())

# Module and parameter names relative to the backbone's prefix. `attention`
# is the ViT attention (our last step), `temporal` divided's temporal step.
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
  """`(module_names, parameter_names)`: ours -> torch's.

  Module names map our module paths ('block_0/space_attention/qkv'),
  parameter names our top-level parameters ('pos_embedding'). `layout` is
  'hf' (Hugging Face TimeSformer and ViT) or 'original' (also timm's ViT);
  `prefix` is the backbone's ('timesformer.', 'model.'), `head_prefix` the
  head's (`prefix` when None).
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


def params_from_torch_state_dict(state_dict: Mapping[str, Any], config,
                                 module_names: Mapping[str, str],
                                 parameter_names: Mapping[str, str],
                                 source: str) -> dict:
  """Our params of `config` from torch names (`torch_names`).

  Every shape is checked; a ValueError names the missing, unused and
  misshapen parameters, and `source` the checkpoint.
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
  template = spec.template(config)
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
  file_shape = value.shape
  if kind == 'kernel' and value.ndim == 4:  # Conv: [D, 3, p, p] -> [p, p, 3, D]
    value = value.transpose(2, 3, 1, 0)
  elif kind == 'kernel':  # Linear: [out, in] -> [in, out], then split heads.
    value = value.T
  if not _fits(value.shape, shape):
    needs = _torch_shape(shape, kind, path)
    ours = f' (ours: {list(shape)})' if needs != list(shape) else ''
    raise ValueError(f'{source}: parameter {key!r} has shape '
                     f'{list(file_shape)} in the file, where {path!r} needs '
                     f'{needs}{ours}.')
  return value.reshape(shape)


def _torch_shape(shape: tuple[int, ...], kind: str, path: str) -> list[int]:
  """Our parameter's shape as torch lays it out."""
  if kind == 'kernel' and len(shape) == 4:  # Conv.
    return [shape[3], shape[2], shape[0], shape[1]]
  if kind == 'kernel':  # Linear [out, in]; proj takes [heads, head_dim].
    inputs = 2 if path.endswith('proj/kernel') and len(shape) == 3 else 1
    return [math.prod(shape[inputs:]), math.prod(shape[:inputs])]
  return [math.prod(shape)] if kind == 'bias' else list(shape)


def _fits(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
  """Whether `have` reshapes to `want` without mixing axes."""
  if len(have) == 1:  # Biases split into heads: [3 * D] -> [3, H, Dh].
    return have[0] == int(np.prod(want))
  if len(have) == 2:  # Kernels [in, out] with heads split on either side.
    return any(int(np.prod(want[:s])) == have[0] and
               int(np.prod(want[s:])) == have[1] for s in range(len(want) + 1))
  return tuple(have) == tuple(want)


# ----------------------------------------------------------------------------
# Reading state dicts from files

def state_dict(obj: Any, path: str) -> dict[str, Any]:
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


def prefix_of(state, suffix: str, source: str) -> str:
  """The prefix of the (first) name that ends in `suffix`."""
  found = sorted(k[:-len(suffix)] for k in state if k.endswith(suffix))
  if not found:
    raise ValueError(f'{source}: missing {suffix!r}.')
  return found[0]


def conv_kernel_from_linear(state, key):
  """Old timm files store the patch embedding as a linear `[D, 3*p*p]`."""
  value = state[key]
  if len(np.shape(value)) == 2:
    d, n = np.shape(value)
    p = math.isqrt(n // 3)
    state = dict(state)
    state[key] = np.asarray(value, np.float32).reshape(d, 3, p, p)
  return state


# ----------------------------------------------------------------------------
# The config of a state dict, from its shapes

def torch_scheme(state, temporal: str, time: str) -> str:
  if any(temporal in k for k in state):
    return 'divided'
  return 'joint' if any(k.endswith(time) for k in state) else 'space_only'


def torch_layout_config(state, layout, prefix, head_prefix, scheme, hint,
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
  return model_config(
      scheme, width=width, depth=max(indices) + 1,
      heads=heads, mlp=shape(
          f'{prefix}{names["block"].format(i=0)}.{names["fc1"]}.weight')[0],
      patch=shape(prefix + names['embedding'] + '.weight')[-1],
      num_patches=shape(prefix + params['pos_embedding'])[1] - 1,
      frames=frames, classes=shape(head)[0] if head in state else 0,
      hint=hint, source=source)


# Heads by width of the ViT sizes (Ti, S, B, L, H), the one rule that tells
# a file's head count when the file does not record it.
VIT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def model_config(scheme, *, width, depth, heads, mlp, patch, num_patches,
                 frames, classes, hint, source) -> ml_collections.ConfigDict:
  """A config of `scheme` with the given sizes; `hint` fills the gaps."""
  hint_model = hint.model if hint is not None else None
  if heads is None:
    if hint_model is not None and hint_model.hidden_size == width:
      heads = hint_model.num_heads
    elif width in VIT_HEADS:
      heads = VIT_HEADS[width]
    else:
      raise ValueError(
          f'{source}: the file does not record the number of heads, and '
          f'width {width} is none of the ViT sizes {sorted(VIT_HEADS)}: '
          'pass it, e.g. --config=configs/divided.py '
          '--config.model.num_heads=N (with the model\'s other sizes).')
  if frames is None:
    frames = hint_model.num_frames if hint_model is not None else 8
  grid = None
  if hint_model is not None:
    hint_grid = spec.patch_grid(hint_model)
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
