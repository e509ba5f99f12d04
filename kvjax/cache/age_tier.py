"""Age-Tier (spec 3.8) and TPTQ (spec 3.7): a positional recent tier in RTN INT4.

The study calls the last ``recent_ratio`` of its whole-video buffer "recent" — a fixed schedule
by buffer position, not by age (weakness W7): AGE_TIER_INT2 is "frames before ~70% of the video
in ternary RTN, later frames in INT4". That schedule is the default of the paper names, realized
exactly and statically by the mixed-format frame log (``mixed_log.py``); ``recency='age'`` is the
fix (the newest ``recent_ratio`` of the window in the recent tier, re-encoded as frames age),
stored by another engine: ``kvcache.get(<AGE_TIER name>, recency='age')`` builds
AGE_TIER_BY_AGE (``age_recency.py``; see ``AgeTier.build``). The token boundary
(e.g. slot 45,864 = frame 29.4 of 42) is rounded to the nearest frame boundary: tiers are whole
frames. With ``total_frames`` of the rollout standing for the study's buffer length.

TPTQ: recent tier RTN INT4; older frames PRQ(2 + 2 bits) with key outliers (> 6 sigma of the old
keys, the largest ``outlier_max_ratio`` of a frame's key elements) restored exactly after
dequantization but not clipped before it (as the study). Old-key sigma counts the whole old part
of the buffer, zero slots included (``sigma_scope='buffer'``, the study) or only what was written
(``'written'``).
Outlier cap (a documented deviation): the study keeps the largest floor(0.001 * n) outliers of
its whole old buffer (n old key elements: a cap of 85,542 at 480x832, 3.6% of one frame), wherever
they lie; kvjax stores ceil(0.001 * frame elements) a frame. A frame with more than 0.1% of its
keys beyond the bound (sink tokens) keeps fewer than the study would, and outliers spread over
many frames are all kept where the study's global top-k keeps only the largest. A global top-k
is not causal (later frames change it), and a per-frame store sized to the global cap would add
about 0.21 B per old key element (+28% of the old keys' bytes). Measured on a 96-token buffer in
three frames with both token-outlier rows in the first: attention moves by 2.2% of the
quantization error (0.8% with the rows in different frames; tests/cache/study_numerics_test.py).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from kvjax.cache import codecs as C
from kvjax.cache import registry
from kvjax.kernels import packing
from kvjax.cache.mixed_log import MixedLogMethod
from kvjax.cache.qaq import running_sigma
from kvjax.cache.registry import variant

f32 = jnp.float32

# The registered name of AGE_TIER's recency='age' engine (defined in age_recency.py, which imports
# flowcache: importing it here would register the FLOWCACHE rows before AGE_TIER's and break the
# table order of ``registry.study_names()``; the registry links the two by this name instead).
AGE_TIER_BY_AGE = 'AGE_TIER_BY_AGE'


def positional_threshold(total_frames: int, frame_tokens: int, recent_ratio: float) -> int:
  """First frame of the recent tier: the study's last max(1, round(r * L)) buffer slots, rounded
  to the nearest frame boundary."""
  slots = total_frames * frame_tokens
  recent = max(1, round(recent_ratio * slots))
  return int(round((slots - recent) / frame_tokens))


@dataclasses.dataclass(frozen=True)
class AgeTier(MixedLogMethod):
  """Frames of the last ``recent_ratio`` of the buffer (by position) in RTN ``recent_bits``, the
  rest in RTN ``bits``. ``recency`` is 'position' on every instance: 'age' makes ``build``
  return AGE_TIER_BY_AGE instead."""
  family = 'AGE_TIER'
  bits: int = 2
  recent_bits: int = 4
  recent_ratio: float = 0.3
  group_size: int = 16
  recency: str = 'position'
  FIXES = {'recency': 'age'}

  def __post_init__(self):
    packing.check_bits(self.bits)
    packing.check_bits(self.recent_bits, 'recent_bits')
    C.SymRTN(self.bits, self.group_size)
    if not 0.0 <= self.recent_ratio <= 1.0:
      raise ValueError(f'recent_ratio must be in [0, 1] (got {self.recent_ratio})')
    if self.recency == 'age':
      raise ValueError(f"{self.name or 'AgeTier'}: recency='age' is stored by {AGE_TIER_BY_AGE}; "
                       "build it with kvjax.cache.get(name, recency='age') (AgeTier.build)")
    if self.recency != 'position':
      raise ValueError(f"recency must be 'position' (the study) or 'age' (got {self.recency!r})")

  @classmethod
  def build(cls, **params):
    """``recency='position'`` (the study): this class. ``recency='age'`` (the fix of weakness
    W7): AGE_TIER_BY_AGE with this row's ``bits``, ``recent_bits``, ``recent_ratio`` and
    ``group_size`` — the newest ``recent_ratio`` of the window's chunks in the recent tier,
    re-encoded at ``bits`` as they age (FlowCache's hybrid plan with a flat budget)."""
    if params.get('recency', cls.recency) != 'age':
      return cls(**params)
    tier = cls(**{**params, 'recency': 'position'})      # validates the shared parameters
    return registry.get(AGE_TIER_BY_AGE, bits=tier.bits, recent_bits=tier.recent_bits,
                        recent_ratio=tier.recent_ratio, group_size=tier.group_size)

  def tier_codecs(self, spec):
    old = C.SymRTN(self.bits, self.group_size)
    new = C.SymRTN(self.recent_bits, self.group_size)
    return [(old, old), (new, new)]

  def tier_of(self, spec):
    total = spec.require_total_frames(self.name)
    thr = positional_threshold(total, spec.frame_tokens, self.recent_ratio)
    return (np.arange(total) >= thr).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class TPTQ(MixedLogMethod):
  family = 'TPTQ'
  bits: int = 2
  residual_bits: int = 2
  recent_ratio: float = 0.15
  recent_bits: int = 4
  outlier_threshold: float = 6.0
  outlier_max_ratio: float = 0.001
  sigma_scope: str = 'buffer'
  FIXES = {'sigma_scope': 'written'}
  group_size: int = 16

  def __post_init__(self):
    C.PRQ(self.bits, self.residual_bits, self.group_size)
    packing.check_bits(self.recent_bits, 'recent_bits')
    C.Outliers(C.PRQ(), self.outlier_threshold, self.outlier_max_ratio, clip=False)
    if not 0.0 <= self.recent_ratio <= 1.0:
      raise ValueError(f'recent_ratio must be in [0, 1] (got {self.recent_ratio})')
    if self.sigma_scope not in ('written', 'buffer'):
      raise ValueError(f"sigma_scope must be 'written' or 'buffer' (got {self.sigma_scope!r})")

  def tier_codecs(self, spec):
    prq = C.PRQ(self.bits, self.residual_bits, self.group_size)
    old_k = C.Outliers(prq, self.outlier_threshold, self.outlier_max_ratio, clip=False)
    new = C.SymRTN(self.recent_bits, self.group_size)
    return [(old_k, prq), (new, new)]

  def tier_of(self, spec):
    total = spec.require_total_frames(self.name)
    thr = positional_threshold(total, spec.frame_tokens, self.recent_ratio)
    return (np.arange(total) >= thr).astype(np.int64)

  def init_stats(self, spec):
    return {'old_key_moments': jnp.zeros((spec.num_layers, 2), f32)}

  def encode_aux(self, state, layer, tier, x_k, x_v, frame):
    if tier != 0:
      return None, None, state.stats
    spec = state.spec
    mom = state.stats['old_key_moments']
    xk = x_k.astype(f32)
    mom = mom.at[layer].add(jnp.stack([jnp.sum(xk), jnp.sum(xk * xk)]))
    per_frame = spec.batch * spec.frame_tokens * spec.num_heads * spec.head_dim
    if self.sigma_scope == 'buffer':
      thr = positional_threshold(spec.require_total_frames(self.name), spec.frame_tokens,
                                 self.recent_ratio)
      count = jnp.asarray(max(thr, 1) * per_frame, f32)
    else:
      count = (frame + 1).astype(f32) * per_frame
    return {'sigma': running_sigma(mom[layer], count)}, None, {'old_key_moments': mom}


# Registration order is the study's table order (TPTQ_INT2 precedes the AGE_TIER rows).
variant(TPTQ, 'TPTQ_INT2', ('tptq_int2', 'tptq2', 'tptq'),
        'last 15% of the buffer RTN INT4; older PRQ(2+2) + 0.1% exact key outliers')
variant(AgeTier, 'AGE_TIER_INT4', ('age_tier_int4', 'agetier_int4', 'agetier4'),
        'last 30% of the buffer (by position) RTN INT4, the rest RTN INT4', bits=4)
variant(AgeTier, 'AGE_TIER_INT2', ('age_tier_int2', 'agetier_int2', 'agetier2'),
        'last 30% of the buffer (by position) RTN INT4, the rest ternary RTN INT2', bits=2)
