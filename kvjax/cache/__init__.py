"""KV-cache methods: ``get(name, **overrides)``, ``names()``; the protocol is in base.py."""

from kvjax.cache import registry
from kvjax.cache.base import AppendInfo, CacheMethod, CacheSpec, frame_slot, tree_nbytes
from kvjax.cache.ring import BF16, FrameRingMethod, RingState
from kvjax.cache.registry import aliases, canonical, describe, get, names, parse_overrides

registry.register(BF16)

# Families register their paper names on import (order = the study's table order).
from kvjax.cache import rtn, kivi, quarot, prq, qaq, age_tier, flowcache  # noqa: E402,F401
from kvjax.cache import spatial  # noqa: E402,F401
