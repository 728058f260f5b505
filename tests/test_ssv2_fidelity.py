"""Something-Something-V2 as the original read it, and the channel order a
checkpoint carries.

The original extracted SSv2's 12 fps webm videos to JPEGs at 30 fps
(`ffmpeg -r 30`), cut its segments over those, drew the training short side
inverse-uniformly and fed its ViT the BGR pixels cv2 decodes. References
here: a real decode's timestamps, the original's formulas written out, and
the original's equations in torch (`checkpoint_sources.OriginalModel`).
"""

import functools
import json

import av
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers import TimesformerForVideoClassification

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import datasets
from tsformer_jax import evaluation
from tsformer_jax import export
from tsformer_jax import sharding
from tsformer_jax import train
from tsformer_jax import video_io
from tsformer_jax.checkpoints import export as export_lib
from tsformer_jax.checkpoints.formats import hf as hf_format
from tsformer_jax.datasets import video_writer

from checkpoint_sources import OriginalModel
from checkpoint_sources import hf_timesformer
from checkpoint_sources import randomize
from conftest import tiny_config
from conftest import tiny_params
import original_transforms

ATOL = 1e-4  # float32 logits
SSV2_NAMES = tuple(datasets.class_names(config_lib.get_config('divided',
                                                             'ssv2')))


# ----------------------------------------------------------------------------
# The 30 fps grid

def _gray_video(path, count, fps):
  """A video whose frame j is flat gray 20 + 7 j (told apart after lossy
  coding); returns its decoded `(times [F] in seconds, frame ids [F])`."""
  frames = np.stack([np.full((32, 32, 3), 20 + 7 * j, np.uint8)
                     for j in range(count)])
  writer = (video_writer.write_webm if path.endswith('.webm') else
            video_writer.write_mp4)
  writer(path, frames, fps=fps)
  times, ids = [], []
  with av.open(path) as container:
    for frame in container.decode(video=0):
      times.append(float(frame.pts * frame.time_base))
      ids.append(_frame_id(frame.to_ndarray(format='rgb24')))
  return np.array(times), np.array(ids)


def _frame_id(frame):
  return int(np.round((frame.astype(np.float64).mean() - 20) / 7))


def _cfr_grid(times, fps, rate=30.0):
  """What `ffmpeg -r rate` writes, from a decode's timestamps: slot k (at
  k / rate) shows the frame nearest in time (a tie to the later), for the
  slots that end by the last frame's end."""
  end = times[-1] + 1 / fps
  count = int(np.floor(end * rate + 1e-3))
  slots = np.arange(count) / rate
  # Rounded, so that float error breaks no tie; the last of the nearest:
  # reversed, argmin takes the first.
  distance = np.round(np.abs(times[None, :] - slots[:, None]), 9)
  return len(times) - 1 - np.argmin(distance[:, ::-1], axis=1)


@pytest.mark.parametrize('name', ['ssv2.webm', 'ssv2.mp4'])
def test_segments_are_cut_over_the_30fps_frames_of_a_real_decode(tmp_path,
                                                                 name):
  path = str(tmp_path / name)
  times, ids = _gray_video(path, 29, fps=12)
  assert list(ids) == list(range(29))  # Every frame decodes, in order.
  video = video_io.VideoFile(path)
  assert (video.num_frames, video.fps) == (29, 12.0)
  grid = _cfr_grid(times, 12.0)
  assert len(grid) == 72  # 29 / 12 s at 30 fps, the last slot whole.
  np.testing.assert_array_equal(
      clip_lib.resampled_frames(video.num_frames, video.fps, 30.0), grid)
  # The test clip decodes the frames the original's JPEG sequence holds at
  # its segments' midpoints.
  spec = clip_lib.clip_spec(config_lib.get_config('divided', 'ssv2'))
  indices = clip_lib.temporal_indices(video.num_frames, video.fps, spec,
                                      clip=0)
  want = grid[original_transforms.get_seq_frames(len(grid), 8)]
  np.testing.assert_array_equal(indices, want)
  assert [_frame_id(f) for f in video.frames(indices)] == list(want)
  # Over the video's own frames the original would have read others.
  own = clip_lib.temporal_indices(
      29, 12.0, clip_lib.ClipSpec(8, 1, (8, 8), sampling='segments'), clip=0)
  assert list(own) != list(want)
  # Training draws one slot per segment: the frames those slots show.
  rng = np.random.default_rng(0)
  draws = np.stack([clip_lib.temporal_indices(29, 12.0, spec, rng=rng)
                    for _ in range(400)])
  bounds = np.round((len(grid) - 1) / 8 * np.arange(9)).astype(int)
  for column, lo, hi in zip(draws.T, bounds[:-1], bounds[1:], strict=True):
    assert set(column) == set(grid[lo:hi + 1])


@pytest.mark.parametrize('fps', [12.0, 15.0, 24.0, 25.0, 29.97, 30.0, 60.0])
def test_resampled_frames_are_the_nearest_in_time(fps):
  for count in range(1, 60):
    times = np.arange(count) / fps
    want = _cfr_grid(times, fps)
    if not len(want):  # Shorter than one slot: ffmpeg still writes one.
      want = np.array([0])
    np.testing.assert_array_equal(
        clip_lib.resampled_frames(count, fps, 30.0), want,
        err_msg=f'{count} frames at {fps} fps')
  # At 30 fps the grid is the video's own frames.
  np.testing.assert_array_equal(clip_lib.resampled_frames(7, 30.0, 30.0),
                                np.arange(7))


# ----------------------------------------------------------------------------
# Inverse-uniform scale jitter

def test_inverse_uniform_jitter_is_the_originals_draw():
  spec = clip_lib.ClipSpec(8, 1, (224, 224), train_scales=(256, 320),
                           scale_jitter='inverse_uniform')
  for seed in range(50):
    crop = clip_lib.train_crop((240, 427), spec,
                               np.random.default_rng(seed))
    # The original's `random_short_side_scale_jitter`, its first draw.
    theirs = np.random.default_rng(seed).uniform(1.0 / 320, 1.0 / 256)
    assert min(crop.resized) == int(round(1.0 / theirs))
  # Its distribution: P(side <= s) = P(1 / u < s + 1/2), u uniform in
  # [1 / 320, 1 / 256]; 20,000 draws sit within 0.015 of it (a KS bound
  # of 99.9%: 1.95 / sqrt(n) = 0.0138).
  rng = np.random.default_rng(0)
  draws = np.array([clip_lib.draw_short_side(spec, rng)
                    for _ in range(20000)])
  assert draws.min() == 256 and draws.max() == 320
  sides = np.arange(256, 321)
  cdf = np.minimum((1 / 256 - 1 / (sides + 0.5)) / (1 / 256 - 1 / 320), 1)
  empirical = (draws[:, None] <= sides[None]).mean(0)
  assert np.abs(empirical - cdf).max() < 0.015
  # Smaller sides come more often than the uniform draw gives them.
  uniform = clip_lib.ClipSpec(8, 1, (224, 224), train_scales=(256, 320))
  plain = [clip_lib.draw_short_side(uniform, rng) for _ in range(20000)]
  assert draws.mean() < np.mean(plain) - 1.5
  with pytest.raises(ValueError, match=r"scale_jitter 'inverse'; valid: "
                     r"\['uniform', 'inverse_uniform'\]"):
    clip_lib.ClipSpec(8, 1, (8, 8), scale_jitter='inverse')


def test_the_recipes_and_older_configs():
  ssv2 = clip_lib.clip_spec(config_lib.get_config('divided', 'hr,ssv2'))
  assert (ssv2.sampling, ssv2.segment_fps, ssv2.scale_jitter,
          ssv2.channel_order, ssv2.flip) == ('segments', 30.0,
                                             'inverse_uniform', 'bgr', False)
  k400 = clip_lib.clip_spec(config_lib.get_config('divided', 'k400'))
  assert (k400.sampling, k400.segment_fps, k400.scale_jitter,
          k400.channel_order) == ('rate', 0.0, 'uniform', 'rgb')
  # A config saved before these fields reads as those runs ran.
  saved = checkpoints.config_to_json(config_lib.get_config('divided',
                                                           'tiny,ssv2'))
  for key in ('channel_order', 'segment_fps', 'scale_jitter'):
    del saved['data'][key]
  old = checkpoints.config_from_json(saved)
  assert (old.data.channel_order, old.data.segment_fps,
          old.data.scale_jitter) == ('rgb', 0.0, 'uniform')
  with pytest.raises(ValueError, match=r"channel_order 'rbg'; valid: "
                     r"\['rgb', 'bgr'\]"):
    clip_lib.ClipSpec(8, 1, (8, 8), channel_order='rbg')


# ----------------------------------------------------------------------------
# BGR reaches the model

def _uint8_clips(shape, seed=0):
  """Reddish noise: red in [128, 256), green and blue in [0, 128)."""
  clips = np.random.default_rng(seed).integers(0, 128, shape, np.uint8)
  clips[..., 0] += 128
  return clips


def _normalised(clips, config, reverse):
  x = clips[..., ::-1] if reverse else clips
  x = x.astype(np.float32) / 255
  return (x - np.float32(config.data.mean)) / np.float32(config.data.std)


CFG = """\
TRAIN:
  DATASET: {dataset}
DATA:
  NUM_FRAMES: 4
  TRAIN_CROP_SIZE: 32
MODEL:
  ARCH: vit
  NUM_CLASSES: 10
TIMESFORMER:
  ATTENTION_TYPE: divided_space_time
  NUM_HEADS: 4
"""


def _original_pyth(path, dataset):
  reference = randomize(OriginalModel(tiny_config().model), 0)
  torch.save({'epoch': 15, 'model_state': reference.state_dict(),
              'cfg': CFG.format(dataset=dataset)}, path)
  return reference.model


def _torch_logits(reference, clips):
  with torch.no_grad():
    return reference(torch.from_numpy(np.ascontiguousarray(clips))).numpy()


def test_an_original_ssv2_pyth_predicts_on_bgr_pixels(tmp_path):
  reference = _original_pyth(tmp_path / 'ssv2.pyth', 'ssv2')
  config, params = tsformer_jax.load_checkpoint(tmp_path / 'ssv2.pyth')
  assert (config.data.dataset, config.data.channel_order) == ('ssv2', 'bgr')
  clips = _uint8_clips((2, 4, 32, 32, 3))
  forward = jax.jit(evaluation.forward_fn(config))
  scores = np.asarray(forward(params, clips)['scores'])
  want = _torch_logits(reference, _normalised(clips, config, reverse=True))
  rgb = _torch_logits(reference, _normalised(clips, config, reverse=False))
  # The order moves the logits far beyond the tolerance.
  assert np.abs(want - rgb).max() > 100 * ATOL
  np.testing.assert_allclose(
      np.log(scores), jax.nn.log_softmax(jnp.asarray(want)), atol=ATOL,
      rtol=0)
  # predict's path: views of a video, scores averaged over them.
  video = clip_lib.ArrayVideo(_uint8_clips((20, 40, 48, 3), seed=1))
  prediction, = evaluation.predict_videos(config, params, [video],
                                          batch_size=3)
  views = clip_lib.eval_clips(video, clip_lib.clip_spec(config))
  want = jax.nn.softmax(_torch_logits(
      reference, _normalised(views, config, reverse=True))).mean(0)
  np.testing.assert_allclose(prediction.scores, want, atol=1e-5, rtol=0)
  # A Kinetics .pyth takes RGB.
  _original_pyth(tmp_path / 'k400.pyth', 'kinetics')
  config, _ = tsformer_jax.load_checkpoint(tmp_path / 'k400.pyth')
  assert config.data.channel_order == 'rgb'


def _fake_state(config):
  """A linear model of each clip's mean colour: channel order shows."""
  def apply_fn(variables, clips, train=False, rngs=None):
    del train, rngs
    return clips.mean(axis=(1, 2, 3)) @ variables['params']['w']
  w = jnp.asarray(np.random.default_rng(0).normal(
      size=(3, config.model.num_classes)), jnp.float32)
  return train.TrainState.create(apply_fn=apply_fn, params={'w': w},
                                 tx=optax.sgd(0.1))


def test_train_and_eval_steps_normalise_in_the_configs_order():
  bgr = tiny_config()
  bgr.data.channel_order = 'bgr'
  bgr.grad_accum_steps = 1
  rgb = tiny_config()
  rgb.grad_accum_steps = 1
  state = _fake_state(bgr)
  clips = _uint8_clips((2, 4, 32, 32, 3))
  labels = np.array([1, 3], np.int32)

  def step(config, x):
    fn = jax.jit(functools.partial(
        train.train_step, config=config,
        schedule=train.learning_rate_schedule(config, 10)))
    new, metrics = fn(state, dict(clips=x, labels=labels), jax.random.key(0))
    return float(metrics['loss']), np.asarray(new.params['w'])

  loss, w = step(bgr, clips)
  want_loss, want_w = step(rgb, np.ascontiguousarray(clips[..., ::-1]))
  assert loss == want_loss
  np.testing.assert_array_equal(w, want_w)
  assert abs(step(rgb, clips)[0] - loss) > 1e-3
  # Evaluation: views of videos [B, V, T, H, W, 3].
  views = _uint8_clips((8, 3, 4, 32, 32, 3), seed=2)
  batch = dict(labels=np.arange(8, dtype=np.int32) % 10,
               mask=np.ones(8, bool))

  def evaluate(config, x):
    mesh = sharding.create_mesh(config)
    fn = evaluation.jit_eval_step(config, state.params, state.apply_fn,
                                  mesh)
    return {k: float(v) for k, v in fn(state.params,
                                       dict(batch, clips=x)).items()}

  got = evaluate(bgr, views)
  assert got == evaluate(rgb, np.ascontiguousarray(views[..., ::-1]))
  assert got['loss'] != evaluate(rgb, views)['loss']


def test_host_normalisation_follows_the_order():
  frames = _uint8_clips((2, 8, 8, 3))
  bgr = clip_lib.ClipSpec(2, 1, (8, 8), channel_order='bgr',
                          mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
  rgb = clip_lib.ClipSpec(2, 1, (8, 8), mean=(0.4, 0.5, 0.6),
                          std=(0.2, 0.25, 0.3))
  np.testing.assert_array_equal(clip_lib.normalize(frames, bgr),
                                clip_lib.normalize(frames[..., ::-1], rgb))
  np.testing.assert_allclose(
      clip_lib.device_normalize(jnp.asarray(frames), bgr.mean, bgr.std,
                                'bgr'),
      clip_lib.normalize(frames, bgr), rtol=1e-6, atol=1e-6)


def test_hugging_face_ssv2_models_take_bgr(tmp_path):
  kwargs = dict(num_frames=2, image_size=32, patch_size=16, hidden_size=32,
                num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64)
  ssv2 = hf_timesformer(0, id2label=dict(enumerate(SSV2_NAMES)),
                        label2id={n: i for i, n in enumerate(SSV2_NAMES)},
                        **kwargs)
  ssv2.save_pretrained(tmp_path / 'ssv2')
  config, _ = tsformer_jax.load_checkpoint(tmp_path / 'ssv2')
  assert (config.data.channel_order, config.data.dataset,
          config.data.sampling, config.model.num_classes) == (
              'bgr', 'ssv2', 'segments', 174)
  # Named as the Hub's, labels aside; Kinetics' labels: RGB.
  hf_json = json.loads((tmp_path / 'ssv2' / 'config.json').read_text())
  del hf_json['id2label'], hf_json['label2id']
  hf_json['num_labels'] = 174
  assert checkpoints.config_from_hf(hf_json).data.channel_order == 'rgb'
  hf_json['_name_or_path'] = 'facebook/timesformer-base-finetuned-ssv2'
  assert checkpoints.config_from_hf(hf_json).data.channel_order == 'bgr'
  names = [f'class {i}' for i in range(174)]
  assert not hf_format.is_ssv2({'id2label': dict(enumerate(names))})
  # An explicit key wins.
  hf_json['channel_order'] = 'rgb'
  assert checkpoints.config_from_hf(hf_json).data.channel_order == 'rgb'
  hf_json['channel_order'] = 'RGB'
  with pytest.raises(ValueError, match=r"channel_order 'RGB'; valid: "):
    checkpoints.config_from_hf(hf_json)


def _bgr_config(dataset='ssv2'):
  config = config_lib.get_config('divided', f'tiny,{dataset}')
  config.model.update(num_classes=10, num_frames=4)
  config.data.channel_order = 'bgr'
  return config


def test_orbax_keeps_the_order(tmp_path):
  config = _bgr_config()
  params = tiny_params()
  path = checkpoints.save_checkpoint(str(tmp_path / 'ckpt'), config, params)
  loaded, got = tsformer_jax.load_checkpoint(path)
  assert loaded.data.channel_order == 'bgr'
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_export_writes_the_order_where_pytorch_users_see_it(tmp_path,
                                                            capsys):
  config, params = _bgr_config(), tiny_params()
  out = export_lib.write_hf(tmp_path / 'hf', config, params)
  hf_json = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert hf_json['channel_order'] == 'bgr'
  hf_model = TimesformerForVideoClassification.from_pretrained(out)
  assert hf_model.config.channel_order == 'bgr'
  assert tsformer_jax.load_checkpoint(out)[0].data.channel_order == 'bgr'
  # The .pyth: ssv2 implies BGR, as the original's; other orders are keyed.
  cases = [('ssv2', 'bgr', None), ('ssv2', 'rgb', 'rgb'),
           ('kinetics400', 'bgr', 'bgr'), ('kinetics400', 'rgb', None)]
  for dataset, order, key in cases:
    config = _bgr_config(dataset)
    config.data.channel_order = order
    path = export_lib.write_pyth(tmp_path / f'{dataset}_{order}.pyth',
                                 config, params)
    cfg = torch.load(path, weights_only=True)['cfg']
    if key:
      assert f'  CHANNEL_ORDER: {key}\n' in cfg
    else:
      assert 'CHANNEL_ORDER' not in cfg
    assert f'# Pixels: {order.upper()}' in cfg
    loaded, _ = tsformer_jax.load_checkpoint(path)
    assert loaded.data.channel_order == order, (dataset, order)
    assert loaded.data.scale_jitter == config.data.scale_jitter
  # The CLI says which pixels to give the model.
  src = checkpoints.save_checkpoint(str(tmp_path / 'src'), _bgr_config(),
                                    params)
  assert cli.call(export.main, ['export', src, str(tmp_path / 'cli'),
                                '--to=pyth']) == 0
  assert capsys.readouterr().out.splitlines()[-1] == (
      'Pixels: BGR (the channels of RGB frames reversed, as cv2 decodes '
      'them), normalised (x / 255 - [0.45, 0.45, 0.45]) / [0.225, 0.225, '
      '0.225].')


def test_a_config_that_overrides_the_order_is_warned_of(tmp_path, caplog):
  path = checkpoints.save_checkpoint(str(tmp_path / 'ckpt'), _bgr_config(),
                                     tiny_params())
  rgb = _bgr_config()
  rgb.data.channel_order = 'rgb'
  config, _ = tsformer_jax.load_checkpoint(path, rgb)
  assert config.data.channel_order == 'rgb'
  assert any('takes BGR pixels but config.data.channel_order is \'rgb\''
             in r.getMessage() for r in caplog.records)
