"""synthetic_motion: moving squares whose class is their direction of motion.

Every clip shows one coloured square gliding over a noisy background, in one
of `CLASSES` directions. The start point is uniform over the positions from
which the whole path stays inside the frame, so the set of positions a clip
visits is equally likely under a direction and its reverse: any single frame,
and any unordered set of frames, says nothing about the class. Only the
order of the frames does, which is what temporal attention can see and a
per-frame model (`space_only`) cannot.

Clips are a pure function of (split, index): the dataset is regenerated
identically anywhere, with no download.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from tsformer_jax import input_pipeline

CLASSES = ('right', 'left', 'down', 'up')
_DIRECTIONS = {'right': (0, 1), 'left': (0, -1), 'down': (1, 0), 'up': (-1, 0)}
SPLITS = {'train': 2048, 'test': 256}


@dataclasses.dataclass(frozen=True)
class Spec:
  """The generated videos.

  Attributes:
    num_frames: frames per video.
    size: frame height and width in pixels.
    square: (min, max) side of the square in pixels.
    speed: pixels moved per frame.
    noise: standard deviation of the per-frame pixel noise.
  """
  num_frames: int = 16
  size: int = 32
  square: tuple[int, int] = (5, 8)
  speed: float = 1.4
  noise: float = 8.0


def generate(split: str, index: int, spec: Spec = Spec()
             ) -> tuple[np.ndarray, int]:
  """Video `index` of `split`: (uint8 frames [F, H, W, 3], class index)."""
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid: {sorted(SPLITS)}.')
  rng = np.random.default_rng([zlib.crc32(split.encode()), index])
  label = int(rng.integers(len(CLASSES)))
  side = int(rng.integers(spec.square[0], spec.square[1] + 1))
  travel = spec.speed * (spec.num_frames - 1)
  room = spec.size - side - travel
  if room < 0:
    raise ValueError(f'A {side}-pixel square moving {travel} pixels does not '
                     f'fit in {spec.size} pixels: lower speed or num_frames.')
  dy, dx = _DIRECTIONS[CLASSES[label]]
  # Along the motion the start leaves room for the whole path; across it
  # the square may sit anywhere.
  start = [rng.uniform(0, room) + (travel if d < 0 else 0) if d else
           rng.uniform(0, spec.size - side) for d in (dy, dx)]
  colour = rng.uniform(100, 255, size=3)
  background = rng.uniform(0, 60, size=(spec.size, spec.size, 3))
  frames = np.empty((spec.num_frames, spec.size, spec.size, 3), np.uint8)
  for t in range(spec.num_frames):
    noise = rng.normal(0, spec.noise, size=background.shape)
    frame = background + noise
    y, x = (int(round(s + d * spec.speed * t)) for s, d in zip(
        start, (dy, dx), strict=True))
    frame[y:y + side, x:x + side] = colour
    frames[t] = np.clip(frame, 0, 255)
  return frames, label


def num_examples(split: str) -> int:
  return SPLITS[split]


class Source:
  """The generated videos as a random-access `input_pipeline.Source`."""

  def __init__(self, split: str, spec: Spec = Spec(), fps: float = 30.0):
    if split not in SPLITS:
      raise ValueError(f'Unknown split {split!r}; valid: {sorted(SPLITS)}.')
    self.split, self.spec, self.fps = split, spec, fps

  def __len__(self) -> int:
    return SPLITS[self.split]

  def __getitem__(self, index: int):
    frames, label = generate(self.split, index, self.spec)
    return input_pipeline.ArrayVideo(frames, self.fps), label
