"""Every attention step against one masked full attention over the clip.

The reference below knows nothing of groups, padding or einops: it lays the
clip out as a flat list of tokens, allows a (query, key) pair by looking at
the two patches' (t, h, w) coordinates, and runs a single softmax attention
with that mask (float64 numpy). Where the class token takes part, it becomes
one token per group of mutually attending patches (a copy of the shared
class token, or the frame's own one), and the copies' outputs are averaged.
"""

import math
import re

import jax
import jax.numpy as jnp
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


def test_attend_einsum_equals_fused_with_mask_and_bfloat16():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 3, 9, 4, 8)).astype(np.float32)
             for _ in range(3))
  mask = rng.random((3, 1, 9, 9)) > 0.3
  mask[..., 0] = True  # Every query keeps at least one key.
  for dtype, atol in [(np.float32, 1e-5), (jax.numpy.bfloat16, 2e-2)]:
    args = [a.astype(dtype) for a in (q, k, v)]
    ref = attention.attend(*args, mask, implementation='einsum')
    fused = attention.attend(*args, mask, implementation='xla')
    auto = attention.attend(*args, mask, implementation='auto')
    assert ref.dtype == fused.dtype == dtype
    np.testing.assert_allclose(np.float32(ref), np.float32(fused), atol=atol)
    np.testing.assert_allclose(np.float32(ref), np.float32(auto), atol=atol)


@pytest.mark.parametrize('implementation,masked', [
    ('chunked', False), ('chunked', True), ('cpu', False)])
def test_chunked_and_cpu_attention_equal_einsum_with_gradients(
    implementation, masked):
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 3, 37, 4, 8)).astype(np.float32)
             for _ in range(3))
  # Key padding as the groupings make it, with a block of keys all masked.
  mask = rng.random((3, 1, 1, 37)) > 0.3 if masked else None
  if masked:
    mask[..., 10:20] = False

  def loss(implementation, q, k, v):
    if implementation == 'chunked':
      out = attention.chunked_attention(q, k, v, mask, query_chunk=8,
                                        key_chunk=5)
    else:
      out = attention.attend(q, k, v, mask, implementation=implementation)
    return jnp.sum(out ** 2), out

  grad = jax.grad(loss, argnums=(1, 2, 3), has_aux=True)
  ref_grads, ref = grad('einsum', q, k, v)
  grads, out = grad(implementation, q, k, v)
  np.testing.assert_allclose(out, ref, atol=1e-6)
  for a, b in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(
      attention.attend(q, k, v, mask, implementation=implementation), ref,
      atol=1e-6)


def test_cpu_attention_in_bfloat16_and_without_mask_only():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 40, 2, 8)), jnp.bfloat16)
             for _ in range(3))
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32))
  ref_grads = jax.grad(loss(attention.attend), (0, 1, 2))(q, k, v)
  grads = jax.grad(loss(attention.cpu_attention), (0, 1, 2))(q, k, v)
  out = attention.cpu_attention(q, k, v)
  assert out.dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  np.testing.assert_allclose(np.float32(out),
                             np.float32(attention.attend(q, k, v)), atol=3e-2)
  for a, b in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(np.float32(a), np.float32(b), atol=5e-2)
  with pytest.raises(ValueError, match="takes no mask; use 'xla'"):
    attention.attend(q, k, v, jnp.ones((40, 40), bool), implementation='cpu')


def test_auto_takes_cpu_attention_for_long_unmasked_float32_groups(
    monkeypatch):
  calls = []
  monkeypatch.setattr(attention, 'cpu_attention',
                      lambda *args: calls.append(args) or args[0])
  long = attention.CPU_ATTENTION_MIN_LENGTH

  def takes_cpu(length, dtype=jnp.float32, mask=None):
    calls.clear()
    q = jnp.zeros((2, length, 1, 4), dtype)
    attention.attend(q, q, q, mask, implementation='auto')
    return bool(calls)

  assert takes_cpu(long)
  assert not takes_cpu(long - 1)
  assert not takes_cpu(long, jnp.bfloat16)
  assert not takes_cpu(long, mask=jnp.ones((long, long), bool))


def _ynn_product_shapes(compiled_text: str) -> list[str]:
  """Output shapes of the products XLA hands to YNNPACK."""
  computations = dict(re.findall(r'\n(%[\w.]+) [^\n]*\{\n(.*?)\n\}',
                                 compiled_text, re.S))
  called = re.findall(r'kind=kCustom, calls=(%[\w.]+), backend_config='
                      r'\{"fusion_config":\{"kind":"__ynn_fusion"',
                      compiled_text)
  return [shape for name in called for shape in re.findall(
      r'= (f32\[[\d,]+\])\{[\d,]+\} dot\(', computations.get(name, ''))]


def test_cpu_attention_keeps_head_dim_rows_out_of_ynnpack():
  """XLA's own derivative sums the key and value gradients as products of
  Dh rows in YNNPACK, its slowest form; `cpu_attention` sends them to
  Eigen (`cpu_attention`'s docstring has the speeds)."""
  q = jnp.zeros((1, 197, 2, 64))
  dout = jnp.ones_like(q)

  def compiled_vjp(f):
    vjp = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](dout))
    return vjp.lower(q, q, q).compile().as_text()

  xla = compiled_vjp(
      lambda q, k, v: attention.attend(q, k, v, implementation='xla'))
  ours = compiled_vjp(attention.cpu_attention)
  assert 'f32[2,64,197]' in _ynn_product_shapes(xla)
  assert not [s for s in _ynn_product_shapes(ours) if ',64,' in s]


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
