"""Mixed-format frame log: frames stored in different codecs by a static (positional) schedule.

Age-Tier and TPTQ decide a frame's format from its absolute position in the study's whole-video
buffer, so the format of every frame — and hence its record size — is known before the rollout.
Records are written into a per-layer byte pool [L, B, bytes]: pinned sink frames first, then a
circular log of the rolling frames whose byte offsets are planned on the host (``plan_layout``)
so that a frame never overwrites one still inside the attention window. The pool is as small as
that plan allows (close to the largest sum of live record sizes), so an INT2 frame really costs
INT2 bytes even though formats are mixed. Record fields are (de)serialized by bitcasting
chunk-sized byte slices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import kernels
from kvjax.cache import codecs as C
from kvjax.cache.base import AppendInfo, CacheMethod, CacheSpec

f32 = jnp.float32


@struct.dataclass
class LogState:
  data: jax.Array         # [L, B, pool_bytes] uint8
  frames: jax.Array       # [L] int32 frames appended
  stats: dict
  spec: CacheSpec = struct.field(pytree_node=False)


def _field_layout(codec_pair, p, n, h):
  """[(tensor, name, shape (batch 1, frame 1 stripped), dtype, byte offset, nbytes)], total."""
  out, off = [], 0
  for tensor, codec in zip(('k', 'v'), codec_pair):
    for name, s in codec.fields(1, 1, p, n, h).items():
      nb = int(np.prod(s.shape)) * s.dtype.itemsize
      out.append((tensor, name, s.shape[2:], s.dtype, off, nb))
      off += nb
  return out, off


def visible_rolling(n_after: int, capacity: int, sink: int) -> range:
  return range(max(sink, n_after - (capacity - sink)), n_after)


def plan_layout(sizes: np.ndarray, total_frames: int, block: int, capacity: int, sink: int):
  """Byte offsets of every frame and the pool size (host-side, static).

  Args:
    sizes: [total_frames] record bytes of each frame.
  Returns:
    offsets [total_frames] int64, pool_bytes int.
  """
  sizes = np.asarray(sizes, np.int64)
  sink = min(sink, total_frames)
  sink_bytes = int(sizes[:sink].sum())
  offsets = np.zeros(total_frames, np.int64)
  offsets[:sink] = np.concatenate([[0], np.cumsum(sizes[:sink])[:-1]]) if sink else []
  if capacity <= sink or total_frames <= sink:
    return offsets, max(sink_bytes, 1)
  live_max = 0
  for n_after in range(block, total_frames + block, block):
    n_after = min(n_after, total_frames)
    live_max = max(live_max, int(sum(sizes[f] for f in visible_rolling(n_after, capacity, sink))))

  def attempt(cap):
    head = sink_bytes
    offs = offsets.copy()
    for n_after in range(block, total_frames + block, block):
      n_after = min(n_after, total_frames)
      for f in range(max(sink, n_after - block), n_after):
        if head + sizes[f] > cap:
          head = sink_bytes
        offs[f] = head
        head += sizes[f]
      live = sorted((offs[f], offs[f] + sizes[f]) for f in visible_rolling(n_after, capacity, sink))
      if any(a[1] > b[0] for a, b in zip(live, live[1:])) or (live and live[-1][1] > cap):
        return None
    return offs

  cap = sink_bytes + live_max
  step = max(1, int(sizes.min()) // 8)
  while True:
    offs = attempt(cap)
    if offs is not None:
      return offs, int(cap)
    cap += step


def _by_tier(tier, branch, num_tiers: int, operand):
  """lax.switch over the static per-tier functions ``branch(t)`` (a plain call for one tier)."""
  if num_tiers == 1:
    return branch(0)(operand)
  return jax.lax.switch(tier, [branch(t) for t in range(num_tiers)], operand)


@dataclasses.dataclass(frozen=True)
class MixedLogMethod(CacheMethod):
  """Base class: subclasses define ``tier_codecs(spec)`` and ``tier_of(spec)`` (static)."""

  def tier_codecs(self, spec: CacheSpec) -> list[tuple[C.Codec, C.Codec]]:
    raise NotImplementedError

  def tier_of(self, spec: CacheSpec) -> np.ndarray:
    """[total_frames] int tier of every absolute frame."""
    raise NotImplementedError

  def init_stats(self, spec: CacheSpec) -> dict:
    return {}

  def encode_aux(self, state, layer, tier: int, x_k, x_v, frame):
    return None, None, state.stats

  # ------------------------------------------------------------------ static layout
  def layout(self, spec: CacheSpec):
    return _layout(self, spec)

  def init(self, spec: CacheSpec) -> LogState:
    lay = self.layout(spec)
    return LogState(data=jnp.zeros((spec.num_layers, spec.batch, lay['pool']), jnp.uint8),
                    frames=jnp.zeros((spec.num_layers,), jnp.int32),
                    stats=self.init_stats(spec), spec=spec)

  # ------------------------------------------------------------------ (de)serialization
  def _placed(self, spec: CacheSpec, frame):
    """(layout, byte offset, tier index) of buffer frame ``frame`` (may be traced)."""
    lay = self.layout(spec)
    return (lay, jnp.asarray(lay['offsets'], jnp.int32)[frame],
            jnp.asarray(lay['tiers'], jnp.int32)[frame])

  def _encode_frame(self, state: LogState, layer, frame, x_k, x_v):
    spec = state.spec
    b = spec.batch
    lay, off, tier = self._placed(spec, frame)

    def branch(t):
      fields, size = lay['fields'][t]
      kc, vc = lay['codecs'][t]

      def fn(st):
        aux_k, aux_v, stats = self.encode_aux(st, layer, t, x_k, x_v, frame)
        rec = {'k': kc.encode(x_k, aux_k), 'v': vc.encode(x_v, aux_v)}
        parts = []
        for tensor, name, shape, dt, o, nb in fields:
          a = rec[tensor][name].reshape(b, -1)
          if dt.itemsize > 1:
            a = jax.lax.bitcast_convert_type(a, jnp.uint8)
          parts.append(a.reshape(b, nb))
        raw = jnp.concatenate(parts, axis=1)
        data = jax.lax.dynamic_update_slice(st.data, raw[None], (layer, 0, off))
        return st.replace(data=data, stats=stats)
      return fn

    return _by_tier(tier, branch, len(lay['codecs']), state)

  # ------------------------------------------------------------------ protocol
  def append(self, state: LogState, layer, k, v, info: AppendInfo) -> LogState:
    spec = state.spec
    bf, p = spec.block_frames, spec.frame_tokens
    b, _, n, h = k.shape
    xk = k.reshape(b, bf, p, n, h)
    xv = v.reshape(b, bf, p, n, h)
    if spec.capacity_frames > 0:
      for i in range(bf):
        state = self._encode_frame(state, layer, info.start_frame + i, xk[:, i:i + 1], xv[:, i:i + 1])
    return state.replace(frames=state.frames.at[layer].set(info.start_frame + bf))

  def sources(self, state: LogState, layer):
    """One byte-pool source per tier: chunk j of tier t is the j-th visible frame of that tier
    (sink frames, then the rolling window), read at its planned byte offset."""
    spec = state.spec
    if spec.capacity_frames == 0:
      return []
    lay = self.layout(spec)
    total = len(lay['tiers'])
    n = state.frames[layer]
    f = jnp.arange(total, dtype=jnp.int32)
    roll_start = jnp.maximum(spec.sink_frames, n - (spec.capacity_frames - spec.sink_frames))
    visible = (f < jnp.minimum(n, spec.sink_frames)) | ((f >= roll_start) & (f < n))
    tiers = jnp.asarray(lay['tiers'], jnp.int32)
    offsets = jnp.asarray(lay['offsets'], jnp.int32)
    out = []
    for t, (kc, vc) in enumerate(lay['codecs']):
      if not np.any(lay['tiers'] == t):
        continue
      mine = visible & (tiers == t)
      order = jnp.argsort(~mine, stable=True)
      out.append(kernels.Source(
          k={'pool': state.data}, v={}, layer=jnp.asarray(layer, jnp.int32), index=offsets[order],
          num_chunks=jnp.sum(mine).astype(jnp.int32), kfmt=kc, vfmt=vc,
          chunk_tokens=spec.frame_tokens, pool=tuple(lay['fields'][t][0])))
    return out


@functools.lru_cache(maxsize=64)
def _layout(method: MixedLogMethod, spec: CacheSpec):
  total = spec.require_total_frames(method.name)
  codecs = method.tier_codecs(spec)
  fields = [_field_layout(c, spec.frame_tokens, spec.num_heads, spec.head_dim) for c in codecs]
  tiers = np.asarray(method.tier_of(spec), np.int64)
  if tiers.shape != (total,):
    raise ValueError(f'{method.name}: tier schedule has shape {tiers.shape}, expected ({total},)')
  sizes = np.asarray([fields[t][1] for t in tiers])
  offsets, pool = plan_layout(sizes, total, spec.block_frames, spec.capacity_frames, spec.sink_frames)
  return {'codecs': codecs, 'fields': fields, 'tiers': tiers, 'offsets': offsets, 'pool': pool}
