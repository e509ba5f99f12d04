"""Float helpers shared by the cache codecs and the attention kernels (no kvjax imports).

rounding to bfloat16 by integer ops, 16-bit floats stored as raw bits, the Walsh-Hadamard
transform (QuaRot).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

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


def storage_dtype(dtype) -> jnp.dtype:
  """Array dtype used to *store* values of float ``dtype``: 16-bit floats as raw uint16 bits.

  XLA CPU runs bf16/fp16 dynamic slices through float normalization: it converts the whole
  operand to float32 and loop-invariant code motion hoists that conversion out of the chunk
  loop, so a bf16 cache would be copied whole to float32 on every call (BUILD.md, "CPU and GPU differ").
  Integer arrays are left alone, so 16-bit floats are kept as their bit patterns (same bytes)
  and chunk-sized slices are bitcast back. Other dtypes are stored as they are.
  """
  dtype = jnp.dtype(dtype)
  is_float = jnp.issubdtype(dtype, jnp.floating)
  return jnp.dtype(jnp.uint16) if dtype.itemsize == 2 and is_float else dtype


def to_storage(x, dtype):
  """Casts x to float ``dtype`` and returns it in ``storage_dtype(dtype)``."""
  x = x.astype(dtype)
  sd = storage_dtype(dtype)
  return jax.lax.bitcast_convert_type(x, sd) if sd != jnp.dtype(dtype) else x


def from_storage(x, dtype):
  """Inverse of ``to_storage`` (apply to chunk-sized slices)."""
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != jnp.dtype(dtype) else x


def fwht(x: jax.Array, dtype=None) -> jax.Array:
  """Normalized fast Walsh-Hadamard transform over the last axis (natural/Sylvester order).

  log2(H) butterfly stages (a + b, a - b) over halves of growing size, then times the float32
  reciprocal of sqrt(H) (how torch on CUDA divides by a Python number); each stage is computed in
  float32 and rounded to ``dtype`` (default x.dtype), as the study computes it in BF16. The
  orthonormal, symmetric matrix is its own inverse.
  """
  dtype = jnp.dtype(dtype or x.dtype)
  h = x.shape[-1]
  if h & (h - 1):
    raise ValueError(f'Hadamard size must be a power of two (got {h})')
  def rnd(y):                                     # float32 rounded to ``dtype``'s precision
    if dtype == jnp.dtype(f32):
      return y
    return round_bf16(y) if dtype == jnp.dtype(jnp.bfloat16) else y.astype(dtype).astype(f32)

  y = rnd(x.astype(f32))
  lead = y.shape[:-1]
  size = 1
  while size < h:
    y = y.reshape(*lead, h // (2 * size), 2, size)
    a, b = y[..., 0, :], y[..., 1, :]
    y = rnd(jnp.stack([a + b, a - b], axis=-2).reshape(*lead, h))
    size *= 2
  return rnd(y * (np.float32(1) / np.float32(math.sqrt(h)))).astype(dtype)


def hadamard_matrix(h: int) -> np.ndarray:
  """The normalized Sylvester Hadamard matrix [h, h] (float64), for references."""
  m = np.ones((1, 1))
  while m.shape[0] < h:
    m = np.block([[m, m], [m, -m]])
  return m / math.sqrt(h)
