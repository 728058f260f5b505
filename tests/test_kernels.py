"""The backend kernels against the einsum reference, and what XLA's CPU
backend compiles with them."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tsformer_jax
from tsformer_jax import attention
from tsformer_jax import kernels
from tsformer_jax.kernels import chunked
from tsformer_jax.kernels import cpu
from tsformer_jax.kernels import pallas

from conftest import random_clips
from conftest import tiny_config
from conftest import tiny_params

# These check XLA's CPU backend: its compiled programs, options and kernels.
CPU_BACKEND_ONLY = pytest.mark.skipif(
    jax.default_backend() != 'cpu', reason='checks the XLA CPU backend')


def test_registry_names_every_kernel_and_keeps_the_old_names():
  assert kernels.IMPLEMENTATIONS == ('einsum', 'xla', 'cudnn', 'chunked',
                                     'cpu', 'auto', 'pallas')
  assert kernels.get_kernel('einsum') is None
  assert kernels.get_kernel('chunked') is chunked.chunked_attention
  with pytest.raises(ValueError, match="valid: .*'chunked'"):
    kernels.get_kernel('flash')
  assert attention.IMPLEMENTATIONS == kernels.IMPLEMENTATIONS
  assert attention.chunked_attention is chunked.chunked_attention
  assert attention.cpu_attention is cpu.cpu_attention
  assert (attention.QUERY_CHUNK, attention.KEY_CHUNK) == (
      chunked.QUERY_CHUNK, chunked.KEY_CHUNK)
  assert attention.CPU_ATTENTION_MIN_LENGTH == cpu.CPU_ATTENTION_MIN_LENGTH


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
      out = chunked.chunked_attention(q, k, v, mask, query_chunk=8,
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
  grads = jax.grad(loss(cpu.cpu_attention), (0, 1, 2))(q, k, v)
  out = cpu.cpu_attention(q, k, v)
  assert out.dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  np.testing.assert_allclose(np.float32(out),
                             np.float32(attention.attend(q, k, v)), atol=3e-2)
  for a, b in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(np.float32(a), np.float32(b), atol=5e-2)
  with pytest.raises(ValueError, match="takes no mask; use 'xla'"):
    attention.attend(q, k, v, jnp.ones((40, 40), bool), implementation='cpu')


@CPU_BACKEND_ONLY
def test_auto_takes_cpu_attention_for_long_unmasked_float32_groups(
    monkeypatch):
  calls = []
  monkeypatch.setattr(cpu, 'cpu_attention',
                      lambda *args: calls.append(args) or args[0])
  long = cpu.CPU_ATTENTION_MIN_LENGTH

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


@CPU_BACKEND_ONLY
def test_cpu_attention_keeps_head_dim_rows_out_of_ynnpack():
  """XLA's own derivative sums the key and value gradients as products of
  Dh rows in YNNPACK, its slowest form; `cpu_attention` sends them to
  Eigen (speeds: `experiments/results/cpu_kernels.md`)."""
  q = jnp.zeros((1, 197, 2, 64))
  dout = jnp.ones_like(q)

  def compiled_vjp(f):
    vjp = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](dout))
    return vjp.lower(q, q, q).compile().as_text()

  xla = compiled_vjp(
      lambda q, k, v: attention.attend(q, k, v, implementation='xla'))
  ours = compiled_vjp(cpu.cpu_attention)
  assert 'f32[2,64,197]' in _ynn_product_shapes(xla)
  assert not [s for s in _ynn_product_shapes(ours) if ',64,' in s]


@CPU_BACKEND_ONLY
@pytest.mark.parametrize('x_shape,kernel_shape,contract', [
    ((2, 5, 6), (6, 9), 1),  # Dense, input narrower: x is transposed.
    ((2, 5, 9), (9, 6), 1),  # Dense, output narrower: dy is transposed.
    ((2, 5, 3, 4), (3, 4, 7), 2),  # proj: two contracted axes.
    ((4, 6), (6, 3, 2, 5), 1),  # qkv: several output axes.
])
def test_cpu_linear_product_and_gradients_are_exact(x_shape, kernel_shape,
                                                    contract):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
  dims = ((tuple(range(len(x_shape) - contract, len(x_shape))),
           tuple(range(contract))), ((), ()))

  def loss(product, x, kernel):
    return jnp.sum(jnp.sin(product(x, kernel, dims)))

  ours = jax.jit(jax.value_and_grad(
      functools.partial(loss, cpu.linear_dot_general), argnums=(0, 1)))
  want = jax.value_and_grad(
      functools.partial(loss, jax.lax.dot_general), argnums=(0, 1))
  for a, b in zip(jax.tree.leaves(ours(x, kernel)),
                  jax.tree.leaves(want(x, kernel)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # On CPU the weight gradient takes the explicit transpose.
  jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(
      loss, cpu.linear_dot_general), argnums=1))(x, kernel))
  assert 'optimization_barrier' in jaxpr


def test_other_products_keep_plain_dot_general():
  x = jnp.ones((3, 4, 5))
  # A batched product (attention's) is not a linear layer.
  dims = (((2,), (2,)), ((0,), (0,)))
  jaxpr = str(jax.make_jaxpr(jax.grad(
      lambda x: cpu.linear_dot_general(x, x, dims).sum()))(x))
  assert 'optimization_barrier' not in jaxpr


@CPU_BACKEND_ONLY
def test_inference_compiler_options_send_large_cpu_calls_to_eigen():
  config = tiny_config()
  tokens = math.prod(tsformer_jax.create_model(config).grid)
  large = -(-cpu._YNN_GRAPH_TOKENS // tokens)  # Clips per call.
  # Below the size where XLA builds YNNPACK graphs its defaults stay.
  assert tsformer_jax.inference_compiler_options(config, large - 1) == {}
  options = tsformer_jax.inference_compiler_options(config, large)
  assert options == {'xla_cpu_experimental_ynn_fusion_type': ''}
  model = tsformer_jax.create_model(config)
  params, clips = tiny_params(), random_clips(config, batch_size=large)

  def forward(params, clips):
    return model.apply({'params': params}, clips)

  plain = jax.jit(forward).lower(params, clips).compile()
  ours = jax.jit(forward, compiler_options=options).lower(
      params, clips).compile()
  # XLA's default hands products to YNNPACK; under the options none goes.
  assert '__ynn_fusion' in plain.as_text()
  assert '__ynn_fusion' not in ours.as_text()
  np.testing.assert_allclose(ours(params, clips), plain(params, clips),
                             atol=1e-5, rtol=0)


@CPU_BACKEND_ONLY
def test_inference_compiler_options_keep_defaults_where_needed(monkeypatch):
  options = functools.partial(tsformer_jax.inference_compiler_options,
                              batch_size=10_000)
  # bfloat16 units: YNNPACK has the fast bfloat16 kernels.
  monkeypatch.setattr(cpu, '_cpu_has_bfloat16_units', lambda: True)
  assert options(tiny_config(dtype='bfloat16')) == {}
  assert options(tiny_config()) != {}
  # A jaxlib whose XLA lacks the option compiles without it.
  assert not cpu._backend_accepts('xla_cpu_no_such_option', '')
  monkeypatch.setattr(cpu, '_YNN_FUSION_OPTION',
                      'xla_cpu_no_such_option')
  assert options(tiny_config()) == {}


def _time_qkv(batch, grid, heads, head_dim, dtype=np.float32, seed=0):
  """q, k, v of divided attention's time step: `[B, H*W, T, heads, Dh]`."""
  t, h, w = grid
  rng = np.random.default_rng(seed)
  qkv = rng.normal(size=(batch, t, h * w, 3, heads, head_dim))
  tokens = attention.GROUPINGS['time'].split(jnp.asarray(qkv, dtype), grid)
  return tuple(tokens[:, :, :, i] for i in range(3))


def _values_and_grads(attend, q, k, v):
  def loss(q, k, v):
    out = attend(q, k, v)
    # Weighted, so that every output element has its own cotangent.
    return jnp.sum(out.astype(jnp.float32) * jnp.cos(
        jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))), out
  grads, out = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


# Base (8 frames, Dh 64), HR (16 frames) and the tiny config (4, Dh 16).
PALLAS_TIME_SHAPES = [((8, 2, 2), 3, 64), ((16, 1, 2), 2, 32),
                      ((4, 2, 1), 4, 16)]


@pytest.mark.parametrize('grid,heads,head_dim', PALLAS_TIME_SHAPES[:1] + [
    pytest.param(*s, marks=pytest.mark.slow) for s in PALLAS_TIME_SHAPES[1:]])
def test_pallas_time_attention_equals_einsum_with_gradients(grid, heads,
                                                            head_dim):
  q, k, v = _time_qkv(2, grid, heads, head_dim)
  ref, ref_grads = _values_and_grads(
      functools.partial(attention.attend, implementation='einsum'), q, k, v)
  attends = [pallas.temporal_attention,
             functools.partial(attention.attend, implementation='pallas')]
  if head_dim == 16:  # Once: one group per program, several programs.
    attends.append(functools.partial(pallas.temporal_attention,
                                     block_batch=1))
  for attend in attends:
    out, grads = _values_and_grads(attend, q, k, v)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    for a, b in zip(grads, ref_grads, strict=True):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_pallas_time_attention_in_bfloat16():
  q, k, v = _time_qkv(2, (8, 2, 2), 3, 64, dtype=jnp.bfloat16)
  ref, ref_grads = _values_and_grads(attention.attend, q, k, v)
  out, grads = _values_and_grads(pallas.temporal_attention, q, k, v)
  assert out.dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=2e-2)
  for a, b in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(np.float32(a), np.float32(b), atol=5e-2)


def test_pallas_refuses_other_shapes_and_the_registry_falls_back():
  q = jnp.ones((2, 197, 3, 64))
  with pytest.raises(ValueError, match=r'L = 197 is not one of \(2, 4, 8, '
                     r'16, 32\).*Dh in \(16, 32, 64, 128\)'):
    pallas.temporal_attention(q, q, q)
  with pytest.raises(ValueError, match='Dh = 40 is not one of'):
    pallas.temporal_attention(*[jnp.ones((2, 8, 3, 40))] * 3)
  with pytest.raises(ValueError, match='takes no mask'):
    small = jnp.ones((2, 8, 3, 16))
    pallas.temporal_attention(small, small, small, jnp.ones((8, 8), bool))
  with pytest.raises(ValueError, match='power of two dividing the 6'):
    pallas.temporal_attention(*[jnp.ones((6, 8, 1, 16))] * 3, block_batch=4)
  # 'pallas' in the registry: XLA's attention where the kernel does not
  # apply (a space step's 9 tokens, masked), equal to the reference.
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(2, 3, 9, 2, 8)).astype(np.float32)
             for _ in range(3))
  mask = rng.random((3, 1, 1, 9)) > 0.3
  mask[..., 0] = True
  np.testing.assert_allclose(
      attention.attend(q, k, v, mask, implementation='pallas'),
      attention.attend(q, k, v, mask), atol=1e-6)


@pytest.mark.slow
def test_pallas_model_equals_einsum_model_with_gradients():
  """The tiny divided model: its time step (4 frames) takes the kernel."""
  config = tiny_config('divided', drop_path=0.0)
  params, clips = tiny_params(drop_path=0.0), random_clips(config)

  def loss(impl, params):
    config.model.attention_impl = impl
    model = tsformer_jax.create_model(config)
    return jnp.mean(model.apply({'params': params}, clips) ** 2)

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, 'einsum')))(params)
  got_loss, grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, 'pallas')))(params)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads),
                  strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_pallas_kernels_lower_to_triton_for_gpus():
  """The Triton lowering runs here, without a GPU: export for CUDA."""
  q = jax.ShapeDtypeStruct((2, 196, 8, 12, 64), jnp.bfloat16)
  attend = functools.partial(pallas.temporal_attention, interpret=False)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      attend(q, k, v).astype(jnp.float32)), (0, 1, 2)))
  target = '__gpu$xla.gpu.triton'
  exported = jax.export.export(
      grad, platforms=['cuda'],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(
          q, q, q)
  calls = re.findall(r'custom_call @(\S+)\(', exported.mlir_module())
  assert calls == [target, target]  # Forward and backward kernels.
