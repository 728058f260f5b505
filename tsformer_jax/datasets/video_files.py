"""Video files: lazy decoding with PyAV, writing mp4 and webm.

Frame `i` is the `i`-th frame decoded, whatever its timestamp. The frame
count is the container's (mp4), else duration x frame rate (webm, mkv), else
the packets counted; where it over-estimates, indices past the end give the
last frame decoded. Unreadable files raise `input_pipeline.BadVideoError`,
which the input pipeline counts and skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence
import dataclasses
import fractions
import functools
import logging
import os
import threading

import av
import numpy as np

from tsformer_jax import input_pipeline

# The rate assumed when a file records none.
DEFAULT_FPS = 30.0
_ERRORS = (av.FFmpegError, OSError, ValueError)


@dataclasses.dataclass(frozen=True)
class Header:
  """What a container says about its first video stream.

  Attributes:
    num_frames: frames, as recorded or estimated (see the module doc).
    fps: average frame rate.
    height: frame height in pixels.
    width: frame width in pixels.
  """
  num_frames: int
  fps: float
  height: int
  width: int


def probe(path: str) -> Header:
  """Reads the header of `path`'s first video stream; decodes nothing.

  Raises:
    input_pipeline.BadVideoError: the file cannot be opened or holds no
      video stream.
  """
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise input_pipeline.BadVideoError(f'{path}: no video stream.')
      stream = container.streams.video[0]
      rate = stream.average_rate or stream.guessed_rate or stream.base_rate
      fps = float(rate) if rate else DEFAULT_FPS
      num_frames = stream.frames
      if num_frames <= 0 and stream.duration and stream.time_base:
        num_frames = round(float(stream.duration * stream.time_base) * fps)
      if num_frames <= 0 and container.duration:
        num_frames = round(container.duration / av.time_base * fps)
      if num_frames <= 0:  # Count the packets: reads, but decodes nothing.
        num_frames = sum(1 for packet in container.demux(stream)
                         if packet.size)
      return Header(int(num_frames), fps, stream.codec_context.height,
                    stream.codec_context.width)
  except _ERRORS as e:
    raise input_pipeline.BadVideoError(f'{path}: {e}') from e


def decode(path: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
  """The frames of `path` at `indices`: uint8 `[len(indices), H, W, 3]`.

  Decodes from the start up to `max(indices)`. Indices may repeat and come
  in any order; those past the last decodable frame give that frame.

  Raises:
    input_pipeline.BadVideoError: the file cannot be opened, has no
      decodable frame, or fails to decode before the largest index.
    ValueError: a negative index.
  """
  indices = np.asarray(indices, np.int64).reshape(-1)
  if indices.size and indices.min() < 0:
    raise ValueError(f'Negative frame index {indices.min()} for {path}.')
  if not indices.size:
    header = probe(path)
    return np.zeros((0, header.height, header.width, 3), np.uint8)
  wanted = set(indices.tolist())
  last_wanted = int(indices.max())
  found: dict[int, np.ndarray] = {}
  for i, frame in decoded_frames(path):
    if i in wanted:
      found[i] = frame.to_ndarray(format='rgb24')
    last, count = frame, i + 1
    if i >= last_wanted:
      break
  if count <= last_wanted:
    # The header over-estimated the length: the last frame stands in.
    logging.debug('%s: %d frames decoded, frame %d asked for.', path, count,
                  last_wanted)
    if count - 1 not in found:
      found[count - 1] = last.to_ndarray(format='rgb24')
  return np.stack([found[min(i, count - 1)] for i in indices.tolist()])


def decoded_frames(path: str) -> Iterator[tuple[int, av.VideoFrame]]:
  """`(i, frame)` for the first video stream, in decoding order.

  Stopping early closes the file.

  Raises:
    input_pipeline.BadVideoError: the file cannot be opened, has no video
      stream or no decodable frame, or fails to decode part way (after
      yielding the frames before the failure).
  """
  count = 0
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise input_pipeline.BadVideoError(f'{path}: no video stream.')
      stream = container.streams.video[0]
      stream.thread_type = 'AUTO'
      for i, frame in enumerate(container.decode(stream)):
        count = i + 1
        yield i, frame
  except _ERRORS as e:
    raise input_pipeline.BadVideoError(f'{path}: {e}') from e
  if not count:
    raise input_pipeline.BadVideoError(f'{path}: no decodable frame.')


class VideoFile:
  """A video file as an `input_pipeline.Video`, decoded on demand.

  Attributes:
    path: the file.
    start: the first frame of the video within the file.
    end: the frame after its last; None for the end of the file.
  """

  def __init__(self, path: str, start: int = 0, end: int | None = None):
    if start < 0 or (end is not None and end < start):
      raise ValueError(f'Bad frame window [{start}, {end}) for {path}.')
    self.path, self.start, self.end = path, start, end

  @functools.cached_property
  def header(self) -> Header:
    return probe(self.path)

  @property
  def num_frames(self) -> int:
    """Frames in the window (0 if the file is shorter than `start`)."""
    end = self.header.num_frames
    if self.end is not None:
      end = min(end, self.end)
    return max(end - self.start, 0)

  @property
  def fps(self) -> float:
    return self.header.fps

  def frames(self, indices: np.ndarray) -> np.ndarray:
    """uint8 `[len(indices), H, W, 3]`; index 0 is frame `start` of the file,
    and indices past the window's end give its last frame."""
    indices = np.asarray(indices, np.int64)
    if self.end is not None:
      indices = np.minimum(indices, self.end - self.start - 1)
    return decode(self.path, indices + self.start)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One labelled video of a dataset of files.

  Attributes:
    path: the video file.
    label: its class index.
    start: the video's first frame within the file.
    end: the frame after its last; None for the end of the file.
  """
  path: str
  label: int
  start: int = 0
  end: int | None = None


class FileSource:
  """Labelled video files as a random-access `input_pipeline.Source`."""

  def __init__(self, entries: Sequence[Entry]):
    self.entries = list(entries)

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int) -> tuple[VideoFile, int]:
    entry = self.entries[index]
    return VideoFile(entry.path, entry.start, entry.end), entry.label

  @property
  def labels(self) -> np.ndarray:
    """int64 `[len(self)]`."""
    return np.asarray([e.label for e in self.entries], np.int64)


# Encoders by container, best first, and their quality settings.
_CONTAINER_OPTIONS = {'mp4': {'movflags': 'faststart'}, 'webm': {}}
_ENCODERS = {
    'mp4': (('libx264', {'crf': '18', 'preset': 'veryfast'}),
            ('mpeg4', {})),
    'webm': (('libvpx-vp9', {'crf': '20', 'b': '0', 'deadline': 'realtime',
                             'cpu-used': '8'}),
             ('libvpx', {'crf': '10', 'b': '1M'})),
}


@functools.cache
def _encoder(container_format: str) -> tuple[str, dict[str, str]]:
  for codec, options in _ENCODERS[container_format]:
    try:
      av.codec.Codec(codec, 'w')
    except av.FFmpegError:
      continue
    return codec, options
  raise RuntimeError(f'This PyAV has none of the {container_format} '
                     f'encoders {[c for c, _ in _ENCODERS[container_format]]}.')


def write_mp4(path: str, frames: np.ndarray, fps: float = DEFAULT_FPS):
  """Writes uint8 frames `[F, H, W, 3]` as H.264 (else MPEG-4) in mp4.

  The index comes first ("faststart") for streaming. yuv420p needs even
  sizes: odd ones are padded by repeating the edge. Written aside and
  renamed, so the file appears whole or not at all.
  """
  _write(path, frames, fps, 'mp4')


def write_webm(path: str, frames: np.ndarray, fps: float = DEFAULT_FPS):
  """Writes uint8 frames `[F, H, W, 3]` as VP9 (else VP8) in webm, padded
  and written whole as `write_mp4`."""
  _write(path, frames, fps, 'webm')


def _write(path: str, frames: np.ndarray, fps: float, container_format: str):
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError('Expected uint8 frames [F, H, W, 3], got '
                     f'{frames.dtype} {frames.shape}.')
  if not len(frames):
    raise ValueError(f'No frames to write to {path}.')
  pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
  if pad_h or pad_w:
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)),
                    mode='edge')
  codec, options = _encoder(container_format)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  partial = os.path.join(directory, f'.{os.path.basename(path)}.'
                         f'{os.getpid()}-{threading.get_ident()}.partial')
  try:
    with av.open(partial, 'w', format=container_format,
                 options=_CONTAINER_OPTIONS[container_format]) as container:
      stream = container.add_stream(
          codec, rate=fractions.Fraction(fps).limit_denominator(1001))
      stream.height, stream.width = frames.shape[1:3]
      stream.pix_fmt = 'yuv420p'
      stream.options = dict(options)
      for frame in frames:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(
            frame, format='rgb24')))
      container.mux(stream.encode())  # Flush.
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
