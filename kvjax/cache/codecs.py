"""Codecs: how one tensor (K or V) of a run of frames is stored, and how it is read back.

A codec turns x [B, F, P, N, H] (F frames of P tokens) into a dict of arrays whose leading axes
are [B, F] (the *record* of those frames) and back. Records are really packed: INT4 codes two per
uint8, INT2 four per uint8 (``packing.py``), scales/zero-points fp16 (held as raw uint16 bits, see
``base.storage_dtype``), outliers as int32 index + fp16 value. ``decode`` is applied to one frame
slot at a time by the attention walk, so it only ever builds chunk-sized float arrays.

``rotated`` codecs (QuaRot) decode into the Hadamard basis; attention then rotates the query and
the accumulated output instead of un-rotating keys and values (DESIGN: keep the cache rotated).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import packing, quant
from kvjax.cache.base import from_storage, storage_dtype, to_storage

f32 = jnp.float32
F16 = jnp.dtype(jnp.float16)
_DEQUANT = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def _check_group(group: int):
  if not isinstance(group, (int, np.integer)) or group < 1:
    raise ValueError(f'unsupported group size {group!r}; valid: an integer >= 1 (the study uses 16)')


def _check_dequant(d: str):
  if d not in _DEQUANT:
    raise ValueError(f'unsupported dequant_dtype {d!r}; valid: {sorted(_DEQUANT)}')


def _check_grouped(codec):
  """Validates the bits, group and dequant_dtype fields of a grouped quantizer codec."""
  packing.check_bits(codec.bits)
  _check_group(codec.group)
  _check_dequant(codec.dequant_dtype)


@dataclasses.dataclass(frozen=True)
class Codec:
  """Base codec (see module docstring)."""
  rotated = False

  def fields(self, b: int, f: int, p: int, n: int, h: int) -> dict[str, jax.ShapeDtypeStruct]:
    raise NotImplementedError

  def encode(self, x: jax.Array, aux: dict | None = None) -> dict[str, jax.Array]:
    raise NotImplementedError

  def decode(self, rec: dict[str, jax.Array], dtype) -> jax.Array:
    raise NotImplementedError

  def record_bytes(self, p: int, n: int, h: int) -> int:
    """Bytes of one frame (batch 1) in this codec."""
    return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in self.fields(1, 1, p, n, h).values())


@dataclasses.dataclass(frozen=True)
class Dense(Codec):
  """Unquantized values in ``dtype`` (16-bit floats held as raw uint16 bits)."""
  dtype: Any = jnp.bfloat16

  def fields(self, b, f, p, n, h):
    return {'x': _sds((b, f, p, n, h), storage_dtype(self.dtype))}

  def encode(self, x, aux=None):
    return {'x': to_storage(x, self.dtype)}

  def decode(self, rec, dtype):
    return from_storage(rec['x'], self.dtype).astype(dtype)


@dataclasses.dataclass(frozen=True)
class SymRTN(Codec):
  """Symmetric round-to-nearest per (token group, head, channel), fp16 scale (section 2.2/3.2).

  Scale and x / scale are computed in the input dtype (BF16 on the fast path, as the study);
  ``dequant_dtype`` is the dtype of codes * scale (float32 in the study's Gen A/C, BF16 in Gen B).
  INT2 is effectively ternary ({-1, 0, 1}), as in the study.
  """
  bits: int = 4
  group: int = 16
  dequant_dtype: str = 'float32'

  def __post_init__(self):
    _check_grouped(self)

  def fields(self, b, f, p, n, h):
    return {'codes': _sds((b, f, p, n, packing.packed_width(h, self.bits)), jnp.uint8),
            'scale': _sds((b, f, quant.num_groups(p, self.group), n, h), storage_dtype(F16))}

  def scale_of(self, x):
    amax = quant.group_reduce(jnp.abs(x), self.group, jnp.max)
    return quant.sym_scale(amax, self.bits, x.dtype)

  def encode(self, x, aux=None):
    scale = self.scale_of(x)
    p = x.shape[2]
    codes = quant.sym_codes(x, quant.expand_groups(scale, p, self.group), self.bits, x.dtype)
    return {'codes': packing.pack(codes, self.bits), 'scale': to_storage(scale, F16)}

  def decode(self, rec, dtype):
    codes = packing.unpack(rec['codes'], self.bits)
    scale = from_storage(rec['scale'], F16)
    tok = quant.expand_groups(scale, codes.shape[2], self.group)
    return quant.cast(quant.sym_dequant(codes, tok, self.bits, _DEQUANT[self.dequant_dtype]), dtype)


@dataclasses.dataclass(frozen=True)
class AsymGroup(Codec):
  """Asymmetric min/max per (token group, head, channel): KIVI keys, QAQ keys (section 2.3/3.3).

  ``clamp_zero_point`` (default True, the study) clamps zp to [0, qmax]; False fixes it.
  """
  bits: int = 4
  group: int = 16
  clamp_zero_point: bool = True
  dequant_dtype: str = 'float32'

  def __post_init__(self):
    _check_grouped(self)

  def fields(self, b, f, p, n, h):
    g = quant.num_groups(p, self.group)
    return {'codes': _sds((b, f, p, n, packing.packed_width(h, self.bits)), jnp.uint8),
            'scale': _sds((b, f, g, n, h), storage_dtype(F16)),
            'zp': _sds((b, f, g, n, h), storage_dtype(F16))}

  def encode(self, x, aux=None):
    lo = quant.group_reduce(x, self.group, jnp.min)
    hi = quant.group_reduce(x, self.group, jnp.max)
    scale, zp = quant.asym_params(lo, hi, self.bits, x.dtype, self.clamp_zero_point)
    p = x.shape[2]
    codes = quant.asym_codes(x, quant.expand_groups(scale, p, self.group),
                             quant.expand_groups(zp, p, self.group), self.bits, x.dtype)
    return {'codes': packing.pack(codes, self.bits), 'scale': to_storage(scale, F16),
            'zp': to_storage(zp, F16)}

  def decode(self, rec, dtype):
    codes = packing.unpack(rec['codes'], self.bits)
    p = codes.shape[2]
    scale = quant.expand_groups(from_storage(rec['scale'], F16), p, self.group)
    zp = quant.expand_groups(from_storage(rec['zp'], F16), p, self.group)
    return quant.cast(quant.asym_dequant(codes, scale, zp, _DEQUANT[self.dequant_dtype]), dtype)


@dataclasses.dataclass(frozen=True)
class AsymToken(Codec):
  """Asymmetric min/max per token over all heads and channels (N x H values): KIVI/QAQ values."""
  bits: int = 4
  clamp_zero_point: bool = True
  dequant_dtype: str = 'float32'

  def __post_init__(self):
    packing.check_bits(self.bits)
    _check_dequant(self.dequant_dtype)

  def fields(self, b, f, p, n, h):
    return {'codes': _sds((b, f, p, n, packing.packed_width(h, self.bits)), jnp.uint8),
            'scale': _sds((b, f, p), storage_dtype(F16)),
            'zp': _sds((b, f, p), storage_dtype(F16))}

  def encode(self, x, aux=None):
    lo = jnp.min(x, axis=(3, 4))
    hi = jnp.max(x, axis=(3, 4))
    scale, zp = quant.asym_params(lo, hi, self.bits, x.dtype, self.clamp_zero_point)
    codes = quant.asym_codes(x, scale[..., None, None], zp[..., None, None], self.bits, x.dtype)
    return {'codes': packing.pack(codes, self.bits), 'scale': to_storage(scale, F16),
            'zp': to_storage(zp, F16)}

  def decode(self, rec, dtype):
    codes = packing.unpack(rec['codes'], self.bits)
    scale = from_storage(rec['scale'], F16)[..., None, None]
    zp = from_storage(rec['zp'], F16)[..., None, None]
    return quant.cast(quant.asym_dequant(codes, scale, zp, _DEQUANT[self.dequant_dtype]), dtype)


@dataclasses.dataclass(frozen=True)
class Rotated(Codec):
  """QuaRot: the normalized Hadamard transform over head_dim (per head), then ``inner``.

  The rotation is computed stage by stage in the input dtype, as the study's BF16 FWHT. Decoding
  stays in the rotated basis (``rotated = True``).
  """
  inner: Codec = SymRTN()
  rotated = True

  def fields(self, b, f, p, n, h):
    if h & (h - 1):
      raise ValueError(f'QuaRot needs a power-of-two head_dim (got {h})')
    return self.inner.fields(b, f, p, n, h)

  def encode(self, x, aux=None):
    return self.inner.encode(quant.fwht(x), aux)

  def decode(self, rec, dtype):
    return self.inner.decode(rec, dtype)


@dataclasses.dataclass(frozen=True)
class PRQ(Codec):
  """Progressive residual quantization: symmetric RTN at ``bits``, then RTN of the float32
  residual at ``residual_bits``, each with its own fp16 scales; read back as the float32 sum."""
  bits: int = 4
  residual_bits: int = 4
  group: int = 16

  def __post_init__(self):
    packing.check_bits(self.bits)
    packing.check_bits(self.residual_bits, 'residual_bits')
    _check_group(self.group)

  @property
  def _stages(self):
    return (SymRTN(self.bits, self.group, 'float32'), SymRTN(self.residual_bits, self.group, 'float32'))

  def fields(self, b, f, p, n, h):
    s1, s2 = self._stages
    out = {f'base_{k}': v for k, v in s1.fields(b, f, p, n, h).items()}
    out.update({f'res_{k}': v for k, v in s2.fields(b, f, p, n, h).items()})
    return out

  def encode(self, x, aux=None):
    s1, s2 = self._stages
    r1 = s1.encode(x)
    resid = x.astype(f32) - s1.decode(r1, f32)
    r2 = s2.encode(resid)
    return {**{f'base_{k}': v for k, v in r1.items()}, **{f'res_{k}': v for k, v in r2.items()}}

  def decode(self, rec, dtype):
    s1, s2 = self._stages
    base = {k[5:]: v for k, v in rec.items() if k.startswith('base_')}
    res = {k[4:]: v for k, v in rec.items() if k.startswith('res_')}
    return quant.cast(s1.decode(base, f32) + s2.decode(res, f32), dtype)


@dataclasses.dataclass(frozen=True)
class Outliers(Codec):
  """Elements with |x| > threshold * sigma kept exactly (int32 flat index + fp16 value).

  ``sigma`` comes from the method through ``aux['sigma']`` (a float32 scalar). At most
  ``capacity`` outliers a frame are kept (the largest |x|); the rest stay in the inner codec and
  are counted in ``dropped``. ``clip`` (QAQ) clamps x to the bound before the inner codec; TPTQ
  does not clip (its outliers still inflate their groups' scales, as in the study).
  """
  inner: Codec = AsymGroup()
  threshold: float = 6.0
  capacity_ratio: float = 0.002
  clip: bool = True

  def __post_init__(self):
    if not 0.0 <= self.capacity_ratio <= 1.0:
      raise ValueError(f'outlier capacity_ratio must be in [0, 1] (got {self.capacity_ratio})')
    if self.threshold <= 0:
      raise ValueError(f'outlier threshold must be > 0 (got {self.threshold})')

  @property
  def rotated(self):
    return self.inner.rotated

  def capacity(self, p, n, h) -> int:
    return max(1, int(np.ceil(self.capacity_ratio * p * n * h)))

  def fields(self, b, f, p, n, h):
    cap = self.capacity(p, n, h)
    return {**self.inner.fields(b, f, p, n, h),
            'out_idx': _sds((b, f, cap), jnp.int32),
            'out_val': _sds((b, f, cap), storage_dtype(F16)),
            'dropped': _sds((b, f), jnp.int32)}

  def encode(self, x, aux=None):
    if aux is None or 'sigma' not in aux:
      raise ValueError('Outliers codec needs aux["sigma"] from its method')
    b, nf, p, n, h = x.shape
    cap = self.capacity(p, n, h)
    bound = self.threshold * aux['sigma'].astype(f32)
    flat = x.reshape(b, nf, -1)
    mag = jnp.abs(flat.astype(f32))
    is_out = mag > bound
    score = jnp.where(is_out, mag, -1.0)
    top, idx = jax.lax.top_k(score, cap)
    keep = top > 0
    vals = jnp.take_along_axis(flat, idx, axis=-1)
    out_idx = jnp.where(keep, idx, p * n * h).astype(jnp.int32)
    dropped = jnp.maximum(jnp.sum(is_out, axis=-1) - cap, 0).astype(jnp.int32)
    base = jnp.clip(x, -bound.astype(x.dtype), bound.astype(x.dtype)) if self.clip else x
    return {**self.inner.encode(base, aux), 'out_idx': out_idx,
            'out_val': to_storage(vals, F16), 'dropped': dropped}

  def decode(self, rec, dtype):
    inner = {k: v for k, v in rec.items() if k not in ('out_idx', 'out_val', 'dropped')}
    y = self.inner.decode(inner, f32)
    b, nf, p, n, h = y.shape
    vals = from_storage(rec['out_val'], F16).astype(f32)
    if self.inner.rotated:
      raise NotImplementedError('outliers of a rotated codec are not supported')
    flat = y.reshape(b * nf, -1)
    idx = rec['out_idx'].reshape(b * nf, -1)
    rows = jnp.arange(b * nf)[:, None]
    flat = flat.at[rows, idx].set(vals.reshape(b * nf, -1), mode='drop')
    return quant.cast(flat.reshape(b, nf, p, n, h), dtype)


@dataclasses.dataclass(frozen=True)
class Spatial(Codec):
  """Spatial mixed precision: each frame's ``n_fg`` foreground tokens with ``fg``, the rest
  with ``bg``, each re-grouped on its gathered sub-tensor (as the study).

  The method passes the token order through ``aux['order']`` ([B, P] int32, foreground positions
  first). Attention is order-free, so records keep that order and decode concatenates
  foreground then background tokens (in the rotated basis when either part is QuaRot).
  """
  fg: Codec = SymRTN(4)
  bg: Codec = SymRTN(2)
  n_fg: int = 1

  def fields(self, b, f, p, n, h):
    if not 0 < self.n_fg < p:
      raise ValueError(f'spatial n_fg={self.n_fg} must be in (0, {p})')
    return {**{f'fg_{k}': v for k, v in self.fg.fields(b, f, self.n_fg, n, h).items()},
            **{f'bg_{k}': v for k, v in self.bg.fields(b, f, p - self.n_fg, n, h).items()}}

  def encode(self, x, aux=None):
    if aux is None or 'order' not in aux:
      raise ValueError('Spatial codec needs aux["order"] from its method')
    order = aux['order']                                             # [B, P]
    xs = jnp.take_along_axis(x, order[:, None, :, None, None], axis=2)
    fg = self.fg.encode(xs[:, :, :self.n_fg], aux)
    bg = self.bg.encode(xs[:, :, self.n_fg:], aux)
    return {**{f'fg_{k}': v for k, v in fg.items()}, **{f'bg_{k}': v for k, v in bg.items()}}

  @property
  def rotated(self):
    """A store with a QuaRot part is read in the Hadamard basis (attention rotates the query)."""
    return self.fg.rotated or self.bg.rotated

  def decode(self, rec, dtype, rotated: bool | None = None):
    """Foreground then background tokens in the codec's basis (``rotated``; or the one asked for).

    A part is transformed only where its codec's basis differs, so reading a QuaRot foreground
    in the rotated basis costs no transform: only the smaller plain background is rotated.
    """
    rotated = self.rotated if rotated is None else rotated
    parts = []
    for name, codec in (('fg', self.fg), ('bg', self.bg)):
      x = codec.decode({k[3:]: v for k, v in rec.items() if k.startswith(name + '_')}, f32)
      parts.append(quant.fwht(x, f32) if codec.rotated != rotated else x)
    return quant.cast(jnp.concatenate(parts, axis=2), dtype)
