"""synthetic_motion: moving squares whose class is the order of their colours.

A square glides over noise, red then blue or blue then red. Played backwards
a clip is as likely as forwards, so only frame order tells the class: a
per-frame model (`space_only`) stays at chance. Clips are a pure function of
(split, index), so the data needs no download.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from tsformer_jax import clip_lib

CLASSES = ('red_then_blue', 'blue_then_red')
_COLOURS = {'red': (230.0, 60.0, 60.0), 'blue': (60.0, 90.0, 230.0)}
SPLITS = {'train': 2048, 'test': 256}


@dataclasses.dataclass(frozen=True)
class Spec:
  """The generated videos.

  Attributes:
    num_frames: frames per video; the colour changes half way.
    size: frame height and width in pixels.
    square: (min, max) side of the square in pixels.
    speed: pixels moved per frame.
    noise: standard deviation of the per-frame pixel noise.
  """
  num_frames: int = 16
  size: int = 32
  square: tuple[int, int] = (8, 12)
  speed: float = 0.8
  noise: float = 8.0


def generate(split: str, index: int, spec: Spec = Spec()
             ) -> tuple[np.ndarray, int]:
  """Video `index` of `split`: (uint8 frames [F, H, W, 3], class index)."""
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid: {sorted(SPLITS)}.')
  rng = np.random.default_rng([zlib.crc32(split.encode()), index])
  label = int(rng.integers(len(CLASSES)))
  first, second = (_COLOURS[c] for c in CLASSES[label].split('_then_'))
  side = int(rng.integers(spec.square[0], spec.square[1] + 1))
  angle = rng.uniform(0.0, 2 * np.pi)
  velocity = spec.speed * np.array([np.sin(angle), np.cos(angle)])  # (y, x)
  travel = velocity * (spec.num_frames - 1)
  room = spec.size - side - np.abs(travel)
  if (room < 0).any():
    raise ValueError(f'A {side}-pixel square moving {np.abs(travel).max():.1f}'
                     f' pixels does not fit in {spec.size} pixels: lower '
                     'speed or num_frames.')
  # Uniform over the starts that keep the whole path inside the frame.
  start = rng.uniform(0.0, room) + np.maximum(-travel, 0.0)
  background = rng.uniform(0, 60, size=(spec.size, spec.size, 3))
  frames = np.empty((spec.num_frames, spec.size, spec.size, 3), np.uint8)
  for t in range(spec.num_frames):
    frame = background + rng.normal(0, spec.noise, size=background.shape)
    y, x = np.round(start + velocity * t).astype(int)
    frame[y:y + side, x:x + side] = (first if t < spec.num_frames // 2
                                     else second)
    frames[t] = np.clip(frame, 0, 255)
  return frames, label


def num_examples(split: str) -> int:
  return SPLITS[split]


class Source:
  """The generated videos as a random-access `clip_lib.Source`."""

  def __init__(self, split: str, spec: Spec = Spec(), fps: float = 30.0):
    if split not in SPLITS:
      raise ValueError(f'Unknown split {split!r}; valid: {sorted(SPLITS)}.')
    self.split, self.spec, self.fps = split, spec, fps

  def __len__(self) -> int:
    return SPLITS[self.split]

  def __getitem__(self, index: int):
    frames, label = generate(self.split, index, self.spec)
    return clip_lib.ArrayVideo(frames, self.fps), label
