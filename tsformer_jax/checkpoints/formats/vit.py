"""ImageNet ViTs, read as one-frame `space_only` TimeSformers.

Three layouts: the original ViT release's `.npz` (flax), Hugging Face's
`ViTModel`, and timm's, which the original TimeSformer initialises from
(`jx_vit_base_p16_224-80ecf9dd.pth`).
"""

from __future__ import annotations

import logging
import re

import numpy as np

from tsformer_jax.checkpoints.formats import original
from tsformer_jax.checkpoints.formats import state_dicts

_LOG = logging.getLogger(__name__)

# The original ViT release's names, per block `{i}`.
_NPZ_BLOCK = 'Transformer/encoderblock_{i}'
_NPZ_NAMES = dict(norm='LayerNorm_0',
                  attention='MultiHeadDotProductAttention_1',
                  mlp_norm='LayerNorm_2', fc1='MlpBlock_3/Dense_0',
                  fc2='MlpBlock_3/Dense_1')


def read_timm(state, hf_config, hint, source):
  del hf_config
  prefix = state_dicts.prefix_of(state, 'patch_embed.proj.weight', source)
  state = state_dicts.conv_kernel_from_linear(
      state, prefix + 'patch_embed.proj.weight')
  state = _without_pre_logits(state, r'pre_logits\.', prefix + 'head.',
                              source)
  config = state_dicts.torch_layout_config(state, 'original', prefix, prefix,
                                           'space_only', hint, source,
                                           frames=1)
  return config, original.params_from_original_state_dict(state, config,
                                                          source, prefix)


def read_hf(state, hf_config, hint, source):
  """HF `ViTModel` / `ViTForImageClassification`: q, k, v fused first."""
  prefix = state_dicts.prefix_of(
      state, 'embeddings.patch_embeddings.projection.weight', source)
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
  config = state_dicts.torch_layout_config(state, 'hf', prefix, '',
                                           'space_only', hint, source,
                                           frames=1, heads=heads)
  modules, parameters = state_dicts.torch_names(config.model, 'hf', prefix,
                                                '')
  return config, state_dicts.params_from_torch_state_dict(
      state, config, modules, parameters, source)


def read_npz(state, hf_config, hint, source):
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
  config = state_dicts.model_config(
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
  return config, state_dicts.params_from_state_dict(
      state, config, modules, parameters, source=source, layout='flax')


def _without_pre_logits(state, pattern: str, head: str, source: str):
  """ImageNet-21k files put a tanh layer before the head: drop both."""
  if not any(re.search(pattern, k) for k in state):
    return state
  _LOG.info('%s: dropped pre_logits and the head on top of it.', source)
  return {k: v for k, v in state.items()
          if not (re.search(pattern, k) or k.startswith(head))}
