"""Attention over KV caches: ``attention(q, source, impl=...)``; reference.py is the jnp spec."""

from kvjax.kernels.api import IMPLS, attention, resolve_impl
from kvjax.kernels.reference import (DenseKV, chunked_attention, dense_attention,
                                     materialize_source, merge)
