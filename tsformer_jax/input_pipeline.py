"""Batches of clips: a pure function of (seed, step), made by workers.

Example `i` of step `s` is element `s * B + i` of the epoch's permutation,
augmented by a generator seeded with (seed, epoch, index), so a resumed run
needs no iterator state and each host takes its own slice. Labels are
int32 class indices `[b]`, or, from a multi-label source (`multi_label`
True, `num_classes`), uint8 multi-hot `[b, num_classes]`. A video that
fails to decode, or outlasts its time bound, is counted and skipped, never
an error. Clips leave the host as pixel values (float32 from the
original's resize, uint8 from the antialiased one: `clip_lib.clip_dtype`),
normalised in the jitted steps, and `prefetch_to_device` puts the next
batches on the devices while a step runs.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
import concurrent.futures
import dataclasses
import functools
import logging
import threading

import numpy as np

from tsformer_jax import clip_lib
from tsformer_jax import workers

# The names a custom `Source` uses, where they were before `clips`.
Video = clip_lib.Video
Source = clip_lib.Source
ArrayVideo = clip_lib.ArrayVideo
BadVideoError = clip_lib.BadVideoError
ClipSpec = clip_lib.ClipSpec
clip_spec = clip_lib.clip_spec


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

  def indices(self) -> list[int]:
    """The failed videos' indices, ascending."""
    with self._lock:
      return sorted(self._bad)


def _load(source: Source, index: int, fn: Callable):
  """`(fn(video), label)` of video `index`, or the error that stopped it."""
  try:
    video, label = source[index]
    if video.num_frames < 1:
      raise BadVideoError('no frames')
    return fn(video), label
  except Exception as e:  # pylint: disable=broad-except
    # Any decoder failure: one bad file must not end a long run.
    return e


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, num_videos: int) -> np.ndarray:
  """The permutation of the videos that epoch `epoch` reads."""
  return np.random.default_rng([seed, epoch]).permutation(num_videos)


# A failed video: (its index, the error as text), reported to a SkipCounter.
Failure = tuple[int, str]
# A label: a class index, or a multi-hot array `[C]`.
Label = int | np.ndarray
Example = tuple[np.ndarray | None, Label, list[Failure]]


def label_shape(source: Source) -> tuple[int, ...]:
  """The shape of one of `source`'s labels: `(C,)` for a multi-label source
  (multi-hot), else `()` (a class index)."""
  if getattr(source, 'multi_label', False):
    return (int(source.num_classes),)
  return ()


def stack_labels(labels: Sequence[Label], shape: tuple[int, ...]
                 ) -> np.ndarray:
  """int32 `[b]` class indices, or uint8 `[b, C]` multi-hot where `shape`
  is `(C,)`."""
  dtype = np.uint8 if shape else np.int32
  return np.asarray(labels, dtype).reshape((len(labels),) + shape)


def _failed(index: int, error: Exception) -> Example:
  """The example of video `index`, which failed with `error`."""
  return None, -1, [(index, f'{type(error).__name__}: {error}')]


@dataclasses.dataclass(frozen=True)
class _Job:
  """What a loader worker computes: examples of `source`, by position.

  Picklable when `source` is, so that process workers receive it once.
  """
  source: Source
  spec: ClipSpec
  seed: int = 0

  def candidate(self, epoch: int, position: int, attempt: int) -> int:
    """The video that training example `position` of `epoch` tries at its
    `attempt`-th try: a failed video gives way to the next of the
    permutation."""
    order = epoch_order(self.seed, epoch, len(self.source))
    return int(order[(position + attempt) % len(order)])

  def train_example(self, epoch: int, position: int, attempt: int = 0
                    ) -> Example:
    """Training example `position` of `epoch` from its `attempt`-th
    candidate video: `(clip, label, [])`, or `(None, -1, [failure])`.

    One video per call, so that the time bound is each video's.
    """
    index = self.candidate(epoch, position, attempt)
    rng = np.random.default_rng([self.seed, epoch, index])
    loaded = _load(self.source, index,
                   lambda v: clip_lib.train_clip(v, self.spec, rng))
    if isinstance(loaded, Exception):
      return _failed(index, loaded)
    return loaded[0], loaded[1], []

  def eval_example(self, index: int) -> Example:
    """Every test view of video `index`: `(clips [V, T, H, W, 3] or None,
    label, failures)`."""
    loaded = _load(self.source, index,
                   lambda v: clip_lib.eval_clips(v, self.spec))
    if isinstance(loaded, Exception):
      return _failed(index, loaded)
    return loaded[0], loaded[1], []


def _given_up(future: concurrent.futures.Future, index: int) -> Example:
  """A call's result; a video its worker gave up on (the time bound, a
  crashed worker) is a failure, as a decoding error is."""
  try:
    return future.result()
  except BadVideoError as e:
    return _failed(index, e)


def _first_loaded(job: _Job, submit, epoch: int, position: int
                  ) -> concurrent.futures.Future:
  """`(clip, label, failures)` of training example `position` of `epoch`:
  its candidates tried one call each, in order, until one loads (a clip of
  None if none does)."""
  result, failures = concurrent.futures.Future(), []
  n = len(job.source)

  def attempt(k: int):
    if k == n:
      result.set_result((None, -1, failures))
      return
    submit('train_example', epoch, position, k, first=k > 0
           ).add_done_callback(lambda future: tried(future, k))

  def tried(future: concurrent.futures.Future, k: int):
    if future.cancelled():
      result.cancel()
      return
    try:
      clip, label, failed = _given_up(
          future, job.candidate(epoch, position, k))
    except BaseException as e:  # pylint: disable=broad-except
      result.set_exception(e)  # A bug, not a video: the caller raises it.
      return
    failures.extend(failed)
    if clip is None:
      attempt(k + 1)  # From the worker's thread, first in line.
    else:
      result.set_result((clip, label, failures))

  attempt(0)
  return result


def _share(batch_size: int, process_count: int) -> int:
  """Each process's share of a global batch."""
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by the '
                     f'{process_count} processes.')
  return batch_size // process_count


def train_batches(source: Source, spec: ClipSpec, batch_size: int, seed: int,
                  start_step: int = 0, num_workers: int = 4,
                  skipped: SkipCounter | None = None,
                  process_index: int = 0, process_count: int = 1,
                  worker_type: str = 'thread', ahead: int = 2,
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches from `start_step` on.

  Yields `{'clips': [b, T, H, W, 3], 'labels': int32 [b] or, multi-label,
  uint8 [b, C]}` (clips of `clip_lib.clip_dtype(spec)`) where `b =
  batch_size // process_count` is this process's share of the global
  batch. Batch `s` is the same whatever `start_step`, `num_workers` and
  `worker_type` were.

  Args:
    worker_type: 'process' or 'thread' (see the module doc).
    ahead: batches being loaded while one is consumed.
  """
  local = _share(batch_size, process_count)
  n = len(source)
  steps_per_epoch = n // batch_size
  if not steps_per_epoch:
    raise ValueError(f'The dataset has {n} videos, fewer than one batch of '
                     f'{batch_size}.')
  skipped = skipped if skipped is not None else SkipCounter()
  job = _Job(source, spec, seed)
  shape = label_shape(source)

  def submit_batch(step: int, submit) -> list[concurrent.futures.Future]:
    epoch, offset = divmod(step, steps_per_epoch)
    first = offset * batch_size + process_index * local
    return [_first_loaded(job, submit, epoch, first + i)
            for i in range(local)]

  def collect(futures) -> dict[str, np.ndarray]:
    clips, labels = [], []
    for future in futures:
      clip, label, failures = future.result()
      for index, message in failures:
        skipped.add(index, BadVideoError(message))
      if clip is None:
        raise BadVideoError('Every video of the dataset failed to load.')
      clips.append(clip)
      labels.append(label)
    return dict(clips=np.stack(clips), labels=stack_labels(labels, shape))

  with workers.pool(job, num_workers, worker_type,
                    spec.decode_timeout_s) as submit:
    pending = collections.deque(submit_batch(s, submit) for s in
                                range(start_step, start_step + ahead + 1))
    step = start_step + ahead + 1
    while True:
      batch = collect(pending.popleft())
      pending.append(submit_batch(step, submit))
      step += 1
      yield batch


def eval_batches(source: Source, spec: ClipSpec, batch_size: int,
                 num_workers: int = 4, skipped: SkipCounter | None = None,
                 process_index: int = 0, process_count: int = 1,
                 worker_type: str = 'thread',
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `source` with every test view of every video.

  Batch `k` holds videos `k * batch_size` up to the next batch's; each
  process reads only its `b = batch_size // process_count` of them, from
  `process_index * b` on. Yields `{'clips': [b, V, T, H, W, 3], 'labels':
  int32 [b] or, multi-label, uint8 [b, C], 'mask': bool [b]}` (clips of
  `clip_lib.clip_dtype(spec)`): videos that fail, and the places past the
  last video, are masked out (labels 0), so that every process yields the
  same number of batches of the same shape.
  """
  skipped = skipped if skipped is not None else SkipCounter()
  local = _share(batch_size, process_count)
  mine = [k * batch_size + process_index * local + i
          for k in range(-(-len(source) // batch_size)) for i in range(local)]
  readable = [i for i in mine if i < len(source)]
  views_shape = (spec.num_views, spec.num_frames, *spec.crop_size, 3)
  job = _Job(source, spec)

  def loaded(submit) -> Iterator[tuple[np.ndarray | None, int]]:
    # `(views or None, label)` for each of `mine`, in order, with a bounded
    # number in flight.
    in_flight = 2 * max(num_workers, 1) + local
    pending = collections.deque((i, submit('eval_example', i))
                                for i in readable[:in_flight])
    following = in_flight
    for _ in readable:
      index, future = pending.popleft()
      views, label, failures = _given_up(future, index)
      if following < len(readable):
        pending.append((readable[following],
                        submit('eval_example', readable[following])))
        following += 1
      for failed, message in failures:
        skipped.add(failed, BadVideoError(message))
      yield views, label
    for _ in range(len(mine) - len(readable)):
      yield None, 0  # Past the last video.

  with workers.pool(job, num_workers, worker_type,
                    spec.decode_timeout_s) as submit:
    examples = loaded(submit)
    for _ in range(len(mine) // local):
      yield _stack([next(examples) for _ in range(local)], views_shape,
                   clip_lib.clip_dtype(spec), label_shape(source))


def _stack(examples: Sequence[tuple[np.ndarray | None, Label]],
           views_shape: tuple[int, ...], dtype: np.dtype,
           labels_shape: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
  clips = np.zeros((len(examples),) + views_shape, dtype)
  mask = np.array([views is not None for views, _ in examples], bool)
  labels = stack_labels([label if views is not None else
                         np.zeros(labels_shape, np.uint8)
                         for views, label in examples], labels_shape)
  for i, (views, _) in enumerate(examples):
    if views is not None:
      clips[i] = views
  return dict(clips=clips, labels=labels, mask=mask)


def prefetch_to_device(batches: Iterator, put: Callable, size: int = 2
                       ) -> Iterator:
  """`put(batch)` for each batch, `size` batches ahead: the next batches'
  host-to-device copies run while the current step computes (as flax's
  `jax_utils.prefetch_to_device`, with `put` placing each batch, e.g.
  sharded over the mesh)."""
  queue = collections.deque()
  for batch in batches:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()

