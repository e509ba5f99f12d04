"""The study's compression accounting, to report beside kvjax's real bytes.

kvjax measures what it stores (``method.nbytes(state)`` against ``CacheSpec.bf16_bytes()``, both
over the history window). The study reported a different number (spec 4.2/4.3):

  compression_ratio = BF16 bytes of its whole buffer / sum over layers of memory_bytes(final state)

with the buffer = every latent frame of the video (``CacheSpec.total_frames`` x ``frame_tokens``
tokens: 42 x 1,560 = 65,520 slots at 480x832), and ``memory_bytes`` a formula over the shapes of
the quantizer's final state, never the tensors' real residency:

  packed(n, bits) = ceil(n * bits / 8) for n code elements; every fp16 statistic 2 B;
  a tensor of t tokens is blocked into ceil(t / 16) groups of 16 tokens (zero padding counted);
  RTN / QuaRot     packed(n, b) + 2 g                  per tensor (g = n / 16 statistics)
  KIVI (and QAQ)   keys packed(n, b) + 2 g + 2 g; values packed(n, b) + 2 t' + 2 t' (t' = padded
                   tokens x batch); QAQ adds 4 + 2 B per exact outlier (int32 index, fp16 value)
  PRQ              packed(n, b) + 2 g + packed(n, b_res) + 2 g
  Age-Tier, TPTQ   1 B a buffer slot (bool mask) + 8 B a slot (int64 indices) + the recent and old
                   sub-states, each re-blocked on its own tokens (+ 6 B per TPTQ key outlier)
  Spatial          1 B + 8 B a slot + the foreground and background sub-states
  FlowCache        Hybrid: 1 B a slot + 8 B an active token; Adaptive/Prune: 8 B a stored token
                   (pruned chunks cost 0); Soft-prune adds a BF16 K and V summary token
                   (2 x B x N x H x 2 B) and 16 B of span per pruned chunk; each tier's sub-state
                   is re-blocked on its own tokens
  Gen B RECENT<n>  the old part quantized, the newest n blocks in BF16 (and the max with a sampled
                   estimate, which at the end of the video equals the final state's formula)

``tier_census(method, spec, state)`` gives the tier census of all written frames at the end of the
rollout (tokens per tier and layer; FlowCache's from the plan at n = total_frames chunks with the
layer budgets; QAQ's and TPTQ's outlier counts from the final state), ``study_bytes`` applies the
formula and ``study_compression_ratio`` divides. Methods without a study formula (QVG, after the
study) give None.

Census from a windowed state: kvjax keeps only the window's frames, the study every frame. The
outlier counts are therefore extrapolated from the stored frames to all written ones (exact when
the window covers the rollout); TPTQ's is capped by the study's global rule. Spatial: kvjax stores
a fixed ``n_fg(P)`` foreground positions a frame (the study's top-k rule); the study's 'hybrid'
final mask may be the variance-threshold set instead (see ``SpatialMixed``), a different count.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from kvjax.cache.age_tier import TPTQ, AgeTier
from kvjax.cache.base import CacheMethod, CacheSpec
from kvjax.cache.flowcache.plan import layer_budgets, plan_counts
from kvjax.cache.flowcache.profile import FlowCacheProfile
from kvjax.cache.flowcache.tiers import FlowCache
from kvjax.cache.kivi import KIVI
from kvjax.cache.prq import PRQMethod
from kvjax.cache.qaq import QAQ
from kvjax.cache.quarot import QuaRot
from kvjax.cache.qvg import QVG
from kvjax.cache.ring import BF16
from kvjax.cache.rtn import RTN
from kvjax.cache.spatial import SpatialMixed

INDEX_BYTES = 8          # int64 index tensors
MASK_BYTES = 1           # bool masks
OUTLIER_BYTES = 4 + 2    # int32 flat index + fp16 value
SPAN_BYTES = 16          # a (start, end) pair of Python ints, as the study counted it
STAT_BYTES = 2           # fp16 scale / zero-point
SUMMARY_BYTES = 2        # a BF16 element of a pooled summary token


class CensusMissing(ValueError):
  """The formula needs a data-dependent count (QAQ's or TPTQ's outliers) that the census lacks:
  build the census from the final state (``tier_census(method, spec, state)``) or give the count."""


@dataclasses.dataclass(frozen=True)
class Census:
  """Tier census of all written frames at the end of a rollout.

  Attributes:
    tiers: per layer, {tier name: buffer tokens it holds} (tokens per batch element; names are
      the method's: 'quantized', 'recent', 'old', 'fg', 'bg', 'important', 'low', 'retained',
      'pruned', 'bf16').
    outliers: exact outliers over all layers (QAQ: keys and values; TPTQ: old keys); None where
      the method has none or the count is unknown.
  """
  tiers: tuple[dict[str, int], ...]
  outliers: int | None = None

  def total(self, name: str) -> int:
    """Tokens of tier ``name`` summed over layers."""
    return sum(t.get(name, 0) for t in self.tiers)


@dataclasses.dataclass(frozen=True)
class _Geometry:
  batch: int
  heads: int
  head_dim: int
  layers: int
  frame_tokens: int
  frames: int

  @property
  def slots(self) -> int:
    """The study's buffer length in tokens (its 65,520-slot capacity)."""
    return self.frames * self.frame_tokens


def _geometry(spec: CacheSpec) -> _Geometry:
  return _Geometry(spec.batch, spec.num_heads, spec.head_dim, spec.num_layers, spec.frame_tokens,
                   spec.require_total_frames('the study accounting (its buffer length)'))


def packed(n: int, bits: int) -> int:
  """The study's packed size of n codes (``packing.packed_bytes``): ceil(n * bits / 8)."""
  return (n * bits + 7) // 8


def _padded(tokens: int, group: int) -> int:
  """Tokens after the study's zero padding to whole groups."""
  return -(-tokens // group) * group


def sym_bytes(g: _Geometry, tokens: int, key_bits: int, value_bits: int, group: int) -> int:
  """RTN / QuaRot state of ``tokens`` tokens: codes + one fp16 scale a (group, head, channel)."""
  if tokens <= 0:
    return 0
  n = g.batch * _padded(tokens, group) * g.heads * g.head_dim
  stats = STAT_BYTES * (n // group)
  return packed(n, key_bits) + stats + packed(n, value_bits) + stats


def kivi_bytes(g: _Geometry, tokens: int, key_bits: int, value_bits: int, group: int) -> int:
  """KIVI / QAQ state: keys per (group, head, channel), values per (padded) token, each with an
  fp16 scale and zero-point."""
  if tokens <= 0:
    return 0
  t = g.batch * _padded(tokens, group)
  n = t * g.heads * g.head_dim
  return (packed(n, key_bits) + 2 * STAT_BYTES * (n // group)
          + packed(n, value_bits) + 2 * STAT_BYTES * t)


def prq_bytes(g: _Geometry, tokens: int, bits: int, residual_bits: int, group: int) -> int:
  """PRQ state: base and residual codes, each with fp16 scales, for keys and for values."""
  if tokens <= 0:
    return 0
  n = g.batch * _padded(tokens, group) * g.heads * g.head_dim
  stats = STAT_BYTES * (n // group)
  return 2 * (packed(n, bits) + stats + packed(n, residual_bits) + stats)


def bf16_bytes(g: _Geometry, tokens: int) -> int:
  """K and V of ``tokens`` tokens in BF16 (no padding)."""
  return 2 * 2 * g.batch * max(tokens, 0) * g.heads * g.head_dim


def study_bf16_bytes(spec: CacheSpec) -> int:
  """The study's numerator: BF16 K+V of the whole buffer (total_frames x frame_tokens slots) in
  every layer (12,076,646,400 B at the 1.3B model's 42 x 1,560 slots)."""
  g = _geometry(spec)
  return g.layers * bf16_bytes(g, g.slots)


def _uniform(g: _Geometry, tiers: dict[str, int], outliers: int | None = None) -> Census:
  return Census(tiers=tuple(dict(tiers) for _ in range(g.layers)), outliers=outliers)


def _positional_recent(slots: int, ratio: float) -> int:
  """Age-Tier/TPTQ's recent part: the last max(1, round(r * L)) buffer slots (Python round)."""
  return min(max(1, int(round(ratio * slots))), slots)


# --------------------------------------------------------------------------- census
@functools.singledispatch
def tier_census(method: CacheMethod, spec: CacheSpec, state: Any = None) -> Census | None:
  """The tier census of ``method``'s study state at the end of a rollout of ``spec.total_frames``
  frames; ``state`` (the final kvjax cache) supplies the data-dependent counts. None for a method
  with no study formula."""
  raise TypeError(f'{method.name or type(method).__name__}: no study accounting is defined for '
                  f'{type(method).__name__}')


@tier_census.register(BF16)
@tier_census.register(FlowCacheProfile)          # the profiling pass stores a BF16 clone
def _(method, spec, state=None):
  g = _geometry(spec)
  return _uniform(g, {'bf16': g.slots})


def _recent_window(method_recent_blocks: int, spec: CacheSpec, g: _Geometry) -> int:
  """Gen B's exact window: the newest ``recent_blocks`` generation blocks (current included)."""
  return min(method_recent_blocks * spec.block_frames * g.frame_tokens, g.slots)


@tier_census.register(RTN)
@tier_census.register(QuaRot)
def _(method, spec, state=None):
  g = _geometry(spec)
  recent = _recent_window(method.recent_blocks, spec, g)
  return _uniform(g, {'quantized': g.slots - recent, 'recent': recent})


@tier_census.register(KIVI)
@tier_census.register(PRQMethod)
def _(method, spec, state=None):
  g = _geometry(spec)
  return _uniform(g, {'quantized': g.slots})


def _stored_outliers(rec: dict, stored: np.ndarray, elems: int) -> np.ndarray:
  """Per layer [L]: outliers in the first ``stored[l]`` frame slots of a ring of Outliers records
  (out_idx [L, B, C, cap], dropped [L, B, C]): kept ones (out_idx < elems, the empty marker being
  elems) plus those beyond the per-frame capacity."""
  idx = np.asarray(rec['out_idx'])                      # [L, B, C, cap]
  dropped = np.asarray(rec['dropped'])                  # [L, B, C]
  slot = np.arange(idx.shape[2])
  live = slot[None, :] < stored[:, None]                # [L, C]
  kept = np.sum((idx < elems) & live[:, None, :, None], axis=(1, 2, 3))
  over = np.sum(np.where(live[:, None, :], dropped, 0), axis=(1, 2))
  return kept + over


@tier_census.register
def _(method: QAQ, spec, state=None):
  """QAQ's outliers (keys and values) from the final ring, extrapolated per layer from the stored
  frames to every written frame (the study kept every outlier of its whole buffer)."""
  g = _geometry(spec)
  outliers = None
  if state is not None:
    cq = spec.capacity_frames - method.recent_frames(spec)
    written = np.asarray(state.frames, np.int64)
    stored = np.minimum(written, cq)
    elems = g.frame_tokens * g.heads * g.head_dim
    per_layer = _stored_outliers(state.k, stored, elems) + _stored_outliers(state.v, stored, elems)
    if np.all(stored > 0):                      # else nothing to count from: unknown
      outliers = int(np.sum(np.round(per_layer * written / stored)))
  return _uniform(g, {'quantized': g.slots}, outliers)


@tier_census.register
def _(method: AgeTier, spec, state=None):
  g = _geometry(spec)
  recent = _positional_recent(g.slots, method.recent_ratio)
  return _uniform(g, {'recent': recent, 'old': g.slots - recent})


def tptq_outlier_cap(method: TPTQ, spec: CacheSpec) -> int:
  """The study's TPTQ cap per layer: int(outlier_max_ratio x old key elements), unpadded."""
  g = _geometry(spec)
  old = g.slots - _positional_recent(g.slots, method.recent_ratio)
  return int(method.outlier_max_ratio * g.batch * old * g.heads * g.head_dim)


def _tptq_stored_outliers(method: TPTQ, state) -> tuple[np.ndarray, np.ndarray]:
  """Per layer: old-key outliers (kept + ``dropped``) of the old frames still in the byte pool
  (``state.data`` [L, B, pool] uint8), and how many such frames there are: ([L], [L]) int64."""
  spec = state.spec
  lay = method.layout(spec)
  fields, _ = lay['fields'][0]
  by_name = {(t, n): (shape, dt, off, nb) for t, n, shape, dt, off, nb in fields}
  _, idx_dt, idx_off, idx_nb = by_name[('k', 'out_idx')]
  _, drop_dt, drop_off, drop_nb = by_name[('k', 'dropped')]
  data = np.asarray(state.data)                         # [L, B, pool] uint8
  written = np.asarray(state.frames, np.int64)
  elems = spec.frame_tokens * spec.num_heads * spec.head_dim
  counts = np.zeros(spec.num_layers, np.int64)
  frames = np.zeros(spec.num_layers, np.int64)
  for l in range(spec.num_layers):
    n = int(written[l])
    roll = max(spec.sink_frames, n - (spec.capacity_frames - spec.sink_frames))
    visible = [f for f in range(n) if f < spec.sink_frames or f >= roll]
    for f in visible:
      if lay['tiers'][f] != 0:
        continue
      base = int(lay['offsets'][f])
      for b in range(spec.batch):
        idx = data[l, b, base + idx_off:base + idx_off + idx_nb].view(np.dtype(idx_dt))
        drop = data[l, b, base + drop_off:base + drop_off + drop_nb].view(np.dtype(drop_dt))
        counts[l] += int(np.sum(idx < elems)) + int(np.sum(drop))
      frames[l] += 1
  return counts, frames


@tier_census.register
def _(method: TPTQ, spec, state=None):
  """TPTQ's old-key outliers from the final byte pool, extrapolated per layer from the stored old
  frames to every old frame, then capped by the study's global per-layer rule."""
  g = _geometry(spec)
  recent = _positional_recent(g.slots, method.recent_ratio)
  outliers = None
  if state is not None:
    counts, frames = _tptq_stored_outliers(method, state)
    old_frames = int(np.sum(np.asarray(method.tier_of(spec)) == 0))
    cap = tptq_outlier_cap(method, spec)
    if old_frames == 0:
      outliers = 0
    elif np.all(frames > 0):                    # else no old frame left to count from: unknown
      outliers = int(np.sum(np.minimum(np.round(counts * old_frames / frames), cap)))
  return _uniform(g, {'recent': recent, 'old': g.slots - recent}, outliers)


@tier_census.register
def _(method: SpatialMixed, spec, state=None):
  """Foreground positions a frame as kvjax stores them (``n_fg``), tiled over every frame; the
  study makes everything foreground when the buffer holds fewer than 2 frames."""
  g = _geometry(spec)
  if g.frames < 2:
    return _uniform(g, {'fg': g.slots, 'bg': 0})
  fg = g.frames * method.n_fg(g.frame_tokens)
  return _uniform(g, {'fg': fg, 'bg': g.slots - fg})


def flowcache_chunks(method: FlowCache, spec: CacheSpec) -> list[dict[str, int]]:
  """Per layer, the chunks (frames) of each tier of the study's plan over all n = total_frames
  written chunks (its final active prefix is the whole buffer): recent, important, low
  (HYBRID/ADAPTIVE's low-bit old chunks), retained and pruned (PRUNE/SOFT_PRUNE)."""
  g = _geometry(spec)
  budgets = layer_budgets(method.budget, g.layers, method.budget_min, method.budget_max)
  out = []
  for bud in budgets:
    recent, imp, ret, pruned, n_old = (int(x) for x in plan_counts(
        g.frames, 0, float(bud), method.plan_kind, method.recent_ratio, method.important_ratio,
        method.retained_ratio))
    if method.plan_kind == 'prune':
      out.append(dict(recent=recent, important=imp, low=0, retained=ret, pruned=pruned))
    else:
      out.append(dict(recent=recent, important=imp, low=n_old - imp, retained=0, pruned=0))
  return out


@tier_census.register
def _(method: FlowCache, spec, state=None):
  g = _geometry(spec)
  return Census(tiers=tuple({k: c * g.frame_tokens for k, c in layer.items()}
                            for layer in flowcache_chunks(method, spec)))


@tier_census.register
def _(method: QVG, spec, state=None):
  return None                                      # published after the study: no study formula


# --------------------------------------------------------------------------- formula
@functools.singledispatch
def _layer_bytes(method: CacheMethod, g: _Geometry, tiers: dict[str, int]) -> int:
  raise TypeError(f'{method.name or type(method).__name__}: no study formula')


@_layer_bytes.register
def _(method: BF16, g, tiers):
  return bf16_bytes(g, tiers['bf16'])


@_layer_bytes.register
def _(method: FlowCacheProfile, g, tiers):
  return bf16_bytes(g, tiers['bf16'])


@_layer_bytes.register
def _(method: RTN, g, tiers):
  return (sym_bytes(g, tiers['quantized'], method.key_bits, method.value_bits, method.group_size)
          + bf16_bytes(g, tiers['recent']))


@_layer_bytes.register
def _(method: QuaRot, g, tiers):
  return (sym_bytes(g, tiers['quantized'], method.bits, method.bits, method.group_size)
          + bf16_bytes(g, tiers['recent']))


@_layer_bytes.register
def _(method: KIVI, g, tiers):
  return kivi_bytes(g, tiers['quantized'], method.key_bits, method.value_bits, method.group_size)


@_layer_bytes.register
def _(method: PRQMethod, g, tiers):
  return prq_bytes(g, tiers['quantized'], method.bits, method.residual_bits, method.group_size)


@_layer_bytes.register
def _(method: QAQ, g, tiers):
  return kivi_bytes(g, tiers['quantized'], method.bits, method.bits, method.group_size)


def _slot_overhead(g: _Geometry) -> int:
  """A full-length bool mask and int64 indices of every slot (Age-Tier, TPTQ, spatial)."""
  return (MASK_BYTES + INDEX_BYTES) * g.slots


@_layer_bytes.register
def _(method: AgeTier, g, tiers):
  gs = method.group_size
  return (_slot_overhead(g)
          + sym_bytes(g, tiers['recent'], method.recent_bits, method.recent_bits, gs)
          + sym_bytes(g, tiers['old'], method.bits, method.bits, gs))


@_layer_bytes.register
def _(method: TPTQ, g, tiers):
  gs = method.group_size
  return (_slot_overhead(g)
          + sym_bytes(g, tiers['recent'], method.recent_bits, method.recent_bits, gs)
          + prq_bytes(g, tiers['old'], method.bits, method.residual_bits, gs))


_SPATIAL_FORMULA = {'rtn': sym_bytes, 'quarot': sym_bytes, 'kivi': kivi_bytes}


@_layer_bytes.register
def _(method: SpatialMixed, g, tiers):
  gs = method.group_size
  fg = _SPATIAL_FORMULA[method.fg_method](g, tiers['fg'], method.fg_bits, method.fg_bits, gs)
  bg = _SPATIAL_FORMULA[method.bg_method](g, tiers['bg'], method.bg_bits, method.bg_bits, gs)
  return _slot_overhead(g) + fg + bg


@_layer_bytes.register
def _(method: FlowCache, g, tiers):
  gs, hi, lo = method.group_size, method.recent_bits, method.bits
  subs = (sym_bytes(g, tiers['recent'], hi, hi, gs) + sym_bytes(g, tiers['important'], hi, hi, gs)
          + sym_bytes(g, tiers['low'], lo, lo, gs) + sym_bytes(g, tiers['retained'], lo, lo, gs))
  stored = tiers['recent'] + tiers['important'] + tiers['low'] + tiers['retained']
  if method.plan_kind == 'hybrid':               # full-length mask + indices of the active prefix
    return subs + MASK_BYTES * g.slots + INDEX_BYTES * stored
  total = subs + INDEX_BYTES * stored             # pruned chunks: no index, no codes
  if method.kind == 'soft_prune':
    chunks = tiers['pruned'] // g.frame_tokens
    summary = 2 * g.batch * g.heads * g.head_dim * SUMMARY_BYTES
    total += chunks * (summary + SPAN_BYTES)
  return total


def _outlier_bytes(method: CacheMethod, c: Census) -> int:
  if c.outliers is None:
    raise CensusMissing(f'{method.name}: the study formula counts the exact outliers of its final '
                        'state; build the census from the final cache (tier_census(method, spec, '
                        'state)) or give Census.outliers')
  return OUTLIER_BYTES * c.outliers


@functools.singledispatch
def _extra_bytes(method: CacheMethod, c: Census) -> int:
  """Bytes outside the per-layer tiers (outliers, counted over all layers)."""
  return 0


@_extra_bytes.register
def _(method: QAQ, c):
  return _outlier_bytes(method, c)


@_extra_bytes.register
def _(method: TPTQ, c):
  return _outlier_bytes(method, c)


def study_bytes(method: CacheMethod, spec: CacheSpec, census: Census | None = None) -> int | None:
  """The study's ``compressed_kv_bytes``: sum over layers of its ``memory_bytes`` formula over the
  census (``tier_census(method, spec)`` when None). None for a method with no study formula (QVG)."""
  c = tier_census(method, spec) if census is None else census
  if c is None:
    return None
  g = _geometry(spec)
  if len(c.tiers) != g.layers:
    raise ValueError(f'{method.name}: census has {len(c.tiers)} layers, the spec {g.layers}')
  for layer in c.tiers:
    if sum(layer.values()) != g.slots:
      raise ValueError(f'{method.name}: census tiers hold {sum(layer.values())} tokens, the buffer '
                       f'{g.slots} ({g.frames} frames x {g.frame_tokens})')
  full = {'quantized': 0, 'recent': 0, 'bf16': 0, 'important': 0, 'low': 0, 'retained': 0,
          'pruned': 0, 'old': 0, 'fg': 0, 'bg': 0}
  total = sum(_layer_bytes(method, g, {**full, **layer}) for layer in c.tiers)
  return total + _extra_bytes(method, c)


def study_ratio(method: CacheMethod, spec: CacheSpec, state: Any = None) -> float | None:
  """``study_compression_ratio`` over the census of the final ``state``; None where the method has
  no study formula or the state cannot supply a count the formula needs (QAQ's or TPTQ's outliers
  without a state, or when no frame that holds them is left in the window). What result.json and
  the benchmark tables report beside the real ratio."""
  c = tier_census(method, spec, state)
  if c is None:
    return None
  try:
    return study_compression_ratio(method, spec, c)
  except CensusMissing:
    return None


def study_compression_ratio(method: CacheMethod, spec: CacheSpec,
                            census: Census | None = None) -> float | None:
  """The study's ``compression_ratio`` of ``method`` at ``spec``'s geometry: BF16 bytes of the
  whole buffer over ``study_bytes``. None for a method with no study formula (QVG)."""
  b = study_bytes(method, spec, census)
  if b is None:
    return None
  return study_bf16_bytes(spec) / b
