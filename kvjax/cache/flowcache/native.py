"""FLOWCACHE_NATIVE: the exact BF16 cache plus the sampler's denoising-step reuse."""

from __future__ import annotations

import dataclasses

from kvjax.cache.ring import BF16


@dataclasses.dataclass(frozen=True)
class FlowCacheNative(BF16):
  """FLOWCACHE_NATIVE: the exact BF16 cache plus denoising-step reuse in the sampler
  (``reuse_threshold``; see ``kvjax.sampler`` for the reconstructed rule)."""
  name = 'FLOWCACHE_NATIVE'
  aliases = ('native', 'flowcache_native')
  family = 'FLOWCACHE'
  description = 'BF16 cache; a denoising step is skipped (model output reused) while the accumulated input change stays below the threshold'
  reuse_threshold: float = 1.5
  is_reference = False                # BF16 storage, but step reuse changes the rollout

  @property
  def step_reuse_threshold(self) -> float:
    return self.reuse_threshold
