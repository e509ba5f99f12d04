"""QAQ-style outlier-aware asymmetric quantization (spec 3.6).

Elements beyond ``threshold`` (6) global standard deviations are kept exactly (int32 index +
fp16 value), the rest is clamped to the bound and quantized asymmetrically like KIVI (keys per
channel-group, values per token, clamped zero-point). One sigma per tensor (K, V) and layer.

sigma. The study recomputed sigma on every call over its whole 65,520-slot buffer: the history's
reconstruction, the block of the call (noisy on denoising calls) and the zeros of unwritten
slots. kvjax's default ``sigma_scope='buffer'`` divides running sums by the whole rollout's
element count, so unwritten frames count as zeros; the sums hold the clean values of every frame
written (frames outside the window included) plus, when the history is re-encoded
(``requantize``), the K/V of the call's block — the study's per-call definition except that a
frame contributes its clean values rather than its current reconstruction.
``sigma_scope='written'`` divides by the frames written so far instead (kvjax's causal reading:
no zeros of the future).
The bound is rounded as the study's: sigma to the tensor dtype (floored at 1e-8), then
threshold * sigma to the tensor dtype again (``codecs.Outliers.bound``).

Outlier storage is static: at most ``capacity`` elements a frame. The study kept every element
above the bound, and no static capacity short of a whole frame can promise that: its sigma is
taken about the mean, so a frame of values all near a constant c != 0 has sigma near 0 and every
element is an outlier; and with sigma over a superset S of the frame (the written frames, the
study's buffer), Markov's inequality on x^2 bounds the frame's outliers only by
|S| (1 + mean^2 / sigma^2) / threshold^2, which grows with S. The default capacity is the one
bound a frame can hold: Chebyshev's, for a frame whose sigma is its own and whose mean is 0, at
most 1 / threshold^2 of its elements lie beyond threshold sigma (1/36 at 6 sigma; the ratio is
widened for the two BF16 roundings of the bound: ``chebyshev_capacity``, 2.82% of a frame, 6 B
each). Outliers beyond the capacity (the largest |x| are kept) are clamped and counted, never
dropped silently: each record's ``dropped`` field, and per layer and tensor the running total
``stats['dropped']`` [L, 2] int32 (counted when a frame is appended) in the final cache state,
which ``artifacts`` writes to ``outlier_overflow.json`` beside result.json.
``outlier_capacity`` > 0 sets another fraction of a frame (e.g. 0.002 for a smaller store).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from kvjax.cache import codecs as C
from kvjax.kernels import packing
from kvjax.cache.registry import variant
from kvjax.cache.ring import FrameRingMethod

f32 = jnp.float32


def chebyshev_capacity(threshold: float) -> float:
  """Fraction of a frame's elements the outlier store holds by default (module docstring):
  1 / t^2 (Chebyshev) at the bound t = threshold lowered by two BF16 roundings (2^-8 each)."""
  return 1.0 / (threshold * (1.0 - 2.0**-8) ** 2) ** 2


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
  sigma_scope: str = 'buffer'
  outlier_capacity: float = 0.0       # fraction of a frame; 0: chebyshev_capacity(threshold)
  FIXES = {'requantize': 'once', 'clamp_zero_point': False, 'sigma_scope': 'written'}

  def __post_init__(self):
    super().__post_init__()
    packing.check_bits(self.bits)
    if self.sigma_scope not in ('written', 'buffer'):
      raise ValueError(f"sigma_scope must be 'written' or 'buffer' (got {self.sigma_scope!r})")
    if self.threshold <= 0:
      raise ValueError(f'threshold must be > 0 (got {self.threshold})')
    self.codecs(None)

  @property
  def capacity_ratio(self) -> float:
    """Outlier slots as a fraction of a frame's elements."""
    return self.outlier_capacity or chebyshev_capacity(self.threshold)

  def codecs(self, spec):
    k = C.Outliers(C.AsymGroup(self.bits, self.group_size, self.clamp_zero_point),
                   self.threshold, self.capacity_ratio, clip=True)
    v = C.Outliers(C.AsymToken(self.bits, self.clamp_zero_point),
                   self.threshold, self.capacity_ratio, clip=True)
    return k, v

  def init_stats(self, spec):
    # moments [L, tensor (k, v), (sum, sum of squares)] float32; dropped [L, tensor] int32:
    # outliers beyond the capacity, summed over the frames appended.
    return {'moments': jnp.zeros((spec.num_layers, 2, 2), f32),
            'dropped': jnp.zeros((spec.num_layers, 2), jnp.int32)}

  def counters(self, state):
    """Outliers clamped for lack of capacity, over every frame appended (keys, values)."""
    dropped = np.asarray(state.stats['dropped'])
    return {'outliers_dropped_k': int(dropped[:, 0].sum()),
            'outliers_dropped_v': int(dropped[:, 1].sum())}

  def artifacts(self, state):
    """``outlier_overflow.json``: outliers clamped for lack of capacity (module docstring): the
    totals counted at append (every frame ever written) and those of the records stored in the
    final state (as last re-encoded)."""
    dropped = np.asarray(state.stats['dropped'])
    k, _ = self.codecs(state.spec)
    spec = state.spec
    return {'outlier_overflow.json': dict(
        dropped_k=int(dropped[:, 0].sum()), dropped_v=int(dropped[:, 1].sum()),
        dropped_per_layer=dropped.tolist(),
        stored_records_dropped_k=int(np.asarray(state.k['dropped']).sum()),
        stored_records_dropped_v=int(np.asarray(state.v['dropped']).sum()),
        capacity_per_frame=k.capacity(spec.frame_tokens, spec.num_heads, spec.head_dim),
        capacity_ratio=self.capacity_ratio)}

  def _sigmas(self, state, layer, moments, frames):
    """(sigma_k, sigma_v) of ``layer`` from running moments [2, 2] over ``frames`` frames."""
    spec = state.spec
    per_frame = spec.batch * spec.frame_tokens * spec.num_heads * spec.head_dim
    if self.sigma_scope == 'buffer':
      count = spec.require_total_frames('QAQ sigma_scope=buffer') * per_frame
    else:
      count = frames.astype(f32) * per_frame
    return [running_sigma(moments[i], count) for i in range(2)]

  @staticmethod
  def _moments(xs):
    return jnp.stack([jnp.stack([jnp.sum(x.astype(f32)), jnp.sum(jnp.square(x.astype(f32)))])
                      for x in xs])

  def encode_aux(self, state, layer, x_k, x_v, first_frame):
    mom = state.stats['moments'].at[layer].add(self._moments((x_k, x_v)))
    sig = self._sigmas(state, layer, mom[layer], first_frame + x_k.shape[1])
    kc, vc = self.codecs(state.spec)
    over = jnp.stack([jnp.sum(kc.overflow(x_k, sig[0])), jnp.sum(vc.overflow(x_v, sig[1]))])
    dropped = state.stats['dropped'].at[layer].add(over)
    return {'sigma': sig[0]}, {'sigma': sig[1]}, {**state.stats, 'moments': mom, 'dropped': dropped}

  def recode_aux(self, state, layer, k, v, info):
    # The call's block is in the buffer while the history is re-encoded; on the context pass
    # the append then adds its clean values to the running sums for good.
    mom = state.stats['moments'][layer] + self._moments((k, v))
    frames = info.start_frame + state.spec.block_frames
    sig = self._sigmas(state, layer, mom, frames)
    return {'sigma': sig[0]}, {'sigma': sig[1]}, state.stats

variant(QAQ, 'QAQ_INT4', ('qaq_int4', 'qaq4'), 'INT4 asymmetric + 6-sigma outliers kept exactly', bits=4)
variant(QAQ, 'QAQ_INT2', ('qaq_int2', 'qaq2'), 'INT2 asymmetric + 6-sigma outliers kept exactly', bits=2)
