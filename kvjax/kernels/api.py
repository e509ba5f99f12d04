"""Attention over cache sources: ``attention(q, sources, impl=...)``, one entry point.

The model hands every attention read to this function: the block's own dense K/V and the cache's
sources alike (``dense_source`` + ``method.sources``). Each source is read by the XLA reference
walk or by the fused Pallas kernel (``pallas_gpu.py``), and the partial results are merged by
log-sum-exp (``reference.attend_sources``).

impl:
  'xla'    the chunked jnp walk (any backend).
  'pallas' the Pallas Triton kernel: native on a GPU, ``interpret=True`` elsewhere (CPU tests).
           It reads every format the methods store (typed records and the byte-pool
           mixed-format log, exact outliers included). A source it does not read
           (``pallas_gpu.unsupported``: e.g. INT2 packing at head_dim < 64, head_dim not a power
           of two) is read by the XLA walk instead, logged once per reason (a documented
           fallback, never a silently different result).
  'auto'   'pallas' on GPU, 'xla' elsewhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Sequence

import jax
from absl import logging

from kvjax.kernels import pallas_gpu, reference
from kvjax.kernels.source import Source

IMPLS = ('auto', 'xla', 'pallas')

# Set (only) by ``lowering_for_gpu``: trace the Pallas kernels natively on any backend.
_NATIVE = contextvars.ContextVar('kvjax_pallas_native', default=False)


@contextlib.contextmanager
def lowering_for_gpu():
  """Inside this block, impl='pallas' traces the native (Triton) kernels even on a CPU host, so
  that ``jax.jit(step).trace(...).lower(lowering_platforms=('cuda',))`` lowers what a GPU runs.
  (Executing such a trace on CPU fails: only interpret mode runs there.)"""
  token = _NATIVE.set(True)
  try:
    yield
  finally:
    _NATIVE.reset(token)


def resolve_impl(impl: str) -> str:
  """'auto' -> 'pallas' on GPU, 'xla' elsewhere. Raises on unknown names."""
  if impl not in IMPLS:
    raise ValueError(f'unknown attention impl {impl!r}; valid: {list(IMPLS)}')
  if impl == 'auto':
    return 'pallas' if jax.default_backend() == 'gpu' else 'xla'
  return impl


@functools.lru_cache(maxsize=None)
def _log_fallback(reason: str) -> None:
  logging.warning('impl=pallas: %s: this source is read by the XLA walk instead', reason)


def fallbacks(sources: Sequence[Source]) -> list[str]:
  """Reasons why the Pallas kernel would not read some of ``sources`` (empty: it reads all)."""
  return [r for r in (pallas_gpu.unsupported(s) for s in sources) if r]


def _pallas_partial(q, src: Source, scale: float):
  reason = pallas_gpu.unsupported(src)
  if reason:
    _log_fallback(reason)
    return reference.walk(q, src, scale)
  interpret = jax.default_backend() != 'gpu' and not _NATIVE.get()
  return pallas_gpu.source_attention(q, src, scale, interpret=interpret)


def attention(q: jax.Array, sources, *, impl: str = 'auto', scale: float | None = None):
  """Softmax attention of ``q`` [B, T, N, H] over the union of ``sources``.

  Args:
    q: [B, T, N, H] queries (compute dtype).
    sources: a Source or a sequence of them (disjoint key sets; may be empty).
    impl: 'auto' | 'xla' | 'pallas' (module docstring).
    scale: logit scale, default 1/sqrt(H).
  Returns:
    out [B, T, N, H] in q's dtype (zeros where nothing was attended), lse [B, N, T] float32.
  """
  sources = [sources] if isinstance(sources, Source) else list(sources)
  partial = reference.walk if resolve_impl(impl) == 'xla' else _pallas_partial
  return reference.attend_sources(q, sources, partial, scale)
