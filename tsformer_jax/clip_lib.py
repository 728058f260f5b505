"""A clip from a video: which frames, which crop, what size.

Sampling and crops follow the original (PySlowFast); evaluation's clip
positions are the paper's or the original code's (`CLIP_POSITIONS`). A
clip's crop is planned before its frames are decoded, and only the crop's
pixels are computed (`crops.py`): by default as the original resizes whole
frames (bilinear, no antialiasing) into float32 pixel values; or by PIL's
antialiased bilinear filter into uint8, from frames decoded at a reduced
scale (JPEG) where the crop allows it. Clips stay pixel values
until the jitted steps normalise them on the device
(`device_normalize`)."""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import dataclasses
import math
import time
from typing import Protocol

import numpy as np

from tsformer_jax import crops


class Video(Protocol):
  """A video whose frames are decoded on demand.

  A video may also have `frame_size` (`(height, width)` known before
  decoding), and `frames(indices, min_size=(h, w))` to decode at a reduced
  scale no smaller than `min_size`; the pipeline uses them where present.
  """
  num_frames: int
  fps: float

  def frames(self, indices: np.ndarray) -> np.ndarray:
    """uint8 `[len(indices), H, W, 3]`."""


class Source(Protocol):
  """A random-access list of labelled videos."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[Video, int]:
    ...


@dataclasses.dataclass
class ArrayVideo:
  """A video already in memory: uint8 `[F, H, W, 3]`."""
  array: np.ndarray
  fps: float = 30.0

  @property
  def num_frames(self) -> int:
    return len(self.array)

  @property
  def frame_size(self) -> tuple[int, int]:
    return self.array.shape[1:3]

  def frames(self, indices: np.ndarray) -> np.ndarray:
    return self.array[indices]


class BadVideoError(Exception):
  """A video that cannot be decoded, is empty, or has no frames."""


class DecodeTimeoutError(BadVideoError):
  """A video whose decoding outlasted the time bound."""


class WorkerLostError(BadVideoError):
  """The worker process decoding a video ended (a decoder's crash)."""


def decode_timeout_error(seconds: float) -> DecodeTimeoutError:
  return DecodeTimeoutError(
      f'decoding stalled: no result within {seconds:g} s (the time bound; '
      'raise config.data.decode_timeout_s, or predict --decode_timeout_s, '
      'if the storage is merely slow).')



# Where evaluation's temporal clips sit (`ClipSpec.clip_positions`).
CLIP_POSITIONS = ('paper', 'original')
# How frames are resized (`ClipSpec.resize`): 'original' as the original
# code (`torch.nn.functional.interpolate`, bilinear, align_corners=False, no
# antialiasing) into float32; 'antialias' by PIL's antialiased bilinear
# filter, rounded to uint8.
# How the training short side is drawn (`ClipSpec.scale_jitter`).
SCALE_JITTERS = ('uniform', 'inverse_uniform')
# The channel order a model takes its pixels in (`config.data.channel_order`);
# clips are always decoded RGB.
CHANNEL_ORDERS = ('rgb', 'bgr')


def check_channel_order(channel_order: str,
                        given_as: str = 'Unknown channel_order') -> str:
  """`channel_order` if one of `CHANNEL_ORDERS`, else a ValueError whose
  line starts with `given_as` (where the value came from)."""
  if channel_order not in CHANNEL_ORDERS:
    raise ValueError(f'{given_as} {channel_order!r}; valid: '
                     f'{list(CHANNEL_ORDERS)}.')
  return channel_order


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """How clips are cut and processed (from `config.data`).

  Attributes:
    num_frames: frames per clip (T).
    sampling_rate: take every `sampling_rate`-th frame at `target_fps`.
    crop_size: (height, width) of the clip.
    target_fps: the frame rate `sampling_rate` refers to; videos at another
      rate are sampled at the same time span.
    train_scales: (min, max) short side before the training crop.
    flip: random horizontal flips in training.
    mean: per-channel pixel mean, in [0, 1] units.
    std: per-channel pixel standard deviation.
    num_clips: temporal clips per video at test time.
    num_crops: spatial crops per clip at test time (1: centre, 3: left,
      centre, right).
    sampling: 'rate' (a span of `num_frames * sampling_rate` frames) or
      'segments' (one frame per equal segment of the whole video;
      `sampling_rate` and `target_fps` unused).
    clip_positions: where test clips start with 'rate' sampling: 'paper'
      (one clip in the middle, as the paper says; `n` clips evenly from
      the first frame to the last) or 'original' (the original code: clip
      `k` of `n` at `slack * k / n`, so one clip starts at frame 0).
    decode_timeout_s: seconds a video's loading may take before the video
      counts as bad (`long_video`: each wait for its next clip, so that a
      long video is not bad for being long); None: no bound.
    segment_fps: with 'segments' sampling, the frame rate the video is
      resampled to before it is cut into segments, as `ffmpeg -r` would
      write its frames (`resampled_frames`; SSv2's JPEGs: 30); 0: its own
      frames.
    scale_jitter: how the training short side is drawn from
      `train_scales` (`SCALE_JITTERS`, see `draw_short_side`).
    channel_order: the order of the channels the model takes
      (`CHANNEL_ORDERS`); clips are decoded RGB and reversed on
      normalising for 'bgr'.
    resize: how frames are resized (`crops.RESIZE_MODES`): 'original' gives
      float32 clips, 'antialias' uint8 ones.
  """
  num_frames: int
  sampling_rate: int
  crop_size: tuple[int, int]
  target_fps: float = 30.0
  train_scales: tuple[int, int] = (256, 320)
  flip: bool = True
  mean: tuple[float, float, float] = (0.45, 0.45, 0.45)
  std: tuple[float, float, float] = (0.225, 0.225, 0.225)
  num_clips: int = 1
  num_crops: int = 3
  sampling: str = 'rate'
  clip_positions: str = 'paper'
  decode_timeout_s: float | None = None
  segment_fps: float = 0.0
  scale_jitter: str = 'uniform'
  channel_order: str = 'rgb'
  resize: str = 'original'

  def __post_init__(self):
    check_channel_order(self.channel_order)
    if self.resize not in crops.RESIZE_MODES:
      raise ValueError(f'Unknown resize {self.resize!r}; valid: '
                       f'{list(crops.RESIZE_MODES)}.')
    if self.scale_jitter not in SCALE_JITTERS:
      raise ValueError(f'Unknown scale_jitter {self.scale_jitter!r}; valid: '
                       f'{list(SCALE_JITTERS)}.')
    if self.segment_fps < 0:
      raise ValueError(f'segment_fps must be 0 (the video\'s own frames) or '
                       f'a frame rate, got {self.segment_fps}.')

  @property
  def num_views(self) -> int:
    return self.num_clips * self.num_crops


def clip_spec(config) -> ClipSpec:
  """The `ClipSpec` of a full config (model sizes plus `config.data`)."""
  d = config.data
  return ClipSpec(
      num_frames=config.model.num_frames, sampling_rate=d.sampling_rate,
      crop_size=tuple(config.model.image_size), target_fps=d.target_fps,
      train_scales=tuple(d.train_scales), flip=d.flip, mean=tuple(d.mean),
      std=tuple(d.std), num_clips=d.test_num_clips,
      num_crops=d.test_num_crops, sampling=d.sampling,
      clip_positions=d.test_clip_positions,
      decode_timeout_s=time_bound(d.decode_timeout_s),
      segment_fps=float(d.segment_fps), scale_jitter=d.scale_jitter,
      channel_order=d.channel_order, resize=d.resize)


def time_bound(seconds: float | None) -> float | None:
  """`config.data.decode_timeout_s` as a bound: None for 0 or less."""
  return float(seconds) if seconds is not None and seconds > 0 else None


def temporal_indices(video_frames: int, video_fps: float, spec: ClipSpec,
                     clip: int | None = None,
                     rng: np.random.Generator | None = None) -> np.ndarray:
  """Frame indices of one clip: `[T]` ints in [0, video_frames).

  Args:
    clip: which of `spec.num_clips` test clips (placed as
      `spec.clip_positions` says); None draws a random start with `rng`
      (training).
    rng: the training draw's generator.
  """
  if spec.sampling == 'segments':
    if not spec.segment_fps:
      return segment_indices(video_frames, spec, clip, rng)
    # Segments of the resampled frames, then the video's frames they show.
    shown = resampled_frames(video_frames, video_fps, spec.segment_fps)
    return shown[segment_indices(len(shown), spec, clip, rng)]
  if spec.sampling != 'rate':
    raise ValueError(f'Unknown sampling {spec.sampling!r}; valid: '
                     "['rate', 'segments'].")
  span = spec.num_frames * spec.sampling_rate * video_fps / spec.target_fps
  slack = max(video_frames - span, 0.0)
  if clip is None:
    start = rng.uniform(0.0, slack)
  else:
    start = test_clip_start(slack, clip, spec)
  positions = np.linspace(start, start + span - 1, spec.num_frames)
  # Truncated as the original's `.long()`; short videos repeat the last frame.
  return np.clip(positions, 0, video_frames - 1).astype(np.int64)


def test_clip_start(slack: float, clip: int, spec: ClipSpec) -> float:
  """The first frame (fractional) of test clip `clip` of `spec.num_clips`,
  `slack` being the frames a clip leaves over.

  'paper': one clip sits in the middle (`slack / 2`), `n` clips at
  `slack * k / (n - 1)`, the first at frame 0 and the last ending on the
  last frame. 'original' (PySlowFast's `get_start_end_idx`):
  `slack * k / n`, so a single clip starts at frame 0.
  """
  n = spec.num_clips
  if spec.clip_positions == 'original':
    return slack * clip / n
  if spec.clip_positions != 'paper':
    raise ValueError(f'Unknown test_clip_positions {spec.clip_positions!r}'
                     f'; valid: {list(CLIP_POSITIONS)}.')
  return slack * clip / (n - 1) if n > 1 else slack / 2


def segment_indices(video_frames: int, spec: ClipSpec,
                    clip: int | None = None,
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """One frame per segment, as the original's SSv2 `get_seq_frames`:
  `[T]` ints in [0, video_frames).

  Segment `i` of `T` runs from `round(s * i)` to `round(s * (i + 1))`,
  `s = (L - 1) / T`, both ends included (`np.round` rounds halves to even,
  as the original's). Training (`clip` None) draws a frame of each
  uniformly with `rng`; the one test clip takes `(start + end) // 2`, and
  test clip `k` of `n` the point `(2k + 1) / 2n` of the way through.
  """
  size = (video_frames - 1) / spec.num_frames
  bounds = np.round(size * np.arange(spec.num_frames + 1)).astype(np.int64)
  starts, ends = bounds[:-1], bounds[1:]
  if clip is None:
    indices = rng.integers(starts, ends + 1)
  else:
    # Clip k of n at (2k + 1) / 2n of each segment: one clip is the middle.
    n = spec.num_clips
    indices = starts + (ends - starts) * (2 * clip + 1) // (2 * n)
  return np.clip(indices, 0, max(video_frames - 1, 0)).astype(np.int64)


def resampled_frames(video_frames: int, video_fps: float, fps: float
                     ) -> np.ndarray:
  """The video's frame that each frame of it resampled to `fps` shows, as
  `ffmpeg -i VIDEO -r fps` writes them: int `[N]` in [0, video_frames).

  The original's SSv2 frames are such JPEGs (`-r 30` from 12 fps webm).
  FFmpeg's constant-rate sync puts each frame in the output slot nearest
  its time, repeating or dropping frames in between, so slot `k`, at
  `k / fps`, shows the frame nearest that time: `floor(k * video_fps / fps
  + 1/2)`. The slots are those that end within the video,
  `N = floor(video_frames * fps / video_fps)` (at least one): 12 fps to 30
  shows each frame two or three times (12 frames -> 30). FFmpeg works on
  the container's rounded timestamps (webm's milliseconds), which can move
  a repeat by one slot.
  """
  count = max(int(math.floor(video_frames * fps / video_fps + 1e-9)), 1)
  nearest = np.floor(np.arange(count) * (video_fps / fps) + 0.5)
  return np.minimum(nearest, video_frames - 1).astype(np.int64)


def train_crop(frame_size: tuple[int, int], spec: ClipSpec,
               rng: np.random.Generator) -> crops.Crop:
  """Short-side scale jitter (`draw_short_side`), a random crop and a random
  flip, drawn from `rng` in the original's order.

  The crop may also take the last offset, which the original's
  `randint(0, H - size)` never draws.
  """
  resized = crops.short_side_size(frame_size, draw_short_side(spec, rng),
                            spec.crop_size)
  y = int(rng.integers(0, resized[0] - spec.crop_size[0] + 1))
  x = int(rng.integers(0, resized[1] - spec.crop_size[1] + 1))
  flip = bool(spec.flip and rng.random() < 0.5)
  return crops.Crop(resized, y, x, tuple(spec.crop_size), flip)


def draw_short_side(spec: ClipSpec, rng: np.random.Generator) -> int:
  """The training short side, one draw from `rng` over `spec.train_scales`
  (lo, hi), as the original draws it (rounded half to even, as Python's
  `round`, so both ends are half as likely as the sides between):

  'uniform': `round(uniform(lo, hi))`.
  'inverse_uniform' (the original's `INV_UNIFORM_SAMPLE`, SSv2):
  `round(1 / uniform(1 / hi, 1 / lo))`: uniform in the side's reciprocal,
  so small sides are drawn more often.
  """
  lo, hi = spec.train_scales
  if spec.scale_jitter == 'inverse_uniform':
    return round(1.0 / rng.uniform(1.0 / hi, 1.0 / lo))
  return round(rng.uniform(lo, hi))


def eval_crop_list(frame_size: tuple[int, int], spec: ClipSpec
                   ) -> list[crops.Crop]:
  """`spec.num_crops` test crops, as the original's test loaders take them.

  Three are the start, centre and end of the long side after resizing the
  short side to the crop size. One is the centre crop after resizing the
  short side to the smallest training scale (Kinetics' loader: 256, then
  224), or to the crop size with segment sampling (SSv2's loader). Centres
  round up, as the original's.
  """
  short = min(spec.crop_size)
  if spec.num_crops == 1 and spec.sampling == 'rate':
    short = max(short, spec.train_scales[0])
  resized = crops.short_side_size(frame_size, short, spec.crop_size)
  dy, dx = resized[0] - spec.crop_size[0], resized[1] - spec.crop_size[1]
  cy, cx = -(-dy // 2), -(-dx // 2)
  if spec.num_crops == 1:
    offsets = [(cy, cx)]
  elif spec.num_crops == 3:
    along_width = resized[1] >= resized[0]
    offsets = ([(cy, x) for x in (0, cx, dx)] if along_width else
               [(y, cx) for y in (0, cy, dy)])
  else:
    raise ValueError(f'test_num_crops must be 1 or 3, got {spec.num_crops}.')
  return [crops.Crop(resized, y, x, tuple(spec.crop_size))
          for y, x in offsets]


def frame_size(video: Video) -> tuple[int, int] | None:
  """`(height, width)` of `video`'s frames if known before decoding."""
  size = getattr(video, 'frame_size', None)
  return tuple(size) if size is not None else None


def decode_frames(video: Video, indices: np.ndarray, spec: ClipSpec,
                  resized: tuple[int, int] | None = None) -> np.ndarray:
  """`video.frames(indices)`; with 'antialias' resizing, at a reduced scale
  no smaller than `resized` where the video can decode so. (A reduced
  JPEG decode is not the full decode shrunk: 'original' decodes whole.)"""
  if (resized is not None and spec.resize == 'antialias' and
      getattr(video, 'decodes_reduced', False)):
    return video.frames(indices, min_size=resized)
  return video.frames(indices)


@contextlib.contextmanager
def _timed(timer: dict[str, float] | None, stage: str):
  """Adds the CPU seconds of this process in the block to `timer[stage]`
  (if a timer; for one clip at a time): what a stage costs, FFmpeg's
  threads included, whatever else the machine runs."""
  if timer is None:
    yield
    return
  tick = time.process_time()
  try:
    yield
  finally:
    timer[stage] = timer.get(stage, 0.0) + time.process_time() - tick


def train_transform(frames: np.ndarray, spec: ClipSpec,
                    rng: np.random.Generator) -> np.ndarray:
  """Short-side scale jitter, random crop, random flip: `[T, h, w, 3]` of
  `clip_dtype(spec)`."""
  plan = train_crop(frames.shape[1:3], spec, rng)
  frames, = crops.apply_crops(frames, [plan], spec.resize)
  return frames


def clip_dtype(spec: ClipSpec) -> np.dtype:
  """The dtype of `spec`'s clips: float32 pixel values ('original'
  resizing) or uint8 ('antialias')."""
  return np.dtype(np.float32 if spec.resize == 'original' else np.uint8)


def train_clip(video: Video, spec: ClipSpec, rng: np.random.Generator,
               timer: dict[str, float] | None = None) -> np.ndarray:
  """One training clip: `[T, H, W, 3]` of `clip_dtype(spec)`.

  The crop is planned from the frame size before decoding where the video
  knows it; the draws from `rng` are the same either way.

  Args:
    timer: if given, the CPU seconds spent are added to its 'read',
      'decode' and 'transform' entries.
  """
  with _timed(timer, 'read'):
    num_frames, fps, size = video.num_frames, video.fps, frame_size(video)
  indices = temporal_indices(num_frames, fps, spec, rng=rng)
  if size is None:
    with _timed(timer, 'decode'):
      frames = decode_frames(video, indices)
    with _timed(timer, 'transform'):
      return train_transform(frames, spec, rng)
  plan = train_crop(size, spec, rng)
  with _timed(timer, 'decode'):
    frames = decode_frames(video, indices, spec, plan.resized)
  with _timed(timer, 'transform'):
    return crops.apply_crops(frames, [plan], spec.resize)[0]


def eval_crops(frames: np.ndarray, spec: ClipSpec) -> list[np.ndarray]:
  """`spec.num_crops` crops after resizing the short side to the crop size.

  One is the centre; three are the start, centre and end of the long side,
  as the original tests.
  """
  return crops.apply_crops(frames, eval_crop_list(frames.shape[1:3], spec),
                     spec.resize)


def eval_clips(video: Video, spec: ClipSpec,
               timer: dict[str, float] | None = None) -> np.ndarray:
  """All test views, clip-major: `[clips * crops, T, H, W, 3]` of
  `clip_dtype(spec)`.

  The frames of every clip are decoded in one pass.
  """
  with _timed(timer, 'read'):
    num_frames, fps, size = video.num_frames, video.fps, frame_size(video)
  indices = np.stack([temporal_indices(num_frames, fps, spec, clip=k)
                      for k in range(spec.num_clips)])
  plans = eval_crop_list(size, spec) if size is not None else None
  with _timed(timer, 'decode'):
    frames = decode_frames(video, indices.reshape(-1), spec,
                           plans[0].resized if plans else None)
  frames = frames.reshape(indices.shape + frames.shape[1:])
  views = []
  with _timed(timer, 'transform'):
    for clip_frames in frames:
      views.extend(crops.apply_crops(clip_frames, plans, spec.resize)
                   if plans else eval_crops(clip_frames, spec))
    return np.stack(views)


def normalize(frames: np.ndarray, spec: ClipSpec) -> np.ndarray:
  """RGB pixel values (uint8, or float from 'original' resizing) -> float32
  `(x / 255 - mean) / std` in `spec.channel_order`, on the host
  (`device_normalize` on the device).

  The original normalises before it resizes; resizing weighs pixels with
  weights summing to 1, so normalising after is the same within float
  rounding."""
  if spec.channel_order == 'bgr':
    frames = frames[..., ::-1]
  frames = frames.astype(np.float32) / 255.0
  return (frames - np.float32(spec.mean)) / np.float32(spec.std)


def device_normalize(clips, mean: Sequence[float], std: Sequence[float],
                     channel_order: str = 'rgb'):
  """Inside a jitted step: RGB pixel values `[..., 3]` (uint8, or float from
  'original' resizing, in [0, 255]) -> float32 `(x / 255 - mean) / std` in
  `channel_order` (`mean` and `std` in that order too), as `normalize`."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  check_channel_order(channel_order)
  if channel_order == 'bgr':
    clips = clips[..., ::-1]
  clips = clips.astype(jnp.float32) / 255.0
  return (clips - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std,
                                                                jnp.float32)


def train_example(video: Video, spec: ClipSpec, rng: np.random.Generator
                  ) -> np.ndarray:
  """One training clip, normalised on the host: float32 `[T, H, W, 3]`."""
  return normalize(train_clip(video, spec, rng), spec)


def eval_views(video: Video, spec: ClipSpec) -> np.ndarray:
  """All test views, clip-major, normalised on the host: float32
  `[clips * crops, T, H, W, 3]` (`eval_clips`, normalised)."""
  return normalize(eval_clips(video, spec), spec)


