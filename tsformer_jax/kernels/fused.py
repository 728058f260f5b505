"""Fused attention through `jax.nn.dot_product_attention` ('xla', 'cudnn')."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def over_flat_batch(attention_fn, q: Array, k: Array, v: Array) -> Array:
  """`attention_fn` on `[B, L, H, Dh]`, for any leading batch axes."""
  batch = q.shape[:-3]
  flat = lambda a: a.reshape((-1,) + a.shape[-3:])
  out = attention_fn(flat(q), flat(k), flat(v))
  return out.reshape(batch + out.shape[-3:])


def cudnn_may_apply(q: Array, mask: Array | None) -> bool:
  """cuDNN's fused kernel needs a GPU, half precision and Dh <= 128."""
  on_gpu = jax.default_backend() == 'gpu'
  half = q.dtype in (jnp.bfloat16, jnp.float16)
  head_dim_ok = q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
  return on_gpu and half and head_dim_ok and mask is None


def dot_product_attention(q: Array, k: Array, v: Array,
                          mask: Array | None = None, *,
                          implementation: str = 'xla') -> Array:
  """`jax.nn.dot_product_attention`, with the mask folded as the batch."""
  if mask is not None:
    mask = jnp.broadcast_to(mask, q.shape[:-3] + (q.shape[-2], q.shape[-3],
                                                  k.shape[-3]))
    mask = mask.reshape((-1,) + mask.shape[-3:])
  return over_flat_batch(
      functools.partial(jax.nn.dot_product_attention, mask=mask,
                        implementation=implementation), q, k, v)
