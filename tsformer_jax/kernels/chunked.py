"""Memory-efficient attention: Rabe and Staats, "Self-attention does not
need O(n^2) memory" (2021)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array
# Query and key block sizes.
QUERY_CHUNK = 1024
KEY_CHUNK = 4096


def chunked_attention(q: Array, k: Array, v: Array, mask: Array | None = None,
                      *, query_chunk: int = QUERY_CHUNK,
                      key_chunk: int = KEY_CHUNK) -> Array:
  """Softmax attention in O(query_chunk x key_chunk) memory, not O(Lq x Lk).

  Queries are taken `query_chunk` at a time; for each, every block of
  `key_chunk` keys gives its partial softmax sums relative to its own
  maximum, and the blocks are combined after rescaling to the overall
  maximum. Each block is rematerialised in the backward pass, so training
  does not keep the scores either. Sequences are padded to whole chunks
  (padded keys are masked out, padded queries dropped).

  Args:
    q: queries `[..., Lq, H, Dh]`.
    k, v: keys and values `[..., Lk, H, Dh]`.
    mask: optional boolean, broadcastable to `[..., H, Lq, Lk]`.
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
