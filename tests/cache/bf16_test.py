"""The cache protocol with the BF16 method: ring buffer, attend == materialize + dense, storage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.cache import AppendInfo, CacheSpec
from kvjax.kernels import dense_attention


def _spec(**kw):
  base = dict(batch=2, num_layers=3, num_heads=2, head_dim=8, frame_tokens=5, block_frames=3,
              window_frames=10, sink_frames=0, dtype=jnp.float32)
  base.update(kw)
  return CacheSpec(**base)


def _blocks(spec, n, seed=0):
  rng = np.random.default_rng(seed)
  shape = (n, spec.batch, spec.block_tokens, spec.num_heads, spec.head_dim)
  return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def _fill(method, spec, ks, vs, layer=1):
  state = method.init(spec)
  for b in range(len(ks)):
    state = jax.jit(method.append)(state, jnp.int32(layer), ks[b], vs[b],
                                   AppendInfo(jnp.int32(b * spec.block_frames)))
  return state


def _visible_frames(spec, blocks_done):
  """Absolute frames a new block sees in the cache (Self-Forcing's eviction rule)."""
  n = blocks_done * spec.block_frames
  recent = spec.window_frames - spec.sink_frames - spec.block_frames
  return [f for f in range(n) if f < spec.sink_frames or f >= n - recent]


@pytest.mark.parametrize('window,sink,blocks', [(10, 0, 2), (10, 0, 5), (10, 2, 5), (7, 1, 6), (12, 0, 3)])
def test_ring_holds_exactly_the_visible_frames(window, sink, blocks):
  spec = _spec(window_frames=window, sink_frames=sink)
  m = kvcache.get('BF16')
  ks, vs = _blocks(spec, blocks)
  state = _fill(m, spec, ks, vs)
  k, v, bias = m.materialize(state, 1)
  k, bias = np.asarray(k), np.asarray(bias)
  valid = np.isfinite(bias[0])
  per_frame = spec.frame_tokens
  all_k = ks.transpose(1, 0, 2, 3, 4).reshape(spec.batch, -1, spec.num_heads, spec.head_dim)
  want = _visible_frames(spec, blocks)
  got = []
  for slot in range(spec.capacity_frames):
    if not valid[slot * per_frame]:
      continue
    rows = k[:, slot * per_frame:(slot + 1) * per_frame]
    matches = [f for f in range(blocks * 3)
               if np.array_equal(rows, all_k[:, f * per_frame:(f + 1) * per_frame])]
    assert len(matches) == 1
    got.append(matches[0])
  assert sorted(got) == want
  # Other layers were not touched.
  assert not np.isfinite(np.asarray(m.materialize(state, 0)[2])).any()


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_attend_equals_materialize_plus_dense(dtype, tol):
  spec = _spec(window_frames=10, sink_frames=1, dtype=dtype)
  m = kvcache.get('bf16')
  ks, vs = _blocks(spec, 4, seed=1)
  state = _fill(m, spec, ks, vs)
  q = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 2, 8)), dtype)
  out, lse = jax.jit(m.attend, static_argnums=3)(state, jnp.int32(1), q, 'xla')
  k, v, bias = m.materialize(state, 1)
  ref = dense_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                        bias=bias)
  err = np.max(np.abs(np.asarray(out, np.float32) - np.asarray(ref)))
  assert err <= tol * np.max(np.abs(np.asarray(ref)))
  assert np.all(np.isfinite(np.asarray(lse)))


def test_storage_is_real_and_counted():
  spec = _spec(dtype=jnp.bfloat16)
  m = kvcache.get('BF16')
  state = m.init(spec)
  assert state.k['x'].dtype == jnp.uint16     # raw bf16 bits (see cache/base.py storage_dtype)
  assert m.nbytes(state) == state.k['x'].nbytes + state.v['x'].nbytes + state.frames.nbytes
  assert spec.bf16_bytes() == state.k['x'].nbytes + state.v['x'].nbytes
  abstract = jax.eval_shape(lambda: m.init(spec))
  assert m.nbytes(abstract) == m.nbytes(state)
  # Values survive the bit-level storage exactly.
  ks, vs = _blocks(spec, 1)
  state = _fill(m, spec, ks, vs, layer=0)
  k, _, _ = m.materialize(state, 0)
  np.testing.assert_array_equal(np.asarray(k[:, :spec.block_tokens], np.float32),
                                np.asarray(jnp.asarray(ks[0], jnp.bfloat16), np.float32))


def test_empty_cache_attends_nothing():
  spec = _spec()
  m = kvcache.get('BF16')
  q = jnp.ones((2, 4, 2, 8))
  out, lse = m.attend(m.init(spec), jnp.int32(0), q)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
  # A window of exactly one block keeps no history at all.
  spec0 = _spec(window_frames=3)
  assert spec0.capacity_frames == 0
  s0 = m.init(spec0)
  s0 = m.append(s0, jnp.int32(0), *(_blocks(spec0, 1)[0][0],) * 2, AppendInfo(jnp.int32(0)))
  assert np.all(np.isneginf(np.asarray(m.attend(s0, jnp.int32(0), q)[1])))


def test_spec_validation():
  with pytest.raises(ValueError, match='smaller than a block'):
    _spec(window_frames=2)
  with pytest.raises(ValueError, match='sink_frames'):
    _spec(window_frames=6, sink_frames=3)
  with pytest.raises(ValueError, match='sink_frames must be >= 0'):
    _spec(sink_frames=-1)
  with pytest.raises(ValueError, match='frame_tokens'):
    _spec(frame_tokens=0)


def test_registry():
  assert kvcache.get('bf16').name == 'BF16'
  assert kvcache.get('BF16') == kvcache.get('bf16')          # hashable, comparable
  assert hash(kvcache.get('bf16')) == hash(kvcache.get('Bf16'))
  assert 'BF16' in kvcache.names()
  with pytest.raises(ValueError, match='Valid names: .*BF16'):
    kvcache.get('int3_magic')
  with pytest.raises(ValueError, match='no parameter'):
    kvcache.get('bf16', bits=4)
