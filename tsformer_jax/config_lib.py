"""Configs: one scheme and one size variant give the whole config.

`configs/<scheme>.py` calls `get_config(scheme, arg)`; the arg string picks
the variant, big_vision style (`--config=configs/divided.py:hr`).
"""

from __future__ import annotations

import ml_collections

from tsformer_jax import attention

# The paper's sizes (Sec. 4, Table 1): frames, frame size, sampling rate.
VARIANTS = {
    'base': dict(num_frames=8, image_size=(224, 224), sampling_rate=32),
    'hr': dict(num_frames=16, image_size=(448, 448), sampling_rate=16),
    'l': dict(num_frames=96, image_size=(224, 224), sampling_rate=4),
    # A few-hundred-thousand-parameter model for tests and the demo.
    'tiny': dict(num_frames=4, image_size=(32, 32), sampling_rate=2,
                 patch_size=8, hidden_size=64, depth=2, num_heads=4,
                 mlp_dim=128, num_classes=10),
}
DEFAULT_VARIANT = 'base'


def get_config(scheme: str, arg: str | None = None
               ) -> ml_collections.ConfigDict:
  """The config of `scheme` (a key of `attention.SCHEMES`) at variant `arg`."""
  attention.get_scheme(scheme)  # Fails early, listing the valid schemes.
  variant = (arg or DEFAULT_VARIANT).strip().lower()
  if variant not in VARIANTS:
    raise ValueError(f'Unknown variant {arg!r}; valid: {sorted(VARIANTS)}.')
  sizes = dict(VARIANTS[variant])

  config = ml_collections.ConfigDict()
  config.variant = variant
  config.seed = 0
  config.data = ml_collections.ConfigDict(
      dict(sampling_rate=sizes.pop('sampling_rate')))
  config.model = ml_collections.ConfigDict(dict(
      attention=scheme,
      num_classes=400,
      num_frames=8,
      image_size=(224, 224),
      patch_size=16,
      hidden_size=768,
      depth=12,
      num_heads=12,
      mlp_dim=3072,
      dropout=0.0,
      attention_dropout=0.0,
      drop_path=0.1,
      layer_norm_eps=1e-6,
      attention_impl='auto',
      dtype='float32',
  ))
  config.model.update(sizes)
  return config
