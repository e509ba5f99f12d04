"""QVG (Quant VideoGen, arXiv 2602.02958): the first method beyond the study.

A *span* of ``span_frames`` frames is encoded once, per (layer, K or V, batch, head), when its
last frame arrives, and never re-encoded:

1. Smoothing (k-means): ``centroids`` = K centroids over the span's token vectors (all H
   channels), ``iters`` = T Lloyd iterations from K rows drawn uniformly with replacement
   (seeded here; the official draw is unseeded). Assignment is argmin of
   ||x||^2 + ||c||^2 - 2 x.c (float32, clamped at 0, ties to the lowest index); the update is the
   float32 mean cast to the input dtype, an empty cluster keeps its centroid; from the second
   iteration on, if fewer than 1e-4 of the labels changed, the pre-update centroids are returned.
   With T = 2 that gives labels assigned against C1 and centroids C2 = the means of those labels.
   The residual R = X - C[labels] is kept in the input dtype.
2. ``stages`` = S repeats of step 1 on the residual (1 in the official Self-Forcing run; 4 is
   QVG-Pro).
3. The final residual is quantized symmetrically per (token, head, 64-channel group):
   scale = E4M3(max(amax / q_max, 1e-10)) (saturated at 448; fp16 scales at 65504),
   q = clamp(round half away(r / scale), +-q_max), stored u = q + q_max (INT2 uses only
   {0, 1, 2}). A scale that rounds to 0
   (amax < ~2^-10 q_max) stores u = q_max, so the group decodes to exactly 0, which is what the
   official kernel's division by zero ends in, without the NaN.

Storage (``kernels.formats.QVG``): per frame the cluster ids, packed codes and scales; per span
the centroid tables (a shared record: attention reads chunk = one frame plus its span's table).
Frames of a span that is not complete stay exact in a BF16 *tail* (as the official run keeps
the blocks since the last encode in BF16). With ``span_frames`` <= a block, every block is
encoded when appended and there is no tail.

Eviction (kvjax's extension; the official run never evicts): completed spans live in a ring of
span slots. When the window covers the whole rollout nothing is evicted and the ring holds
``capacity // span`` spans; under a sliding window the ring holds ``(capacity - tail) // span``
spans, so the spans plus a full tail never exceed the window, and the oldest span leaves whole.
Sink frames must be whole spans (pinned span slots).

Keys (``rope``): 'pre' (the official Self-Forcing path) clusters keys *before* RoPE; the model
appends un-rotated keys (``pre_rope_keys``) and the sources carry each chunk's absolute frame so
that the reader rotates the decoded keys. 'post' stores rotated keys like every other method.

Default span: one block (3 frames). The official 24-frame span (8 blocks) needs a window of at
least 45 history frames besides the rollout's own block (a span plus its 21-frame tail), more
than kvjax's 21-frame window gives; ``span_frames=24`` reproduces it where the window allows
(``--plan`` at 1.3B with 180 frames: 6.97x over the packed spans).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import kernels
from kvjax.cache.base import AppendInfo, CacheMethod, CacheSpec, ordered_after, tree_nbytes
from kvjax.cache.codecs import Codec, Dense
from kvjax.cache.registry import variant
from kvjax.cache.ring import ring_frame, ring_slot, write_record
from kvjax.kernels import formats as F
from kvjax.kernels import packing
from kvjax.numerics import from_storage, storage_dtype, to_storage

f32 = jnp.float32
EARLY_EXIT_FRACTION = 1e-4
MIN_SCALE = 1e-10
ROPE_MODES = ('pre', 'post')


# ---------------------------------------------------------------- k-means (one batch x head)
def _assign(xf: jax.Array, c: jax.Array) -> jax.Array:
  """Labels of xf [M, H] float32 against centroids c [K, H]: argmin of the clamped distance."""
  cf = c.astype(f32)
  cross = jnp.dot(xf, cf.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=f32)
  d = jnp.sum(xf * xf, axis=1)[:, None] + jnp.sum(cf * cf, axis=1)[None, :] - 2.0 * cross
  return jnp.argmin(jnp.maximum(d, 0.0), axis=1).astype(jnp.int32)


def _update(xf: jax.Array, labels: jax.Array, c: jax.Array) -> jax.Array:
  """Cluster means (float32 sums, cast to c's dtype); an empty cluster keeps its centroid."""
  k = c.shape[0]
  sums = jax.ops.segment_sum(xf, labels, num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones_like(labels, f32), labels, num_segments=k)
  means = (sums / jnp.maximum(counts, 1.0)[:, None]).astype(c.dtype)
  return jnp.where(counts[:, None] > 0, means, c)


def kmeans(x: jax.Array, k: int, iters: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """QVG's k-means of one (batch, head): x [M, H] -> (centroids [K, H] in x's dtype, labels [M]).

  Module docstring, step 1. ``iters`` >= 1 Lloyd iterations, unrolled (T = 2 by default).
  """
  xf = x.astype(f32)
  c = x[jax.random.randint(key, (k,), 0, x.shape[0])]
  labels = prev = None
  done = jnp.bool_(False)
  for t in range(iters):
    a = _assign(xf, c)
    stop = done
    if t >= 1:
      stop = done | (jnp.mean((a != prev).astype(f32)) < EARLY_EXIT_FRACTION)
    labels = a if labels is None else jnp.where(done, labels, a)
    c = jnp.where(stop, c, _update(xf, a, c))
    done, prev = stop, a
  return c, labels


def residual_quantize(r: jax.Array, fmt: F.QVG) -> dict[str, jax.Array]:
  """Step 3 on r [..., H] (any float dtype): {'codes': packed uint8, 'scale': stored scale bits}."""
  qmax = float(fmt.qmax)
  rf = r.astype(f32)
  g = rf.reshape(*rf.shape[:-1], rf.shape[-1] // fmt.group, fmt.group)
  amax = jnp.max(jnp.abs(g), axis=-1)
  raw = jnp.maximum(amax / qmax, MIN_SCALE)
  if fmt.scale_dtype == 'float8_e4m3fn':
    stored = jnp.minimum(raw, F.E4M3_MAX).astype(jnp.float8_e4m3fn)    # saturate, never NaN
    bits = jax.lax.bitcast_convert_type(stored, jnp.uint8)
  else:
    stored = jnp.minimum(raw, float(jnp.finfo(jnp.float16).max)).astype(jnp.float16)
    bits = to_storage(stored, jnp.float16)
  scale = stored.astype(f32)[..., None]
  y = g / jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.sign(y) * jnp.floor(jnp.abs(y) + 0.5), -qmax, qmax)
  q = jnp.where(scale > 0, q, 0.0)
  u = (q + qmax).astype(jnp.uint8).reshape(r.shape)
  return {'codes': packing.pack(u, fmt.bits), 'scale': bits}


@dataclasses.dataclass(frozen=True)
class QVGCodec(F.QVG, Codec):
  """Encodes one span: x [B, F, P, N, H] -> (per-frame record, shared record) (module docstring).

  ``iters``: k-means iterations; the PRNG key comes in ``aux['key']``.
  """
  iters: int = 2                          # T (the method's ``iters`` passes its own)

  def encode_span(self, x: jax.Array, key: jax.Array) -> tuple[dict, dict]:
    b, nf, p, n, h = x.shape
    if jnp.dtype(x.dtype) != self.centroid_dtype:
      raise ValueError(f'QVG codec for {self.centroid_dtype.name} values got {x.dtype}')
    r = x.reshape(b, nf * p, n, h).transpose(0, 2, 1, 3)              # [B, N, M, H]
    km = jax.vmap(jax.vmap(lambda xs, kk: kmeans(xs, self.centroids, self.iters, kk)))
    ids, cents = [], []
    for s in range(self.stages):
      keys = jax.random.split(jax.random.fold_in(key, s), b * n)
      keys = keys.reshape((b, n) + keys.shape[1:])            # typed or raw uint32 keys
      c, a = km(r, keys)                                               # [B,N,K,H], [B,N,M]
      picked = jnp.take_along_axis(c, a[..., None], axis=2)            # [B, N, M, H]
      r = (r.astype(f32) - picked.astype(f32)).astype(x.dtype)
      ids.append(a.astype(jnp.uint8))
      cents.append(c)
    rec = residual_quantize(r.transpose(0, 2, 1, 3).reshape(b, nf, p, n, h), self)
    rec['ids'] = jnp.stack(ids, -1).transpose(0, 2, 1, 3).reshape(b, nf, p, n, self.stages)
    shared = {'centroids': to_storage(jnp.stack(cents, 1)[:, None], self.centroid_dtype)}
    return rec, shared

  def encode(self, x, aux=None):
    """Record of x as one span, shared fields included (tests and single-span use)."""
    if aux is None or 'key' not in aux:
      raise ValueError('QVG codec needs aux["key"] (the k-means PRNG key)')
    rec, shared = self.encode_span(x, aux['key'])
    return {**rec, **shared}


# ---------------------------------------------------------------- the cache method
@struct.dataclass
class QVGState:
  """k, v: per-frame record fields [L, B, Ns * span, ...]; kc, vc: centroid tables
  [L, B, Ns, S, N, K, H] (raw bits); tail_k, tail_v: [L, B, tail, P, N, H] exact frames of the
  incomplete span (raw bits); frames: [L] int32 frames appended."""
  k: dict
  v: dict
  kc: dict
  vc: dict
  tail_k: jax.Array
  tail_v: jax.Array
  frames: jax.Array
  spec: CacheSpec = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class Geometry:
  span: int          # frames per span
  tail: int          # exact frames staged until their span completes
  spans: int         # span slots of the ring
  sink_spans: int    # pinned span slots


@dataclasses.dataclass(frozen=True)
class QVG(CacheMethod):
  """QVG k-means smoothing + residual quantization over spans (module docstring)."""
  family = 'QVG'
  in_study = False
  beyond_study = True
  bits: int = F.QVG.bits
  centroids: int = F.QVG.centroids
  stages: int = F.QVG.stages
  iters: int = 2
  group: int = F.QVG.group
  scale_dtype: str = F.QVG.scale_dtype
  span_frames: int = 3
  rope: str = 'pre'
  seed: int = 0

  def __post_init__(self):
    self.codec(jnp.bfloat16)
    if not isinstance(self.iters, int) or self.iters < 1:
      raise ValueError(f'QVG iters={self.iters!r} must be an integer >= 1')
    if self.rope not in ROPE_MODES:
      raise ValueError(f'QVG rope={self.rope!r}; valid: {list(ROPE_MODES)}')
    if not isinstance(self.span_frames, int) or self.span_frames < 1:
      raise ValueError(f'QVG span_frames={self.span_frames!r} must be an integer >= 1')

  def codec(self, dtype, head_dim: int | None = None) -> QVGCodec:
    """The codec; a channel group wider than ``head_dim`` is the whole head (tiny models)."""
    group = self.group if head_dim is None else min(self.group, head_dim)
    return QVGCodec(self.bits, self.centroids, self.stages, group, self.scale_dtype, dtype,
                    iters=self.iters)

  @property
  def pre_rope_keys(self) -> bool:
    return self.rope == 'pre'

  # ------------------------------------------------------------------ geometry
  def geometry(self, spec: CacheSpec) -> Geometry:
    sp, bf = self.span_frames, spec.block_frames
    if sp % bf and bf % sp:
      raise ValueError(f'{self.name}: span_frames={sp} must be a multiple of the block '
                       f'({bf} frames) or divide it; valid e.g. 1, {bf}, {8 * bf}')
    tail = max(sp - bf, 0)
    cap = spec.capacity_frames
    no_eviction = spec.total_frames and spec.window_frames >= spec.total_frames
    spans = (min(cap, spec.total_frames - bf) // sp if no_eviction else (cap - tail) // sp)
    if spans < 1:
      need = (f'{sp} (one span)' if no_eviction or not tail
              else f'{sp + tail} (one span plus its {tail}-frame BF16 tail)')
      raise ValueError(
          f'{self.name}: span_frames={sp} does not fit: the cache holds {cap} history frames and '
          f'needs {need}; use a smaller span_frames (e.g. {bf}) or a larger window')
    if spec.sink_frames % sp:
      raise ValueError(f'{self.name}: sink_frames={spec.sink_frames} must be whole spans of '
                       f'{sp} frames')
    sink_spans = spec.sink_frames // sp
    if sink_spans and sink_spans >= spans:
      raise ValueError(f'{self.name}: sink_frames={spec.sink_frames} leaves no rolling span '
                       f'slot ({spans} spans of {sp} frames)')
    if self.pre_rope_keys:
      grid = spec.require_rope(self.name)
      if spec.total_frames > grid.max_pos:
        raise ValueError(f'{self.name}: rope=pre reads frames up to {spec.total_frames}, beyond '
                         f'the RoPE table ({grid.max_pos} positions)')
    return Geometry(sp, tail, spans, sink_spans)

  def init(self, spec: CacheSpec) -> QVGState:
    g = self.geometry(spec)
    c = self.codec(spec.dtype, spec.head_dim)
    b, l, p, n, h = spec.batch, spec.num_layers, spec.frame_tokens, spec.num_heads, spec.head_dim
    frames = g.spans * g.span

    def zeros(fields, slots):
      return {name: jnp.zeros((l,) + s.shape[:1] + (slots,) + s.shape[2:], s.dtype)
              for name, s in fields.items()}

    rec, shared = c.fields(b, 1, p, n, h), c.shared_fields(b, n, h)
    tail = jnp.zeros((l, b, g.tail, p, n, h), storage_dtype(spec.dtype))
    return QVGState(k=zeros(rec, frames), v=zeros(rec, frames), kc=zeros(shared, g.spans),
                    vc=zeros(shared, g.spans), tail_k=tail, tail_v=tail,
                    frames=jnp.zeros((l,), jnp.int32), spec=spec)

  # ------------------------------------------------------------------ write
  def _encode(self, state: QVGState, layer, xk, xv, span_index) -> QVGState:
    """Encodes the span ``span_index`` (xk, xv: [B, span, P, N, H]) into its ring slot."""
    spec, g = state.spec, self.geometry(state.spec)
    c = self.codec(spec.dtype, spec.head_dim)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), layer), span_index)
    slot = ring_slot(span_index, g.spans, g.sink_spans)
    out = {}
    for name, x, rec_f, sh_f in (('k', xk, state.k, state.kc), ('v', xv, state.v, state.vc)):
      rec, shared = c.encode_span(x.astype(spec.dtype),
                                  jax.random.fold_in(key, int(name == 'v')))
      rec_f = write_record(rec_f, layer, slot * g.span, rec)       # the span's frames at once
      out[name] = (rec_f, write_record(sh_f, layer, slot, shared))
    return state.replace(k=out['k'][0], kc=out['k'][1], v=out['v'][0], vc=out['v'][1])

  def append(self, state: QVGState, layer, k, v, info: AppendInfo) -> QVGState:
    spec = state.spec
    g = self.geometry(spec)
    bf, p = spec.block_frames, spec.frame_tokens
    s = info.start_frame
    b, _, n, h = k.shape
    xk, xv = k.reshape(b, bf, p, n, h), v.reshape(b, bf, p, n, h)
    if g.span <= bf:
      for i in range(bf // g.span):
        part = slice(i * g.span, (i + 1) * g.span)
        state = self._encode(state, layer, xk[:, part], xv[:, part], (s + i * g.span) // g.span)
    else:
      # The packed stores change only when the block completes its span (a cond over them
      # alone). Otherwise the block is staged in the tail at its offset, by a scatter whose
      # indices point past the tail (dropped) when the span completed, so a repeated context
      # pass of the same block re-encodes the span from the same staged frames. The indices
      # depend on the cond's output so that XLA orders the write after the cond's read of the
      # staged frames (else it copies the whole tail: 6 GB at 1.3B with 24-frame spans).
      offset = s % g.span
      complete = offset + bf == g.span

      def staged(tail):
        return from_storage(tail[layer], spec.dtype)                 # [B, tail, P, N, H]

      def encode(st):
        tk = jnp.concatenate([staged(st.tail_k), xk.astype(spec.dtype)], axis=1)
        tv = jnp.concatenate([staged(st.tail_v), xv.astype(spec.dtype)], axis=1)
        return self._encode(st, layer, tk, tv, s // g.span)

      packed = jax.lax.cond(complete, encode, lambda st: st, state)
      token = packed.k['scale'][layer, 0, 0, 0, 0, 0].astype(f32)
      first = ordered_after(jnp.where(complete, g.tail, offset), token)
      rows = first + jnp.arange(bf, dtype=jnp.int32)

      def stage(tail, x):
        return tail.at[layer, :, rows].set(jnp.moveaxis(to_storage(x, spec.dtype), 1, 0),
                                           mode='drop')
      state = packed.replace(tail_k=stage(state.tail_k, xk), tail_v=stage(state.tail_v, xv))
    return state.replace(frames=state.frames.at[layer].set(s + bf))

  # ------------------------------------------------------------------ read
  def sources(self, state: QVGState, layer):
    spec = state.spec
    g = self.geometry(spec)
    written = state.frames[layer]
    done = written // g.span
    rope = spec.rope if self.pre_rope_keys else None
    fmt = self.codec(spec.dtype, spec.head_dim)
    layer = jnp.asarray(layer, jnp.int32)
    slots = jnp.arange(g.spans * g.span, dtype=jnp.int32)
    span_slot = slots // g.span
    positions = None
    if rope is not None:
      held = ring_frame(span_slot, done, g.spans, g.sink_spans)       # the span in each slot
      positions = held * g.span + slots % g.span
    out = [kernels.Source(
        k=state.k, v=state.v, layer=layer, index=slots,
        num_chunks=jnp.minimum(done, g.spans) * g.span, k_shared=state.kc, v_shared=state.vc,
        shared_index=span_slot, positions=positions, kfmt=fmt, vfmt=fmt,
        chunk_tokens=spec.frame_tokens, rope=rope)]
    if g.tail:
      tail = jnp.arange(g.tail, dtype=jnp.int32)
      dense = Dense(spec.dtype)
      out.append(kernels.Source(
          k={'x': state.tail_k}, v={'x': state.tail_v}, layer=layer, index=tail,
          num_chunks=written - done * g.span,
          positions=None if rope is None else done * g.span + tail, kfmt=dense, vfmt=dense,
          chunk_tokens=spec.frame_tokens, rope=rope))
    return out

  # ------------------------------------------------------------------ accounting
  def slot_counts(self, spec: CacheSpec) -> tuple[int, ...]:
    g = self.geometry(spec)
    return (g.spans * g.span,) + ((g.tail,) if g.tail else ())

  def storage(self, state: QVGState) -> dict[str, Any]:
    """Packed spans vs BF16 of the same frames (the spec's 6.97x), and the exact tail."""
    spec = state.spec
    g = self.geometry(spec)
    packed = tree_nbytes((state.k, state.v, state.kc, state.vc))
    frames = g.spans * g.span
    bf16 = (2 * spec.num_layers * spec.batch * frames
            * F.Dense(jnp.bfloat16).record_bytes(spec.frame_tokens, spec.num_heads, spec.head_dim))
    fmt = self.codec(spec.dtype, spec.head_dim)
    per_span = (g.span * fmt.record_bytes(spec.frame_tokens, spec.num_heads, spec.head_dim)
                + fmt.shared_bytes(spec.num_heads, spec.head_dim))
    return dict(span_frames=g.span, span_slots=g.spans, sink_spans=g.sink_spans,
                packed_frames=frames, packed_bytes=packed, packed_bf16_bytes=bf16,
                packed_ratio=bf16 / packed, bytes_per_span_per_tensor_per_layer=per_span,
                tail_frames=g.tail, tail_bytes=tree_nbytes((state.tail_k, state.tail_v)))


variant(QVG, 'QVG_INT2', ('qvg_int2', 'qvg2', 'qvg'),
        'beyond the study: k-means smoothing (256 centroids, 2 iterations) + INT2 residual, FP8 '
        'scales, per span (default one block), pre-RoPE keys', bits=2)
variant(QVG, 'QVG_INT4', ('qvg_int4', 'qvg4'),
        'beyond the study: as QVG_INT2 with an INT4 residual', bits=4)
