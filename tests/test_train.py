"""Training: schedules, steps, multi-view evaluation, and whole runs."""

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import datasets
from tsformer_jax import input_pipeline
from tsformer_jax import sharding
from tsformer_jax import train
from tsformer_jax.datasets import synthetic_motion

from conftest import predicted_metrics

ROOT = pathlib.Path(__file__).parent.parent


def test_paper_schedule_divides_by_ten_at_epochs_11_and_14():
  config = config_lib.get_config('divided')
  schedule = train.learning_rate_schedule(config, steps_per_epoch=10)
  lrs = [float(schedule(s)) for s in (0, 109, 110, 139, 140, 149)]
  np.testing.assert_allclose(lrs, [5e-3, 5e-3, 5e-4, 5e-4, 5e-5, 5e-5],
                             rtol=1e-5)


def test_warmup_then_cosine():
  config = config_lib.get_config('divided', 'demo')
  schedule = train.learning_rate_schedule(config, steps_per_epoch=10)
  total = train.total_steps(config, 10)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-5)
  assert float(schedule(total)) < 1e-6


def _state_and_batch(config, batch_size=4):
  state = train.create_train_state(config, jax.random.key(0), 10)
  rng = np.random.default_rng(0)
  m = config.model
  batch = dict(
      clips=rng.normal(size=(batch_size, m.num_frames, *m.image_size, 3)
                       ).astype(np.float32),
      labels=rng.integers(0, m.num_classes, batch_size).astype(np.int32))
  return state, batch


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch():
  config = config_lib.get_config('divided', 'tiny')
  config.model.drop_path = 0.0
  state, batch = _state_and_batch(config)
  results = []
  for micro in (1, 2):
    config.grad_accum_steps = micro
    step = jax.jit(functools.partial(
        train.train_step, config=config,
        schedule=train.learning_rate_schedule(config, 10)))
    new, metrics = step(state, batch, jax.random.key(1))
    results.append((new.params, float(metrics['loss'])))
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  for a, b in zip(*(jax.tree.leaves(r[0]) for r in results), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_bfloat16_optimizer_state_halves_it_and_follows_float32(name):
  config = config_lib.get_config('divided', 'tiny')
  config.model.drop_path = 0.0
  config.optimizer.update(name=name, learning_rate=0.1)
  config.grad_accum_steps = 1
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config.optimizer.state_dtype = dtype
    state, batch = _state_and_batch(config)
    step = jax.jit(functools.partial(
        train.train_step, config=config,
        schedule=train.learning_rate_schedule(config, 10)))
    # Adam's update of a near-zero gradient flips sign with any change of
    # the parameters, so AdamW is compared after one step, SGD after three.
    for _ in range(3 if name == 'sgd' else 1):
      state, _ = step(state, batch, jax.random.key(1))
    moments = [x for x in jax.tree.leaves(state.opt_state)
               if x.shape == state.params['head']['kernel'].shape]
    results[dtype] = state, moments
  f32, b16 = results['float32'], results['bfloat16']
  # The momentum (first moment) is stored in bfloat16: half the bytes.
  assert {x.dtype for x in f32[1]} == {jnp.dtype('float32')}
  assert jnp.dtype('bfloat16') in {x.dtype for x in b16[1]}
  # The steps move the parameters alike, to within bfloat16's rounding of
  # the update.
  for before, a, b in zip(
      jax.tree.leaves(_state_and_batch(config)[0].params),
      jax.tree.leaves(f32[0].params), jax.tree.leaves(b16[0].params),
      strict=True):
    moved = np.abs(np.asarray(a) - before).max()
    np.testing.assert_allclose(b, a, atol=0.02 * moved + 1e-7)
  with pytest.raises(ValueError, match=r"state_dtype 'fp8'; valid: "
                     r"\['float32', 'bfloat16'\]"):
    config.optimizer.state_dtype = 'fp8'
    train.create_optimizer(config, 10)


def test_mixup_mixes_clips_and_targets_alike():
  clips = jnp.arange(4.0).reshape(4, 1)
  targets = jax.nn.one_hot(jnp.arange(4), 4)
  mixed, soft = train.mixup(jax.random.key(0), clips, targets, 0.4)
  lam = float(soft[0, 0])
  np.testing.assert_allclose(mixed[:, 0], lam * clips[:, 0] +
                             (1 - lam) * clips[::-1, 0], rtol=1e-6)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)


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
  steps = [functools.partial(train.eval_step, apply_fn=apply_fn,
                             mean=config.data.mean, std=config.data.std,
                             view_scores=method),
           train.jit_eval_step(config, {}, apply_fn,
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
    train.jit_eval_step(config, {}, None, sharding.create_mesh(config))


def test_ties_and_nan_scores_are_no_hits():
  """Uniform scores (a collapsed model, bf16 ties) and NaN ones count as
  wrong, not right; a lone top score still counts."""
  scores = jnp.array([[0.25] * 4,                      # a 4-way tie
                      [jnp.nan] * 4,                   # a NaN model
                      [0.1, 0.6, 0.2, 0.1],            # right
                      [0.4, 0.4, 0.1, 0.1]])           # tied with class 0
  sums = train.video_metrics(scores, jnp.array([0, 0, 1, 1]),
                             jnp.ones(4, bool))
  assert float(sums['count']) == 4
  assert float(sums['top1']) == 1  # Video 2 only.
  # Top-5 of 4 classes: every finite video.
  assert float(sums['top5']) == 3


def _main(workdir, *flags, **popen):
  cmd = [sys.executable, '-m', 'tsformer_jax.main',
         '--config=configs/divided.py:demo', f'--workdir={workdir}',
         '--config.batch_size=8', '--config.model.depth=1',
         '--config.log_every_steps=2', *flags]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)


def _final_params(workdir):
  _, params = checkpoints.load_checkpoint(os.path.join(workdir,
                                                       'checkpoints'))
  return params


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  flags = ('--mode=train', '--config.num_train_steps=10',
           '--config.checkpoint_every_steps=2')
  straight = tmp_path / 'straight'
  assert _main(straight, *flags).wait(timeout=600) == 0

  killed = tmp_path / 'killed'
  proc = _main(killed, *flags)
  deadline = time.time() + 600
  steps = killed / 'checkpoints'
  while not (steps.exists() and any(p.name.isdigit() and int(p.name) >= 4
                                    for p in steps.iterdir())):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _main(killed, *flags).wait(timeout=600) == 0

  results = json.loads((killed / 'results.json').read_text())
  assert results['step'] == 10 and results['skipped_videos'] == 0
  for a, b in zip(jax.tree.leaves(_final_params(straight)),
                  jax.tree.leaves(_final_params(killed)), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_train_and_eval_writes_results_and_summaries(tmp_path):
  proc = _main(tmp_path, '--config.num_train_steps=4',
               '--config.data.test_num_crops=1', '--config.eval_batch_size=64')
  assert proc.wait(timeout=600) == 0
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['step'] == 4
  assert set(results) >= {'train_loss', 'eval_top1', 'eval_top5',
                          'skipped_videos'}
  assert results == pytest.approx(results | predicted_metrics(tmp_path),
                                 abs=1e-6)
  assert list(tmp_path.glob('events.out.tfevents.*'))
  # Again: already finished, it only evaluates.
  assert _main(tmp_path, '--config.num_train_steps=4',
               '--mode=eval').wait(timeout=600) == 0


def test_unknown_mode_lists_the_valid_ones():
  with pytest.raises(ValueError, match="valid: .*'train_and_eval'"):
    train.train_and_evaluate(config_lib.get_config('divided', 'demo'),
                             '/nonexistent', mode='fit')


class _ListSource:
  """Videos in memory; `None` stands for one that fails to open."""

  def __init__(self, videos, labels):
    self.videos, self.labels = videos, labels

  def __len__(self):
    return len(self.videos)

  def __getitem__(self, index):
    if self.videos[index] is None:
      raise clip_lib.BadVideoError('unreadable')
    return self.videos[index], self.labels[index]


@pytest.mark.slow
def test_long_videos_are_evaluated_whole_with_combined_clip_scores():
  config = config_lib.get_config('divided', 'tiny')
  config.data.update(test_clip_stride=0.5, test_num_crops=1,
                     sampling_rate=2, target_fps=30.0)
  config.eval_batch_size = 4
  params = train.create_train_state(config, jax.random.key(0), 1).params
  model = tsformer_jax.create_model(config)
  rng = np.random.default_rng(0)
  lengths = [100, 8, 47]  # 30 fps: a clip spans 8 frames, stride 15.
  videos = [clip_lib.ArrayVideo(
      rng.integers(0, 255, (n, 40, 48, 3), np.uint8)) for n in lengths]
  labels = [3, 1, 7]
  skipped = input_pipeline.SkipCounter()
  metrics = train.evaluate(config, params, model.apply,
                           _ListSource(videos + [None], labels + [0]),
                           skipped)
  # Independently: clips at 0, 15, 30, ... and one ending on the last frame,
  # each spanning 8 frames (4 frames at rate 2: offsets linspace(0, 7, 4)
  # truncated), centre-cropped after the short-side resize.
  spec = clip_lib.clip_spec(config)
  expected_nll, expected_top1 = [], []
  for video, label, n in zip(videos, labels, lengths, strict=True):
    starts = list(range(0, n - 8 + 1, 15))
    if starts[-1] != n - 8:
      starts.append(n - 8)
    clips = np.stack([
        clip_lib.normalize(clip_lib.eval_crops(
            video.array[s + np.array([0, 2, 4, 7])], spec)[0], spec)
        for s in starts])
    # The default 'logit_sum': ranked by the clips' summed logits, the loss
    # from the softmax of their mean.
    logits = np.asarray(model.apply({'params': params}, clips), np.float64)
    expected_nll.append(-np.log(_softmax(logits.mean(0))[label]))
    expected_top1.append(np.argmax(logits.sum(0)) == label)
  assert metrics['videos'] == 3 and len(skipped) == 1
  np.testing.assert_allclose(metrics['loss'], np.mean(expected_nll),
                             rtol=1e-4)
  assert metrics['top1'] == np.mean(expected_top1)


def test_demo_divided_model_learns_the_frame_order(demo_workdir):
  """The shared demo run (conftest.DEMO_STEPS steps) classifies held-out
  synthetic_motion clips, whose class only the order of frames tells."""
  config, params = checkpoints.load_checkpoint(str(demo_workdir /
                                                   'checkpoints'))
  model = tsformer_jax.create_model(config)
  metrics = train.evaluate(
      config, params, model.apply,
      datasets.get_source(config, config.data.eval_split),
      input_pipeline.SkipCounter())
  assert metrics['videos'] == 256
  assert metrics['top1'] >= 0.9, metrics  # Measured 0.984; chance is 0.5.
  # Its checkpoints carry the dataset's class names.
  assert config.data.class_names == synthetic_motion.CLASSES
