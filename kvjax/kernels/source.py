"""What attention reads: a ``Source`` is a pytree of arrays plus a static format description.

A source is one homogeneous store of records (every record in the same formats) seen by one
layer. Attention walks its *chunks* j = 0 .. num_chunks - 1; chunk j is record ``index[j]``
(a ring slot, a store slot, or a byte offset), ``chunk_tokens`` tokens of keys and values.

Arrays (the pytree leaves), L = leading layer axis, R = records, S = chunk_tokens:
  k, v        record fields of ``kfmt`` / ``vfmt`` (``formats.py``), each [L, B, R, ...]; for a
              byte-pool source (``pool`` set) k = {'pool': uint8 [L, B, bytes]} and v = {}
  layer       int32 []   the layer read (traced inside the layer scan)
  index       int32 [M]  record (or byte offset) of chunk j, M >= the chunks ever walked
  num_chunks  int32 []   chunks to walk
  bias        float32 [L, R, S] logit bias of each record token (0 plain, log(count) for a
              summary token, -inf for an empty slot), or None (all 0)
  k_shared, v_shared  record fields shared by several chunks, [L, B, R2, ...] (QVG's per-span
              centroid tables), or None; chunk j reads shared record ``shared_index[j]``
  shared_index int32 [M] or None
  positions   int32 [M] absolute latent frame of chunk j, or None; set (with ``rope``) when the
              stored keys are pre-RoPE: the reader rotates each decoded key chunk to its frame
Static (hashable, part of the tree structure):
  kfmt, vfmt  the formats of keys and values (both in the same basis: ``rotated``)
  chunk_tokens
  pool        for byte-pool sources: ((tensor, field, shape, dtype, byte offset, nbytes), ...),
              the record's fields serialized back to back (``cache/mixed_log.py``)
  rope        ``rope.RopeGrid`` of a chunk (one frame) for pre-RoPE keys, or None

``read_chunk`` is the one jnp definition of what chunk j holds; ``reference.py`` walks it and the
Pallas kernels take exactly these arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.kernels import formats as F
from kvjax.numerics import to_storage

f32 = jnp.float32


@struct.dataclass
class Source:
  k: dict
  v: dict
  layer: jax.Array
  index: jax.Array
  num_chunks: jax.Array
  bias: Any = None
  k_shared: Any = None
  v_shared: Any = None
  shared_index: Any = None
  positions: Any = None
  kfmt: F.Format = struct.field(pytree_node=False, default=F.Dense())
  vfmt: F.Format = struct.field(pytree_node=False, default=F.Dense())
  chunk_tokens: int = struct.field(pytree_node=False, default=1)
  pool: tuple | None = struct.field(pytree_node=False, default=None)
  rope: Any = struct.field(pytree_node=False, default=None)

  @property
  def rotated(self) -> bool:
    return self.kfmt.rotated

  @property
  def pool_record_bytes(self) -> int:
    """Bytes of one record of a byte-pool source (its fields back to back)."""
    return int(sum(entry[5] for entry in self.pool))

  @property
  def max_chunks(self) -> int:
    return int(self.index.shape[0])

  def __post_init__(self):
    if self.kfmt.rotated != self.vfmt.rotated:
      raise ValueError('keys and values of one source must share the rotation')
    if (self.rope is None) != (self.positions is None):
      raise ValueError('a pre-RoPE source needs both rope and positions')
    if self.rope is not None and self.rope.frame_tokens != self.chunk_tokens:
      raise ValueError(f'pre-RoPE chunks must be one frame: chunk_tokens={self.chunk_tokens}, '
                       f'frame grid {self.rope.height}x{self.rope.width}')
    if self.rope is not None and self.rotated:
      raise ValueError('a Hadamard-rotated source cannot hold pre-RoPE keys')
    if (self.shared_index is None) != (self.k_shared is None and self.v_shared is None):
      raise ValueError('shared record fields need shared_index (and vice versa)')


def dense_source(k: jax.Array, v: jax.Array, chunk_tokens: int) -> Source:
  """A source over K/V that are already dense (the block's own keys and values).

  k, v: [B, S_total, N, H] in the compute dtype; S_total a multiple of ``chunk_tokens``.
  """
  b, s, n, h = k.shape
  if s % chunk_tokens:
    raise ValueError(f'{s} tokens are not a multiple of chunk_tokens={chunk_tokens}')
  r = s // chunk_tokens
  shape = (1, b, r, chunk_tokens, n, h)
  fmt = F.Dense(k.dtype)
  # 16-bit floats as their raw bits, the Dense storage layout (a bitcast: no copy).
  return Source(k={'x': to_storage(k, k.dtype).reshape(shape)},
                v={'x': to_storage(v, v.dtype).reshape(shape)}, layer=jnp.int32(0),
                index=jnp.arange(r, dtype=jnp.int32), num_chunks=jnp.int32(r), kfmt=fmt,
                vfmt=fmt, chunk_tokens=chunk_tokens)


def frame_at(a: jax.Array, layer, rec) -> jax.Array:
  """a [L, B, R, ...] -> [B, 1, ...] at (layer, :, rec)."""
  start = (layer, 0, rec) + (0,) * (a.ndim - 3)
  size = (1, a.shape[1], 1) + a.shape[3:]
  return jax.lax.dynamic_slice(a, start, size)[0]


def record_at(fields: dict, layer, rec) -> dict:
  """fields [L, B, R, ...] -> the record at (layer, :, rec) with its frame axis: [B, 1, ...]."""
  return {name: frame_at(a, layer, rec) for name, a in fields.items()}


def _pool_record(src: Source, off) -> tuple[dict, dict]:
  """The k and v records serialized at byte offset ``off`` of a byte-pool source."""
  data = src.k['pool']
  b = data.shape[1]
  size = src.pool_record_bytes
  raw = jax.lax.dynamic_slice(data, (src.layer, 0, off), (1, b, size))[0]
  rec = {'k': {}, 'v': {}}
  for tensor, name, shape, dt, o, nb in src.pool:
    part = raw[:, o:o + nb]
    if dt.itemsize > 1:
      part = jax.lax.bitcast_convert_type(part.reshape(b, nb // dt.itemsize, dt.itemsize), dt)
    rec[tensor][name] = part.reshape((b, 1) + tuple(shape))
  return rec['k'], rec['v']


def read_records(src: Source, j) -> tuple[dict, dict]:
  """The k and v records of chunk j ([B, 1, ...] fields), shared fields included."""
  rec = src.index[j]
  if src.pool is not None:
    return _pool_record(src, rec)
  k, v = record_at(src.k, src.layer, rec), record_at(src.v, src.layer, rec)
  if src.shared_index is not None:
    shared = src.shared_index[j]
    k = {**k, **record_at(src.k_shared or {}, src.layer, shared)}
    v = {**v, **record_at(src.v_shared or {}, src.layer, shared)}
  return k, v


def chunk_bias(src: Source, j, batch: int) -> jax.Array:
  """[B, S] float32 logit bias of chunk j."""
  s = src.chunk_tokens
  if src.bias is None:
    return jnp.zeros((batch, s), f32)
  row = jax.lax.dynamic_slice(src.bias, (src.layer, src.index[j], 0), (1, 1, s))[0]
  return jnp.broadcast_to(row.astype(f32), (batch, s))


def read_chunk(src: Source, j, dtype):
  """Chunk j decoded: k, v [B, S, N, H] in ``dtype`` (in the source's basis), bias [B, S]."""
  kr, vr = read_records(src, j)
  k = src.kfmt.decode(kr, dtype)[:, 0]
  v = src.vfmt.decode(vr, dtype)[:, 0]
  if src.rope is not None:    # the model's rotation (float32, result in the key's dtype)
    k = src.rope.rotate_frame(k, src.positions[j])
  return k, v, chunk_bias(src, j, k.shape[0])
