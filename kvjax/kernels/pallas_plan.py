"""Static read plans of the fused kernel: which record fields a source's formats need, their
validation against the arrays, and ``unsupported`` (why the kernel cannot read a source)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from kvjax.kernels import formats as F
from kvjax.kernels.source import Source

f32 = jnp.float32
U8, U16, I32 = (jnp.dtype(d) for d in (jnp.uint8, jnp.uint16, jnp.int32))
DENSE_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
OUTLIER_FIELDS = ('out_idx', 'out_val', 'dropped')
MIN_BLOCK = 16          # tl.dot needs M, N, K >= 16


# ---------------------------------------------------------------- static decode plans
@dataclasses.dataclass(frozen=True)
class Stage:
  """One term of a decoded tensor: 'dense', 'sym' (SymGroup), 'asym' (AsymGroup), 'token'
  (AsymToken), 'qvg' (QVG: centroid gathers plus a residual with per-(token, channel group)
  scales; ``group`` is then the channel group). ``prefix`` selects the record fields (Residual:
  'base_' / 'res_')."""
  kind: str
  prefix: str = ''
  bits: int = 8
  group: int = 1
  dequant: str = 'float32'
  dtype: jnp.dtype | None = None      # dense: the value dtype; qvg: the centroids' dtype
  cent_stages: int = 0                # qvg: centroid tables summed
  centroids: int = 0                  # qvg: entries per table
  fp8_scale: bool = False             # qvg: E4M3 scale bits (else fp16 bits)

  @property
  def per_byte(self) -> int:
    return 1 if self.kind == 'dense' else 8 // self.bits


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one tensor (keys or values) is read: its stages (summed in float32 when several),
  whether exact outliers replace decoded elements, and for a byte-pool source the record layout
  of its fields: ((name, shape without [B, F], dtype, byte offset within the record), ...)."""
  stages: tuple[Stage, ...]
  outliers: bool = False
  layout: tuple | None = None

  def field(self, name):
    for entry in self.layout:
      if entry[0] == name:
        return entry
    raise KeyError(name)


def _stages(fmt: F.Format) -> tuple[Stage, ...] | str:
  """The stages of a format without outliers, or why the kernel can't read it."""
  if isinstance(fmt, F.Rotated):
    return _stages(fmt.inner)
  if isinstance(fmt, F.WithOutliers):
    return 'nested outlier format WithOutliers(WithOutliers)'
  if isinstance(fmt, F.Split):
    return 'split format Split (read as two sources)'
  if isinstance(fmt, F.Residual):
    s1, s2 = fmt.stages
    return (Stage('sym', 'base_', s1.bits, s1.group, s1.dequant_dtype),
            Stage('sym', 'res_', s2.bits, s2.group, s2.dequant_dtype))
  if isinstance(fmt, F.SymGroup):
    return (Stage('sym', '', fmt.bits, fmt.group, fmt.dequant_dtype),)
  if isinstance(fmt, F.AsymGroup):
    return (Stage('asym', '', fmt.bits, fmt.group, fmt.dequant_dtype),)
  if isinstance(fmt, F.AsymToken):
    return (Stage('token', '', fmt.bits, 1, fmt.dequant_dtype),)
  if isinstance(fmt, F.QVG):
    if fmt.centroid_dtype not in DENSE_DTYPES:
      return f'QVG centroid dtype {fmt.centroid_dtype.name}'
    return (Stage('qvg', '', fmt.bits, fmt.group, dtype=fmt.centroid_dtype,
                  cent_stages=fmt.stages, centroids=fmt.centroids,
                  fp8_scale=fmt.scale_dtype == 'float8_e4m3fn'),)
  if isinstance(fmt, F.Dense):
    dt = jnp.dtype(fmt.dtype)
    if dt not in DENSE_DTYPES:
      return f'dense dtype {dt.name}'
    return (Stage('dense', '', dtype=dt),)
  return f'format {type(fmt).__name__}'


def _plan(fmt: F.Format) -> Plan | str:
  """The plan of a format (layout not filled in), or why the kernel can't read it."""
  if isinstance(fmt, F.Rotated):
    return _plan(fmt.inner)
  outliers = isinstance(fmt, F.WithOutliers)
  st = _stages(fmt.inner if outliers else fmt)
  return st if isinstance(st, str) else Plan(st, outliers)


def slice_width(stages: tuple[Stage, ...], h: int) -> int:
  """Channel slice width that every stage's packing layout can serve without concatenation."""
  return h // max(s.per_byte for s in stages)


def _field_names(plan: Plan) -> list[str]:
  names = []
  for s in plan.stages:
    if s.kind == 'dense':
      names.append(s.prefix + 'x')
    elif s.kind == 'qvg':
      names += ['ids', 'codes', 'scale']
    else:
      names += [s.prefix + 'codes', s.prefix + 'scale']
      if s.kind in ('asym', 'token'):
        names.append(s.prefix + 'zp')
  return names + (list(OUTLIER_FIELDS) if plan.outliers else [])


def is_pow2(x: int) -> bool:
  return x >= 1 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _check_fields(fields: dict, plan: Plan, s: int, n: int, h: int) -> str | None:
  """fields: name -> (shape without the leading axes, dtype), named as the plan's fields.
  Checks their shapes and dtypes."""
  want = {}
  for st in plan.stages:
    if st.kind == 'dense':
      stored = U16 if st.dtype.itemsize == 2 else st.dtype
      want[st.prefix + 'x'] = ((s, n, h), stored)
    elif st.kind == 'qvg':
      if h % st.group:
        return f'QVG channel group {st.group} does not divide head_dim {h}'
      want['ids'] = ((s, n, st.cent_stages), U8)
      want['codes'] = ((s, n, h // st.per_byte), U8)
      want['scale'] = ((s, n, h // st.group), U8 if st.fp8_scale else U16)
    else:
      want[st.prefix + 'codes'] = ((s, n, h // st.per_byte), U8)
      if st.kind == 'token':
        want[st.prefix + 'scale'] = want[st.prefix + 'zp'] = ((s,), U16)
      else:
        want[st.prefix + 'scale'] = ((F.num_groups(s, st.group), n, h), U16)
        if st.kind == 'asym':
          want[st.prefix + 'zp'] = want[st.prefix + 'scale']
  if plan.outliers:
    cap = fields['out_idx'][0]
    if len(cap) != 1 or cap[0] < 1:
      return f'out_idx of shape {list(cap)} is not [.., cap >= 1]'
    want.update(out_idx=(cap, I32), out_val=(cap, U16), dropped=((), I32))
  for name, (shape, dt) in want.items():
    got_shape, got_dt = fields[name]
    if tuple(got_shape) != tuple(shape) or jnp.dtype(got_dt) != dt:
      return (f'field {name} is {jnp.dtype(got_dt).name}{list(got_shape)}, '
              f'expected {dt.name}{list(shape)}')
  return None


def _heads(kplan: Plan, kf: dict, vplan: Plan, vf: dict) -> tuple[int, int] | None:
  """(N, H) of the source: from a field that keeps all H channels, else from AsymToken codes."""
  for plan, fields in ((kplan, kf), (vplan, vf)):
    for stage in plan.stages:
      name = {'dense': 'x', 'sym': 'scale', 'asym': 'scale', 'token': 'codes',
              'qvg': 'codes'}[stage.kind]
      shape = fields.get(stage.prefix + name, ((),))[0]
      if len(shape) == 3:
        w = int(shape[2]) * (stage.per_byte if stage.kind in ('token', 'qvg') else 1)
        return int(shape[1]), w
  return None


def _pool_layout(src: Source) -> tuple[dict, dict, int] | str:
  """Byte-pool source: per tensor {name: (shape, dtype, byte offset)} and the record's bytes."""
  if set(src.k) != {'pool'} or src.v:
    return "a byte-pool source holds k={'pool': ...} and v={}"
  data = src.k['pool']
  if data.ndim != 3 or jnp.dtype(data.dtype) != U8:
    return f'pool {jnp.dtype(data.dtype).name}{list(data.shape)} is not uint8 [L, B, bytes]'
  out = {'k': {}, 'v': {}}
  try:
    size = src.pool_record_bytes
    for tensor, name, shape, dt, off, nb in src.pool:
      dt, shape = jnp.dtype(dt), tuple(int(x) for x in shape)
      if tensor not in out or name in out[tensor]:
        return f'pool entry {tensor}/{name} is not one field of k or v'
      if nb != int(np.prod(shape)) * dt.itemsize or off < 0 or off + nb > size:
        return f'pool field {tensor}/{name} (offset {off}, {nb} bytes) does not fit its record'
      out[tensor][name] = (shape, dt, int(off))
  except (TypeError, ValueError):
    return 'pool layout is not ((tensor, name, shape, dtype, offset, nbytes), ...)'
  if size > data.shape[2]:
    return f'pool of {data.shape[2]} bytes is smaller than one {size}-byte record'
  return out['k'], out['v'], size


def _source_fields(src: Source) -> tuple[dict, dict, tuple] | str:
  """Per tensor {name: (shape without leading axes, dtype)} and the leading axes: (L, B, R) of
  typed record arrays, (L, B, bytes) of a pool."""
  if src.pool is not None:
    lay = _pool_layout(src)
    if isinstance(lay, str):
      return lay
    kf, vf, _ = lay
    strip = lambda d: {k: (shape, dt) for k, (shape, dt, _) in d.items()}
    return strip(kf), strip(vf), tuple(src.k['pool'].shape)
  first = next(iter(src.k.values()), None)
  if first is None or first.ndim < 4:
    return 'record arrays without [L, B, R, S, N, ...] axes'
  lead = tuple(first.shape[:3])
  out = []
  for fields in (src.k, src.v):
    d = {}
    for name, a in fields.items():
      if a.ndim < 3 or tuple(a.shape[:3]) != lead:
        return f'field {name} {list(a.shape)} does not share the leading axes {list(lead)}'
      d[name] = (tuple(a.shape[3:]), jnp.dtype(a.dtype))
    out.append(d)
  return out[0], out[1], lead


def _check_shared(src: Source, kplan: Plan, vplan: Plan, lead, n: int, h: int) -> str | None:
  """QVG's shared centroid tables: {'centroids': [L, B, R2, stages, N, K, H]} per tensor."""
  for plan, shared, what in ((kplan, src.k_shared, 'keys'), (vplan, src.v_shared, 'values')):
    qvg = [st for st in plan.stages if st.kind == 'qvg']
    if not qvg:
      if shared:
        return f'{what}: shared record fields {sorted(shared)} for a format without them'
      continue
    st = qvg[0]
    if src.pool is not None:
      return f'{what}: QVG records in a byte pool'
    if not shared or set(shared) != {'centroids'}:
      return f'{what}: QVG needs shared fields {{"centroids"}}'
    c = shared['centroids']
    want = (lead[0], lead[1], None, st.cent_stages, n, st.centroids, h)
    stored = U16 if st.dtype.itemsize == 2 else st.dtype
    if (c.ndim != 7 or any(w is not None and int(g) != w for g, w in zip(c.shape, want))
        or jnp.dtype(c.dtype) != stored):
      return (f'{what}: centroids {jnp.dtype(c.dtype).name}{list(c.shape)} are not '
              f'{stored.name}[L, B, R2, {st.cent_stages}, {n}, {st.centroids}, {h}]')
  if (src.k_shared or src.v_shared) and (src.shared_index is None or src.shared_index.ndim != 1
                                         or src.shared_index.shape != src.index.shape):
    return 'shared_index is not an [M] array like index'
  return None


def _check_rope(src: Source, h: int) -> str | None:
  """Pre-RoPE keys: positions [M] and a grid of this head_dim (chunks are one frame)."""
  if src.rope is None:
    return None
  if src.pool is not None:
    return 'pre-RoPE keys in a byte pool'
  if src.rope.head_dim != h:
    return f'RoPE grid for head_dim {src.rope.head_dim}, source has {h}'
  if src.positions.ndim != 1 or src.positions.shape != src.index.shape:
    return 'positions is not an [M] array like index'
  return None


def plans(src: Source) -> tuple[Plan, Plan, tuple[int, int], tuple] | str:
  """(key plan, value plan, (N, H), leading axes) of a source, or why the kernel can't read it."""
  kplan, vplan = _plan(src.kfmt), _plan(src.vfmt)
  for p in (kplan, vplan):
    if isinstance(p, str):
      return p
  sf = _source_fields(src)
  if isinstance(sf, str):
    return sf
  kf, vf, lead = sf
  for plan, fields, what in ((kplan, kf, 'keys'), (vplan, vf, 'values')):
    if set(fields) != set(_field_names(plan)):
      return f'{what}: record fields {sorted(fields)} do not match the format'
  nh = _heads(kplan, kf, vplan, vf)
  if nh is None:
    return 'record arrays without [L, B, R, S, N, ...] axes'
  n, h = nh
  s = src.chunk_tokens
  if s < 1:
    return f'chunk of {s} tokens'
  if not is_pow2(h):
    return f'head_dim {h} not a power of two'
  for plan, fields, what in ((kplan, kf, 'keys'), (vplan, vf, 'values')):
    bad = _check_fields(fields, plan, s, n, h)
    if bad:
      return f'{what}: {bad}'
    w = slice_width(plan.stages, h)
    if w < MIN_BLOCK:
      return f'{what}: channel slice of {w} < {MIN_BLOCK} (head_dim {h} too small for the packing)'
  bad = _check_shared(src, kplan, vplan, lead, n, h) or _check_rope(src, h)
  if bad:
    return bad
  if src.pool is not None:
    kl, vl, _ = _pool_layout(src)
    kplan = dataclasses.replace(kplan, layout=tuple((k,) + e for k, e in sorted(kl.items())))
    vplan = dataclasses.replace(vplan, layout=tuple((k,) + e for k, e in sorted(vl.items())))
  return kplan, vplan, nh, lead


def unsupported(src: Source) -> str | None:
  """None if ``source_attention`` reads ``src``, else a one-line reason.

  Read: typed record arrays and byte-pool records of Dense (float32 / bfloat16 / float16),
  SymGroup, AsymGroup, AsymToken and Residual formats, each optionally Rotated and / or
  WithOutliers; typed QVG records with their shared centroid tables; pre-RoPE keys (typed
  records; the kernel rotates each decoded key tile to its chunk's frame). Refused: Split formats (the spatial methods read them as two sources), nested
  outliers, a logit bias on a byte-pool source, head_dim not a power of two, a packing whose
  channel slices are < 16 wide (INT2 at head_dim < 64, INT4 at head_dim < 32: too narrow for a
  Triton dot), and malformed arrays.
  """
  p = plans(src)
  if isinstance(p, str):
    return p
  lead, s = p[3], src.chunk_tokens
  if src.bias is not None:
    if src.pool is not None:
      return 'bias on a byte-pool source (its index holds byte offsets, not records)'
    if tuple(src.bias.shape) != (lead[0], lead[2], s) or jnp.dtype(src.bias.dtype) != f32:
      return f'bias {jnp.dtype(src.bias.dtype).name}{list(src.bias.shape)} is not float32 [L, R, S]'
  if src.index.ndim != 1 or src.index.shape[0] < 1:
    return 'index is not a non-empty [M] array'
  return None
