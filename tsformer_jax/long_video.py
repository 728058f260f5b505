"""Clips covering whole videos, batched across videos, averaged per video.

The paper's long-video protocol (HowTo100M): average the scores of clips
covering the video from start to end. A stride adds a clip ending on the last
frame, so the clips reach the end, and with a stride no longer than a clip's
span no frame is left out; each file is decoded once, keeping only the
frames of clips not yet complete, so a long video is never held whole.

With a time bound (`ClipSpec.decode_timeout_s`), files are decoded in a
worker process, which is killed when a clip takes longer (a stalled
decoder, even inside FFmpeg's C code, where no signal reaches it; a
crashed decoder ends only that process): the video counts as bad, and the
next one goes to a fresh process.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence
import dataclasses

import numpy as np

from tsformer_jax import clip_lib
from tsformer_jax import video_io
from tsformer_jax import workers


@dataclasses.dataclass(frozen=True)
class Coverage:
  """Which clips and crops of each video to take.

  Exactly one of `num_clips`, `stride_seconds` and `stride_frames` is set.

  Attributes:
    num_clips: clips placed as `clip_positions` says.
    stride_seconds: a clip every this many seconds, and one ending on the
      last frame.
    stride_frames: the same in source frames (fractions allowed).
    num_crops: spatial crops per clip: 1 (centre) or 3 (the two ends and
      the centre of the long side, as evaluation's).
    clip_positions: where `num_clips` clips sit (`clip_lib.CLIP_POSITIONS`):
      'paper' (evenly from the first frame to the last; the whole video)
      or, as evaluation's may be, 'original'.
  """
  num_clips: int | None = None
  stride_seconds: float | None = None
  stride_frames: float | None = None
  num_crops: int = 1
  clip_positions: str = 'paper'

  def __post_init__(self):
    given = {k: v for k, v in (('num_clips', self.num_clips),
                               ('stride_seconds', self.stride_seconds),
                               ('stride_frames', self.stride_frames))
             if v is not None}
    if len(given) != 1:
      raise ValueError('Set exactly one of num_clips, stride_seconds and '
                       f'stride_frames; got {given or "none"}.')
    (name, value), = given.items()
    if value <= 0 or (name == 'num_clips' and int(value) != value):
      raise ValueError(f'{name} must be a positive '
                       f'{"integer" if name == "num_clips" else "number"}, '
                       f'got {value}.')
    if self.num_crops not in (1, 3):
      raise ValueError(f'num_crops must be 1 or 3, got {self.num_crops}.')

  @classmethod
  def evaluation(cls, spec: clip_lib.ClipSpec) -> Coverage:
    """Evaluation's views: `spec.num_clips` clips x `spec.num_crops`."""
    return cls(num_clips=spec.num_clips, num_crops=spec.num_crops,
               clip_positions=spec.clip_positions)


def clip_span(video_fps: float, spec: clip_lib.ClipSpec) -> float:
  """Source frames one clip spans: `num_frames * sampling_rate` at
  `target_fps`, rescaled to the video's rate."""
  return spec.num_frames * spec.sampling_rate * video_fps / spec.target_fps


def indices_at(start: float, video_frames: int, video_fps: float,
               spec: clip_lib.ClipSpec) -> np.ndarray:
  """Frame indices `[T]` of the clip starting at (fractional) `start`, as
  `clip_lib.temporal_indices`; the last frame repeats past the end."""
  span = clip_span(video_fps, spec)
  positions = np.linspace(start, start + span - 1, spec.num_frames)
  return np.clip(positions, 0, video_frames - 1).astype(np.int64)


def stride_starts(video_frames: int, span: float, stride: float
                  ) -> np.ndarray:
  """Clip starts `[K]`: 0, every `stride` frames, and one ending on the last
  frame; a video no longer than `span` gets one clip, at 0."""
  if stride <= 0:
    raise ValueError(f'The clip stride must be positive, got {stride}.')
  slack = max(video_frames - span, 0.0)
  # Absorbs seconds-to-frames rounding: no near-duplicate last clip.
  starts = np.arange(int(np.floor(slack / stride + 1e-9)) + 1) * stride
  if slack - starts[-1] > 1e-6:
    starts = np.append(starts, slack)
  return starts


def check_coverage(spec: clip_lib.ClipSpec, coverage: Coverage):
  """Fails on a stride with segment sampling (SSv2), whose every clip
  already spans the whole video: a number of clips is what fits there."""
  if coverage.num_clips is None and spec.sampling != 'rate':
    raise ValueError(f'A clip stride needs sampling="rate"; with '
                     f'{spec.sampling!r} sampling every clip spans the whole '
                     'video: set a number of clips instead.')


def clip_indices(video_frames: int, video_fps: float,
                 spec: clip_lib.ClipSpec, coverage: Coverage
                 ) -> np.ndarray:
  """Frame indices of every clip `coverage` takes: int64 `[K, T]`, row `k`
  being clip `k` in time order."""
  if video_frames < 1:
    raise clip_lib.BadVideoError('The video has no frames.')
  check_coverage(spec, coverage)
  if coverage.num_clips is not None:
    spec = dataclasses.replace(spec, num_clips=coverage.num_clips,
                               clip_positions=coverage.clip_positions)
    return np.stack([
        clip_lib.temporal_indices(video_frames, video_fps, spec,
                                  clip=k)
        for k in range(coverage.num_clips)])
  stride = (coverage.stride_frames if coverage.stride_frames is not None
            else coverage.stride_seconds * video_fps)
  starts = stride_starts(video_frames, clip_span(video_fps, spec), stride)
  return np.stack([indices_at(s, video_frames, video_fps, spec)
                   for s in starts])


def decode_clips(video: str | video_io.VideoFile, indices: np.ndarray
                 ) -> Iterator[tuple[int, np.ndarray]]:
  """Decodes `video` (a file, or its path) once and yields each clip as
  soon as it is complete.

  Frames are as `video.frames` gives them (past the last decodable frame,
  that frame); frames no clip uses are skipped where the codec allows it,
  and only frames of incomplete clips are kept.

  Args:
    indices: int `[K, T]`, the frame indices of each clip.

  Yields:
    `(k, uint8 [T, H, W, 3])` for every clip `k`, in order of its last
    frame (ties in order of `k`).

  Raises:
    clip_lib.BadVideoError: the file cannot be opened, has no
      decodable frame, or fails to decode (possibly after some clips).
  """
  if isinstance(video, str):
    video = video_io.VideoFile(video)
  indices = np.asarray(indices, np.int64)
  if indices.size and indices.min() < 0:
    raise ValueError(f'Negative frame index {indices.min()} for '
                     f'{video.path}.')
  ends = indices.max(axis=1)
  order = np.argsort(ends, kind='stable').tolist()
  done = 0  # Clips of `order` yielded so far.
  users: dict[int, int] = {}  # frame -> clips still waiting for it
  for row in indices:
    for i in set(row.tolist()):
      users[i] = users.get(i, 0) + 1
  kept: dict[int, np.ndarray] = {}

  def take(k: int) -> np.ndarray:
    clip = np.stack([kept[i] for i in indices[k].tolist()])
    for i in set(indices[k].tolist()):
      users[i] -= 1
      if not users[i]:
        del kept[i]
    return clip

  for i, frame in video.iter_frames(sorted(users)):
    kept[i] = frame
    while done < len(order) and ends[order[done]] <= i:
      done += 1
      yield order[done - 1], take(order[done - 1])


def video_clips(video: clip_lib.Video, indices: np.ndarray
                ) -> Iterator[tuple[int, np.ndarray]]:
  """`(k, uint8 [T, H, W, 3])` for each row `k` of `indices` `[K, T]`; a
  `video_io.VideoFile` is decoded in one pass (`decode_clips`)."""
  if isinstance(video, video_io.VideoFile):
    yield from decode_clips(video, indices)
  else:
    for k, row in enumerate(indices):
      yield k, video.frames(row)


@dataclasses.dataclass(frozen=True)
class View:
  """Where one view of a batch comes from.

  Attributes:
    video: index of its video in the list given to `clip_batches`.
    clip: its clip within the video, in time order.
    crop: its crop within the clip.
    start: the clip's first frame.
  """
  video: int
  clip: int
  crop: int
  start: int


def video_views(video: clip_lib.Video, index: int,
                spec: clip_lib.ClipSpec, coverage: Coverage
                ) -> Iterator[tuple[View, np.ndarray]]:
  """Every view of one video: `(View, [T, H, W, 3])`, of
  `clip_lib.clip_dtype(spec)`."""
  if video.num_frames < 1:
    raise clip_lib.BadVideoError('The video has no frames.')
  indices = clip_indices(video.num_frames, video.fps, spec, coverage)
  crop_spec = dataclasses.replace(spec, num_crops=coverage.num_crops)
  for k, frames in video_clips(video, indices):
    for c, crop in enumerate(clip_lib.eval_crops(frames, crop_spec)):
      yield View(index, k, c, int(indices[k, 0])), crop


def file_views(video: video_io.VideoFile, index: int,
               spec: clip_lib.ClipSpec, coverage: Coverage
               ) -> Iterator[tuple[View, np.ndarray]]:
  """`video_views` of a file, run in a worker process: its decoding errors
  leave as `BadVideoError`s (FFmpeg's own do not survive pickling)."""
  try:
    yield from video_views(video, index, spec, coverage)
  except clip_lib.BadVideoError:
    raise
  except video_io.DECODE_ERRORS as e:
    raise clip_lib.BadVideoError(str(e) or type(e).__name__) from None


def clip_batches(videos: Sequence[clip_lib.Video],
                 spec: clip_lib.ClipSpec, coverage: Coverage,
                 batch_size: int, errors: dict[int, str] | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The views of all `videos`, `batch_size` at a time, in video order.

  Yields `{'clips': [B, T, H, W, 3], 'video', 'clip', 'crop': int32
  [B], 'start': int64 [B], 'mask': bool [B]}` (see `View`); the last batch
  is padded with zero clips whose mask is False, so every batch has the
  same shape. A video that fails to read is recorded as
  `errors[index] = message` and skipped; if it fails part way, its earlier
  views may already have been yielded, and callers should drop them. With
  `spec.decode_timeout_s`, files decode in a worker process, and a file
  whose next clip takes longer fails (see the module doc); videos in
  memory decode here.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  check_coverage(spec, coverage)
  errors = errors if errors is not None else {}
  timeout = spec.decode_timeout_s
  worker = workers.DecodingProcess() if timeout else None
  chunk: list[tuple[View, np.ndarray]] = []
  try:
    for index, video in enumerate(videos):
      views = (worker.stream(file_views, (video, index, spec, coverage),
                             timeout)
               if worker and isinstance(video, video_io.VideoFile) else
               video_views(video, index, spec, coverage))
      try:
        for view in views:
          chunk.append(view)
          if len(chunk) == batch_size:
            yield _stack(chunk, batch_size)
            chunk = []
      except video_io.DECODE_ERRORS as e:
        errors[index] = str(e) or type(e).__name__
      finally:
        views.close()  # A worker's stream left part way ends there.
    if chunk:
      yield _stack(chunk, batch_size)
  finally:
    if worker:
      worker.stop()


def _stack(chunk: Sequence[tuple[View, np.ndarray]], size: int
           ) -> dict[str, np.ndarray]:
  clips = np.zeros((size,) + chunk[0][1].shape, chunk[0][1].dtype)
  fields = {name: np.zeros((size,), np.int32)
            for name in ('video', 'clip', 'crop')}
  start = np.zeros((size,), np.int64)
  mask = np.zeros((size,), bool)
  for i, (view, clip) in enumerate(chunk):
    clips[i], start[i], mask[i] = clip, view.start, True
    for name, values in fields.items():
      values[i] = getattr(view, name)
  return dict(clips=clips, start=start, mask=mask, **fields)


def average_by_video(values: np.ndarray, videos: np.ndarray,
                     num_videos: int) -> np.ndarray:
  """Means of the rows of each video: `[num_videos, ...]`.

  Args:
    values: `[N, ...]`, e.g. per-view logits `[N, C]` or features
      `[N, D]`.
    videos: int `[N]`, the video of each row.
    num_videos: how many videos there are; a video without rows gets NaN.
  """
  values = np.asarray(values, np.float64)
  videos = np.asarray(videos, np.int64)
  sums = np.zeros((num_videos,) + values.shape[1:])
  np.add.at(sums, videos, values)
  counts = np.bincount(videos, minlength=num_videos).astype(np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    means = sums / counts.reshape((-1,) + (1,) * (values.ndim - 1))
  return means.astype(np.float32)
