"""Attention over KV caches: ``attention(q, sources, impl=...)``.

source.py (what attention reads: a pytree of arrays + a static format), formats.py (storage
formats and their jnp decode), reference.py (the jnp walk: the XLA path and the kernels' spec),
pallas_gpu.py (the fused Pallas Triton kernel and its wrapper; pallas_plan.py: which sources it
reads, pallas_decode.py: in-register reads and dequantization), api.py (dispatch).
"""

from kvjax.kernels.api import IMPLS, attention, fallbacks, lowering_for_gpu, resolve_impl
from kvjax.kernels.reference import (attend_sources, chunked_attention, dense_attention,
                                     materialize_source, merge, walk)
from kvjax.kernels.source import Source, dense_source, read_chunk
