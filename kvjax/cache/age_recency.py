"""AGE_TIER_BY_AGE: AGE_TIER's ``recency='age'`` (the fix of weakness W7) as its own method.

The study's AGE_TIER puts the last ``recent_ratio`` of the whole-video buffer *by position* in
the recent tier (``age_tier.py``). By age, the newest ``recent_ratio`` of the window's chunks are
in the recent tier (RTN ``recent_bits``) and are demoted — re-encoded at ``bits`` — as they age:
FlowCache's hybrid plan with a flat budget across layers (every layer the same capacities).

``kvcache.get('AGE_TIER_INT2', recency='age')`` (or ``--method_args=recency=age``) builds this
method with that row's parameters (``AgeTier.build``); it is also reachable by its own name. It is
not a row of the study's tables (``in_study = False``).
"""

from __future__ import annotations

import dataclasses

from kvjax.cache.age_tier import AGE_TIER_BY_AGE
from kvjax.cache.flowcache import FlowCache
from kvjax.cache.registry import register


@register
@dataclasses.dataclass(frozen=True)
class AgeTierByAge(FlowCache):
  """FlowCache ``kind='hybrid'`` with a flat ``budget`` (linear from 1.0 to 1.0), AGE_TIER's
  defaults (``bits=2``, ``recent_bits=4``, ``recent_ratio=0.3``, ``group_size=16``)."""
  name = AGE_TIER_BY_AGE
  aliases = ('age_tier_by_age', 'agetier_by_age', 'age_recency')
  family = 'AGE_TIER'
  description = ("AGE_TIER with recency='age': the newest recent_ratio of the window's chunks in "
                 'RTN recent_bits, older ones re-encoded to RTN bits as they age')
  in_study = False
  kind: str = 'hybrid'
  bits: int = 2
  recent_ratio: float = 0.3
  budget: str = 'linear'
  budget_min: float = 1.0
  budget_max: float = 1.0
  # kvjax's planning (a fix, not a study row): the window's chunks, planned once a block ahead.
  plan_scope: str = 'window'
  plan_cadence: str = 'ahead'
  plan_scores: str = 'exact'
  prune_final: bool = True
  FIXES = {}
