"""Short-sequence attention as one Pallas kernel (Triton on GPUs).

Divided attention's time step attends over the T frames of each patch
position: groups of 8 (base) or 16 (HR) tokens, one per head and patch
position, each too small for a matrix unit. `temporal_attention` runs such
groups in one pass over memory: each program loads a block of groups for
one head, forms the L x L scores, the softmax and the weighted values with
vector arithmetic in float32, and writes the output and the log-sum-exp.
The backward pass is a second kernel that recomputes the scores from the
log-sum-exp (a custom VJP), so no L x L matrix ever reaches memory.

On GPUs the kernels compile through Pallas' Triton backend; elsewhere they
run in Pallas' interpret mode (the tests, on CPU). Triton wants every block
dimension a power of two, so the supported shapes are `SUPPORTED_LENGTHS`
tokens and `SUPPORTED_HEAD_DIMS` features per head, with no mask; the
`'pallas'` entry of `tsformer_jax.kernels` takes XLA's attention for every
other group.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

Array = jax.Array

SUPPORTED_LENGTHS = (2, 4, 8, 16, 32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Elements of one (groups, L, Dh) block in float32: a few such blocks live
# in registers at once, so this bounds the registers each program needs.
BLOCK_ELEMENTS = 4096
NUM_WARPS = 4
FORWARD_NAME = 'tsformer_temporal_attention_fwd'
BACKWARD_NAME = 'tsformer_temporal_attention_bwd'


def unsupported_reason(q: Array, k: Array, v: Array,
                       mask: Array | None = None) -> str | None:
  """Why `temporal_attention` cannot take these operands; None if it can."""
  if mask is not None:
    return 'it takes no mask'
  if not q.shape == k.shape == v.shape or q.ndim < 3:
    return (f'it needs q, k and v of one shape [..., L, H, Dh], got '
            f'{q.shape}, {k.shape}, {v.shape}')
  length, _, head_dim = q.shape[-3:]
  if length not in SUPPORTED_LENGTHS:
    return f'L = {length} is not one of {SUPPORTED_LENGTHS}'
  if head_dim not in SUPPORTED_HEAD_DIMS:
    return f'Dh = {head_dim} is not one of {SUPPORTED_HEAD_DIMS}'
  if not q.dtype == k.dtype == v.dtype or q.dtype not in SUPPORTED_DTYPES:
    return (f'dtypes {q.dtype}, {k.dtype}, {v.dtype}: it takes one of '
            'float32, bfloat16, float16')
  return None


def supports(q: Array, k: Array, v: Array, mask: Array | None = None) -> bool:
  return unsupported_reason(q, k, v, mask) is None


def block_groups(groups: int, length: int, head_dim: int,
                 block_elements: int = BLOCK_ELEMENTS) -> int:
  """Groups per program: the largest power of two that divides `groups`
  and keeps a block within `block_elements`."""
  limit = max(1, block_elements // (length * head_dim))
  block = 1
  while block * 2 <= limit and groups % (block * 2) == 0:
    block *= 2
  return block


def temporal_attention(q: Array, k: Array, v: Array,
                       mask: Array | None = None, *,
                       block_batch: int | None = None,
                       interpret: bool | None = None) -> Array:
  """softmax(q k^T / sqrt(Dh)) v over short groups, in Pallas kernels.

  Args:
    q, k, v: `[..., L, H, Dh]` of one shape and dtype, L in
      `SUPPORTED_LENGTHS`, Dh in `SUPPORTED_HEAD_DIMS`.
    mask: must be None (raises otherwise).
    block_batch: groups per program (a power of two dividing the number of
      groups); default `block_groups`.
    interpret: Pallas' interpret mode; default: everywhere but on GPUs.

  Returns:
    `[..., L, H, Dh]` in the dtype of `v`.

  Raises:
    ValueError: for operands outside the supported shapes, naming them.
  """
  reason = unsupported_reason(q, k, v, mask)
  if reason is not None:
    raise ValueError(
        f'Pallas temporal attention does not apply: {reason}. It supports '
        f'q, k, v [..., L, H, Dh] of one shape, L in {SUPPORTED_LENGTHS}, '
        f'Dh in {SUPPORTED_HEAD_DIMS}, no mask; use attention_impl '
        "'pallas' (XLA's attention for other groups) or 'xla'.")
  length, heads, head_dim = q.shape[-3:]
  groups = math.prod(q.shape[:-3])
  if block_batch is None:
    block_batch = block_groups(groups, length, head_dim)
  if block_batch < 1 or groups % block_batch or block_batch & (
      block_batch - 1):
    raise ValueError(f'block_batch {block_batch} must be a power of two '
                     f'dividing the {groups} groups.')
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'
  # [G, L, H * Dh]: a free reshape; a program takes head h's Dh columns.
  flat = lambda a: a.reshape(groups, length, heads * head_dim)
  out = _attention(flat(q), flat(k), flat(v), heads, block_batch,
                   bool(interpret))
  return out.reshape(q.shape)


def _specs(groups_per_block: int, length: int, head_dim: int):
  """Block specs of a `[G, L, H * Dh]` operand and a `[H, G, L]` one."""
  tokens = pl.BlockSpec((groups_per_block, length, head_dim),
                        lambda i, h: (i, 0, h))
  per_token = pl.BlockSpec((1, groups_per_block, length),
                           lambda i, h: (h, i, 0))
  return tokens, per_token


def _compiler_params():
  """Triton's launch settings, under the name this jax version uses."""
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  if hasattr(pltriton, 'CompilerParams'):
    return pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)
  return pltriton.TritonCompilerParams(num_warps=NUM_WARPS, num_stages=1)


def _scores(q: Array, k_ref, length: int) -> list[Array]:
  """q `[bb, L, Dh]` (scaled, float32) against each key: L of `[bb, L]`."""
  return [jnp.sum(q * k_ref[:, j, :].astype(jnp.float32)[:, None, :],
                  axis=-1) for j in range(length)]


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, length: int,
                    scale: float):
  q = q_ref[...].astype(jnp.float32) * scale
  scores = _scores(q, k_ref, length)
  peak = functools.reduce(jnp.maximum, scores)
  weights = [jnp.exp(s - peak) for s in scores]
  total = functools.reduce(jnp.add, weights)
  out = functools.reduce(jnp.add, (
      w[:, :, None] * v_ref[:, j, :].astype(jnp.float32)[:, None, :]
      for j, w in enumerate(weights)))
  o_ref[...] = (out / total[:, :, None]).astype(o_ref.dtype)
  lse_ref[0] = peak + jnp.log(total)


def _backward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, do_ref, dq_ref,
                     dk_ref, dv_ref, *, length: int, scale: float):
  q = q_ref[...].astype(jnp.float32) * scale
  do = do_ref[...].astype(jnp.float32)
  lse = lse_ref[0]
  # D_i = dO_i . O_i, the softmax derivative's correction per query.
  delta = jnp.sum(do * o_ref[...].astype(jnp.float32), axis=-1)
  dq = jnp.zeros(q.shape, jnp.float32)
  for j in range(length):
    k_j = k_ref[:, j, :].astype(jnp.float32)
    v_j = v_ref[:, j, :].astype(jnp.float32)
    p = jnp.exp(jnp.sum(q * k_j[:, None, :], axis=-1) - lse)  # [bb, Lq]
    dv_ref[:, j, :] = jnp.sum(p[:, :, None] * do, axis=1).astype(
        dv_ref.dtype)
    ds = p * (jnp.sum(do * v_j[:, None, :], axis=-1) - delta)
    # q was scaled already: this is scale * sum_i ds_ij q_i.
    dk_ref[:, j, :] = jnp.sum(ds[:, :, None] * q, axis=1).astype(
        dk_ref.dtype)
    dq = dq + ds[:, :, None] * k_j[:, None, :]
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _forward(q, k, v, heads, block_batch, interpret):
  groups, length, width = q.shape
  head_dim = width // heads
  tokens, per_token = _specs(block_batch, length, head_dim)
  kernel = functools.partial(_forward_kernel, length=length,
                             scale=1.0 / math.sqrt(head_dim))
  out, lse = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct(q.shape, v.dtype),
                 jax.ShapeDtypeStruct((heads, groups, length), jnp.float32)),
      grid=(groups // block_batch, heads),
      in_specs=[tokens] * 3, out_specs=(tokens, per_token),
      interpret=interpret, name=FORWARD_NAME,
      compiler_params=None if interpret else _compiler_params())(q, k, v)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, heads, block_batch, interpret):
  return _forward(q, k, v, heads, block_batch, interpret)[0]


def _attention_fwd(q, k, v, heads, block_batch, interpret):
  out, lse = _forward(q, k, v, heads, block_batch, interpret)
  return out, (q, k, v, out, lse)


def _attention_bwd(heads, block_batch, interpret, residuals, dout):
  q, k, v, out, lse = residuals
  groups, length, width = q.shape
  head_dim = width // heads
  tokens, per_token = _specs(block_batch, length, head_dim)
  kernel = functools.partial(_backward_kernel, length=length,
                             scale=1.0 / math.sqrt(head_dim))
  return pl.pallas_call(
      kernel,
      out_shape=tuple(jax.ShapeDtypeStruct(a.shape, a.dtype)
                      for a in (q, k, v)),
      grid=(groups // block_batch, heads),
      in_specs=[tokens] * 4 + [per_token, tokens],
      out_specs=(tokens,) * 3,
      interpret=interpret, name=BACKWARD_NAME,
      compiler_params=None if interpret else _compiler_params())(
          q, k, v, out, lse, dout.astype(out.dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)
