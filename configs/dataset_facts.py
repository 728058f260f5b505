"""What each dataset is, written once: `default.py` makes its recipe of them
and `datasets/registry.py` checks its files against them.

Plain data: importing it loads no video or TensorFlow stack.
"""

from __future__ import annotations

import dataclasses

# The `config.data` fields a dataset fixes; `Facts` has each.
DATA_FIELDS = ('flip', 'sampling', 'segment_fps', 'scale_jitter',
               'channel_order')


@dataclasses.dataclass(frozen=True)
class Facts:
  """One dataset.

  Attributes:
    name: its key in `DATASETS` (`config.data.dataset`).
    num_classes: its classes (`config.model.num_classes`); 0 where its files
      tell them (`folder`), and the model must have that many.
    flip: whether training flips clips horizontally; not where left and
      right tell classes apart (SSv2: "from left to right").
    sampling: 'rate' (a clip spans num_frames * sampling_rate frames) or
      'segments' (one frame per equal segment of the video, SSv2).
    segment_fps: for 'segments', the frame rate a video is resampled to (as
      `ffmpeg -r` would) before it is cut; 0: its own frames.
    scale_jitter: the training short side, 'uniform' round(uniform(min,
      max)) or 'inverse_uniform' round(1 / uniform(1 / max, 1 / min)).
    channel_order: the pixels the model takes, 'rgb' or 'bgr'.
    frames: frames per clip by variant, where they differ from the
      variant's.
    pretrained: whether it starts from ImageNet weights, as the paper's
      runs; generated shapes resemble nothing in ImageNet.
    original_name: the original code's `TRAIN.DATASET` for it ('' where it
      has none).
    multi_label: whether a video has any number of its classes (labels are
      multi-hot, the loss per-class sigmoid); otherwise exactly one.
  """
  name: str
  num_classes: int
  flip: bool = True
  sampling: str = 'rate'
  segment_fps: float = 0.0
  scale_jitter: str = 'uniform'
  channel_order: str = 'rgb'
  frames: dict[str, int] = dataclasses.field(default_factory=dict)
  pretrained: bool = True
  original_name: str = ''
  multi_label: bool = False

  def data_fields(self) -> dict[str, object]:
    """Its `config.data` fields (`DATA_FIELDS`)."""
    return {key: getattr(self, key) for key in DATA_FIELDS}


# SSv2 as the original read it: segments of its frames at 30 fps (the JPEGs
# it extracted), inverse-uniform scale jitter, BGR pixels (cv2 decoded
# them); the original names Kinetics without its class count.
DATASETS = {facts.name: facts for facts in [
    Facts('synthetic_motion', 2, pretrained=False),
    Facts('synthetic_motion_videos', 2, pretrained=False),
    # The multi-label demo: three independent attributes per video.
    Facts('synthetic_attributes', 3, pretrained=False, multi_label=True),
    Facts('kinetics400', 400, original_name='kinetics'),
    Facts('kinetics600', 600, original_name='kinetics'),
    Facts('ssv2', 174, flip=False, sampling='segments', segment_fps=30.0,
          scale_jitter='inverse_uniform', channel_order='bgr',
          frames=dict(base=8, hr=16, l=64), original_name='ssv2'),
    Facts('diving48', 48, original_name='diving48'),
    # PySlowFast's Charades: its frames (24 fps JPEGs) and frame lists.
    Facts('charades', 157, multi_label=True, original_name='charades'),
    # Your videos, {data_dir}/{train,val}/{class}/*.
    Facts('folder', 0),
]}
# Other names accepted for a dataset.
ALIASES = {'k400': 'kinetics400', 'k600': 'kinetics600',
           'something_something_v2': 'ssv2'}


def get(name: str) -> Facts:
  """The facts of `name`, a key of `DATASETS` or of `ALIASES`, in any case.

  Raises:
    ValueError: an unknown name, listing the valid ones.
  """
  key = name.strip().lower()
  key = ALIASES.get(key, key)
  if key not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; valid: {sorted(DATASETS)} '
                     f'(aliases: {sorted(ALIASES)}).')
  return DATASETS[key]
