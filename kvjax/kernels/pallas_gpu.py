"""Fused Pallas (Triton backend) flash attention over one cache ``Source``.

``source_attention(q, src, scale)`` computes exactly what ``reference.walk`` computes, but in one
kernel that reads the packed records where they lie and dequantizes them in registers: the
decoded cache is never materialized, not even a chunk of it. One kernel serves every storage
format the methods use (``unsupported`` lists what it refuses); the format is a static parameter.

Kernel layout:
  grid = (B * N, ceil(T / block_q)). A program owns query rows [i*block_q, (i+1)*block_q) of
  one (batch, head); it walks chunks j < num_chunks (``lax.fori_loop``, trip count read from an
  input), reads the record index ``index[j]``, and walks the chunk's S tokens in key tiles of
  block_k tokens with an online softmax (float32 m, l, acc). Ragged ends (tokens >= S, queries
  >= T) are masked loads / stores (or clamped addresses whose rows are then masked), never
  silently clamped reads.

Pre-RoPE keys (``src.rope``, QVG's default): each decoded key slice is rotated in registers to
its chunk's frame before the QK dot (``_Rotation``), as the model rotates keys (float32, rounded
to the compute dtype). Shared records (QVG's per-span centroid tables) are passed whole and
addressed with ``shared_index[j]``.

Reading and dequantizing records in registers: ``pallas_decode.py``; which sources the kernel
takes (static read plans, validation, ``unsupported``): ``pallas_plan.py``.

Dots: bf16 / f16 operands with f32 accumulation; float32 queries use ``Precision.HIGHEST`` (IEEE
on Triton, not TF32: correct but without tensor cores) so the kernel matches the float32 reference.
Agreement with ``reference.walk``: per-row relative error ~1e-6 with float32 queries. With
bfloat16 queries the probabilities are rounded to bfloat16 before the P.V dot, relative to the
running max after each *key tile* (the reference: after each whole chunk); when a chunk is one key
tile the results agree to ~1e-6, when it spans several (S > block_k) they differ by up to about
one bfloat16 rounding of the dominant probabilities (observed 1.4e-3 .. 2.5e-3).
Scalars are clamped as the reference's jnp indexing clamps them (layer, index[j], j < M; a pool
record offset to [0, bytes - record bytes], as ``dynamic_slice`` does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvjax.kernels.pallas_decode import Outliers, Reader, Tile, decode
from kvjax.kernels.pallas_plan import (DENSE_DTYPES, MIN_BLOCK, Plan, is_pow2, next_pow2, plans,
                                       slice_width, unsupported)
from kvjax.kernels.source import Source

f32 = jnp.float32
NEG_INF = float('-inf')
Q_DTYPES = DENSE_DTYPES

# Defaults measured on an H100 (jax 0.11.2, 2026-11-26; BUILD.md "Attention kernels"): at
# Self-Forcing shapes (4,680 queries, 18 frames of 1,560 keys, 12 x 128, bf16), 128 x 32 tiles
# with 4 warps and 3 pipeline stages beat the earlier 128 x 64 / 8 warps / 2 stages on every typed
# format (bf16 4.78 -> 3.40 ms, INT4 6.94 -> 4.84, INT2 7.50 -> 5.41, PRQ_INT4 9.11 -> 8.83). QVG
# sources (shared centroid tables) are faster with 2 stages (3 stages: 17.6 -> 32 ms pre-RoPE;
# 64-key tiles with 3 stages do not compile). Byte-pool and outlier sources were not timed at 3
# stages and keep 2.
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 32
DEFAULT_NUM_STAGES = 3
SAFE_NUM_STAGES = 2     # QVG, byte pools, exact outliers

__all__ = ['source_attention', 'unsupported']


# ---------------------------------------------------------------- the kernel
class _Rotation:
  """RoPE of a decoded pre-RoPE key tile to its chunk's frame (``rope.RopeGrid``), in registers.

  Channel pairs (2i, 2i+1) rotate together; their partner (-x[2i+1], x[2i]) is a dot with a
  constant signed permutation (exact: one nonzero term per element), and the angle of channel
  c of token t in chunk j comes from the split tables (``RopeGrid.channel_tables``) by the
  angle-sum products, which are exactly the model's table values. Computed in float32 and
  rounded to the compute dtype, as the model rotates keys.
  """

  def __init__(self, refs, jj, tile: Tile, dtype, precision):
    self.t_cos, self.t_sin, self.s_cos, self.s_sin = refs
    self.jj, self.tile, self.dtype, self.precision = jj, tile, dtype, precision

  def __call__(self, k, c0: int, w: int):
    t = self.tile
    r = lax.broadcasted_iota(jnp.int32, (w, w), 0)
    c = lax.broadcasted_iota(jnp.int32, (w, w), 1)
    even = (r % 2) == 0
    perm = jnp.where(even & (c == r + 1), 1.0, jnp.where(~even & (c == r - 1), -1.0, 0.0))
    partner = jnp.dot(k, perm.astype(k.dtype), precision=self.precision,
                      preferred_element_type=f32)
    tc = self.t_cos[self.jj, pl.ds(c0, w)][None, :]
    ts = self.t_sin[self.jj, pl.ds(c0, w)][None, :]
    mask = jnp.broadcast_to(t.valid[:, None], (t.bk, w))
    sc = plgpu.load(self.s_cos.at[pl.ds(t.t0, t.bk), pl.ds(c0, w)], mask=mask, other=1.0)
    ss = plgpu.load(self.s_sin.at[pl.ds(t.t0, t.bk), pl.ds(c0, w)], mask=mask, other=0.0)
    cos = tc * sc - ts * ss
    sin = ts * sc + tc * ss
    return (k.astype(f32) * cos + partner * sin).astype(self.dtype)


def _kernel(*refs, kplan, vplan, knames, vnames, has_bias, pool_max_offset, shared, has_rope,
            scale, n_heads, h, t_len, s_len, n_layers, n_records, n_shared, max_chunks, block_q,
            block_k, wk, wv, precision):
  q_ref, layer_ref, index_ref, nc_ref = refs[:4]
  pos = 4
  bias_ref = pool_ref = None
  if has_bias:
    bias_ref = refs[pos]
    pos += 1
  if pool_max_offset is not None:
    pool_ref = refs[pos]
    pos += 1
  krefs = dict(zip(knames, refs[pos:pos + len(knames)]))
  pos += len(knames)
  vrefs = dict(zip(vnames, refs[pos:pos + len(vnames)]))
  pos += len(vnames)
  kout = vout = None
  if kplan.outliers:
    kout, pos = refs[pos:pos + 3], pos + 3
  if vplan.outliers:
    vout, pos = refs[pos:pos + 3], pos + 3
  sidx_ref, kshared, vshared = None, {}, {}
  if shared:
    sidx_ref = refs[pos]
    pos += 1
    for tensor in shared:
      (kshared if tensor == 'k' else vshared)['centroids'] = refs[pos]
      pos += 1
  rope_refs = None
  if has_rope:
    rope_refs, pos = refs[pos:pos + 4], pos + 4
  o_ref, lse_ref = refs[pos], refs[pos + 1]

  bn = pl.program_id(0)
  qi = pl.program_id(1)
  b = bn // n_heads
  n = bn % n_heads
  q0 = qi * block_q
  q_rows = q0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  q_valid = q_rows < t_len
  dtype = q_ref.dtype
  nks, nvs = h // wk, h // wv

  q_mask = jnp.broadcast_to(q_valid[:, None], (block_q, wk))
  qs = tuple(plgpu.load(q_ref.at[b, pl.ds(q0, block_q), n, pl.ds(i * wk, wk)], mask=q_mask,
                        other=0) for i in range(nks))
  # Scalars clamped as the reference's jnp indexing / dynamic_slice clamp them (so a bad index
  # never turns into an out-of-bounds pointer).
  layer = jnp.clip(layer_ref[0], 0, n_layers - 1)
  num_chunks = nc_ref[0]
  n_tiles = -(-s_len // block_k)

  def tile_step(jj, rec, srec, kt, carry):
    m, l, accs = carry
    tile = Tile(layer, b, rec, n, kt * block_k, block_k, s_len, srec)
    krd = Reader(krefs, pool_ref, kplan, tile, kshared)
    vrd = Reader(vrefs, pool_ref, vplan, tile, vshared)
    rot = _Rotation(rope_refs, jj, tile, dtype, precision) if rope_refs is not None else None
    kpatch = vpatch = None
    if kout is not None:
      kpatch = Outliers(kout, jj, b, n, kt, n_tiles, n_heads, h, tile)
    if vout is not None:
      vpatch = Outliers(vout, jj, b, n, kt, n_tiles, n_heads, h, tile)
    s = None
    kmemo, vmemo = {}, {}
    for i in range(nks):
      k_i = decode(krd, i * wk, wk, h, dtype, kmemo)
      if kpatch is not None:
        k_i = kpatch.patch(k_i, i * wk, wk)
      if rot is not None:
        k_i = rot(k_i, i * wk, wk)
      d = lax.dot_general(qs[i], k_i, (((1,), (1,)), ((), ())), precision=precision,
                          preferred_element_type=f32)
      s = d if s is None else s + d
    s = s * scale
    if bias_ref is not None:
      bias = plgpu.load(bias_ref.at[layer, rec, pl.ds(tile.t0, block_k)], mask=tile.valid,
                        other=0.0)
      s = s + bias[None, :]
    s = jnp.where(tile.valid[None, :], s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    corr = jnp.exp(m - m_safe)
    l = l * corr + jnp.sum(p, axis=1)
    p = p.astype(dtype)
    new_accs = []
    for i in range(nvs):
      v_i = decode(vrd, i * wv, wv, h, dtype, vmemo)
      if vpatch is not None:
        v_i = vpatch.patch(v_i, i * wv, wv)
      pv = jnp.dot(p, v_i, precision=precision, preferred_element_type=f32)
      new_accs.append(accs[i] * corr[:, None] + pv)
    return m_new, l, tuple(new_accs)

  def chunk_step(j, carry):
    jj = jnp.minimum(j, max_chunks - 1)
    raw = index_ref[jj]
    # the record (or its byte offset in the pool), clamped as dynamic_slice clamps it
    rec = (jnp.clip(raw, 0, pool_max_offset) if pool_max_offset is not None
           else jnp.clip(raw, 0, n_records - 1))
    srec = jnp.clip(sidx_ref[jj], 0, n_shared - 1) if sidx_ref is not None else None
    if n_tiles == 1:
      return tile_step(jj, rec, srec, 0, carry)
    return lax.fori_loop(0, n_tiles, lambda kt, c: tile_step(jj, rec, srec, kt, c), carry)

  carry = (jnp.full((block_q,), NEG_INF, f32), jnp.zeros((block_q,), f32),
           tuple(jnp.zeros((block_q, wv), f32) for _ in range(nvs)))
  m, l, accs = lax.fori_loop(0, num_chunks, chunk_step, carry)
  ok = l > 0.0
  inv = jnp.where(ok, 1.0 / jnp.where(ok, l, 1.0), 0.0)
  o_mask = jnp.broadcast_to(q_valid[:, None], (block_q, wv))
  for i in range(nvs):
    plgpu.store(o_ref.at[b, pl.ds(q0, block_q), n, pl.ds(i * wv, wv)], accs[i] * inv[:, None],
                mask=o_mask)
  lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)
  plgpu.store(lse_ref.at[b, n, pl.ds(q0, block_q)], lse, mask=q_valid)


# ---------------------------------------------------------------- outside the kernel (XLA)
def _outlier_fields(src: Source, tensor: str, plan: Plan):
  """out_idx [M, B, cap] int32 and out_val [M, B, cap] uint16 of every index entry's record
  (record / byte offset and layer clamped as the reference's reads clamp them)."""
  if src.pool is None:
    fields = src.k if tensor == 'k' else src.v
    oi, ov = fields['out_idx'], fields['out_val']                 # [L, B, R, cap]
    layer = jnp.clip(src.layer, 0, oi.shape[0] - 1)
    rec = jnp.clip(src.index, 0, oi.shape[2] - 1)                 # [M]
    return oi[layer, :, rec], ov[layer, :, rec]                   # [M, B, cap]
  data = src.k['pool']
  size = src.pool_record_bytes
  layer = jnp.clip(src.layer, 0, data.shape[0] - 1)
  off = jnp.clip(src.index, 0, data.shape[2] - size)              # [M]
  out = []
  for name in ('out_idx', 'out_val'):
    _, (cap,), dt, fo = plan.field(name)
    nb = cap * dt.itemsize
    raw = jax.vmap(lambda o: lax.dynamic_slice(
        data, (layer, 0, o + fo), (1, data.shape[1], nb))[0])(off)          # [M, B, nb]
    out.append(lax.bitcast_convert_type(raw.reshape(raw.shape[:2] + (cap, dt.itemsize)), dt))
  return out[0], out[1]


def _outlier_tables(src: Source, tensor: str, plan: Plan, n_heads: int, h: int, block_k: int):
  """The outliers of every walked chunk ordered by (head, key tile) for the kernel.

  Returns idx [M, B, cap] int32 (flat index (t * N + n) * H + c within the frame), val
  [M, B, cap] float16, and bounds [M, B, N * n_tiles + 1] int32: the outliers of head n, key
  tile kt of chunk j are entries bounds[j, :, n * n_tiles + kt] .. bounds[.., + 1] - 1. Unused
  slots (any index outside [0, P*N*H)) sort last, past bounds[.., -1]. O(cap log cap) integer
  work per record; the cache values are never touched.
  """
  oi, ov = _outlier_fields(src, tensor, plan)
  s = src.chunk_tokens
  n_tiles = -(-s // block_k)
  n_slots = n_heads * n_tiles
  used = (oi >= 0) & (oi < s * n_heads * h)
  t = oi // (n_heads * h)
  head = (oi // h) % n_heads
  slot = jnp.where(used, head * n_tiles + t // block_k, n_slots)
  order = jnp.argsort(slot, axis=-1, stable=True)
  idx = jnp.take_along_axis(oi, order, axis=-1)
  val = lax.bitcast_convert_type(jnp.take_along_axis(ov, order, axis=-1), jnp.float16)
  m, b, _ = oi.shape
  counts = jnp.zeros((m, b, n_slots + 1), jnp.int32)
  counts = counts.at[jnp.arange(m)[:, None, None], jnp.arange(b)[None, :, None], slot].add(1)
  bounds = jnp.cumsum(counts, axis=-1) - counts                   # exclusive: entries before slot
  return idx, val, bounds


def _block(requested: int | None, default: int, extent: int, what: str) -> int:
  if requested is not None:
    if not is_pow2(requested) or requested < MIN_BLOCK:
      raise ValueError(f'{what}={requested} must be a power of two >= {MIN_BLOCK}')
    return requested
  return max(MIN_BLOCK, min(default, next_pow2(extent)))


def source_attention(q: jax.Array, src: Source, scale: float, *, interpret: bool = False,
                     block_q: int | None = None, block_k: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None):
  """``reference.walk`` as one fused Pallas Triton kernel.

  Args:
    q: [B, T, N, H] queries (float32 / bfloat16 / float16), already rotated if the source is.
    src: a source ``unsupported(src)`` accepts (typed records or a byte pool, any format
      listed there, with or without exact outliers). scale: logit scale (static float).
    interpret: run the kernel in the Pallas interpreter (the only mode on CPU).
    block_q, block_k: powers of two >= 16 (default 128 / 32, clamped to the problem size).
    num_warps, num_stages: Triton launch parameters (default 8 for tiles of >= 128x64, else 4;
      3 stages, 2 for QVG, byte-pool and outlier sources).
  Returns:
    out [B, T, N, H] float32 (zeros where nothing was attended), lse [B, N, T] float32 (-inf).
  """
  reason = unsupported(src)
  if reason:
    raise ValueError(f'pallas_gpu.source_attention cannot read this source: {reason}')
  if jnp.dtype(q.dtype) not in Q_DTYPES:
    raise ValueError(f'query dtype {q.dtype} not supported; valid: {[d.name for d in Q_DTYPES]}')
  _, _, nh, lead = plans(src)
  if q.ndim != 4 or (q.shape[0],) + tuple(q.shape[2:]) != (lead[1],) + nh:
    raise ValueError(f'q {q.shape} does not match the source (B={lead[1]}, N, H={nh})')
  return _source_attention(q, src, scale=float(scale), interpret=bool(interpret),
                           block_q=block_q, block_k=block_k, num_warps=num_warps,
                           num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=('scale', 'interpret', 'block_q', 'block_k',
                                             'num_warps', 'num_stages'))
def _source_attention(q, src, *, scale, interpret, block_q, block_k, num_warps, num_stages):
  """The pallas_call (jitted so a repeated eager call reuses the compiled kernel)."""
  bsz, t_len, n_heads, h = q.shape
  kplan, vplan, _, lead = plans(src)
  s_len = src.chunk_tokens
  bq = _block(block_q, DEFAULT_BLOCK_Q, t_len, 'block_q')
  bk = _block(block_k, DEFAULT_BLOCK_K, s_len, 'block_k')
  wk, wv = slice_width(kplan.stages, h), slice_width(vplan.stages, h)
  precision = lax.Precision.HIGHEST if jnp.dtype(q.dtype) == jnp.dtype(f32) else None

  inputs = [q, src.layer.astype(jnp.int32).reshape(1), src.index.astype(jnp.int32),
            src.num_chunks.astype(jnp.int32).reshape(1)]
  if src.bias is not None:
    inputs.append(src.bias)
  if src.pool is not None:
    knames, vnames = (), ()
    record_bytes = src.pool_record_bytes
    pool_max_offset = int(lead[2]) - record_bytes
    inputs.append(src.k['pool'])
  else:
    knames, vnames = tuple(sorted(src.k)), tuple(sorted(src.v))
    pool_max_offset = None
    inputs += [src.k[k] for k in knames] + [src.v[k] for k in vnames]
  for tensor, plan in (('k', kplan), ('v', vplan)):
    if plan.outliers:
      inputs += list(_outlier_tables(src, tensor, plan, n_heads, h, bk))
  shared = tuple(t for t, f in (('k', src.k_shared), ('v', src.v_shared)) if f)
  n_shared = 1
  if shared:
    inputs.append(src.shared_index.astype(jnp.int32))
    for t in shared:
      table = (src.k_shared if t == 'k' else src.v_shared)['centroids']
      inputs.append(table)
      n_shared = int(table.shape[2])
  if src.rope is not None:
    inputs += list(src.rope.channel_tables(src.positions))

  kernel = functools.partial(
      _kernel, kplan=kplan, vplan=vplan, knames=knames, vnames=vnames,
      has_bias=src.bias is not None, pool_max_offset=pool_max_offset, shared=shared,
      has_rope=src.rope is not None, scale=float(scale), n_heads=n_heads, h=h, t_len=t_len,
      s_len=s_len, n_layers=int(lead[0]), n_records=int(lead[2]), n_shared=n_shared,
      max_chunks=int(src.index.shape[0]), block_q=bq, block_k=bk,
      wk=wk, wv=wv, precision=precision)
  out_shape = (jax.ShapeDtypeStruct((bsz, t_len, n_heads, h), f32),
               jax.ShapeDtypeStruct((bsz, n_heads, t_len), f32))
  grid = (bsz * n_heads, pl.cdiv(t_len, bq))
  if num_warps is None:
    num_warps = 8 if bq * bk >= 128 * 64 else 4
  if num_stages is None:
    plain = src.pool is None and not shared and not (kplan.outliers or vplan.outliers)
    num_stages = DEFAULT_NUM_STAGES if plain else SAFE_NUM_STAGES
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  out, lse = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=interpret,
                            compiler_params=params, name='kvjax_source_attention')(*inputs)
  return out, lse
