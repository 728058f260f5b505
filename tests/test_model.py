"""The TimeSformer module: shapes, dtypes, training mode, initialisation."""


import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tsformer_jax
from tsformer_jax import attention
from tsformer_jax import config_lib
from tsformer_jax.kernels import cpu

from conftest import DIVIDED_FIRST
from conftest import SCHEMES
from conftest import apply
from conftest import random_clips
from conftest import tiny_config
from conftest import tiny_params

# The original implementation's parameter counts with a 400-class head and
# the paper's Table 1 figures for the unreleased schemes.
ORIGINAL_PARAMS = {'space_only': 86_106_256, 'joint': 86_112_400,
                   'divided': 121_566_352}
PAPER_PARAMS = {'space_only': 85.9e6, 'joint': 85.9e6, 'divided': 121.4e6,
                'sparse_local_global': 121.4e6, 'axial': 156.8e6}


def _count(params):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize('scheme', SCHEMES)
def test_base_parameter_counts(scheme):
  config = config_lib.get_config(scheme, 'base')
  params = jax.eval_shape(
      lambda: tsformer_jax.init_params(config, jax.random.key(0)))
  count = _count(params)
  assert abs(count / PAPER_PARAMS[scheme] - 1) < 0.005
  if scheme in ORIGINAL_PARAMS:
    assert count == ORIGINAL_PARAMS[scheme]


@pytest.mark.parametrize('scheme', DIVIDED_FIRST)
def test_forward_shapes_and_features(scheme):
  config = tiny_config(scheme)
  model = tsformer_jax.create_model(config)
  params = tiny_params(scheme)
  clips = random_clips(config, batch_size=3)
  logits = apply(model, params, clips)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert np.isfinite(logits).all()

  config.model.num_classes = 0
  features = apply(tsformer_jax.create_model(config),
                   {k: v for k, v in params.items() if k != 'head'}, clips)
  assert features.shape == (3, config.model.hidden_size)
  np.testing.assert_allclose(
      features @ params['head']['kernel'] + params['head']['bias'], logits,
      atol=1e-5)


@pytest.mark.parametrize('scheme', DIVIDED_FIRST)
def test_fused_attention_equals_einsum(scheme):
  config = tiny_config(scheme, image_size=(40, 24))  # A 5 x 3 patch grid.
  params = _randomize(tiny_params(scheme, image_size=(40, 24)))
  clips = random_clips(config)
  logits = {}
  for impl in ('einsum', 'xla', 'chunked', 'auto'):
    config.model.attention_impl = impl
    model = tsformer_jax.create_model(config)
    logits[impl] = apply(model, params, clips)
  for impl in ('xla', 'chunked', 'auto'):
    np.testing.assert_allclose(logits[impl], logits['einsum'], atol=1e-5)


@pytest.mark.parametrize('scheme', DIVIDED_FIRST)
def test_cpu_attention_gives_the_einsum_gradients(scheme, monkeypatch):
  """With every unmasked group long enough, 'auto' runs `cpu_attention`
  (class tokens, per-frame tokens and groupings included)."""
  monkeypatch.setattr(cpu, 'CPU_ATTENTION_MIN_LENGTH', 1)
  config = tiny_config(scheme, image_size=(40, 24))
  params = _randomize(tiny_params(scheme, image_size=(40, 24)))
  clips = random_clips(config)
  grads = {}
  for impl in ('einsum', 'auto'):
    config.model.attention_impl = impl
    model = tsformer_jax.create_model(config)

    def loss(params, model=model):
      return jnp.sum(model.apply({'params': params}, clips) ** 2)

    grads[impl] = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(grads['auto'][0], grads['einsum'][0],
                             rtol=1e-5)
  # Float32 rounding only: within 5e-5 of each parameter's largest
  # gradient ('xla' differs from 'einsum' by 1.1e-5 here, 'auto' by 1.5e-5).
  for a, b in zip(jax.tree.leaves(grads['auto'][1]),
                  jax.tree.leaves(grads['einsum'][1]), strict=True):
    np.testing.assert_allclose(a, b, atol=5e-5 * np.abs(b).max())


@pytest.mark.slow
@pytest.mark.parametrize('scheme', ['divided', 'space_only'])
def test_remat_policies_give_the_same_gradients(scheme):
  grads = {}
  for remat in ('none', 'full', 'dots', 'dots_no_batch'):
    config = tiny_config(scheme, remat=remat, drop_path=0.3)
    model = tsformer_jax.create_model(config)
    clips = random_clips(config)

    def loss(params, model=model, clips=clips):
      logits = model.apply({'params': params}, clips, train=True,
                           rngs={'dropout': jax.random.key(1)})
      return jnp.sum(logits ** 2)

    grads[remat] = jax.jit(jax.grad(loss))(tiny_params(scheme))
  for remat in ('full', 'dots', 'dots_no_batch'):
    for a, b in zip(jax.tree.leaves(grads['none']),
                    jax.tree.leaves(grads[remat]), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('scheme', DIVIDED_FIRST)
def test_attention_weights_on_request_from_the_same_forward(scheme):
  config = tiny_config(scheme, image_size=(40, 24))
  params = _randomize(tiny_params(scheme, image_size=(40, 24)))
  model = tsformer_jax.create_model(config)
  clips = random_clips(config)
  logits, state = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, mutable=['attention']))(params, clips)
  np.testing.assert_allclose(logits, apply(model, params, clips), atol=1e-5)
  steps = attention.get_scheme(scheme).steps
  grid = model.grid
  for i in range(config.model.depth):
    block = state['attention'][f'block_{i}']
    assert sorted(block) == sorted(f'{s.grouping}_attention' for s in steps)
    for step in steps:
      (weights,) = block[f'{step.grouping}_attention']['weights']
      group = attention.GROUPINGS[step.grouping]
      length = group.split(np.zeros((1,) + grid[:1] + (grid[1] * grid[2],)),
                           grid).shape[2] + step.with_cls
      assert weights.shape == (2, group.num_groups(grid),
                               config.model.num_heads, length, length)
      np.testing.assert_allclose(weights.sum(-1)[..., 1:], 1.0, atol=1e-5)


@pytest.mark.parametrize('scheme', DIVIDED_FIRST)
def test_bfloat16_close_to_float32_with_float32_params(scheme):
  config = tiny_config(scheme)
  params = _randomize(tiny_params(scheme))
  clips = random_clips(config)
  f32 = apply(tsformer_jax.create_model(config), params, clips)
  config.model.dtype = 'bfloat16'
  model = tsformer_jax.create_model(config)
  bf16 = apply(model, params, clips)
  assert bf16.dtype == jnp.float32  # Logits come back in float32...
  # ... computed so by the last norm and the head: not rounded to bfloat16,
  # whose steps make ties (video_metrics counts a tie as a miss).
  assert not np.array_equal(bf16, bf16.astype(jnp.bfloat16).astype(
      jnp.float32))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      tiny_params(scheme, dtype='bfloat16')))
  scale = float(jnp.abs(f32).max())
  assert float(jnp.abs(bf16 - f32).max()) < 0.05 * scale
  assert not np.allclose(bf16, f32, atol=1e-6)  # Really ran in bfloat16.


def _randomize(params, seed=3, std=0.3):
  """Random values everywhere, so zero-initialised layers matter too."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: np.float32(rng.normal(size=p.shape) * std + (p.ndim == 1)),
      params)


def test_initialisation_follows_the_original():
  params = tiny_params('axial')
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  assert not np.any(params['time_embedding'])
  fcs = [k for k in flat if '/fc/' in k and 'mlp' not in k]
  # time and width steps of both blocks, kernel and bias each.
  assert len(fcs) == 8 and not any(np.any(flat[k]) for k in fcs)
  assert not any(np.any(v) for k, v in flat.items() if k.endswith('bias'))
  # The original's trunc_normal_(std=.02) cuts at +-2, 100 std: a normal of
  # std 0.02, not one cut at 2 std (std 0.0176, nothing past 0.04).
  kernel = flat['block_0/mlp/fc1/kernel']
  assert abs(float(kernel.std()) - 0.02) < 0.001
  assert float(jnp.abs(kernel).max()) > 0.05


def test_time_embedding_can_start_random():
  time = tiny_params('divided', time_embedding_std=0.5)['time_embedding']
  assert 0.3 < float(time.std()) < 0.5  # Truncated at two std.


def test_time_step_is_silent_at_init_and_wired_in():
  """temporal_fc starts at zero: the temporal step's other weights then do
  not matter (the model starts as the image model); non-zero ones do."""
  config = tiny_config('divided', depth=1)
  model = tsformer_jax.create_model(config)
  params = tiny_params('divided', depth=1)
  clips = random_clips(config)
  logits = apply(model, params, clips)
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  step = 'block_0/time_attention/'
  other = _randomize({k: v for k, v in flat.items()
                      if k.startswith(step) and '/fc/' not in k})
  np.testing.assert_allclose(
      apply(model, flax.traverse_util.unflatten_dict(
          {**flat, **other}, sep='/'), clips), logits, atol=1e-6)
  fc = _randomize({k: v for k, v in flat.items() if k.startswith(step + 'fc')})
  changed = apply(model, flax.traverse_util.unflatten_dict(
      {**flat, **fc}, sep='/'), clips)
  assert not np.allclose(changed, logits, atol=1e-3)


def test_train_mode_uses_dropout_and_stochastic_depth():
  config = tiny_config('divided', dropout=0.1, attention_dropout=0.1,
                       drop_path=0.5)
  model = tsformer_jax.create_model(config)
  params = tiny_params('divided')
  clips = random_clips(config)
  evals = [apply(model, params, clips) for _ in range(2)]
  np.testing.assert_array_equal(evals[0], evals[1])
  run = lambda seed: apply(model, params, clips, train=True,
                           rng=jax.random.key(seed))
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))
  assert not np.allclose(run(0), evals[0])
  with pytest.raises(Exception, match='dropout'):
    apply(model, params, clips, train=True)


@pytest.mark.slow
def test_space_only_frames_are_independent_until_the_average():
  """Changing one frame moves space_only logits exactly like the original:
  each frame is its own image model and the class tokens are averaged."""
  config = tiny_config('space_only', num_frames=2)
  params = _randomize(tiny_params('space_only', num_frames=2))
  clips = random_clips(config)
  model = tsformer_jax.create_model(config)
  swapped = apply(model, params, clips[:, ::-1])
  np.testing.assert_allclose(apply(model, params, clips), swapped,
                             atol=1e-5)  # No time embedding, no time mixing.
  config.model.attention = 'divided'
  divided = tsformer_jax.create_model(config)
  dparams = _randomize(tiny_params('divided', num_frames=2))
  assert not np.allclose(apply(divided, dparams, clips),
                         apply(divided, dparams, clips[:, ::-1]),
                         atol=1e-4)


def test_bad_inputs_and_configs_say_what_is_valid():
  config = tiny_config()
  model = tsformer_jax.create_model(config)
  params = tiny_params()
  with pytest.raises(ValueError, match=r'Expected clips \[B, 4, 32, 32, 3\]'):
    apply(model, params, np.zeros((1, 3, 32, 32, 3)))
  with pytest.raises(ValueError, match='not a multiple of patch_size'):
    tsformer_jax.init_params(tiny_config(image_size=(36, 32)),
                             jax.random.key(0))
  with pytest.raises(ValueError, match="Unknown config.model fields.*'depht'"
                     ".*valid:.*'depth'"):
    bad = tiny_config()
    bad.model.depht = 3
    tsformer_jax.create_model(bad)
  with pytest.raises(ValueError, match="valid: .*'divided'"):
    tsformer_jax.create_model(tiny_config(attention='dividd'))
  with pytest.raises(ValueError, match="Unknown dtype 'float16'.*bfloat16"):
    tsformer_jax.init_params(tiny_config(dtype='float16'), jax.random.key(0))
  with pytest.raises(ValueError, match='not divisible by num_heads'):
    tsformer_jax.init_params(tiny_config(num_heads=5), jax.random.key(0))
