"""Configs: one scheme and one variant give the whole job's config.

`configs/<scheme>.py` calls `get_config(scheme, arg)`; the arg string picks
the variant, big_vision style (`--config=configs/divided.py:hr`), and
optionally a dataset after a comma (`configs/divided.py:hr,ssv2`,
`configs/divided.py:k600`), which sets `dataset.name`, `model.num_classes`,
`data.flip`, `data.sampling` and, where its recipe says so, the frames per
clip (`datasets.DATASETS`). The defaults are the paper's Kinetics-400
recipe (`../shared/REFERENCE.md`): SGD with Nesterov momentum 0.9, weight
decay 1e-4, learning rate 0.005 divided by 10 at epochs 11 and 14 of 15,
batch 64 (8 x 8 accumulated).
"""

from __future__ import annotations

import ml_collections

from tsformer_jax import attention
from tsformer_jax import datasets

# Overrides of the defaults below, per variant. The paper's sizes (Sec. 4):
# frames, frame size, sampling rate.
VARIANTS = {
    'base': dict(model=dict(num_frames=8, image_size=(224, 224)),
                 data=dict(sampling_rate=32)),
    'hr': dict(model=dict(num_frames=16, image_size=(448, 448)),
               data=dict(sampling_rate=16, train_scales=(448, 512))),
    'l': dict(model=dict(num_frames=96, image_size=(224, 224)),
              data=dict(sampling_rate=4)),
    # A small model for tests.
    'tiny': dict(model=dict(num_frames=4, image_size=(32, 32), patch_size=8,
                            hidden_size=64, depth=2, num_heads=4, mlp_dim=128,
                            num_classes=10),
                 data=dict(sampling_rate=2)),
    # A small model on the generated synthetic_motion videos: minutes on CPU.
    'demo': dict(
        model=dict(num_frames=8, image_size=(32, 32), patch_size=8,
                   hidden_size=64, depth=2, num_heads=4, mlp_dim=128,
                   num_classes=2, drop_path=0.0, time_embedding_std=0.5),
        dataset=dict(name='synthetic_motion'),
        data=dict(sampling_rate=2, train_scales=(32, 40),
                  test_num_crops=1, num_workers=2),
        optimizer=dict(name='adamw', learning_rate=1e-3, weight_decay=0.05,
                       schedule='cosine', warmup_epochs=1.0),
        batch_size=32, grad_accum_steps=1, eval_batch_size=32, num_epochs=8,
        log_every_steps=32, checkpoint_every_steps=128),
}
DEFAULT_VARIANT = 'base'


def get_config(scheme: str, arg: str | None = None
               ) -> ml_collections.ConfigDict:
  """The config of `scheme` (a key of `attention.SCHEMES`) at `arg`.

  Args:
    scheme: the attention scheme.
    arg: a variant (a key of `VARIANTS`), a dataset (a key of
      `datasets.DATASETS` or an alias), or both, comma-separated in any
      order: 'hr', 'k600', 'hr,ssv2'. The variant defaults to 'base', the
      dataset to the variant's (Kinetics-400; synthetic_motion for 'demo').
  """
  attention.get_scheme(scheme)  # Fails early, listing the valid schemes.
  variant, dataset = _parse_arg(arg)

  config = ml_collections.ConfigDict()
  config.variant = variant
  config.seed = 0
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
      time_embedding_std=0.0,
      # Block rematerialisation: 'none', 'full', 'dots', 'dots_no_batch'.
      remat='none',
  ))
  config.dataset = ml_collections.ConfigDict(dict(
      name='kinetics400',
      data_dir='',
      train_split='train',
      eval_split='test',
      # 'files': decode the videos of data_dir; 'tfds': read the dataset
      # prepared in tfds_dir by `python -m tsformer_jax.datasets.prepare`
      # (empty: ~/.cache/tsformer_jax/tfds), encoded frames in ArrayRecord.
      format='files',
      tfds_dir='',
  ))
  config.data = ml_collections.ConfigDict(dict(
      sampling_rate=32,
      target_fps=30.0,
      train_scales=(256, 320),
      flip=True,
      # The original TimeSformer's normalisation; it travels with every
      # checkpoint (ViT weights were trained with 0.5 / 0.5).
      mean=(0.45, 0.45, 0.45),
      std=(0.225, 0.225, 0.225),
      test_num_clips=1,
      test_num_crops=3,
      # > 0: evaluate long videos whole (the paper's HowTo100M protocol):
      # clips every this many seconds from start to end, scores averaged.
      test_clip_stride=0.0,
      # 'rate': a clip spans num_frames * sampling_rate frames (Kinetics);
      # 'segments': one frame per equal segment of the video (SSv2).
      sampling='rate',
      num_workers=8,
  ))
  config.optimizer = ml_collections.ConfigDict(dict(
      name='sgd',
      learning_rate=0.005,
      momentum=0.9,
      nesterov=True,
      b1=0.9,
      b2=0.999,
      weight_decay=1e-4,
      schedule='steps',
      decay_epochs=(11, 14),
      decay_factor=0.1,
      warmup_epochs=0.0,
      grad_clip_norm=0.0,
  ))
  # The device mesh (`sharding.py`): clips split over all axes; parameters
  # and optimizer state split over `fsdp` when its size is above 1 (arrays
  # of at least fsdp_min_size elements), replicated otherwise.
  config.sharding = ml_collections.ConfigDict(dict(
      axes=('data', 'fsdp'),
      shape=(-1, 1),
      fsdp_min_size=2 ** 14,
  ))
  config.batch_size = 64
  config.grad_accum_steps = 8
  config.eval_batch_size = 8
  config.num_epochs = 15.0
  config.num_train_steps = -1  # > 0 overrides num_epochs.
  config.label_smoothing = 0.0
  config.mixup_alpha = 0.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.eval_every_steps = -1  # > 0: also evaluate during training.
  config.keep_checkpoints = 3
  config.profile = False
  # Weights to start from (`checkpoints.init_params_from`): a ViT or
  # TimeSformer checkpoint of any format in `checkpoints.FORMATS`, fitted to
  # config.model; '' starts from random weights.
  config.init_from = ml_collections.ConfigDict(dict(
      path='', format='auto', pos_resize='2d'))

  for section, values in VARIANTS[variant].items():
    if isinstance(values, dict):
      config[section].update(values)
    else:
      config[section] = values
  if dataset is not None:
    config.dataset.name = dataset.name
    config.model.num_classes = dataset.num_classes
    config.data.flip = dataset.flip
    config.data.sampling = dataset.sampling
    config.model.num_frames = dataset.num_frames.get(variant,
                                                     config.model.num_frames)
  return config


def _parse_arg(arg: str | None) -> tuple[str, datasets.Dataset | None]:
  """'hr,ssv2' -> ('hr', the ssv2 entry); either part may be left out."""
  variant, dataset = None, None
  for part in (arg or '').split(','):
    part = part.strip().lower()
    if not part:
      continue
    if part in VARIANTS:
      if variant is not None:
        raise ValueError(f'Two variants in {arg!r}: {variant!r}, {part!r}.')
      variant = part
    elif datasets.ALIASES.get(part, part) in datasets.DATASETS:
      if dataset is not None:
        raise ValueError(f'Two datasets in {arg!r}: {dataset.name!r}, '
                         f'{part!r}.')
      dataset = datasets.get_dataset(part)
    else:
      raise ValueError(
          f'Unknown variant {part!r} in {arg!r}; valid: {sorted(VARIANTS)}, '
          f'optionally with one dataset of {sorted(datasets.DATASETS)} '
          f'(aliases {sorted(datasets.ALIASES)}), e.g. "hr,ssv2".')
  return variant or DEFAULT_VARIANT, dataset
