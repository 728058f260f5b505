"""Products laid out for XLA's CPU kernels, and the XLA options to match.

XLA's CPU backend hands a product to YNNPACK when both operands are
row-major (contracted axis last on the left, first on the right) and to
Eigen otherwise, and picks a product's form itself wherever a transpose
can fold into it. The functions here fix the forms that run fastest. The
measured speeds are in `docs/performance.md` ("CPU against PyTorch") and
`experiments/results/cpu_kernels.md`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@functools.cache
def _cpu_has_bfloat16_units() -> bool:
  """Whether this machine's CPU multiplies bfloat16 natively (Linux)."""
  try:
    with open('/proc/cpuinfo') as f:
      flags = set(f.read().split())
  except OSError:
    return False
  return bool(flags & {'amx_bf16', 'avx512_bf16'})


def sum_in_float32(dtype) -> bool:
  """Whether products of `dtype` should ask XLA for a float32 result.

  YNNPACK multiplies bfloat16 only into float32: a bfloat16 -> bfloat16
  product misses a CPU's bfloat16 units. Without such units XLA converts
  bfloat16 products to float32 ones itself; GPUs sum in float32 already.
  """
  return (dtype == jnp.bfloat16 and jax.default_backend() == 'cpu' and
          _cpu_has_bfloat16_units())


def dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                preferred_element_type=None) -> Array:
  """`lax.dot_general`, summed in float32 where `sum_in_float32` says so
  (and rounded once to the inputs' dtype, as the plain product is)."""
  dtype = jnp.result_type(lhs, rhs)
  if not sum_in_float32(dtype):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers,
                               precision=precision,
                               preferred_element_type=preferred_element_type)
  out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                            preferred_element_type=jnp.float32)
  return out.astype(dtype)


def conv_general_dilated(lhs: Array, rhs: Array, *args, **kwargs) -> Array:
  """`lax.conv_general_dilated`, summed in float32 as `dot_general`."""
  dtype = jnp.result_type(lhs, rhs)
  if not sum_in_float32(dtype):
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
  kwargs['preferred_element_type'] = jnp.float32
  return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs).astype(dtype)


def _matmul(a: Array, b: Array) -> Array:
  """a [M, K] @ b [K, N] through `dot_general`."""
  return dot_general(a, b, (((1,), (0,)), ((), ())))


@jax.custom_vjp
def _cpu_linear(x: Array, kernel: Array) -> Array:
  """x [M, K] @ kernel [K, N], with a weight gradient fit for XLA's CPU.

  For x^T dy XLA transposes an operand for YNNPACK and fuses that
  transpose into the elementwise work before it (GELU's derivative, the
  q/k/v concatenation), a slow strided loop. Here the narrower of x and
  dy is transposed on its own, behind an optimisation barrier that keeps
  it a plain copy (speeds: `experiments/results/cpu_kernels.md`).
  """
  return _matmul(x, kernel)


def _cpu_linear_fwd(x, kernel):
  return _matmul(x, kernel), (x, kernel)


def _cpu_linear_bwd(residuals, dy):
  """dy [M, N] -> (dx [M, K], dkernel [K, N])."""
  x, kernel = residuals
  dx = dot_general(dy, kernel, (((1,), (1,)), ((), ())))
  copy = lambda a: jax.lax.optimization_barrier(a.T)
  if x.shape[1] <= dy.shape[1]:
    dkernel = _matmul(copy(x), dy)
  else:
    dkernel = _matmul(copy(dy), x).T
  return dx, dkernel


_cpu_linear.defvjp(_cpu_linear_fwd, _cpu_linear_bwd)


def linear_dot_general(lhs: Array, rhs: Array, dimension_numbers,
                       precision=None, preferred_element_type=None) -> Array:
  """The product of flax's `Dense`/`DenseGeneral`, via `_cpu_linear` on CPU.

  Those contract the input's trailing axes with the kernel's leading ones,
  without batch axes; any other product, and other backends (whose kernels
  read transposed operands in place), take `dot_general`.
  """
  (lhs_contract, rhs_contract), batch = dimension_numbers
  n = len(lhs_contract)
  is_linear = (
      not any(batch) and precision is None and
      preferred_element_type is None and
      tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim)) and
      tuple(rhs_contract) == tuple(range(n)))
  if not (is_linear and jax.default_backend() == 'cpu'):
    return dot_general(lhs, rhs, dimension_numbers, precision=precision,
                       preferred_element_type=preferred_element_type)
  out_shape = lhs.shape[:lhs.ndim - n] + rhs.shape[n:]
  k = int(np.prod(rhs.shape[:n]))
  y = _cpu_linear(lhs.reshape(-1, k), rhs.reshape(k, -1))
  return y.reshape(out_shape)


# The XLA CPU option listing what XLA hands to YNNPACK; '' hands it nothing,
# and every product goes to Eigen.
_YNN_FUSION_OPTION = 'xla_cpu_experimental_ynn_fusion_type'
# From about this many patch tokens per call (3 base clips), XLA fuses layer
# norms and the products around them into YNNPACK graphs.
_YNN_GRAPH_TOKENS = 4096


@functools.cache
def _backend_accepts(option: str, value: str) -> bool:
  """Whether the default backend's compiler knows `option` (jaxlib
  releases differ)."""
  try:
    jax.jit(lambda: 0, compiler_options={option: value}).lower().compile()
  except jax.errors.JaxRuntimeError:
    return False
  return True


def inference_options(tokens: int, dtype) -> dict[str, str]:
  """XLA options for an inference call on `tokens` patch tokens in `dtype`.

  YNNPACK's fused graphs run slower than Eigen, so calls large enough to
  get them send every product to Eigen. Smaller calls, bfloat16 on CPUs
  with bfloat16 units (YNNPACK uses them), training steps and other
  backends keep XLA's defaults, which are as fast or faster there
  (`experiments/results/cpu_kernels.md`).
  """
  if (jax.default_backend() != 'cpu' or tokens < _YNN_GRAPH_TOKENS or
      sum_in_float32(dtype) or
      not _backend_accepts(_YNN_FUSION_OPTION, '')):
    return {}
  return {_YNN_FUSION_OPTION: ''}


# Groups shorter than this keep XLA's own product forms: for time attention
# (8 tokens) `cpu_attention`'s transposes cost more than they save. Neither
# wins in bfloat16, so 'auto' takes it for float32 only.
CPU_ATTENTION_MIN_LENGTH = 128


def attention_may_apply(q: Array, mask: Array | None) -> bool:
  """Whether 'auto' takes `cpu_attention`: long unmasked float32 groups."""
  return (jax.default_backend() == 'cpu' and mask is None and
          q.dtype == jnp.float32 and q.shape[-3] >= CPU_ATTENTION_MIN_LENGTH)


def _transposed(*arrays_and_axes):
  """Each `(array, axes)` transposed, as copies XLA may not fold away.

  XLA folds a transpose into the product next to it and then picks the
  product's form itself; behind an optimisation barrier a transpose stays
  a copy, and the product keeps the form written.
  """
  return jax.lax.optimization_barrier(
      tuple(jnp.transpose(a, axes) for a, axes in arrays_and_axes))


_FEATURE_MAJOR = (0, 2, 3, 1)  # [B, L, H, Dh] -> [B, H, Dh, L]
_HEAD_MAJOR = (0, 2, 1, 3)  # [B, L, H, Dh] <-> [B, H, L, Dh]
_FROM_FEATURE_MAJOR = (0, 3, 1, 2)  # [B, H, Dh, L] -> [B, L, H, Dh]


def _product(equation: str, a: Array, b: Array, axes, dtype) -> Array:
  """einsum(equation, a, b) summed in float32, transposed by `axes` to
  tokens-first as a separate copy, in `dtype`."""
  out = jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)
  return _transposed((out, axes))[0].astype(dtype)


@jax.custom_vjp
def cpu_attention(q: Array, k: Array, v: Array) -> Array:
  """softmax(q k^T / sqrt(D_h)) v, `[B, L, H, Dh]`, shaped for XLA's CPU.

  The einsum reference's function, with each product of the forward and
  backward pass in its fastest form. YNNPACK is fast when the contracted
  axis is long (p v and the query gradient ds k) and slow when the output
  has only Dh rows, the form XLA itself picks for the key and value
  gradients; Eigen is the faster for q k^T and for those gradients written
  with a feature-major left operand (`experiments/results/cpu_kernels.md`).
  """
  return _cpu_attention_fwd(q, k, v)[0]


def _cpu_attention_fwd(q, k, v):
  scale = 1.0 / math.sqrt(q.shape[-1])
  q_t, k_t, v_h = _transposed((q, _FEATURE_MAJOR), (k, _FEATURE_MAJOR),
                              (v, _HEAD_MAJOR))
  logits = jnp.einsum('bhdq,bhdk->bhqk', q_t, k_t,
                      preferred_element_type=jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1)  # [B, H, Lq, Lk]
  out = _product('bhqk,bhkd->bhqd', weights.astype(v.dtype), v_h,
                 _HEAD_MAJOR, v.dtype)
  return out, (q, k, v, weights)


def _cpu_attention_bwd(residuals, dout):
  """dout [B, Lq, H, Dh] -> (dq, dk, dv), each in its input's shape."""
  q, k, v, weights = residuals
  scale = 1.0 / math.sqrt(q.shape[-1])
  dout_t, v_t, dout_h, q_h, k_h = _transposed(
      (dout, _FEATURE_MAJOR), (v, _FEATURE_MAJOR), (dout, _HEAD_MAJOR),
      (q, _HEAD_MAJOR), (k, _HEAD_MAJOR))
  dweights = jnp.einsum('bhdq,bhdk->bhqk', dout_t, v_t,
                        preferred_element_type=jnp.float32)
  # Softmax's derivative: dlogits = p * (dp - sum_k p dp).
  dlogits = weights * (
      dweights - jnp.sum(weights * dweights, axis=-1, keepdims=True))
  dlogits = (dlogits * scale).astype(q.dtype)
  # The key and value gradients sum over the queries: [B, H, Dh, Lk].
  dv = _product('bhqd,bhqk->bhdk', dout_h, weights.astype(v.dtype),
                _FROM_FEATURE_MAJOR, v.dtype)
  dk = _product('bhqd,bhqk->bhdk', q_h, dlogits, _FROM_FEATURE_MAJOR,
                k.dtype)
  dq = _product('bhqk,bhkd->bhqd', dlogits, k_h, _HEAD_MAJOR, q.dtype)
  return dq, dk, dv


cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)
