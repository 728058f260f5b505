"""The original TimeSformer's `.pyth`: its `model_state`, names `model.*`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tsformer_jax.checkpoints.formats import state_dicts


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


def read(state, hf_config, hint, source):
  """`(config, params)`; the file does not record the number of heads."""
  del hf_config
  prefix = state_dicts.prefix_of(state, 'patch_embed.proj.weight', source)
  state = state_dicts.conv_kernel_from_linear(
      state, prefix + 'patch_embed.proj.weight')
  scheme = state_dicts.torch_scheme(state, 'temporal_attn.', 'time_embed')
  config = state_dicts.torch_layout_config(state, 'original', prefix, prefix,
                                           scheme, hint, source)
  return config, params_from_original_state_dict(state, config, source,
                                                 prefix)
