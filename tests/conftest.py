"""Test helpers: tiny configs and their parameters, clips, jitted apply."""

import functools

import jax
import numpy as np

import tsformer_jax
from tsformer_jax import attention
from tsformer_jax import config_lib

SCHEMES = sorted(attention.SCHEMES)


def tiny_config(scheme='divided', **model):
  config = config_lib.get_config(scheme, 'tiny')
  config.model.update(model)
  return config


def tiny_params(scheme='divided', seed=0, **model):
  """Initialised parameters of `tiny_config(scheme, **model)`, cached:
  compiling the initialisers takes seconds on CPU."""
  return _tiny_params(scheme, seed, tuple(sorted(model.items())))


@functools.cache
def _tiny_params(scheme, seed, model):
  return tsformer_jax.init_params(tiny_config(scheme, **dict(model)),
                                  jax.random.key(seed))


def random_clips(config, batch_size=2, seed=0):
  m = config.model
  shape = (batch_size, m.num_frames) + tuple(m.image_size) + (3,)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def apply(model, params, clips, train=False, rng=None):
  """`model.apply` under jit (eager flax runs op by op and is slow on CPU)."""
  return _jitted_apply(model, train)(params, clips, rng)


@functools.cache
def _jitted_apply(model, train):
  def forward(params, clips, rng):
    rngs = {} if rng is None else {'dropout': rng}
    return model.apply({'params': params}, clips, train=train, rngs=rngs)
  return jax.jit(forward)
