r"""The paper's recipe: TimeSformer-base on Kinetics-400 (Sec. 4).

  python -m tsformer_jax.main --config=configs/default.py:variant=hr \
      --config.model.attention=joint --workdir=DIR

The arg after the colon, big_vision style, is comma-separated `key=value`:
`variant` (a key of `VARIANTS`), `dataset` (a key of
`dataset_facts.DATASETS`, or an alias) and `attention` (the scheme; the
scheme files set it). A bare word names a variant or a dataset:
`configs/divided.py:hr,ssv2`. Any field can be overridden on the command
line: `--config.model.dtype=bfloat16`.

The defaults are the paper's Kinetics-400 recipe (`REFERENCE.md` of the
original code's configs): SGD with Nesterov momentum 0.9, weight decay 1e-4,
learning rate 0.005 divided by 10 at epochs 11 and 14 of 15, batch 64
(8 x 8 accumulated), 3 test views (1 clip x 3 crops). As the original, the
paper's variants start from ImageNet ViT-B/16 weights (`IMAGENET_VIT`; only
the head is new); `tiny`, `demo` and the synthetic datasets from random
weights (`SCRATCH`).
"""

import ml_collections

from tsformer_jax.configs import common
from tsformer_jax.configs import dataset_facts

# The original's initialisation, timm's `vit_base_patch16_224` (ImageNet-21k,
# fine-tuned on ImageNet-1k at 224), as the Hugging Face Hub publishes it.
IMAGENET_VIT = 'google/vit-base-patch16-224'
# `config.init_from.path` that starts from random weights.
SCRATCH = 'scratch'
# The paper's dataset: its facts are the recipe's, whatever the variant.
DEFAULT_DATASET = 'kinetics400'

# Each variant's overrides of the defaults below. The paper's sizes (Sec. 4):
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
                 data=dict(sampling_rate=2), init_from=dict(path=SCRATCH)),
    # A small model on the generated synthetic_motion videos: minutes on CPU.
    'demo': dict(
        model=dict(num_frames=8, image_size=(32, 32), patch_size=8,
                   hidden_size=64, depth=2, num_heads=4, mlp_dim=128,
                   drop_path=0.0, time_embedding_std=1.0),
        data=dict(dataset='synthetic_motion', sampling_rate=2,
                  train_scales=(32, 40), test_num_crops=1, num_workers=2),
        optimizer=dict(name='adamw', learning_rate=1e-3, weight_decay=0.05,
                       schedule='cosine', warmup_epochs=1.0),
        batch_size=32, grad_accum_steps=1, eval_batch_size=32, num_epochs=8,
        log_every_steps=32, checkpoint_every_steps=128,
        init_from=dict(path=SCRATCH)),
}


def get_config(arg: str | None = None, **defaults
               ) -> ml_collections.ConfigDict:
  """The job config; `defaults` replace the arg's defaults (the scheme
  files pass `attention`)."""
  arg = common.parse_arg(
      arg, dict(dict(variant='base', dataset='', attention='divided'),
                **defaults),
      shorthands=dict(variant=VARIANTS, dataset=[*dataset_facts.DATASETS,
                                                 *dataset_facts.ALIASES]))
  if arg['variant'].lower() not in VARIANTS:
    raise ValueError(f'Unknown variant {arg["variant"]!r}; valid: '
                     f'{sorted(VARIANTS)}.')
  variant = arg['variant'].lower()

  config = ml_collections.ConfigDict()
  config.variant = variant
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      attention=arg['attention'],
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
      # The head's loss and scores: 'softmax' (one class per video: cross-
      # entropy) or 'sigmoid' (several: per-class binary cross-entropy,
      # sigmoid probabilities, mAP). Multi-label datasets set 'sigmoid'.
      loss='softmax',
  ))
  # The dataset's fields (flips, temporal sampling, pixels; the classes):
  # `_set_dataset`, from `dataset_facts`.
  config.data = ml_collections.ConfigDict(dict(
      data_dir='',
      train_split='train',
      eval_split='test',
      # 'files' decodes the videos of data_dir; 'tfds' reads what
      # `python -m tsformer_jax.datasets.prepare` wrote to tfds_dir
      # ('': ~/.cache/tsformer_jax/tfds).
      format='files',
      tfds_dir='',
      sampling_rate=32,
      target_fps=30.0,
      train_scales=(256, 320),
      # Resizing: 'original' as the original (whole frames, bilinear, no
      # antialiasing, float32 pixels) or 'antialias' (PIL's antialiased
      # bilinear filter, uint8 pixels: 4x fewer bytes to the device).
      resize='original',
      # The original's normalisation; it travels with every checkpoint, as
      # the channel order does.
      mean=(0.45, 0.45, 0.45),
      std=(0.225, 0.225, 0.225),
      test_num_clips=1,
      test_num_crops=3,
      # Where test clips sit: 'paper' (one clip in the middle; n clips from
      # the first frame to the last) or 'original' (the original code's
      # clip k of n at slack * k / n: one clip starts at frame 0).
      test_clip_positions='paper',
      # How a video's views (and long videos' clips) combine: 'logit_sum'
      # (the original's test meter: logits summed, the sums ranked; the
      # paper says only "averaging the scores") or 'softmax_mean'
      # (probabilities averaged).
      test_view_scores='logit_sum',
      # > 0: evaluate whole videos, a clip every this many seconds, scores
      # averaged (the paper's long-video protocol).
      test_clip_stride=0.0,
      num_workers=8,
      # Loader workers: 'process' (past the GIL) or 'thread'.
      worker_type='process',
      # Seconds before a stalled decoder's video counts as bad (0: no
      # bound): far above a clip's decoding (well under a second).
      decode_timeout_s=60.0,
      # Class names by index; empty: the dataset's. Checkpoints carry them.
      class_names=(),
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
      # 'bfloat16' halves the momentum's (AdamW: first moment's) memory.
      state_dtype='float32',
  ))
  # Clips are split over every mesh axis; parameters and optimizer state
  # over `fsdp` when it is above 1 (arrays of fsdp_min_size elements up).
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
  # A training loss or update that is NaN or Inf: 'stop' ends the job naming
  # the step and the last good checkpoint; 'skip' drops that update (the
  # step still counts) and counts it (train/skipped_updates, results.json).
  config.on_nonfinite = 'stop'
  config.profile = False
  # Weights to start from, any format `tsformer_jax.load_checkpoint` reads
  # (a file, a directory or a Hub id), fitted to config.model: only a head
  # that does not fit is new. SCRATCH: random weights. 'pos_resize' '1d'
  # resizes the position embedding for another frame size as the original
  # does (the flattened sequence), '2d' as a grid.
  config.init_from = ml_collections.ConfigDict(dict(
      path=IMAGENET_VIT, format='auto', pos_resize='1d'))

  _set_dataset(config, DEFAULT_DATASET)
  for section, values in VARIANTS[variant].items():
    if isinstance(values, dict):
      config[section].update(values)
    else:
      config[section] = values
  # A dataset the arg names, else the variant's, overrides the variant.
  named = arg['dataset'] or VARIANTS[variant].get('data', {}).get('dataset')
  if named:
    _set_dataset(config, named)
  return config


def _set_dataset(config: ml_collections.ConfigDict, name: str):
  """Sets `config`'s dataset fields from its facts (`dataset_facts`)."""
  facts = dataset_facts.get(name)
  config.data.dataset = facts.name
  config.data.update(facts.data_fields())
  config.model.num_classes = facts.num_classes
  # Several classes per video: per-class sigmoid (`config.model.loss`).
  config.model.loss = 'sigmoid' if facts.multi_label else 'softmax'
  config.model.num_frames = facts.frames.get(config.variant,
                                             config.model.num_frames)
  if not facts.pretrained:
    config.init_from.path = SCRATCH
