"""Weights from PyTorch TimeSformers into our parameter tree.

The PyTorch models (the original `facebookresearch/TimeSformer` and the
Hugging Face `transformers` port) share one layout: torch `Linear` weights
are `[out, in]`, qkv packs (q, k, v) x heads along `out`, the patch
embedding is a `[D, 3, p, p]` convolution. Their tokens run in `(h, w, t)`
order, but weights carry no token order: only activations do, and our model
lays tokens out as `[B, T, N, D]` itself. So converting is renaming plus
transposing, checked leaf by leaf against the shapes `config` implies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

from tsformer_jax import attention
from tsformer_jax import config_lib
from tsformer_jax import model as model_lib

# Hugging Face `TimesformerConfig.attention_type` -> our scheme names.
HF_ATTENTION_TYPES = {
    'divided_space_time': 'divided',
    'joint_space_time': 'joint',
    'space_only': 'space_only',
}


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


def hf_module_names(model_config) -> dict[str, str]:
  """Our module path ('block_0/space_attention/qkv') -> HF module name."""
  scheme = model_config.attention
  names = {
      'embedding': 'timesformer.embeddings.patch_embeddings.projection',
      'norm': 'timesformer.layernorm',
      'head': 'classifier',
  }
  # The last step of every scheme is the ViT attention; HF's divided block
  # adds its temporal step under `temporal_*` names.
  steps = attention.get_scheme(scheme).steps
  for i in range(model_config.depth):
    ours, hf = f'block_{i}', f'timesformer.encoder.layer.{i}'
    names.update({
        f'{ours}/{steps[-1].grouping}_attention/norm': f'{hf}.layernorm_before',
        f'{ours}/{steps[-1].grouping}_attention/qkv':
            f'{hf}.attention.attention.qkv',
        f'{ours}/{steps[-1].grouping}_attention/proj':
            f'{hf}.attention.output.dense',
        f'{ours}/mlp_norm': f'{hf}.layernorm_after',
        f'{ours}/mlp/fc1': f'{hf}.intermediate.dense',
        f'{ours}/mlp/fc2': f'{hf}.output.dense',
    })
    if scheme == 'divided':
      names.update({
          f'{ours}/time_attention/norm': f'{hf}.temporal_layernorm',
          f'{ours}/time_attention/qkv':
              f'{hf}.temporal_attention.attention.qkv',
          f'{ours}/time_attention/proj':
              f'{hf}.temporal_attention.output.dense',
          f'{ours}/time_attention/fc': f'{hf}.temporal_dense',
      })
  return names


HF_PARAMETER_NAMES = {
    'cls': 'timesformer.embeddings.cls_token',
    'pos_embedding': 'timesformer.embeddings.position_embeddings',
    'time_embedding': 'timesformer.embeddings.time_embeddings',
}


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
  return params_from_torch_state_dict(
      state_dict, config, hf_module_names(config.model), HF_PARAMETER_NAMES,
      source)


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
  template = jax.eval_shape(
      lambda: model_lib.init_params(config, jax.random.key(0)))
  flat = flax.traverse_util.flatten_dict(template, sep='/')
  state = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  used, missing, params = set(), [], {}
  for path, leaf in flat.items():
    module, _, kind = path.rpartition('/')
    if path in parameter_names:
      key = parameter_names[path]
    elif module in module_names:
      key = module_names[module] + ('.bias' if kind == 'bias' else '.weight')
    else:
      raise ValueError(f'No torch name known for parameter {path!r}.')
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    params[path] = _to_flax(state[key], leaf.shape, kind, path, key, source)
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
