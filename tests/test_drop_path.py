"""Stochastic depth drawn as the original draws it: per attention group.

The model records its draws (`mutable=['drop_path']`); two references
written apart from `model.py` take those draws and must give the same
numbers: the torch rebuild of the original (`checkpoint_sources`), whose
`DropPath` acts per row of its own tensors, and a float64 numpy block that
visits the groups one by one from the (t, h, w) of each patch.
"""

import functools
import math

import jax
import numpy as np
import pytest
import scipy.special
import torch

import tsformer_jax
from tsformer_jax import attention
from tsformer_jax import model as model_lib
from tsformer_jax.checkpoints.formats import original

from checkpoint_sources import OriginalModel
from checkpoint_sources import randomize
from conftest import random_clips
from conftest import tiny_config

RATE = 0.5
EPS = 1e-6


def _random_tree(tree, seed):
  """Every leaf redrawn (LayerNorm scales near 1), fc biases included."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == 'scale':
      return (1.0 + rng.normal(0.0, 0.1, leaf.shape)).astype(np.float32)
    return rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, tree)


def _draws(state, path):
  """The `keep: [B, G]` a DropPath recorded under `path` (a tuple)."""
  node = state['drop_path']
  for key in path + ('drop_path', 'keep'):
    node = node[key]
  return np.asarray(node[0])


# ----------------------------------------------------------------------------
# Against the original (torch), whose DropPath sees `[(B*G), L, D]`

class _GivenDropPath(torch.nn.Module):
  """The original's `drop_path`, x / keep_prob * mask, with given masks:
  one `[rows]` mask per call, in call order."""

  def __init__(self, masks, keep_prob):
    super().__init__()
    self.masks, self.keep_prob = list(masks), keep_prob

  def forward(self, x):
    mask = torch.from_numpy(self.masks.pop(0).astype(np.float32))
    assert mask.shape[0] == x.shape[0], (mask.shape, x.shape)
    return x.div(self.keep_prob) * mask.reshape((-1,) + (1,) * (x.ndim - 1))


@functools.cache
def _train_apply(model):
  def forward(params, clips, rng):
    return model.apply({'params': params}, clips, train=True,
                       rngs={'dropout': rng}, mutable=['drop_path'])
  return jax.jit(forward)


@pytest.mark.parametrize('scheme', ['divided', 'joint', 'space_only'])
def test_logits_match_the_original_given_the_same_draws(scheme):
  config = tiny_config(scheme, depth=3, drop_path=RATE)
  m = config.model
  reference = randomize(OriginalModel(m), 0)
  params = original.params_from_original_state_dict(
      reference.state_dict(), config)
  model = tsformer_jax.create_model(config)
  clips = random_clips(config)
  logits, state = _train_apply(model)(params, clips, jax.random.key(3))

  # The original's rule: torch.linspace(0, drop_path_rate, depth).
  rates = torch.linspace(0, RATE, m.depth).tolist()
  assert 'block_0' not in state['drop_path']  # Rate 0: nothing drawn.
  steps = attention.get_scheme(scheme).steps
  all_draws = []
  for i, block in enumerate(reference.model.blocks):
    if not rates[i]:
      continue
    draws = [_draws(state, (f'block_{i}', f'{s.grouping}_attention'))
             for s in steps] + [_draws(state, (f'block_{i}',))]
    all_draws += draws
    # (clip, group) row-major is the original's row order: (b h w) for
    # time, (b t) for space and space_only, b for joint and the MLP.
    block.drop_path = _GivenDropPath([k.reshape(-1) for k in draws],
                                     1 - rates[i])
  flat = np.concatenate([k.reshape(-1) for k in all_draws])
  assert flat.any() and not flat.all()  # Kept and dropped branches.
  with torch.no_grad():
    want = reference.model(torch.from_numpy(clips)).numpy()
  assert all(not b.drop_path.masks for b in reference.model.blocks
             if isinstance(b.drop_path, _GivenDropPath))
  np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
  # The draws matter: without them the logits are far off the tolerance.
  with torch.no_grad():
    for block in reference.model.blocks:
      block.drop_path = torch.nn.Identity()
    plain = reference.model(torch.from_numpy(clips)).numpy()
  assert np.abs(plain - want).max() > 1e-2


# ----------------------------------------------------------------------------
# Against a float64 numpy block that visits every group

GRID_SCHEMES = [('divided', (3, 3, 5)), ('axial', (3, 3, 5)),
                ('sparse_local_global', (3, 3, 5)),
                # One frame: half of the global parity groups are padding
                # only and stay out of the class token's average.
                ('sparse_local_global', (1, 3, 5)),
                ('joint', (2, 2, 3)), ('space_only', (3, 2, 3))]
BATCH, WIDTH, HEADS, MLP = 2, 16, 2, 32


def _group_of(grouping, grid):
  """`[T, H, W]`: the index, in the model's group order, of the group each
  patch attends in (Sec. 3 and Fig. 2 of the paper)."""
  t, h, w = np.meshgrid(*map(np.arange, grid), indexing='ij')
  _, rows, cols = grid
  return {
      'space': t,  # One group per frame.
      'joint': np.zeros_like(t),
      'time': h * cols + w,  # One per patch position.
      'width': t * rows + h,  # One per row of a frame.
      'height': t * cols + w,  # One per column of a frame.
      # Four windows: the halves (rounded up) of height and width.
      'local': (h // math.ceil(rows / 2)) * 2 + w // math.ceil(cols / 2),
      # Eight parities of (t, h, w).
      'global': (t % 2) * 4 + (h % 2) * 2 + w % 2,
  }[grouping]


def _layer_norm(z, p):
  mean = z.mean(-1, keepdims=True)
  var = ((z - mean) ** 2).mean(-1, keepdims=True)
  return (z - mean) / np.sqrt(var + EPS) * p['scale'] + p['bias']


def _attention_branch(p, tokens):
  """proj(attn(qkv(LN(tokens)))) of one group's tokens `[L, D]`."""
  qkv = np.einsum('ld,dkhe->klhe', _layer_norm(tokens, p['norm']),
                  p['qkv']['kernel']) + p['qkv']['bias'][:, None]
  q, k, v = qkv  # [L, H, Dh]
  logits = np.einsum('qhe,khe->hqk', q, k) / math.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('hqk,khe->qhe', weights, v)
  return np.einsum('qhe,hed->qd', out, p['proj']['kernel']) + p['proj']['bias']


def _mlp(p, z):
  z = _layer_norm(z, p['mlp_norm'])
  z = z @ p['mlp']['fc1']['kernel'] + p['mlp']['fc1']['bias']
  z = 0.5 * z * (1.0 + scipy.special.erf(z / math.sqrt(2.0)))
  return z @ p['mlp']['fc2']['kernel'] + p['mlp']['fc2']['bias']


def _reference_block(p, cls, x, scheme, grid, draws):
  """cls: [B, C, D], x: [B, T, N, D] (float64) -> the block's outputs.

  `draws`: the kept `[B, G]` of each step, then `[B, C]` of the MLP.
  """
  b, t, n, d = x.shape
  c = cls.shape[1]
  x = x.reshape(b, t * n, d)  # Patches in (t, h, w) order.
  for step, keep in zip(scheme.steps, draws, strict=False):
    sp = p[f'{step.grouping}_attention']
    group = _group_of(step.grouping, grid).reshape(-1)
    dx, dcls = np.zeros_like(x), np.zeros_like(cls)
    for i in range(b):
      copies = []
      for g in np.unique(group):  # Groups holding real patches.
        members = np.flatnonzero(group == g)
        tokens = x[i, members]
        if step.with_cls:
          tokens = np.concatenate([cls[i, g if c > 1 else 0][None], tokens])
        y = _attention_branch(sp, tokens) * keep[i, g] / (1 - RATE)
        if step.output_fc:  # After the drop: its bias stays.
          y = y @ sp['fc']['kernel'] + sp['fc']['bias']
        if step.with_cls:
          copies.append(y[0])
          y = y[1:]
        dx[i, members] = y
      if step.with_cls:
        dcls[i] = np.mean(copies, 0) if c == 1 else np.stack(copies)
    x, cls = x + dx, cls + dcls
  keep = draws[-1] / (1 - RATE)  # [B, C]: per clip, per frame if C == T.
  frame_keep = keep[:, np.arange(t) if c > 1 else np.zeros(t, int)]
  x = x.reshape(b, t, n, d)
  return (cls + _mlp(p, cls) * keep[:, :, None],
          x + _mlp(p, x) * frame_keep[:, :, None, None])


@pytest.mark.parametrize(('scheme', 'grid'), GRID_SCHEMES)
def test_block_matches_a_group_by_group_reference(scheme, grid):
  steps = attention.get_scheme(scheme)
  block = model_lib.Block(steps, HEADS, MLP, drop_path=RATE,
                          attention_impl='einsum')
  rng = np.random.default_rng(1)
  t, h, w = grid
  c = t if steps.per_frame else 1
  cls = rng.normal(size=(BATCH, c, WIDTH)).astype(np.float32)
  x = rng.normal(size=(BATCH, t, h * w, WIDTH)).astype(np.float32)
  shapes = jax.eval_shape(
      lambda: block.init(jax.random.key(0), cls, x, grid, True))
  params = _random_tree(shapes['params'], seed=2)
  train = jax.jit(lambda params, cls, x: block.apply(
      {'params': params}, cls, x, grid, False,
      rngs={'dropout': jax.random.key(5)}, mutable=['drop_path']))
  (got_cls, got_x), state = train(params, cls, x)
  draws = [_draws(state, (f'{s.grouping}_attention',)) for s in steps.steps]
  draws.append(_draws(state, ()))
  groups = [attention.GROUPINGS[s.grouping].num_groups(grid)
            for s in steps.steps]
  assert [k.shape for k in draws] == [(BATCH, g) for g in groups] + [
      (BATCH, c)]
  flat = np.concatenate([k.reshape(-1) for k in draws])
  assert flat.any() and not flat.all()
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want_cls, want_x = _reference_block(p64, cls.astype(np.float64),
                                      x.astype(np.float64), steps, grid,
                                      [k.astype(np.float64) for k in draws])
  np.testing.assert_allclose(got_cls, want_cls, atol=2e-5, rtol=0)
  np.testing.assert_allclose(got_x, want_x, atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------
# The pattern a step's residual shows, read from its outputs alone

def _step_residuals(step, grid, seed):
  """A step's residuals in training (RATE) and deterministic mode, with
  its params; dx: [B, T, N, D]."""
  module = model_lib.AttentionStep(step, HEADS, drop_path=RATE,
                                   attention_impl='einsum')
  rng = np.random.default_rng(seed)
  t, h, w = grid
  cls = rng.normal(size=(BATCH, 1, WIDTH)).astype(np.float32)
  x = rng.normal(size=(BATCH, t, h * w, WIDTH)).astype(np.float32)
  shapes = jax.eval_shape(lambda: module.init(
      jax.random.key(0), cls, x, grid, deterministic=True))
  params = _random_tree(shapes['params'], seed)
  run = jax.jit(lambda params, deterministic, rng: module.apply(
      {'params': params}, cls, x, grid, deterministic=deterministic,
      rngs={'dropout': rng}), static_argnums=1)
  key = jax.random.key(seed)
  return run(params, False, key), run(params, True, key), params


def _dropped_tokens(train, plain, offset):
  """Which tokens lost their branch: `[B, T, N]`, each token either kept
  (2x its plain residual past `offset`) or dropped (at `offset`)."""
  dropped = np.all(np.abs(train - offset) < 1e-6, axis=-1)
  kept = np.all(np.abs((train - offset) - (plain - offset) / (1 - RATE))
                < 1e-5, axis=-1)
  assert np.all(dropped ^ kept)
  return dropped


def test_time_step_drops_per_patch_position_before_its_fc():
  grid = (4, 3, 3)
  (_, dx), (_, plain), params = _step_residuals(
      attention.Step('time', with_cls=False, output_fc=True), grid, seed=7)
  bias = np.asarray(params['fc']['bias'])
  assert np.abs(bias).max() > 0.1
  # A dropped token's residual is temporal_fc's bias, exactly.
  dropped = _dropped_tokens(np.asarray(dx), np.asarray(plain), bias)
  assert dropped.any() and not dropped.all()
  # Constant over a position's frames, varying over a clip's positions.
  np.testing.assert_array_equal(dropped, dropped[:, :1].repeat(4, axis=1))
  positions = dropped[:, 0]  # [B, N]
  assert (positions.any(axis=1) & ~positions.all(axis=1)).any()


def test_space_step_drops_per_frame_with_its_class_token_copy():
  grid = (4, 3, 3)
  (dcls, dx), (plain_cls, plain), _ = _step_residuals(
      attention.Step('space'), grid, seed=8)
  dropped = _dropped_tokens(np.asarray(dx), np.asarray(plain), 0.0)
  assert dropped.any() and not dropped.all()
  # Constant over a frame's patches, varying over the frames of a clip.
  np.testing.assert_array_equal(dropped,
                                dropped[:, :, :1].repeat(9, axis=2))
  frames = dropped[:, :, 0]  # [B, T]
  assert (frames.any(axis=1) & ~frames.all(axis=1)).any()
  # The class token keeps the kept frames' copies only: its residual is
  # not the plain one scaled, unless every frame of the clip was kept or
  # dropped alike.
  for i, frame_dropped in enumerate(frames):
    scaled = np.allclose(dcls[i], plain_cls[i] / (1 - RATE), atol=1e-5)
    zero = np.allclose(dcls[i], 0.0, atol=1e-6)
    assert scaled == (not frame_dropped.any())
    assert zero == frame_dropped.all()


def test_drop_path_draws_per_row_of_the_leading_two_axes():
  a, b = np.ones((64, 3, 2), np.float32), np.ones((64, 3, 5, 2), np.float32)
  (da, db), state = model_lib.DropPath(RATE).apply(
      {}, a, b, deterministic=False, rngs={'dropout': jax.random.key(0)},
      mutable=['drop_path'])
  keep = np.asarray(state['drop_path']['keep'][0])
  assert keep.shape == (64, 3) and 40 < keep.sum() < 152
  np.testing.assert_array_equal(da, np.broadcast_to(keep[:, :, None] * 2.0,
                                                    a.shape))
  np.testing.assert_array_equal(
      db, np.broadcast_to(keep[:, :, None, None] * 2.0, b.shape))
  with pytest.raises(ValueError, match=r'leading \[B, G\]'):
    model_lib.DropPath(RATE).apply({}, a, np.ones((64, 4)),
                                   deterministic=False,
                                   rngs={'dropout': jax.random.key(0)})
  # Deterministic, or rate 0: unchanged, and no draw.
  for rate, deterministic in ((RATE, True), (0.0, False)):
    out, state = model_lib.DropPath(rate).apply(
        {}, a, deterministic=deterministic, mutable=['drop_path'])
    np.testing.assert_array_equal(out[0], a)
    assert not state

