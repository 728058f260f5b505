"""Evaluation: multi-view scores, metrics, and both evaluation paths (views
in batches, and the long-video protocol) against independent references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tsformer_jax
from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import evaluation
from tsformer_jax import input_pipeline
from tsformer_jax import sharding

from conftest import ListSource


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize('method', ['logit_sum', 'softmax_mean'])
def test_multi_view_scores_follow_their_formulas(method):
  """`eval_step`, and `jit_eval_step` with `config.data.test_view_scores`:
  'logit_sum' ranks by the views' summed logits (the original's test
  meter) with the loss of the softmax of their mean, 'softmax_mean' by the
  averaged softmaxes. A fake model's logits are the clip's first pixels."""
  def apply_fn(variables, clips):
    del variables
    return clips.reshape(clips.shape[0], -1)[:, :3]

  # Video 0: views favour class 2 twice, class 0 once strongly: the logits
  # sum to [5, 0, 4] (class 0), the softmaxes average to [0.40, 0.04, 0.56]
  # (class 2). Video 1: padding. Float clips: pixel values, normalised
  # with mean 0 and std 1 / 255 to themselves.
  views = np.zeros((2, 3, 3), np.float32)
  views[0] = [[0, 0, 2], [0, 0, 2], [5, 0, 0]]
  probs = {'logit_sum': _softmax(views[0].mean(0)),
           'softmax_mean': _softmax(views[0]).mean(0)}[method]
  best = {'logit_sum': 0, 'softmax_mean': 2}[method]
  assert int(np.argmax(probs)) == best
  config = config_lib.get_config('divided', 'tiny')
  config.data.update(mean=(0.0,) * 3, std=(1 / 255,) * 3,
                     test_view_scores=method)
  config.eval_batch_size = 2
  steps = [functools.partial(evaluation.eval_step, apply_fn=apply_fn,
                             mean=config.data.mean, std=config.data.std,
                             view_scores=method),
           evaluation.jit_eval_step(config, {}, apply_fn,
                                    sharding.create_mesh(config))]
  for step in steps:
    for label in range(3):
      batch = dict(clips=views, labels=np.array([label, 1]),
                   mask=np.array([True, False]))
      sums = step({}, batch)
      assert float(sums['count']) == 1
      assert float(sums['top1']) == (label == best)
      assert float(sums['top5']) == 1
      np.testing.assert_allclose(float(sums['loss']), -np.log(probs[label]),
                                 rtol=1e-5)


def test_unknown_view_scores_name_the_valid_ones():
  config = config_lib.get_config('divided', 'tiny')
  config.data.test_view_scores = 'mean'
  with pytest.raises(ValueError, match=r"Unknown data.test_view_scores "
                     r"'mean'; valid: \['logit_sum', 'softmax_mean'\]"):
    evaluation.jit_eval_step(config, {}, None, sharding.create_mesh(config))


def test_ties_and_nan_scores_are_no_hits():
  """Uniform scores (a collapsed model, bf16 ties) and NaN ones count as
  wrong, not right; a lone top score still counts."""
  scores = jnp.array([[0.25] * 4,                      # a 4-way tie
                      [jnp.nan] * 4,                   # a NaN model
                      [0.1, 0.6, 0.2, 0.1],            # right
                      [0.4, 0.4, 0.1, 0.1]])           # tied with class 0
  sums = evaluation.video_metrics(scores, jnp.array([0, 0, 1, 1]),
                                  jnp.ones(4, bool))
  assert float(sums['count']) == 4
  assert float(sums['top1']) == 1  # Video 2 only.
  # Top-5 of 4 classes: every finite video.
  assert float(sums['top5']) == 3


def test_summarize_divides_the_sums_by_the_videos():
  sums = dict(count=jnp.float32(4), top1=jnp.float32(1),
              top5=jnp.float32(3), loss=jnp.float32(2))
  assert evaluation.summarize(sums) == dict(top1=0.25, top5=0.75, loss=0.5,
                                            videos=4.0)
  for nothing in (None, dict(sums, count=jnp.float32(0))):
    with pytest.raises(clip_lib.BadVideoError,
                       match=r'^No evaluation video could be read\.$'):
      evaluation.summarize(nothing)


def _tiny_eval_config(**data):
  """The tiny model, one centre crop per clip, 4 frames 2 apart at 30 fps
  (a clip spans 8 frames), loaded by one thread."""
  config = config_lib.get_config('divided', 'tiny')
  config.data.update(test_num_crops=1, sampling_rate=2, target_fps=30.0,
                     num_workers=1, worker_type='thread', **data)
  config.eval_batch_size = 4
  return config


def _logits(model, params, spec, video, starts):
  """Independently: the clips at `starts` (4 frames at rate 2: offsets
  linspace(0, 7, 4) truncated), centre-cropped after the short-side
  resize; float64 logits `[len(starts), C]`."""
  clips = np.stack([
      clip_lib.normalize(clip_lib.eval_crops(
          video.array[s + np.array([0, 2, 4, 7])], spec)[0], spec)
      for s in starts])
  return np.asarray(model.apply({'params': params}, clips), np.float64)


@pytest.mark.slow
def test_long_videos_are_evaluated_whole_with_combined_clip_scores():
  config = _tiny_eval_config(test_clip_stride=0.5)
  params = tsformer_jax.init_params(config, jax.random.key(0))
  model = tsformer_jax.create_model(config)
  rng = np.random.default_rng(0)
  lengths = [100, 8, 47]  # 30 fps: a clip spans 8 frames, stride 15.
  videos = [clip_lib.ArrayVideo(
      rng.integers(0, 255, (n, 40, 48, 3), np.uint8)) for n in lengths]
  labels = [3, 1, 7]
  skipped = input_pipeline.SkipCounter()
  metrics = evaluation.evaluate(config, params, model.apply,
                                ListSource(videos + [None], labels + [0]),
                                skipped)
  # Clips at 0, 15, 30, ... and one ending on the last frame.
  spec = clip_lib.clip_spec(config)
  expected_nll, expected_top1 = [], []
  for video, label, n in zip(videos, labels, lengths, strict=True):
    starts = list(range(0, n - 8 + 1, 15))
    if starts[-1] != n - 8:
      starts.append(n - 8)
    # The default 'logit_sum': ranked by the clips' summed logits, the loss
    # from the softmax of their mean.
    logits = _logits(model, params, spec, video, starts)
    expected_nll.append(-np.log(_softmax(logits.mean(0))[label]))
    expected_top1.append(np.argmax(logits.sum(0)) == label)
  assert metrics['videos'] == 3 and len(skipped) == 1
  np.testing.assert_allclose(metrics['loss'], np.mean(expected_nll),
                             rtol=1e-4)
  assert metrics['top1'] == np.mean(expected_top1)


@pytest.mark.slow
def test_both_evaluation_paths_give_the_same_results_for_the_same_clips():
  """Videos one clip long: multi-view testing (one clip, one crop) and the
  long-video protocol both take the clip at frame 0, so they report the
  same metrics, each equal to the reference's; a failing video is skipped
  by both."""
  rng = np.random.default_rng(1)
  videos = [clip_lib.ArrayVideo(rng.integers(0, 255, (8, 40, 48, 3),
                                             np.uint8)) for _ in range(5)]
  labels = [3, 1, 7, 0, 9]
  source = ListSource(videos + [None], labels + [0])
  batched = _tiny_eval_config(test_num_clips=1)
  params = tsformer_jax.init_params(batched, jax.random.key(0))
  model = tsformer_jax.create_model(batched)
  logits = np.concatenate([
      _logits(model, params, clip_lib.clip_spec(batched), v, [0])
      for v in videos])  # [videos, C]
  rank = (logits >= logits[np.arange(5), labels][:, None]).sum(-1) - 1
  expected = dict(
      top1=np.mean(rank < 1), top5=np.mean(rank < 5),
      loss=np.mean(-np.log(_softmax(logits)[np.arange(5), labels])),
      videos=5.0)
  assert 0 < expected['top5'] < 1  # Both outcomes occur.
  for config in (batched, _tiny_eval_config(test_clip_stride=0.5)):
    skipped = input_pipeline.SkipCounter()
    metrics = evaluation.evaluate(config, params, model.apply, source,
                                  skipped)
    assert metrics == pytest.approx(expected, abs=1e-5)
    assert skipped.indices() == [5]


def test_an_evaluation_without_a_readable_video_says_so():
  """Both paths: the batches of views (all masked out here, so a step
  without a model serves) and the long-video protocol."""
  def step(params, batch):
    del params
    assert not batch['mask'].any()
    scores = jnp.zeros(batch['labels'].shape + (10,))
    return evaluation.video_metrics(scores, batch['labels'], batch['mask'])

  for stride in (0.0, 0.5):
    skipped = input_pipeline.SkipCounter()
    with pytest.raises(clip_lib.BadVideoError,
                       match=r'^No evaluation video could be read\.$'):
      evaluation.evaluate(_tiny_eval_config(test_clip_stride=stride), {},
                          None, ListSource([None] * 2, [0, 1]), skipped,
                          step=step)
    assert skipped.indices() == [0, 1]
