"""KV-cache methods: ``get(name, **overrides)``, ``names()``; the protocol is in base.py."""

from kvjax.cache import registry
from kvjax.cache.base import AppendInfo, CacheMethod, CacheSpec, frame_slot, tree_nbytes
from kvjax.cache.ring import BF16, FrameRingMethod, RingState
from kvjax.cache.registry import aliases, canonical, describe, get, names, parse_overrides

registry.register(BF16)

# Families register their paper names on import (order = the study's table order).
from kvjax.cache import rtn, kivi, quarot, prq, qaq, age_tier, flowcache  # noqa: E402,F401
from kvjax.cache import spatial  # noqa: E402,F401

registry.register(flowcache.FlowCacheNative)
registry.register(flowcache.FlowCacheProfile)

# The 33 method names of the study's tables (FLOWCACHE_PROFILE is its profiling pass, not a row).
PAPER_NAMES = (
    'BF16', 'RTN_INT4', 'RTN_INT2', 'RTN_K2_V4', 'RTN_INT4_RECENT2', 'RTN_INT4_REFRESH',
    'KIVI_INT4', 'KIVI_INT2', 'KIVI_INT4_REFRESH', 'KIVI_K2_V4', 'QUAROT_KV_INT4', 'QUAROT_KV_INT2',
    'QUAROT_KV_INT4_RECENT2', 'QUAROT_KV_INT4_REFRESH', 'PRQ_INT4', 'PRQ_INT2', 'QAQ_INT4',
    'QAQ_INT2', 'TPTQ_INT2', 'AGE_TIER_INT4', 'AGE_TIER_INT2', 'FLOWCACHE_HYBRID_INT2',
    'FLOWCACHE_ADAPTIVE_INT2', 'FLOWCACHE_PRUNE_INT4', 'FLOWCACHE_PRUNE_INT2',
    'FLOWCACHE_SOFT_PRUNE_INT4', 'FLOWCACHE_SOFT_PRUNE_INT2', 'FLOWCACHE_NATIVE',
    'FLOWCACHE_NATIVE_SOFT_PRUNE_INT4', 'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2',
    'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT4', 'SPATIAL_MIXED_FG_KIVI_INT4_BG_KIVI_INT2',
    'SPATIAL_MIXED_FG_QUAROT_KV_INT4_BG_RTN_INT2')
