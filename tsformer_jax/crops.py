"""Crops of frames at a new size: the original's resize or PIL's.

A `Crop` is planned on the frame's resized grid (`clip_lib` plans them) and
only its pixels are computed (`RESIZE_MODES`): 'original', the original
code's bilinear resize of the whole frame without antialiasing
(`torch.nn.functional.interpolate`, `align_corners=False`), into float32
pixel values; or 'antialias', PIL's antialiased bilinear filter into uint8.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math

import numpy as np
import PIL.Image

# How frames are resized (`config.data.resize`).
RESIZE_MODES = ('original', 'antialias')


@dataclasses.dataclass(frozen=True)
class Crop:
  """A crop of frames resized as a whole to `resized`.

  Attributes:
    resized: `(height, width)` the whole frame is resized to.
    y: the crop's first row in the resized frame.
    x: its first column.
    size: its `(height, width)`.
    flip: whether it is mirrored left to right.
  """
  resized: tuple[int, int]
  y: int
  x: int
  size: tuple[int, int]
  flip: bool = False


def short_side_size(frame_size: tuple[int, int], short: int,
                    at_least: tuple[int, int] = (0, 0)) -> tuple[int, int]:
  """`(height, width)` with min(H, W) == short and the long side scaled
  alike, rounded down as the original rounds it, then grown where smaller
  than `at_least`."""
  h, w = frame_size
  if min(h, w) != short:
    if w < h:
      h, w = math.floor(h / w * short), short
    else:
      h, w = short, math.floor(w / h * short)
  return max(h, at_least[0]), max(w, at_least[1])



def resize(frames: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """uint8 `[N, H, W, 3]` -> `[N, *shape, 3]`, antialiased bilinear
  (`resize_frame`)."""
  if tuple(frames.shape[1:3]) == tuple(shape):
    return frames
  return np.stack([resize_frame(f, shape) for f in frames])


def resize_frame(frame: np.ndarray, shape: tuple[int, int],
                 box: tuple[float, float, float, float] | None = None,
                 flip: bool = False) -> np.ndarray:
  """uint8 `[H, W, 3]` -> `[*shape, 3]`: PIL's antialiased bilinear filter
  over `box` (left, top, right, bottom; None for the whole frame), then
  mirrored if `flip`.

  Each channel is filtered in float32 (PIL's mode 'F') and rounded once,
  as TensorFlow's `resize(antialias=True)` is: the clips of the earlier
  TensorFlow pipeline, within float rounding. (PIL's uint8 RGB filter,
  which rounds between its two passes, costs 40% less but differs by up to
  two levels, enough to change where a run from scratch ends.)
  """
  out = np.empty(tuple(shape) + (3,), np.uint8)
  for c in range(3):
    channel = PIL.Image.fromarray(np.ascontiguousarray(frame[..., c]))
    channel = channel.convert('F').resize(
        (shape[1], shape[0]), PIL.Image.Resampling.BILINEAR, box=box)
    if flip:  # In PIL: a strided copy in numpy costs more.
      channel = channel.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    np.clip(np.round(np.asarray(channel)), 0, 255, out=out[..., c],
            casting='unsafe')
  return out


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize so that min(H, W) == size; uint8 in, uint8 out."""
  return resize(frames, short_side_size(frames.shape[1:3], size))


def bilinear_taps(in_size: int, out_size: int, start: int, count: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Where outputs `start` to `start + count - 1` of a bilinear resize from
  `in_size` to `out_size` pixels read, as torch's `interpolate(mode=
  'bilinear', align_corners=False)` computes it on the CPU.

  Output `k` sits at source position `s = max((k + 0.5) * in / out - 0.5,
  0)`: pixel centres, clamped at the first. It reads pixels `i0 =
  floor(s)` and `i1 = min(i0 + 1, in - 1)` with weights `1 - w` and
  `w = s - i0`.

  Returns:
    `(i0, i1, 1 - w, w)`: int64 `[count]` twice, float32 `[count]` twice.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  # float32 as torch's, rounded once as the fused multiply-add of its AVX2
  # and AVX-512 kernels rounds (its baseline kernel rounds twice, which
  # moves `w` by an ulp: up to 4e-3 of a level at a sharp edge).
  position = np.float64(scale) * (np.arange(start, start + count) + 0.5)
  source = np.maximum((position - 0.5).astype(np.float32), np.float32(0))
  first = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  second = np.minimum(first + 1, in_size - 1)
  weight = np.clip(source - first, 0, 1).astype(np.float32)
  return first, second, np.float32(1) - weight, weight


def _lerp(x: np.ndarray, taps: tuple[np.ndarray, ...], axis: int
          ) -> np.ndarray:
  """`x` resampled along `axis` by `bilinear_taps`' `taps`: float32."""
  first, second, w0, w1 = taps
  # The weights spelled out over the axes after `axis`: broadcast along
  # the channels, numpy's inner loop would run 3 values at a time.
  trailing = x.shape[axis + 1:]
  ones = np.ones(trailing, np.float32)
  spell = lambda w: w.reshape(w.shape + (1,) * len(trailing)) * ones
  out = np.take(x, first, axis) * spell(w0)
  out += np.take(x, second, axis) * spell(w1)
  return out


def original_crop(frames: np.ndarray, crop: Crop) -> np.ndarray:
  """The original's pixels: `frames` (uint8 or float `[N, h, w, 3]`) resized
  as a whole to `crop.resized` by `bilinear_taps`, cut to the crop and
  mirrored if `crop.flip`: float32 `[N, *crop.size, 3]`, pixel values.

  Only the crop's pixels are computed, rows then columns: each from two
  source rows of the columns the crop reads, then from two of those
  columns. Equal to `torch.nn.functional.interpolate(frames, crop.resized,
  mode='bilinear', align_corners=False)` cut to the crop, within float
  rounding (torch takes columns first).
  """
  (h, w), (ch, cw) = frames.shape[1:3], crop.size
  rows = bilinear_taps(h, crop.resized[0], crop.y, ch)
  cols = bilinear_taps(w, crop.resized[1], crop.x, cw)
  if crop.flip:
    cols = tuple(t[::-1] for t in cols)
  left, right = int(cols[0].min()), int(cols[1].max()) + 1
  tall = _lerp(frames[:, :, left:right], rows, axis=1)  # [N, ch, box, 3]
  return _lerp(tall, (cols[0] - left, cols[1] - left) + cols[2:], axis=2)


def apply_crops(frames: np.ndarray, crops: Sequence[Crop],
                resize_mode: str = 'original') -> list[np.ndarray]:
  """Each crop of `frames` (uint8 `[N, h, w, 3]`), resized as `resize_mode`
  says (`RESIZE_MODES`): `[N, *size, 3]`, float32 ('original',
  `original_crop`) or uint8 ('antialias', `antialias_crops`)."""
  if resize_mode == 'original':
    return [original_crop(frames, c) for c in crops]
  if resize_mode != 'antialias':
    raise ValueError(f'Unknown resize {resize_mode!r}; valid: '
                     f'{list(RESIZE_MODES)}.')
  return antialias_crops(frames, crops)


def antialias_crops(frames: np.ndarray, crops: Sequence[Crop]
                    ) -> list[np.ndarray]:
  """Each crop of `frames` (uint8 `[N, h, w, 3]`) by PIL's antialiased
  filter (`resize_frame`): uint8 `[N, *size, 3]`.

  A single crop is resized alone, from its box in `frames` (pixels outside
  it still weigh in at its edges, so it equals resizing the whole frame
  and cropping); several share one resize of the whole frame. `frames` may
  be smaller than the frame the crops were planned for (decoded at a
  reduced scale): the boxes scale with it.
  """
  if not crops:
    return []
  resized = crops[0].resized
  if len(crops) > 1 or tuple(frames.shape[1:3]) == tuple(resized):
    whole = resize(frames, resized)
    cut = [whole[:, c.y:c.y + c.size[0], c.x:c.x + c.size[1]]
           for c in crops]
    return [x[:, :, ::-1] if c.flip else x
            for x, c in zip(cut, crops, strict=True)]
  c = crops[0]
  h, w = frames.shape[1:3]
  sy, sx = h / resized[0], w / resized[1]
  # Clamped: rounding must not put the box past the frame (PIL refuses).
  box = (c.x * sx, c.y * sy, min((c.x + c.size[1]) * sx, w),
         min((c.y + c.size[0]) * sy, h))
  return [np.stack([resize_frame(f, c.size, box, c.flip) for f in frames])]


def crop(frames: np.ndarray, size: tuple[int, int], y: int, x: int
         ) -> np.ndarray:
  return frames[:, y:y + size[0], x:x + size[1]]
