"""BF16: the uncompressed reference cache (K/V stored in the compute dtype, one slot per frame)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import kernels
from kvjax.cache.base import (AppendInfo, CacheMethod, CacheSpec, frame_slot, from_storage,
                              storage_dtype, to_storage, valid_frames)

f32 = jnp.float32


@struct.dataclass
class DenseState:
  """k, v: [L, B, C, P, N, H] (C frame slots of P tokens) in ``storage_dtype(spec.dtype)``
  (16-bit floats as raw uint16 bits); frames: [L] int32 frames appended."""
  k: jax.Array
  v: jax.Array
  frames: jax.Array
  spec: CacheSpec = struct.field(pytree_node=False)


class SlotKV:
  """Chunked KV source over the frame slots of one layer of a DenseState (one slot a chunk)."""

  def __init__(self, state: DenseState, layer, dtype):
    self.state, self.layer, self.dtype = state, layer, dtype
    self.chunk_tokens = state.spec.frame_tokens
    self.max_chunks = state.spec.capacity_frames
    self.num_chunks = valid_frames(state.frames[layer], state.spec)

  def chunk(self, j):
    st = self.state
    _, b, _, p, n, h = st.k.shape
    start = (self.layer, 0, j, 0, 0, 0)
    k = jax.lax.dynamic_slice(st.k, start, (1, b, 1, p, n, h)).reshape(b, p, n, h)
    v = jax.lax.dynamic_slice(st.v, start, (1, b, 1, p, n, h)).reshape(b, p, n, h)
    dt = st.spec.dtype
    k, v = from_storage(k, dt).astype(self.dtype), from_storage(v, dt).astype(self.dtype)
    return k, v, jnp.zeros((b, p), f32)


def write_block(arr, layer, slots, x, spec: CacheSpec):
  """Writes a block's per-frame rows into frame slots.

  Args:
    arr: [L, B, C, P, ...] storage; layer: int32; slots: block_frames int32 slot indices.
    x: [B, block_frames * P, ...] rows of the block.
  """
  b = x.shape[0]
  x = x.reshape(b, spec.block_frames, spec.frame_tokens, *x.shape[2:])
  for i in range(spec.block_frames):
    upd = x[:, i][None, :, None]
    start = (layer, 0, slots[i]) + (0,) * (arr.ndim - 3)
    arr = jax.lax.dynamic_update_slice(arr, upd, start)
  return arr


def block_slots(start_frame, spec: CacheSpec):
  """Slots of the block_frames frames starting at absolute frame ``start_frame``."""
  return [frame_slot(start_frame + i, spec) for i in range(spec.block_frames)]


def empty_attention(q):
  b, t, n, _ = q.shape
  return jnp.zeros_like(q), jnp.full((b, n, t), -jnp.inf, f32)


@dataclasses.dataclass(frozen=True)
class BF16(CacheMethod):
  """Unquantized K/V in the cache dtype (bfloat16 on the fast path; float32 in parity runs)."""
  name = 'BF16'
  aliases = ('bf16', 'none', 'baseline')
  family = 'BF16'
  description = 'reference: unquantized K/V, ring buffer of frame slots'

  def init(self, spec: CacheSpec) -> DenseState:
    shape = (spec.num_layers, spec.batch, spec.capacity_frames, spec.frame_tokens,
             spec.num_heads, spec.head_dim)
    sd = storage_dtype(spec.dtype)
    return DenseState(k=jnp.zeros(shape, sd), v=jnp.zeros(shape, sd),
                      frames=jnp.zeros((spec.num_layers,), jnp.int32), spec=spec)

  def append(self, state: DenseState, layer, k, v, info: AppendInfo) -> DenseState:
    spec = state.spec
    if spec.capacity_frames == 0:
      return state
    slots = block_slots(info.start_frame, spec)
    return state.replace(k=write_block(state.k, layer, slots, to_storage(k, spec.dtype), spec),
                         v=write_block(state.v, layer, slots, to_storage(v, spec.dtype), spec),
                         frames=state.frames.at[layer].set(info.start_frame + spec.block_frames))

  def attend(self, state: DenseState, layer, q, impl: str = 'auto'):
    if state.spec.capacity_frames == 0:
      return empty_attention(q)
    return kernels.attention(q, SlotKV(state, layer, q.dtype), impl=impl)

  def materialize(self, state: DenseState, layer):
    spec = state.spec
    _, b, c, p, n, h = state.k.shape
    k = from_storage(state.k[layer], spec.dtype).reshape(b, c * p, n, h)
    v = from_storage(state.v[layer], spec.dtype).reshape(b, c * p, n, h)
    valid = jnp.arange(c) < valid_frames(state.frames[layer], spec)
    bias = jnp.where(jnp.repeat(valid, p), 0.0, -jnp.inf).astype(f32)
    return k, v, jnp.broadcast_to(bias, (b, c * p))
