"""Storage formats of cached K/V: what the arrays of a record are and how they read back.

A *format* is a static, hashable description (bits, group layout, symmetric or asymmetric,
rotated, ...). A *record* is the dict of arrays that holds F frames of P tokens in that format,
leading axes [B, F]. ``fields`` gives the record's shapes and dtypes, ``decode`` is the pure-jnp
reading (the reference every attention kernel is tested against). The cache methods' codecs
(``kvjax/cache/codecs.py``) subclass these formats and add ``encode``; the kernels read records
knowing only the format, never a cache method.

Layouts (x: [B, F, P, N, H], G = group size):
  Dense        x            [B, F, P, N, H]      raw bits of ``dtype`` (16-bit floats as uint16)
  SymGroup     codes        [B, F, P, N, H*b/8]  uint8, offset-binary, packed (``packing.py``)
               scale        [B, F, nG, N, H]     fp16 bits; one scale per (token group, head, channel)
  AsymGroup    codes, scale as SymGroup, plus zp [B, F, nG, N, H] fp16 bits (KIVI keys)
  AsymToken    codes; scale, zp [B, F, P] fp16 bits: one pair per token over N x H (KIVI values)
  Residual     base_* and res_* SymGroup records; value = base + residual (PRQ)
  WithOutliers inner record + out_idx [B, F, cap] int32 flat index into P*N*H (an index outside
               [0, P*N*H) is an unused slot; the codec writes P*N*H),
               out_val [B, F, cap] fp16 bits, dropped [B, F] int32 (QAQ, TPTQ keys)
  Rotated      inner record of the Hadamard-rotated tensor; decodes *in the rotated basis*
  Derotated    a SymGroup record of the rotated tensor; decodes back to the original basis
  Split        fg_* record of the first ``n_fg`` tokens, bg_* of the rest (spatial methods)

Token groups: a frame's P tokens form groups of G consecutive tokens and the last group absorbs
the remainder (1,560 = 96 x 16 + 24), so token t belongs to group min(t // G, nG - 1).
Dequantization arithmetic follows ``dequant_dtype`` (float32 as the study's Gen A/C, or
bfloat16 rounding as its Gen B); results are returned float32 and cast once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.kernels import packing
from kvjax.numerics import cast, fwht, from_storage, round_bf16, storage_dtype

f32 = jnp.float32
F16 = jnp.dtype(jnp.float16)
DEQUANT_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


# ---------------------------------------------------------------- token groups and dequant math
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


def expand_groups(s: jax.Array, p: int, g: int) -> jax.Array:
  """Per-group statistics [B, F, n_groups, ...] -> per-token [B, F, P, ...] (broadcasts)."""
  n = num_groups(p, g)
  if n == 1:
    return jnp.broadcast_to(s, s.shape[:2] + (p,) + s.shape[3:])
  lead, rest = s.shape[:2], s.shape[3:]
  head = jnp.broadcast_to(s[:, :, :n - 1, None], lead + (n - 1, g) + rest).reshape(
      lead + ((n - 1) * g,) + rest)
  tail = jnp.broadcast_to(s[:, :, n - 1:], lead + (p - (n - 1) * g,) + rest)
  return jnp.concatenate([head, tail], axis=2)


def dequant_math(y: jax.Array, dtype) -> jax.Array:
  """Rounds a float32 value to what arithmetic in ``dtype`` (float32 or bfloat16) would give."""
  return round_bf16(y) if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) else y.astype(f32)


def sym_qmax(bits: int) -> int:
  return 2 ** (bits - 1) - 1


def sym_dequant(codes: jax.Array, scale_tok: jax.Array, bits: int, dtype) -> jax.Array:
  """q * scale computed in ``dtype`` (values exactly as that arithmetic), returned float32."""
  q = codes.astype(f32) - float(2 ** (bits - 1))
  return dequant_math(q * dequant_math(scale_tok.astype(f32), dtype), dtype)


def asym_dequant(codes, scale_tok, zp_tok, dtype):
  """(q - zp) * scale computed in ``dtype``, returned float32."""
  d = dequant_math(codes.astype(f32) - dequant_math(zp_tok.astype(f32), dtype), dtype)
  return dequant_math(d * dequant_math(scale_tok.astype(f32), dtype), dtype)


# ---------------------------------------------------------------- validation
def sds(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def fields_bytes(fields: dict[str, jax.ShapeDtypeStruct]) -> int:
  return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in fields.values())


def check_group(group: int):
  if not isinstance(group, (int, np.integer)) or group < 1:
    raise ValueError(f'unsupported group size {group!r}; valid: an integer >= 1 (the study uses 16)')


def check_dequant(d: str):
  if d not in DEQUANT_DTYPES:
    raise ValueError(f'unsupported dequant_dtype {d!r}; valid: {sorted(DEQUANT_DTYPES)}')


def check_grouped(fmt) -> None:
  """Validates the bits, group and dequant_dtype fields of a grouped quantizer format."""
  packing.check_bits(fmt.bits)
  check_group(fmt.group)
  check_dequant(fmt.dequant_dtype)


def _sub(rec: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in rec.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- formats
@dataclasses.dataclass(frozen=True)
class Format:
  """Base format (module docstring). ``rotated``: decodes into the Hadamard basis."""
  rotated = False

  def fields(self, b: int, f: int, p: int, n: int, h: int) -> dict[str, jax.ShapeDtypeStruct]:
    raise NotImplementedError

  def decode(self, rec: dict[str, jax.Array], dtype) -> jax.Array:
    """record -> [B, F, P, N, H] in ``dtype``."""
    raise NotImplementedError

  def record_bytes(self, p: int, n: int, h: int) -> int:
    """Bytes of one frame (batch 1) in this format."""
    return fields_bytes(self.fields(1, 1, p, n, h))


@dataclasses.dataclass(frozen=True)
class Dense(Format):
  """Unquantized values in ``dtype`` (16-bit floats held as raw uint16 bits)."""
  dtype: Any = jnp.bfloat16

  def fields(self, b, f, p, n, h):
    return {'x': sds((b, f, p, n, h), storage_dtype(self.dtype))}

  def decode(self, rec, dtype):
    return from_storage(rec['x'], self.dtype).astype(dtype)


@dataclasses.dataclass(frozen=True)
class SymGroup(Format):
  """Symmetric codes, one fp16 scale per (token group, head, channel); value = (c - 2^(b-1)) * s."""
  bits: int = 4
  group: int = 16
  dequant_dtype: str = 'float32'

  def __post_init__(self):
    check_grouped(self)

  def fields(self, b, f, p, n, h):
    return {'codes': sds((b, f, p, n, packing.packed_width(h, self.bits)), jnp.uint8),
            'scale': sds((b, f, num_groups(p, self.group), n, h), storage_dtype(F16))}

  def decode(self, rec, dtype):
    codes = packing.unpack(rec['codes'], self.bits)
    tok = expand_groups(from_storage(rec['scale'], F16), codes.shape[2], self.group)
    return cast(sym_dequant(codes, tok, self.bits, DEQUANT_DTYPES[self.dequant_dtype]), dtype)


@dataclasses.dataclass(frozen=True)
class AsymGroup(Format):
  """Asymmetric codes with fp16 scale and zero-point per (token group, head, channel):
  value = (c - zp) * s. ``clamp_zero_point`` is how records were encoded (decode ignores it)."""
  bits: int = 4
  group: int = 16
  clamp_zero_point: bool = True
  dequant_dtype: str = 'float32'

  def __post_init__(self):
    check_grouped(self)

  def fields(self, b, f, p, n, h):
    g = num_groups(p, self.group)
    return {'codes': sds((b, f, p, n, packing.packed_width(h, self.bits)), jnp.uint8),
            'scale': sds((b, f, g, n, h), storage_dtype(F16)),
            'zp': sds((b, f, g, n, h), storage_dtype(F16))}

  def decode(self, rec, dtype):
    codes = packing.unpack(rec['codes'], self.bits)
    p = codes.shape[2]
    scale = expand_groups(from_storage(rec['scale'], F16), p, self.group)
    zp = expand_groups(from_storage(rec['zp'], F16), p, self.group)
    return cast(asym_dequant(codes, scale, zp, DEQUANT_DTYPES[self.dequant_dtype]), dtype)


@dataclasses.dataclass(frozen=True)
class AsymToken(Format):
  """Asymmetric codes with one fp16 scale and zero-point per token (over all N x H values)."""
  bits: int = 4
  clamp_zero_point: bool = True
  dequant_dtype: str = 'float32'

  def __post_init__(self):
    packing.check_bits(self.bits)
    check_dequant(self.dequant_dtype)

  def fields(self, b, f, p, n, h):
    return {'codes': sds((b, f, p, n, packing.packed_width(h, self.bits)), jnp.uint8),
            'scale': sds((b, f, p), storage_dtype(F16)),
            'zp': sds((b, f, p), storage_dtype(F16))}

  def decode(self, rec, dtype):
    codes = packing.unpack(rec['codes'], self.bits)
    scale = from_storage(rec['scale'], F16)[..., None, None]
    zp = from_storage(rec['zp'], F16)[..., None, None]
    return cast(asym_dequant(codes, scale, zp, DEQUANT_DTYPES[self.dequant_dtype]), dtype)


@dataclasses.dataclass(frozen=True)
class Residual(Format):
  """PRQ: a SymGroup record at ``bits`` plus one of the residual at ``residual_bits``, each with
  its own fp16 scales (float32 dequant); reads back as the float32 sum."""
  bits: int = 4
  residual_bits: int = 4
  group: int = 16

  def __post_init__(self):
    packing.check_bits(self.bits)
    packing.check_bits(self.residual_bits, 'residual_bits')
    check_group(self.group)

  @property
  def stages(self) -> tuple[SymGroup, SymGroup]:
    return SymGroup(self.bits, self.group, 'float32'), SymGroup(self.residual_bits, self.group, 'float32')

  def fields(self, b, f, p, n, h):
    s1, s2 = self.stages
    return {**{f'base_{k}': v for k, v in s1.fields(b, f, p, n, h).items()},
            **{f'res_{k}': v for k, v in s2.fields(b, f, p, n, h).items()}}

  def decode(self, rec, dtype):
    s1, s2 = self.stages
    return cast(s1.decode(_sub(rec, 'base_'), f32) + s2.decode(_sub(rec, 'res_'), f32), dtype)


@dataclasses.dataclass(frozen=True)
class WithOutliers(Format):
  """``inner`` plus up to ``capacity(p, n, h)`` elements a frame stored exactly (they replace
  the inner codec's value). ``threshold`` and ``clip`` are how records were encoded."""
  inner: Format = AsymGroup()
  threshold: float = 6.0
  capacity_ratio: float = 0.002
  clip: bool = True

  def __post_init__(self):
    if not 0.0 <= self.capacity_ratio <= 1.0:
      raise ValueError(f'outlier capacity_ratio must be in [0, 1] (got {self.capacity_ratio})')
    if self.threshold <= 0:
      raise ValueError(f'outlier threshold must be > 0 (got {self.threshold})')
    if self.inner.rotated:
      raise ValueError('outliers of a rotated format are not supported')

  def capacity(self, p, n, h) -> int:
    return max(1, int(np.ceil(self.capacity_ratio * p * n * h)))

  def fields(self, b, f, p, n, h):
    cap = self.capacity(p, n, h)
    return {**self.inner.fields(b, f, p, n, h),
            'out_idx': sds((b, f, cap), jnp.int32),
            'out_val': sds((b, f, cap), storage_dtype(F16)),
            'dropped': sds((b, f), jnp.int32)}

  def decode(self, rec, dtype):
    inner = {k: v for k, v in rec.items() if k not in ('out_idx', 'out_val', 'dropped')}
    y = self.inner.decode(inner, f32)
    b, nf, p, n, h = y.shape
    vals = from_storage(rec['out_val'], F16).astype(f32)
    flat = y.reshape(b * nf, -1)
    idx = rec['out_idx'].reshape(b * nf, -1)
    rows = jnp.arange(b * nf)[:, None]
    flat = flat.at[rows, idx].set(vals.reshape(b * nf, -1), mode='drop')
    return cast(flat.reshape(b, nf, p, n, h), dtype)


@dataclasses.dataclass(frozen=True)
class Rotated(Format):
  """``inner`` applied to the normalized Hadamard transform of x over head_dim (QuaRot);
  decodes in the rotated basis (attention rotates the query instead)."""
  inner: Format = SymGroup()
  rotated = True

  def fields(self, b, f, p, n, h):
    if h & (h - 1):
      raise ValueError(f'QuaRot needs a power-of-two head_dim (got {h})')
    return self.inner.fields(b, f, p, n, h)

  def decode(self, rec, dtype):
    return self.inner.decode(rec, dtype)


@dataclasses.dataclass(frozen=True)
class Derotated(Format):
  """A SymGroup record of the Hadamard-rotated tensor (QuaRot) read back in the original basis,
  chunk by chunk: the codes times scales in ``dequant_dtype``, then the inverse transform
  computed in that dtype, as the study's ``dequantize_kv`` (float32 in its Gen A/C, BF16 stage
  by stage in Gen B); rounded to the reader's dtype only after that, as its BF16 cache. Readers
  need no query rotation. (The fused kernel does not read it: the XLA walk does.)"""
  inner: SymGroup = SymGroup()

  def fields(self, b, f, p, n, h):
    if h & (h - 1):
      raise ValueError(f'QuaRot needs a power-of-two head_dim (got {h})')
    return self.inner.fields(b, f, p, n, h)

  def decode(self, rec, dtype):
    dt = DEQUANT_DTYPES[self.inner.dequant_dtype]
    return cast(fwht(self.inner.decode(rec, dt), dt).astype(f32), dtype)


@dataclasses.dataclass(frozen=True)
class Split(Format):
  """A frame's first ``n_fg`` tokens (in record order) in ``fg``, the rest in ``bg``."""
  fg: Format = SymGroup(4)
  bg: Format = SymGroup(2)
  n_fg: int = 1

  def fields(self, b, f, p, n, h):
    if not 0 < self.n_fg < p:
      raise ValueError(f'spatial n_fg={self.n_fg} must be in (0, {p})')
    return {**{f'fg_{k}': v for k, v in self.fg.fields(b, f, self.n_fg, n, h).items()},
            **{f'bg_{k}': v for k, v in self.bg.fields(b, f, p - self.n_fg, n, h).items()}}

  @property
  def rotated(self):
    """A record with a QuaRot part is read in the Hadamard basis (attention rotates the query)."""
    return self.fg.rotated or self.bg.rotated

  def parts(self, rec: dict) -> list[tuple[Format, dict]]:
    """[(format, record)] of the foreground and background sub-records."""
    return [(self.fg, _sub(rec, 'fg_')), (self.bg, _sub(rec, 'bg_'))]

  def decode(self, rec, dtype, rotated: bool | None = None):
    """Foreground then background tokens in the format's basis (``rotated``; or the one asked for).

    Used to re-encode records (``refresh``) and by tests; attention reads the two parts as two
    sources, each in its own basis, and never transforms a part.
    """
    rotated = self.rotated if rotated is None else rotated
    xs = []
    for fmt, sub in self.parts(rec):
      x = fmt.decode(sub, f32)
      xs.append(fwht(x, f32) if fmt.rotated != rotated else x)
    return cast(jnp.concatenate(xs, axis=2), dtype)


# ---------------------------------------------------------------- QVG (Quant VideoGen)
E4M3_MAX = 448.0
QVG_BITS = (2, 4)
QVG_SCALE_DTYPES = ('float8_e4m3fn', 'float16')


def e4m3_decode(bits: jax.Array) -> jax.Array:
  """float8_e4m3fn raw bits (uint8) -> float32 with integer ops only (the kernel calls it too).

  sign | 4-bit exponent e (bias 7) | 3-bit mantissa m: (8 + m) * 2^(e - 10), or m * 2^-9 when
  e = 0 (subnormal); the power of two is built from its float32 exponent bits, so every value is
  exact. The NaN codes (0x7F, 0xFF) are never written (scales are finite, clipped to 448).
  """
  b = bits.astype(jnp.int32)
  e = jax.lax.shift_right_logical(b, jnp.full(b.shape, 3, jnp.int32)) & 15
  m = (b & 7).astype(f32)
  two = jax.lax.bitcast_convert_type(
      jax.lax.shift_left(jnp.maximum(e, 1) + 117, jnp.full(b.shape, 23, jnp.int32)), f32)
  mag = jnp.where(e == 0, m, m + 8.0) * two
  return jnp.where(b >= 128, -mag, mag)


@dataclasses.dataclass(frozen=True)
class QVG(Format):
  """QVG: per-span k-means centroid tables plus a symmetric per-channel-group residual code.

  Value of token n, head h, channel c (S stages, q_max = 2^(b-1) - 1):
    x = sum_s C_s[h, ids_s[n, h], c] + scale[n, h, c // group] * (u[n, h, c] - q_max)
  summed in float32 and written in the centroids' dtype (bf16 on the fast path), as QVG decodes.

  Per-frame record (the chunk):                         Shared per span (``shared_fields``):
    ids    [B, F, P, N, S]         uint8 cluster ids      centroids [B, 1, S, N, K, H] raw bits of
    codes  [B, F, P, N, H*b/8]     uint8 packed u         ``centroid_dtype`` (bf16 as uint16)
    scale  [B, F, P, N, H/group]   uint8 E4M3 bits (or fp16 bits with scale_dtype='float16')
  """
  bits: int = 2
  centroids: int = 256
  stages: int = 1
  group: int = 64
  scale_dtype: str = 'float8_e4m3fn'
  centroid_dtype: Any = jnp.bfloat16

  def __post_init__(self):
    object.__setattr__(self, 'centroid_dtype', jnp.dtype(self.centroid_dtype))
    if self.bits not in QVG_BITS:
      raise ValueError(f'unsupported QVG bits={self.bits}; valid: {list(QVG_BITS)}')
    if not isinstance(self.centroids, (int, np.integer)) or not 1 <= self.centroids <= 256:
      raise ValueError(f'QVG centroids={self.centroids!r} must be in [1, 256] '
                       '(cluster ids are uint8)')
    if not isinstance(self.stages, (int, np.integer)) or self.stages < 1:
      raise ValueError(f'QVG stages={self.stages!r} must be an integer >= 1')
    check_group(self.group)
    if self.scale_dtype not in QVG_SCALE_DTYPES:
      raise ValueError(f'unsupported QVG scale_dtype {self.scale_dtype!r}; valid: '
                       f'{list(QVG_SCALE_DTYPES)}')

  @property
  def qmax(self) -> int:
    return sym_qmax(self.bits)

  def _groups(self, h: int) -> int:
    if h % self.group:
      raise ValueError(f'QVG channel group {self.group} does not divide head_dim {h}')
    return h // self.group

  def fields(self, b, f, p, n, h):
    sdt = jnp.uint8 if self.scale_dtype == 'float8_e4m3fn' else storage_dtype(F16)
    return {'ids': sds((b, f, p, n, self.stages), jnp.uint8),
            'codes': sds((b, f, p, n, packing.packed_width(h, self.bits)), jnp.uint8),
            'scale': sds((b, f, p, n, self._groups(h)), sdt)}

  def shared_fields(self, b: int, n: int, h: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The per-span record (leading [B, 1]): the S centroid tables of every head."""
    return {'centroids': sds((b, 1, self.stages, n, self.centroids, h),
                             storage_dtype(self.centroid_dtype))}

  def shared_bytes(self, n: int, h: int) -> int:
    """Bytes of one span's shared record (batch 1)."""
    return fields_bytes(self.shared_fields(1, n, h))

  def decode_scale(self, scale: jax.Array) -> jax.Array:
    if self.scale_dtype == 'float8_e4m3fn':
      return e4m3_decode(scale)
    return from_storage(scale, F16).astype(f32)

  def centroid_sum(self, rec) -> jax.Array:
    """sum_s C_s[h, ids_s] -> [B, F, P, N, H] float32 (the smoothing part of the decode)."""
    ids = rec['ids']
    cents = from_storage(rec['centroids'], self.centroid_dtype).astype(f32)   # [B,1,S,N,K,H]
    b, _, _, n = ids.shape[:4]
    bi = jnp.arange(b)[:, None, None, None]
    ni = jnp.arange(n)[None, None, None, :]
    total = 0.0
    for s in range(self.stages):
      total = total + cents[:, 0, s][bi, ni, ids[..., s].astype(jnp.int32)]
    return total

  def residual(self, rec) -> jax.Array:
    """scale * (u - q_max) -> [B, F, P, N, H] float32."""
    u = packing.unpack(rec['codes'], self.bits).astype(f32)
    scale = self.decode_scale(rec['scale'])
    return (u - float(self.qmax)) * jnp.repeat(scale, self.group, axis=-1)

  def decode(self, rec, dtype):
    x = self.centroid_sum(rec) + self.residual(rec)
    return cast(cast(x, self.centroid_dtype).astype(f32), dtype)
