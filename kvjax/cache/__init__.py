"""KV-cache methods: ``get(name, **overrides)``, ``names()``; the protocol is in base.py."""

from kvjax.cache import registry
from kvjax.cache.base import AppendInfo, CacheMethod, CacheSpec, frame_slot, tree_nbytes
from kvjax.cache.ring import BF16, FrameRingMethod, RingState
from kvjax.cache.registry import (aliases, canonical, describe, get, names, parse_overrides,
                                  study_names)

registry.register(BF16)

# Families register their paper names on import; registration order is the study's table order,
# so a family module must not import a family listed after it (age_recency, which is no table
# row, comes last because it imports flowcache).
from kvjax.cache import rtn, kivi, quarot, prq, qaq, age_tier, flowcache  # noqa: E402,F401
from kvjax.cache import spatial  # noqa: E402,F401

registry.register(flowcache.FlowCacheProfile)

from kvjax.cache import age_recency  # noqa: E402,F401

# Methods beyond the study (``in_study = False``), listed after the study's rows.
from kvjax.cache import qvg  # noqa: E402,F401

# The 33 method names of the study's tables, in table order (``CacheMethod.in_study``: not
# FLOWCACHE_PROFILE, the study's profiling pass, nor AGE_TIER_BY_AGE, the recency='age' fix).
PAPER_NAMES = study_names()
