"""RTN: symmetric round-to-nearest per (16-token group, head, channel), fp16 scales (spec 3.2).

Numerics follow the study's code generations: Gen A names (RTN_INT4, RTN_INT2) dequantize in
float32, Gen B names (RTN_K2_V4, _RECENT2, _REFRESH) in BF16. ``recent_blocks = n`` keeps the
newest n generation blocks (the block being generated included) exact, so n - 1 blocks of
history stay in the compute dtype and older frames are quantized.
Cadence (``requantize``, ``ring.FrameRingMethod``): the Gen A names and the Gen B per-step names
re-encode the history after every DiT call (``'every_call'``), the ``_REFRESH`` names once a
block, at the clean context pass (``'per_block'``), as the study ran them; ``'once'`` is kvjax's
quantize-once cache.
"""

from __future__ import annotations

import dataclasses

from kvjax.cache import codecs as C
from kvjax.kernels import packing
from kvjax.cache.registry import variant
from kvjax.cache.ring import FrameRingMethod


@dataclasses.dataclass(frozen=True)
class RTN(FrameRingMethod):
  family = 'RTN'
  key_bits: int = 4
  value_bits: int = 4
  group_size: int = 16
  dequant_dtype: str = 'float32'
  recent_blocks: int = 0

  def __post_init__(self):
    super().__post_init__()
    packing.check_bits(self.key_bits, 'key_bits')
    packing.check_bits(self.value_bits, 'value_bits')
    C.SymRTN(self.key_bits, self.group_size, self.dequant_dtype)
    if self.recent_blocks < 0:
      raise ValueError(f'recent_blocks must be >= 0 (got {self.recent_blocks})')

  def codecs(self, spec):
    return (C.SymRTN(self.key_bits, self.group_size, self.dequant_dtype),
            C.SymRTN(self.value_bits, self.group_size, self.dequant_dtype))

  def recent_frames(self, spec):
    return max(self.recent_blocks - 1, 0) * spec.block_frames


variant(RTN, 'RTN_INT4', ('rtn_int4', 'rtn4'), 'symmetric INT4, 16-token groups, fp16 scales (Gen A)',
        key_bits=4, value_bits=4)
variant(RTN, 'RTN_INT2', ('rtn_int2', 'rtn2'), 'symmetric INT2 (ternary), 16-token groups (Gen A)',
        key_bits=2, value_bits=2)
variant(RTN, 'RTN_K2_V4', ('rtn_k2_v4', 'rtn_k2v4'), 'keys INT2, values INT4 (Gen B, BF16 dequant)',
        key_bits=2, value_bits=4, dequant_dtype='bfloat16')
variant(RTN, 'RTN_INT4_RECENT2', ('rtn_int4_recent2', 'rtn_recent2'),
        'INT4; the newest 2 blocks (current included) exact in BF16 (Gen B)',
        key_bits=4, value_bits=4, dequant_dtype='bfloat16', recent_blocks=2)
variant(RTN, 'RTN_INT4_REFRESH', ('rtn_int4_refresh', 'rtn_refresh'),
        'INT4 written once a block, at the clean pass (Gen B, BF16 dequant)',
        key_bits=4, value_bits=4, dequant_dtype='bfloat16', requantize='per_block')
