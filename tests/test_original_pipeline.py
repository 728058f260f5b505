"""Our evaluation beside the original's test pipeline, on real footage.

The original's test path is written out in torch (`original_transforms`,
from PySlowFast's decoder, transforms and loaders) and runs the original's
model (`checkpoint_sources.OriginalModel`, written from its equations) on
mp4s of real footage, landscape and portrait; ours evaluates the same video
with the same weights, read from the `.pyth` the original saves them in.
Each view's probabilities agree within 1e-6: Kinetics (RGB, a clip at
sampling rate, three crops along the long side) and SSv2 (BGR, a frame per
segment of its 30 fps frames).
"""

import jax
import numpy as np
import pytest
import torch

import tsformer_jax
from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import evaluation
from tsformer_jax import video_io
from tsformer_jax.datasets import video_writer

from checkpoint_sources import original_pyth
from malformed_videos import real_frames
import original_transforms as original

# On each view's probabilities, tighter than the 1e-4: float32
# rounding leaves below 1e-7 here.
TOLERANCE = 1e-6
ORIENTATIONS = ('landscape', 'portrait')
HEAD_SCALE = 30.0


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
  """Real footage as Kinetics' copies are laid out: 340 x 256 and, turned,
  256 x 340; 48 frames at 30 fps, H.264."""
  root = tmp_path_factory.mktemp('footage')
  frames = real_frames('bikes.mp4', 48, size=(340, 256))
  paths = {}
  for name, shown in zip(ORIENTATIONS, (frames, frames.transpose(0, 2, 1, 3)),
                         strict=True):
    paths[name] = root / f'{name}.mp4'
    video_writer.write_mp4(str(paths[name]), np.ascontiguousarray(shown), 30)
  return paths


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """`(config, torch model, our params)`: a random tiny divided model (4
  frames of 32 px, 10 classes) saved by the original and read back, its
  head then scaled alike on both sides, so that its probabilities are far
  from uniform and move with the pixels."""
  path = tmp_path_factory.mktemp('model') / 'model.pyth'
  config, torch_model = original_pyth(path, 'divided')
  _, params = tsformer_jax.load_checkpoint(path, config)
  with torch.no_grad():
    for p in torch_model.head.parameters():
      p.mul_(HEAD_SCALE)
  params['head'] = {k: v * HEAD_SCALE for k, v in params['head'].items()}
  return config, torch_model, params


def _torch_probabilities(torch_model, views):
  """Views `[V, T, H, W, C]` through the original's model: softmax
  `[V, classes]`."""
  with torch.no_grad():
    return torch.softmax(torch_model(views), -1).numpy()


def _kinetics_config(positions):
  """The tiny model's config (`original_pyth`'s) with Kinetics' test views:
  one clip, three crops, placed at `positions`."""
  config = config_lib.get_config('divided', 'tiny')
  config.data.update(dict(test_num_clips=1, test_num_crops=3,
                          test_clip_positions=positions))
  return config


def _original_kinetics(path, config, torch_model):
  """The original's Kinetics test views of one clip (`kinetics.py`), from
  the frames of the whole video (`decoder.decode` without a duration; the
  first clip also from its window), placed as `config` says ('paper': the
  middle of the video, an option the original lacks)."""
  frames, fps = original.decode_all(path)
  d, m = config.data, config.model
  clip_size = d.sampling_rate * m.num_frames / d.target_fps * fps
  start, end = original.get_start_end_idx(frames.shape[0], clip_size, 0, 1)
  if d.test_clip_positions == 'paper':
    middle = max(frames.shape[0] - clip_size, 0) / 2
    start, end = middle, middle + clip_size - 1
  clip = original.temporal_sampling(frames, start, end, m.num_frames)
  views = original.three_crop_views(clip, m.image_size[0], d.mean, d.std)
  return _torch_probabilities(torch_model, views)


def _our_views(path, config, params):
  """Our evaluation's views (`clip_lib.eval_clips`, which the eval loader
  runs) through our forward: softmax `[V, classes]`."""
  views = clip_lib.eval_clips(video_io.VideoFile(str(path)),
                              clip_lib.clip_spec(config))
  d = config.data
  key = (tuple(d.mean), tuple(d.std), d.channel_order)
  if key not in _FORWARDS:  # Compiled once for each normalisation.
    _FORWARDS[key] = jax.jit(evaluation.forward_fn(config))
  return np.asarray(_FORWARDS[key](params, views)['scores'])


_FORWARDS = {}


@pytest.mark.parametrize('orientation', ORIENTATIONS)
def test_kinetics_views_equal_the_originals(videos, model, orientation):
  """Both clip placements through the eval loader's clips; 'paper' (the
  default) also through `predict_videos`, which always places clips so."""
  _, torch_model, params = model
  want = {}
  for positions in clip_lib.CLIP_POSITIONS:
    config = _kinetics_config(positions)
    want[positions] = _original_kinetics(videos[orientation], config,
                                         torch_model)
    assert want[positions].shape == (3, 10)
    assert np.ptp(want[positions]) > 0.05
    got = _our_views(videos[orientation], config, params)
    np.testing.assert_allclose(got, want[positions], rtol=0, atol=TOLERANCE)
  predicted, = evaluation.predict_videos(_kinetics_config('paper'), params,
                                         [videos[orientation]])
  np.testing.assert_allclose(predicted.view_scores, want['paper'], rtol=0,
                             atol=TOLERANCE)
  # The tolerance tells placements and resizes apart.
  assert np.abs(want['paper'] - want['original']).max() > 100 * TOLERANCE
  config = _kinetics_config('paper')
  config.data.resize = 'antialias'
  off = np.abs(_our_views(videos[orientation], config, params) -
               want['paper']).max()
  assert off > 100 * TOLERANCE, off


def _ssv2_config():
  config = config_lib.get_config('divided', 'tiny,ssv2')
  config.model.num_classes = 10
  # Per channel, in the model's (BGR) order, so that a swap shows.
  config.data.update(dict(mean=(0.40, 0.45, 0.50), std=(0.20, 0.225, 0.25),
                          test_num_crops=3))
  return config


def _original_ssv2(path, config, torch_model):
  """The original's SSv2 test views (`ssv2.py`): the middle frame of each
  segment of the JPEGs `ffmpeg -r 30` extracted, read as BGR
  (`cv2.imdecode`), three crops after scaling the short side to the crop.
  At 30 fps the extracted frames are the video's, decoded here directly
  (the JPEG round trip aside)."""
  frames, fps = original.decode_all(path)
  assert fps == 30.0
  seq = original.get_seq_frames(frames.shape[0], config.model.num_frames)
  bgr = frames[seq].flip(-1)
  views = original.three_crop_views(bgr, config.model.image_size[0],
                                    config.data.mean, config.data.std)
  return _torch_probabilities(torch_model, views)


@pytest.mark.parametrize('orientation', ORIENTATIONS)
def test_ssv2_views_equal_the_originals(videos, model, orientation):
  _, torch_model, params = model
  config = _ssv2_config()
  spec = clip_lib.clip_spec(config)
  assert (spec.sampling, spec.channel_order, spec.segment_fps) == (
      'segments', 'bgr', 30.0)
  want = _original_ssv2(videos[orientation], config, torch_model)
  assert want.shape == (3, 10) and np.ptp(want) > 0.05
  got = _our_views(videos[orientation], config, params)
  np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
  predicted, = evaluation.predict_videos(config, params,
                                         [videos[orientation]])
  np.testing.assert_allclose(predicted.view_scores, want, rtol=0,
                             atol=TOLERANCE)
  # The tolerance tells channel orders apart.
  config.data.channel_order = 'rgb'
  off = np.abs(_our_views(videos[orientation], config, params) - want).max()
  assert off > 100 * TOLERANCE, off
