"""Our weights out, for PyTorch: a Hugging Face TimeSformer directory or the
original TimeSformer's `.pyth`.

Each writer is the exact inverse of its reader (`formats.hf`,
`formats.original`): the same name tables (`state_dicts.torch_names`), the
layout changes undone, float32 values copied bit for bit. Both write without
torch (`tensor_io.write_safetensors`, `torch_writer.write_torch`).

Hugging Face's `TimesformerForVideoClassification` computes divided and
joint attention as we do. Its `space_only` does not: it classifies every
frame on its own (logits `[B * T, C]`) where we and the original average the
frames' class tokens before the final norm and head, so `space_only` goes to
the `.pyth` layout only. The schemes without a PyTorch implementation
(sparse_local_global, axial) go to neither.

Both record the channel order the model takes (`config.data.channel_order`):
config.json as `channel_order`, the `.pyth` cfg by its `TRAIN.DATASET` (the
original's SSv2 models take BGR) or else `DATA.CHANNEL_ORDER`, and each in
a note on its pixels (`pixels_note`). A 'bgr' model must be given the
channels of RGB frames reversed; transformers' image processors do not do
it.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import json
import os
from typing import Any

import flax
import jax
import numpy as np

from tsformer_jax import datasets
from tsformer_jax import tensor_io
from tsformer_jax import torch_writer
from tsformer_jax.checkpoints import spec
from tsformer_jax.checkpoints.formats import hf
from tsformer_jax.checkpoints.formats import original
from tsformer_jax.checkpoints.formats import state_dicts
from tsformer_jax.checkpoints.formats.state_dicts import HF_ATTENTION_TYPES

# Our schemes -> Hugging Face `attention_type`, for those it computes as we do.
HF_EXPORT_TYPES = {ours: theirs for theirs, ours in HF_ATTENTION_TYPES.items()
                   if ours != 'space_only'}
HF_WEIGHTS, HF_CONFIG = 'model.safetensors', 'config.json'
# What the original's `vit_base_patch16_224`, the one model its configs
# build, fixes; its `.pyth` names the model only when ours is that one.
_VIT_BASE = dict(hidden_size=768, depth=12, num_heads=12, mlp_dim=3072,
                 patch_size=16)


def class_names(config) -> list[str]:
  """The names `id2label` carries, by index.

  The checkpoint's own (`config.data.class_names`), else its dataset's
  where their count is the model's, else transformers' placeholders
  ('LABEL_0', ...), which `formats.hf` reads back as no names.
  """
  count = config.model.num_classes
  names = list(config.data.class_names)
  if names:
    if len(names) != count:
      raise ValueError(f'config.data.class_names holds {len(names)} names '
                       f'but the model has {count} classes.')
    return [str(n) for n in names]
  try:
    names = datasets.class_names(config)
  except (ValueError, KeyError, OSError):
    names = []
  if len(names) == count:
    return list(names)
  return [f'LABEL_{i}' for i in range(count)]


def channel_order(config) -> str:
  """The channel order the model takes (`config.data.channel_order`)."""
  return config.data.channel_order


def pixels_note(config) -> str:
  """One line on the pixels the model takes, for whoever runs it in
  PyTorch: 'bgr' models (the original's SSv2 ones) take the channels of
  RGB frames reversed, as cv2 decodes them."""
  mean = [float(v) for v in config.data.mean]
  std = [float(v) for v in config.data.std]
  scale = f', normalised (x / 255 - {mean}) / {std}'
  if channel_order(config) == 'bgr':
    return ('Pixels: BGR (the channels of RGB frames reversed, as cv2 '
            f'decodes them){scale}.')
  return f'Pixels: RGB{scale}.'


def check_hf(config) -> None:
  """Raises a one-line ValueError where Hugging Face cannot compute what
  `config.model` computes."""
  m = config.model
  if m.attention == 'space_only':
    raise ValueError(
        "Hugging Face's space_only TimeSformer classifies each frame alone "
        '(logits [B * T, C]) where ours, like the original, averages the '
        "frames' class tokens before the norm and head; export it with "
        '--to=pyth.')
  if m.attention not in HF_EXPORT_TYPES:
    raise ValueError(
        f"Hugging Face's TimeSformer has no {m.attention!r} attention; it has "
        f'{", ".join(HF_ATTENTION_TYPES)} (exported: '
        f'{", ".join(HF_EXPORT_TYPES)}).')
  height, width = _image_size(m)
  if height != width:
    raise ValueError(f"Hugging Face's TimeSformer takes square frames; "
                     f'config.model.image_size is {(height, width)}.')


def hf_config(config, names: Sequence[str] | None = None) -> dict[str, Any]:
  """The `config.json` of `config`: the inverse of `formats.hf.
  config_from_hf`.

  Args:
    config: our config; its scheme must pass `check_hf`.
    names: class names by index; `class_names(config)` when None.

  Returns:
    A `TimesformerConfig` as a JSON dict, with `id2label` and `label2id`,
    and the channel order the model takes as `channel_order` ('rgb' or
    'bgr'), which transformers keeps as `model.config.channel_order` and
    its image processors do not apply: a 'bgr' model (the original's SSv2
    ones) must be given the channels of RGB frames reversed.
  """
  check_hf(config)
  m = config.model
  names = class_names(config) if names is None else [str(n) for n in names]
  if len(names) != m.num_classes:
    raise ValueError(f'{len(names)} class names for a model of '
                     f'{m.num_classes} classes.')
  return {
      'architectures': ['TimesformerForVideoClassification'],
      'model_type': 'timesformer',
      'attention_type': HF_EXPORT_TYPES[m.attention],
      'image_size': _image_size(m)[0],
      'patch_size': int(m.patch_size),
      'num_channels': 3,
      'num_frames': int(m.num_frames),
      'hidden_size': int(m.hidden_size),
      'num_hidden_layers': int(m.depth),
      'num_attention_heads': int(m.num_heads),
      'intermediate_size': int(m.mlp_dim),
      'hidden_act': 'gelu',
      'hidden_dropout_prob': float(m.dropout),
      'attention_probs_dropout_prob': float(m.attention_dropout),
      # Stochastic depth, a training setting, is not carried: transformers
      # 5 types this field int and refuses 0.1.
      'drop_path_rate': 0,
      'initializer_range': 0.02,
      'layer_norm_eps': float(m.layer_norm_eps),
      'qkv_bias': True,
      # Written out: `num_labels` alone tells a headless model (0 classes)
      # from transformers' default of 2.
      'num_labels': int(m.num_classes),
      'id2label': {str(i): name for i, name in enumerate(names)},
      'label2id': {name: i for i, name in enumerate(names)},
      'dtype': 'float32',
      # transformers' name for a sigmoid head (`model.loss='sigmoid'`): its
      # `labels=` loss is then per-class binary cross-entropy, as ours.
      **({hf.PROBLEM_TYPE_KEY: hf.MULTI_LABEL} if m.loss == 'sigmoid'
         else {}),
      # Not transformers': the pixels the model takes, 'rgb' or 'bgr'
      # (`formats.hf.CHANNEL_ORDER_KEY`, `pixels_note`).
      hf.CHANNEL_ORDER_KEY: channel_order(config),
  }


def to_state_dict(config, params, module_names: Mapping[str, str],
                  parameter_names: Mapping[str, str]
                  ) -> dict[str, np.ndarray]:
  """Torch's names and layout for `params`: the inverse of
  `state_dicts.params_from_torch_state_dict` with the same name tables.

  Conv kernels `[p, p, 3, D]` -> `[D, 3, p, p]`; Linear kernels, heads
  merged, `[in..., out...]` -> `[out, in]`; biases and scales flattened
  (`[3, H, Dh]` -> `[3 * D]`). Values are float32, copied exactly.
  """
  flat = flax.traverse_util.flatten_dict(
      jax.tree.map(lambda x: np.asarray(x, np.float32),
                   jax.device_get(params)), sep='/')
  spec.check_params(flat, config, 'params to export')
  state = {}
  for path, value in flat.items():
    module, _, kind = path.rpartition('/')
    if path in parameter_names:
      state[parameter_names[path]] = value
      continue
    if module not in module_names:
      raise ValueError(f'No torch name known for parameter {path!r}.')
    name = module_names[module] + ('.bias' if kind == 'bias' else '.weight')
    if kind == 'kernel' and module == 'embedding':  # The patches' Conv.
      value = value.transpose(3, 2, 0, 1)
    elif kind == 'kernel':  # Linear: the bias tells the output size.
      value = value.reshape(-1, flat[f'{module}/bias'].size).T
    else:
      value = value.reshape(-1)
    state[name] = np.ascontiguousarray(value)
  return state


def to_hf_state_dict(config, params) -> dict[str, np.ndarray]:
  """`TimesformerForVideoClassification`'s state dict for `params`: the
  inverse of `formats.hf.params_from_hf_state_dict`."""
  modules, parameters = state_dicts.torch_names(config.model, 'hf',
                                                'timesformer.', '')
  return to_state_dict(config, params, modules, parameters)


def to_original_state_dict(config, params, prefix: str = 'model.'
                           ) -> dict[str, np.ndarray]:
  """The original's `model_state` for `params`: the inverse of
  `formats.original.params_from_original_state_dict`."""
  modules, parameters = state_dicts.torch_names(config.model, 'original',
                                                prefix)
  return to_state_dict(config, params, modules, parameters)


def write_hf(out_dir: str, config, params,
             names: Sequence[str] | None = None, *,
             overwrite: bool = False) -> str:
  """Writes a directory that `TimesformerForVideoClassification.
  from_pretrained` loads: `config.json` (`hf_config`) and `model.safetensors`
  (`to_hf_state_dict`).

  Written beside `out_dir` and renamed into place when complete. Returns the
  absolute path.

  Raises:
    ValueError: Hugging Face cannot compute the model (`check_hf`).
    FileExistsError: `out_dir` exists and `overwrite` is False.
  """
  config_json = hf_config(config, names)
  state = to_hf_state_dict(config, params)

  def write(staging):
    os.makedirs(staging)
    tensor_io.write_safetensors(os.path.join(staging, HF_WEIGHTS), state,
                                {'format': 'pt'})
    with open(os.path.join(staging, HF_CONFIG), 'w', encoding='utf-8') as f:
      json.dump(config_json, f, indent=2)
      f.write('\n')

  return tensor_io.write_atomically(out_dir, write, overwrite)


def original_cfg(config) -> str:
  """The `cfg` of a `.pyth`: the original's YAML keys that `config` fixes.

  The original never reads it back; comments record the sizes that its
  model name would otherwise fix and the pixels the model takes
  (`pixels_note`). The number of heads, in no tensor, is
  `TIMESFORMER.NUM_HEADS` (`formats.original.HEADS_KEY`) where the model is
  not the original's `vit_base_patch16_224`: a key the original lacks, in a
  cfg the original could not run anyway. The channel order is the one
  `TRAIN.DATASET` implies (BGR for ssv2, as the original's SSv2 models),
  else `DATA.CHANNEL_ORDER` (`formats.original.CHANNELS_KEY`), also a key
  the original lacks.
  """
  m, data = config.model, config.data
  height, width = _image_size(m)
  sizes = dict(hidden_size=m.hidden_size, depth=m.depth,
               num_heads=m.num_heads, mlp_dim=m.mlp_dim,
               patch_size=m.patch_size)
  lines = [f'# tsformer_jax: {m.attention}, image_size {height}x{width}, ' +
           ', '.join(f'{k} {v}' for k, v in sizes.items()),
           f'# {pixels_note(config)}',
           'DATA:', f'  NUM_FRAMES: {m.num_frames}',
           f'  SAMPLING_RATE: {data.sampling_rate}']
  if height == width:
    lines += [f'  TRAIN_CROP_SIZE: {height}', f'  TEST_CROP_SIZE: {height}']
  for key in ('mean', 'std'):
    lines.append(f'  {key.upper()}: {[float(x) for x in data[key]]}')
  inverse = data.scale_jitter == 'inverse_uniform'
  lines.append(f'  INV_UNIFORM_SAMPLE: {inverse}')
  theirs = original.DATASETS.get(data.dataset)
  order = channel_order(config)
  if order != original.channel_order(theirs):
    lines.append(f'  CHANNEL_ORDER: {order}')  # original.CHANNELS_KEY
  if theirs:
    lines += ['TRAIN:', f'  DATASET: {theirs}']
  lines += ['TIMESFORMER:', '  ATTENTION_TYPE: ' + {
      v: k for k, v in HF_ATTENTION_TYPES.items()}[m.attention]]
  if sizes != _VIT_BASE:
    lines.append(f'  NUM_HEADS: {m.num_heads}')  # original.HEADS_KEY
  lines += ['MODEL:', '  ARCH: vit']
  if sizes == _VIT_BASE:
    lines.append('  MODEL_NAME: vit_base_patch16_224')
  lines.append(f'  NUM_CLASSES: {m.num_classes}')
  lines += ['TEST:', f'  NUM_ENSEMBLE_VIEWS: {data.test_num_clips}',
            f'  NUM_SPATIAL_CROPS: {data.test_num_crops}']
  return '\n'.join(lines) + '\n'


def write_pyth(out_path: str, config, params, *, epoch: int = -1,
               overwrite: bool = False) -> str:
  """Writes the original's `.pyth`: a `torch.save` zip of `{'model_state':
  to_original_state_dict(...), 'epoch': epoch, 'cfg': original_cfg(...)}`.

  `torch.load(path, weights_only=True)` loads it and the original's
  `load_checkpoint` takes its `model_state`. Its default epoch, -1, is what
  that function reports for a file without one, so the original trains from
  it from the first epoch rather than resuming. `load_checkpoint(path)`
  reads it back exactly, the head count from its cfg (see `original_cfg`).
  Written beside `out_path` and renamed into place when complete; returns
  the absolute path.

  Raises:
    ValueError: PyTorch TimeSformers have no such scheme.
    FileExistsError: `out_path` exists and `overwrite` is False.
  """
  state = to_original_state_dict(config, params)
  checkpoint = {'model_state': state, 'epoch': int(epoch),
                'cfg': original_cfg(config)}
  return tensor_io.write_atomically(
      out_path, lambda staging: torch_writer.write_torch(staging, checkpoint),
      overwrite)


def _image_size(model_config) -> tuple[int, int]:
  size = model_config.image_size
  return (size, size) if isinstance(size, int) else tuple(size)
