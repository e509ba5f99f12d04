"""Codecs: the storage formats of ``kvjax/kernels/formats.py`` plus how values are encoded.

A codec turns x [B, F, P, N, H] (F frames of P tokens) into a record, the dict of arrays of its
format (leading axes [B, F]), and the format reads it back (``decode``). Records are really
packed: INT4 codes two per uint8, INT2 four per uint8 (``kernels/packing.py``), scales/zero-points
fp16 (held as raw uint16 bits, see ``numerics.storage_dtype``), outliers as int32 index + fp16
value. ``decode`` is applied to one frame slot at a time by the attention walk, so it only ever
builds chunk-sized float arrays. Each codec is its format (it subclasses it), so the kernels can
read what a codec wrote knowing only the format.

``rotated`` codecs (QuaRot) decode into the Hadamard basis; attention then rotates the query and
the output instead of un-rotating keys and values (the cache stays rotated).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import quant
from kvjax.kernels import formats as F
from kvjax.kernels import packing
from kvjax.numerics import fwht, to_storage

f32 = jnp.float32
F16 = F.F16


@dataclasses.dataclass(frozen=True)
class Codec(F.Format):
  """Base codec: a storage format that can also encode (module docstring)."""

  def encode(self, x: jax.Array, aux: dict | None = None) -> dict[str, jax.Array]:
    """x [B, F, P, N, H] -> record (``aux``: method statistics some codecs need)."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Dense(F.Dense, Codec):
  """Unquantized values in ``dtype`` (16-bit floats held as raw uint16 bits)."""

  def encode(self, x, aux=None):
    return {'x': to_storage(x, self.dtype)}


@dataclasses.dataclass(frozen=True)
class SymRTN(F.SymGroup, Codec):
  """Symmetric round-to-nearest per (token group, head, channel), fp16 scale (section 2.2/3.2).

  Scale and x / scale are computed in the input dtype (BF16 on the fast path, as the study);
  ``dequant_dtype`` is the dtype of codes * scale (float32 in the study's Gen A/C, BF16 in Gen B).
  INT2 is effectively ternary ({-1, 0, 1}), as in the study.
  """

  def scale_of(self, x):
    amax = quant.group_reduce(jnp.abs(x), self.group, jnp.max)
    return quant.sym_scale(amax, self.bits, x.dtype)

  def encode(self, x, aux=None):
    scale = self.scale_of(x)
    p = x.shape[2]
    codes = quant.sym_codes(x, quant.expand_groups(scale, p, self.group), self.bits, x.dtype)
    return {'codes': packing.pack(codes, self.bits), 'scale': to_storage(scale, F16)}


@dataclasses.dataclass(frozen=True)
class AsymGroup(F.AsymGroup, Codec):
  """Asymmetric min/max per (token group, head, channel): KIVI keys, QAQ keys (section 2.3/3.3).

  ``clamp_zero_point`` (default True, the study) clamps zp to [0, qmax]; False fixes it.
  """

  def encode(self, x, aux=None):
    lo = quant.group_reduce(x, self.group, jnp.min)
    hi = quant.group_reduce(x, self.group, jnp.max)
    scale, zp = quant.asym_params(lo, hi, self.bits, x.dtype, self.clamp_zero_point)
    p = x.shape[2]
    codes = quant.asym_codes(x, quant.expand_groups(scale, p, self.group),
                             quant.expand_groups(zp, p, self.group), self.bits, x.dtype)
    return {'codes': packing.pack(codes, self.bits), 'scale': to_storage(scale, F16),
            'zp': to_storage(zp, F16)}


@dataclasses.dataclass(frozen=True)
class AsymToken(F.AsymToken, Codec):
  """Asymmetric min/max per token over all heads and channels (N x H values): KIVI/QAQ values."""

  def encode(self, x, aux=None):
    lo = jnp.min(x, axis=(3, 4))
    hi = jnp.max(x, axis=(3, 4))
    scale, zp = quant.asym_params(lo, hi, self.bits, x.dtype, self.clamp_zero_point)
    codes = quant.asym_codes(x, scale[..., None, None], zp[..., None, None], self.bits, x.dtype)
    return {'codes': packing.pack(codes, self.bits), 'scale': to_storage(scale, F16),
            'zp': to_storage(zp, F16)}


@dataclasses.dataclass(frozen=True)
class Rotated(F.Rotated, Codec):
  """QuaRot: the normalized Hadamard transform over head_dim (per head), then ``inner``.

  The rotation is computed stage by stage in the input dtype, as the study's BF16 FWHT. Decoding
  stays in the rotated basis (``rotated = True``): kvjax's faster read, ``QuaRot(read_basis=
  'rotated')``; ``Derotated`` reads the same records as the study does.
  """
  inner: Codec = SymRTN()

  def encode(self, x, aux=None):
    return self.inner.encode(fwht(x), aux)


@dataclasses.dataclass(frozen=True)
class Derotated(F.Derotated, Codec):
  """QuaRot as the study reads it: encoded as ``Rotated``, decoded back to the original basis
  (``formats.Derotated``)."""
  inner: SymRTN = SymRTN()

  def encode(self, x, aux=None):
    return self.inner.encode(fwht(x), aux)


@dataclasses.dataclass(frozen=True)
class PRQ(F.Residual, Codec):
  """Progressive residual quantization: symmetric RTN at ``bits``, then RTN of the float32
  residual at ``residual_bits``, each with its own fp16 scales; read back as the float32 sum."""

  @property
  def stages(self):
    return SymRTN(self.bits, self.group, 'float32'), SymRTN(self.residual_bits, self.group, 'float32')

  def encode(self, x, aux=None):
    s1, s2 = self.stages
    r1 = s1.encode(x)
    resid = x.astype(f32) - s1.decode(r1, f32)
    r2 = s2.encode(resid)
    return {**{f'base_{k}': v for k, v in r1.items()}, **{f'res_{k}': v for k, v in r2.items()}}


@dataclasses.dataclass(frozen=True)
class Outliers(F.WithOutliers, Codec):
  """Elements with |x| > threshold * sigma kept exactly (int32 flat index + fp16 value).

  ``sigma`` comes from the method through ``aux['sigma']`` (a float32 scalar); the bound is
  rounded as the study's (``bound``). At most ``capacity`` outliers a frame are kept (the largest
  |x|); the rest stay in the inner codec and are counted in ``dropped`` (``overflow``). ``clip``
  (QAQ) clamps x to the bound before the inner codec; TPTQ does not clip (its outliers still
  inflate their groups' scales, as in the study).
  """
  inner: Codec = AsymGroup()

  def bound(self, sigma: jax.Array, dtype) -> jax.Array:
    """threshold * sigma as the study computes it (float32 scalar): sigma, its population std,
    in the tensor dtype floored at 1e-8, times the threshold rounded to the tensor dtype again."""
    sig = quant.floor_eps(quant.in_dtype(sigma, dtype), dtype)
    return quant.in_dtype(sig * np.float32(self.threshold), dtype)

  def outliers(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """x [B, F, P, N, H] -> [B, F, P*N*H] bool: |x| > bound (the study's outliers)."""
    b, nf = x.shape[:2]
    return jnp.abs(x.reshape(b, nf, -1).astype(f32)) > self.bound(sigma, x.dtype)

  def overflow(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """[B, F] int32: outliers of each frame beyond the capacity (kept in the inner codec)."""
    cap = self.capacity(*x.shape[2:])
    return jnp.maximum(jnp.sum(self.outliers(x, sigma), axis=-1) - cap, 0).astype(jnp.int32)

  def encode(self, x, aux=None):
    if aux is None or 'sigma' not in aux:
      raise ValueError('Outliers codec needs aux["sigma"] from its method')
    b, nf, p, n, h = x.shape
    cap = self.capacity(p, n, h)
    bound = self.bound(aux['sigma'], x.dtype)
    flat = x.reshape(b, nf, -1)
    is_out = self.outliers(x, aux['sigma'])
    score = jnp.where(is_out, jnp.abs(flat.astype(f32)), -1.0)
    top, idx = jax.lax.top_k(score, cap)
    keep = top > 0
    vals = jnp.take_along_axis(flat, idx, axis=-1)
    out_idx = jnp.where(keep, idx, p * n * h).astype(jnp.int32)
    dropped = jnp.maximum(jnp.sum(is_out, axis=-1) - cap, 0).astype(jnp.int32)
    base = jnp.clip(x, -bound.astype(x.dtype), bound.astype(x.dtype)) if self.clip else x
    return {**self.inner.encode(base, aux), 'out_idx': out_idx,
            'out_val': to_storage(vals, F16), 'dropped': dropped}


@dataclasses.dataclass(frozen=True)
class Spatial(F.Split, Codec):
  """Spatial mixed precision: each frame's ``n_fg`` foreground tokens with ``fg``, the rest
  with ``bg``, each re-grouped on its gathered sub-tensor (as the study).

  The method passes the token order through ``aux['order']`` ([B, P] int32, foreground positions
  first). Attention is order-free, so records keep that order; the attention walk reads the
  foreground and background parts as two sources, each in its own basis.
  """
  fg: Codec = SymRTN(4)
  bg: Codec = SymRTN(2)

  def encode(self, x, aux=None):
    if aux is None or 'order' not in aux:
      raise ValueError('Spatial codec needs aux["order"] from its method')
    order = aux['order']                                             # [B, P]
    xs = jnp.take_along_axis(x, order[:, None, :, None, None], axis=2)
    fg = self.fg.encode(xs[:, :, :self.n_fg], aux)
    bg = self.bg.encode(xs[:, :, self.n_fg:], aux)
    return {**{f'fg_{k}': v for k, v in fg.items()}, **{f'bg_{k}': v for k, v in bg.items()}}
