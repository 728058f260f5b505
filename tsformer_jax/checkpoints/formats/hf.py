"""Hugging Face TimeSformer: `config.json` and `model.safetensors` (or
`pytorch_model.bin`, or shards of either), of a
`TimesformerForVideoClassification` or of a `TimesformerModel` (no head).

The channel order the model takes (`config.data.channel_order`) is the
config.json's `channel_order` where it has one (ours write it). Otherwise a
Something-Something-V2 model (`is_ssv2`) takes BGR: the Hub's
`facebook/timesformer-*-ssv2` were converted from the original's SSv2
models, trained on the BGR frames of its cv2 loader; it also gets our SSv2
recipe (segment sampling). Any other model takes RGB.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import importlib.resources
import json
import os
from typing import Any

import ml_collections

from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import tensor_io
from tsformer_jax.checkpoints.formats import state_dicts
from tsformer_jax.checkpoints.formats.state_dicts import HF_ATTENTION_TYPES

# The config.json key of the channel order ('rgb' or 'bgr'); transformers
# keeps unknown keys as attributes (`model.config.channel_order`).
CHANNEL_ORDER_KEY = 'channel_order'
# transformers' mark of a multi-label head: sigmoid scores, `model.loss`.
PROBLEM_TYPE_KEY = 'problem_type'
MULTI_LABEL = 'multi_label_classification'


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
  config = config_lib.get_config(HF_ATTENTION_TYPES[attention_type],
                                 'dataset=ssv2' if is_ssv2(hf_config) else None)
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
  config.data.class_names = _class_names(hf_config.get('id2label'),
                                         config.model.num_classes)
  if hf_config.get(PROBLEM_TYPE_KEY) == MULTI_LABEL:
    config.model.loss = 'sigmoid'
  order = hf_config.get(CHANNEL_ORDER_KEY)
  if order is not None:
    config.data.channel_order = clip_lib.check_channel_order(
        order, f'config.json gives {CHANNEL_ORDER_KEY}')
  return config


def is_ssv2(hf_config: Mapping[str, Any]) -> bool:
  """Whether a config.json is of a Something-Something-V2 model: its labels
  (`id2label`) are SSv2's 174 templates (in any order, brackets and case
  aside), or its `_name_or_path` names ssv2 (as the Hub's
  `facebook/timesformer-base-finetuned-ssv2`)."""
  name = str(hf_config.get('_name_or_path') or '').lower()
  if any(k in name for k in ('ssv2', 'something-something',
                             'something_something')):
    return True
  labels = hf_config.get('id2label') or {}
  return {_template(n) for n in labels.values()} == _ssv2_templates()


def _template(name: str) -> str:
  return ' '.join(name.replace('[', '').replace(']', '').lower().split())


@functools.cache
def _ssv2_templates() -> frozenset[str]:
  text = importlib.resources.files('tsformer_jax').joinpath(
      'labels', 'something_something_v2.txt').read_text(encoding='utf-8')
  return frozenset(_template(n) for n in text.splitlines() if n.strip())


def _class_names(id2label: Mapping[Any, str] | None, count: int
                 ) -> tuple[str, ...]:
  """`id2label` by index; () where it is missing or transformers' default
  ('LABEL_0', ...), which names nothing."""
  if not id2label:
    return ()
  names = {int(i): str(name) for i, name in id2label.items()}
  if sorted(names) != list(range(count)):
    raise ValueError(f'id2label holds classes {sorted(names)[:5]}... but '
                     f'the model has {count} classes.')
  names = tuple(names[i] for i in range(count))
  return () if names == tuple(f'LABEL_{i}' for i in range(count)) else names


def hf_module_names(model_config) -> dict[str, str]:
  """Our module path ('block_0/space_attention/qkv') -> HF module name."""
  return state_dicts.torch_names(model_config, 'hf', 'timesformer.', '')[0]


HF_PARAMETER_NAMES = state_dicts.torch_names(
    ml_collections.ConfigDict(dict(attention='divided', depth=0)), 'hf',
    'timesformer.')[1]


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config,
                              source: str = 'state dict',
                              prefix: str = 'timesformer.') -> dict:
  """Our params from a Hugging Face `TimesformerForVideoClassification`.

  `state_dict` holds anything `np.asarray` takes (CPU torch tensors too);
  `config_from_hf` makes the config. `prefix=''` reads a `TimesformerModel`
  (the backbone alone, for `config.model.num_classes=0`).
  """
  modules, parameters = state_dicts.torch_names(config.model, 'hf', prefix,
                                                '')
  return state_dicts.params_from_torch_state_dict(state_dict, config, modules,
                                                  parameters, source)


def read_json(path: str) -> dict:
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except ValueError as e:  # Malformed JSON, or not UTF-8.
      raise ValueError(f'{path}: not readable JSON ({e}).') from e


def read_weights(path: str) -> dict[str, Any]:
  """A Hugging Face model directory's tensors (single file or shards)."""
  for name in ('model.safetensors', 'pytorch_model.bin'):
    if os.path.isfile(os.path.join(path, name)):
      return state_dicts.state_dict(
          tensor_io.read_tensors(os.path.join(path, name)),
          os.path.join(path, name))
    index = os.path.join(path, name + '.index.json')
    if os.path.isfile(index):
      state = {}
      for shard in sorted(set(read_json(index)['weight_map'].values())):
        shard = os.path.join(path, shard)
        state.update(state_dicts.state_dict(tensor_io.read_tensors(shard),
                                            shard))
      return state
  raise ValueError(f'{path}: a Hugging Face directory without '
                   'model.safetensors or pytorch_model.bin.')


def read(state, hf_config, hint, source):
  """`(config, params)`; the config from `config.json`, or the shapes.

  A `TimesformerModel` (names without 'timesformer.', no classifier) reads
  as a model of 0 classes: its features.
  """
  prefix = state_dicts.prefix_of(
      state, 'embeddings.patch_embeddings.projection.weight', source)
  if hf_config is not None:
    config = config_from_hf(hf_config)
    if 'classifier.weight' not in state:  # Its config.json counts 2 labels.
      config.model.num_classes, config.data.class_names = 0, ()
  else:
    scheme = state_dicts.torch_scheme(state, 'temporal_attention.',
                                      'time_embeddings')
    config = state_dicts.torch_layout_config(state, 'hf', prefix, '',
                                             scheme, hint, source)
  return config, params_from_hf_state_dict(state, config, source, prefix)
