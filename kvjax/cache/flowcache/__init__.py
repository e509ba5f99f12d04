"""FlowCache-inspired methods (spec 3.9), by concern: ``plan.py`` (budgets, tier sizes, scores),
``tiers.py`` (the tier-store method, FlowCache), ``profile.py`` (the profiling pass),
``native.py`` (FLOWCACHE_NATIVE's step reuse). This module registers the study's rows in its
table order.
"""

from __future__ import annotations

from kvjax.cache.flowcache.native import FlowCacheNative
from kvjax.cache.flowcache.plan import (MOVIEGEN_BUDGETS, chunk_deltas, count_table,  # noqa: F401
                                        frame_summary, layer_budgets, plan_counts, recent_count,
                                        tier_counts)
from kvjax.cache.flowcache.profile import FlowCacheProfile, ProfileState  # noqa: F401
from kvjax.cache.flowcache.tiers import (A, B, PRUNED, FlowCache, FlowState,  # noqa: F401
                                         store_source, summary_source)
from kvjax.cache.registry import register, variant

_FLOW = [
    ('FLOWCACHE_HYBRID_INT2', ('hybrid_int2', 'flowcache_hybrid'), 'newest chunks INT4, the rest INT2',
     dict(kind='hybrid', bits=2)),
    ('FLOWCACHE_ADAPTIVE_INT2', ('adaptive_int2', 'flowcache_adaptive'),
     'recent + 20% most important old chunks INT4, the rest INT2',
     dict(kind='adaptive', bits=2, important_ratio=0.2)),
    ('FLOWCACHE_PRUNE_INT4', ('prune_int4', 'flowcache_prune_int4'),
     'recent/important/45% retained INT4, the rest pruned (zero keys keep softmax mass)',
     dict(kind='prune', bits=4, important_ratio=0.1, retained_ratio=0.45)),
    ('FLOWCACHE_PRUNE_INT2', ('prune_int2', 'flowcache_prune_int2'),
     'recent/important INT4, 30% retained INT2, the rest pruned',
     dict(kind='prune', bits=2, important_ratio=0.1, retained_ratio=0.30)),
    ('FLOWCACHE_SOFT_PRUNE_INT4', ('softprune_int4', 'soft_prune_int4', 'flowcache_soft_prune_int4'),
     'as PRUNE_INT4, pruned chunks become one mean token with bias log(count)',
     dict(kind='soft_prune', bits=4, important_ratio=0.1, retained_ratio=0.45)),
    ('FLOWCACHE_SOFT_PRUNE_INT2', ('softprune_int2', 'soft_prune_int2', 'flowcache_soft_prune_int2'),
     'soft pruning, retained INT2', dict(kind='soft_prune', bits=2, important_ratio=0.1, retained_ratio=0.45)),
]
for _name, _aliases, _desc, _kw in _FLOW:
  variant(FlowCache, _name, _aliases, _desc, **_kw)
register(FlowCacheNative)             # registration order is the study's table order
variant(FlowCache, 'FLOWCACHE_NATIVE_SOFT_PRUNE_INT4', ('native_softprune_int4', 'native_soft_prune_int4'),
        'FLOWCACHE_SOFT_PRUNE_INT4 plus denoising-step reuse',
        kind='soft_prune', bits=4, important_ratio=0.1, retained_ratio=0.45, reuse_threshold=1.5)
