"""In-kernel reads and dequantization of the fused kernel (``pallas_gpu.py``).

QVG records: the tile's cluster ids ([bk, 1] gather loads per stage) index the span's centroid
table (a shared record [L, B, R2, S, N, K, H], chunk j's at ``shared_index[j]``): each channel
slice is one [bk, w] gather load of centroid rows (a table is 64 KiB per head at K=256, H=128,
L2-resident while its span is walked), plus the residual codes and their per-(token, 64-channel)
scales, E4M3 bits decoded with integer ops.

Where record fields are read from (``Reader``):
  * typed arrays: every source array is passed whole ([L, B, R, ...]) and addressed inside the
    kernel with the dynamic scalars (layer, b, record, n): the Triton lowering turns an indexed
    ref into pointer arithmetic, so no BlockSpec or wrapper-side copy is needed.
  * byte pool (``src.pool``, the mixed-format log): the pool [L, B, bytes] is passed whole and
    chunk j's record starts at byte ``index[j]``. Field f (static byte offset o_f within the
    record, logical shape, dtype) element e is read at byte index[j] + o_f + e * itemsize by
    integer-array (gather) loads of the pool ref; a 2- or 4-byte field (fp16 bits, int32) is
    assembled from its little-endian bytes with shifts and ors and bitcast. The reader returns
    the same stored-dtype tiles as the typed path, so the dequantization code is shared. Cost on
    a GPU (estimate): one byte load per packed-code byte, as the typed path (contiguous along
    the row, so still coalesced), and 2 byte loads instead of one 16-bit load per fp16 scale /
    zero-point element (per 64x128 tile 16K byte gathers of a few KiB of cache-resident
    scales). Addresses are int32 within one (layer, batch) row of the pool.

Dequantization (``formats.py`` arithmetic, mirrored op for op):
  * packed codes: byte j of a row holds channels j, j + H/k, ... (``packing.py``), so channel
    slice [c0, c0 + W) of one bit field is the byte slice [c0 % (H/k), ...) shifted right by
    (c0 // (H/k)) * bits. Keys are decoded one channel slice at a time and the scores are the sum
    of the slices' dots; the query is loaded slice by slice (ref slices on the channel axis) and
    the output accumulator is kept as one value per value-slice, stored slice by slice. No
    in-kernel concatenate, reshape or static value slice.
  * grouped scales / zero-points ([.., nG, N, H]): token t uses group min(t // G, nG - 1). The
    kernel loads them with an integer-array (gather) index: rows ``min(tok // G, nG - 1)`` and
    columns ``c0 + iota(W)``, which the Triton lowering turns into a pointer tensor; any G works.
  * per-token scales (AsymToken) and the bias are [block_k] masked row loads.
  * ``dequant_dtype='bfloat16'`` rounds with float32 -> bfloat16 -> float32 round trips exactly
    where ``formats.dequant_math`` rounds.
  * exact outliers (``WithOutliers``): the decoded channel slice of a key / value tile is patched
    in registers, its listed elements REPLACED by their exact fp16 values. Outside the kernel
    (XLA, ``pallas_gpu._outlier_tables``: small integer arrays only, never the cache values) the outliers of
    every walked chunk's record are sorted by (head, key tile) and the start of each (head, tile)
    run is tabulated, [M, B, N * n_tiles + 1]. Per key tile the kernel loops (dynamic trip count)
    over only that run, 16 outliers per step: with one-hot rows R [block_k, 16] (token match) and
    columns C [16, W] (channel match) in fp16, hit = R @ C and val = R @ (C * v) (fp16 operands,
    float32 accumulation: exact, one nonzero term per element) and the tile becomes
    where(hit, val, tile). Unused slots (any index outside [0, P*N*H); the codec writes P*N*H)
    and ``dropped`` are never read; a record's indices are distinct (as the codec writes them).
    Cost estimate at Wan shapes (P=1560, N=12, H=128, cap=4793 a frame, 64-token key tiles (the
    default is 32 since it was measured: half the outliers per tile);
    not measured, no GPU here): 4793 / (12 heads x 25 tiles) = ~16 outliers per (head, tile) on
    average, so typically one step per tensor and tile: two [64,16]x[16,128] fp16 dots (0.26M
    MACs, vs 2M for the tile's QK and PV dots), ~5K compares and one [64,128] select (vs
    roughly 50K elementwise ops of decoding the tile). A tile with u outliers costs
    ceil(u / 16) steps, a tile with none two scalar loads. Outside the kernel: a sort of cap
    int32 keys per walked record.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvjax.kernels import formats as F
from kvjax.kernels.pallas_plan import Plan, Stage

f32 = jnp.float32
U8, U16, U32 = (jnp.dtype(d) for d in (jnp.uint8, jnp.uint16, jnp.uint32))
OUTLIER_STEP = 16       # outliers patched per loop step (the K of the one-hot dots)


# ---------------------------------------------------------------- in-kernel field reads
def _dm(y, dequant: str):
  """``formats.dequant_math``: float32 value rounded as ``dequant`` arithmetic would give."""
  if dequant == 'bfloat16':
    return y.astype(jnp.bfloat16).astype(f32)
  return y


def _f16_bits(x):
  return lax.bitcast_convert_type(x, jnp.float16).astype(f32)


class Tile:
  """Static geometry of one key tile plus the dynamic addressing scalars (``rec``: the record
  of typed arrays, or the record's byte offset in a pool; ``srec``: the shared record)."""

  def __init__(self, layer, b, rec, n, t0, block_k, s, srec=None):
    self.layer, self.b, self.rec, self.n, self.t0, self.srec = layer, b, rec, n, t0, srec
    self.bk, self.s = block_k, s
    self.tok = t0 + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    self.valid = self.tok < s


def _pool_load(pool_ref, layer, b, addr, dtype):
  """Elements of ``dtype`` whose little-endian bytes start at byte ``addr`` (int32 array) of
  pool row (layer, b): one gather load per byte, assembled with shifts and ors, bitcast."""
  dtype = jnp.dtype(dtype)
  if dtype.itemsize == 1:
    x = pool_ref[layer, b, addr]
    return x if dtype == U8 else lax.bitcast_convert_type(x, dtype)
  word = {2: U16, 4: U32}[dtype.itemsize]
  acc = None
  for i in range(dtype.itemsize):
    byte = pool_ref[layer, b, addr + i].astype(word)
    if i:
      byte = lax.shift_left(byte, jnp.full(byte.shape, 8 * i, word))
    acc = byte if acc is None else acc | byte
  return acc if dtype == word else lax.bitcast_convert_type(acc, dtype)


class Reader:
  """Reads one tensor's record fields for a key tile, returning stored-dtype tiles: from typed
  arrays ``refs[name]`` [L, B, R, ...] or from the byte pool ``pool_ref`` [L, B, bytes]."""

  def __init__(self, refs: dict, pool_ref, plan: Plan, tile: Tile, shared: dict | None = None):
    self.refs, self.pool_ref, self.plan, self.tile = refs, pool_ref, plan, tile
    self.shared = shared or {}

  def _pool(self, name, elem):
    _, shape, dt, off = self.plan.field(name)
    t = self.tile
    return _pool_load(self.pool_ref, t.layer, t.b, t.rec + off + elem * dt.itemsize, dt)

  def tokens(self, name: str, c0: int, w: int):
    """[.., S, N, W] field -> [block_k, w]: columns [c0, c0 + w) of head n; 0 on rows >= S."""
    t = self.tile
    mask = jnp.broadcast_to(t.valid[:, None], (t.bk, w))
    if self.pool_ref is None:
      ref = self.refs[name]
      return plgpu.load(ref.at[t.layer, t.b, t.rec, pl.ds(t.t0, t.bk), t.n, pl.ds(c0, w)],
                        mask=mask, other=0)
    _, shape, _, _ = self.plan.field(name)
    n_heads, width = shape[1], shape[2]
    tok = jnp.minimum(t.tok, t.s - 1)[:, None]                      # in-record address
    cols = (c0 + lax.broadcasted_iota(jnp.int32, (w,), 0))[None, :]
    x = self._pool(name, (tok * n_heads + t.n) * width + cols)
    return jnp.where(mask, x, jnp.zeros_like(x))

  def grid(self, name: str, grp, cols):
    """[.., rows, N, cols] field (grouped scales [.., nG, N, H]; QVG's per-token fields) at rows
    ``grp`` [block_k, 1], columns ``cols`` [1, w] (or one column) of head n."""
    t = self.tile
    if self.pool_ref is None:
      return self.refs[name][t.layer, t.b, t.rec, grp, t.n, cols]
    _, shape, _, _ = self.plan.field(name)
    return self._pool(name, (grp * shape[1] + t.n) * shape[2] + cols)

  def row(self, name: str):
    """[.., S] field -> [block_k] (0 on rows >= S)."""
    t = self.tile
    if self.pool_ref is None:
      return plgpu.load(self.refs[name].at[t.layer, t.b, t.rec, pl.ds(t.t0, t.bk)],
                        mask=t.valid, other=0)
    x = self._pool(name, jnp.minimum(t.tok, t.s - 1))
    return jnp.where(t.valid, x, jnp.zeros_like(x))


# ---------------------------------------------------------------- in-kernel decoding
def _decode_qvg(rd: Reader, st: Stage, codes, c0: int, w: int, memo: dict):
  """QVG: sum of the tile's centroid rows (gathered from the span's shared tables) plus
  (u - q_max) * scale, float32, rounded to the centroids' dtype (``formats.QVG.decode``)."""
  t = rd.tile
  if 'qvg_rows' not in memo:
    memo['qvg_rows'] = jnp.minimum(t.tok, t.s - 1)[:, None]              # [bk, 1] valid rows
  rows = memo['qvg_rows']
  cols = (c0 + lax.broadcasted_iota(jnp.int32, (w,), 0))[None, :]       # [1, w]
  sbits = rd.grid('scale', rows, cols // st.group)                     # [bk, w]
  scale = F.e4m3_decode(sbits) if st.fp8_scale else _f16_bits(sbits)
  resid = (codes.astype(f32) - float(2 ** (st.bits - 1) - 1)) * scale
  total = None
  cent = rd.shared['centroids']
  for i in range(st.cent_stages):
    key = ('qvg_ids', i)
    if key not in memo:
      memo[key] = rd.grid('ids', rows, i).astype(jnp.int32)              # [bk, 1]
    c = cent[t.layer, t.b, t.srec, i, t.n, memo[key], cols]                # [bk, w]
    c = (lax.bitcast_convert_type(c, st.dtype) if c.dtype != st.dtype else c).astype(f32)
    total = c if total is None else total + c
  return (total + resid).astype(st.dtype).astype(f32)


def _decode_stage(rd: Reader, st: Stage, c0: int, w: int, h: int, memo: dict):
  """Channels [c0, c0 + w) of the tile's tokens: [block_k, w], dense dtype or float32.

  ``memo`` holds the tile's loads already made (the k bit fields of a byte slice share one load;
  the channel slices of a stage share the group-row indices)."""
  tile = rd.tile
  if st.kind == 'dense':
    x = rd.tokens(st.prefix + 'x', c0, w)
    if x.dtype != st.dtype:
      x = lax.bitcast_convert_type(x, st.dtype)
    return x
  k = st.per_byte
  width = h // k                       # channels per bit field (= packed bytes per row)
  field, byte0 = divmod(c0, width)
  key = (st.prefix + 'codes', byte0, w)
  if key not in memo:
    memo[key] = rd.tokens(st.prefix + 'codes', byte0, w)
  codes = memo[key]
  if k > 1:
    if field:
      codes = lax.shift_right_logical(codes, jnp.full(codes.shape, field * st.bits, jnp.uint8))
    codes = codes & jnp.full(codes.shape, (1 << st.bits) - 1, jnp.uint8)
  if st.kind == 'qvg':
    return _decode_qvg(rd, st, codes, c0, w, memo)
  c = codes.astype(f32)
  if st.kind == 'token':
    def row(name):
      if (st.prefix + name) not in memo:
        memo[st.prefix + name] = _f16_bits(rd.row(st.prefix + name))[:, None]
      return memo[st.prefix + name]
    scale, zp = row('scale'), row('zp')
  else:
    ng = F.num_groups(tile.s, st.group)
    if ('group', st.group) not in memo:
      memo[('group', st.group)] = jnp.minimum(tile.tok // st.group, ng - 1)[:, None]   # [bk, 1]
    grp = memo[('group', st.group)]
    cols = (c0 + lax.broadcasted_iota(jnp.int32, (w,), 0))[None, :]      # [1, w]
    scale = _f16_bits(rd.grid(st.prefix + 'scale', grp, cols))           # [bk, w]
    zp = _f16_bits(rd.grid(st.prefix + 'zp', grp, cols)) if st.kind == 'asym' else None
  if st.kind == 'sym':
    q = c - float(2 ** (st.bits - 1))
    return _dm(q * _dm(scale, st.dequant), st.dequant)
  d = _dm(c - _dm(zp, st.dequant), st.dequant)
  return _dm(d * _dm(scale, st.dequant), st.dequant)


def decode(rd: Reader, c0, w, h, dtype, memo):
  """Decoded channels [c0, c0 + w) in the compute dtype (stages summed in float32)."""
  stages = rd.plan.stages
  if len(stages) == 1:
    return _decode_stage(rd, stages[0], c0, w, h, memo).astype(dtype)
  y = None
  for st in stages:
    part = _decode_stage(rd, st, c0, w, h, memo).astype(f32)
    y = part if y is None else y + part
  return y.astype(dtype)


class Outliers:
  """One tensor's outlier tables (``_outlier_tables``) for the chunk and tile being decoded."""

  def __init__(self, refs, jj, b, n, kt, n_tiles, n_heads, h, tile):
    self.idx_ref, self.val_ref, bnd_ref = refs
    slot = n * n_tiles + kt
    self.start = bnd_ref[jj, b, slot]
    self.end = bnd_ref[jj, b, slot + 1]
    self.jj, self.b, self.nh, self.h, self.tile = jj, b, n_heads * h, h, tile

  def patch(self, x, c0: int, w: int):
    """x [block_k, w] (channels [c0, c0 + w)) with this (head, tile)'s outliers replaced."""
    cap = self.idx_ref.shape[-1]
    rows = self.tile.tok[:, None]                                         # [bk, 1]
    cols = (c0 + lax.broadcasted_iota(jnp.int32, (w,), 0))[None, :]       # [1, w]
    lane = lax.broadcasted_iota(jnp.int32, (OUTLIER_STEP,), 0)

    def step(i, x):
      u = self.start + i * OUTLIER_STEP + lane
      ok = u < self.end
      uc = jnp.minimum(u, cap - 1)
      e = self.idx_ref[self.jj, self.b, uc]                               # [16] flat index
      val = self.val_ref[self.jj, self.b, uc]                             # [16] float16
      t = jnp.where(ok, e // self.nh, -1)                                 # token (-1: no slot)
      c = e % self.h                                                      # channel
      r = (rows == t[None, :]).astype(jnp.float16)                        # [bk, 16]
      cm = c[:, None] == cols                                             # [16, w]
      cv = jnp.where(cm, val[:, None], jnp.zeros_like(val)[:, None])
      hit = jnp.dot(r, cm.astype(jnp.float16), preferred_element_type=f32)
      new = jnp.dot(r, cv, preferred_element_type=f32)
      return jnp.where(hit > 0.5, new.astype(x.dtype), x)

    steps = (self.end - self.start + OUTLIER_STEP - 1) // OUTLIER_STEP
    return lax.fori_loop(0, steps, step, x)
