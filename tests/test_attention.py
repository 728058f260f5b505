"""Every attention step against one masked full attention over the clip.

The reference below knows nothing of groups, padding or einops: it lays the
clip out as a flat list of tokens, allows a (query, key) pair by looking at
the two patches' (t, h, w) coordinates, and runs a single softmax attention
with that mask (float64 numpy). Where the class token takes part, it becomes
one token per group of mutually attending patches (a copy of the shared
class token, or the frame's own one), and the copies' outputs are averaged.
"""

import math

import jax
import numpy as np
import pytest

from tsformer_jax import attention

from conftest import ALLOWED
from conftest import reference_masks

# Heights and widths that differ, are odd, or are not divisible by 2 or 4.
GRIDS = [(2, 2, 2), (3, 5, 7), (4, 3, 6), (1, 1, 3), (5, 6, 1), (3, 7, 5)]
HEADS, HEAD_DIM, BATCH = 2, 4, 2


def _softmax_attention(q, k, v, mask):
  """q: [B, L, H, Dh]; mask [L, L] -> [B, L, H, Dh] in float64."""
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
  logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', weights, v)


def masked_reference(qkv, cls_qkv, grouping, grid):
  """qkv: [B, T, N, 3, H, Dh], cls_qkv: [B, C, 3, H, Dh] or None."""
  allowed, mask, g = reference_masks(grouping, grid, cls_qkv is not None)
  n = len(allowed)
  patches = qkv.reshape(qkv.shape[0], n, *qkv.shape[3:]).astype(np.float64)
  if cls_qkv is None:
    out = _softmax_attention(*(patches[:, :, i] for i in range(3)), allowed)
    return out.reshape(qkv.shape[:3] + out.shape[2:]), None
  c = cls_qkv.shape[1]
  assert c in (1, g)
  cls_tokens = cls_qkv.astype(np.float64)[:, [i if c > 1 else 0
                                               for i in range(g)]]
  tokens = np.concatenate([cls_tokens, patches], axis=1)
  out = _softmax_attention(*(tokens[:, :, i] for i in range(3)), mask)
  cls_out = out[:, :g].mean(axis=1, keepdims=True) if c == 1 else out[:, :g]
  return out[:, g:].reshape(qkv.shape[:3] + out.shape[2:]), cls_out


def _random_qkv(grid, num_cls, seed=0):
  rng = np.random.default_rng(seed)
  t, h, w = grid
  qkv = rng.normal(size=(BATCH, t, h * w, 3, HEADS, HEAD_DIM))
  cls = rng.normal(size=(BATCH, num_cls, 3, HEADS, HEAD_DIM))
  return qkv.astype(np.float32), cls.astype(np.float32)


_grouped_attention = jax.jit(attention.grouped_attention,
                             static_argnames=('grouping', 'grid',
                                              'implementation'))


def _steps():
  """(scheme, step index, step) for every step of every scheme."""
  return [pytest.param(name, i, step, id=f'{name}-{i}-{step.grouping}')
          for name, scheme in attention.SCHEMES.items()
          for i, step in enumerate(scheme.steps)]


def test_reference_covers_every_grouping():
  assert set(ALLOWED) == set(attention.GROUPINGS)


@pytest.mark.parametrize('grid', GRIDS, ids=str)
@pytest.mark.parametrize('scheme,index,step', _steps())
@pytest.mark.parametrize('implementation', ['einsum', 'xla'])
def test_step_matches_masked_full_attention(scheme, index, step, grid,
                                            implementation):
  per_frame = attention.SCHEMES[scheme].per_frame
  qkv, cls = _random_qkv(grid, grid[0] if per_frame else 1, seed=index)
  cls = cls if step.with_cls else None
  out, cls_out = _grouped_attention(qkv, cls, step.grouping, grid,
                                    implementation=implementation)
  want, want_cls = masked_reference(qkv, cls, step.grouping, grid)
  assert out.shape == qkv.shape[:3] + (HEADS, HEAD_DIM)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  if cls is None:
    assert cls_out is None
  else:
    assert cls_out.shape == cls.shape[:2] + (HEADS, HEAD_DIM)
    np.testing.assert_allclose(cls_out, want_cls, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('grouping', sorted(attention.GROUPINGS))
def test_split_merge_round_trip(grouping):
  grid = (3, 5, 7)
  x = np.arange(2 * 3 * 35 * 2, dtype=np.float32).reshape(2, 3, 35, 2)
  group = attention.GROUPINGS[grouping]
  groups = group.split(x, grid)
  assert groups.shape[:2] == (2, group.num_groups(grid))
  np.testing.assert_array_equal(group.merge(groups, grid), x)


def test_padding_counts():
  """local/global pad odd grids; the valid mask marks exactly the real ones."""
  grid = (3, 5, 7)
  for name, groups in [('local', 4), ('global', 8)]:
    valid = attention.GROUPINGS[name].valid(grid)
    assert valid.shape[0] == groups
    assert valid.sum() == 3 * 5 * 7
  assert attention.GROUPINGS['time'].valid(grid) is None


def test_local_windows_span_all_frames_and_half_the_frame():
  grid = (4, 6, 8)
  groups = attention.GROUPINGS['local'].split(
      np.zeros((1, 4, 48)), grid)
  assert groups.shape == (1, 4, 4 * 3 * 4)  # 2 x 2 windows of F x H/2 x W/2


def test_class_token_count_must_match_groups():
  qkv, cls = _random_qkv((3, 2, 2), 2)
  with pytest.raises(ValueError, match='2 class tokens for 3'):
    attention.grouped_attention(qkv, cls, 'space', (3, 2, 2))


def test_unknown_names_list_valid_ones():
  with pytest.raises(ValueError, match="valid: .*'divided'"):
    attention.get_scheme('divide')
  qkv, _ = _random_qkv((2, 2, 2), 1)
  with pytest.raises(ValueError, match="valid: .*'space'"):
    attention.grouped_attention(qkv, None, 'spatial', (2, 2, 2))
  with pytest.raises(ValueError, match='valid:'):
    attention.attend(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :],
                     implementation='flash')


def test_attention_dropout_drops_and_rescales():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(1, 64, 1, 4)).astype(np.float32)
             for _ in range(3))
  v = np.ones_like(v)  # Each output is then the sum of kept weights.
  out = attention.attend(q, k, v, dropout_rate=0.5,
                         dropout_rng=jax.random.key(0))
  sums = np.asarray(out)[0, :, 0, 0]
  assert not np.allclose(sums, 1.0)  # Some weights were dropped ...
  assert abs(sums.mean() - 1.0) < 0.15  # ... and the rest scaled up.
