"""Spatial mixed precision (spec 3.10): foreground positions in a high-precision quantizer,
background positions in a low-precision one.

Mask: per spatial position s (P of them), m[t, s] = mean |V| over batch, heads and channels of
frame t; var[s] = population variance of m[:, s] over the study's whole buffer of frames —
the not-yet-generated frames count as zeros (``variance_scope='buffer'``, the study), or over
the frames written so far (``'written'``, the corrected reading: it measures motion, not
magnitude). Positions are ranked by variance per layer.

Selection under static storage: ``topk`` keeps the ``fg_target`` top positions (exactly the
study). ``hybrid`` in the study uses the variance-threshold set when its size lies within
[fg_min, fg_max] and falls back to the top ``fg_target`` otherwise — the fallback happened in 97%
of its calls; kvjax stores a fixed number of foreground tokens a frame, so it always takes the
fallback (documented deviation).

When the mask changes. The study recomputed it on every call of every layer from the buffer as
it stood (the history's reconstruction, the call's block — noisy on denoising calls — and zeros
for unwritten frames) and re-tiered the whole history with it, so tokens churned between tiers.
With ``requantize='every_call'`` (the default) or ``'per_block'``, kvjax does the same in
``recode``: m[t, s] of every stored frame is taken from its decoded V, frames that have left the
window keep the m of their last reconstruction (``frame_m``), the block's rows come from the
call's V; the new layer mask (``order``) re-tiers every stored frame and the block appended on
the context pass. With ``requantize='once'`` (kvjax's fix) a block's mask is computed once, when
it is appended, from running sums over the clean frames, and its tokens never change tier.
Foreground and background tokens are each re-grouped in 16s on their gathered sub-tensors in
position order, as the study.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache import codecs as C
from kvjax.kernels import packing
from kvjax.cache.registry import variant
from kvjax.cache.ring import FrameRingMethod, ring_frame
from kvjax.kernels.source import record_at

f32 = jnp.float32
FAMILIES = ('rtn', 'kivi', 'quarot')


def _family_codecs(family: str, bits: int, group: int):
  """(key codec, value codec) of a sub-quantizer (the study's Gen C: float32 dequant)."""
  if family == 'rtn':
    c = C.SymRTN(bits, group)
    return c, c
  if family == 'kivi':
    return C.AsymGroup(bits, group), C.AsymToken(bits)
  if family == 'quarot':
    c = C.Derotated(C.SymRTN(bits, group))                # read back in the original basis
    return c, c
  raise ValueError(f'unknown spatial sub-quantizer {family!r}; valid: {list(FAMILIES)}')


@dataclasses.dataclass(frozen=True)
class SpatialMixed(FrameRingMethod):
  family = 'SPATIAL_MIXED'
  fg_method: str = 'rtn'
  fg_bits: int = 4
  bg_method: str = 'rtn'
  bg_bits: int = 2
  policy: str = 'hybrid'
  var_threshold: float = 0.02
  fg_min: float = 0.45
  fg_max: float = 0.85
  fg_target: float = 0.65
  variance_scope: str = 'buffer'
  group_size: int = 16
  FIXES = {'requantize': 'once', 'variance_scope': 'written'}

  def __post_init__(self):
    super().__post_init__()
    packing.check_bits(self.fg_bits, 'fg_bits')
    packing.check_bits(self.bg_bits, 'bg_bits')
    _family_codecs(self.fg_method, self.fg_bits, self.group_size)
    _family_codecs(self.bg_method, self.bg_bits, self.group_size)
    if self.policy not in ('hybrid', 'topk'):
      raise ValueError(f"policy must be 'hybrid' or 'topk' (got {self.policy!r})")
    if self.variance_scope not in ('buffer', 'written'):
      raise ValueError(f"variance_scope must be 'buffer' or 'written' (got {self.variance_scope!r})")
    if not 0 < self.fg_min <= self.fg_target <= self.fg_max <= 1:
      raise ValueError('need 0 < fg_min <= fg_target <= fg_max <= 1 '
                       f'(got {self.fg_min}, {self.fg_target}, {self.fg_max})')

  def n_fg(self, p: int) -> int:
    lo = max(1, round(self.fg_min * p))
    hi = min(max(round(self.fg_max * p), lo), p)
    n = min(max(round(self.fg_target * p), lo), hi)
    return min(n, p - 1)

  def codecs(self, spec):
    fk, fv = _family_codecs(self.fg_method, self.fg_bits, self.group_size)
    bk, bv = _family_codecs(self.bg_method, self.bg_bits, self.group_size)
    n = self.n_fg(spec.frame_tokens)
    return C.Spatial(fk, bk, n), C.Spatial(fv, bv, n)

  def init_stats(self, spec):
    if self.requantize == 'once':
      # Per layer and position: sum over frames of m[t, s] and of m[t, s]^2.
      return {'pos_moments': jnp.zeros((spec.num_layers, 2, spec.frame_tokens), f32)}
    total = spec.require_total_frames(f'{self.name} with requantize={self.requantize}')
    # frame_m [L, total, P]: m[t, s] of every buffer frame; order [L, P]: the layer's mask,
    # record token i holds position order[i] (foreground first).
    return {'frame_m': jnp.zeros((spec.num_layers, total, spec.frame_tokens), f32),
            'order': jnp.broadcast_to(jnp.arange(spec.frame_tokens, dtype=jnp.int32),
                                      (spec.num_layers, spec.frame_tokens))}

  def _rank(self, var, p: int):
    """Token order with the n_fg highest-variance positions first (each part in position order)."""
    rank = jnp.argsort(jnp.argsort(-var))                             # 0 = highest variance
    pos = jnp.arange(p)
    return jnp.argsort(jnp.where(rank < self.n_fg(p), pos, pos + p)).astype(jnp.int32)

  def encode_aux(self, state, layer, x_k, x_v, first_frame):
    spec = state.spec
    p = spec.frame_tokens
    if self.requantize != 'once':             # the mask ``recode`` just computed for this call
      order = jnp.broadcast_to(state.stats['order'][layer], (spec.batch, p))
      return {'order': order}, {'order': order}, state.stats
    mom = state.stats['pos_moments']
    m = jnp.mean(jnp.abs(x_v.astype(f32)), axis=(0, 3, 4))            # [F, P]
    mom = mom.at[layer].add(jnp.stack([m.sum(0), jnp.square(m).sum(0)]))
    frames = (first_frame + x_v.shape[1]).astype(f32)
    if self.variance_scope == 'buffer':
      frames = jnp.asarray(spec.require_total_frames('spatial variance_scope=buffer'), f32)
    mean = mom[layer, 0] / frames
    order = jnp.broadcast_to(self._rank(mom[layer, 1] / frames - mean * mean, p), (spec.batch, p))
    return {'order': order}, {'order': order}, {'pos_moments': mom}

  def recode_aux(self, state, layer, k, v, info):
    """The study's per-call mask over the buffer; re-tiers records from the old layer mask."""
    spec = state.spec
    p, bf = spec.frame_tokens, spec.block_frames
    _, cq = self._geometry(spec)
    _, vc = self.codecs(spec)
    n_q, _ = self._counts(state, layer)
    old = state.stats['order'][layer]                                 # [P]
    written = state.frames[layer]

    def per_slot(j, fm):
      x = vc.decode(record_at(state.v, layer, j), f32, rotated=False)  # [B, 1, P, N, H]
      m_rec = jnp.mean(jnp.abs(x), axis=(0, 1, 3, 4))                 # record order
      frame = ring_frame(j, written, cq, spec.sink_frames)
      return jax.lax.dynamic_update_slice(fm, jnp.zeros((1, p), f32).at[0, old].set(m_rec),
                                          (frame, 0))

    fm = jax.lax.fori_loop(0, n_q, per_slot, state.stats['frame_m'][layer])
    m_blk = jnp.mean(jnp.abs(v.astype(f32)).reshape(spec.batch, bf, p, -1), axis=(0, 3))
    fm = jax.lax.dynamic_update_slice(fm, m_blk, (info.start_frame, 0))
    if self.variance_scope == 'buffer':
      frames = jnp.asarray(fm.shape[0], f32)
    else:
      frames = (info.start_frame + bf).astype(f32)
    mean = jnp.sum(fm, 0) / frames
    var = jnp.sum(jnp.square(fm), 0) / frames - mean * mean
    new = self._rank(var, p)
    inv_old = jnp.zeros((p,), jnp.int32).at[old].set(jnp.arange(p, dtype=jnp.int32))
    perm = jnp.broadcast_to(inv_old[new], (spec.batch, p))            # record order -> new order
    stats = {'frame_m': state.stats['frame_m'].at[layer].set(fm),
             'order': state.stats['order'].at[layer].set(new)}
    return {'order': perm}, {'order': perm}, stats


_SPATIAL = [
    ('SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2', ('spatial_rtn4_rtn2',), 'rtn', 4, 'rtn', 2, 'hybrid', 0.45, 0.85, 0.65),
    ('SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT4', ('spatial_rtn4_rtn4',), 'rtn', 4, 'rtn', 4, 'hybrid', 0.45, 0.85, 0.65),
    ('SPATIAL_MIXED_FG_KIVI_INT4_BG_KIVI_INT2', ('spatial_kivi4_kivi2',), 'kivi', 4, 'kivi', 2, 'topk', 0.6, 0.9, 0.8),
    ('SPATIAL_MIXED_FG_QUAROT_KV_INT4_BG_RTN_INT2', ('spatial_quarot4_rtn2',), 'quarot', 4, 'rtn', 2, 'topk', 0.6, 0.9, 0.8),
]
for _name, _aliases, _fm, _fb, _bm, _bb, _pol, _lo, _hi, _tg in _SPATIAL:
  variant(SpatialMixed, _name, _aliases,
          f'foreground {_fm.upper()} INT{_fb} / background {_bm.upper()} INT{_bb}, {_pol} '
          f'({int(_tg * 100)}% foreground)',
          fg_method=_fm, fg_bits=_fb, bg_method=_bm, bg_bits=_bb, policy=_pol, fg_min=_lo,
          fg_max=_hi, fg_target=_tg)
