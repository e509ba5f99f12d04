"""KV-cache methods: ``get(name, **overrides)``, ``names()``; the protocol is in base.py."""

from kvjax.cache import registry
from kvjax.cache.base import AppendInfo, CacheMethod, CacheSpec, frame_slot, tree_nbytes
from kvjax.cache.bf16 import BF16, DenseState
from kvjax.cache.registry import aliases, canonical, describe, get, names

registry.register(BF16)
