"""KIVI-style asymmetric quantization (spec 3.3): keys per (16-token group, head, channel),
values per token over all heads x channels, fp16 scale and zero-point.

The study clamps the zero-point to [0, qmax], which saturates one-signed groups (section 2.3);
that is the default of the paper names, ``clamp_zero_point=False`` is the corrected quantizer.
"""

from __future__ import annotations

import dataclasses

from kvjax.cache import codecs as C
from kvjax.kernels import packing
from kvjax.cache.registry import variant
from kvjax.cache.ring import FrameRingMethod


@dataclasses.dataclass(frozen=True)
class KIVI(FrameRingMethod):
  family = 'KIVI'
  key_bits: int = 4
  value_bits: int = 4
  group_size: int = 16
  clamp_zero_point: bool = True
  dequant_dtype: str = 'float32'
  FIXES = {'requantize': 'once', 'clamp_zero_point': False}

  def __post_init__(self):
    super().__post_init__()
    packing.check_bits(self.key_bits, 'key_bits')
    packing.check_bits(self.value_bits, 'value_bits')
    C.AsymGroup(self.key_bits, self.group_size, self.clamp_zero_point, self.dequant_dtype)

  def codecs(self, spec):
    return (C.AsymGroup(self.key_bits, self.group_size, self.clamp_zero_point, self.dequant_dtype),
            C.AsymToken(self.value_bits, self.clamp_zero_point, self.dequant_dtype))


variant(KIVI, 'KIVI_INT4', ('kivi_int4', 'kivi4'), 'asymmetric INT4, keys per channel-group, values per token (Gen A)',
        key_bits=4, value_bits=4)
variant(KIVI, 'KIVI_INT2', ('kivi_int2', 'kivi2'), 'asymmetric INT2 (Gen A)', key_bits=2, value_bits=2)
variant(KIVI, 'KIVI_INT4_REFRESH', ('kivi_int4_refresh', 'kivi_refresh'),
        'asymmetric INT4 written once a block (Gen B, BF16 dequant)', dequant_dtype='bfloat16',
        requantize='per_block')
variant(KIVI, 'KIVI_K2_V4', ('kivi_k2_v4', 'kivi_k2v4'), 'keys INT2, values INT4 (Gen B)',
        key_bits=2, value_bits=4, dequant_dtype='bfloat16')
