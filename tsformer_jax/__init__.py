"""tsformer_jax: TimeSformer video transformers in JAX and Flax.

    config = config_lib.get_config('divided', 'base')  # configs/divided.py
    model = tsformer_jax.create_model(config)
    params = tsformer_jax.init_params(config, jax.random.key(0))
    forward = jax.jit(model.apply,  # With the XLA options that suit it.
                      compiler_options=tsformer_jax.inference_compiler_options(
                          config, batch_size=len(clips)))
    logits = forward({'params': params}, clips)
    config, params = tsformer_jax.load_checkpoint(path)  # Any checkpoint.
"""

from tsformer_jax.checkpoints import load_checkpoint
from tsformer_jax.model import TimeSformer
from tsformer_jax.model import create_model
from tsformer_jax.model import dummy_clips
from tsformer_jax.model import inference_compiler_options
from tsformer_jax.model import init_params

__all__ = ['TimeSformer', 'create_model', 'dummy_clips',
           'inference_compiler_options', 'init_params', 'load_checkpoint']
