"""tsformer_jax: TimeSformer video transformers in JAX and Flax.

    config = configs.divided.get_config('base')   # or config_lib.get_config
    model = tsformer_jax.create_model(config)
    params = tsformer_jax.init_params(config, jax.random.key(0))
    logits = model.apply({'params': params}, clips, train=False)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tsformer_jax import config_lib
from tsformer_jax.model import TimeSformer

__all__ = ['TimeSformer', 'create_model', 'dummy_clips', 'init_params']


def create_model(config) -> TimeSformer:
  """The flax module described by `config.model` (unknown fields fail)."""
  return TimeSformer(**config_lib.check_model_config(config.model))


def dummy_clips(config, batch_size: int = 1, dtype=jnp.float32) -> jax.Array:
  """Zero clips `[B, T, H, W, 3]` of the shape `config.model` expects."""
  model = create_model(config)
  return jnp.zeros((batch_size, model.num_frames) + model.frame_shape + (3,),
                   dtype)


def init_params(config, rng: jax.Array):
  """A freshly initialised `params` pytree for `create_model(config)`."""
  model = create_model(config)
  # Under jit, XLA drops the forward pass that init traces: only the
  # initialisers run.
  init = jax.jit(lambda rng: model.init(rng, dummy_clips(config))['params'])
  return init(rng)
