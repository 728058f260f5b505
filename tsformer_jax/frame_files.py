"""A video stored as image files, a file per frame (Charades' JPEGs, as
PySlowFast reads them): decoded on demand with PIL.

Datasets list every frame of such videos, millions of paths in all, so
`numbered` stores a run of numbered files (`46GP8-000001.jpg`, ...) as
its pattern and count.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import re

import numpy as np
import PIL.Image

_NUMBER = re.compile(r'(\d+)(\D*)$')


@dataclasses.dataclass(frozen=True)
class NumberedPaths(Sequence):
  """`count` paths `head + str(first + i).zfill(width) + tail`."""
  head: str
  first: int
  width: int
  tail: str
  count: int

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self.count))]
    if not -self.count <= index < self.count:
      raise IndexError(f'Frame {index} of {self.count}.')
    number = self.first + index % self.count
    return f'{self.head}{number:0{self.width}d}{self.tail}'


def numbered(paths: Sequence[str]) -> Sequence[str]:
  """`paths` as `NumberedPaths` where they are consecutive numbered files
  (the last number in the name counts up by one), else as a tuple."""
  match = _NUMBER.search(paths[0]) if paths else None
  if match is None:
    return tuple(paths)
  compact = NumberedPaths(paths[0][:match.start()], int(match[1]),
                          len(match[1]), match[2], len(paths))
  return compact if list(compact) == list(paths) else tuple(paths)


@dataclasses.dataclass(frozen=True)
class FrameFiles:
  """A video of image files (any format PIL reads), one per frame, as a
  `clip_lib.Video`.

  Attributes:
    paths: the frames' files, in order.
    fps: the frame rate they were extracted at.
  """
  paths: Sequence[str]
  fps: float
  # JPEG frames decode at reduced scales (`frames(..., min_size)`).
  decodes_reduced = True

  @property
  def num_frames(self) -> int:
    return len(self.paths)

  @property
  def frame_size(self) -> tuple[int, int]:
    """`(height, width)` of the first frame, from its header alone."""
    with PIL.Image.open(self.paths[0]) as image:
      return image.height, image.width

  def frames(self, indices: np.ndarray,
             min_size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 `[len(indices), H, W, 3]`; each distinct frame decoded once,
    a JPEG at its smallest reduced scale no smaller than `min_size`."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or
                         indices.max() >= self.num_frames):
      raise IndexError(f'Frames {indices.min()}..{indices.max()} of '
                       f'{self.num_frames}.')
    decoded = {i: _decode(self.paths[i], min_size)
               for i in dict.fromkeys(indices.tolist())}
    if not decoded:
      return np.zeros((0,) + self.frame_size + (3,), np.uint8)
    return np.stack([decoded[i] for i in indices.tolist()])


def _decode(path: str, min_size: tuple[int, int] | None) -> np.ndarray:
  """The image at `path` as uint8 `[H, W, 3]` RGB."""
  with PIL.Image.open(path) as image:
    if min_size is not None and image.format == 'JPEG':
      image.draft('RGB', (min_size[1], min_size[0]))
    return np.asarray(image.convert('RGB'))
