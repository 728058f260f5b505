"""Reading a video file: its header and the frames a clip uses, with PyAV.

The one module that opens and decodes a video file; a dataset of files
(`datasets/video_files.py`), long-video evaluation, `predict` and
`visualize` all read through `VideoFile`, a `clip_lib.Video`.

Frame `i` is the frame shown at time `i / fps` from the stream's start (for
a constant frame rate, the `i`-th frame; with a variable one, the last
frame whose timestamp is at most `i / fps`, timestamps being allowed two
ticks of their time base late, as a container rounds them). The frame
count is the container's (mp4), else duration x frame rate (webm, mkv), else
the packets counted; where it over-estimates, indices past the end give the
last frame.

Decoding a clip opens the file once, seeks to the keyframe before the
clip's first frame, and has FFmpeg skip the non-reference frames that the
clip does not use (`skip_frame`), so reaching eight frames spread over a
video costs the reference frames between them, not the whole video. Each
decoder runs `threads` FFmpeg threads (1 by default), so that loader
workers do not oversubscribe the cores.

Frames come out as a player shows them: a display matrix (a phone's
portrait video) turns and mirrors them, in quarter turns as FFmpeg's own
autorotation does. The header decodes the first frame to learn it, so that
a frame's size is known before a clip is decoded. Any pixel format FFmpeg
decodes (10-bit, 4:4:4, odd sizes) is converted to 8-bit RGB.

Unreadable files raise `clip_lib.BadVideoError`, whose message is
`PATH: why` (empty, a directory, no permission, audio only, ...); the input
pipeline counts and skips them. PyAV is imported here only, and this module
only where a file is read, so `import tsformer_jax` loads no video stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence
import dataclasses
import logging
import math
import os
import stat

import av
import numpy as np

from tsformer_jax import clip_lib

DEFAULT_FPS = 30.0
_ERRORS = (av.FFmpegError, OSError, ValueError)
# What reading a bad file may raise, `BadVideoError` included: callers
# catch these without importing PyAV.
DECODE_ERRORS = (clip_lib.BadVideoError, *_ERRORS)
# Seeking pays only past the first keyframe interval; below this many
# seconds in, decoding starts at frame 0.
_SEEK_AFTER_SECONDS = 1.0
# Seek this many frames before a clip's first frame: with B-frames a
# keyframe's decoding timestamp precedes its presentation, and a seek to
# exactly the clip's first frame could land on the keyframe after it.
_SEEK_MARGIN_FRAMES = 4


@dataclasses.dataclass(frozen=True)
class Header:
  """What a container says about its first video stream.

  Attributes:
    num_frames: frames, as recorded or estimated (see the module doc).
    fps: average frame rate.
    height: height in pixels of the frames as shown (turned upright).
    width: their width.
    turns: counterclockwise quarter turns from the coded frames to the
      shown ones (`display_orientation`).
    mirror: whether they are then mirrored left to right.
  """
  num_frames: int
  fps: float
  height: int
  width: int
  turns: int = 0
  mirror: bool = False


def open_video(path: str) -> av.container.InputContainer:
  """Opens `path` for reading.

  Raises:
    clip_lib.BadVideoError: it cannot be opened or holds no video
      stream; the message is `PATH: why`.
  """
  try:
    container = av.open(path)
  except _ERRORS as e:
    raise clip_lib.BadVideoError(
        f'{path}: {_open_failure(path, e)}') from e
  if not container.streams.video:
    audio = bool(container.streams.audio)
    container.close()
    raise clip_lib.BadVideoError(
        f'{path}: no video stream{" (audio only)" if audio else ""}.')
  return container


def _open_failure(path: str, error: Exception) -> str:
  """Why `av.open` failed, without the path and errno it repeats."""
  # PyAV's errors are also the built-in OSErrors: test those first.
  for kind, why in ((PermissionError, 'permission denied'),
                    (FileNotFoundError, 'no such file'),
                    (IsADirectoryError, 'is a directory, not a video file')):
    if isinstance(error, kind):
      return f'{why}.'
  try:
    info = os.stat(path)
  except OSError:
    info = None  # A URL.
  # A regular file only: a pipe or a /proc file has no size.
  if info is not None and stat.S_ISREG(info.st_mode) and not info.st_size:
    return 'empty file (0 bytes).'
  if isinstance(error, av.FFmpegError) and error.strerror:
    return f'not a video FFmpeg can read ({error.strerror}).'
  return _why(error)


def _why(error: Exception) -> str:
  """An error's text; FFmpeg's without the errno and path it repeats."""
  if isinstance(error, av.FFmpegError) and error.strerror:
    return f'{error.strerror}.'
  return str(error) or type(error).__name__


def read_header(container: av.container.InputContainer, threads: int = 1
                ) -> Header:
  """The header of an open container's first video stream.

  Decodes the first frame for its size and orientation (a file without a
  recorded length also has its packets counted) and leaves the container
  at its start.

  Args:
    threads: FFmpeg decoding threads for the stream, set here since the
      first decode fixes them.
  """
  stream = container.streams.video[0]
  rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  fps = float(rate) if rate else DEFAULT_FPS
  num_frames = stream.frames
  if num_frames <= 0 and stream.duration and stream.time_base:
    num_frames = round(float(stream.duration * stream.time_base) * fps)
  if num_frames <= 0 and container.duration:
    num_frames = round(container.duration / av.time_base * fps)
  if num_frames <= 0:  # Count the packets: reads, but decodes nothing.
    num_frames = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
  height, width, turns, mirror = _first_frame_layout(container, stream,
                                                     threads)
  if turns % 2:
    height, width = width, height
  return Header(int(num_frames), fps, height, width, turns, mirror)


def _first_frame_layout(container, stream, threads: int
                        ) -> tuple[int, int, int, bool]:
  """`(height, width, turns, mirror)` of the first frame as coded; the
  codec's size and no turn where none decodes (its decoding then fails
  later, and says why). Rewinds the container to its start."""
  context = stream.codec_context
  _set_threads(context, threads)
  frames = container.decode(stream)
  try:
    frame = next(frames, None)
  except _ERRORS:
    frame = None
  finally:
    frames.close()
  container.seek(stream.start_time or 0, stream=stream, backward=True)
  context.flush_buffers()
  if frame is None:
    return context.height, context.width, 0, False
  return (frame.height, frame.width) + display_orientation(
      _display_matrix(frame))


def _display_matrix(frame: av.VideoFrame) -> np.ndarray | None:
  """The frame's display matrix: int32 `[9]`, or None."""
  data = frame.side_data.get('DISPLAYMATRIX')
  return None if data is None else np.frombuffer(data, np.int32)


def display_orientation(matrix: Sequence[int] | None) -> tuple[int, bool]:
  """`(turns, mirror)` that show a coded frame as a player does: turned
  counterclockwise by `turns` quarter turns, then mirrored left to right
  if `mirror`.

  `matrix` is FFmpeg's display matrix (`AV_FRAME_DATA_DISPLAYMATRIX`: 9
  fixed-point ints, row-major). Its 2 x 2 part is a signed permutation for
  the eight orientations a camera records; the turns follow its signs and
  a negative determinant mirrors, as FFmpeg's autorotation. Other
  matrices (rotations off a quarter turn, scaling only) leave the frame as
  coded.
  """
  if matrix is None:
    return 0, False
  a, b, _, c, d = (float(x) for x in matrix[:5])
  scale = max(abs(a), abs(b), abs(c), abs(d))
  if not scale:
    return 0, False
  # Fixed-point rounding leaves a few units where an entry should be 0.
  a, b, c, d = (x if abs(x) > scale / 100 else 0.0 for x in (a, b, c, d))
  if b == c == 0 and a and d:
    turns = 0 if d > 0 else 2
  elif a == d == 0 and b and c:
    turns = 1 if b < 0 else 3
  else:
    return 0, False
  return turns, a * d - b * c < 0


def orient(frame: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
  """`[H, W, C]` as shown: `turns` counterclockwise quarter turns, then
  mirrored left to right if `mirror` (`display_orientation`)."""
  if turns % 4:
    frame = np.rot90(frame, turns)
  if mirror:
    frame = frame[:, ::-1]
  return np.ascontiguousarray(frame)


def decode(path: str, indices: Sequence[int] | np.ndarray, threads: int = 1
           ) -> np.ndarray:
  """The frames of `path` at `indices`: uint8 `[len(indices), H, W, 3]`.

  Indices may repeat and come in any order; those past the last decodable
  frame give that frame.

  Args:
    threads: FFmpeg decoding threads; 0 lets FFmpeg choose.

  Raises:
    clip_lib.BadVideoError: the file cannot be opened, has no
      decodable frame, or fails to decode before the largest index.
    ValueError: a negative index.
  """
  with open_video(path) as container:
    return decode_open(container, path, indices, threads)


def decode_open(container: av.container.InputContainer, path: str,
                indices: Sequence[int] | np.ndarray, threads: int = 1
                ) -> np.ndarray:
  """`decode` from an open container (which is left open)."""
  indices = np.asarray(indices, np.int64).reshape(-1)
  if indices.size and indices.min() < 0:
    raise ValueError(f'Negative frame index {indices.min()} for {path}.')
  if not indices.size:
    header = read_header(container, threads)
    return np.zeros((0, header.height, header.width, 3), np.uint8)
  wanted = sorted(set(indices.tolist()))
  found = dict(frames_at(container, path, wanted, threads))
  return np.stack([found[i] for i in indices.tolist()])


def frames_at(container: av.container.InputContainer, path: str,
              wanted: Sequence[int], threads: int = 1
              ) -> Iterator[tuple[int, np.ndarray]]:
  """`(i, uint8 [H, W, 3])` for each of the ascending, distinct `wanted`
  indices, in order, as soon as each is decoded.

  Seeks to the keyframe before the first, skips non-reference frames that
  are not wanted, and stops after the last. Indices past the last
  decodable frame give that frame.

  Raises:
    clip_lib.BadVideoError: no decodable frame, or a failure part
      way (after yielding the frames before it).
  """
  if not wanted:
    return
  stream = container.streams.video[0]
  timing = _Timing.of(stream)
  try:
    _set_threads(stream.codec_context, threads)
    try:
      sought = timing.usable and _seek(container, stream, timing, wanted[0])
      yield from _frames_from(container, stream, timing, wanted,
                              skip=timing.usable, sought=sought)
    except _Restart as restart:
      # Decode from the start, every frame: a seek that overshot, or the
      # end of a file whose last frame may have been skipped.
      yield from _frames_from(container, stream, timing,
                              wanted[restart.position:], skip=False,
                              sought=False, rewind=True)
  except _ERRORS as e:
    raise clip_lib.BadVideoError(f'{path}: {_why(e)}') from e
  except clip_lib.BadVideoError as e:  # Named here, where the path is.
    raise clip_lib.BadVideoError(f'{path}: {e}') from e


def _set_threads(context: av.codec.context.CodecContext, threads: int):
  if context.is_open:
    return
  context.thread_count = threads
  # Frame threads would hold several frames in flight; slices do not.
  context.thread_type = 'AUTO' if not threads else 'SLICE'


@dataclasses.dataclass(frozen=True)
class _Timing:
  """How presentation timestamps map to frame indices.

  Attributes:
    start: the stream's first timestamp.
    frames_per_tick: frames per timestamp unit (`time_base * fps`); 0
      where the stream has no time base (frames are then counted).
    fps: the frame rate.
  """
  start: int
  frames_per_tick: float
  fps: float

  @classmethod
  def of(cls, stream) -> _Timing:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else DEFAULT_FPS
    tick = float(stream.time_base) if stream.time_base else 0.0
    return cls(stream.start_time or 0, tick * fps, fps)

  @property
  def usable(self) -> bool:
    """Whether timestamps can name frames (else frames are counted)."""
    return self.frames_per_tick > 0

  def index(self, pts: int) -> int:
    """The first index at which a frame stamped `pts` shows."""
    # Containers round timestamps to their time base (webm: to the
    # millisecond): a frame up to two ticks (at most half a frame) late
    # still shows at its index.
    slack = min(2 * self.frames_per_tick, 0.5)
    return math.ceil((pts - self.start) * self.frames_per_tick - slack)

  def pts(self, index: float) -> int:
    return self.start + int(index / self.frames_per_tick)


class _Restart(Exception):
  """Decoding must start again from frame 0 for `wanted[position:]`."""

  def __init__(self, position: int):
    super().__init__(position)
    self.position = position


def _seek(container, stream, timing: _Timing, first: int) -> bool:
  """Seeks to the keyframe at or before frame `first - margin`; returns
  whether it sought (not for a frame within the first second)."""
  target = first - _SEEK_MARGIN_FRAMES
  if target < _SEEK_AFTER_SECONDS * timing.fps:
    return False
  container.seek(timing.pts(target), stream=stream, backward=True,
                 any_frame=False)
  return True


def _frames_from(container, stream, timing: _Timing, wanted: Sequence[int],
                 skip: bool, sought: bool, rewind: bool = False
                 ) -> Iterator[tuple[int, np.ndarray]]:
  """Decodes from where the container stands (from frame 0 with `rewind`)
  and yields the wanted frames, as `frames_at`.

  A wanted index shows the last frame that starts at or before it, known
  once the next frame comes (or the end): a variable frame rate may put
  two frames before one index. (Recorded durations cannot tell sooner:
  with B-frames, mp4 pairs them with the frames in decoding order.)

  Raises:
    _Restart: the seek landed after `wanted[0]`, or a frame that FFmpeg
      was let skip may be the one a wanted index shows (a gap in a
      variable frame rate, the end of the file).
  """
  context = stream.codec_context
  if rewind:
    container.seek(stream.start_time or 0, stream=stream, backward=True)
    context.flush_buffers()
  wanted_set = set(wanted)
  position = 0  # Into `wanted`.
  previous, shown, count = None, None, 0  # shown: previous as RGB, once.
  previous_index = -1
  skippable = set()  # Indices of the packets FFmpeg may have skipped.
  try:
    for packet in container.demux(stream):
      if skip and packet.pts is not None:
        # Reference frames are always decoded: later frames need them.
        k = timing.index(packet.pts)
        context.skip_frame = 'DEFAULT' if k in wanted_set else 'NONREF'
        if k not in wanted_set:
          skippable.add(k)
      for frame in packet.decode():
        i = (timing.index(frame.pts) if timing.usable and
             frame.pts is not None else count)
        if sought and previous is None and i > wanted[0]:
          raise _Restart(0)
        count += 1
        # Wanted indices before this frame show the one before it.
        while position < len(wanted) and wanted[position] < i:
          if previous is None:  # Before the first frame: the first.
            yield wanted[position], _rgb(frame)
          else:
            if any(previous_index < k <= wanted[position]
                   for k in skippable):
              raise _Restart(position)
            shown = _rgb(previous) if shown is None else shown
            yield wanted[position], shown
          position += 1
        previous, shown, previous_index = frame, None, i
        # Counted frames show at one index each: no need to wait.
        while (not timing.usable and position < len(wanted) and
               wanted[position] == i):
          shown = _rgb(frame) if shown is None else shown
          yield i, shown
          position += 1
        if position == len(wanted):
          return
  finally:
    context.skip_frame = 'DEFAULT'
  if skip and any(k > previous_index for k in skippable):
    raise _Restart(position)  # A later frame, possibly skipped.
  if previous is None:
    raise clip_lib.BadVideoError('no decodable frame.')
  logging.debug('%d frames decoded, frame %d asked for.', count, wanted[-1])
  shown = _rgb(previous) if shown is None else shown
  for i in wanted[position:]:
    yield i, shown


def _rgb(frame: av.VideoFrame) -> np.ndarray:
  """8-bit RGB from any pixel format, as shown (`display_orientation`)."""
  rgb = frame.to_ndarray(format='rgb24')
  turns, mirror = display_orientation(_display_matrix(frame))
  return orient(rgb, turns, mirror) if turns or mirror else rgb


class VideoFile:
  """A video file as an `clip_lib.Video`, decoded on demand.

  The file is opened once for its header and the frames of a clip, and
  closed after each `frames` call.

  Attributes:
    path: the file.
    start: the first frame of the video within the file.
    end: the frame after its last; None for the end of the file.
    threads: FFmpeg decoding threads (0: FFmpeg's choice).
  """

  def __init__(self, path: str, start: int = 0, end: int | None = None,
               threads: int = 1):
    if start < 0 or (end is not None and end < start):
      raise ValueError(f'Bad frame window [{start}, {end}) for {path}.')
    self.path, self.start, self.end = path, start, end
    self.threads = threads
    self._container = None
    self._header = None

  def __getstate__(self) -> dict:
    # An open container does not pickle (a worker process receives the
    # file): it reopens there.
    return dict(self.__dict__, _container=None)

  def _open(self) -> av.container.InputContainer:
    if self._container is None:
      self._container = open_video(self.path)
    return self._container

  def close(self):
    if self._container is not None:
      self._container.close()
      self._container = None

  @property
  def header(self) -> Header:
    # Not a functools.cached_property: before Python 3.12 it locks the
    # class, and one file stalled in FFmpeg would stall every other one.
    if self._header is None:
      try:
        self._header = read_header(self._open(), self.threads)
      except _ERRORS as e:
        self.close()
        raise clip_lib.BadVideoError(
            f'{self.path}: {_why(e)}') from e
    return self._header

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

  @property
  def frame_size(self) -> tuple[int, int]:
    """`(height, width)` of the decoded frames."""
    return self.header.height, self.header.width

  def _file_indices(self, indices: np.ndarray) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    if self.end is not None:
      indices = np.minimum(indices, self.end - self.start - 1)
    return indices + self.start

  def frames(self, indices: np.ndarray) -> np.ndarray:
    """uint8 `[len(indices), H, W, 3]`; index 0 is frame `start` of the file,
    and indices past the window's end give its last frame."""
    try:
      return decode_open(self._open(), self.path,
                         self._file_indices(indices), self.threads)
    finally:
      self.close()

  def iter_frames(self, wanted: Sequence[int]
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """`(i, uint8 [H, W, 3])` for each of the ascending `wanted` indices, one
    at a time: a whole video is never held at once."""
    wanted = list(wanted)
    in_file = self._file_indices(np.asarray(wanted, np.int64)).tolist()
    position = 0
    try:
      for i, frame in frames_at(self._open(), self.path,
                                sorted(set(in_file)), self.threads):
        # Indices clamped to the window's end share its last frame.
        while position < len(wanted) and in_file[position] == i:
          yield wanted[position], frame
          position += 1
    finally:
      self.close()
