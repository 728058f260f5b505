"""Backend kernels, apart from the paper's code (`model.py`, `attention.py`).

`config.model.attention_impl` picks the softmax-attention kernel: 'xla' or
'cudnn' (`jax.nn.dot_product_attention`; cuDNN needs a GPU and half
precision), 'chunked' (never holds more than a `QUERY_CHUNK x KEY_CHUNK`
block of scores), 'cpu' (products laid out for XLA's CPU kernels; no mask),
'pallas' (`pallas.temporal_attention`, one Pallas kernel for short
unmasked groups such as divided attention's time step, XLA's attention for
the others), or 'auto': cuDNN where its rules allow, 'cpu' on CPU for
unmasked float32 groups of `cpu.CPU_ATTENTION_MIN_LENGTH` tokens or more,
'xla' elsewhere.
'einsum' is the reference in `attention.py`. A kernel maps q
`[..., Lq, H, Dh]`, k and v `[..., Lk, H, Dh]` and an optional boolean mask
broadcastable to `[..., H, Lq, Lk]` to `[..., Lq, H, Dh]` in v's dtype.
`cpu.py` also holds the products of the linear layers and the patch
embedding, and the XLA options for inference.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax

from tsformer_jax.kernels import chunked
from tsformer_jax.kernels import cpu
from tsformer_jax.kernels import fused
from tsformer_jax.kernels import pallas
from tsformer_jax.kernels.cpu import conv_general_dilated
from tsformer_jax.kernels.cpu import inference_options
from tsformer_jax.kernels.cpu import linear_dot_general

__all__ = ['IMPLEMENTATIONS', 'Implementation', 'KERNELS', 'chunked',
           'conv_general_dilated', 'cpu', 'fused', 'get_kernel',
           'inference_options', 'linear_dot_general', 'pallas']

Array = jax.Array
Implementation = Literal['einsum', 'xla', 'cudnn', 'chunked', 'cpu', 'auto',
                         'pallas']


def _cpu(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
  if mask is not None:
    raise ValueError("implementation='cpu' takes no mask; use 'xla'.")
  return fused.over_flat_batch(cpu.cpu_attention, q, k, v)


def _auto(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
  if fused.cudnn_may_apply(q, mask):
    try:
      return fused.dot_product_attention(q, k, v, mask,
                                         implementation='cudnn')
    except NotImplementedError:
      pass  # cuDNN's own shape rules (they vary by version) said no.
  if cpu.attention_may_apply(q, mask):
    return _cpu(q, k, v)
  return fused.dot_product_attention(q, k, v, mask, implementation='xla')


def _pallas(q: Array, k: Array, v: Array, mask: Array | None = None
            ) -> Array:
  if pallas.supports(q, k, v, mask):
    return pallas.temporal_attention(q, k, v)
  return fused.dot_product_attention(q, k, v, mask, implementation='xla')


KERNELS = {
    'xla': functools.partial(fused.dot_product_attention,
                             implementation='xla'),
    'cudnn': functools.partial(fused.dot_product_attention,
                               implementation='cudnn'),
    'chunked': chunked.chunked_attention,
    'cpu': _cpu,
    'auto': _auto,
    'pallas': _pallas,
}
IMPLEMENTATIONS = ('einsum',) + tuple(KERNELS)


def get_kernel(name: str):
  """The kernel `attention_impl=name` selects; None for 'einsum'."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown attention implementation {name!r}; '
                     f'valid: {IMPLEMENTATIONS}.')
  return KERNELS.get(name)
