"""PRQ, progressive residual quantization (spec 3.5): symmetric RTN at ``bits``, then RTN of the
float32 residual at ``residual_bits`` (4 in both paper configs), two fp16 scale sets; read back
as the float32 sum. PRQ_INT4 stores 4+4 bits, PRQ_INT2 2+4 bits (really packed here)."""

from __future__ import annotations

import dataclasses

from kvjax.cache import codecs as C
from kvjax.cache.registry import variant
from kvjax.cache.ring import FrameRingMethod


@dataclasses.dataclass(frozen=True)
class PRQMethod(FrameRingMethod):
  family = 'PRQ'
  bits: int = 4
  residual_bits: int = 4
  group_size: int = 16

  def __post_init__(self):
    super().__post_init__()
    C.PRQ(self.bits, self.residual_bits, self.group_size)

  def codecs(self, spec):
    c = C.PRQ(self.bits, self.residual_bits, self.group_size)
    return c, c


variant(PRQMethod, 'PRQ_INT4', ('prq_int4', 'prq4'), 'RTN INT4 + INT4 residual', bits=4, residual_bits=4)
variant(PRQMethod, 'PRQ_INT2', ('prq_int2', 'prq2'), 'RTN INT2 + INT4 residual', bits=2, residual_bits=4)
