"""The space-time attention schemes of TimeSformer over `[B, T, N, D]` tokens.

A clip of T frames is a grid of T x H x W patches (N = H * W per frame) plus
one class token. Every scheme of the paper (Bertasius et al. 2021, Sec. 3 and
Fig. 2) is a sequence of *steps*. A step cuts the patches into independent
groups and runs softmax self-attention inside each group:

    y_g = softmax(q_g k_g^T / sqrt(D_h)) v_g       for every group g.

What differs between the schemes is only how the groups are cut:

| scheme                | steps (in order)    | patch (t, h, w) attends to   |
|-----------------------|---------------------|------------------------------|
| `space_only`          | space               | its own frame t              |
| `joint`               | joint               | every patch of the clip      |
| `divided`             | time, space         | (., h, w) then (t, ., .)     |
| `sparse_local_global` | local, global       | its F x H/2 x W/2 window,    |
|                       |                     | then every 2nd in t, h and w |
| `axial`               | time, width, height | (., h, w), (t, h, .), then   |
|                       |                     | (t, ., w)                    |

The class token. In a step with `with_cls=True` the class token joins every
group as one more query and key: each group sees a copy of it, and the copies'
outputs are averaged over the groups that hold at least one real patch. This
is exactly what the original implementation does in the spatial step of
divided attention (the class token is repeated once per frame and the
per-frame results averaged); for `joint` there is a single group, so the
class token is an ordinary token. Temporal steps (`time`) leave the class
token out, as the original divided block does; axial attention follows the
same rule (time without, width and height with the class token) and sparse
local-global lets it join both of its steps. `space_only` is the per-frame
image model: it carries one class token per frame (`cls: [B, T, ...]`), each
attending only within its own frame, and the model averages them at the end.

Grids that do not divide. `local` cuts height and width into two halves of
ceil(H/2) and ceil(W/2) patches (the last half is smaller when H or W is odd),
and `global` groups patches by the parity of (t, h, w). Both pad the grid to
even sizes with masked-out tokens so that groups become equal-sized arrays;
padded tokens are never attended to and their outputs are dropped, and a
group made only of padding (H == 1, say) does not count in the class-token
average. Every step gives the same result as one full attention over the clip
with a mask that allows exactly that step's (query, key) pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import einops
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Grid = tuple[int, int, int]  # (T, H, W): frames and patches per column and row.
Implementation = Literal['einsum', 'xla', 'cudnn', 'chunked', 'cpu', 'auto']
IMPLEMENTATIONS = ('einsum', 'xla', 'cudnn', 'chunked', 'cpu', 'auto')
# Query and key block sizes of the chunked (memory-efficient) attention.
QUERY_CHUNK = 1024
KEY_CHUNK = 4096


def attend(q: Array, k: Array, v: Array, mask: Array | None = None, *,
           implementation: Implementation = 'einsum',
           dropout_rate: float = 0.0,
           dropout_rng: Array | None = None) -> Array:
  """softmax(q k^T / sqrt(D_h)) v over the second-to-last-but-one axis.

  Args:
    q: queries `[..., Lq, H, Dh]`; any number of leading batch axes.
    k: keys `[..., Lk, H, Dh]`.
    v: values `[..., Lk, H, Dh]`.
    mask: optional boolean, broadcastable to `[..., H, Lq, Lk]`; False
      entries are excluded from the softmax.
    implementation: `'einsum'` is the reference written out below; `'xla'`
      and `'cudnn'` call `jax.nn.dot_product_attention` (cuDNN's fused
      kernel needs a GPU and half precision); `'chunked'` never holds more
      than a `QUERY_CHUNK x KEY_CHUNK` block of scores (`chunked_attention`);
      `'cpu'` lays out every product, forward and backward, for XLA's CPU
      kernels (`cpu_attention`; no mask); `'auto'` takes cuDNN where its
      shape rules allow, `'cpu'` on CPU for unmasked float32 groups of at
      least `CPU_ATTENTION_MIN_LENGTH` tokens, and XLA elsewhere.
    dropout_rate: attention dropout on the softmax weights. Only the einsum
      path can drop weights, so it is used whenever dropout is active.
    dropout_rng: PRNG key for the attention dropout.

  Returns:
    `[..., Lq, H, Dh]` in the dtype of `v`.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown attention implementation {implementation!r}; '
                     f'valid: {IMPLEMENTATIONS}.')
  if dropout_rate > 0.0 and dropout_rng is not None:
    implementation = 'einsum'
  if implementation == 'auto':
    if _cudnn_may_apply(q, mask):
      try:
        return _fused_attention(q, k, v, mask, 'cudnn')
      except NotImplementedError:
        pass  # cuDNN's own shape rules (they vary by version) said no.
    implementation = 'cpu' if _cpu_attention_may_apply(q, mask) else 'xla'
  if implementation == 'einsum':
    weights = attention_weights(q, k, mask)
    if dropout_rate > 0.0 and dropout_rng is not None:
      keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate,
                                  weights.shape)
      weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return weighted_values(weights, v)
  if implementation == 'chunked':
    return chunked_attention(q, k, v, mask)
  if implementation == 'cpu':
    if mask is not None:
      raise ValueError("implementation='cpu' takes no mask; use 'xla'.")
    return _over_flat_batch(cpu_attention, q, k, v)
  return _fused_attention(q, k, v, mask, implementation)


def attention_weights(q: Array, k: Array, mask: Array | None = None
                      ) -> Array:
  """softmax(q k^T / sqrt(D_h)): `[..., Lq, H, Dh]` -> `[..., H, Lq, Lk]`.

  Logits and softmax are float32 whatever the compute dtype: exp() of
  bfloat16 logits loses the small attention weights.
  """
  logits = jnp.einsum('...qhd,...khd->...hqk', q, k,
                      preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def weighted_values(weights: Array, v: Array) -> Array:
  """weights `[..., H, Lq, Lk]`, v `[..., Lk, H, Dh]` -> `[..., Lq, H, Dh]`."""
  return jnp.einsum('...hqk,...khd->...qhd', weights.astype(v.dtype), v)


def chunked_attention(q: Array, k: Array, v: Array, mask: Array | None = None,
                      *, query_chunk: int = QUERY_CHUNK,
                      key_chunk: int = KEY_CHUNK) -> Array:
  """`attend` in O(query_chunk x key_chunk) memory instead of O(Lq x Lk).

  Rabe and Staats, "Self-attention does not need O(n^2) memory" (2021):
  queries are taken `query_chunk` at a time; for each, every block of
  `key_chunk` keys gives its partial softmax sums relative to its own
  maximum, and the blocks are combined after rescaling to the overall
  maximum. Each block is rematerialised in the backward pass, so training
  does not keep the scores either. Sequences are padded to whole chunks
  (padded keys are masked out, padded queries dropped).

  Args:
    q, k, v, mask: as in `attend`; the mask must be broadcastable to
      `[..., H, Lq, Lk]`.
    query_chunk: queries per block.
    key_chunk: keys per block.

  Returns:
    `[..., Lq, H, Dh]` in the dtype of `v`.
  """
  batch, (lq, h, dh), lk = q.shape[:-3], q.shape[-3:], k.shape[-3]
  qc, kc = min(query_chunk, lq), min(key_chunk, lk)
  nq, nk = -(-lq // qc), -(-lk // kc)
  flat = lambda a: a.reshape((-1,) + a.shape[-3:])
  q, k, v = flat(q), flat(k), flat(v)  # [B, L, H, Dh]
  q = jnp.pad(q, ((0, 0), (0, nq * qc - lq), (0, 0), (0, 0)))
  k = jnp.pad(k, ((0, 0), (0, nk * kc - lk), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, nk * kc - lk), (0, 0), (0, 0)))
  # Batch axes of the mask are broadcast (small: no Lq x Lk product unless
  # the mask itself has one); its query and key axes are padded.
  if mask is None:
    mask = jnp.ones((1, 1, 1, lk), bool)
  else:
    mask = jnp.asarray(mask).reshape(
        (1,) * (len(batch) + 3 - jnp.ndim(mask)) + jnp.shape(mask))
    mask = jnp.broadcast_to(mask, batch + mask.shape[-3:-1] + (lk,))
    mask = mask.reshape((-1,) + mask.shape[-3:])
  mq = mask.shape[-2]
  if mq > 1:
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, nq * qc - lq), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, nk * kc - lk)))
  scale = 1.0 / math.sqrt(dh)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def summarize(q_block, key_index, mask_block):
    """Sums of one query block against one key block, and their max."""
    k_block = jax.lax.dynamic_slice_in_dim(k, key_index * kc, kc, axis=1)
    v_block = jax.lax.dynamic_slice_in_dim(v, key_index * kc, kc, axis=1)
    m_block = jax.lax.dynamic_slice_in_dim(mask_block, key_index * kc, kc,
                                           axis=3)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q_block, k_block,
                        preferred_element_type=jnp.float32) * scale
    logits = jnp.where(m_block, logits, jnp.finfo(jnp.float32).min)
    peak = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    weights = jnp.where(m_block, jnp.exp(logits - peak), 0.0)
    values = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v_block,
                        preferred_element_type=jnp.float32)
    return values, weights.sum(axis=-1), peak[..., 0]

  def query_block(query_index):
    q_block = jax.lax.dynamic_slice_in_dim(q, query_index * qc, qc, axis=1)
    mask_block = (jax.lax.dynamic_slice_in_dim(mask, query_index * qc, qc,
                                               axis=2) if mq > 1 else mask)
    values, sums, peaks = jax.lax.map(
        lambda i: summarize(q_block, i, mask_block), jnp.arange(nk))
    top = peaks.max(axis=0)  # [B, H, qc]
    rescale = jnp.exp(peaks - top)  # [nk, B, H, qc]
    total = jnp.einsum('nbhq,nbhq->bhq', sums, rescale)
    values = jnp.einsum('nbqhd,nbhq->bqhd', values, rescale)
    total = jnp.where(total > 0, total, 1.0)
    return values / jnp.moveaxis(total, 1, 2)[..., None]

  out = jax.lax.map(query_block, jnp.arange(nq))  # [nq, B, qc, H, Dh]
  out = jnp.moveaxis(out, 0, 1).reshape((-1, nq * qc, h, dh))[:, :lq]
  return out.reshape(batch + (lq, h, dh)).astype(v.dtype)


# From this many tokens per group up, `cpu_attention` beats XLA's own choice
# of product forms (base size, depth 4, one process): joint (1569 tokens)
# trains 21% and infers 50% faster, divided (space attention, 197) 8% and
# 10%, space_only the same. At 8 (time attention) its transposes cost more
# than they save (7% slower), and at 50 (small frames) neither wins. In
# bfloat16 neither wins (divided forward 808 vs 824 ms, training step 3.53
# vs 3.59 s), so XLA keeps its own forms there.
CPU_ATTENTION_MIN_LENGTH = 128


def _cpu_attention_may_apply(q, mask) -> bool:
  return (jax.default_backend() == 'cpu' and mask is None and
          q.dtype == jnp.float32 and q.shape[-3] >= CPU_ATTENTION_MIN_LENGTH)


def _transposed(*arrays_and_axes):
  """Each `(array, axes)` transposed, as copies XLA may not fold away.

  XLA folds a transpose into the product next to it and then picks the
  product's form (which operand or output is transposed, which kernel)
  itself; behind an optimisation barrier a transpose stays a copy, and
  the product keeps the form written.
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

  The same function as `attend`'s einsum reference, with each product of
  the forward and backward pass in the form XLA's CPU kernels run
  fastest. XLA sends a product to YNNPACK when both operands are
  row-major (contracted axis last on the left, first on the right) and
  to Eigen otherwise. YNNPACK is fastest when the contracted axis is long
  (the weighted sum p v and the query gradient ds k) and slow when the
  output has only Dh = 64 rows, the form XLA itself picks for the key and
  value gradients (and, to spare a copy of the output, for p v: then it
  copies p transposed instead); Eigen is the faster for q k^T and for
  those gradients written with a feature-major left operand. At 1569
  tokens (joint, base) the gradients' products run 2-3x faster so.
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


def _cudnn_may_apply(q, mask) -> bool:
  on_gpu = jax.default_backend() == 'gpu'
  half = q.dtype in (jnp.bfloat16, jnp.float16)
  head_dim_ok = q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
  return on_gpu and half and head_dim_ok and mask is None


def _over_flat_batch(attention_fn, q, k, v):
  """`attention_fn` on `[B, L, H, Dh]`, for any leading batch axes."""
  batch = q.shape[:-3]
  flat = lambda a: a.reshape((-1,) + a.shape[-3:])
  out = attention_fn(flat(q), flat(k), flat(v))
  return out.reshape(batch + out.shape[-3:])


def _fused_attention(q, k, v, mask, implementation):
  """`jax.nn.dot_product_attention`, with the mask folded as the batch."""
  if mask is not None:
    mask = jnp.broadcast_to(mask, q.shape[:-3] + (q.shape[-2], q.shape[-3],
                                                  k.shape[-3]))
    mask = mask.reshape((-1,) + mask.shape[-3:])
  return _over_flat_batch(
      functools.partial(jax.nn.dot_product_attention, mask=mask,
                        implementation=implementation), q, k, v)


@dataclasses.dataclass(frozen=True)
class Grouping:
  """How one attention step cuts the T x H x W patch grid into groups.

  Attributes:
    pattern: einops pattern from the grid `b t h w ...` to
      `b groups members ...`. Axes `i`, `j`, `k` split time, height and width
      into `tile` parts.
    tile: the grid is padded to multiples of `(t, h, w)` before `pattern`
      applies; the factor axes `i`, `j`, `k` have these sizes.
  """
  pattern: str
  tile: tuple[int, int, int] = (1, 1, 1)

  def padded(self, grid: Grid) -> Grid:
    return tuple(-(-n // m) * m for n, m in zip(grid, self.tile, strict=True))

  def _sizes(self, grid: Grid) -> dict[str, int]:
    padded = self.padded(grid)
    sizes = dict(t=padded[0] // self.tile[0], h=padded[1] // self.tile[1],
                 w=padded[2] // self.tile[2], i=self.tile[0], j=self.tile[1],
                 k=self.tile[2])
    names = set(self.pattern.replace('(', ' ').replace(')', ' ').split())
    return {name: size for name, size in sizes.items() if name in names}

  def split(self, x: Array, grid: Grid) -> Array:
    """`[B, T, N, ...]` -> `[B, G, L, ...]` (padding where `tile` asks)."""
    t, h, w = grid
    x = x.reshape(x.shape[:2] + (h, w) + x.shape[3:])
    pad = [(0, p - n) for p, n in zip(self.padded(grid), grid, strict=True)]
    if any(after for _, after in pad):
      # numpy stays numpy, so that `valid` is static under jit.
      xp = np if isinstance(x, np.ndarray) else jnp
      x = xp.pad(x, [(0, 0)] + pad + [(0, 0)] * (x.ndim - 4))
    return einops.rearrange(x, self.pattern, **self._sizes(grid))

  def merge(self, y: Array, grid: Grid) -> Array:
    """The inverse of `split`: `[B, G, L, ...]` -> `[B, T, N, ...]`."""
    t, h, w = grid
    lhs, rhs = self.pattern.split('->')
    x = einops.rearrange(y, f'{rhs} -> {lhs}', **self._sizes(grid))
    x = x[:, :t, :h, :w]
    return x.reshape(x.shape[:2] + (h * w,) + x.shape[4:])

  def valid(self, grid: Grid) -> np.ndarray | None:
    """Static `[G, L]` mask of real (not padded) tokens; None if no padding."""
    if self.padded(grid) == tuple(grid):
      return None
    real = np.ones((1, grid[0], grid[1] * grid[2]), bool)
    return self.split(real, grid)[0]

  def num_groups(self, grid: Grid) -> int:
    return self.split(np.zeros((1, grid[0], grid[1] * grid[2])), grid).shape[1]


GROUPINGS = {
    'space': Grouping('b t h w ... -> b t (h w) ...'),
    'joint': Grouping('b t h w ... -> b 1 (t h w) ...'),
    'time': Grouping('b t h w ... -> b (h w) t ...'),
    'width': Grouping('b t h w ... -> b (t h) w ...'),
    'height': Grouping('b t h w ... -> b (t w) h ...'),
    # Two halves of height and width (j, k), each window all frames deep.
    'local': Grouping('b t (j h) (k w) ... -> b (j k) (t h w) ...', (1, 2, 2)),
    # Stride 2 in time, height and width: one group per parity (i, j, k).
    'global': Grouping('b (t i) (h j) (w k) ... -> b (i j k) (t h w) ...',
                       (2, 2, 2)),
}


def grouped_attention(qkv: Array, cls_qkv: Array | None, grouping: str,
                      grid: Grid, *, return_weights: bool = False,
                      **attend_kwargs):
  """One attention step: attention inside each group of `grouping`.

  Args:
    qkv: queries, keys and values of the patches, `[B, T, N, 3, H, Dh]`.
    cls_qkv: those of the class token, `[B, C, 3, H, Dh]`, or None when the
      class token does not take part. With C == 1 a copy of the class token
      joins every group and the copies' outputs are averaged over the groups
      that hold real patches; with C == G (the number of groups, e.g. one
      class token per frame for `space_only`) copy c joins group c only.
    grouping: a key of `GROUPINGS`.
    grid: `(T, H, W)` with `N == H * W`.
    return_weights: also return the softmax weights, computed once with the
      einsum reference and used for the output too.
    **attend_kwargs: passed to `attend` (implementation, dropout).

  Returns:
    `(out [B, T, N, H, Dh], cls_out [B, C, H, Dh] or None)`, and with
    `return_weights` a third element, the weights `[B, G, H, L, L]` in the
    group order of `GROUPINGS[grouping].split` (float32). With the class
    token, position 0 of every group is its copy of the class token, and
    L counts it.
  """
  if grouping not in GROUPINGS:
    raise ValueError(f'Unknown grouping {grouping!r}; valid: '
                     f'{sorted(GROUPINGS)}.')
  group = GROUPINGS[grouping]
  tokens = group.split(qkv, grid)  # [B, G, L, 3, H, Dh]
  valid = group.valid(grid)  # [G, L] or None
  b, g = tokens.shape[:2]
  if cls_qkv is not None:
    c = cls_qkv.shape[1]
    if c not in (1, g):
      raise ValueError(f'{c} class tokens for {g} {grouping!r} groups: '
                       'expected 1 (shared) or one per group.')
    cls = jnp.broadcast_to(cls_qkv[:, :, None], (b, g, 1) + cls_qkv.shape[2:])
    tokens = jnp.concatenate([cls, tokens], axis=2)
    if valid is not None:
      valid = np.pad(valid, ((0, 0), (1, 0)), constant_values=True)
  q, k, v = (tokens[:, :, :, i] for i in range(3))  # [B, G, L, H, Dh]
  mask = None if valid is None else jnp.asarray(valid[:, None, None, :])
  weights = None
  if return_weights:
    weights = attention_weights(q, k, mask)  # [B, G, H, L, L]
    out = weighted_values(weights, v)
  else:
    out = attend(q, k, v, mask, **attend_kwargs)  # [B, G, L, H, Dh]
  cls_out = None
  if cls_qkv is not None:
    cls_out, out = out[:, :, 0], out[:, :, 1:]
    if cls_qkv.shape[1] == 1 and g > 1:
      cls_out = _mean_over_real_groups(cls_out, valid)
  if return_weights:
    return group.merge(out, grid), cls_out, weights
  return group.merge(out, grid), cls_out


def _mean_over_real_groups(cls_out: Array, valid: np.ndarray | None
                           ) -> Array:
  """`[B, G, H, Dh]` -> `[B, 1, H, Dh]`, skipping groups of padding only."""
  if valid is None:
    return cls_out.mean(axis=1, keepdims=True)
  weights = valid[:, 1:].any(axis=1).astype(np.float32)
  weights = jnp.asarray(weights / weights.sum(), cls_out.dtype)
  return jnp.einsum('bghd,g->bhd', cls_out, weights)[:, None]


@dataclasses.dataclass(frozen=True)
class Step:
  """One attention step of a block.

  Attributes:
    grouping: a key of `GROUPINGS`.
    with_cls: whether the class token takes part.
    output_fc: whether the step's output passes through an extra linear layer
      before the residual sum (the original's `temporal_fc`). It starts at
      zero, so a freshly initialised step adds nothing: every block is then
      an ImageNet ViT block, which is what lets image weights start training.
  """
  grouping: str
  with_cls: bool = True
  output_fc: bool = False


@dataclasses.dataclass(frozen=True)
class Scheme:
  """An attention scheme: the steps of every block.

  Attributes:
    steps: run in order inside each block, each with its own parameters.
    per_frame: the per-frame image model (`space_only`): one class token per
      frame, no time embedding, class tokens averaged before the final norm.
  """
  steps: tuple[Step, ...]
  per_frame: bool = False


SCHEMES = {
    'space_only': Scheme((Step('space'),), per_frame=True),
    'joint': Scheme((Step('joint'),)),
    'divided': Scheme((Step('time', with_cls=False, output_fc=True),
                       Step('space'))),
    'sparse_local_global': Scheme((Step('local', output_fc=True),
                                   Step('global'))),
    'axial': Scheme((Step('time', with_cls=False, output_fc=True),
                     Step('width', output_fc=True),
                     Step('height'))),
}


def get_scheme(name: str) -> Scheme:
  if name not in SCHEMES:
    raise ValueError(f'Unknown attention scheme {name!r}; valid: '
                     f'{sorted(SCHEMES)}.')
  return SCHEMES[name]
