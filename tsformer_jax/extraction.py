"""Feature extraction at scale: one feature row per window of every video.

Temporal action detectors (ActionFormer, TriDet) read one feature sequence
per video at a fixed frame stride. A window is one clip of the model:
`T = config.model.num_frames` frames, `r = config.data.sampling_rate`
apart, spanning `W = T * r` source frames. Row `i` of a video of `F`
frames starts at frame `i * S` (`S`: the stride) and takes the frames
`min(i * S + k * r, F - 1)` for `k < T`; there are
`1 + ceil(max(F - W, 0) / S)` rows, the last being the first whose span
reaches the end, so frames past the end repeat the last frame, and a video
shorter than one window gets one row, padded so. Frames are the video's own
(`video_io`: frame `i` is shown at `i / fps`), whatever its rate: resample
a video to the model's `config.data.target_fps` first to match its
training.

Each window is cropped and normalised as evaluation's single centre view
(`long_video`, `clip_lib.eval_crops`: the short side resized to
`data.train_scales[0]`, the centre crop, the checkpoint's mean, std and
channel order). A video is decoded once, in a worker process bounded by
`data.decode_timeout_s` per window; windows of several videos share each
forward pass, split over the local devices; processes take every
`process_count`-th video. See `feature_files` for what is written.

`layer`: -1 is the final normalised output (the last block's tokens
through the model's last LayerNorm, the one before the head); `0 <= k <
depth` the output of block `k` (the residual stream, not normalised);
other negative values count from the end of [block 0, ..., block
depth - 1, final norm], so -2 is the last block's raw output. `pool`:
'cls' the class token (averaged over frames for space_only), 'mean' the
patch tokens averaged over time and space, 'tokens' the patch grid
`[T, H', W', D]`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
import dataclasses
import math
import queue
import sys
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from tsformer_jax import clip_lib
from tsformer_jax import feature_files
from tsformer_jax import long_video
from tsformer_jax import model as model_lib
from tsformer_jax import sharding
from tsformer_jax import video_io
from tsformer_jax import workers

POOLS = ('cls', 'mean', 'tokens')
# numpy has no bfloat16: an .npy of it needs ml_dtypes to read back.
DTYPES = ('float32', 'float16')


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to extract.

  Attributes:
    checkpoint: the checkpoint, as given (recorded in features.json).
    stride_frames: source frames from one window's start to the next.
    layer: which output (see the module doc).
    pool: one of `POOLS`.
    dtype: one of `DTYPES`, of the arrays written.
    batch_size: windows per forward pass (rounded up to a multiple of the
      local devices); None takes `config.eval_batch_size`.
    decode_workers: videos decoded side by side.
  """
  checkpoint: str
  stride_frames: int
  layer: int = -1
  pool: str = 'cls'
  dtype: str = 'float32'
  batch_size: int | None = None
  decode_workers: int = 2

  def __post_init__(self):
    if self.pool not in POOLS:
      raise ValueError(f'Unknown pool {self.pool!r}; valid: {list(POOLS)}.')
    if self.dtype not in DTYPES:
      raise ValueError(f'Unknown dtype {self.dtype!r}; valid: '
                       f'{list(DTYPES)} (numpy has no bfloat16).')
    if self.stride_frames < 1:
      raise ValueError(f'The stride must be at least 1 frame, got '
                       f'{self.stride_frames}.')


def window_count(video_frames: int, window_frames: int, stride: int) -> int:
  """Rows of a video of `video_frames` frames (see the module doc)."""
  return 1 + math.ceil(max(video_frames - window_frames, 0) / stride)


def window_indices(video_frames: int, num_frames: int, sampling_rate: int,
                   stride: int) -> np.ndarray:
  """Source frames of every window: int64 `[K, T]`, row `i` being
  `min(i * stride + k * sampling_rate, video_frames - 1)`."""
  if video_frames < 1:
    raise clip_lib.BadVideoError('The video has no frames.')
  count = window_count(video_frames, num_frames * sampling_rate, stride)
  frames = (np.arange(count)[:, None] * stride +
            np.arange(num_frames)[None] * sampling_rate)
  return np.minimum(frames, video_frames - 1).astype(np.int64)


def check_spec(spec: clip_lib.ClipSpec):
  """Windows at a frame stride need clips of frames `sampling_rate` apart."""
  if spec.sampling != 'rate':
    raise ValueError(f'The checkpoint samples {spec.sampling!r} (one frame '
                     'per segment of the whole video): windows at a frame '
                     'stride need data.sampling="rate".')


def block_index(layer: int, depth: int) -> int | None:
  """The block whose output `layer` names; None for the final norm."""
  if not -(depth + 1) <= layer < depth:
    raise ValueError(f'--layer={layer} is out of range for a {depth}-block '
                     f'model: give {-(depth + 1)} to {depth - 1} (-1: the '
                     f'final normalised output; 0 to {depth - 1}: a block).')
  if layer == -1:
    return None
  return layer if layer >= 0 else depth + 1 + layer


def pool_tokens(cls: jax.Array, x: jax.Array, grid: tuple[int, int, int],
                pool: str) -> jax.Array:
  """cls: [B, D], x: [B, T, N, D] -> [B, D] ('cls', 'mean') or
  [B, T, H', W', D] ('tokens'), N being H' x W' row-major."""
  if pool == 'cls':
    return cls
  if pool == 'mean':
    return x.mean(axis=(1, 2))
  if pool == 'tokens':
    return x.reshape(x.shape[:1] + tuple(grid) + x.shape[-1:])
  raise ValueError(f'Unknown pool {pool!r}; valid: {list(POOLS)}.')


def feature_fn(config, params, layer: int, pool: str, dtype: str
               ) -> tuple[Callable, dict]:
  """`(features, params)`: `features(params, clips [B, T, H, W, 3] of pixel
  values) -> [B, ...]` in `dtype`, not yet jitted, and the parameters it
  takes (the blocks past the one read left out, so they are not run)."""
  depth = config.model.depth
  block = block_index(layer, depth)
  last = depth - 1 if block is None else block
  config = config.copy_and_resolve_references()
  config.model.depth = last + 1
  model = model_lib.create_model(config)
  params = {k: v for k, v in params.items() if not (
      k.startswith('block_') and int(k[len('block_'):]) > last)}
  name = f'block_{last}'
  final_norm = nn.LayerNorm(epsilon=model.layer_norm_eps, dtype=jnp.float32)
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  channel_order = config.data.channel_order

  def features(params, clips):
    clips = clip_lib.device_normalize(clips, mean, std, channel_order)
    _, state = model.apply(
        {'params': params}, clips, mutable=['intermediates'],
        capture_intermediates=lambda m, method: (
            method == '__call__' and m.path == (name,)))
    (cls, x), = state['intermediates'][name]['__call__']
    cls = cls.mean(axis=1)  # One class token per frame for space_only.
    if block is None:  # As the model's own norm: float32, token by token.
      norm = lambda z: final_norm.apply({'params': params['norm']}, z)
      cls, x = norm(cls), norm(x)
    return pool_tokens(cls, x, model.grid, pool).astype(dtype)

  return features, params


def window_stream(video: video_io.VideoFile, spec: clip_lib.ClipSpec,
                  stride: int) -> Iterator[tuple]:
  """One video's windows, decoded once: first `('frames', num_frames, fps,
  K)`, then `('window', k, clip [T, H, W, 3])` for each window `k`
  (`clip_lib.clip_dtype(spec)`). Decoding errors leave as `BadVideoError`s
  (FFmpeg's own do not survive a worker's pickling)."""
  try:
    indices = window_indices(video.num_frames, spec.num_frames,
                             spec.sampling_rate, stride)
    yield 'frames', video.num_frames, video.fps, len(indices)
    centre = dataclasses.replace(spec, num_crops=1)
    for k, frames in long_video.video_clips(video, indices):
      clip, = clip_lib.eval_crops(frames, centre)
      yield 'window', k, clip
  except clip_lib.BadVideoError:
    raise
  except video_io.DECODE_ERRORS as e:
    raise clip_lib.BadVideoError(str(e) or type(e).__name__) from None


def decoded(paths: Sequence[str], spec: clip_lib.ClipSpec, stride: int,
            num_workers: int) -> Iterator[tuple]:
  """`(v, item)` for each `window_stream` item of every video `paths[v]`,
  then `(v, ('end',))`, or `(v, ('error', why))` where it fails; videos
  decode `num_workers` at a time (each in a worker process with
  `spec.decode_timeout_s`), their items interleaved. What is not a video's
  fault (a worker process that cannot start, a bug) is raised here."""
  items: queue.Queue = queue.Queue(maxsize=8 * max(num_workers, 1))
  todo = iter(range(len(paths)))
  lock, stop = threading.Lock(), threading.Event()

  def put(item):
    while not stop.is_set():
      try:
        return items.put(item, timeout=0.1)
      except queue.Full:
        continue

  def work():
    process = workers.DecodingProcess() if spec.decode_timeout_s else None
    ended = None  # What ended this thread: None, or an exception.
    try:
      while not stop.is_set():
        with lock:
          v = next(todo, None)
        if v is None:
          break
        args = (video_io.VideoFile(paths[v]), spec, stride)
        stream = (process.stream(window_stream, args, spec.decode_timeout_s)
                  if process else window_stream(*args))
        try:
          for item in stream:
            put((v, item))
          put((v, ('end',)))
        except video_io.DECODE_ERRORS as e:
          put((v, ('error', str(e) or type(e).__name__)))
        finally:
          stream.close()
    except BaseException as e:  # pylint: disable=broad-except
      ended = e
    finally:
      if process:
        process.stop()
      put(ended)

  threads = [threading.Thread(target=work, daemon=True)
             for _ in range(max(num_workers, 1))]
  for thread in threads:
    thread.start()
  try:
    running = len(threads)
    while running:
      item = items.get()
      if isinstance(item, BaseException):
        raise item
      if item is None:
        running -= 1
      else:
        yield item
  finally:
    stop.set()
    for thread in threads:
      thread.join()


def process_share(count: int, index: int, num_processes: int) -> list[int]:
  """The videos process `index` of `num_processes` extracts: every
  `num_processes`-th from `index`."""
  return list(range(index, count, num_processes))


def _why(path: str, message: str) -> str:
  """A decoder's message without the `PATH: ` it starts with."""
  while message.startswith(f'{path}: '):
    message = message[len(path) + 2:]
  return ' '.join(message.split())


@dataclasses.dataclass
class Report:
  """What a run did, in this process.

  Attributes:
    written: videos whose features it wrote.
    skipped: videos already done (their `.npy` existed).
    failed: `{path: why}` of the videos that failed.
    windows: windows it ran through the model.
    setup_seconds: wall time before the first video: checks, features.json,
      compiling the model.
    seconds: wall time from then on: decoding, the model, writing.
  """
  written: int = 0
  skipped: int = 0
  failed: dict[str, str] = dataclasses.field(default_factory=dict)
  windows: int = 0
  setup_seconds: float = 0.0
  seconds: float = 0.0


def manifest_settings(config, settings: Settings) -> dict:
  """The entries of features.json that a rerun must match
  (`feature_files.SETTINGS`)."""
  m, d = config.model, config.data
  return dict(checkpoint=settings.checkpoint, layer=settings.layer,
              pool=settings.pool, stride_frames=settings.stride_frames,
              window_frames=m.num_frames * d.sampling_rate,
              num_frames=m.num_frames, sampling_rate=d.sampling_rate,
              dtype=settings.dtype)


def compiled(config, params, settings: Settings,
             devices: Sequence[jax.Device]
             ) -> tuple[Callable, dict, int, jax.ShapeDtypeStruct]:
  """`(features, params, batch_size, row)`: `feature_fn` compiled now (not
  on its first batch) with its batch split over `devices`, the parameters
  copied to each, the batch size rounded up to a multiple of their count,
  and one row's shape and dtype."""
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  batch_size = settings.batch_size or config.eval_batch_size
  batch_size = -(-batch_size // len(devices)) * len(devices)
  features, params = feature_fn(config, params, settings.layer,
                                settings.pool, settings.dtype)
  params = jax.device_put(params, sharding.replicated(mesh))
  spec = clip_lib.clip_spec(config)
  batches = sharding.batch_sharding(mesh)
  clips = jax.ShapeDtypeStruct(
      (batch_size, spec.num_frames) + tuple(spec.crop_size) + (3,),
      clip_lib.clip_dtype(spec), sharding=batches)
  executable = jax.jit(
      features, in_shardings=(sharding.replicated(mesh), batches),
      out_shardings=batches,
      compiler_options=model_lib.inference_compiler_options(
          config, batch_size // len(devices))).lower(params, clips).compile()
  row = executable.out_info
  row = jax.ShapeDtypeStruct(row.shape[1:], row.dtype)
  return (lambda p, clips: executable(p, jax.device_put(clips, batches)),
          params, batch_size, row)


class _Videos:
  """The rows of the videos under way, each written once complete.

  Attributes:
    out: the output folder.
    entries: the videos of this run; `v` indexes them.
    report: counts what was written and what failed.
    done: called once per video written or failed.
    on_failure: called with `(path, why)` for a video that failed.
  """

  def __init__(self, out: str, entries: Sequence[feature_files.Entry],
               report: Report, done: Callable[[], None],
               on_failure: Callable[[str, str], None] | None):
    self.out, self.entries, self.report = out, entries, report
    self.done, self.on_failure = done, on_failure
    self._rows: dict[int, np.ndarray] = {}
    self._filled: dict[int, int] = {}
    self._frames: dict[int, dict] = {}

  def start(self, v: int, num_frames: int, fps: float, count: int,
            row: jax.ShapeDtypeStruct):
    self._rows[v] = np.empty((count,) + row.shape, row.dtype)
    self._filled[v] = 0
    self._frames[v] = dict(path=self.entries[v].path, num_frames=num_frames,
                           fps=fps, windows=count)

  def fill(self, v: int, k: int, row: np.ndarray):
    if v not in self._rows:
      return  # Failed part way.
    self._rows[v][k] = row
    self._filled[v] += 1
    if self._filled[v] == len(self._rows[v]):
      feature_files.write_features(self.out, self.entries[v],
                                   self._rows.pop(v), self._frames.pop(v))
      self.report.written += 1
      self.done()

  def fail(self, v: int, message: str):
    if v not in self._rows and v in self._filled:
      return  # Written already: its last window was read.
    self._rows.pop(v, None)
    self._filled[v] = 0
    path = self.entries[v].path
    why = _why(path, message)
    self.report.failed[path] = why
    feature_files.add_failed(self.out, path, why)
    if self.on_failure:
      self.on_failure(path, why)
    self.done()


def _prepare(config, entries: Sequence[feature_files.Entry], out: str,
             settings: Settings, classes: Sequence[str] | None,
             process_index: int, process_count: int
             ) -> list[feature_files.Entry]:
  """Checks the settings and `out`, writes features.json (process 0) and
  returns this process's share of `entries`, their lines dropped from
  failed.txt. Processes need not wait for each other: each checks the
  settings against a features.json already there."""
  check_spec(clip_lib.clip_spec(config))
  block_index(settings.layer, config.model.depth)
  if not 0 <= process_index < process_count:
    raise ValueError(f'Process {process_index} of {process_count}: the '
                     f'index must be 0 to {process_count - 1}.')
  doc = feature_files.manifest(manifest_settings(config, settings), entries,
                               classes)
  feature_files.check_out(out)
  feature_files.check_manifest(out, doc)
  if process_index == 0:
    feature_files.write_json(f'{out}/{feature_files.MANIFEST}', doc)
  mine = [entries[i] for i in process_share(len(entries), process_index,
                                            process_count)]
  feature_files.drop_failed(out, [e.path for e in mine])
  return mine


def extract(config, params, entries: Sequence[feature_files.Entry],
            out: str, settings: Settings, *,
            classes: Sequence[str] | None = None, progress: bool = True,
            on_failure: Callable[[str, str], None] | None = None,
            process_index: int = 0, process_count: int = 1) -> Report:
  """Writes the features of `entries` to `out` (`feature_files`): this
  process's share of them, those not done yet.

  Args:
    config: the checkpoint's config.
    params: its parameters.
    entries: the videos (`feature_files.folder_videos`, `listed_videos`).
    out: the folder (made if missing).
    settings: what to extract.
    classes: the class names the entries' labels index, for features.json.
    progress: show a progress bar (videos/s, ETA) on process 0, where
      stderr is a terminal.
    on_failure: called with `(path, why)` as a video fails.
    process_index: this process, of `process_count` that share the videos
      (`process_share`), each with its own devices.

  Raises:
    ValueError: bad settings, `out` a file, or holding other settings.
  """
  tick = time.perf_counter()
  mine = _prepare(config, entries, out, settings, classes, process_index,
                  process_count)
  todo = [e for e in mine if not feature_files.is_done(out, e)]
  report = Report(skipped=len(mine) - len(todo))
  if not todo:
    return report
  features, params, batch_size, row = compiled(config, params, settings,
                                               jax.local_devices())
  spec = clip_lib.clip_spec(config)
  report.setup_seconds = time.perf_counter() - tick
  tick = time.perf_counter()
  # On process 0's terminal only (disable=None: not where stderr is a file).
  shown = progress and process_index == 0
  with tqdm.tqdm(total=len(todo), unit='video', file=sys.stderr,
                 mininterval=1.0, disable=None if shown else True) as bar:
    videos = _Videos(out, todo, report, lambda: bar.update(1), on_failure)
    _run(features, params, batch_size, row, spec, settings, videos, report)
  report.seconds = time.perf_counter() - tick
  return report


def _run(features: Callable, params, batch_size: int,
         row: jax.ShapeDtypeStruct, spec: clip_lib.ClipSpec,
         settings: Settings, videos: _Videos, report: Report):
  """Decodes the videos, runs their windows `batch_size` at a time and
  hands each row to `videos`; a batch runs while the next one decodes."""
  chunk: list[tuple[int, int, np.ndarray]] = []
  pending = None

  def flush(chunk, pending):
    clips = np.zeros((batch_size,) + chunk[0][2].shape, chunk[0][2].dtype)
    for i, (_, _, clip) in enumerate(chunk):
      clips[i] = clip
    outputs = features(params, clips)  # Asynchronous: returns at once.
    if pending is not None:
      _collect(videos, *pending)
    report.windows += len(chunk)
    return [(v, k) for v, k, _ in chunk], outputs

  paths = [e.path for e in videos.entries]
  for v, item in decoded(paths, spec, settings.stride_frames,
                         settings.decode_workers):
    if item[0] == 'frames':
      videos.start(v, *item[1:], row)
    elif item[0] == 'window':
      chunk.append((v, item[1], item[2]))
      if len(chunk) == batch_size:
        pending, chunk = flush(chunk, pending), []
    elif item[0] == 'error':
      videos.fail(v, item[1])
  if chunk:
    pending = flush(chunk, pending)
  if pending is not None:
    _collect(videos, *pending)


def _collect(videos: _Videos, where: list[tuple[int, int]],
             outputs: jax.Array):
  rows = np.asarray(outputs)
  for i, (v, k) in enumerate(where):
    videos.fill(v, k, rows[i])
