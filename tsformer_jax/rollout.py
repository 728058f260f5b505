"""Attention rollout (Abnar and Zuidema, 2020) for every attention scheme.

Works on the token list [class token(s); T * N patches] of M = C + T * N
tokens, patch (t, n) at C + t * N + n; C = T for `space_only` (a class token
per frame), else 1. Each step's head-averaged attention A `[M, M]` adds the
residual as `0.5 * A + 0.5 * I`; the rollout is the product over steps and
blocks, first rightmost.

Flows are dense float32, 4 * M^2 bytes per clip, and time grows as M^3; at
the largest sizes a class-token row vector carried back would cost M^2.
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tsformer_jax import attention

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


def num_class_tokens(scheme: attention.Scheme, grid: attention.Grid) -> int:
  """C: one class token per frame for `space_only`, else one."""
  return grid[0] if scheme.per_frame else 1


def token_indices(step: attention.Step, grid: attention.Grid,
                  num_cls: int) -> np.ndarray:
  """Where each member of each group sits in the token list.

  Args:
    step: its grouping, and whether the class token joins.
    grid: `(T, H, W)` patches.
    num_cls: C, the class tokens heading the token list.

  Returns:
    int `[G, L]`, in the group order of `GROUPINGS[grouping].split` (with the
    class token first in each group where it joins); -1 marks padding.
  """
  t, h, w = grid
  # Numbered from 1 so that the zeros `split` pads with stand out.
  patches = np.arange(1, t * h * w + 1).reshape(1, t, h * w)
  members = attention.GROUPINGS[step.grouping].split(patches, grid)[0]
  index = np.where(members > 0, members - 1 + num_cls, -1)
  if not step.with_cls:
    return index
  groups = index.shape[0]
  if num_cls not in (1, groups):
    raise ValueError(f'{num_cls} class tokens for {groups} '
                     f'{step.grouping!r} groups: expected 1 (shared) or one '
                     'per group.')
  cls = np.zeros(groups, int) if num_cls == 1 else np.arange(groups)
  return np.concatenate([cls[:, None], index], axis=1)


def _row_scale(index: np.ndarray, step: attention.Step, num_cls: int
               ) -> np.ndarray:
  """float32 `[G, L]`: each query's share of its token's row; 1 for patches,
  while a shared class token's copies are averaged over the groups holding
  real patches, as the model does."""
  scale = (index >= 0).astype(np.float32)
  groups = index.shape[0]
  if step.with_cls and num_cls == 1 and groups > 1:
    real = (index[:, 1:] >= 0).any(axis=1)
    scale[:, 0] = real / real.sum()
  return scale


def attention_matrix(weights: Array, step: attention.Step,
                     grid: attention.Grid, num_cls: int) -> Array:
  """A step's head-averaged attention over the whole token list.

  Args:
    weights: the step's softmax weights `[B, G, heads, L, L]`, as sown by the
      model (`attention.grouped_attention`).
    grid: `(T, H, W)` patches.
    num_cls: C, the class tokens heading the token list.

  Returns:
    `[B, M, M]` with M = C + T * N, rows summing to one: row i is what token
    i's output draws from each token (the identity row for class tokens the
    step leaves out).
  """
  index = token_indices(step, grid, num_cls)
  size = num_cls + grid[0] * grid[1] * grid[2]
  if weights.ndim != 5 or tuple(weights.shape[1:2] + weights.shape[3:]) != (
      index.shape[0], index.shape[1], index.shape[1]):
    raise ValueError(
        f'{step.grouping!r} weights of shape {tuple(weights.shape)} do not '
        f'fit grid {tuple(grid)} with {num_cls} class token(s): expected '
        f'[B, {index.shape[0]}, heads, {index.shape[1]}, {index.shape[1]}].')
  a = jnp.mean(weights.astype(jnp.float32), axis=2)  # [B, G, L, L]
  a = a * _row_scale(index, step, num_cls)[:, :, None]
  # Padding is sent to an extra row and column, cut off below.
  target = np.where(index >= 0, index, size)
  matrix = jnp.zeros((a.shape[0], size + 1, size + 1), jnp.float32)
  matrix = matrix.at[:, target[:, :, None], target[:, None, :]].add(a)
  matrix = matrix[:, :size, :size]
  if not step.with_cls:
    matrix = matrix.at[:, :num_cls, :num_cls].set(jnp.eye(num_cls))
  return matrix


def step_flow(weights: Array, step: attention.Step, grid: attention.Grid,
              num_cls: int) -> Array:
  """`0.5 * A + 0.5 * I`, `[B, M, M]`: A is `attention_matrix`, and I the
  residual, weighted equally as in Abnar and Zuidema."""
  matrix = attention_matrix(weights, step, grid, num_cls)
  return 0.5 * matrix + 0.5 * jnp.eye(matrix.shape[-1], dtype=matrix.dtype)


def block_flow(block_state: Mapping[str, Any], scheme: attention.Scheme,
               grid: attention.Grid) -> Array:
  """The product of a block's step flows, first step rightmost: `[B, M, M]`.

  Args:
    block_state: one block of the `attention` collection,
      `{'{grouping}_attention': {'weights': (w,)}}`.
    grid: `(T, H, W)` patches.
  """
  num_cls = num_class_tokens(scheme, grid)
  flow = None
  for step in scheme.steps:
    name = f'{step.grouping}_attention'
    if name not in block_state:
      raise ValueError(f'No weights for step {name!r} (have '
                       f'{sorted(block_state)}): were they computed with '
                       'this scheme?')
    sown = block_state[name]['weights']
    if len(sown) != 1:
      raise ValueError(f'{len(sown)} sets of weights for {name!r}: pass the '
                       "'attention' collection of a single forward pass.")
    step_matrix = step_flow(sown[0], step, grid, num_cls)
    flow = step_matrix if flow is None else jnp.matmul(
        step_matrix, flow, precision=_HIGHEST)
  return flow


def rollout(attention_state: Mapping[str, Any],
            scheme: attention.Scheme | str, grid: attention.Grid) -> Array:
  """Attention rollout over all blocks: `[B, M, M]`, M = C + T * N.

  Args:
    attention_state: `state['attention']` from
      `model.apply(..., mutable=['attention'])`: `{'block_{i}': ...}`.
    scheme: the model's scheme (`attention.SCHEMES`) or its name.
    grid: `model.grid`, `(T, H, W)` patches.

  Returns:
    `R = F_{L-1} @ ... @ F_0` over the token list [class tokens; patches];
    every row sums to one.
  """
  if isinstance(scheme, str):
    scheme = attention.get_scheme(scheme)
  blocks = sorted((int(m.group(1)), name) for name in attention_state
                  if (m := re.fullmatch(r'block_(\d+)', name)))
  if not blocks:
    raise ValueError('No block_{i} in the attention state (keys '
                     f"{sorted(attention_state)}): pass state['attention'] "
                     "of model.apply(..., mutable=['attention']).")
  if [i for i, _ in blocks] != list(range(len(blocks))):
    raise ValueError(f'Blocks {[i for i, _ in blocks]} are not 0..L-1.')
  result = None
  for _, name in blocks:
    flow = block_flow(attention_state[name], scheme, grid)
    result = flow if result is None else jnp.matmul(flow, result,
                                                    precision=_HIGHEST)
  return result


def cls_heatmaps(flow: Array, grid: attention.Grid, num_cls: int) -> Array:
  """The class token's rollout over the patches: `[B, T, H, W]`.

  Args:
    flow: a rollout `[B, M, M]`.
    grid: `(T, H, W)` patches.
    num_cls: C; with several class tokens (`space_only`) their rows are
      averaged, as the model averages the tokens before its head.

  Returns:
    The share of the class token's flow drawn from each patch; it sums to
    at most one, the rest staying on the class token(s).
  """
  t, h, w = grid
  row = jnp.mean(flow[:, :num_cls, num_cls:], axis=1)  # [B, T * N]
  return row.reshape(row.shape[0], t, h, w)


def temporal_importance(heatmaps: Array) -> Array:
  """Each frame's share of the heatmap: `[B, T, H, W]` -> `[B, T]`, rows
  summing to one."""
  per_frame = jnp.sum(heatmaps, axis=(2, 3))
  return per_frame / jnp.sum(per_frame, axis=1, keepdims=True)
