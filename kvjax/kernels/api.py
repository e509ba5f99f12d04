"""Attention over a (packed) cache: dispatch between the XLA reference and Pallas kernels."""

from __future__ import annotations

import jax

from kvjax.kernels import reference

IMPLS = ('auto', 'xla', 'pallas')


def resolve_impl(impl: str) -> str:
  """'auto' -> 'pallas' on GPU, 'xla' elsewhere. Raises on unknown names."""
  if impl not in IMPLS:
    raise ValueError(f'unknown attention impl {impl!r}; valid: {list(IMPLS)}')
  if impl == 'auto':
    return 'pallas' if jax.default_backend() == 'gpu' and _pallas_available() else 'xla'
  if impl == 'pallas' and not _pallas_available():
    raise NotImplementedError(
        'impl="pallas": no fused Pallas kernel for packed caches is available in this build yet; '
        'use impl="xla" (the chunked jnp path, which never materializes the cache).')
  return impl


def _pallas_available() -> bool:
  return False


def attention(q: jax.Array, source, *, impl: str = 'auto', scale: float | None = None):
  """Softmax attention of ``q`` [B, T, N, H] over a chunked KV source.

  Returns (out [B, T, N, H], lse [B, N, T] float32); see kernels/reference.py.
  """
  impl = resolve_impl(impl)
  return reference.chunked_attention(q, source, scale=scale)
