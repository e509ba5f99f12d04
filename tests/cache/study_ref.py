"""Test reference: a PyTorch emulation of the study's quantizer classes, one call each.

Written from the spec of the study (sections 2-3) and from reading its public ``kv_quant``
package (generations: Gen A = the 2026-03-05 code, int16 codes, float32 dequantization; Gen B =
commit 40fe5df, int8 codes, dequantization in the tensor dtype; Gen C = the versions committed in
4e38444, int8 codes, float32 dequantization of every sub-quantizer, PRQ and QAQ). Every function
takes a cache tensor ``x`` [B, L, H, D] (BF16 as the study's cache) and returns what the class's
``dequantize_kv`` returns for it after one ``quantize_kv`` call, in the dtype that call returns.
The study's hook then writes that into its BF16 cache (``cache_write``).

Arithmetic is torch's own: statistics, divisions and roundings of the encode run in the tensor
dtype (BF16 rounds after every operation), scales and zero-points are stored fp16, codes are
integers. One CUDA detail is emulated explicitly, since the study ran on GPUs and these tests on
CPU: CUDA divides a tensor by a Python scalar as ``a * (1 / b)``, the reciprocal and the product
in float32 (``div_scalar``; torch on CPU divides exactly). For BF16 results the two agree; for
float32 ones (PRQ's residual scale) they differ by an ulp on about half the groups, which moves
exact rounding ties. Nothing here imports kvjax.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8
GROUP = 16
# Dequantization dtype of each code generation (None: the tensor's dtype, Gen B).
GEN_DEQUANT = {'A': torch.float32, 'B': None, 'C': torch.float32}


def cache_write(x: torch.Tensor) -> torch.Tensor:
  """What the study's hook stores: the dequantized tensor cast to the cache dtype (BF16)."""
  return x.to(torch.bfloat16)


# ---------------------------------------------------------------- blocking along tokens
def to_blocks(x: torch.Tensor, g: int = GROUP):
  """x [B, L, H, D] -> ([B, nb, g, H, D] zero-padded along L, pad length)."""
  b, l, h, d = x.shape
  pad = (g - l % g) % g
  if pad:
    x = torch.cat([x, x.new_zeros((b, pad, h, d))], dim=1)
  return x.reshape(b, -1, g, h, d), pad


def from_blocks(xb: torch.Tensor, length: int) -> torch.Tensor:
  """[B, nb, g, H, D] -> [B, length, H, D] (padding dropped)."""
  b, nb, g, h, d = xb.shape
  return xb.reshape(b, nb * g, h, d)[:, :length]


# ---------------------------------------------------------------- primitives (spec 2.2-2.4)
def div_scalar(x: torch.Tensor, b: float) -> torch.Tensor:
  """``x / b`` for a Python scalar b as CUDA computes it: x * (1 / b) in float32, rounded to
  x's dtype."""
  inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(b, dtype=torch.float32)
  return (x.to(torch.float32) * inv).to(x.dtype)


def quantize_sym(x: torch.Tensor, bits: int, dims):
  """Symmetric RTN: scale = max(amax / qmax, 1e-8) in x's dtype, codes from that scale,
  scale stored fp16. Returns (codes int16, scale fp16)."""
  qmax = (1 << (bits - 1)) - 1
  amax = x.abs().amax(dim=dims, keepdim=True)
  scale = div_scalar(amax, max(qmax, 1)).clamp_min(EPS)
  q = torch.round(x / scale).clamp(-qmax - 1, qmax).to(torch.int16)
  return q, scale.to(torch.float16)


def dequantize_sym(q, scale, dtype) -> torch.Tensor:
  return q.to(dtype) * scale.to(dtype)


def quantize_asym(x: torch.Tensor, bits: int, dims, clamp_zero_point: bool = True):
  """Asymmetric min/max: scale = max((max - min) / qmax, 1e-8), zp = round(-min / scale)
  clamped to [0, qmax] (the study's defect), all in x's dtype; scale and zp stored fp16."""
  qmax = (1 << bits) - 1
  lo = x.amin(dim=dims, keepdim=True)
  hi = x.amax(dim=dims, keepdim=True)
  scale = div_scalar(hi - lo, qmax).clamp_min(EPS)
  zp = torch.round(0 - lo / scale)
  if clamp_zero_point:
    zp = zp.clamp(0, qmax)
  q = torch.round(x / scale + zp).clamp(0, qmax).to(torch.int16)
  return q, scale.to(torch.float16), zp.to(torch.float16)


def dequantize_asym(q, scale, zp, dtype) -> torch.Tensor:
  return (q.to(dtype) - zp.to(dtype)) * scale.to(dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
  """Normalized Walsh-Hadamard over the last axis in x's dtype (each butterfly stage rounds)."""
  n = x.shape[-1]
  y, h = x, 1
  while h < n:
    y = y.reshape(*x.shape[:-1], n // (2 * h), 2 * h)
    a, b = y[..., :h], y[..., h:]
    y = torch.cat([a + b, a - b], dim=-1).reshape(x.shape)
    h *= 2
  return div_scalar(y, math.sqrt(n))


def _dtype(dequant, x):
  return x.dtype if dequant is None else dequant


# ---------------------------------------------------------------- the classes
def rtn(x, bits: int, dequant=torch.float32, g: int = GROUP) -> torch.Tensor:
  """RTNQuantizer (spec 3.2): per (16-token group, head, channel)."""
  xb, _ = to_blocks(x, g)
  q, s = quantize_sym(xb, bits, (2,))
  return from_blocks(dequantize_sym(q, s, _dtype(dequant, x)), x.shape[1])


def kivi_keys(x, bits: int, dequant=torch.float32, g: int = GROUP, clamp_zero_point=True):
  """KIVIQuantizer keys (spec 3.3): asymmetric per (16-token group, head, channel)."""
  xb, _ = to_blocks(x, g)
  q, s, z = quantize_asym(xb, bits, (2,), clamp_zero_point)
  return from_blocks(dequantize_asym(q, s, z, _dtype(dequant, x)), x.shape[1])


def kivi_values(x, bits: int, dequant=torch.float32, g: int = GROUP, clamp_zero_point=True):
  """KIVIQuantizer values (spec 3.3): asymmetric per token over all heads x channels."""
  xb, _ = to_blocks(x, g)
  q, s, z = quantize_asym(xb, bits, (3, 4), clamp_zero_point)
  return from_blocks(dequantize_asym(q, s, z, _dtype(dequant, x)), x.shape[1])


def quarot(x, bits: int, dequant=torch.float32, g: int = GROUP) -> torch.Tensor:
  """QuaRotKVQuantizer (spec 3.4): FWHT in x's dtype, RTN, dequantize in ``dequant``, FWHT
  again in that dtype (float32 in Gen A, BF16 in Gen B)."""
  return fwht(rtn(fwht(x), bits, dequant, g))


def prq(x, bits: int, residual_bits: int, g: int = GROUP, chunk_groups: int = 64) -> torch.Tensor:
  """PRQQuantizer (spec 3.5): stage 1 RTN in x's dtype, float32 reconstruction, float32 residual
  (x - x1 promotes to float32), stage 2 RTN of it in float32; chunks of 64 groups; float32 sum."""
  xb, _ = to_blocks(x, g)
  out = torch.empty(xb.shape, dtype=torch.float32)
  for start in range(0, xb.shape[1], chunk_groups):
    xc = xb[:, start:start + chunk_groups]
    q1, s1 = quantize_sym(xc, bits, (2,))
    resid = xc - dequantize_sym(q1, s1, torch.float32)
    q2, s2 = quantize_sym(resid, residual_bits, (2,))
    out[:, start:start + chunk_groups] = (dequantize_sym(q1, s1, torch.float32)
                                          + dequantize_sym(q2, s2, torch.float32))
  return from_blocks(out, x.shape[1])


def qaq(x, bits: int, tensor: str, threshold: float = 6.0, g: int = GROUP):
  """QAQQuantizer (spec 3.6), keys (``tensor='k'``) or values ('v').

  sigma = population std of the whole blocked tensor (padding included) in x's dtype; elements
  with |x| > threshold * sigma (in x's dtype) kept as fp16 values; the tensor clamped to the
  bound and quantized asymmetrically (keys per channel-group, values per token); float32
  dequantization, outliers written back. Returns (reconstruction float32, number of outliers).
  """
  xb, _ = to_blocks(x, g)
  std = xb.std(unbiased=False).clamp_min(EPS)
  bound = threshold * std
  mask = xb.abs() > bound
  clipped = xb.clamp(min=-bound, max=bound) if mask.any() else xb
  q, s, z = quantize_asym(clipped, bits, (2,) if tensor == 'k' else (3, 4))
  y = dequantize_asym(q, s, z, torch.float32)
  idx = mask.reshape(-1).nonzero().squeeze(-1)
  flat = y.reshape(-1)
  flat[idx] = xb.reshape(-1)[idx].to(torch.float16).to(torch.float32)
  return from_blocks(flat.reshape(xb.shape), x.shape[1]), int(idx.numel())


def tptq_old_keys(k, bits: int = 2, residual_bits: int = 2, threshold: float = 6.0,
                  max_ratio: float = 0.001):
  """TPTQQuantizer's old keys (spec 3.7): PRQ of the unclipped keys, then the largest
  floor(max_ratio * numel) elements above threshold * sigma (population std in k's dtype over
  the whole old part) written back exactly (fp16). Returns (float32 reconstruction, kept count)."""
  y = prq(k, bits, residual_bits)
  cap = int(max_ratio * k.numel())
  std = k.std(unbiased=False).clamp_min(EPS)
  mask = k.abs() > threshold * std
  idx = mask.reshape(-1).nonzero().squeeze(-1)
  if cap == 0:
    idx = idx[:0]
  elif idx.numel() > cap:
    idx = idx[torch.topk(k.reshape(-1).abs()[idx], cap).indices]
  flat = y.reshape(-1)
  flat[idx] = k.reshape(-1)[idx].to(torch.float16).to(torch.float32)
  return flat.reshape(y.shape), int(idx.numel())


def positional_split(length: int, recent_ratio: float):
  """(old token indices, recent token indices): the last max(1, round(r * L)) buffer slots are
  recent (TPTQ, Age-Tier)."""
  recent = max(1, int(round(recent_ratio * length)))
  idx = torch.arange(length)
  return idx[:length - recent], idx[length - recent:]


def gathered(x, idx, fn):
  """Applies a sub-quantizer to the tokens ``idx`` (re-blocked on the gathered sub-tensor, as the
  study's index_select) and scatters the float32 result back into a zero tensor."""
  out = torch.zeros(x.shape, dtype=torch.float32)
  out[:, idx] = fn(x[:, idx]).to(torch.float32)
  return out
