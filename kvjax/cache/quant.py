"""Quantization primitives shared by the cache methods (spec/methods.md section 2).

Token groups. A frame's P tokens are split into groups of G consecutive tokens; when G does not
divide P, the last group absorbs the remainder (1,560 = 96 x 16 + 24 at 480x832, so 97 groups
a frame). Groups never straddle frames (hence never blocks), every token is quantized exactly
once, when its frame is appended, and a frame never needs more statistics than P / G — the
stored size never exceeds the paper's nominal ratio. (The study's 65,520-slot buffer put a group
boundary in the middle of every other frame instead; only the 24-token last group differs.)

Shapes: ``x`` is [B, F, P, N, H] (batch, frames, tokens per frame, heads, head dim).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.numerics import cast, round_bf16  # noqa: F401  (re-exported for codecs)

f32 = jnp.float32


def num_groups(p: int, g: int) -> int:
  if g < 1:
    raise ValueError(f'group size must be >= 1 (got {g})')
  return max(1, p // g)


def group_sizes(p: int, g: int) -> np.ndarray:
  """Tokens in each group of a P-token frame (last group absorbs the remainder)."""
  n = num_groups(p, g)
  sizes = np.full(n, min(g, p), np.int64)
  sizes[-1] = p - g * (n - 1)
  return sizes


def _split(x: jax.Array, g: int):
  """x [B, F, P, ...] -> (head [B, F, n-1, g, ...], tail [B, F, t, ...]) for the group layout."""
  p = x.shape[2]
  n = num_groups(p, g)
  cut = (n - 1) * g
  head = x[:, :, :cut].reshape(x.shape[0], x.shape[1], n - 1, g, *x.shape[3:])
  return head, x[:, :, cut:]


def group_reduce(x: jax.Array, g: int, op) -> jax.Array:
  """Reduces over each token group: [B, F, P, ...] -> [B, F, n_groups, ...] (op = jnp.max, ...)."""
  head, tail = _split(x, g)
  parts = [op(head, axis=3)] if head.shape[2] else []
  parts.append(op(tail, axis=2)[:, :, None])
  return jnp.concatenate(parts, axis=2)


def expand_groups(s: jax.Array, p: int, g: int) -> jax.Array:
  """Per-group statistics [B, F, n_groups, ...] -> per-token [B, F, P, ...] (broadcasts)."""
  n = num_groups(p, g)
  if n == 1:
    return jnp.broadcast_to(s, s.shape[:2] + (p,) + s.shape[3:])
  lead, rest = s.shape[:2], s.shape[3:]
  head = jnp.broadcast_to(s[:, :, :n - 1, None], lead + (n - 1, g) + rest).reshape(lead + ((n - 1) * g,) + rest)
  tail = jnp.broadcast_to(s[:, :, n - 1:], lead + (p - (n - 1) * g,) + rest)
  return jnp.concatenate([head, tail], axis=2)


def dequant_math(y: jax.Array, dtype) -> jax.Array:
  """Rounds a float32 value to what arithmetic in ``dtype`` (float32 or bfloat16) would give."""
  return round_bf16(y) if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) else y.astype(f32)


# ---------------------------------------------------------------- symmetric round-to-nearest
def sym_qmax(bits: int) -> int:
  return 2 ** (bits - 1) - 1


def sym_scale(amax: jax.Array, bits: int, dtype) -> jax.Array:
  """scale = max(amax / qmax, 1e-8), computed in ``dtype`` (the study: the tensor dtype)."""
  return jnp.maximum(amax.astype(dtype) / jnp.asarray(sym_qmax(bits), dtype),
                     jnp.asarray(1e-8, dtype))


def sym_codes(x: jax.Array, scale_tok: jax.Array, bits: int, dtype) -> jax.Array:
  """q = clamp(round(x / scale), -qmax-1, qmax) in ``dtype``, returned offset-binary uint8."""
  q = jnp.round(x.astype(dtype) / scale_tok.astype(dtype))
  q = jnp.clip(q, -sym_qmax(bits) - 1, sym_qmax(bits))
  return (q.astype(jnp.int32) + 2 ** (bits - 1)).astype(jnp.uint8)


def sym_dequant(codes: jax.Array, scale_tok: jax.Array, bits: int, dtype) -> jax.Array:
  """q * scale computed in ``dtype`` (values exactly as that arithmetic), returned float32."""
  q = codes.astype(f32) - float(2 ** (bits - 1))
  return dequant_math(q * dequant_math(scale_tok.astype(f32), dtype), dtype)


# ---------------------------------------------------------------- asymmetric min/max
def asym_params(lo: jax.Array, hi: jax.Array, bits: int, dtype, clamp_zero_point: bool):
  """scale = max((hi - lo) / qmax, 1e-8); zp = round(-lo / scale), clamped to [0, qmax] (the study).

  With ``clamp_zero_point=False`` the zero-point is kept unclamped (fp16 holds it exactly for
  |zp| < 2048), which fixes the study's one-signed-group saturation (spec section 2.3).
  """
  qmax = 2**bits - 1
  scale = jnp.maximum((hi.astype(dtype) - lo.astype(dtype)) / jnp.asarray(qmax, dtype),
                      jnp.asarray(1e-8, dtype))
  zp = jnp.round(-lo.astype(dtype) / scale)
  if clamp_zero_point:
    zp = jnp.clip(zp, 0, qmax)
  return scale, zp


def asym_codes(x, scale_tok, zp_tok, bits: int, dtype):
  q = jnp.round(x.astype(dtype) / scale_tok.astype(dtype) + zp_tok.astype(dtype))
  return jnp.clip(q, 0, 2**bits - 1).astype(jnp.uint8)


def asym_dequant(codes, scale_tok, zp_tok, dtype):
  """(q - zp) * scale computed in ``dtype``, returned float32."""
  d = dequant_math(codes.astype(f32) - dequant_math(zp_tok.astype(f32), dtype), dtype)
  return dequant_math(d * dequant_math(scale_tok.astype(f32), dtype), dtype)


# ---------------------------------------------------------------- Walsh-Hadamard transform
def fwht(x: jax.Array, dtype=None) -> jax.Array:
  """Normalized fast Walsh-Hadamard transform over the last axis (natural/Sylvester order).

  log2(H) butterfly stages (a + b, a - b) over halves of growing size, then / sqrt(H); each
  stage is rounded to ``dtype`` (default x.dtype), as the study computes it in BF16. The
  orthonormal, symmetric matrix is its own inverse.
  """
  dtype = jnp.dtype(dtype or x.dtype)
  h = x.shape[-1]
  if h & (h - 1):
    raise ValueError(f'Hadamard size must be a power of two (got {h})')
  y = x.astype(dtype)
  lead = y.shape[:-1]
  size = 1
  while size < h:
    y = y.reshape(*lead, h // (2 * size), 2, size)
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, h)
    size *= 2
  return (y / jnp.asarray(math.sqrt(h), dtype)).astype(dtype)


def hadamard_matrix(h: int) -> np.ndarray:
  """The normalized Sylvester Hadamard matrix [h, h] (float64), for references."""
  m = np.ones((1, 1))
  while m.shape[0] < h:
    m = np.block([[m, m], [m, -m]])
  return m / math.sqrt(h)
