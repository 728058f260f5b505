"""The training step the benchmarks time and measure, and its memory.

One plain step of `config.model` on `[B, T, H, W, 3]` clips: forward,
cross-entropy, backward and the recipe's update (`train.create_optimizer`:
SGD with Nesterov momentum and weight decay, as `torch.optim.SGD` takes
it). Unlike `train.train_step` it has no train state, gradient
accumulation, mixup or input normalisation, so that PyTorch can run the
same step (`torch_sgd`) and XLA's analysis of it counts the model and the
update alone.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import optax

import tsformer_jax
from tsformer_jax import train

# Steps the schedule counts as one epoch: far more than any benchmark runs,
# so that the rate stays `config.optimizer.learning_rate` throughout.
STEPS_PER_EPOCH = 10_000


def train_step(config) -> tuple[Callable, optax.GradientTransformation]:
  """`(step, tx)`: `step(params, opt_state, clips, labels, rng)` returns the
  new params, optimizer state and the mean loss; `tx` makes the state."""
  model = tsformer_jax.create_model(config)
  tx = train.create_optimizer(config, STEPS_PER_EPOCH)

  def step(params, opt_state, clips, labels, rng):
    def loss_fn(p):
      logits = model.apply({'params': p}, clips, train=True,
                           rngs={'dropout': rng})
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, tx


def lower_train_step(config, batch_size: int = 1,
                     compiler_options: dict[str, str] | None = None
                     ) -> jax.stages.Lowered:
  """`train_step` jitted with params and optimizer state donated, lowered
  on abstract `(params, opt_state, clips [B, T, H, W, 3], labels [B], rng)`
  for B = `batch_size`; nothing is allocated. `compiler_options` go to XLA
  (None: its defaults, as training uses)."""
  step, tx = train_step(config)
  params = jax.eval_shape(
      lambda: tsformer_jax.init_params(config, jax.random.key(0)))
  opt_state = jax.eval_shape(tx.init, params)
  clips = jax.ShapeDtypeStruct(
      tsformer_jax.dummy_clips(config, batch_size).shape, np.float32)
  labels = jax.ShapeDtypeStruct((batch_size,), np.int32)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  return jax.jit(step, donate_argnums=(0, 1),
                 compiler_options=compiler_options).lower(
                     params, opt_state, clips, labels, rng)


def train_step_memory(config, batch_size: int = 1) -> dict[str, int]:
  """XLA's memory analysis of `train_step` compiled for `batch_size` clips
  on the default backend; nothing is allocated.

  Returns bytes: `arguments` (params, optimizer state, clips), `temp`
  (activations kept for the backward pass and scratch), `output`, `alias`
  (outputs written over donated arguments) and `peak`, their sum less the
  aliased part.
  """
  memory = lower_train_step(config, batch_size).compile().memory_analysis()
  sizes = dict(arguments=memory.argument_size_in_bytes,
               temp=memory.temp_size_in_bytes,
               output=memory.output_size_in_bytes,
               alias=memory.alias_size_in_bytes)
  sizes = {k: int(v) for k, v in sizes.items()}
  sizes['peak'] = (sizes['arguments'] + sizes['temp'] + sizes['output'] -
                   sizes['alias'])
  return sizes


def torch_sgd(config) -> dict:
  """`torch.optim.SGD`'s arguments for the update `train_step` makes
  (`train.create_optimizer` takes torch's step; see its comment)."""
  opt = config.optimizer
  if opt.name != 'sgd' or opt.grad_clip_norm:
    raise ValueError(f'optimizer.name={opt.name!r}, grad_clip_norm='
                     f'{opt.grad_clip_norm}: torch_sgd states plain SGD '
                     "only; use optimizer.name='sgd' and grad_clip_norm=0.")
  return dict(lr=opt.learning_rate, momentum=opt.momentum,
              nesterov=opt.nesterov, weight_decay=opt.weight_decay)
