"""QuaRot-KV (spec 3.4): a normalized 128-point Hadamard transform per head over head_dim, then
symmetric RTN of the rotated K and V.

Reading. The study's ``dequantize_kv`` multiplies codes by scales (float32 in Gen A, BF16 in
Gen B), applies the inverse transform in that dtype and writes the result into its BF16 cache, so
attention sees BF16 values rounded in the original basis. ``read_basis='original'`` (the
default) does the same chunk by chunk (``formats.Derotated``): the walk inverts the transform of
each decoded frame before rounding it to the compute dtype — never the whole cache, unlike the
study's two full-buffer transforms per call (weakness W16) — and matches the study's attention
to float32 summation order. The fused Pallas kernel does not read that format: on GPU the XLA
walk reads it.
``read_basis='rotated'`` keeps the cache rotated: attention rotates the query (q . k = Hq . Hk)
and accumulates the values in the rotated basis, rotating the output back once per call; the
fused kernel reads it. It rounds the query, keys and values to BF16 in the rotated basis instead
of the keys and values in the original one, which on inputs with attention-sink tokens (large
logits) moves the attention output by 0.63x (INT4), 0.09x (INT2) and 0.75x (the Gen B INT4
rows) of the quantization error (tests/cache/study_numerics_test.py).
"""

from __future__ import annotations

import dataclasses

from kvjax.cache import codecs as C
from kvjax.kernels import packing
from kvjax.cache.registry import variant
from kvjax.cache.ring import FrameRingMethod


@dataclasses.dataclass(frozen=True)
class QuaRot(FrameRingMethod):
  family = 'QUAROT'
  bits: int = 4
  group_size: int = 16
  dequant_dtype: str = 'float32'
  recent_blocks: int = 0
  read_basis: str = 'original'
  FIXES = {'requantize': 'once', 'read_basis': 'rotated'}   # rotated: the fused kernel reads it

  def __post_init__(self):
    super().__post_init__()
    packing.check_bits(self.bits)
    C.SymRTN(self.bits, self.group_size, self.dequant_dtype)
    if self.read_basis not in ('original', 'rotated'):
      raise ValueError(f"read_basis must be 'original' (the study) or 'rotated' "
                       f"(got {self.read_basis!r})")

  def codecs(self, spec):
    inner = C.SymRTN(self.bits, self.group_size, self.dequant_dtype)
    c = C.Derotated(inner) if self.read_basis == 'original' else C.Rotated(inner)
    return c, c

  def recent_frames(self, spec):
    return max(self.recent_blocks - 1, 0) * spec.block_frames


variant(QuaRot, 'QUAROT_KV_INT4', ('quarot_int4', 'quarot4', 'quarot_kv_int4'),
        'Hadamard-rotated symmetric INT4 (Gen A)', bits=4)
variant(QuaRot, 'QUAROT_KV_INT2', ('quarot_int2', 'quarot2', 'quarot_kv_int2'),
        'Hadamard-rotated symmetric INT2 (Gen A)', bits=2)
variant(QuaRot, 'QUAROT_KV_INT4_RECENT2', ('quarot_int4_recent2', 'quarot_recent2'),
        'rotated INT4; newest 2 blocks exact (Gen B)', bits=4, dequant_dtype='bfloat16',
        recent_blocks=2)
variant(QuaRot, 'QUAROT_KV_INT4_REFRESH', ('quarot_int4_refresh', 'quarot_refresh'),
        'rotated INT4 written once a block (Gen B)', bits=4, dequant_dtype='bfloat16',
        requantize='per_block')
