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

The class token. In a step with `with_cls=True` a copy of the class token
joins every group as one more query and key, and the copies' outputs are
averaged over the groups that hold a real patch, as the original's spatial
step does with one copy per frame (for `joint`, one group: an ordinary
token). The model projects and drops (stochastic depth) each copy with its
group before that average: `attend_in_groups`, then `merge_groups`. Time
steps leave it out, as the original's divided block does, and axial
attention follows suit. `space_only`, the per-frame image model,
carries one class token per frame (`cls: [B, T, ...]`), each attending only
within its own frame; the model averages them at the end.

Grids that do not divide. `local` cuts height and width into halves of
ceil(H/2) and ceil(W/2) patches, and `global` groups patches by the parity
of (t, h, w). Both pad the grid to even sizes with masked-out tokens so that
groups are equal-sized arrays; padding is never attended to, its outputs are
dropped, and a group of padding only does not count in the class-token
average. Each step equals one full attention over the clip, masked to that
step's (query, key) pairs.
"""

from __future__ import annotations

import dataclasses
import math

import einops
import jax
import jax.numpy as jnp
import numpy as np

from tsformer_jax import kernels

Array = jax.Array
Grid = tuple[int, int, int]  # (T, H, W): frames and patches per column and row.

# Kernel names as they were before moving to `tsformer_jax.kernels`.
Implementation = kernels.Implementation
IMPLEMENTATIONS = kernels.IMPLEMENTATIONS
QUERY_CHUNK = kernels.chunked.QUERY_CHUNK
KEY_CHUNK = kernels.chunked.KEY_CHUNK
CPU_ATTENTION_MIN_LENGTH = kernels.cpu.CPU_ATTENTION_MIN_LENGTH
chunked_attention = kernels.chunked.chunked_attention
cpu_attention = kernels.cpu.cpu_attention


def attend(q: Array, k: Array, v: Array, mask: Array | None = None, *,
           implementation: Implementation = 'einsum',
           dropout_rate: float = 0.0,
           dropout_rng: Array | None = None) -> Array:
  """softmax(q k^T / sqrt(D_h)) v over the token axis.

  Args:
    q: queries `[..., Lq, H, Dh]`; any number of leading batch axes.
    k: keys `[..., Lk, H, Dh]`.
    v: values `[..., Lk, H, Dh]`.
    mask: optional boolean, broadcastable to `[..., H, Lq, Lk]`; False
      entries are excluded from the softmax.
    implementation: `'einsum'`, the reference written out below, or a
      backend kernel of `tsformer_jax.kernels` (`kernels.IMPLEMENTATIONS`).
    dropout_rate: attention dropout on the softmax weights. Only the einsum
      reference drops weights, so it runs whenever dropout is active.
    dropout_rng: PRNG key for the attention dropout.

  Returns:
    `[..., Lq, H, Dh]` in the dtype of `v`.
  """
  kernel = kernels.get_kernel(implementation)
  dropout = dropout_rate > 0.0 and dropout_rng is not None
  if kernel is not None and not dropout:
    return kernel(q, k, v, mask)
  weights = attention_weights(q, k, mask)
  if dropout:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate,
                                weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  return weighted_values(weights, v)


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

  `attend_in_groups`, then `merge_groups`; see those for the arguments.

  Returns:
    `(out [B, T, N, H, Dh], cls_out [B, C, H, Dh] or None)`, and with
    `return_weights` a third element, the weights `[B, G, H, L, L]`.
  """
  y, weights = attend_in_groups(qkv, cls_qkv, grouping, grid,
                                return_weights=return_weights,
                                **attend_kwargs)
  num_cls = 0 if cls_qkv is None else cls_qkv.shape[1]
  out, cls_out = merge_groups(y, grouping, grid, num_cls)
  if return_weights:
    return out, cls_out, weights
  return out, cls_out


def attend_in_groups(qkv: Array, cls_qkv: Array | None, grouping: str,
                     grid: Grid, *, return_weights: bool = False,
                     **attend_kwargs) -> tuple[Array, Array | None]:
  """Attention inside each group of `grouping`, outputs left in groups.

  Args:
    qkv: queries, keys and values of the patches, `[B, T, N, 3, H, Dh]`.
    cls_qkv: those of the class token, `[B, C, 3, H, Dh]`, or None when the
      class token does not take part. With C == 1 a copy of the class token
      joins every group; with C == G (the number of groups, e.g. one class
      token per frame for `space_only`) copy c joins group c only.
    grouping: a key of `GROUPINGS`.
    grid: `(T, H, W)` with `N == H * W`.
    return_weights: also return the softmax weights, computed once with the
      einsum reference and used for the output too.
    **attend_kwargs: passed to `attend` (implementation, dropout).

  Returns:
    `(y [B, G, L, H, Dh], weights [B, G, H, L, L] or None)` in the group
    order of `GROUPINGS[grouping].split`, weights float32. With the class
    token, position 0 of every group is its copy of the class token, and L
    counts it.
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
  if return_weights:
    weights = attention_weights(q, k, mask)  # [B, G, H, L, L]
    return weighted_values(weights, v), weights
  return attend(q, k, v, mask, **attend_kwargs), None


def merge_groups(y: Array, grouping: str, grid: Grid, num_cls: int
                 ) -> tuple[Array, Array | None]:
  """`attend_in_groups`'s layout back to tokens: the inverse of the split.

  Args:
    y: `[B, G, L, ...]`, position 0 of each group its class-token copy when
      `num_cls`.
    grouping: a key of `GROUPINGS`.
    grid: `(T, H, W)`.
    num_cls: C, the class tokens that took part (0 for none). With C == 1
      the copies' outputs are averaged over the groups that hold real
      patches, as the original averages its per-frame copies; with C == G
      copy c is class token c.

  Returns:
    `(patches [B, T, N, ...], cls [B, C, ...] or None)`.
  """
  group = GROUPINGS[grouping]
  cls = None
  if num_cls:
    cls, y = y[:, :, 0], y[:, :, 1:]
    if num_cls == 1 and y.shape[1] > 1:
      cls = _mean_over_real_groups(cls, group.valid(grid))
  return group.merge(y, grid), cls


def _mean_over_real_groups(cls: Array, valid: np.ndarray | None) -> Array:
  """`[B, G, ...]` -> `[B, 1, ...]`, skipping groups of padding only.

  `valid: [G, L]` marks the real patches of each group (None: all real).
  """
  if valid is None:
    return cls.mean(axis=1, keepdims=True)
  weights = valid.any(axis=1).astype(np.float32)
  weights = jnp.asarray(weights / weights.sum(), cls.dtype)
  return jnp.einsum('bg...,g->b...', cls, weights)[:, None]


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
