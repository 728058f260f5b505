r"""How fast the input pipeline feeds clips, and where its CPU time goes.

  python -m tsformer_jax.datasets.benchmark --config=configs/divided.py \
      --config.data.data_dir=DIR [--config.data.format=tfds] \
      [--config.data.num_workers=N] --batches=N [--loader=train|eval] \
      [--json] [--step_clips_per_second=R]

Runs the loader that training (`--loader=train`) or evaluation (`eval`) uses
on the config's dataset, in batches of the clips one device step takes
(`batch_size / grad_accum_steps` in training, `eval_batch_size` in
evaluation), and puts each batch on the devices as training does. After
`--warmup` batches (worker start-up, first opens) it times `--batches`
more: wall-clock time and the CPU time of every process of the pipeline
(this one, its threads and its worker processes). It then makes
`--breakdown_clips` clips one at a time in this process, taking the CPU
time of each stage:

  read       opening the video and reading its header (or its metadata)
  decode     reading and decoding the frames a clip uses
  transform  cropping, resizing and flipping them (`config.data.resize`:
             float32 pixels as the original's, or uint8 antialiased)
  transfer   putting a batch on the devices (wall-clock, in the timed run),
             per clip

`--json` prints one JSON object; otherwise a short table, and with
`--step_clips_per_second` the CPU cores it would take to feed a training
step that consumes that many clips a second.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import jax
import numpy as np
import psutil

from tsformer_jax import cli
from tsformer_jax import clip_lib
from tsformer_jax import datasets
from tsformer_jax import input_pipeline
from tsformer_jax import sharding

_LOADER = flags.DEFINE_enum('loader', 'train', ['train', 'eval'],
                            "The loader timed: training's or evaluation's.")
_BATCHES = flags.DEFINE_integer('batches', 8, 'Batches to time.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Batches run before timing.')
_BREAKDOWN_CLIPS = flags.DEFINE_integer(
    'breakdown_clips', 8, 'Clips decoded one at a time for the breakdown '
    '(0: none).')
_STEP_RATE = flags.DEFINE_float(
    'step_clips_per_second', None, 'Clips a second a training step '
    'consumes: the table says how many cores would feed it.')

STAGES = ('read', 'decode', 'transform', 'transfer')


class Repeated:
  """A source read `times` over, so that one evaluation pass lasts as long
  as the benchmark needs."""

  def __init__(self, source: clip_lib.Source, times: int):
    self.source, self.times = source, times

  def __len__(self) -> int:
    return len(self.source) * self.times

  def __getitem__(self, index: int):
    return self.source[index % len(self.source)]


def cpu_seconds() -> dict[int, float]:
  """User + system CPU seconds of this process and of each of its
  descendants, by pid."""
  me = psutil.Process()
  seconds = {}
  for process in [me] + me.children(recursive=True):
    try:
      times = process.cpu_times()
    except psutil.Error:  # Ended in between.
      continue
    seconds[process.pid] = times.user + times.system
  return seconds


def spent(start: dict[int, float], end: dict[int, float]) -> float:
  """CPU seconds between two `cpu_seconds` readings; a process that started
  in between counts whole."""
  return sum(t - start.get(pid, 0.0) for pid, t in end.items())


def batch_size(config, loader: str) -> int:
  """The clips one device step of `loader` ('train' or 'eval') takes."""
  if loader == 'train':
    return config.batch_size // config.grad_accum_steps
  return config.eval_batch_size


def pipeline(config, source, loader: str, size: int, total: int):
  """The batches of `loader` ('train' or 'eval'), `size` clips (videos in
  eval) each."""
  spec = clip_lib.clip_spec(config)
  if loader == 'train':
    return input_pipeline.train_batches(
        source, spec, size, config.seed,
        num_workers=config.data.num_workers,
        worker_type=config.data.worker_type)
  times = -(-total * size // len(source))
  return input_pipeline.eval_batches(
      Repeated(source, times), spec, size,
      num_workers=config.data.num_workers,
      worker_type=config.data.worker_type)


def throughput(config, source, loader: str, batches: int, warmup: int
               ) -> dict:
  """Times the loader and the host-to-device copy of each batch."""
  size = batch_size(config, loader)
  mesh = sharding.create_mesh(config)
  target = sharding.batch_sharding(mesh)
  iterator = pipeline(config, source, loader, size, batches + warmup)
  for _ in range(warmup):
    jax.block_until_ready(sharding.global_batch(next(iterator), target))
  clips, transfer = 0, 0.0
  cpu_start, wall_start = cpu_seconds(), time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
    tick = time.perf_counter()
    jax.block_until_ready(sharding.global_batch(batch, target))
    transfer += time.perf_counter() - tick
    clips += int(np.prod(batch['clips'].shape[:-4]))
  wall = time.perf_counter() - wall_start
  cpu = spent(cpu_start, cpu_seconds())
  close = getattr(iterator, 'close', None)
  if close:
    close()
  return dict(clips=clips, batches=batches, batch_size=size,
              wall_seconds=wall, cpu_seconds=cpu,
              clips_per_second=clips / wall,
              clips_per_cpu_second=clips / cpu if cpu else float('inf'),
              transfer_seconds_per_clip=transfer / max(clips, 1),
              clip_dtype=str(batch['clips'].dtype),
              clip_shape=list(batch['clips'].shape))


def breakdown(config, source, loader: str, count: int
              ) -> dict[str, float]:
  """CPU seconds per clip in read, decode and transform, one clip at a time
  in this process (an eval video counts its views as clips)."""
  spec = clip_lib.clip_spec(config)
  # One clip untimed first: readers open lazily (TFDS's, on first use).
  if loader == 'train':
    clip_lib.train_clip(source[0][0], spec, np.random.default_rng(0))
  else:
    clip_lib.eval_clips(source[0][0], spec)
  totals = dict.fromkeys(STAGES[:-1], 0.0)
  clips = 0
  for i in range(count):
    index = i % len(source)
    tick = time.process_time()
    video, _ = source[index]
    totals['read'] += time.process_time() - tick
    if loader == 'train':
      rng = np.random.default_rng([config.seed, 0, index])
      clip_lib.train_clip(video, spec, rng, timer=totals)
      clips += 1
    else:
      clips += len(clip_lib.eval_clips(video, spec, timer=totals))
  return {k: v / max(clips, 1) for k, v in totals.items()}


def run(config, loader: str, batches: int, warmup: int = 2,
        breakdown_clips: int = 8,
        step_clips_per_second: float | None = None) -> dict:
  """The benchmark's result (see the module doc)."""
  split = config.data.train_split if loader == 'train' else \
      config.data.eval_split
  source = datasets.get_source(config, split)
  load = os.getloadavg()
  result = dict(loader=loader, dataset=config.data.dataset,
                format=config.data.format, split=split, videos=len(source),
                num_workers=config.data.num_workers,
                worker_type=config.data.worker_type,
                cpu_count=os.cpu_count(), load_average=list(load))
  result.update(throughput(config, source, loader, batches, warmup))
  stages = (breakdown(config, source, loader, breakdown_clips)
            if breakdown_clips else {})
  stages['transfer'] = result.pop('transfer_seconds_per_clip')
  result['breakdown'] = {k: stages[k] for k in STAGES if k in stages}
  if step_clips_per_second:
    result['step_clips_per_second'] = step_clips_per_second
    result['cores_to_feed'] = (step_clips_per_second /
                               result['clips_per_cpu_second'])
  return result


def table(result: dict) -> str:
  """The result as a few lines of text."""
  lines = [
      f'{result["loader"]} {result["dataset"]} ({result["format"]}), '
      f'{result["num_workers"]} {result["worker_type"]} workers, batches of '
      f'{result["batch_size"]}, load {result["load_average"][0]:.2f}',
      f'  {result["clips"]} clips in {result["wall_seconds"]:.2f} s wall, '
      f'{result["cpu_seconds"]:.2f} s CPU',
      f'  clips/s {result["clips_per_second"]:.1f}, clips per CPU-second '
      f'{result["clips_per_cpu_second"]:.1f}',
      '  per clip, one at a time: ' + ', '.join(
          f'{k} {1000 * v:.1f} ms' for k, v in result['breakdown'].items())]
  if 'cores_to_feed' in result:
    lines.append(f'  {result["cores_to_feed"]:.1f} cores feed '
                 f'{result["step_clips_per_second"]:g} clips/s')
  return '\n'.join(lines)


@cli.takes(cli.CONFIG, cli.JSON)
def main(argv):
  if len(argv) > 1 or cli.CONFIG.value is None:
    raise cli.Error('Pass --config=configs/<scheme>.py[:arg] and no other '
                    f'arguments (got {argv[1:]}); --help shows more.')
  if _BATCHES.value < 1 or _WARMUP.value < 0:
    raise cli.Error('--batches must be positive and --warmup not negative.')
  try:
    result = run(cli.CONFIG.value, _LOADER.value, _BATCHES.value,
                 _WARMUP.value, _BREAKDOWN_CLIPS.value, _STEP_RATE.value)
  except (FileNotFoundError, ValueError) as e:
    raise cli.Error(str(e)) from e
  # Flushed now: a library's thread crashing at exit must not lose it.
  print(json.dumps(result, indent=1) if cli.JSON.value else table(result),
        flush=True)


if __name__ == '__main__':
  cli.run(main)
