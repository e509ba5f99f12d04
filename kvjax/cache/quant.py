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

from kvjax.kernels.formats import expand_groups, group_sizes, num_groups, sym_qmax  # noqa: F401

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


# ---------------------------------------------------------------- symmetric round-to-nearest
def sym_scale(amax: jax.Array, bits: int, dtype) -> jax.Array:
  """scale = max(amax / qmax, 1e-8), computed in ``dtype`` (the study: the tensor dtype)."""
  return jnp.maximum(amax.astype(dtype) / jnp.asarray(sym_qmax(bits), dtype),
                     jnp.asarray(1e-8, dtype))


def sym_codes(x: jax.Array, scale_tok: jax.Array, bits: int, dtype) -> jax.Array:
  """q = clamp(round(x / scale), -qmax-1, qmax) in ``dtype``, returned offset-binary uint8."""
  q = jnp.round(x.astype(dtype) / scale_tok.astype(dtype))
  q = jnp.clip(q, -sym_qmax(bits) - 1, sym_qmax(bits))
  return (q.astype(jnp.int32) + 2 ** (bits - 1)).astype(jnp.uint8)


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
