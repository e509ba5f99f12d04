"""Frame-ring caches: every history frame stored once, in one codec, in a ring of frame slots.

This is the storage of BF16 and of every quantizer whose format does not depend on a frame's
age or content ranking (RTN, KIVI, QuaRot, PRQ, QAQ, spatial mixed precision, and the exact
recent window of the ``_RECENT`` variants). See ``base.py`` for the ring/sink layout.

State (leading axis = layer):
  k, v          codec record fields [L, B, Cq, ...] of the quantized ring (Cq frame slots)
  recent_k/_v   [L, B, R, P, N, H] exact (compute dtype, raw bits) ring of the newest R history
                frames (``recent_frames``; empty unless the method keeps a recent window)
  frames        [L] int32 frames appended so far
  stats         method-specific running statistics (QAQ sigma, spatial variance), [L, ...]

Append (the context pass): the R-frame exact window shifts by one block; the frames leaving it
(or, with R = 0, the block itself) are encoded into the quantized ring. Re-encoding of the stored
frames follows the method's cadence (``requantize``, ``recode``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import kernels
from kvjax.cache import codecs as C
from kvjax.cache.base import CADENCES, AppendInfo, CacheMethod, CacheSpec
from kvjax.kernels.source import frame_at, record_at
from kvjax.numerics import from_storage, fwht, storage_dtype, to_storage

f32 = jnp.float32


@struct.dataclass
class RingState:
  k: dict
  v: dict
  recent_k: jax.Array
  recent_v: jax.Array
  frames: jax.Array
  stats: dict
  spec: CacheSpec = struct.field(pytree_node=False)


def ring_slot(frame, capacity: int, sink: int):
  """Slot of absolute frame ``frame`` in a ring of ``capacity`` slots whose first ``sink`` are pinned."""
  rolling = max(capacity - sink, 1)
  return jnp.where(frame < sink, frame, sink + (frame - sink) % rolling)


def ring_frame(slot, written, capacity: int, sink: int):
  """Inverse of ``ring_slot``: the frame held by ``slot`` after frames [0, written) were stored
  (the newest frame that maps to it; meaningful for slots < min(written, capacity))."""
  last = written - 1
  rolling = max(capacity - sink, 1)
  return jnp.where(slot < sink, slot, last - jnp.mod(last - slot, rolling))


def _write_frame(arr, layer, slot, val):
  """Writes val [B, 1, ...] into arr [L, B, C, ...] at (layer, :, slot)."""
  start = (layer, 0, slot) + (0,) * (arr.ndim - 3)
  return jax.lax.dynamic_update_slice(arr, val[None].astype(arr.dtype), start)


def write_record(fields: dict, layer, slot, rec: dict) -> dict:
  return {k: _write_frame(a, layer, slot, rec[k]) for k, a in fields.items()}


def ring_sources(k: dict, v: dict, kc: C.Codec, vc: C.Codec, layer, n, frame_tokens: int):
  """Sources over the first ``n`` slots of a ring of codec records (fields [L, B, C, ...]).

  A spatial (Split) record is read as two sources, its foreground and background tokens, each
  homogeneous and in its own basis (attention is order-free).
  """
  slots = next(iter(k.values())).shape[2]
  index = jnp.arange(slots, dtype=jnp.int32)
  if isinstance(kc, C.Spatial):
    out = []
    for (kf, kr), (vf, vr), s in zip(kc.parts(k), vc.parts(v), (kc.n_fg, frame_tokens - kc.n_fg)):
      out += ring_sources(kr, vr, kf, vf, layer, n, s)
    return out
  return [kernels.Source(k=k, v=v, layer=jnp.asarray(layer, jnp.int32), index=index,
                         num_chunks=jnp.asarray(n, jnp.int32), kfmt=kc, vfmt=vc,
                         chunk_tokens=frame_tokens)]


@dataclasses.dataclass(frozen=True)
class FrameRingMethod(CacheMethod):
  """Generic frame-ring method; subclasses choose codecs and (optionally) aux statistics.

  Attributes:
    requantize: the cadence (``CacheMethod.cadence``). ``'every_call'`` (the study's Gen A/C hook
      and its Gen B per-step policy): after the attention of every DiT call, the four noisy ones
      included, every stored frame is decoded and re-encoded, frame by frame (no float copy of
      the cache); ``'per_block'`` (the study's REFRESH names): the same once a block, at the
      clean context pass; ``'once'`` (kvjax's fix): every token encoded once, when appended.
      Re-encoding is idempotent for RTN and PRQ up to BF16 rounding of the reconstruction, but
      not for the clamped zero-point of KIVI/QAQ: a saturated one-signed group collapses to
      exactly 0 on its second encode (``quant.asym_params``).
  """
  requantize: str = 'every_call'
  FIXES = {'requantize': 'once'}

  def __post_init__(self):
    if self.requantize not in CADENCES:
      raise ValueError(f'requantize must be one of {list(CADENCES)} (got {self.requantize!r})')

  # ------------------------------------------------------------------ hooks
  def codecs(self, spec: CacheSpec) -> tuple[C.Codec, C.Codec]:
    raise NotImplementedError

  def recent_frames(self, spec: CacheSpec) -> int:
    """Newest history frames kept exact (a multiple of block_frames)."""
    return 0

  def init_stats(self, spec: CacheSpec) -> dict:
    return {}

  def encode_aux(self, state: RingState, layer, x_k, x_v, first_frame):
    """(aux_k, aux_v, new_stats) for encoding frames x_k, x_v [B, F, P, N, H] at append."""
    return None, None, state.stats

  def recode_aux(self, state: RingState, layer, k, v, info: AppendInfo):
    """(aux_k, aux_v, new_stats) for re-encoding the decoded records of every stored frame at
    a call whose block K/V are k, v [B, T, N, H] (``recode``); none by default."""
    return None, None, state.stats

  @property
  def cadence(self) -> str:
    return self.requantize

  # ------------------------------------------------------------------ geometry
  def _geometry(self, spec: CacheSpec):
    r = self.recent_frames(spec)
    if r % spec.block_frames:
      raise ValueError(f'{self.name}: recent window of {r} frames is not a multiple of the block')
    cq = spec.capacity_frames - r
    if cq < 0:
      raise ValueError(f'{self.name}: window_frames={spec.window_frames} leaves '
                       f'{spec.capacity_frames} history frames, fewer than the exact recent window '
                       f'({r} frames); use a larger window')
    if spec.sink_frames and cq and spec.sink_frames >= cq:
      raise ValueError(f'{self.name}: sink_frames={spec.sink_frames} leaves no rolling slot in the '
                       f'quantized ring ({cq} frames)')
    return r, cq

  def init(self, spec: CacheSpec) -> RingState:
    r, cq = self._geometry(spec)
    kc, vc = self.codecs(spec)
    b, l, p, n, h = spec.batch, spec.num_layers, spec.frame_tokens, spec.num_heads, spec.head_dim

    def zeros(codec):
      return {name: jnp.zeros((l,) + s.shape[:1] + (cq,) + s.shape[2:], s.dtype)
              for name, s in codec.fields(b, 1, p, n, h).items()}

    rshape = (l, b, r, p, n, h)
    sd = storage_dtype(spec.dtype)
    return RingState(k=zeros(kc), v=zeros(vc), recent_k=jnp.zeros(rshape, sd),
                     recent_v=jnp.zeros(rshape, sd), frames=jnp.zeros((l,), jnp.int32),
                     stats=self.init_stats(spec), spec=spec)

  def _counts(self, state: RingState, layer):
    r, cq = self._geometry(state.spec)
    written = state.frames[layer]
    n_recent = jnp.minimum(written, r)
    n_q = jnp.minimum(jnp.maximum(written - r, 0), cq)
    return n_q, n_recent

  # ------------------------------------------------------------------ protocol
  def _encode_into_ring(self, state: RingState, layer, x_k, x_v, first_frame, valid=True):
    """Encodes frames [first_frame, first_frame + F) (x: [B, F, P, N, H]) into the ring."""
    spec = state.spec
    r, cq = self._geometry(spec)
    if cq == 0:
      return state
    kc, vc = self.codecs(spec)
    aux_k, aux_v, stats = self.encode_aux(state, layer, x_k, x_v, first_frame)
    rk, rv = kc.encode(x_k, aux_k), vc.encode(x_v, aux_v)
    kf, vf = state.k, state.v
    for i in range(x_k.shape[1]):
      slot = ring_slot(first_frame + i, cq, spec.sink_frames)
      kf = write_record(kf, layer, slot, {k: a[:, i:i + 1] for k, a in rk.items()})
      vf = write_record(vf, layer, slot, {k: a[:, i:i + 1] for k, a in rv.items()})
    new = state.replace(k=kf, v=vf, stats=stats)
    if valid is True:
      return new
    return jax.tree.map(lambda a, b: jnp.where(valid, a, b), new, state)

  def append(self, state: RingState, layer, k, v, info: AppendInfo) -> RingState:
    spec = state.spec
    r, cq = self._geometry(spec)
    bf, p = spec.block_frames, spec.frame_tokens
    s = info.start_frame
    b, _, n, h = k.shape
    xk = k.reshape(b, bf, p, n, h)
    xv = v.reshape(b, bf, p, n, h)
    if r == 0:
      state = self._encode_into_ring(state, layer, xk, xv, s)
    else:
      # The oldest block of the exact window moves to the quantized ring (encoded once).
      out = s - r
      slots = [(out + i) % r for i in range(bf)]
      old_k = jnp.concatenate([from_storage(frame_at(state.recent_k, layer, sl), spec.dtype)
                               for sl in slots], axis=1).astype(k.dtype)
      old_v = jnp.concatenate([from_storage(frame_at(state.recent_v, layer, sl), spec.dtype)
                               for sl in slots], axis=1).astype(v.dtype)
      state = jax.lax.cond(out >= 0,
                           lambda st: self._encode_into_ring(st, layer, old_k, old_v, out),
                           lambda st: st, state)
      rk, rv = state.recent_k, state.recent_v
      for i in range(bf):
        sl = (s + i) % r
        rk = _write_frame(rk, layer, sl, to_storage(xk[:, i:i + 1], spec.dtype))
        rv = _write_frame(rv, layer, sl, to_storage(xv[:, i:i + 1], spec.dtype))
      state = state.replace(recent_k=rk, recent_v=rv)
    return state.replace(frames=state.frames.at[layer].set(s + bf))

  def sources(self, state: RingState, layer):
    spec = state.spec
    r, cq = self._geometry(spec)
    kc, vc = self.codecs(spec)
    n_q, n_recent = self._counts(state, layer)
    out = []
    if cq:
      out += ring_sources(state.k, state.v, kc, vc, layer, n_q, spec.frame_tokens)
    if r:
      dense = C.Dense(spec.dtype)
      out += ring_sources({'x': state.recent_k}, {'x': state.recent_v}, dense, dense, layer,
                          n_recent, spec.frame_tokens)
    return out

  def recode(self, state: RingState, layer, k, v, info: AppendInfo) -> RingState:
    """Decodes and re-encodes the layer's quantized frames, one slot at a time (see
    ``requantize``); the exact recent window of ``_RECENT`` variants is left as it is."""
    spec = state.spec
    r, cq = self._geometry(spec)
    if cq == 0:
      return state
    kc, vc = self.codecs(spec)
    n_q, _ = self._counts(state, layer)
    aux_k, aux_v, stats = self.recode_aux(state, layer, k, v, info)

    def per_slot(j, st):
      kx = kc.decode(record_at(st.k, layer, j), spec.dtype)
      vx = vc.decode(record_at(st.v, layer, j), spec.dtype)
      if kc.rotated:                        # records read in the Hadamard basis
        kx, vx = fwht(kx), fwht(vx)
      return st.replace(k=write_record(st.k, layer, j, kc.encode(kx, aux_k)),
                        v=write_record(st.v, layer, j, vc.encode(vx, aux_v)))

    state = jax.lax.fori_loop(0, n_q, per_slot, state)
    return state.replace(stats=stats)


@dataclasses.dataclass(frozen=True)
class BF16(FrameRingMethod):
  """Reference: unquantized K/V in the cache dtype (bfloat16 on the fast path; float32 in
  float32 parity runs), one frame slot per history frame."""
  name = 'BF16'
  aliases = ('bf16', 'none', 'baseline')
  family = 'BF16'
  is_reference = True
  description = 'reference: unquantized K/V in a ring of frame slots'
  requantize: str = 'once'              # exact storage: re-encoding would be the identity
  FIXES = {}

  def codecs(self, spec):
    d = C.Dense(spec.dtype)
    return d, d
