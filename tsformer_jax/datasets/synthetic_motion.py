"""synthetic_motion: moving squares whose class is the order of their colours.

A square glides over noise, red then blue or blue then red. Played backwards
a clip is as likely as forwards, so only frame order tells the class: a
per-frame model (`space_only`) stays at chance. Clips are a pure function of
(split, index), so the data needs no download.

synthetic_attributes, the multi-label demo, draws the same squares with
three independent attributes (`ATTRIBUTES`): the colour order, a square that
grows or shrinks, a square that moves or stands still. A video carries
any subset of them, none or all included.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from tsformer_jax import clip_lib

CLASSES = ('red_then_blue', 'blue_then_red')
_COLOURS = {'red': (230.0, 60.0, 60.0), 'blue': (60.0, 90.0, 230.0)}
SPLITS = {'train': 2048, 'test': 256}
ATTRIBUTES = ('red_then_blue', 'grows', 'moves')


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


# synthetic_attributes' squares grow from 6 to 14 pixels (or shrink so),
# and move 1.2 pixels a frame, or stand still.
ATTRIBUTES_SPEC = Spec(square=(6, 14), speed=1.2)


def generate(split: str, index: int, spec: Spec = Spec()
             ) -> tuple[np.ndarray, int]:
  """Video `index` of `split`: (uint8 frames [F, H, W, 3], class index)."""
  rng = _rng(split, index)
  label = int(rng.integers(len(CLASSES)))
  side = int(rng.integers(spec.square[0], spec.square[1] + 1))
  angle = rng.uniform(0.0, 2 * np.pi)
  return render(rng, spec, _colours(CLASSES[label]), (side, side),
                angle), label


def generate_attributes(split: str, index: int,
                        spec: Spec = ATTRIBUTES_SPEC
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Video `index` of `split` of `synthetic_attributes`: (uint8 frames
  [F, H, W, 3], uint8 multi-hot [len(ATTRIBUTES)]).

  Each attribute is an independent fair coin, so a video has any subset of
  them: its colour order, whether its square grows (from `spec.square[0]`
  to `spec.square[1]` pixels) or shrinks, and whether it moves (at
  `spec.speed`, in any direction) or stands still. The first two are told
  only by frame order. (Horizontal against vertical paths, and fast against
  slow, tried first, stayed near chance in a demo run of 600 and 300
  steps: from scratch, the position embedding knows no geometry, which
  they need and these do not.)
  """
  rng = _rng(split, index, stream=1)
  target = rng.integers(2, size=len(ATTRIBUTES)).astype(np.uint8)
  red_first, grows, moves = target.tolist()
  order = 'red_then_blue' if red_first else 'blue_then_red'
  sides = spec.square if grows else spec.square[::-1]
  if not moves:
    spec = dataclasses.replace(spec, speed=0.0)
  angle = rng.uniform(0.0, 2 * np.pi)
  return render(rng, spec, _colours(order), sides, angle), target


def render(rng: np.random.Generator, spec: Spec,
           colours: tuple[np.ndarray, np.ndarray], sides: tuple[int, int],
           angle: float) -> np.ndarray:
  """uint8 `[F, H, W, 3]`: a square of `colours[0]` then (half way)
  `colours[1]`, its side going linearly from `sides[0]` to `sides[1]`
  about its centre, gliding at `spec.speed` pixels per frame in direction
  `angle`, over noise drawn from `rng`."""
  velocity = spec.speed * np.array([np.sin(angle), np.cos(angle)])  # (y, x)
  travel = velocity * (spec.num_frames - 1)
  room = spec.size - max(sides) - np.abs(travel)
  if (room < 0).any():
    raise ValueError(f'A {max(sides)}-pixel square moving '
                     f'{np.abs(travel).max():.1f} pixels does not fit in '
                     f'{spec.size} pixels: lower speed or num_frames.')
  # Uniform over the starts that keep the whole path inside the frame.
  start = rng.uniform(0.0, room) + np.maximum(-travel, 0.0)
  side_at = np.round(np.linspace(sides[0], sides[1], spec.num_frames))
  background = rng.uniform(0, 60, size=(spec.size, spec.size, 3))
  frames = np.empty((spec.num_frames, spec.size, spec.size, 3), np.uint8)
  for t in range(spec.num_frames):
    frame = background + rng.normal(0, spec.noise, size=background.shape)
    # The square's box is the largest side's; it grows about its centre.
    side = int(side_at[t])
    y, x = (np.round(start + velocity * t).astype(int) +
            (max(sides) - side) // 2)
    frame[y:y + side, x:x + side] = colours[t >= spec.num_frames // 2]
    frames[t] = np.clip(frame, 0, 255)
  return frames


def _rng(split: str, index: int, stream: int = 0) -> np.random.Generator:
  """The generator of video `index` of `split`; `stream` 1 for
  `synthetic_attributes`, so that it draws apart from `synthetic_motion`."""
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid: {sorted(SPLITS)}.')
  key = [zlib.crc32(split.encode()), index] + ([stream] if stream else [])
  return np.random.default_rng(key)


def _colours(order: str) -> tuple[np.ndarray, np.ndarray]:
  """'red_then_blue' -> (red, blue) pixel values."""
  first, second = order.split('_then_')
  return np.array(_COLOURS[first]), np.array(_COLOURS[second])


def num_examples(split: str) -> int:
  return SPLITS[split]


class Source:
  """The generated videos as a random-access `clip_lib.Source`."""
  multi_label = False
  default_spec = Spec()
  generate = staticmethod(generate)

  def __init__(self, split: str, spec: Spec | None = None,
               fps: float = 30.0):
    if split not in SPLITS:
      raise ValueError(f'Unknown split {split!r}; valid: {sorted(SPLITS)}.')
    self.split, self.fps = split, fps
    self.spec = self.default_spec if spec is None else spec

  def __len__(self) -> int:
    return SPLITS[self.split]

  def __getitem__(self, index: int):
    frames, label = self.generate(self.split, index, self.spec)
    return clip_lib.ArrayVideo(frames, self.fps), label


class AttributesSource(Source):
  """synthetic_attributes as a random-access `clip_lib.Source`: labels are
  uint8 multi-hot `[len(ATTRIBUTES)]`."""
  multi_label = True
  num_classes = len(ATTRIBUTES)
  default_spec = ATTRIBUTES_SPEC
  generate = staticmethod(generate_attributes)
