"""Fused Pallas (Triton backend) flash attention over one cache ``Source``.

``source_attention(q, src, scale)`` computes exactly what ``reference.walk`` computes, but in one
kernel that reads the packed records where they lie and dequantizes them in registers: the
decoded cache is never materialized, not even a chunk of it.

Kernel layout:
  grid = (B * N, ceil(T / block_q)). A program owns query rows [i*block_q, (i+1)*block_q) of
  one (batch, head); it walks chunks j < num_chunks (``lax.fori_loop``, trip count read from an
  input), reads the record index ``index[j]``, and walks the chunk's S tokens in key tiles of
  block_k tokens with an online softmax (float32 m, l, acc). Ragged ends (tokens >= S, queries
  >= T) are masked loads / stores, never clamped reads.
  Every source array is passed whole ([L, B, R, ...]) and addressed inside the kernel with the
  dynamic scalars (layer, b, record, n): the Triton lowering turns an indexed ref into pointer
  arithmetic, so no BlockSpec or wrapper-side copy is needed.

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
Dots: bf16 / f16 operands with f32 accumulation; float32 queries use ``Precision.HIGHEST`` (IEEE
on Triton, not TF32: correct but without tensor cores) so the kernel matches the float32 reference.
Agreement with ``reference.walk``: per-row relative error ~1e-6 with float32 queries. With
bfloat16 queries the probabilities are rounded to bfloat16 before the P.V dot, relative to the
running max after each *key tile* (the reference: after each whole chunk); when a chunk is one key
tile the results agree to ~1e-6, when it spans several (S > block_k) they differ by up to about
one bfloat16 rounding of the dominant probabilities (observed 1.4e-3 .. 2.5e-3).
Scalars are clamped as the reference's jnp indexing clamps them (layer, index[j], j < M).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvjax.kernels import formats as F
from kvjax.kernels.source import Source

f32 = jnp.float32
NEG_INF = float('-inf')
F16 = jnp.dtype(jnp.float16)
DENSE_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
Q_DTYPES = DENSE_DTYPES

# Defaults for H100 (head_dim 128, bf16 queries). A larger query block amortizes the in-register
# dequantization (done once per key tile and query block). With the pip triton 3.8 compiler for
# sm_90 (not the jaxlib-bundled one), H=128, 128x64 tiles and 8 warps use 240-251 registers, no
# spills, 74-115 KiB shared memory across the formats (Residual the largest), wgmma for the dots.
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 64
DEFAULT_NUM_STAGES = 2
MIN_BLOCK = 16          # tl.dot needs M, N, K >= 16


# ---------------------------------------------------------------- static decode plans
@dataclasses.dataclass(frozen=True)
class _Stage:
  """One term of a decoded tensor: 'dense', 'sym' (SymGroup), 'asym' (AsymGroup), 'token'
  (AsymToken). ``prefix`` selects the record fields (Residual: 'base_' / 'res_')."""
  kind: str
  prefix: str = ''
  bits: int = 8
  group: int = 1
  dequant: str = 'float32'
  dtype: jnp.dtype | None = None      # dense: the value dtype

  @property
  def per_byte(self) -> int:
    return 1 if self.kind == 'dense' else 8 // self.bits


def _stages(fmt: F.Format) -> tuple[_Stage, ...] | str:
  """The stages of a format (summed in float32 when several), or why the kernel can't read it."""
  if isinstance(fmt, F.Rotated):
    return _stages(fmt.inner)
  if isinstance(fmt, F.WithOutliers):
    return 'outlier format WithOutliers'
  if isinstance(fmt, F.Split):
    return 'split format Split (read as two sources)'
  if isinstance(fmt, F.Residual):
    s1, s2 = fmt.stages
    return (_Stage('sym', 'base_', s1.bits, s1.group, s1.dequant_dtype),
            _Stage('sym', 'res_', s2.bits, s2.group, s2.dequant_dtype))
  if isinstance(fmt, F.SymGroup):
    return (_Stage('sym', '', fmt.bits, fmt.group, fmt.dequant_dtype),)
  if isinstance(fmt, F.AsymGroup):
    return (_Stage('asym', '', fmt.bits, fmt.group, fmt.dequant_dtype),)
  if isinstance(fmt, F.AsymToken):
    return (_Stage('token', '', fmt.bits, 1, fmt.dequant_dtype),)
  if isinstance(fmt, F.Dense):
    dt = jnp.dtype(fmt.dtype)
    if dt not in DENSE_DTYPES:
      return f'dense dtype {dt.name}'
    return (_Stage('dense', '', dtype=dt),)
  return f'format {type(fmt).__name__}'


def _slice_width(stages: tuple[_Stage, ...], h: int) -> int:
  """Channel slice width that every stage's packing layout can serve without concatenation."""
  return h // max(s.per_byte for s in stages)


def _field_names(stages) -> list[str]:
  names = []
  for s in stages:
    if s.kind == 'dense':
      names.append(s.prefix + 'x')
    else:
      names += [s.prefix + 'codes', s.prefix + 'scale']
      if s.kind in ('asym', 'token'):
        names.append(s.prefix + 'zp')
  return names


def _is_pow2(x: int) -> bool:
  return x >= 1 and (x & (x - 1)) == 0


def _next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _check_fields(fields: dict, stages, lead: tuple, s: int, n: int, h: int) -> str | None:
  """lead = (L, B, R). Checks the record arrays against the stages' layouts."""
  if set(fields) != set(_field_names(stages)):
    return f'record fields {sorted(fields)} do not match the format'
  for st in stages:
    if st.kind == 'dense':
      stored = jnp.dtype(jnp.uint16) if st.dtype.itemsize == 2 else st.dtype
      want = {'x': (lead + (s, n, h), stored)}
    else:
      ng = F.num_groups(s, st.group)
      w = h // st.per_byte
      want = {'codes': (lead + (s, n, w), jnp.dtype(jnp.uint8))}
      if st.kind == 'token':
        want['scale'] = want['zp'] = (lead + (s,), jnp.dtype(jnp.uint16))
      else:
        want['scale'] = (lead + (ng, n, h), jnp.dtype(jnp.uint16))
        if st.kind == 'asym':
          want['zp'] = want['scale']
    for name, (shape, dt) in want.items():
      a = fields[st.prefix + name]
      if tuple(a.shape) != shape or jnp.dtype(a.dtype) != dt:
        return (f'field {st.prefix + name} is {jnp.dtype(a.dtype).name}{list(a.shape)}, '
                f'expected {dt.name}{list(shape)}')
  return None


def _heads(src: Source, kst, vst) -> tuple[int, int] | None:
  """(N, H) of the source: from a field that keeps all H channels, else from AsymToken codes."""
  for st, fields in ((kst, src.k), (vst, src.v)):
    for stage in st:
      name = {'dense': 'x', 'sym': 'scale', 'asym': 'scale', 'token': 'codes'}[stage.kind]
      a = fields.get(stage.prefix + name)
      if a is not None and a.ndim == 6:
        w = int(a.shape[5]) * (stage.per_byte if stage.kind == 'token' else 1)
        return int(a.shape[4]), w
  return None


def unsupported(src: Source) -> str | None:
  """None if ``source_attention`` reads ``src``, else a one-line reason."""
  if src.pool is not None:
    return 'byte-pool source'
  kst, vst = _stages(src.kfmt), _stages(src.vfmt)
  for st in (kst, vst):
    if isinstance(st, str):
      return st
  first = next(iter(src.k.values()), None)
  nh = _heads(src, kst, vst)
  if first is None or first.ndim < 4 or nh is None:
    return 'record arrays without [L, B, R, S, N, ...] axes'
  s = src.chunk_tokens
  if s < 1:
    return f'chunk of {s} tokens'
  lead = tuple(first.shape[:3])
  n, h = nh
  if not _is_pow2(h):
    return f'head_dim {h} not a power of two'
  for st, fields, what in ((kst, src.k, 'keys'), (vst, src.v, 'values')):
    bad = _check_fields(fields, st, lead, s, n, h)
    if bad:
      return f'{what}: {bad}'
    w = _slice_width(st, h)
    if w < MIN_BLOCK:
      return f'{what}: channel slice of {w} < {MIN_BLOCK} (head_dim {h} too small for the packing)'
  if src.bias is not None:
    if tuple(src.bias.shape) != (lead[0], lead[2], s) or jnp.dtype(src.bias.dtype) != f32:
      return f'bias {jnp.dtype(src.bias.dtype).name}{list(src.bias.shape)} is not float32 [L, R, S]'
  if src.index.ndim != 1 or src.index.shape[0] < 1:
    return 'index is not a non-empty [M] array'
  return None


# ---------------------------------------------------------------- in-kernel decoding
def _dm(y, dequant: str):
  """``formats.dequant_math``: float32 value rounded as ``dequant`` arithmetic would give."""
  if dequant == 'bfloat16':
    return y.astype(jnp.bfloat16).astype(f32)
  return y


def _f16_bits(x):
  return lax.bitcast_convert_type(x, jnp.float16).astype(f32)


class _Tile:
  """Static geometry of one key tile plus the dynamic addressing scalars."""

  def __init__(self, layer, b, rec, n, t0, block_k, s):
    self.layer, self.b, self.rec, self.n, self.t0 = layer, b, rec, n, t0
    self.bk, self.s = block_k, s
    self.tok = t0 + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    self.valid = self.tok < s


def _decode_stage(refs: dict, st: _Stage, tile: _Tile, c0: int, w: int, h: int, memo: dict):
  """Channels [c0, c0 + w) of the tile's tokens: [block_k, w], dense dtype or float32.

  ``memo`` holds the tile's loads already made (the k bit fields of a byte slice share one load;
  the channel slices of a stage share the group-row indices)."""
  bk = tile.bk
  row_mask = jnp.broadcast_to(tile.valid[:, None], (bk, w))
  if st.kind == 'dense':
    ref = refs[st.prefix + 'x']
    x = plgpu.load(ref.at[tile.layer, tile.b, tile.rec, pl.ds(tile.t0, bk), tile.n, pl.ds(c0, w)],
                   mask=row_mask, other=0)
    if x.dtype != st.dtype:
      x = lax.bitcast_convert_type(x, st.dtype)
    return x
  k = st.per_byte
  width = h // k                       # channels per bit field (= packed bytes per row)
  field, byte0 = divmod(c0, width)
  key = (st.prefix + 'codes', byte0, w)
  if key not in memo:
    memo[key] = plgpu.load(
        refs[st.prefix + 'codes'].at[tile.layer, tile.b, tile.rec, pl.ds(tile.t0, bk), tile.n,
                                     pl.ds(byte0, w)],
        mask=row_mask, other=0)
  codes = memo[key]
  if k > 1:
    if field:
      codes = lax.shift_right_logical(codes, jnp.full(codes.shape, field * st.bits, jnp.uint8))
    codes = codes & jnp.full(codes.shape, (1 << st.bits) - 1, jnp.uint8)
  c = codes.astype(f32)
  if st.kind == 'token':
    def row(name):
      if (st.prefix + name) not in memo:
        v = plgpu.load(refs[st.prefix + name].at[tile.layer, tile.b, tile.rec,
                                                 pl.ds(tile.t0, bk)], mask=tile.valid, other=0)
        memo[st.prefix + name] = _f16_bits(v)[:, None]
      return memo[st.prefix + name]
    scale, zp = row('scale'), row('zp')
  else:
    ng = F.num_groups(tile.s, st.group)
    if ('group', st.group) not in memo:
      memo[('group', st.group)] = jnp.minimum(tile.tok // st.group, ng - 1)[:, None]   # [bk, 1]
    grp = memo[('group', st.group)]
    cols = (c0 + lax.broadcasted_iota(jnp.int32, (w,), 0))[None, :]      # [1, w]

    def grid_field(name):
      ref = refs[st.prefix + name]
      return _f16_bits(ref[tile.layer, tile.b, tile.rec, grp, tile.n, cols])   # [bk, w]
    scale = grid_field('scale')
    zp = grid_field('zp') if st.kind == 'asym' else None
  if st.kind == 'sym':
    q = c - float(2 ** (st.bits - 1))
    return _dm(q * _dm(scale, st.dequant), st.dequant)
  d = _dm(c - _dm(zp, st.dequant), st.dequant)
  return _dm(d * _dm(scale, st.dequant), st.dequant)


def _decode(refs, stages, tile, c0, w, h, dtype, memo):
  """Decoded channels [c0, c0 + w) in the compute dtype (stages summed in float32)."""
  if len(stages) == 1:
    return _decode_stage(refs, stages[0], tile, c0, w, h, memo).astype(dtype)
  y = None
  for st in stages:
    part = _decode_stage(refs, st, tile, c0, w, h, memo).astype(f32)
    y = part if y is None else y + part
  return y.astype(dtype)


# ---------------------------------------------------------------- the kernel
def _kernel(*refs, kst, vst, knames, vnames, has_bias, scale, n_heads, h, t_len, s_len,
            n_layers, n_records, max_chunks, block_q, block_k, wk, wv, precision):
  q_ref, layer_ref, index_ref, nc_ref = refs[:4]
  pos = 4
  bias_ref = None
  if has_bias:
    bias_ref = refs[pos]
    pos += 1
  krefs = dict(zip(knames, refs[pos:pos + len(knames)]))
  pos += len(knames)
  vrefs = dict(zip(vnames, refs[pos:pos + len(vnames)]))
  pos += len(vnames)
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

  def tile_step(rec, kt, carry):
    m, l, accs = carry
    tile = _Tile(layer, b, rec, n, kt * block_k, block_k, s_len)
    s = None
    kmemo, vmemo = {}, {}
    for i in range(nks):
      k_i = _decode(krefs, kst, tile, i * wk, wk, h, dtype, kmemo)
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
      v_i = _decode(vrefs, vst, tile, i * wv, wv, h, dtype, vmemo)
      pv = jnp.dot(p, v_i, precision=precision, preferred_element_type=f32)
      new_accs.append(accs[i] * corr[:, None] + pv)
    return m_new, l, tuple(new_accs)

  def chunk_step(j, carry):
    rec = jnp.clip(index_ref[jnp.minimum(j, max_chunks - 1)], 0, n_records - 1)
    if n_tiles == 1:
      return tile_step(rec, 0, carry)
    return lax.fori_loop(0, n_tiles, lambda kt, c: tile_step(rec, kt, c), carry)

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


def _block(requested: int | None, default: int, extent: int, what: str) -> int:
  if requested is not None:
    if not _is_pow2(requested) or requested < MIN_BLOCK:
      raise ValueError(f'{what}={requested} must be a power of two >= {MIN_BLOCK}')
    return requested
  return max(MIN_BLOCK, min(default, _next_pow2(extent)))


def source_attention(q: jax.Array, src: Source, scale: float, *, interpret: bool = False,
                     block_q: int | None = None, block_k: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None):
  """``reference.walk`` as one fused Pallas Triton kernel.

  Args:
    q: [B, T, N, H] queries (float32 / bfloat16 / float16), already rotated if the source is.
    src: a source ``unsupported(src)`` accepts. scale: logit scale (static float).
    interpret: run the kernel in the Pallas interpreter (the only mode on CPU).
    block_q, block_k: powers of two >= 16 (default 128 / 64, clamped to the problem size).
    num_warps, num_stages: Triton launch parameters (default 8 for 128x64 tiles, else 4 / 2).
  Returns:
    out [B, T, N, H] float32 (zeros where nothing was attended), lse [B, N, T] float32 (-inf).
  """
  reason = unsupported(src)
  if reason:
    raise ValueError(f'pallas_gpu.source_attention cannot read this source: {reason}')
  if jnp.dtype(q.dtype) not in Q_DTYPES:
    raise ValueError(f'query dtype {q.dtype} not supported; valid: {[d.name for d in Q_DTYPES]}')
  nh = _heads(src, _stages(src.kfmt), _stages(src.vfmt))
  lead = next(iter(src.k.values())).shape
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
  kst, vst = _stages(src.kfmt), _stages(src.vfmt)
  s_len = src.chunk_tokens
  bq = _block(block_q, DEFAULT_BLOCK_Q, t_len, 'block_q')
  bk = _block(block_k, DEFAULT_BLOCK_K, s_len, 'block_k')
  wk, wv = _slice_width(kst, h), _slice_width(vst, h)
  precision = lax.Precision.HIGHEST if jnp.dtype(q.dtype) == jnp.dtype(f32) else None

  knames, vnames = sorted(src.k), sorted(src.v)
  lead = src.k[knames[0]]                   # [L, B, R, ...]
  inputs = [q, src.layer.astype(jnp.int32).reshape(1), src.index.astype(jnp.int32),
            src.num_chunks.astype(jnp.int32).reshape(1)]
  if src.bias is not None:
    inputs.append(src.bias)
  inputs += [src.k[k] for k in knames] + [src.v[k] for k in vnames]

  kernel = functools.partial(
      _kernel, kst=kst, vst=vst, knames=tuple(knames), vnames=tuple(vnames),
      has_bias=src.bias is not None, scale=float(scale), n_heads=n_heads, h=h, t_len=t_len,
      s_len=s_len, n_layers=int(lead.shape[0]), n_records=int(lead.shape[2]),
      max_chunks=int(src.index.shape[0]), block_q=bq, block_k=bk, wk=wk, wv=wv,
      precision=precision)
  out_shape = (jax.ShapeDtypeStruct((bsz, t_len, n_heads, h), f32),
               jax.ShapeDtypeStruct((bsz, n_heads, t_len), f32))
  grid = (bsz * n_heads, pl.cdiv(t_len, bq))
  if num_warps is None:
    num_warps = 8 if bq * bk >= 128 * 64 else 4
  params = plgpu.CompilerParams(num_warps=num_warps,
                                num_stages=num_stages or DEFAULT_NUM_STAGES)
  out, lse = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=interpret,
                            compiler_params=params, name='kvjax_source_attention')(*inputs)
  return out, lse
