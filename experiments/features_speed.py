r"""Feature extraction speed on this machine's CPU, and what bounds it.

  python -m tsformer_jax.main --config=configs/divided.py:demo \
      --workdir=/tmp/c_demo --config.num_train_steps=64
  python experiments/features_speed.py --checkpoint=/tmp/c_demo/checkpoints \
      [--videos=64] [--parts=16] [--stride_frames=8] [--workdir=/tmp/fspeed]

Writes `--videos` synthetic_motion videos (each `--parts` of its test
videos one after another: 16 frames of 32 x 32 each, at 30 fps) and times,
with the checkpoint's model:
- end to end: `extraction.extract` (what `python -m tsformer_jax.features`
  runs) with 1 and 2 decoding workers, after its setup (compilation; a
  first run on two videos has started the decoding processes' server);
- decoding alone: every window of every video (`extraction.window_stream`,
  decode, crop, in this process, one video at a time);
- the model alone: the compiled feature function on full batches.
Prints the table and writes it to experiments/results/features_cpu.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import jax
import numpy as np

from tsformer_jax import checkpoints
from tsformer_jax import clip_lib
from tsformer_jax import extraction
from tsformer_jax import feature_files
from tsformer_jax import video_io
from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import video_writer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                       'features_cpu.md')


def write_videos(folder: str, count: int, parts: int) -> list[str]:
  """`count` mp4s, each `parts` synthetic_motion test videos in a row."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(count):
    frames = np.concatenate([synthetic_motion.generate('test', i * parts + j)[0]
                             for j in range(parts)])
    path = os.path.join(folder, f'{i:03d}.mp4')
    video_writer.write_mp4(path, frames, 30.0)
    paths.append(path)
  return paths


def time_decoding(paths: list[str], spec: clip_lib.ClipSpec,
                  stride: int) -> tuple[float, int]:
  """Seconds to decode and crop every window, and the window count."""
  tick, windows = time.perf_counter(), 0
  for path in paths:
    for item in extraction.window_stream(video_io.VideoFile(path), spec,
                                         stride):
      windows += item[0] == 'window'
  return time.perf_counter() - tick, windows


def time_model(config, params, settings: extraction.Settings,
               windows: int) -> tuple[float, float, int]:
  """`(compile seconds, seconds for `windows` windows, batch size)` of the
  feature function alone, on zero clips."""
  tick = time.perf_counter()
  fn, params, batch, _ = extraction.compiled(config, params, settings,
                                             jax.local_devices())
  spec = clip_lib.clip_spec(config)
  clips = np.zeros((batch, spec.num_frames) + tuple(spec.crop_size) + (3,),
                   clip_lib.clip_dtype(spec))
  np.asarray(fn(params, clips))
  compile_s = time.perf_counter() - tick
  tick = time.perf_counter()
  outputs = [fn(params, clips) for _ in range(-(-windows // batch))]
  jax.block_until_ready(outputs)
  return compile_s, time.perf_counter() - tick, batch


def time_extraction(config, params, entries, out: str,
                    settings: extraction.Settings) -> extraction.Report:
  shutil.rmtree(out, ignore_errors=True)
  return extraction.extract(config, params, entries, out, settings,
                            progress=False)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--videos', type=int, default=64)
  parser.add_argument('--parts', type=int, default=16)
  parser.add_argument('--stride_frames', type=int, default=8)
  parser.add_argument('--workdir', default='/tmp/features_speed')
  args = parser.parse_args()
  config, params = checkpoints.load_checkpoint(args.checkpoint)
  paths = write_videos(os.path.join(args.workdir, 'videos'), args.videos,
                       args.parts)
  entries = feature_files.folder_videos(os.path.join(args.workdir, 'videos'))
  settings = extraction.Settings(args.checkpoint, args.stride_frames)
  spec = clip_lib.clip_spec(config)
  decode_s, windows = time_decoding(paths, spec, args.stride_frames)
  _, model_s, batch = time_model(config, params, settings, windows)
  time_extraction(config, params, entries[:2], os.path.join(args.workdir,
                                                           'out'), settings)
  rows, setup_s = [], []
  for workers in (1, 2):
    report = time_extraction(
        config, params, entries, os.path.join(args.workdir, 'out'),
        extraction.Settings(args.checkpoint, args.stride_frames,
                            decode_workers=workers))
    assert report.written == len(paths) and report.windows == windows
    setup_s.append(report.setup_seconds)
    rows.append((f'end to end, {workers} decoding worker'
                 f'{"s" if workers > 1 else ""}', report.seconds))
  rows += [('decoding and cropping alone (1 thread)', decode_s),
           (f'model alone (batches of {batch})', model_s)]
  m = config.model
  lines = [
      '# Feature extraction on CPU',
      '',
      f'`python experiments/features_speed.py --checkpoint=... --videos='
      f'{args.videos} --parts={args.parts} --stride_frames='
      f'{args.stride_frames}`: the divided demo model ({m.depth} blocks, '
      f'D = {m.hidden_size}, {m.num_frames} frames of '
      f'{tuple(m.image_size)}), {args.videos} mp4s of {16 * args.parts} '
      f'frames (32 x 32, 30 fps), {windows} windows of '
      f'{m.num_frames * config.data.sampling_rate} frames every '
      f'{args.stride_frames}; {os.cpu_count()} CPU cores '
      f'({jax.local_device_count()} JAX device). The end-to-end rows '
      f'leave out their setup (checks, compiling: {min(setup_s):.1f} to '
      f'{max(setup_s):.1f} s). Load average at the end '
      f'{os.getloadavg()[0]:.1f}.',
      '',
      '| what | seconds | videos/s | windows/s |',
      '|---|---|---|---|',
  ]
  lines += [f'| {what} | {s:.2f} | {len(paths) / s:.1f} | {windows / s:.0f} |'
            for what, s in rows]
  best = min(s for what, s in rows[:2])
  slower = max(decode_s, model_s)
  name = 'model' if model_s > decode_s else 'decoding'
  lines += [
      '',
      f'What bounds it: the CPU. The {name} alone takes {slower:.2f} s, '
      'the other part '
      f'{min(decode_s, model_s):.2f} s; the best end-to-end run takes '
      f'{best / slower:.2f}x the slower part (1.00: the two overlap '
      f'perfectly) and {best / (decode_s + model_s):.2f}x their sum (1.00: '
      f'no overlap): the decoding workers and the model share the '
      f'{os.cpu_count()} cores.',
  ]
  print('\n'.join(lines))
  with open(RESULTS, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
