"""Quantization primitives shared by the cache methods (formats: docs/ARCHITECTURE.md).

Token groups. A frame's P tokens are split into groups of G consecutive tokens; when G does not
divide P, the last group absorbs the remainder (1,560 = 96 x 16 + 24 at 480x832, so 97 groups
a frame). Groups never straddle frames (hence never blocks), every token is quantized exactly
once, when its frame is appended, and a frame never needs more statistics than P / G — the
stored size never exceeds the paper's nominal ratio. (The study's 65,520-slot buffer put a group
boundary in the middle of every other frame instead; only the 24-token last group differs.)

Shapes: ``x`` is [B, F, P, N, H] (batch, frames, tokens per frame, heads, head dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.kernels.formats import (dequant_math, expand_groups, group_sizes, num_groups,  # noqa: F401
                                   sym_qmax)

f32 = jnp.float32


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


# ---------------------------------------------------------------- the study's arithmetic
# The study quantizes in the tensor dtype with torch on CUDA: every operation on BF16 values is
# computed in float32 and rounded to BF16, and a division by a Python number (``/ qmax``) is a
# multiplication by its float32 reciprocal. The functions below spell that out in float32
# (``in_dtype`` rounds where torch rounds) instead of relying on a backend's BF16 arithmetic.
def in_dtype(y: jax.Array, dtype) -> jax.Array:
  """y rounded to the precision of ``dtype`` (float32 or bfloat16), returned float32."""
  return dequant_math(jnp.asarray(y).astype(f32), dtype)


def div_scalar(y: jax.Array, d: float, dtype) -> jax.Array:
  """``y / d`` for a Python number d as torch computes it on CUDA: y * (1 / d), the reciprocal
  and the product in float32, rounded to ``dtype``; returned float32."""
  inv = np.float32(1.0) / np.float32(d)
  return in_dtype(jnp.asarray(y).astype(f32) * inv, dtype)


def true_div(a: jax.Array, b: jax.Array) -> jax.Array:
  """a / b correctly rounded, as torch divides two tensors. XLA rewrites a division by a
  broadcast (a per-group scale expanded to its tokens) into a multiplication by the reciprocal,
  which is an ulp off for a quarter of the quotients and moves exact rounding ties; the barrier
  keeps the divisor opaque (it costs one encode-sized temporary)."""
  return a / jax.lax.optimization_barrier(b)


def floor_eps(s: jax.Array, dtype) -> jax.Array:
  """max(s, 1e-8) with 1e-8 in ``dtype`` (the study's clamp_min(1e-8) of scales and sigma)."""
  return jnp.maximum(s, in_dtype(np.float32(1e-8), dtype))


# ---------------------------------------------------------------- symmetric round-to-nearest
def sym_scale(amax: jax.Array, bits: int, dtype) -> jax.Array:
  """scale = max(amax / qmax, 1e-8), computed in ``dtype`` (the study: the tensor dtype);
  returned in ``dtype``."""
  return floor_eps(div_scalar(amax, sym_qmax(bits), dtype), dtype).astype(dtype)


def sym_codes(x: jax.Array, scale_tok: jax.Array, bits: int, dtype) -> jax.Array:
  """q = clamp(round(x / scale), -qmax-1, qmax), x / scale rounded to ``dtype`` before the
  round-half-to-even; returned offset-binary uint8."""
  xd = in_dtype(x, dtype)
  q = jnp.round(in_dtype(true_div(xd, in_dtype(scale_tok, dtype)), dtype))
  q = jnp.clip(q, -sym_qmax(bits) - 1, sym_qmax(bits))
  return (q.astype(jnp.int32) + 2 ** (bits - 1)).astype(jnp.uint8)


# ---------------------------------------------------------------- asymmetric min/max
def asym_params(lo: jax.Array, hi: jax.Array, bits: int, dtype, clamp_zero_point: bool):
  """scale = max((hi - lo) / qmax, 1e-8); zp = round(-(lo / scale)), clamped to [0, qmax] (the
  study), each operation rounded to ``dtype``; both returned in ``dtype``.

  With ``clamp_zero_point=False`` the zero-point is kept unclamped (fp16 holds it exactly for
  |zp| < 2048), which fixes the study's one-signed-group saturation (spec section 2.3).
  """
  qmax = 2**bits - 1
  lo, hi = in_dtype(lo, dtype), in_dtype(hi, dtype)
  scale = floor_eps(div_scalar(in_dtype(hi - lo, dtype), qmax, dtype), dtype)
  zp = jnp.round(-in_dtype(true_div(lo, scale), dtype))
  if clamp_zero_point:
    zp = jnp.clip(zp, 0, qmax)
  return scale.astype(dtype), zp.astype(dtype)


def asym_codes(x, scale_tok, zp_tok, bits: int, dtype):
  """q = clamp(round(x / scale + zp), 0, qmax), the quotient and the sum rounded to ``dtype``."""
  quot = in_dtype(true_div(in_dtype(x, dtype), in_dtype(scale_tok, dtype)), dtype)
  q = jnp.round(in_dtype(quot + in_dtype(zp_tok, dtype), dtype))
  return jnp.clip(q, 0, 2**bits - 1).astype(jnp.uint8)
