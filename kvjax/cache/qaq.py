"""QAQ-style outlier-aware asymmetric quantization (spec 3.6).

Elements beyond ``threshold`` (6) global standard deviations are kept exactly (int32 index +
fp16 value), the rest is clamped to the bound and quantized asymmetrically like KIVI (keys per
channel-group, values per token, clamped zero-point). One sigma per tensor (K, V) and layer.

sigma under quantize-once: the study recomputed sigma on every call over its whole 65,520-slot
buffer, zeros of unwritten slots included; at its final state (buffer full) that is the sigma of
everything written. kvjax encodes a frame once, with the sigma of everything written so far
(``sigma_scope='written'``, the causal analogue); ``sigma_scope='buffer'`` divides by the whole
rollout's element count instead (the study's per-call definition: unwritten zeros included).
Outlier storage is static: ``outlier_capacity`` of a frame's elements (0.2% by default, above
the ~0.16% the study's accounting implies); outliers beyond it are clamped and counted in the
records' ``dropped`` field.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.cache import codecs as C
from kvjax.kernels import packing
from kvjax.cache.registry import variant
from kvjax.cache.ring import FrameRingMethod

f32 = jnp.float32


def running_sigma(stats_row, scope_count):
  """Population std from [sum, sum of squares] over ``scope_count`` elements (zeros included)."""
  n = jnp.maximum(scope_count, 1.0)
  mean = stats_row[0] / n
  return jnp.sqrt(jnp.maximum(stats_row[1] / n - mean * mean, 0.0))


@dataclasses.dataclass(frozen=True)
class QAQ(FrameRingMethod):
  family = 'QAQ'
  bits: int = 4
  group_size: int = 16
  threshold: float = 6.0
  clamp_zero_point: bool = True
  sigma_scope: str = 'written'
  outlier_capacity: float = 0.002

  def __post_init__(self):
    super().__post_init__()
    packing.check_bits(self.bits)
    if self.sigma_scope not in ('written', 'buffer'):
      raise ValueError(f"sigma_scope must be 'written' or 'buffer' (got {self.sigma_scope!r})")
    self.codecs(None)

  def codecs(self, spec):
    k = C.Outliers(C.AsymGroup(self.bits, self.group_size, self.clamp_zero_point),
                   self.threshold, self.outlier_capacity, clip=True)
    v = C.Outliers(C.AsymToken(self.bits, self.clamp_zero_point),
                   self.threshold, self.outlier_capacity, clip=True)
    return k, v

  def init_stats(self, spec):
    # [L, tensor (k, v), (sum, sum of squares)] float32
    return {'moments': jnp.zeros((spec.num_layers, 2, 2), f32)}

  def encode_aux(self, state, layer, x_k, x_v, first_frame):
    spec = state.spec
    mom = state.stats['moments']
    per_frame = spec.batch * spec.frame_tokens * spec.num_heads * spec.head_dim
    if first_frame is None:                       # refresh: statistics unchanged
      frames = state.frames[layer].astype(f32)
    else:
      add = jnp.stack([jnp.stack([jnp.sum(x.astype(f32)), jnp.sum(jnp.square(x.astype(f32)))])
                       for x in (x_k, x_v)])
      mom = mom.at[layer].add(add)
      frames = (first_frame + x_k.shape[1]).astype(f32)
    if self.sigma_scope == 'buffer':
      count = spec.require_total_frames('QAQ sigma_scope=buffer') * per_frame
    else:
      count = frames * per_frame
    sig = [running_sigma(mom[layer, i], count) for i in range(2)]
    return {'sigma': sig[0]}, {'sigma': sig[1]}, {'moments': mom}


variant(QAQ, 'QAQ_INT4', ('qaq_int4', 'qaq4'), 'INT4 asymmetric + 6-sigma outliers kept exactly', bits=4)
variant(QAQ, 'QAQ_INT2', ('qaq_int2', 'qaq2'), 'INT2 asymmetric + 6-sigma outliers kept exactly', bits=2)
