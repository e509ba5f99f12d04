"""Chunked online-softmax attention (the XLA path) against plain softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.kernels import Source, chunked_attention, dense_attention, dense_source, merge
from kvjax.kernels.api import resolve_impl


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def biased(k, v, chunk_tokens, bias, n):
  """A dense source with a per-token logit bias [B=1, S] and only the first ``n`` chunks valid."""
  src = dense_source(k, v, chunk_tokens)
  r = k.shape[1] // chunk_tokens
  return src.replace(bias=bias.reshape(1, r, chunk_tokens), num_chunks=jnp.int32(n))


def _per_row_rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30))


@pytest.mark.parametrize('t,s,chunk', [(12, 48, 16), (5, 20, 4), (1, 64, 64)])
def test_matches_dense(t, s, chunk):
  q, k, v = _rand((2, t, 3, 16), 0), _rand((2, s, 3, 16), 1), _rand((2, s, 3, 16), 2)
  out, lse = chunked_attention(q, dense_source(k, v, chunk))
  ref = dense_attention(q, k, v)
  assert _per_row_rel(out, ref) < 1e-5
  logits = np.einsum('btnh,bsnh->bnts', q, k) / 4.0
  np.testing.assert_allclose(lse, np.log(np.exp(logits).sum(-1)), rtol=1e-5)


def test_bias_and_valid_prefix():
  q, k, v = _rand((1, 8, 2, 8), 3), _rand((1, 32, 2, 8), 4), _rand((1, 32, 2, 8), 5)
  bias = jnp.asarray(np.log(np.arange(1, 33, dtype=np.float32)))[None]
  out, _ = chunked_attention(q, biased(k, v, 8, bias, jnp.int32(3)))
  ref = dense_attention(q, k[:, :24], v[:, :24], bias=bias[:, :24])
  assert _per_row_rel(out, ref) < 1e-5
  # Negative control: forgetting the bias is detected by the same metric.
  assert _per_row_rel(out, dense_attention(q, k[:, :24], v[:, :24])) > 1e-2


def test_empty_source_gives_zero_and_neg_inf():
  q, k, v = _rand((1, 4, 2, 8), 6), _rand((1, 16, 2, 8), 7), _rand((1, 16, 2, 8), 8)
  out, lse = chunked_attention(q, biased(k, v, 8, jnp.zeros((1, 16)), jnp.int32(0)))
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(lse))


def test_merge_equals_attention_over_union():
  q = _rand((2, 6, 2, 8), 9)
  k, v = _rand((2, 40, 2, 8), 10), _rand((2, 40, 2, 8), 11)
  a = chunked_attention(q, dense_source(k[:, :24], v[:, :24], 8))
  b = chunked_attention(q, dense_source(k[:, 24:], v[:, 24:], 8))
  out, lse = merge(*a, *b)
  assert _per_row_rel(out, dense_attention(q, k, v)) < 1e-5
  # Merging with an empty part is the identity.
  empty = (jnp.zeros_like(q), jnp.full((2, 2, 6), -jnp.inf))
  out2, _ = merge(*empty, *a)
  assert _per_row_rel(out2, a[0]) < 1e-6
  # Negative control: a plain average of the two parts is wrong.
  assert _per_row_rel((a[0] + b[0]) / 2, dense_attention(q, k, v)) > 1e-2


def test_impl_resolution():
  assert resolve_impl('auto') == 'xla'
  assert resolve_impl('xla') == 'xla'
  with pytest.raises(ValueError, match='unknown attention impl'):
    resolve_impl('cuda')
  assert resolve_impl('pallas') == 'pallas'


def test_sources_are_pytrees_with_static_formats():
  k, v = _rand((1, 16, 2, 8), 12), _rand((1, 16, 2, 8), 13)
  src = dense_source(k, v, 8)
  leaves, tree = jax.tree.flatten(src)
  assert all(isinstance(x, jax.Array) for x in leaves)
  again = jax.tree.unflatten(tree, leaves)
  assert isinstance(again, Source) and again.kfmt == src.kfmt and again.chunk_tokens == 8
  # A source goes through jit as an argument: its format is static, its arrays traced.
  q = _rand((1, 4, 2, 8), 14)
  out, _ = jax.jit(chunked_attention)(q, src)
  assert _per_row_rel(out, dense_attention(q, k, v)) < 1e-5


def test_records_read_through_the_index():
  """Chunk j is record index[j]: a permuted index with num_chunks < records walks exactly those."""
  q, k, v = _rand((1, 6, 2, 8), 15), _rand((1, 32, 2, 8), 16), _rand((1, 32, 2, 8), 17)
  src = dense_source(k, v, 8).replace(index=jnp.asarray([3, 1, 0, 2], jnp.int32),
                                      num_chunks=jnp.int32(2))
  want = dense_attention(q, jnp.concatenate([k[:, 24:], k[:, 8:16]], 1),
                         jnp.concatenate([v[:, 24:], v[:, 8:16]], 1))
  out, _ = chunked_attention(q, src)
  assert _per_row_rel(out, want) < 1e-5
  # Control: the first two records are a different key set.
  assert _per_row_rel(out, dense_attention(q, k[:, :16], v[:, :16])) > 1e-2
