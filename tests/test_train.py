"""Training: schedules, steps and whole runs (evaluation:
test_evaluation.py)."""

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
from tsformer_jax import config_lib
from tsformer_jax import datasets
from tsformer_jax import evaluation
from tsformer_jax import input_pipeline
from tsformer_jax import losses
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
  mixed, soft = losses.mixup(jax.random.key(0), clips, targets, 0.4)
  lam = float(soft[0, 0])
  np.testing.assert_allclose(mixed[:, 0], lam * clips[:, 0] +
                             (1 - lam) * clips[::-1, 0], rtol=1e-6)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)


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


def test_demo_divided_model_learns_the_frame_order(demo_workdir):
  """The shared demo run (conftest.DEMO_STEPS steps) classifies held-out
  synthetic_motion clips, whose class only the order of frames tells."""
  config, params = checkpoints.load_checkpoint(str(demo_workdir /
                                                   'checkpoints'))
  model = tsformer_jax.create_model(config)
  metrics = evaluation.evaluate(
      config, params, model.apply,
      datasets.get_source(config, config.data.eval_split),
      input_pipeline.SkipCounter())
  assert metrics['videos'] == 256
  assert metrics['top1'] >= 0.9, metrics  # Measured 0.984; chance is 0.5.
  # Its checkpoints carry the dataset's class names.
  assert config.data.class_names == synthetic_motion.CLASSES
