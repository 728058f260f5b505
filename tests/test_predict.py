"""Prediction on video files and the long-video protocol (clips averaged)."""

import copy
import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import evaluation
from tsformer_jax import long_video
from tsformer_jax import predict
from tsformer_jax import video_io
from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import video_writer

from conftest import apply

ROOT = pathlib.Path(__file__).parent.parent
# The demo's clips: 8 frames at rate 2 span 16 frames at 30 fps.
SPAN = 16


def _write(path, frames, fps=30.0):
  video_writer.write_mp4(str(path), frames, fps)
  return str(path)


def _long_frames(parts, extra=0):
  """Test videos 0..parts-1 of synthetic_motion one after the other, and
  `extra` frames of the next."""
  frames = [synthetic_motion.generate('test', i)[0] for i in range(parts + 1)]
  return np.concatenate(frames)[:parts * SPAN + extra]


@pytest.fixture(scope='module')
def demo(demo_workdir):
  return checkpoints.load_checkpoint(str(demo_workdir / 'checkpoints'))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Three demo test videos, a corrupt file and an empty one, mixed."""
  root = tmp_path_factory.mktemp('videos')
  good = [_write(root / f'{i}.mp4', synthetic_motion.generate('test', i)[0])
          for i in range(3)]
  corrupt, empty = root / 'corrupt.mp4', root / 'empty.mp4'
  corrupt.write_bytes(b'\x00\x00\x00\x18ftypmp42' + bytes(range(256)) * 4)
  empty.write_bytes(b'')
  return [good[0], str(corrupt), good[1], good[2], str(empty)]


def _eval_scores(config, params, path):
  """Evaluation's path: all test views, model, and the default view scores
  ('logit_sum'), the softmax of the views' mean logits: `[C]`."""
  assert config.data.test_view_scores == 'logit_sum'
  views = clip_lib.eval_views(video_io.VideoFile(path),
                              clip_lib.clip_spec(config))
  logits = apply(tsformer_jax.create_model(config), params, views)
  return np.asarray(jax.nn.softmax(np.asarray(logits).mean(0)))


def _features(config, params, path):
  """Per-view features of `model.apply` with num_classes = 0: `[V, D]`."""
  config = copy.deepcopy(config)
  config.model.num_classes = 0
  views = clip_lib.eval_views(video_io.VideoFile(path),
                              clip_lib.clip_spec(config))
  headless = {k: v for k, v in params.items() if k != 'head'}
  return np.asarray(apply(tsformer_jax.create_model(config), headless, views))


def test_prediction_equals_evaluation_and_reports_bad_files(demo, files):
  config, params = demo
  # Batches of 2 views: videos share batches and the last one is padded.
  results = evaluation.predict_videos(config, params, files, batch_size=2)
  assert [r.path for r in results] == files
  for result in results:
    if 'corrupt' in result.path or 'empty' in result.path:
      assert result.scores is None and result.path in result.error
      continue
    assert result.error is None
    expected = _eval_scores(config, params, result.path)
    np.testing.assert_allclose(result.scores, expected, atol=1e-5)
    assert result.top_k(1)[0][0] == int(np.argmax(expected))
    assert len(result.clip) == config.data.test_num_clips * \
        config.data.test_num_crops


def test_stride_clips_cover_the_video_end_to_end():
  spec = clip_lib.clip_spec(config_lib.get_config('divided', 'demo'))

  def starts(frames, fps, **coverage):
    indices = long_video.clip_indices(frames, fps, spec,
                                      long_video.Coverage(**coverage))
    return indices[:, 0].tolist(), indices

  # A stride of one span: back to back, the last clip ending at the end.
  assert starts(64, 30.0, stride_seconds=SPAN / 30)[0] == [0, 16, 32, 48]
  assert starts(70, 30.0, stride_frames=16)[0] == [0, 16, 32, 48, 54]
  # Half a span: overlapping clips.
  assert starts(40, 30.0, stride_frames=8)[0] == [0, 8, 16, 24]
  # At 15 fps a clip spans 8 source frames; the stride is 7.5 frames.
  first, indices = starts(40, 15.0, stride_seconds=0.5)
  assert first == [0, 7, 15, 22, 30, 32]
  np.testing.assert_array_equal(indices[1], [7, 8, 9, 10, 11, 12, 13, 14])
  # Clip at 16 of a 16-frame span: linspace(16, 31, 8), truncated.
  np.testing.assert_array_equal(starts(64, 30.0, stride_frames=16)[1][1],
                                [16, 18, 20, 22, 24, 26, 28, 31])
  # Shorter than a clip: one clip repeating the last frame.
  first, indices = starts(10, 30.0, stride_frames=16)
  assert first == [0] and indices.max() == 9
  for frames, fps, stride in [(64, 30.0, 16), (70, 30.0, 16), (301, 25.0, 9),
                              (1000, 30.0, 3.3)]:
    indices = long_video.clip_indices(
        frames, fps, spec, long_video.Coverage(stride_frames=stride))
    span = long_video.clip_span(fps, spec)
    assert indices[0, 0] == 0 and indices[-1, -1] == frames - 1
    assert (np.diff(indices[:, 0]) <= span).all()  # No frame left out.
    assert (np.diff(indices, axis=1) >= 0).all()
  # A number of clips: the paper's placement, first frame to last, also
  # where evaluation places its clips as the original code does.
  for positions in ('paper', 'original'):
    indices = long_video.clip_indices(
        70, 30.0, dataclasses.replace(spec, clip_positions=positions),
        long_video.Coverage(num_clips=3))
    assert indices[:, 0].tolist() == [0, 27, 54] and indices[-1, -1] == 69
  segments = dataclasses.replace(spec, sampling='segments')
  with pytest.raises(ValueError, match='number of clips'):
    long_video.clip_indices(70, 30.0, segments,
                            long_video.Coverage(stride_frames=16))
  with pytest.raises(ValueError, match='exactly one'):
    long_video.Coverage(num_clips=2, stride_frames=16)


def test_one_pass_decoding_equals_decoding_each_clip(tmp_path):
  path = _write(tmp_path / 'v.mp4', _long_frames(1, extra=4))  # 20 frames
  # Overlapping, out of order, repeated and past the end (the last frame).
  rows = np.array([[0, 2, 4], [10, 11, 12], [1, 1, 3], [18, 19, 25],
                   [5, 30, 2], [3, 4, 5]])
  clips = dict(long_video.decode_clips(path, rows))
  assert sorted(clips) == list(range(len(rows)))
  for k, row in enumerate(rows):
    np.testing.assert_array_equal(clips[k], video_io.decode(path, row))


def _fake_logits(clips):
  """A model whose logits are the clip's mean colour, times 4."""
  return 4 * np.asarray(clips).mean(axis=(1, 2, 3))  # [B, 3]


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_long_videos_combine_clip_scores_across_batches(tmp_path):
  config = config_lib.get_config('divided', 'demo')
  spec = clip_lib.clip_spec(config)
  videos = [
      _write(tmp_path / 'long.mp4', _long_frames(4, extra=6)),  # 70 frames
      _write(tmp_path / 'short.mp4', _long_frames(1)),
      str(tmp_path / 'missing.mp4'),
      _write(tmp_path / 'three.mp4', _long_frames(3)),
      clip_lib.ArrayVideo(_long_frames(2)[::-1].copy()),
  ]
  starts = [[0, 16, 32, 48, 54], [0], None, [0, 16, 32], [0, 16]]
  calls = []

  def forward(params, clips):
    # Clips arrive as pixel values (float32 from the original's resize);
    # the model's forward normalises them.
    assert clips.dtype == np.float32 and clips.max() > 1
    clips = clip_lib.normalize(clips, spec)
    calls.append(len(clips))
    logits = _fake_logits(clips)
    return dict(logits=logits, scores=_softmax(logits),
                features=np.asarray(clips)[:, :, 5, 7, :].reshape(
                    len(clips), -1))

  results = evaluation.predict_videos(
      config, None, videos, batch_size=3, forward=forward,
      coverage=long_video.Coverage(stride_seconds=SPAN / 30))
  assert calls == [3, 3, 3, 3]  # 11 views in fixed batches, the last padded.
  assert 'missing.mp4' in results[2].error and results[2].scores is None
  for video, result, first in zip(videos, results, starts, strict=True):
    if first is None:
      continue
    video = (video_io.VideoFile(video) if isinstance(video, str)
             else video)
    clips = []
    for s in first:  # Independently: 8 frames evenly over the 16 from s.
      indices = np.linspace(s, s + SPAN - 1, 8).astype(int)
      clips.append(clip_lib.normalize(video.frames(indices), spec))
    clips = np.stack(clips)  # 32 x 32 frames: the crop is the frame.
    assert result.error is None and result.start.tolist() == first
    assert result.clip.tolist() == list(range(len(first)))
    logits = _fake_logits(clips)
    np.testing.assert_allclose(result.view_logits, logits, atol=1e-6)
    np.testing.assert_allclose(result.view_scores, _softmax(logits),
                               atol=1e-6)
    # The default 'logit_sum': the softmax of the clips' mean logits.
    np.testing.assert_allclose(result.logits, logits.mean(0), atol=1e-6)
    np.testing.assert_allclose(result.scores, _softmax(logits.mean(0)),
                               atol=1e-6)
    np.testing.assert_allclose(
        result.features, clips[:, :, 5, 7, :].reshape(len(first), -1).mean(0),
        atol=1e-6)


def test_cli_writes_json_and_features(demo, demo_workdir, files, tmp_path,
                                      capsys):
  config, params = demo
  out = tmp_path / 'features.npz'
  status = cli.call(predict.main, [
      'predict', f'--checkpoint={demo_workdir}/checkpoints', *files,
      '--json', f'--features_out={out}', '--batch_size=2'])
  captured = capsys.readouterr()
  assert status == 1  # Two files could not be read.
  errors = captured.err.strip().splitlines()
  assert len(errors) == 2
  assert files[1] in errors[0] and files[4] in errors[1]
  document = json.loads(captured.out)
  good = [0, 2, 3]
  for i, video in enumerate(document['videos']):
    assert video['path'] == files[i]
    if i not in good:
      assert video['error'] and not video['top_k']
      continue
    expected = _eval_scores(config, params, files[i])
    assert [t['index'] for t in video['top_k']] == \
        np.argsort(-expected).tolist()  # top_k 5, clipped to 2 classes.
    assert [t['label'] for t in video['top_k']] == [
        synthetic_motion.CLASSES[j] for j in np.argsort(-expected)]
    np.testing.assert_allclose([t['probability'] for t in video['top_k']],
                               np.sort(expected)[::-1], atol=1e-5)

  arrays = np.load(out)  # No pickles: every array is numeric or text.
  assert arrays['paths'].tolist() == files
  assert np.isnan(arrays['video_features'][[1, 4]]).all()
  assert arrays['clip_video'].tolist() == good
  assert arrays['clip_start'].tolist() == [0, 0, 0]
  for i in good:
    features = _features(config, params, files[i])
    rows = arrays['clip_video'] == i
    np.testing.assert_allclose(arrays['clip_features'][rows], features,
                               atol=1e-5)
    np.testing.assert_allclose(arrays['video_features'][i],
                               features.mean(0), atol=1e-5)
    np.testing.assert_allclose(arrays['video_scores'][i],
                               _eval_scores(config, params, files[i]),
                               atol=1e-5)
  # Probabilities are the softmax of the logits: each view's, and each
  # video's of its views' mean ('logit_sum').
  np.testing.assert_allclose(arrays['clip_scores'],
                             _softmax(arrays['clip_logits']), atol=1e-6)
  np.testing.assert_allclose(arrays['video_scores'][good],
                             _softmax(arrays['video_logits'][good]),
                             atol=1e-6)

  # Good files only, text, two clips each: exit status 0.
  status = cli.call(predict.main, [
      'predict', f'--checkpoint={demo_workdir}/checkpoints', files[0],
      files[2], '--clips=2'])
  lines = capsys.readouterr().out.strip().splitlines()
  assert status == 0
  assert lines[0] == f'{files[0]} (2 views)' and len(lines) == 6
  assert {line.split()[-1] for line in lines[1:3]} == set(
      synthetic_motion.CLASSES)


_TAKES = '(it takes: --checkpoint, --json, --overwrite, and those predict ' \
    '--help lists).'


@pytest.mark.parametrize('flags, message', [
    # Shared flags that predict would ignore: --features_out was meant.
    (['--out={tmp}/guess.npz'], f'--out is not a flag of predict {_TAKES}'),
    (['--format=hf', '--mode=eval'],
     f'--format, --mode are not flags of predict {_TAKES}'),
    # convert's and export's: predict reads the checkpoint as it is.
    (['--adapt', '--num_classes=3'],
     f'--num_classes, --adapt are not flags of predict {_TAKES}'),
    ([f'--config={ROOT}/configs/divided.py:tiny', '--config.model.depth=2'],
     f'--config is not a flag of predict {_TAKES}'),
    (['--clip_stride=0'], 'flag --clip_stride=0.0: must be above 0 seconds.'),
    (['--clip_stride=-2'],
     'flag --clip_stride=-2.0: must be above 0 seconds.'),
    (['--view_scores=max'], 'flag --view_scores=max: value should be one of '
     '<logit_sum|softmax_mean>'),
    (['--features_out={tmp}/feats'], '--features_out={tmp}/feats: name an '
     '.npz file, e.g. --features_out={tmp}/feats.npz.'),
    (['--features_out={tmp}/no/feats.npz'], '--features_out={tmp}/no/'
     'feats.npz: there is no folder {tmp}/no; create it first.'),
    (['--features_out={tmp}/old.npz'], '--features_out={tmp}/old.npz '
     'exists: pass --overwrite to replace it.'),
    # Accepted: the checkpoint, read next, is what fails.
    (['--features_out={tmp}/old.npz', '--overwrite'],
     '{tmp}/none: no such file or directory.'),
])
def test_cli_refuses_flags_it_cannot_honour_before_any_compute(
    tmp_path, capsys, flags, message):
  (tmp_path / 'old.npz').write_bytes(b'kept')
  flags = [flag.format(tmp=tmp_path) for flag in flags]
  status = cli.call(predict.main, [
      'predict', f'--checkpoint={tmp_path}/none', f'{tmp_path}/a.mp4',
      *flags])
  lines = capsys.readouterr().err.strip().splitlines()
  assert status == (1 if '--overwrite' in flags else 2)
  assert len(lines) == 1 and lines[0].startswith(
      'predict: error: ' + message.format(tmp=tmp_path)), lines
  assert (tmp_path / 'old.npz').read_bytes() == b'kept'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['old.npz']


def test_clips_and_crops_are_evaluations_views():
  config = config_lib.get_config('divided', 'demo')
  spec = dataclasses.replace(clip_lib.clip_spec(config), num_clips=2,
                             num_crops=3)
  # Landscape frames, so that the left, centre and right crops differ.
  frames = np.concatenate([_long_frames(3), _long_frames(3)[:, :, ::-1]], 2)
  video = clip_lib.ArrayVideo(frames[:, :, 8:56].copy())
  def forward(params, clips):
    logits = _fake_logits(clip_lib.normalize(clips, spec))
    return dict(logits=logits, scores=_softmax(logits))

  result, = evaluation.predict_videos(
      config, None, [video], batch_size=4, forward=forward,
      coverage=long_video.Coverage(num_clips=2, num_crops=3))
  assert result.clip.tolist() == [0, 0, 0, 1, 1, 1]
  assert result.crop.tolist() == [0, 1, 2, 0, 1, 2]
  assert result.start.tolist() == [0, 0, 0, 32, 32, 32]
  logits = _fake_logits(clip_lib.eval_views(video, spec))
  expected = _softmax(logits)
  assert np.ptp(expected, axis=0).min() > 1e-3  # The views differ.
  np.testing.assert_allclose(result.view_scores, expected, atol=1e-6)
  np.testing.assert_allclose(result.scores, _softmax(logits.mean(0)),
                             atol=1e-6)


@pytest.mark.parametrize('method', ['logit_sum', 'softmax_mean'])
def test_views_combine_as_the_config_says(method):
  """`data.test_view_scores`: the softmax of the views' mean logits
  ('logit_sum', ranking as the original's sum of logits) or the views'
  softmaxes averaged ('softmax_mean'), on views where the two disagree."""
  config = config_lib.get_config('divided', 'demo')
  config.data.test_view_scores = method
  # Views favour class 2 twice, class 0 once strongly: the logits sum to
  # [5, 0, 4], the softmaxes average to [0.40, 0.04, 0.56].
  logits = np.float32([[0, 0, 2], [0, 0, 2], [5, 0, 0]])
  forward = lambda params, clips: dict(logits=logits, scores=_softmax(logits))
  result, = evaluation.predict_videos(
      config, None, [clip_lib.ArrayVideo(_long_frames(3))], batch_size=3,
      forward=forward, coverage=long_video.Coverage(num_clips=3))
  probs = {'logit_sum': _softmax(logits.mean(0)),
           'softmax_mean': _softmax(logits).mean(0)}[method]
  np.testing.assert_allclose(result.scores, probs, rtol=1e-6)
  np.testing.assert_allclose(result.logits, logits.mean(0), rtol=1e-6)
  np.testing.assert_array_equal(result.view_logits, logits)
  assert [c for c, _ in result.top_k(3)] == {
      'logit_sum': [0, 2, 1], 'softmax_mean': [2, 0, 1]}[method]

  config.data.test_view_scores = 'mean'
  with pytest.raises(ValueError, match=r"Unknown data.test_view_scores "
                     r"'mean'; valid: \['logit_sum', 'softmax_mean'\]"):
    evaluation.predict_videos(config, None, [], forward=forward)


class _MeanColourModel:
  """A model whose logits are 4 x each clip's mean colour."""

  @staticmethod
  def apply(variables, clips, **kwargs):
    del variables, kwargs
    return 4 * clips.mean(axis=(1, 2, 3))


def test_forward_and_eval_step_normalise_pixel_clips_on_the_device(
    monkeypatch):
  """Pixel values through the forward (predict) and the eval step, uint8 or
  float32 (the original's resize), give what host-normalised clips give."""
  monkeypatch.setattr(evaluation.model_lib, 'create_model',
                      lambda config: _MeanColourModel())
  config = config_lib.get_config('divided', 'tiny')
  config.data.mean, config.data.std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  spec = clip_lib.clip_spec(config)
  clips = np.random.default_rng(0).integers(0, 256, (3, 4, 16, 16, 3),
                                            np.uint8)
  pixels = clips.astype(np.float32)
  forward = jax.jit(evaluation.forward_fn(config))
  scores = forward(None, clips)['scores']
  np.testing.assert_allclose(
      scores, _softmax(_fake_logits(clip_lib.normalize(clips, spec))),
      rtol=1e-5)
  np.testing.assert_allclose(forward(None, pixels)['scores'], scores,
                             rtol=1e-5)
  batch = dict(labels=np.array([0, 1, 2]), mask=np.ones(3, bool))
  step = jax.jit(lambda clips: evaluation.eval_step(
      None, dict(batch, clips=clips[:, None]),
      apply_fn=_MeanColourModel.apply, mean=spec.mean, std=spec.std))
  sums, expected = step(clips), step(pixels)
  assert float(sums['count']) == 3
  for key in sums:
    np.testing.assert_allclose(sums[key], expected[key], rtol=1e-5)


@pytest.mark.parametrize('positions', clip_lib.CLIP_POSITIONS)
def test_evaluation_coverage_places_clips_as_evaluation(positions):
  """predict's default views sit where evaluation's do, 'original' too;
  --clips=N spans the whole video whatever the config."""
  spec = clip_lib.ClipSpec(num_frames=4, sampling_rate=8, crop_size=(32, 32),
                           num_clips=3, clip_positions=positions)
  views = long_video.clip_indices(300, 30.0, spec,
                                  long_video.Coverage.evaluation(spec))
  expected = [clip_lib.temporal_indices(300, 30.0, spec, clip=k)
              for k in range(3)]
  np.testing.assert_array_equal(views, np.stack(expected))
  whole = long_video.clip_indices(300, 30.0, spec,
                                  long_video.Coverage(num_clips=3))
  assert whole[-1, -1] == 299
