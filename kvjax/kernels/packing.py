"""Bit packing of integer codes into uint8, along the channel (last) axis.

A byte holds ``8 // bits`` codes. For ``bits`` b and ``k = 8 // b`` codes per byte, byte j of a
row of H channels holds channels ``j, j + H/k, j + 2H/k, ...`` in bit fields ``0, b, 2b, ...``
(low bits first). Splitting the channel axis into k contiguous slices (instead of interleaving
neighbours) lets a kernel unpack with shifts and masks and work on each slice without
concatenating or reshaping inside the kernel. Codes are unsigned (offset-binary for signed
quantizers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

VALID_BITS = (2, 4, 8)


def check_bits(bits: int, what: str = 'bits') -> int:
  if bits not in VALID_BITS:
    raise ValueError(f'unsupported {what}={bits}; valid bit widths: {list(VALID_BITS)}')
  return bits


def packed_width(h: int, bits: int) -> int:
  """Bytes per row of h codes."""
  k = 8 // check_bits(bits)
  if h % k:
    raise ValueError(f'channel count {h} is not divisible by {k} codes per byte ({bits}-bit)')
  return h // k


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """codes [..., H] unsigned ints in [0, 2^bits) -> [..., H * bits / 8] uint8."""
  k = 8 // check_bits(bits)
  h = codes.shape[-1]
  w = packed_width(h, bits)
  c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], k, w)
  out = c[..., 0, :]
  for i in range(1, k):
    out = out | (c[..., i, :] << (i * bits))
  return out


def unpack(packed: jax.Array, bits: int) -> jax.Array:
  """Inverse of ``pack``: [..., W] uint8 -> [..., W * 8 / bits] uint8 codes."""
  k = 8 // check_bits(bits)
  if k == 1:
    return packed
  mask = jnp.uint8((1 << bits) - 1)
  parts = [(packed >> (i * bits)) & mask for i in range(k)]
  return jnp.concatenate(parts, axis=-1)
