"""QuaRot-KV (spec 3.4): a normalized 128-point Hadamard transform per head over head_dim, then
symmetric RTN of the rotated K and V.

kvjax keeps the cache rotated: attention rotates the query (q . k = Hq . Hk) and accumulates the
values in the rotated basis, rotating the output back once per call, instead of the study's two
full-buffer inverse transforms per call (weakness W16).
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

  def __post_init__(self):
    super().__post_init__()
    packing.check_bits(self.bits)
    C.SymRTN(self.bits, self.group_size, self.dequant_dtype)

  def codecs(self, spec):
    c = C.Rotated(C.SymRTN(self.bits, self.group_size, self.dequant_dtype))
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
        'rotated INT4 written once a block (Gen B)', bits=4, dequant_dtype='bfloat16')
