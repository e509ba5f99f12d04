"""Float helpers shared by the cache codecs and the attention kernels (no kvjax imports)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def round_bf16(y: jax.Array) -> jax.Array:
  """float32 -> float32 rounded to bfloat16 precision (round to nearest even), integer ops only.

  Equals ``y.astype(bfloat16).astype(float32)``; every NaN becomes the quiet NaN (one whose
  payload sits in the low bits only would otherwise round to Inf). XLA CPU has no native bf16
  arithmetic and its float conversions are several times slower than these integer ops.
  """
  y = y.astype(f32)
  u = jax.lax.bitcast_convert_type(y, jnp.uint32)
  u = (u + (jnp.uint32(0x7FFF) + ((u >> 16) & 1))) & jnp.uint32(0xFFFF0000)
  return jnp.where(jnp.isnan(y), jnp.float32(jnp.nan), jax.lax.bitcast_convert_type(u, f32))


def cast(y: jax.Array, dtype) -> jax.Array:
  """``y.astype(dtype)``; float32 -> bfloat16 through integer rounding on CPU (same values)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.dtype(jnp.bfloat16) and y.dtype == f32 and jax.default_backend() == 'cpu':
    u = jax.lax.bitcast_convert_type(round_bf16(y), jnp.uint32) >> 16
    return jax.lax.bitcast_convert_type(u.astype(jnp.uint16), jnp.bfloat16)
  return y.astype(dtype)
