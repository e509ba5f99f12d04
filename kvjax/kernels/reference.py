"""Pure-jnp attention over a cache walked chunk by chunk (the XLA path and the kernels' spec).

A *chunked KV source* describes what attention sees without ever materializing it whole:

  source.max_chunks    static int, capacity in chunks
  source.chunk_tokens  static int, tokens per chunk (S)
  source.num_chunks    int32 (may be traced): chunks to walk, always the first ``num_chunks``
  source.chunk(j)      -> k [B, S, N, H], v [B, S, N, H] (compute dtype), bias [B, S] float32
                          (logit bias: 0 for a plain token, log(count) for a summary token,
                          -inf for an empty slot)

Attention walks the chunks with an online softmax (float32 statistics) so the only temporaries
are one chunk of keys/values and a [B, N, T, S] score tile.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kvjax.numerics import cast

f32 = jnp.float32
NEG_INF = -jnp.inf


class DenseKV(NamedTuple):
  """A chunked view of K/V that are already dense (the current block's own K/V).

  k, v: [B, S_total, N, H]; S_total must be a multiple of chunk_tokens.
  """
  k: jax.Array
  v: jax.Array
  chunk_tokens: int

  @property
  def max_chunks(self) -> int:
    return self.k.shape[1] // self.chunk_tokens

  @property
  def num_chunks(self) -> int:
    return self.max_chunks

  def chunk(self, j):
    s = self.chunk_tokens
    k = jax.lax.dynamic_slice_in_dim(self.k, j * s, s, axis=1)
    v = jax.lax.dynamic_slice_in_dim(self.v, j * s, s, axis=1)
    return k, v, jnp.zeros((k.shape[0], s), f32)


def _scores(q, k, bias, scale):
  """q [B, T, N, H], k [B, S, N, H], bias [B, S] -> [B, N, T, S] float32."""
  s = jnp.einsum('BTNH,BSNH->BNTS', q, k.astype(q.dtype), preferred_element_type=f32)
  return s * scale + bias[:, None, None, :]


def _walk(q, source, carry, scale):
  """Online-softmax update of (m, l, acc) over the chunks of one source."""

  def body(j, carry):
    m, l, acc = carry
    k, v, bias = source.chunk(j)
    s = _scores(q, k, bias, scale)                             # [B, N, T, S]
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    corr = jnp.exp(m - m_safe)
    l = l * corr + jnp.sum(p, axis=-1)
    pv = jnp.einsum('BNTS,BSNH->BNTH', cast(p, q.dtype), v.astype(q.dtype),
                    preferred_element_type=f32)
    acc = acc * corr[..., None] + pv
    return m_new, l, acc

  return jax.lax.fori_loop(0, source.num_chunks, body, carry)


def chunked_attention(q: jax.Array, source, *, scale: float | None = None):
  """Softmax attention of q over every chunk of ``source`` (one source or a sequence).

  A source whose ``rotated`` attribute is True holds keys and values in the normalized Hadamard
  basis (QuaRot): the walk uses the rotated query for it and accumulates its values in the
  rotated basis (the accumulator is rotated in and out around that source), which equals
  attention over the un-rotated cache because the transform is orthonormal and symmetric.

  Args:
    q: [B, T, N, H] queries (compute dtype).
    source: a chunked KV source (module docstring), or a list/tuple of them.
    scale: logit scale, default 1/sqrt(H).
  Returns:
    out: [B, T, N, H] in q's dtype (zeros where nothing was attended).
    lse: [B, N, T] float32 log-sum-exp of the logits (-inf where nothing was attended).
  """
  from kvjax.cache.quant import fwht
  b, t, n, h = q.shape
  scale = (1.0 / h**0.5) if scale is None else scale
  sources = [source] if hasattr(source, 'chunk') else list(source)
  carry = (jnp.full((b, n, t), NEG_INF, f32), jnp.zeros((b, n, t), f32),
           jnp.zeros((b, n, t, h), f32))
  q_rot = None
  for src in sources:
    if getattr(src, 'rotated', False):
      if q_rot is None:
        q_rot = fwht(q, f32).astype(q.dtype)
      m, l, acc = carry
      m, l, acc = _walk(q_rot, src, (m, l, fwht(acc, f32)), scale)
      carry = (m, l, fwht(acc, f32))
    else:
      carry = _walk(q, src, carry, scale)
  m, l, acc = carry
  ok = l > 0
  out = jnp.where(ok[..., None], acc / jnp.where(ok, l, 1.0)[..., None], 0.0)
  lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)
  return out.transpose(0, 2, 1, 3).astype(q.dtype), lse


def materialize_source(source, max_chunks: int):
  """Reference/debug: every chunk of a source concatenated, chunks past ``num_chunks`` masked.

  Returns:
    k, v: [B, max_chunks * S, N, H]; bias: [B, max_chunks * S] (-inf for unused chunks).
    Values of a ``rotated`` source are returned un-rotated.
  """
  from kvjax.cache.quant import fwht
  ks, vs, bs = [], [], []
  last = jnp.maximum(source.num_chunks - 1, 0)
  for j in range(max_chunks):
    k, v, bias = source.chunk(jnp.minimum(j, last))
    if getattr(source, 'rotated', False):
      k, v = fwht(k, f32), fwht(v, f32)
    ks.append(k)
    vs.append(v)
    bs.append(jnp.where(j < source.num_chunks, bias, NEG_INF))
  return jnp.concatenate(ks, 1), jnp.concatenate(vs, 1), jnp.concatenate(bs, 1)


def merge(out_a, lse_a, out_b, lse_b):
  """Combines two partial attentions over disjoint key sets by log-sum-exp.

  Args:
    out_a, out_b: [B, T, N, H]; lse_a, lse_b: [B, N, T] float32 (-inf = empty).
  Returns:
    out [B, T, N, H] (dtype of out_a), lse [B, N, T].
  """
  lse = jnp.logaddexp(lse_a, lse_b)
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  wa = jnp.exp(lse_a - safe).transpose(0, 2, 1)[..., None]   # [B, T, N, 1]
  wb = jnp.exp(lse_b - safe).transpose(0, 2, 1)[..., None]
  out = out_a.astype(f32) * wa + out_b.astype(f32) * wb
  return out.astype(out_a.dtype), lse


def dense_attention(q, k, v, *, bias=None, mask=None, scale=None):
  """Plain softmax attention (cross-attention and test references).

  Args:
    q: [B, T, N, H]; k, v: [B, S, N, H].
    bias: optional [B, S] float32 logit bias; mask: optional [T, S] bool (True = attend).
  Returns:
    [B, T, N, H] in q's dtype.
  """
  h = q.shape[-1]
  scale = (1.0 / h**0.5) if scale is None else scale
  s = jnp.einsum('BTNH,BSNH->BNTS', q, k.astype(q.dtype), preferred_element_type=f32) * scale
  if bias is not None:
    s = s + bias[:, None, None, :]
  if mask is not None:
    s = jnp.where(mask[None, None], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum('BNTS,BSNH->BTNH', p.astype(q.dtype), v.astype(q.dtype),
                   preferred_element_type=f32)
  return out.astype(q.dtype)
