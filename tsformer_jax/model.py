"""TimeSformer (Bertasius, Wang, Torresani, ICML 2021) as a flax linen module.

    z0 = [x_cls + e_pos[0];  E x_(t,p) + e_pos[p] + e_time[t]]   (Eq. 1)
    per block:  z += step(z) for each attention step of the scheme
                z += MLP(LN(z))
    y = head(LN(z_cls))

Tokens travel as a pair: the class token `cls: [B, C, D]` (C = 1, or one per
frame for `space_only`) and the patches `x: [B, T, N, D]`. The attention
steps themselves live in `attention.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tsformer_jax import attention
from tsformer_jax import kernels

Array = jax.Array
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# The original's initialiser for weights, class token and position
# embedding: `trunc_normal_(std=.02)`, whose cut at +-2 (absolute, 100 std)
# leaves a plain normal. flax's truncated_normal cuts at 2 std (std 0.0176).
_weight_init = nn.initializers.normal(stddev=0.02)
# Exact (erf) GELU as in PyTorch's nn.GELU; flax defaults to the tanh form.
_gelu = functools.partial(nn.gelu, approximate=False)
# Linear layers whose products suit XLA's CPU kernels (`kernels.cpu`).
_Dense = functools.partial(nn.Dense, dot_general=kernels.linear_dot_general)
_DenseGeneral = functools.partial(nn.DenseGeneral,
                                  dot_general=kernels.linear_dot_general)


class DropPath(nn.Module):
  """Stochastic depth: drops a residual branch per row of `[B, G]`.

  The original's `DropPath` draws one keep/drop per row of its input's first
  axis, which its blocks fold as (clip, group): `[(B*H*W), T, D]` in the
  time step, `[(B*T), 1+N, D]` in the space step, `[B, 1+T*N, D]` in the
  MLP. Ours keeps the two axes apart, so every residual given here starts
  with the same `[B, G]`. Kept rows are scaled by `1 / (1 - rate)`.

  Asked for with `apply(..., mutable=['drop_path'])`, the draws `keep:
  [B, G]` (bool) are kept as well.
  """
  rate: float

  @nn.compact
  def __call__(self, *residuals: Array, deterministic: bool
               ) -> tuple[Array, ...]:
    """residuals: each `[B, G, ...]` -> the same, dropped per `[b, g]`."""
    if deterministic or self.rate == 0.0:
      return residuals
    rows = residuals[0].shape[:2]
    if any(r.shape[:2] != rows for r in residuals):
      raise ValueError('DropPath residuals must share their leading [B, G] '
                       f'axes, got {[r.shape for r in residuals]}.')
    keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - self.rate,
                                rows)
    self.sow('drop_path', 'keep', keep)
    scale = keep / (1.0 - self.rate)
    return tuple(
        r * scale.reshape(rows + (1,) * (r.ndim - 2)).astype(r.dtype)
        for r in residuals)


class AttentionStep(nn.Module):
  """One attention step, pre-norm: the residual fc(drop_path(proj(attn(...)))).

  As in the original, the step's projected output is dropped per attention
  group of each clip (per patch position for 'time', per frame for 'space',
  per clip for 'joint', per window or parity, row or column for the sparse
  and axial steps), each group's copy of the class token with it, before
  the copies are averaged; `fc` follows the drop, so its bias is added even
  to a dropped branch.

  Attributes:
    step: which groups attend and whether the class token takes part.
    num_heads: attention heads; the head dim is `D // num_heads`.
    dropout: dropout on the projected output.
    attention_dropout: dropout on the attention weights.
    drop_path: stochastic depth rate of the step's branch.
    layer_norm_eps: LayerNorm epsilon.
    attention_impl: the attention kernel, see `tsformer_jax.kernels`.
    dtype: compute dtype; parameters stay float32.
  """
  step: attention.Step
  num_heads: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  layer_norm_eps: float = 1e-6
  attention_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, cls: Array, x: Array, grid: attention.Grid, *,
               deterministic: bool) -> tuple[Array | None, Array]:
    """cls: [B, C, D], x: [B, T, N, D] -> residuals (dcls or None, dx)."""
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'hidden_size {d} is not divisible by num_heads '
                       f'{self.num_heads}.')
    norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                        name='norm')
    qkv = _DenseGeneral((3, self.num_heads, d // self.num_heads),
                        dtype=self.dtype, kernel_init=_weight_init,
                        name='qkv')
    proj = _DenseGeneral(d, axis=(-2, -1), dtype=self.dtype,
                         kernel_init=_weight_init, name='proj')
    cls_qkv = qkv(norm(cls)) if self.step.with_cls else None
    use_dropout = self.attention_dropout > 0.0 and not deterministic
    # Asked for with `apply(..., mutable=['attention'])`: the same forward
    # pass, also keeping its softmax weights (for rollout).
    keep_weights = self.is_mutable_collection('attention')
    y, weights = attention.attend_in_groups(
        qkv(norm(x)), cls_qkv, self.step.grouping, grid,
        return_weights=keep_weights,
        implementation=self.attention_impl,
        dropout_rate=self.attention_dropout,
        dropout_rng=self.make_rng('dropout') if use_dropout else None)
    if keep_weights:
      # [B, G, H, L, L], see `attention.attend_in_groups`.
      self.sow('attention', 'weights', weights)
    y = nn.Dropout(self.dropout)(proj(y), deterministic=deterministic)
    y, = DropPath(self.drop_path, name='drop_path')(
        y, deterministic=deterministic)  # [B, G, L, D]
    num_cls = cls.shape[1] if self.step.with_cls else 0
    dx, dcls = attention.merge_groups(y, self.step.grouping, grid, num_cls)
    if not self.step.output_fc:
      return dcls, dx
    # Zero-initialised, so the step is a no-op until trained.
    fc = _Dense(d, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                name='fc')
    return (None if dcls is None else fc(dcls)), fc(dx)


class MLP(nn.Module):
  """fc2(dropout(GELU(fc1(z)))), applied to every token."""
  hidden_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array, *, deterministic: bool) -> Array:
    d = z.shape[-1]
    z = _Dense(self.hidden_dim, dtype=self.dtype, kernel_init=_weight_init,
               name='fc1')(z)
    z = nn.Dropout(self.dropout)(_gelu(z), deterministic=deterministic)
    z = _Dense(d, dtype=self.dtype, kernel_init=_weight_init,
               name='fc2')(z)
    return nn.Dropout(self.dropout)(z, deterministic=deterministic)


class Block(nn.Module):
  """A TimeSformer block: the scheme's attention steps, then the MLP.

  Attributes:
    scheme: the attention steps (`attention.SCHEMES`).
    mlp_dim: hidden width of the MLP.
    drop_path: stochastic depth rate of this block.
    (others as in `AttentionStep`)
  """
  scheme: attention.Scheme
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  layer_norm_eps: float = 1e-6
  attention_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, cls: Array, x: Array, grid: attention.Grid,
               deterministic: bool) -> tuple[Array, Array]:
    """cls: [B, C, D], x: [B, T, N, D] -> same shapes.

    `grid` and `deterministic` are positional so that `nn.remat` can treat
    them as static.
    """
    for step in self.scheme.steps:
      dcls, dx = AttentionStep(
          step, self.num_heads, dropout=self.dropout,
          attention_dropout=self.attention_dropout, drop_path=self.drop_path,
          layer_norm_eps=self.layer_norm_eps,
          attention_impl=self.attention_impl, dtype=self.dtype,
          name=f'{step.grouping}_attention')(
              cls, x, grid, deterministic=deterministic)
      x = x + dx
      if dcls is not None:
        cls = cls + dcls
    norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                        name='mlp_norm')
    mlp = MLP(self.mlp_dim, self.dropout, dtype=self.dtype, name='mlp')
    # Dropped per class token: per clip, or per frame for `space_only`
    # (C == T), whose original runs each frame as an image [(B*T), 1+N, D].
    b, c, d = cls.shape
    dcls, dx = DropPath(self.drop_path, name='drop_path')(
        mlp(norm(cls), deterministic=deterministic),
        mlp(norm(x), deterministic=deterministic).reshape(b, c, -1, d),
        deterministic=deterministic)  # [B, C, D], [B, C, T*N/C, D]
    return cls + dcls, x + dx.reshape(x.shape)


class TimeSformer(nn.Module):
  """The TimeSformer video classifier.

  Attributes:
    attention: the attention scheme, a key of `attention.SCHEMES`.
    num_classes: size of the linear head; 0 returns the class-token features.
    num_frames: frames per clip (T); sets the time embedding's size.
    image_size: frame height and width in pixels (an int for square frames).
    patch_size: side of the square patches.
    hidden_size: token width D.
    depth: number of blocks.
    num_heads: attention heads per step.
    mlp_dim: hidden width of each block's MLP.
    dropout: dropout on embeddings, attention outputs and MLPs.
    attention_dropout: dropout on attention weights.
    drop_path: stochastic depth rate of the last block; it rises linearly
      from 0 at the first block.
    layer_norm_eps: LayerNorm epsilon.
    attention_impl: the attention kernel, see `tsformer_jax.kernels`.
    dtype: compute dtype name, 'float32' or 'bfloat16'; parameters and
      logits are float32.
    time_embedding_std: the time embedding starts as a truncated normal of
      this std; 0 (the original's choice) starts it at zero, so that a model
      built from image weights starts as the image model. Trained from
      scratch, a zero (or 0.02) start leaves frame order nearly symmetric
      and slow to learn: a brightness-ramp order task is learned within 75
      steps with 0.5 and not within 150 with 0.02.
    remat: rematerialisation of each block in the backward pass, a key of
      `REMAT_POLICIES`: 'none' keeps every activation; 'full' keeps only
      the blocks' inputs and recomputes the rest; 'dots' keeps the matmul
      outputs and recomputes the cheap elementwise work; 'dots_no_batch'
      keeps only matmuls without batch axes (the linear layers, not the
      attention scores).
  """
  attention: str = 'divided'
  num_classes: int = 400
  num_frames: int = 8
  image_size: int | Sequence[int] = 224
  patch_size: int = 16
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.1
  layer_norm_eps: float = 1e-6
  attention_impl: str = 'auto'
  dtype: str = 'float32'
  time_embedding_std: float = 0.0
  remat: str = 'none'

  @property
  def frame_shape(self) -> tuple[int, int]:
    size = self.image_size
    return (size, size) if isinstance(size, int) else tuple(size)

  @property
  def grid(self) -> attention.Grid:
    """(T, H, W): frames and patches per column and per row."""
    h, w = self.frame_shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'image_size {(h, w)} is not a multiple of patch_size '
                       f'{p}: choose a size divisible by {p}.')
    return (self.num_frames, h // p, w // p)

  @nn.compact
  def __call__(self, clips: Array, *, train: bool = False) -> Array:
    """clips: [B, T, Hpx, Wpx, 3] normalised pixels -> logits [B, classes].

    With `num_classes == 0` returns the class-token features [B, D].
    """
    if self.dtype not in DTYPES:
      raise ValueError(f'Unknown dtype {self.dtype!r}; valid: '
                       f'{sorted(DTYPES)}.')
    dtype = DTYPES[self.dtype]
    scheme = attention.get_scheme(self.attention)
    grid = self.grid
    expected = (self.num_frames,) + self.frame_shape + (3,)
    if clips.ndim != 5 or tuple(clips.shape[1:]) != expected:
      raise ValueError(f'Expected clips [B, {", ".join(map(str, expected))}] '
                       f'for this config, got {list(clips.shape)}; set '
                       'model.num_frames and model.image_size to match.')
    b, d, n = clips.shape[0], self.hidden_size, grid[1] * grid[2]
    deterministic = not train

    x = nn.Conv(d, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding='VALID', dtype=dtype,
                conv_general_dilated=kernels.conv_general_dilated,
                name='embedding')(clips)
    x = x.reshape(b, self.num_frames, n, d)  # [B, T, N, D], rows major
    pos = self.param('pos_embedding', _weight_init, (1, 1 + n, d))
    cls = self.param('cls', _weight_init, (1, 1, d))
    cls = jnp.broadcast_to(cls + pos[:, :1], (b, 1, d))  # [B, 1, D]
    x = x + pos[:, None, 1:]
    if scheme.per_frame:
      cls = jnp.broadcast_to(cls, (b, self.num_frames, d))
    else:
      init = (nn.initializers.truncated_normal(self.time_embedding_std)
              if self.time_embedding_std else nn.initializers.zeros)
      time = self.param('time_embedding', init, (1, self.num_frames, d))
      x = x + time[:, :, None]
    drop = nn.Dropout(self.dropout)
    cls = drop(cls, deterministic=deterministic).astype(dtype)
    x = drop(x, deterministic=deterministic).astype(dtype)

    block = remat_block(self.remat)
    for i, rate in enumerate(np.linspace(0.0, self.drop_path, self.depth)):
      cls, x = block(
          scheme, self.num_heads, self.mlp_dim, dropout=self.dropout,
          attention_dropout=self.attention_dropout, drop_path=float(rate),
          layer_norm_eps=self.layer_norm_eps,
          attention_impl=self.attention_impl, dtype=dtype,
          name=f'block_{i}')(cls, x, grid, deterministic)

    # One class token per frame (space_only) is averaged before the norm, as
    # the original does; otherwise C == 1 and this only drops the axis.
    cls = cls.mean(axis=1)
    # The last norm and the head in float32 whatever `dtype`: a few FLOPs,
    # and logits that bfloat16 would round into ties.
    features = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                            name='norm')(cls)
    if not self.num_classes:
      return features
    return _Dense(self.num_classes, kernel_init=_weight_init,
                  dtype=jnp.float32, name='head')(features)


REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat_block(remat: str) -> type[Block]:
  """`Block`, rematerialised with the policy `REMAT_POLICIES[remat]`."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f'Unknown model.remat {remat!r}; valid: '
                     f'{sorted(REMAT_POLICIES)}.')
  if remat == 'none':
    return Block
  # Arguments 3 and 4 (counting self) are the grid and `deterministic`.
  return nn.remat(Block, policy=REMAT_POLICIES[remat], static_argnums=(3, 4))


# `config.model` fields the module does not take: the head's loss, which
# training and scoring read (`losses.py`).
_NOT_MODULE_FIELDS = ('loss',)


def config_fields() -> tuple[str, ...]:
  """The names `config.model` may hold: the TimeSformer module's fields and
  `_NOT_MODULE_FIELDS`."""
  return tuple(f.name for f in dataclasses.fields(TimeSformer)
               if f.name not in ('parent', 'name')) + _NOT_MODULE_FIELDS


def create_model(config) -> TimeSformer:
  """The module `config.model` describes; unknown fields fail."""
  kwargs = dict(config.model)
  unknown = sorted(set(kwargs) - set(config_fields()))
  if unknown:
    raise ValueError(f'Unknown config.model fields {unknown}; valid: '
                     f'{sorted(config_fields())}.')
  for field in _NOT_MODULE_FIELDS:
    kwargs.pop(field, None)
  attention.get_scheme(kwargs.get('attention', TimeSformer.attention))
  if not isinstance(kwargs.get('image_size', 0), int):
    kwargs['image_size'] = tuple(kwargs['image_size'])
  return TimeSformer(**kwargs)


def dummy_clips(config, batch_size: int = 1, dtype=jnp.float32) -> Array:
  """Zero clips `[B, T, H, W, 3]` of the shape `config.model` expects."""
  model = create_model(config)
  return jnp.zeros((batch_size, model.num_frames) + model.frame_shape + (3,),
                   dtype)


def init_params(config, rng: Array):
  """A freshly initialised `params` pytree for `create_model(config)`."""
  model = create_model(config)
  # Under jit, XLA drops the forward pass that init traces: only the
  # initialisers run.
  init = jax.jit(lambda rng: model.init(rng, dummy_clips(config))['params'])
  return init(rng)


def inference_compiler_options(config, batch_size: int) -> dict[str, str]:
  """XLA options under which to jit `config.model`'s inference forward pass
  on `batch_size` clips per device (see `kernels.inference_options`)."""
  model = create_model(config)
  tokens = batch_size * math.prod(model.grid)
  return kernels.inference_options(tokens, DTYPES.get(model.dtype))
