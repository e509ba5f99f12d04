"""Pure-jnp attention over cache sources walked chunk by chunk (the XLA path and the kernels' spec).

A source (``source.py``) is a pytree of record arrays plus a static format; ``read_chunk`` decodes
chunk j into k, v [B, S, N, H] and a logit bias [B, S]. ``walk`` runs an online softmax (float32
statistics) over the chunks of one source, so the only temporaries are one decoded chunk and a
[B, N, T, S] score tile: the cache is never expanded whole. ``attend_sources`` is the one place
where several sources meet: a rotated (QuaRot) source gets the Hadamard-rotated query and its
output is rotated back (the transform is orthonormal and symmetric), and the partial results
are merged by log-sum-exp. The Pallas kernels compute ``walk`` for one source.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from kvjax.kernels.source import Source, read_chunk
from kvjax.numerics import cast, fwht, round_bf16

f32 = jnp.float32
NEG_INF = -jnp.inf


def _precision(dtype):
  """HIGHEST for float32 operands: XLA GPU otherwise runs float32 dots in TF32 (10-bit mantissa),
  and float32 runs are the parity runs (the Pallas kernel asks for the same)."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.dtype(f32) else None


def _scores(q, k, bias, scale):
  """q [B, T, N, H], k [B, S, N, H], bias [B, S] -> [B, N, T, S] float32."""
  s = jnp.einsum('BTNH,BSNH->BNTS', q, k.astype(q.dtype), preferred_element_type=f32,
                 precision=_precision(q.dtype))
  return s * scale + bias[:, None, None, :]


def _cpu_bf16(dtype) -> bool:
  """True where bf16 dot operands are better run as float32 holding bf16-rounded values.

  XLA CPU has no bf16 matmul: it converts bf16 operands to float32 chunk by chunk anyway. Decoding
  a chunk straight to float32 and rounding it to bf16 precision with integer ops
  (``numerics.round_bf16``) gives the same operand values (a bf16 x bf16 product is exact in
  float32, so the dot is the same up to summation order) without the conversions.
  """
  return jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and jax.default_backend() == 'cpu'


def walk(q: jax.Array, src: Source, scale: float):
  """Attention of q over every chunk of one source, in the source's basis.

  Args:
    q: [B, T, N, H] queries (compute dtype), already rotated if the source is.
    src: the source; scale: logit scale.
  Returns:
    out: [B, T, N, H] float32 (zeros where nothing was attended);
    lse: [B, N, T] float32 log-sum-exp of the logits (-inf where nothing was attended).
  """
  b, t, n, h = q.shape
  if _cpu_bf16(q.dtype):
    qo, read, rnd = q.astype(f32), f32, round_bf16
  else:
    qo, read, rnd = q, q.dtype, lambda x: cast(x, q.dtype)

  def body(j, carry):
    m, l, acc = carry
    k, v, bias = read_chunk(src, j, read)
    s = _scores(qo, rnd(k), bias, scale)                       # [B, N, T, S]
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    corr = jnp.exp(m - m_safe)
    l = l * corr + jnp.sum(p, axis=-1)
    pv = jnp.einsum('BNTS,BSNH->BNTH', rnd(p), rnd(v), preferred_element_type=f32,
                    precision=_precision(qo.dtype))
    acc = acc * corr[..., None] + pv
    return m_new, l, acc

  carry = (jnp.full((b, n, t), NEG_INF, f32), jnp.zeros((b, n, t), f32),
           jnp.zeros((b, n, t, h), f32))
  m, l, acc = jax.lax.fori_loop(0, src.num_chunks, body, carry)
  ok = l > 0
  out = jnp.where(ok[..., None], acc / jnp.where(ok, l, 1.0)[..., None], 0.0)
  lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)
  return out.transpose(0, 2, 1, 3), lse


Partial = Callable[[jax.Array, Source, float], tuple[jax.Array, jax.Array]]


def attend_sources(q: jax.Array, sources: Sequence[Source], partial: Partial,
                   scale: float | None = None):
  """Softmax attention of q over the union of ``sources``.

  Args:
    q: [B, T, N, H] queries (compute dtype).
    sources: sources of disjoint key sets (may be empty).
    partial: (q in the source's basis, source, scale) -> (out [B, T, N, H] float32, lse [B, N, T]),
      ``walk`` or a kernel.
    scale: logit scale, default 1/sqrt(H).
  Returns:
    out: [B, T, N, H] in q's dtype (zeros where nothing was attended);
    lse: [B, N, T] float32 (-inf where nothing was attended).
  """
  b, t, n, h = q.shape
  scale = (1.0 / h**0.5) if scale is None else scale
  out, lse = jnp.zeros((b, t, n, h), f32), jnp.full((b, n, t), NEG_INF, f32)
  q_rot = None
  for src in sources:
    if src.rotated:
      if q_rot is None:
        q_rot = fwht(q, f32).astype(q.dtype)
      o, l = partial(q_rot, src, scale)
      o = fwht(o.astype(f32), f32)
    else:
      o, l = partial(q, src, scale)
    out, lse = merge(out, lse, o.astype(f32), l)
  return out.astype(q.dtype), lse


def chunked_attention(q: jax.Array, sources, *, scale: float | None = None):
  """The XLA reference: ``attend_sources`` with ``walk`` (one source or a sequence)."""
  sources = [sources] if isinstance(sources, Source) else list(sources)
  return attend_sources(q, sources, walk, scale)


def materialize_source(src: Source):
  """Reference/debug: every chunk of a source decoded, chunks past ``num_chunks`` masked.

  Returns:
    k, v: [B, M * S, N, H] float32 un-rotated (M = max_chunks; zeros in unused chunks);
    bias: [B, M * S] (-inf for unused chunks).
  """
  ks, vs, bs = [], [], []
  last = jnp.maximum(src.num_chunks - 1, 0)
  for j in range(src.max_chunks):
    k, v, bias = read_chunk(src, jnp.minimum(j, last), f32)
    if src.rotated:
      k, v = fwht(k, f32), fwht(v, f32)
    valid = j < src.num_chunks          # an unused chunk may hold another format's bytes
    ks.append(jnp.where(valid, k, 0.0))
    vs.append(jnp.where(valid, v, 0.0))
    bs.append(jnp.where(valid, bias, NEG_INF))
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
