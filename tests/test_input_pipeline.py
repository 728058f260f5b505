"""Clip sampling, augmentation, batching, and bad videos."""

import dataclasses
import math
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from tsformer_jax import clip_lib
from tsformer_jax import crops
from tsformer_jax import input_pipeline as ip
from tsformer_jax.datasets import synthetic_motion

from conftest import read_both_loaders

SPEC = clip_lib.ClipSpec(num_frames=4, sampling_rate=2, crop_size=(16, 16),
                         train_scales=(16, 20), num_clips=3, num_crops=3)


def test_training_clips_start_at_random_and_keep_the_rate():
  rng = np.random.default_rng(0)
  starts = set()
  for _ in range(50):
    idx = clip_lib.temporal_indices(40, 30.0, SPEC, rng=rng)
    assert len(idx) == 4 and idx.min() >= 0 and idx.max() < 40
    np.testing.assert_allclose(np.diff(idx), 2, atol=1)  # Rate 2, rounded.
    starts.add(int(idx[0]))
  assert len(starts) > 10


def test_test_clips_are_evenly_spaced_and_cover_the_video():
  idx = [clip_lib.temporal_indices(100, 30.0, SPEC, clip=k) for k in range(3)]
  assert idx[0][0] == 0 and idx[-1][-1] == 99
  assert abs((idx[1][0] - idx[0][0]) - (idx[2][0] - idx[1][0])) <= 1


def test_frame_rate_sets_the_span():
  """At 60 fps the same time span covers twice the frames."""
  idx = clip_lib.temporal_indices(1000, 60.0, SPEC, clip=0)
  np.testing.assert_allclose(np.diff(idx), 4, atol=1)


def test_short_video_repeats_its_last_frame():
  idx = clip_lib.temporal_indices(3, 30.0, SPEC, clip=0)
  np.testing.assert_array_equal(idx, [0, 2, 2, 2])  # Span 8 > 3 frames.


def test_three_crops_are_left_centre_right_and_normalised():
  frames = np.zeros((4, 20, 40, 3), np.uint8)
  frames[..., 0] = np.arange(40)[None, None, :]  # Red = column index.
  spec = clip_lib.ClipSpec(num_frames=4, sampling_rate=1, crop_size=(20, 20),
                           num_crops=3, mean=(0, 0, 0), std=(1, 1, 1))
  crops = clip_lib.eval_crops(frames, spec)
  assert [c.shape for c in crops] == [(4, 20, 20, 3)] * 3
  assert [int(c[0, 0, 0, 0]) for c in crops] == [0, 10, 20]
  clip = clip_lib.normalize(crops[1], clip_lib.ClipSpec(4, 1, (20, 20)))
  np.testing.assert_allclose(clip[0, 0, 0, 0], (10 / 255 - 0.45) / 0.225,
                             rtol=1e-6)


def test_crops_are_the_originals_to_the_pixel():
  """PySlowFast's sizes and offsets: the long side floored, centres rounded
  up, one test crop after resizing to the smallest training scale (its
  Kinetics loader; its SSv2 loader resizes to the crop)."""
  spec = clip_lib.ClipSpec(8, 32, (224, 224), train_scales=(256, 320),
                           num_crops=3)
  plan = lambda **fields: [(c.resized, c.y, c.x) for c in clip_lib.
                           eval_crop_list((240, 320), dataclasses.replace(
                               spec, **fields))]
  assert plan() == [((224, 298), 0, 0), ((224, 298), 0, 37),
                    ((224, 298), 0, 74)]
  assert plan(num_crops=1) == [((256, 341), 16, 59)]
  assert plan(num_crops=1, sampling='segments') == [((224, 298), 0, 37)]
  # Portrait, along the height: 401 = floor(224 * 335 / 187), 89 = ceil(
  # 177 / 2).
  assert [(c.resized[0], c.y) for c in clip_lib.eval_crop_list(
      (335, 187), spec)] == [(401, 0), (401, 89), (401, 177)]
  # Scale jitter: round(uniform(lo, hi)), its two ends half as likely.
  rng = np.random.default_rng(0)
  scales = [clip_lib.train_crop((240, 320), dataclasses.replace(
      spec, train_scales=(256, 260)), rng).resized[0] for _ in range(4000)]
  counts = np.bincount(scales, minlength=261)[256:]
  np.testing.assert_allclose(counts / 4000, [1 / 8, 1 / 4, 1 / 4, 1 / 4,
                                             1 / 8], atol=0.02)


def test_train_transform_crops_and_flips():
  frames = np.zeros((2, 16, 16, 3), np.uint8)
  frames[:, :, :8] = 255  # Left half white.
  flipped = 0
  for seed in range(20):
    out = clip_lib.train_transform(frames, SPEC, np.random.default_rng(seed))
    assert out.shape == (2, 16, 16, 3)
    flipped += out[0, 8, 0, 0] < out[0, 8, -1, 0]
  assert 3 < flipped < 17
  no_flip = clip_lib.ClipSpec(4, 2, (16, 16), train_scales=(16, 16), flip=False)
  for seed in range(5):
    out = clip_lib.train_transform(frames, no_flip, np.random.default_rng(seed))
    np.testing.assert_array_equal(out, frames)


class _Flaky:
  """Videos 0..n-1; the ones in `bad` fail to decode. `opened` records
  the indices read (thread workers share it)."""

  def __init__(self, n, bad=()):
    self.n, self.bad, self.opened = n, set(bad), []

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    self.opened.append(i)
    if i in self.bad:
      raise OSError(f'corrupt video {i}')
    frames = np.full((8, 16, 16, 3), i, np.uint8)
    return clip_lib.ArrayVideo(frames), i


def test_batches_are_a_function_of_the_step():
  source = synthetic_motion.Source('train')
  spec = clip_lib.ClipSpec(4, 2, (32, 32), train_scales=(32, 36), flip=False)
  run = ip.train_batches(source, spec, 8, seed=3)
  first = [next(run) for _ in range(3)]
  resumed = next(ip.train_batches(source, spec, 8, seed=3, start_step=2))
  np.testing.assert_array_equal(resumed['clips'], first[2]['clips'])
  np.testing.assert_array_equal(resumed['labels'], first[2]['labels'])
  other = next(ip.train_batches(source, spec, 8, seed=4, start_step=2))
  assert not np.array_equal(other['labels'], first[2]['labels'])
  # Each process takes its own half of the global batch.
  halves = [next(ip.train_batches(source, spec, 8, seed=3, start_step=2,
                                  process_index=p, process_count=2))
            for p in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([h['labels'] for h in halves]), first[2]['labels'])


def test_an_epoch_visits_every_video_once():
  source = _Flaky(12)
  spec = clip_lib.ClipSpec(2, 1, (16, 16), train_scales=(16, 16),
                           mean=(0, 0, 0), std=(1, 1, 1))
  batches = ip.train_batches(source, spec, 4, seed=0)
  labels = np.concatenate([next(batches)['labels'] for _ in range(3)])
  assert sorted(labels) == list(range(12))


def test_bad_videos_are_skipped_and_counted():
  source = _Flaky(12, bad={1, 5, 7})
  spec = clip_lib.ClipSpec(2, 1, (16, 16), train_scales=(16, 16), num_crops=1,
                           mean=(0, 0, 0), std=(1, 1, 1))
  skipped = ip.SkipCounter()
  batches = ip.train_batches(source, spec, 4, seed=0, skipped=skipped)
  labels = np.concatenate([next(batches)['labels'] for _ in range(6)])
  assert not {1, 5, 7} & set(labels) and len(labels) == 24
  assert len(skipped) == 3

  skipped = ip.SkipCounter()
  evals = list(ip.eval_batches(source, spec, 4, skipped=skipped))
  # Batch k holds videos 4k to 4k + 3, the failed ones masked out.
  assert [b['mask'].tolist() for b in evals] == [
      [True, False, True, True], [True, False, True, False], [True] * 4]
  kept = np.concatenate([b['labels'][b['mask']] for b in evals])
  assert sorted(kept) == [0, 2, 3, 4, 6, 8, 9, 10, 11]
  assert evals[-1]['clips'].shape == (4, 1, 2, 16, 16, 3)
  assert len(skipped) == 3


def test_each_process_evaluates_its_own_share():
  spec = clip_lib.ClipSpec(2, 1, (16, 16), num_crops=1)
  whole = list(ip.eval_batches(_Flaky(10, bad={3}), spec, 4))
  shares = []
  for p in range(2):
    source = _Flaky(10, bad={3})
    shares.append(list(ip.eval_batches(source, spec, 4, process_index=p,
                                       process_count=2)))
    # Videos 2p, 2p + 1 of each batch of 4; none of the others is opened.
    assert sorted(source.opened) == [i for i in range(10) if i % 4 // 2 == p]
  assert len(shares[0]) == len(shares[1]) == len(whole) == 3
  for batch, *halves in zip(whole, *shares, strict=True):
    for key in ('clips', 'labels', 'mask'):
      np.testing.assert_array_equal(
          np.concatenate([h[key] for h in halves]), batch[key])
  assert [b['mask'].sum() for b in whole] == [3, 4, 2]  # 10 videos, 1 bad.


def test_a_batch_that_the_processes_cannot_share_is_refused():
  spec = clip_lib.ClipSpec(2, 1, (16, 16), num_crops=1)
  for batches in (ip.eval_batches(_Flaky(10), spec, 10, process_count=4),
                  ip.train_batches(_Flaky(10), spec, 10, seed=0,
                                   process_count=4)):
    with pytest.raises(ValueError, match='batch_size 10 is not divisible by '
                       'the 4 processes'):
      next(batches)


def test_every_video_failing_is_an_error():
  spec = clip_lib.ClipSpec(2, 1, (16, 16), train_scales=(16, 16))
  with pytest.raises(clip_lib.BadVideoError):
    next(ip.train_batches(_Flaky(4, bad=range(4)), spec, 2, seed=0))


def test_synthetic_motion_is_deterministic_and_balanced():
  a, label = synthetic_motion.generate('train', 7)
  b, label_b = synthetic_motion.generate('train', 7)
  np.testing.assert_array_equal(a, b)
  assert label == label_b and a.shape == (16, 32, 32, 3)
  labels = [synthetic_motion.generate('test', i)[1] for i in range(200)]
  assert set(labels) == set(range(len(synthetic_motion.CLASSES)))


def test_synthetic_motion_needs_frame_order():
  """The square's colour changes half way; the order is the class. It moves
  in a straight line, so the clip played backwards is a clip of the other
  class: no per-frame cue tells them apart."""
  for i in range(20):
    frames, label = synthetic_motion.generate('train', i)
    first, second = synthetic_motion.CLASSES[label].split('_then_')
    mean_colour = []
    centres = []
    for frame in frames.astype(float):
      square = frame.max(-1) > 150
      mean_colour.append(frame[square].mean(0))
      centres.append(np.argwhere(square).mean(0))
    red_first = mean_colour[0][0] > mean_colour[0][2]
    assert red_first == (first == 'red')
    assert (mean_colour[-1][0] > mean_colour[-1][2]) == (second == 'red')
    steps = np.diff(centres, axis=0)
    np.testing.assert_allclose(steps.mean(0), steps[0], atol=1.0)  # Straight.


def _tf_resize(frames, shape):
  """The earlier resize: TensorFlow's antialiased bilinear on float32."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = tf.image.resize(frames, shape, method='bilinear', antialias=True)
  return np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)


def _tf_short_side(frames, size):
  """The original's sizes (`random_short_side_scale_jitter`): the long side
  floored."""
  h, w = frames.shape[1:3]
  if min(h, w) == size:
    return frames
  if w < h:
    return _tf_resize(frames, (int(math.floor(float(h) / w * size)), size))
  return _tf_resize(frames, (size, int(math.floor(float(w) / h * size))))


def _old_train_clip(video, spec, rng):
  """The earlier pipeline's training clip: the whole frames resized, then
  cropped and flipped, drawing from `rng` in the same order."""
  indices = clip_lib.temporal_indices(video.num_frames, video.fps, spec,
                                      rng=rng)
  lo, hi = spec.train_scales
  frames = _tf_short_side(video.frames(indices),
                          int(round(rng.uniform(lo, hi))))
  h, w = frames.shape[1:3]
  y = int(rng.integers(0, h - spec.crop_size[0] + 1))
  x = int(rng.integers(0, w - spec.crop_size[1] + 1))
  frames = crops.crop(frames, spec.crop_size, y, x)
  return frames[:, :, ::-1] if spec.flip and rng.random() < 0.5 else frames


def _old_eval_views(video, spec):
  views = []
  for k in range(spec.num_clips):
    indices = clip_lib.temporal_indices(video.num_frames, video.fps, spec,
                                        clip=k)
    # The original's test crops (`uniform_crop`): centres rounded up; one
    # crop after Kinetics' resize to the smallest training scale.
    short = (spec.train_scales[0] if spec.num_crops == 1
             else min(spec.crop_size))
    frames = _tf_short_side(video.frames(indices), short)
    h, w = frames.shape[1:3]
    dy, dx = h - spec.crop_size[0], w - spec.crop_size[1]
    cy, cx = math.ceil(dy / 2), math.ceil(dx / 2)
    if spec.num_crops == 1:
      offsets = [(cy, cx)]
    elif w >= h:  # Along the long side.
      offsets = [(cy, 0), (cy, cx), (cy, dx)]
    else:
      offsets = [(0, cx), (cy, cx), (dy, cx)]
    views.extend(crops.crop(frames, spec.crop_size, y, x)
                 for y, x in offsets)
  return np.stack(views)


@pytest.mark.parametrize('shape', [(40, 48, 64, 3), (40, 96, 72, 3),
                                   (40, 240, 320, 3)])
def test_clips_equal_the_earlier_pipelines_within_one_level(shape):
  """Cropping before resizing, with PIL's filter in float32, gives the
  earlier pipeline's clips (whole frames resized by TensorFlow, then
  cropped): the same antialiased bilinear filter, so at most one level,
  where a value falls on .5 and float rounding tips it (a few % of values
  on noise, where ties are common; 0.2% on footage).
  Uniform noise is the hardest case; a crop off by one pixel would differ
  by ~85 on average."""
  video = clip_lib.ArrayVideo(np.random.default_rng(0).integers(0, 256, shape,
                                                                np.uint8))
  spec = clip_lib.ClipSpec(num_frames=4, sampling_rate=4, crop_size=(32, 32),
                           train_scales=(32, 56), num_clips=2, num_crops=3,
                           resize='antialias')
  for seed in range(6):
    new = clip_lib.train_clip(video, spec, np.random.default_rng(seed))
    old = _old_train_clip(video, spec, np.random.default_rng(seed))
    difference = np.abs(new.astype(int) - old)
    assert new.dtype == np.uint8 and new.shape == (4, 32, 32, 3)
    assert difference.max() <= 1 and difference.mean() <= 0.05
  for count in (3, 1):
    spec = dataclasses.replace(spec, num_crops=count)
    new, old = clip_lib.eval_clips(video, spec), _old_eval_views(video, spec)
    assert new.shape == old.shape == (2 * count, 4, 32, 32, 3)
    difference = np.abs(new.astype(int) - old)
    assert difference.max() <= 1 and difference.mean() <= 0.05
  np.testing.assert_array_equal(clip_lib.eval_views(video, spec),
                                clip_lib.normalize(new, spec))


def test_normalising_on_the_device_equals_the_host_version():
  import jax  # pylint: disable=g-import-not-at-top
  spec = clip_lib.ClipSpec(4, 1, (8, 8), mean=(0.45, 0.4, 0.5),
                           std=(0.225, 0.2, 0.3))
  clips = np.random.default_rng(0).integers(0, 256, (2, 4, 8, 8, 3),
                                            np.uint8)
  clips[0, 0, 0, 0] = [0, 255, 128]
  on_device = jax.jit(
      lambda c: clip_lib.device_normalize(c, spec.mean, spec.std))
  got = np.asarray(on_device(clips))
  assert got.dtype == np.float32
  # Within float32 rounding of values up to ~2.5.
  np.testing.assert_allclose(got, clip_lib.normalize(clips, spec), rtol=1e-6,
                             atol=1e-6)
  # Float pixel values (the original's resize) normalise as uint8 ones.
  np.testing.assert_allclose(on_device(clips.astype(np.float32)), got,
                             rtol=1e-6, atol=1e-6)


def test_test_clip_positions_follow_their_formulas():
  """'paper': one clip in the middle, n clips at slack * k / (n - 1);
  'original' (PySlowFast's get_start_end_idx): slack * k / n."""
  for frames, fps in [(300, 30.0), (250, 25.0), (100, 30.0), (7, 30.0)]:
    for clips in (1, 2, 3, 10):
      for positions in clip_lib.CLIP_POSITIONS:
        spec = clip_lib.ClipSpec(num_frames=8, sampling_rate=4,
                                 crop_size=(8, 8), num_clips=clips,
                                 clip_positions=positions)
        span = 8 * 4 * fps / 30.0
        slack = max(frames - span, 0.0)
        for k in range(clips):
          if positions == 'original':
            start = slack * k / clips
          else:
            start = slack * k / (clips - 1) if clips > 1 else slack / 2
          expected = np.clip(np.linspace(start, start + span - 1, 8), 0,
                             frames - 1).astype(int)
          np.testing.assert_array_equal(
              clip_lib.temporal_indices(frames, fps, spec, clip=k), expected)
  one = clip_lib.ClipSpec(8, 4, (8, 8), clip_positions='original')
  assert clip_lib.temporal_indices(300, 30.0, one, clip=0)[0] == 0  # Frame 0.
  with pytest.raises(ValueError, match="'paper', 'original'"):
    clip_lib.temporal_indices(
        300, 30.0, clip_lib.ClipSpec(8, 4, (8, 8), clip_positions='x'),
        clip=0)


def test_prefetch_to_device_keeps_the_order_and_runs_ahead():
  put_calls = []

  def put(batch):
    put_calls.append(batch)
    return -batch

  prefetched = ip.prefetch_to_device(iter(range(5)), put, size=2)
  assert next(prefetched) == 0 and put_calls == [0, 1, 2]  # Two ahead.
  assert list(prefetched) == [-1, -2, -3, -4]


@pytest.mark.slow
def test_process_workers_give_the_thread_workers_batches():
  """Worker processes (forked from the fork server) give the same batches
  and skip the same videos as threads; batch s stays a function of s."""
  source = _Flaky(12, bad={1, 5, 7})
  spec = clip_lib.ClipSpec(2, 1, (16, 16), train_scales=(16, 20), num_crops=1)
  runs = {worker_type: read_both_loaders(source, spec, 4, 5, 2, worker_type)
          for worker_type in ('thread', 'process')}
  assert runs['thread'][1:] == runs['process'][1:] == (3, 3)
  for a, b in zip(runs['thread'][0], runs['process'][0], strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  train = runs['thread'][0]
  resumed = next(ip.train_batches(source, spec, 4, seed=0, start_step=3,
                                  num_workers=2, worker_type='process'))
  np.testing.assert_array_equal(resumed['clips'], train[3]['clips'])


def test_a_crop_resized_alone_equals_the_whole_frame_resized_and_cut():
  """'antialias': crops at every corner, at scales whose box ends round past
  the frame: the crop's own resize equals cutting the resized whole frame
  (one level where float rounding tips a value across .5), and flips
  mirror it."""
  frames = np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3),
                                             np.uint8)
  for short in (33, 37, 41, 48, 55, 61):
    resized = crops.short_side_size((48, 64), short)
    whole = crops.resize(frames, resized)
    for y in (0, resized[0] - 32):
      for x in (0, resized[1] - 32):
        for flip in (False, True):
          crop = crops.Crop(resized, y, x, (32, 32), flip)
          alone, = crops.apply_crops(frames, [crop], 'antialias')
          cut = whole[:, y:y + 32, x:x + 32]
          cut = cut[:, :, ::-1] if flip else cut
          difference = np.abs(alone.astype(int) - cut)
          assert difference.max() <= 1 and difference.mean() <= 0.05


_KILLED_LOADER = '''
import os, sys, time
import psutil
from tsformer_jax import input_pipeline as ip
from tsformer_jax.datasets import synthetic_motion
spec = ip.ClipSpec(4, 2, (32, 32), train_scales=(32, 36))
if __name__ == '__main__':
  batches = ip.train_batches(synthetic_motion.Source('train'), spec, 4,
                             seed=0, num_workers=2, worker_type='process')
  next(batches)
  print(' '.join(str(p.pid) for p in
                 psutil.Process().children(recursive=True)), flush=True)
  time.sleep(600)
'''


@pytest.mark.slow
def test_worker_processes_end_with_a_killed_loader(tmp_path):
  """A loader killed outright (SIGKILL) cannot tell its workers; they (and
  the fork server) notice within seconds and end, rather than wait for
  work forever."""
  script = tmp_path / 'loader.py'
  script.write_text(_KILLED_LOADER)
  loader = subprocess.Popen([sys.executable, str(script)],
                            stdout=subprocess.PIPE, text=True)
  try:
    pids = [int(p) for p in loader.stdout.readline().split()]
  finally:
    loader.send_signal(signal.SIGKILL)
    loader.wait()
  assert len(pids) >= 3  # The fork server and two workers.

  def running(pid):
    try:
      return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
      return False

  deadline = time.time() + 20
  while any(running(p) for p in pids) and time.time() < deadline:
    time.sleep(0.5)
  assert not [p for p in pids if running(p)]
