"""Writing videos: uint8 frames to mp4 (H.264) or webm (VP9) with PyAV.

The demo dataset `synthetic_motion_videos` is written with it
(`kinetics.prepare_synthetic_motion`), and tests write their clips with it.
"""

from __future__ import annotations

import fractions
import functools
import os
import threading

import av
import numpy as np

from tsformer_jax import video_io

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


def write_mp4(path: str, frames: np.ndarray,
              fps: float = video_io.DEFAULT_FPS):
  """Writes uint8 frames `[F, H, W, 3]` as H.264 (else MPEG-4) in mp4.

  The index comes first ("faststart") for streaming. yuv420p needs even
  sizes: odd ones are padded by repeating the edge. Written aside and
  renamed, so the file appears whole or not at all.
  """
  _write(path, frames, fps, 'mp4')


def write_webm(path: str, frames: np.ndarray,
               fps: float = video_io.DEFAULT_FPS):
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
