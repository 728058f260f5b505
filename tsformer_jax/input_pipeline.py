"""Clips from videos: decode, sample, augment, normalise and batch.

Sampling and crops follow the original (PySlowFast). Batches are a pure
function of (seed, step): example `i` of step `s` is element `s * B + i` of
the epoch's permutation, augmented by a generator seeded with (seed, epoch,
index), so a resumed run needs no iterator state and each host takes its own
slice. A video that fails to decode is counted and skipped, never an error.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
import concurrent.futures
import dataclasses
import logging
import threading
from typing import Protocol

import numpy as np


class Video(Protocol):
  """A video whose frames are decoded on demand."""
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

  def frames(self, indices: np.ndarray) -> np.ndarray:
    return self.array[indices]


class BadVideoError(Exception):
  """A video that cannot be decoded, is empty, or has no frames."""


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
      num_crops=d.test_num_crops, sampling=d.get('sampling', 'rate'))


def temporal_indices(video_frames: int, video_fps: float, spec: ClipSpec,
                     clip: int | None = None,
                     rng: np.random.Generator | None = None) -> np.ndarray:
  """Frame indices of one clip: `[T]` ints in [0, video_frames).

  Args:
    clip: which of `spec.num_clips` evenly spaced test clips; None draws a
      random start with `rng` (training).
    rng: the training draw's generator.
  """
  if spec.sampling == 'segments':
    return segment_indices(video_frames, spec, clip, rng)
  if spec.sampling != 'rate':
    raise ValueError(f'Unknown sampling {spec.sampling!r}; valid: '
                     "['rate', 'segments'].")
  span = spec.num_frames * spec.sampling_rate * video_fps / spec.target_fps
  slack = max(video_frames - span, 0.0)
  if clip is None:
    start = rng.uniform(0.0, slack)
  else:
    start = slack * clip / max(spec.num_clips - 1, 1) if spec.num_clips > 1 \
        else slack / 2
  positions = np.linspace(start, start + span - 1, spec.num_frames)
  # Truncated as the original's `.long()`; short videos repeat the last frame.
  return np.clip(positions, 0, video_frames - 1).astype(np.int64)


def segment_indices(video_frames: int, spec: ClipSpec,
                    clip: int | None = None,
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """One frame per equal segment: `[T]` ints in [0, video_frames).

  Training (`clip` None) draws a uniform position in each segment; test clip
  `k` takes the position `(k + 1/2) / num_clips` of the way through each.
  """
  length = video_frames / spec.num_frames
  if clip is None:
    offsets = rng.uniform(0.0, 1.0, spec.num_frames)
  else:
    offsets = np.full(spec.num_frames, (clip + 0.5) / spec.num_clips)
  positions = (np.arange(spec.num_frames) + offsets) * length
  return np.clip(np.floor(positions), 0, video_frames - 1).astype(np.int64)


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize so that min(H, W) == size; uint8 in, uint8 out."""
  h, w = frames.shape[1:3]
  if min(h, w) == size:
    return frames
  scale = size / min(h, w)
  new = (max(size, round(h * scale)), max(size, round(w * scale)))
  return _resize(frames, new)


def _resize(frames: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.device('/cpu:0'):
    out = tf.image.resize(frames, shape, method='bilinear', antialias=True)
  return np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)


def crop(frames: np.ndarray, size: tuple[int, int], y: int, x: int
         ) -> np.ndarray:
  return frames[:, y:y + size[0], x:x + size[1]]


def train_transform(frames: np.ndarray, spec: ClipSpec,
                    rng: np.random.Generator) -> np.ndarray:
  """Short-side scale jitter, random crop, random flip: uint8 `[T, h, w, 3]`."""
  lo, hi = spec.train_scales
  frames = resize_short_side(frames, int(rng.integers(lo, hi + 1)))
  h, w = frames.shape[1:3]
  if h < spec.crop_size[0] or w < spec.crop_size[1]:
    frames = _resize(frames, (max(h, spec.crop_size[0]),
                              max(w, spec.crop_size[1])))
    h, w = frames.shape[1:3]
  y = int(rng.integers(0, h - spec.crop_size[0] + 1))
  x = int(rng.integers(0, w - spec.crop_size[1] + 1))
  frames = crop(frames, spec.crop_size, y, x)
  if spec.flip and rng.random() < 0.5:
    frames = frames[:, :, ::-1]
  return frames


def eval_crops(frames: np.ndarray, spec: ClipSpec) -> list[np.ndarray]:
  """`spec.num_crops` crops after resizing the short side to the crop size.

  One is the centre; three are the start, centre and end of the long side,
  as the original tests.
  """
  frames = resize_short_side(frames, min(spec.crop_size))
  h, w = frames.shape[1:3]
  if h < spec.crop_size[0] or w < spec.crop_size[1]:
    frames = _resize(frames, (max(h, spec.crop_size[0]),
                              max(w, spec.crop_size[1])))
    h, w = frames.shape[1:3]
  dy, dx = h - spec.crop_size[0], w - spec.crop_size[1]
  if spec.num_crops == 1:
    offsets = [(dy // 2, dx // 2)]
  elif spec.num_crops == 3:
    along_width = w >= h
    offsets = [(dy // 2, dx * i // 2) if along_width else (dy * i // 2,
                                                           dx // 2)
               for i in range(3)]
  else:
    raise ValueError(f'test_num_crops must be 1 or 3, got {spec.num_crops}.')
  return [crop(frames, spec.crop_size, y, x) for y, x in offsets]


def normalize(frames: np.ndarray, spec: ClipSpec) -> np.ndarray:
  """uint8 -> float32 `(x / 255 - mean) / std`."""
  frames = frames.astype(np.float32) / 255.0
  return (frames - np.float32(spec.mean)) / np.float32(spec.std)


def train_example(video: Video, spec: ClipSpec, rng: np.random.Generator
                  ) -> np.ndarray:
  """One training clip: float32 `[T, H, W, 3]`."""
  indices = temporal_indices(video.num_frames, video.fps, spec, rng=rng)
  return normalize(train_transform(video.frames(indices), spec, rng), spec)


def eval_views(video: Video, spec: ClipSpec) -> np.ndarray:
  """All test views, clip-major: float32 `[clips * crops, T, H, W, 3]`."""
  views = []
  for clip in range(spec.num_clips):
    indices = temporal_indices(video.num_frames, video.fps, spec, clip=clip)
    views.extend(eval_crops(video.frames(indices), spec))
  return normalize(np.stack(views), spec)


class SkipCounter:
  """Distinct videos that failed to load, shared by the loader threads."""

  def __init__(self):
    self._bad: set[int] = set()
    self._lock = threading.Lock()

  def add(self, index: int, error: Exception):
    with self._lock:
      if index not in self._bad:
        logging.warning('Skipping video %d: %s', index, error)
      self._bad.add(index)

  def __len__(self) -> int:
    with self._lock:
      return len(self._bad)


def _load(source: Source, index: int, skipped: SkipCounter, fn: Callable):
  try:
    video, label = source[index]
    if video.num_frames < 1:
      raise BadVideoError('no frames')
    return fn(video), label
  except Exception as e:  # pylint: disable=broad-except
    # Any decoder failure: one bad file must not end a long run.
    skipped.add(index, e)
    return None


def train_batches(source: Source, spec: ClipSpec, batch_size: int, seed: int,
                  start_step: int = 0, num_workers: int = 4,
                  skipped: SkipCounter | None = None,
                  process_index: int = 0, process_count: int = 1,
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches from `start_step` on.

  Yields `{'clips': float32 [b, T, H, W, 3], 'labels': int32 [b]}` where
  `b = batch_size // process_count` is this process's share of the global
  batch. Batch `s` is the same whatever `start_step` was.
  """
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by the '
                     f'{process_count} processes.')
  n = len(source)
  steps_per_epoch = n // batch_size
  if not steps_per_epoch:
    raise ValueError(f'The dataset has {n} videos, fewer than one batch of '
                     f'{batch_size}.')
  skipped = skipped if skipped is not None else SkipCounter()
  local = batch_size // process_count

  def example(epoch: int, order: np.ndarray, position: int):
    # A failed video gives way to the next one of the permutation.
    for attempt in range(n):
      index = int(order[(position + attempt) % n])
      rng = np.random.default_rng([seed, epoch, index])
      loaded = _load(source, index, skipped,
                     lambda v, rng=rng: train_example(v, spec, rng))
      if loaded is not None:
        return loaded
    raise BadVideoError('Every video of the dataset failed to load.')

  def batch(step: int, pool):
    epoch, offset = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    first = offset * batch_size + process_index * local
    examples = list(pool.map(lambda i: example(epoch, order, first + i),
                             range(local)))
    return dict(clips=np.stack([c for c, _ in examples]),
                labels=np.asarray([y for _, y in examples], np.int32))

  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    with concurrent.futures.ThreadPoolExecutor(1) as ahead:
      step = start_step
      pending = ahead.submit(batch, step, pool)
      while True:
        result = pending.result()
        step += 1
        pending = ahead.submit(batch, step, pool)
        yield result


def eval_batches(source: Source, spec: ClipSpec, batch_size: int,
                 num_workers: int = 4, skipped: SkipCounter | None = None,
                 process_index: int = 0, process_count: int = 1,
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `source` with every test view of every video.

  Yields `{'clips': float32 [b, V, T, H, W, 3], 'labels': int32 [b],
  'mask': bool [b]}`; the last batch is padded with masked-out entries so
  that every batch has the same shape. Videos that fail are left out.
  """
  skipped = skipped if skipped is not None else SkipCounter()
  local = batch_size // process_count
  indices = list(range(len(source)))
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    loaded = pool.map(
        lambda i: _load(source, i, skipped, lambda v: eval_views(v, spec)),
        indices)
    good = (x for x in loaded if x is not None)
    yield from _padded_batches(good, batch_size, local, process_index)


def _padded_batches(examples: Iterator, batch_size: int, local: int,
                    process_index: int) -> Iterator[dict[str, np.ndarray]]:
  chunk = []
  for example in examples:
    chunk.append(example)
    if len(chunk) == batch_size:
      yield _stack(chunk[process_index * local:(process_index + 1) * local],
                   local)
      chunk = []
  if chunk:
    yield _stack(chunk[process_index * local:(process_index + 1) * local],
                 local, template=chunk[0])


def _stack(chunk: Sequence, size: int, template=None
           ) -> dict[str, np.ndarray]:
  template = chunk[0] if chunk else template
  clips = np.zeros((size,) + template[0].shape, np.float32)
  labels = np.zeros((size,), np.int32)
  mask = np.zeros((size,), bool)
  for i, (views, label) in enumerate(chunk):
    clips[i], labels[i], mask[i] = views, label, True
  return dict(clips=clips, labels=labels, mask=mask)
