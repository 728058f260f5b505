"""Clip sampling, augmentation, batching, and bad videos."""

import numpy as np
import pytest

from tsformer_jax import input_pipeline as ip
from tsformer_jax.datasets import synthetic_motion

SPEC = ip.ClipSpec(num_frames=4, sampling_rate=2, crop_size=(16, 16),
                   train_scales=(16, 20), num_clips=3, num_crops=3)


def test_training_clips_start_at_random_and_keep_the_rate():
  rng = np.random.default_rng(0)
  starts = set()
  for _ in range(50):
    idx = ip.temporal_indices(40, 30.0, SPEC, rng=rng)
    assert len(idx) == 4 and idx.min() >= 0 and idx.max() < 40
    np.testing.assert_allclose(np.diff(idx), 2, atol=1)  # Rate 2, rounded.
    starts.add(int(idx[0]))
  assert len(starts) > 10


def test_test_clips_are_evenly_spaced_and_cover_the_video():
  idx = [ip.temporal_indices(100, 30.0, SPEC, clip=k) for k in range(3)]
  assert idx[0][0] == 0 and idx[-1][-1] == 99
  assert abs((idx[1][0] - idx[0][0]) - (idx[2][0] - idx[1][0])) <= 1


def test_frame_rate_sets_the_span():
  """At 60 fps the same time span covers twice the frames."""
  idx = ip.temporal_indices(1000, 60.0, SPEC, clip=0)
  np.testing.assert_allclose(np.diff(idx), 4, atol=1)


def test_short_video_repeats_its_last_frame():
  idx = ip.temporal_indices(3, 30.0, SPEC, clip=0)
  np.testing.assert_array_equal(idx, [0, 2, 2, 2])  # Span 8 > 3 frames.


def test_three_crops_are_left_centre_right_and_normalised():
  frames = np.zeros((4, 20, 40, 3), np.uint8)
  frames[..., 0] = np.arange(40)[None, None, :]  # Red = column index.
  spec = ip.ClipSpec(num_frames=4, sampling_rate=1, crop_size=(20, 20),
                     num_crops=3, mean=(0, 0, 0), std=(1, 1, 1))
  crops = ip.eval_crops(frames, spec)
  assert [c.shape for c in crops] == [(4, 20, 20, 3)] * 3
  assert [int(c[0, 0, 0, 0]) for c in crops] == [0, 10, 20]
  clip = ip.normalize(crops[1], ip.ClipSpec(4, 1, (20, 20)))
  np.testing.assert_allclose(clip[0, 0, 0, 0], (10 / 255 - 0.45) / 0.225,
                             rtol=1e-6)


def test_train_transform_crops_and_flips():
  frames = np.zeros((2, 16, 16, 3), np.uint8)
  frames[:, :, :8] = 255  # Left half white.
  flipped = 0
  for seed in range(20):
    out = ip.train_transform(frames, SPEC, np.random.default_rng(seed))
    assert out.shape == (2, 16, 16, 3)
    flipped += out[0, 8, 0, 0] < out[0, 8, -1, 0]
  assert 3 < flipped < 17
  no_flip = ip.ClipSpec(4, 2, (16, 16), train_scales=(16, 16), flip=False)
  for seed in range(5):
    out = ip.train_transform(frames, no_flip, np.random.default_rng(seed))
    np.testing.assert_array_equal(out, frames)


class _Flaky:
  """Videos 0..n-1; the ones in `bad` fail to decode."""

  def __init__(self, n, bad=()):
    self.n, self.bad = n, set(bad)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i in self.bad:
      raise OSError(f'corrupt video {i}')
    frames = np.full((8, 16, 16, 3), i, np.uint8)
    return ip.ArrayVideo(frames), i


def test_batches_are_a_function_of_the_step():
  source = synthetic_motion.Source('train')
  spec = ip.ClipSpec(4, 2, (32, 32), train_scales=(32, 36), flip=False)
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
  spec = ip.ClipSpec(2, 1, (16, 16), train_scales=(16, 16), mean=(0, 0, 0),
                     std=(1, 1, 1))
  batches = ip.train_batches(source, spec, 4, seed=0)
  labels = np.concatenate([next(batches)['labels'] for _ in range(3)])
  assert sorted(labels) == list(range(12))


def test_bad_videos_are_skipped_and_counted():
  source = _Flaky(12, bad={1, 5, 7})
  spec = ip.ClipSpec(2, 1, (16, 16), train_scales=(16, 16), num_crops=1,
                     mean=(0, 0, 0), std=(1, 1, 1))
  skipped = ip.SkipCounter()
  batches = ip.train_batches(source, spec, 4, seed=0, skipped=skipped)
  labels = np.concatenate([next(batches)['labels'] for _ in range(6)])
  assert not {1, 5, 7} & set(labels) and len(labels) == 24
  assert len(skipped) == 3

  skipped = ip.SkipCounter()
  evals = list(ip.eval_batches(source, spec, 4, skipped=skipped))
  assert [b['mask'].sum() for b in evals] == [4, 4, 1]
  kept = np.concatenate([b['labels'][b['mask']] for b in evals])
  assert sorted(kept) == [0, 2, 3, 4, 6, 8, 9, 10, 11]
  assert evals[-1]['clips'].shape == (4, 1, 2, 16, 16, 3)
  assert len(skipped) == 3


def test_every_video_failing_is_an_error():
  spec = ip.ClipSpec(2, 1, (16, 16), train_scales=(16, 16))
  with pytest.raises(ip.BadVideoError):
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
