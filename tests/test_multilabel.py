"""Multi-label videos: the sigmoid loss, its targets and mixup, the train
and eval steps, mAP in evaluation, and predict's --threshold; each against
an independent float64 or brute-force reference."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import datasets
from tsformer_jax import evaluation
from tsformer_jax import input_pipeline
from tsformer_jax import long_video
from tsformer_jax import losses
from tsformer_jax import metrics
from tsformer_jax import predict
from tsformer_jax import sharding
from tsformer_jax import train
from tsformer_jax import video_io
from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import video_writer

from conftest import DEMO_STEPS
from conftest import ListSource
from conftest import apply


def _bce64(logits, targets):
  """Binary cross-entropy with logits in float64, averaged over videos and
  classes (torch's BCEWithLogitsLoss(reduction='mean'), PySlowFast's)."""
  x, t = np.float64(logits), np.float64(targets)
  return np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))


def _sigmoid(x):
  return 1 / (1 + np.exp(-np.float64(x)))


def test_sigmoid_loss_is_the_mean_binary_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3, size=(5, 7)).astype(np.float32)
  hot = (rng.random((5, 7)) < 0.3).astype(np.uint8)
  soft = losses.targets(jnp.asarray(hot), 7)
  np.testing.assert_allclose(float(losses.loss('sigmoid', logits, soft)),
                             _bce64(logits, hot), rtol=1e-6)
  # The softmax loss is unchanged: cross-entropy against one-hot targets.
  labels = rng.integers(0, 7, 5)
  log_p = logits - np.log(np.exp(np.float64(logits)).sum(-1, keepdims=True))
  np.testing.assert_allclose(
      float(losses.loss('softmax', logits, losses.targets(labels, 7))),
      -log_p[np.arange(5), labels].mean(), rtol=1e-6)


def test_targets_one_hot_multi_hot_and_smoothed():
  hot = np.array([[1, 0, 1, 0], [0, 0, 0, 0]], np.uint8)
  np.testing.assert_array_equal(losses.targets(jnp.asarray(hot), 4), hot)
  # Int labels: one-hot, for either loss.
  np.testing.assert_array_equal(losses.targets(jnp.array([2, 0]), 4),
                                np.eye(4)[[2, 0]])
  # Smoothing s: positives 1 - s + s / C, negatives s / C, for both forms.
  s = 0.2
  np.testing.assert_allclose(losses.targets(jnp.asarray(hot), 4, s),
                             np.where(hot, 1 - s + s / 4, s / 4), rtol=1e-6)
  np.testing.assert_allclose(losses.targets(jnp.array([2, 0]), 4, s),
                             np.where(np.eye(4)[[2, 0]], 1 - s + s / 4,
                                      s / 4), rtol=1e-6)


def test_mixup_mixes_multi_hot_targets_as_the_clips():
  clips = jnp.arange(3.0).reshape(3, 1)
  hot = jnp.array([[1, 1, 0], [0, 0, 0], [0, 1, 1]], jnp.float32)
  mixed, soft = losses.mixup(jax.random.key(3), clips, hot, 0.4)
  lam = float(mixed[0, 0] - 2.0) / (0.0 - 2.0)  # clip 0 mixes with clip 2.
  np.testing.assert_allclose(soft, lam * hot + (1 - lam) * hot[::-1],
                             atol=1e-6)
  assert 0 < lam < 1


def test_top1_hit_is_the_best_class_being_a_label():
  logits = jnp.array([[0.1, 2.0, 0.3], [3.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
  hot = jnp.array([[0, 1, 1], [0, 1, 1], [0, 0, 0]], jnp.uint8)
  assert losses.top1_hits(logits, hot).tolist() == [True, False, False]
  assert losses.top1_hits(logits, jnp.array([1, 0, 1])).tolist() == [
      True, True, False]


def test_unknown_loss_and_softmax_on_multi_hot_labels_say_what_to_do():
  config = config_lib.get_config('divided', 'tiny')
  assert config.model.loss == 'softmax'
  config.model.loss = 'bce'
  with pytest.raises(ValueError, match=r"^Unknown model.loss 'bce'; valid: "
                     r"\['softmax', 'sigmoid'\]\.$"):
    losses.loss_name(config)
  with pytest.raises(ValueError, match=r'multi-label .* set '
                     r'--config.model.loss=sigmoid\.$'):
    losses.check_labels('softmax', jnp.zeros((2, 3), jnp.uint8))
  losses.check_labels('sigmoid', jnp.zeros(2, jnp.int32))  # Allowed.


def test_older_saved_configs_take_the_softmax_loss():
  saved = config_lib.get_config('divided', 'tiny').to_dict()
  del saved['model']['loss']
  assert config_lib.upgrade(saved).model.loss == 'softmax'
  saved['model']['loss'] = 'sigmoid'
  assert config_lib.upgrade(saved).model.loss == 'sigmoid'


def _tiny_sigmoid_config():
  config = config_lib.get_config('divided', 'tiny')
  config.model.update(loss='sigmoid', drop_path=0.0)
  return config


@pytest.mark.slow
def test_train_step_minimises_the_binary_cross_entropy():
  """The step's loss is the float64 BCE of the model's logits (with one
  micro-batch or two), its accuracy the share of clips whose best class is
  a label, and its update the optimizer's step on the BCE's gradient."""
  config = _tiny_sigmoid_config()
  state = train.create_train_state(config, jax.random.key(0), 10)
  rng = np.random.default_rng(0)
  m = config.model
  clips = rng.integers(0, 256, (4, m.num_frames, *m.image_size, 3),
                       np.uint8)
  hot = (rng.random((4, m.num_classes)) < 0.3).astype(np.uint8)
  hot[0] = 0  # A video of no class counts too.
  batch = dict(clips=clips, labels=hot)
  model = tsformer_jax.create_model(config)
  normalised = clip_lib.device_normalize(clips, config.data.mean,
                                         config.data.std)
  logits = np.asarray(apply(model, state.params, normalised))

  def reference_loss(params):
    x = model.apply({'params': params}, normalised)
    return -jnp.mean(hot * jax.nn.log_sigmoid(x) +
                     (1 - hot) * jax.nn.log_sigmoid(-x))

  expected = state.apply_gradients(
      grads=jax.grad(reference_loss)(state.params))
  for micro in (1, 2):
    config.grad_accum_steps = micro
    step = jax.jit(functools.partial(
        train.train_step, config=config,
        schedule=train.learning_rate_schedule(config, 10)))
    new, step_metrics = step(state, batch, jax.random.key(1))
    np.testing.assert_allclose(float(step_metrics['loss']),
                               _bce64(logits, hot), rtol=1e-6)
    hits = hot[np.arange(4), logits.argmax(-1)] > 0
    assert float(step_metrics['accuracy']) == hits.mean()
    moved = 0.0
    for a, b, before in zip(jax.tree.leaves(new.params),
                            jax.tree.leaves(expected.params),
                            jax.tree.leaves(state.params), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6)
      moved = max(moved, float(np.abs(np.asarray(a) - before).max()))
    assert moved > 1e-4


def _fake_apply(variables, clips):
  """A model whose logits are a clip's first three pixel values."""
  del variables
  return clips.reshape(clips.shape[0], -1)[:, :3]


def _eval_config(**data):
  config = config_lib.get_config('divided', 'tiny')
  config.model.loss = 'sigmoid'
  config.data.update(mean=(0.0,) * 3, std=(1 / 255,) * 3, **data)
  config.eval_batch_size = 2
  return config


@pytest.mark.parametrize('method', ['logit_sum', 'softmax_mean'])
def test_eval_step_averages_sigmoid_probabilities_over_views(method):
  """Whatever data.test_view_scores says, a sigmoid head's video scores are
  its views' mean sigmoid probabilities; rows come back for the mAP, the
  loss is their BCE and top-1 whether the best class is a label."""
  views = np.zeros((2, 3, 3), np.float32)  # [B, V, logits]
  views[0] = [[2, -1, 0], [-3, 1, 0], [4, -2, 1]]
  views[1] = [[0, 5, -5], [1, 1, 1], [-1, 2, 0]]
  hot = np.array([[0, 1, 0], [1, 0, 1]], np.uint8)
  mask = np.array([True, False])
  probs = _sigmoid(views).mean(1)
  config = _eval_config(test_view_scores=method)
  step = evaluation.jit_eval_step(config, {}, _fake_apply,
                                  sharding.create_mesh(config))
  out = step({}, dict(clips=views, labels=hot, mask=mask))
  np.testing.assert_allclose(out['scores'], probs, atol=1e-6)
  np.testing.assert_array_equal(out['labels'], hot)
  np.testing.assert_array_equal(out['mask'], mask)
  assert float(out['count']) == 1
  assert float(out['top1']) == 0  # Video 0's best class, 0, is not its.
  p = probs[0]
  bce = -np.mean(hot[0] * np.log(p) + (1 - hot[0]) * np.log(1 - p))
  np.testing.assert_allclose(float(out['loss']), bce, rtol=1e-5)
  # Int labels with a sigmoid head: one-hot targets, top-1 and top-5.
  out = step({}, dict(clips=views, labels=np.array([0, 1]), mask=mask))
  assert float(out['top1']) == 1 and float(out['top5']) == 1
  assert 'scores' not in out
  bce = -np.mean([np.log(p[0]), np.log(1 - p[1]), np.log(1 - p[2])])
  np.testing.assert_allclose(float(out['loss']), bce, rtol=1e-5)


def test_softmax_eval_step_refuses_multi_hot_labels():
  config = _eval_config()
  config.model.loss = 'softmax'
  step = evaluation.jit_eval_step(config, {}, _fake_apply,
                                  sharding.create_mesh(config))
  with pytest.raises(ValueError, match='--config.model.loss=sigmoid'):
    step({}, dict(clips=np.zeros((2, 1, 3), np.float32),
                  labels=np.zeros((2, 3), np.uint8),
                  mask=np.ones(2, bool)))


def test_summarize_takes_the_map_over_every_batch_without_padding():
  """mAP is not a sum: the rows of all batches are joined first; masked
  (padding) rows and classes without a positive are left out."""
  rng = np.random.default_rng(0)
  scores = rng.random((7, 4)).astype(np.float32)
  hot = (rng.random((7, 4)) < 0.4).astype(np.uint8)
  hot[:, 3] = 0  # No positive: excluded.
  hot[0, 0] = 1
  mask = np.array([1, 1, 1, 1, 1, 0, 0], bool)  # Two padded rows.
  hot[5:, 3] = 1  # A positive only on padding: still excluded.
  outputs = [dict(scores=scores[i:i + 2], labels=hot[i:i + 2],
                  mask=mask[i:i + 2]) for i in range(0, 7, 2)]
  sums = dict(count=np.float32(5), top1=np.float32(2), loss=np.float32(1))
  result = evaluation.summarize(sums, outputs, ['a', 'b', 'c', 'd'])
  expected, per_class = metrics.mean_average_precision(scores[:5], hot[:5])
  assert np.isnan(per_class[3]) and not np.isnan(per_class[:3]).any()
  assert result['map'] == pytest.approx(expected, abs=1e-12)
  assert result['classes_excluded'] == 1
  assert result['per_class_ap'] == dict(
      a=pytest.approx(per_class[0]), b=pytest.approx(per_class[1]),
      c=pytest.approx(per_class[2]), d=None)
  assert (result['top1'], result['loss'], result['videos']) == (0.4, 0.2,
                                                                5.0)
  assert 'top5' not in result
  # Without names that fit: the class indices.
  assert list(evaluation.summarize(sums, outputs)['per_class_ap']) == [
      '0', '1', '2', '3']


@pytest.mark.slow
def test_both_evaluation_paths_give_the_map_of_the_models_probabilities():
  """Videos one clip long, so that batched multi-view testing (batches of
  4, the last padded) and the long-video protocol both take the clip at
  frame 0: both report the mAP of the model's sigmoid probabilities over
  all readable videos; a failing one is skipped."""
  config = config_lib.get_config('divided', 'tiny')
  config.model.loss = 'sigmoid'
  config.data.update(test_num_crops=1, test_num_clips=1, sampling_rate=2,
                     num_workers=1, worker_type='thread')
  config.eval_batch_size = 4
  rng = np.random.default_rng(2)
  videos = [clip_lib.ArrayVideo(rng.integers(0, 255, (8, 40, 48, 3),
                                             np.uint8)) for _ in range(7)]
  hot = (rng.random((8, config.model.num_classes)) < 0.4).astype(np.uint8)
  source = ListSource(videos + [None], hot)
  params = tsformer_jax.init_params(config, jax.random.key(0))
  model = tsformer_jax.create_model(config)
  spec = clip_lib.clip_spec(config)
  clips = np.stack([clip_lib.normalize(clip_lib.eval_crops(
      v.array[[0, 2, 4, 7]], spec)[0], spec) for v in videos])
  probs = _sigmoid(apply(model, params, clips))
  expected, per_class = metrics.mean_average_precision(probs, hot[:7])
  excluded = int(np.isnan(per_class).sum())
  for stride in (0.0, 0.5):
    config.data.test_clip_stride = stride
    skipped = input_pipeline.SkipCounter()
    result = evaluation.evaluate(config, params, model.apply, source,
                                 skipped)
    assert result['videos'] == 7 and skipped.indices() == [7]
    assert result['map'] == pytest.approx(expected, abs=1e-4)
    assert result['classes_excluded'] == excluded
    np.testing.assert_allclose(
        [np.nan if ap is None else ap
         for ap in result['per_class_ap'].values()], per_class, atol=1e-4)


def test_eval_results_for_results_json():
  single = dict(top1=0.5, top5=1.0, loss=0.7, videos=4.0)
  assert train._eval_results(single) == dict(  # pylint: disable=protected-access
      eval_top1=0.5, eval_top5=1.0, eval_loss=0.7)
  multi = dict(top1=0.5, loss=0.3, videos=4.0, map=0.8, classes_excluded=1,
               per_class_ap={'a': 0.8, 'b': None})
  assert train._eval_results(multi) == dict(  # pylint: disable=protected-access
      eval_map=0.8, eval_top1=0.5, eval_loss=0.3, eval_classes_excluded=1,
      per_class_ap={'a': 0.8, 'b': None})


def test_predictions_average_sigmoid_probabilities_over_views():
  """predict_videos (predict's and the long-video protocol's path): a
  sigmoid head's video scores are the views' mean sigmoid probabilities;
  `above` lists the classes at or above a threshold, best first."""
  config = _eval_config()
  logits = {0: np.array([3.0, -2.0, 0.1]), 8: np.array([-1.0, -2.0, 0.3])}

  def forward(params, clips):
    del params
    # Each clip's logits from its first frame's first pixel: 0 or 8.
    rows = np.stack([logits.get(int(c[0, 0, 0, 0]), np.zeros(3))
                     for c in np.asarray(clips)])
    return dict(logits=rows, scores=_sigmoid(rows))

  frames = np.zeros((40, 32, 32, 3), np.uint8)
  frames[20:] = 8
  video = clip_lib.ArrayVideo(frames)
  (p,) = evaluation.predict_videos(
      config, {}, [video], forward=forward,
      coverage=long_video.Coverage(num_clips=2, num_crops=1))
  assert p.error is None and p.start.tolist() == [0, 32]
  expected = (_sigmoid(logits[0]) + _sigmoid(logits[8])) / 2
  np.testing.assert_allclose(p.scores, expected, atol=1e-6)
  # Mean probabilities 0.611, 0.095, 0.550.
  assert [c for c, _ in p.above(0.6)] == [0]
  assert [c for c, _ in p.above(0.5)] == [0, 2]
  assert p.above(0.7) == []


@pytest.fixture(scope='module')
def checkpoints_and_videos(tmp_path_factory):
  """A tiny sigmoid checkpoint, the same weights with a softmax head, and
  two demo videos."""
  root = tmp_path_factory.mktemp('multilabel')
  config = config_lib.get_config('divided', 'tiny')
  config = config_lib.with_class_names(
      config, [f'cue{i}' for i in range(config.model.num_classes)])
  # Random weights of the model's shapes, drawn without compiling init.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: rng.normal(scale=0.1, size=s.shape).astype(np.float32),
      jax.eval_shape(lambda: tsformer_jax.init_params(config,
                                                      jax.random.key(0))))
  softmax = str(root / 'softmax')
  checkpoints.save_checkpoint(softmax, config, params)
  config.model.loss = 'sigmoid'
  sigmoid = str(root / 'sigmoid')
  checkpoints.save_checkpoint(sigmoid, config, params)
  videos = []
  for i in range(2):
    videos.append(str(root / f'{i}.mp4'))
    video_writer.write_mp4(videos[-1], synthetic_motion.generate('test', i)[0],
                           30.0)
  return dict(config=config, params=params, sigmoid=sigmoid, softmax=softmax,
              videos=videos)


def _reference_probs(config, params, path):
  """Independently: evaluation's views, the model, the views' sigmoid
  probabilities averaged, in float64: `[C]`."""
  views = clip_lib.eval_views(video_io.VideoFile(path),
                              clip_lib.clip_spec(config))
  logits = apply(tsformer_jax.create_model(config), params, views)
  return _sigmoid(logits).mean(0)


@pytest.mark.slow
def test_predict_shows_the_classes_above_the_threshold(
    checkpoints_and_videos, capsys):
  c = checkpoints_and_videos
  expected = [_reference_probs(c['config'], c['params'], v)
              for v in c['videos']]
  threshold = float(np.median(expected[0]))
  status = cli.call(predict.main, [
      'predict', f'--checkpoint={c["sigmoid"]}', *c['videos'], '--json',
      f'--threshold={threshold}'])
  assert status == 0
  document = json.loads(capsys.readouterr().out)
  assert document['threshold'] == threshold
  for video, probs in zip(document['videos'], expected, strict=True):
    above = [i for i in np.argsort(-probs) if probs[i] >= threshold]
    assert [t['index'] for t in video['labels']] == above
    assert [t['label'] for t in video['labels']] == [f'cue{i}'
                                                     for i in above]
    np.testing.assert_allclose([t['probability'] for t in video['labels']],
                               probs[above], atol=1e-5)
    assert len(video['top_k']) == 5  # --top_k's default, beside them.
  # The median: half the classes of video 0 pass.
  assert len(document['videos'][0]['labels']) == len(expected[0]) // 2
  # Text, the default threshold 0.5: one `probability  label` line each.
  assert cli.call(predict.main, [
      'predict', f'--checkpoint={c["sigmoid"]}', c['videos'][0]]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  above = [i for i in np.argsort(-expected[0]) if expected[0][i] >= 0.5]
  assert lines[0] == f'{c["videos"][0]} (3 views)'  # tiny: 3 crops.
  assert lines[1:] == ([f'  {expected[0][i]:.4f}  cue{i}' for i in above]
                       or ['  (none >= 0.5)'])


def test_threshold_with_a_softmax_head_is_one_line(checkpoints_and_videos,
                                                    capsys):
  c = checkpoints_and_videos
  status = cli.call(predict.main, [
      'predict', f'--checkpoint={c["softmax"]}', c['videos'][0],
      '--threshold=0.3'])
  captured = capsys.readouterr()
  assert status == 2 and not captured.out
  assert captured.err.strip().splitlines() == [
      'predict: error: --threshold applies to sigmoid (multi-label) models; '
      f'{c["softmax"]} has a softmax head (one class per video): use '
      '--top_k.']


def test_threshold_must_be_a_probability(tmp_path, capsys):
  status = cli.call(predict.main, [
      'predict', f'--checkpoint={tmp_path}/none', f'{tmp_path}/a.mp4',
      '--threshold=1.5'])
  lines = capsys.readouterr().err.strip().splitlines()
  assert status == 2
  assert lines == ['predict: error: flag --threshold=1.5: must be a '
                   'probability, from 0 to 1.']


@pytest.mark.slow
def test_demo_learns_independent_attributes(tmp_path):
  """The divided demo trained on synthetic_attributes (three independent
  yes/no attributes a video) reaches mAP >= 0.9 on held-out videos, in its
  own evaluation (results.json) and on predict's path, which agree."""
  config = config_lib.get_config('divided', 'demo,dataset=synthetic_attributes')
  assert config.model.loss == 'sigmoid'
  config.num_train_steps = DEMO_STEPS
  config.optimizer.learning_rate = 2e-3
  config.checkpoint_every_steps = DEMO_STEPS
  train.train_and_evaluate(config, str(tmp_path))
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['eval_map'] >= 0.9, results
  assert results['eval_classes_excluded'] == 0
  assert set(results['per_class_ap']) == set(synthetic_motion.ATTRIBUTES)
  assert 'eval_top5' not in results

  config, params = tsformer_jax.load_checkpoint(str(tmp_path /
                                                    'checkpoints'))
  source = datasets.get_source(config, config.data.eval_split)
  videos, labels = zip(*(source[i] for i in range(len(source))),
                       strict=True)
  predictions = evaluation.predict_videos(config, params, videos)
  predicted, per_class = metrics.mean_average_precision(
      np.stack([p.scores for p in predictions]), np.stack(labels))
  assert predicted == pytest.approx(results['eval_map'], abs=1e-3)
  np.testing.assert_allclose(
      per_class, [results['per_class_ap'][a]
                  for a in synthetic_motion.ATTRIBUTES], atol=1e-3)
