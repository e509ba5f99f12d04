"""FLOWCACHE_PROFILE: the study's profiling pass that measures per-layer chunk change and writes
the budget table the FlowCache methods read (``budget=profile:<path>``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.cache.base import AppendInfo, CacheMethod, CacheSpec, frame_slot
from kvjax.cache.flowcache.plan import block_summaries, chunk_deltas, chunk_list, frame_summary
from kvjax.cache.ring import BF16

f32 = jnp.float32


@struct.dataclass
class ProfileState:
  """S = plan slots (one per frame of the rollout with plan_scope='written', per ring position
  with 'window'), bf = block_frames."""
  ring: object            # the BF16 ring state
  pframe: jax.Array       # [L, S] frame of each plan slot, -1 none
  summ: jax.Array         # [L, S, N] chunk summaries (exact: the store is BF16)
  prev_summ: jax.Array    # [L, S + bf, N] the previous event's list
  prev_frame: jax.Array   # [L, S + bf]
  prev_n: jax.Array       # [L]
  last_block: jax.Array   # [L] first frame of the block of the last recode event, -1 none
  delta_sum: jax.Array    # [L] sum of the old chunks' deltas over all events
  old_chunks: jax.Array   # [L] how many old chunks that sum has
  events: jax.Array       # [L] events with at least one old chunk
  spec: CacheSpec = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class FlowCacheProfile(CacheMethod):
  """The study's profiling pass (spec 3.9.6): an exact BF16 cache that, at every scoring event,
  adds up per layer the deltas (``plan.chunk_deltas``) of the old chunks (all but the newest
  max(1, round(recent_ratio * n))) of the event's chunk list; a layer's score is their mean over
  all its old chunks of all events, as the study's (kvjax's former pass averaged the per-event
  means instead, which weighs the short lists of early blocks more). ``budget_table(state)`` maps
  the layer scores linearly to [0.7, 1.3]; the launcher writes it as ``budget_table.json`` for the
  FlowCache methods' ``budget=profile:<path>``.

  Attributes:
    plan_scope, plan_cadence: as FlowCache's. The study ('written', 'every_call'): an event after
      every DiT call, over every written frame plus the block of that call (its K/V noisy on the
      denoising calls), against the previous call's list; history summaries never change (the
      store is exact), so within a block only the block's chunks move. kvjax's former pass
      ('window', 'ahead'): one event a block, at the append, over the window's frames with the
      next block counted. ('per_block': one event at the append, the block's clean chunks listed.)
  """
  name = 'FLOWCACHE_PROFILE'
  aliases = ('flowcache_profile', 'profile')
  family = 'FLOWCACHE'
  description = 'profiling pass: exact BF16 cache + per-layer chunk-delta statistics'
  in_study = False
  recent_ratio: float = 0.25
  delta_alignment: str = 'tail'
  plan_scope: str = 'written'
  plan_cadence: str = 'every_call'

  def __post_init__(self):
    for name, value, valid in (('delta_alignment', self.delta_alignment, ('tail', 'frame')),
                               ('plan_scope', self.plan_scope, ('written', 'window')),
                               ('plan_cadence', self.plan_cadence,
                                ('every_call', 'per_block', 'ahead'))):
      if value not in valid:
        raise ValueError(f'{name} must be one of {list(valid)} (got {value!r})')

  @property
  def cadence(self) -> str:
    return 'every_call' if self.plan_cadence == 'every_call' else 'once'

  def _slots(self, spec: CacheSpec) -> int:
    if self.plan_scope == 'written':
      return spec.require_total_frames("FLOWCACHE_PROFILE with plan_scope='written'")
    return spec.capacity_frames

  def _pslot(self, frame, spec: CacheSpec):
    return frame if self.plan_scope == 'written' else frame_slot(frame, spec).astype(jnp.int32)

  def _old_table(self, spec: CacheSpec) -> np.ndarray:
    """[n_max + 1] int32: old chunks of a list of n, n - max(1, round(recent_ratio * n)) (the
    study's float64 Python arithmetic)."""
    n_max = self._slots(spec) + 2 * spec.block_frames
    return np.asarray([n - max(1, int(round(self.recent_ratio * n))) if n else 0
                       for n in range(n_max + 1)], np.int32)

  def init(self, spec):
    l, s, n, bf = spec.num_layers, self._slots(spec), spec.num_heads, spec.block_frames
    return ProfileState(ring=BF16().init(spec), pframe=jnp.full((l, s), -1, jnp.int32),
                        summ=jnp.zeros((l, s, n), f32), prev_summ=jnp.zeros((l, s + bf, n), f32),
                        prev_frame=jnp.full((l, s + bf), -1, jnp.int32),
                        prev_n=jnp.zeros((l,), jnp.int32), last_block=jnp.full((l,), -1, jnp.int32),
                        delta_sum=jnp.zeros((l,), f32), old_chunks=jnp.zeros((l,), f32),
                        events=jnp.zeros((l,), f32), spec=spec)

  def _event(self, st, layer, block_start, blk_summ=None):
    """One scoring event over the layer's listed frames (then the block, with ``blk_summ``
    [bf, N]; plan_cadence='ahead' counts ``block_frames`` more chunks, never old)."""
    spec = st.spec
    bf = spec.block_frames
    extra = bf if self.plan_cadence == 'ahead' else 0
    _, _, j, lframe, lsumm, n_list = chunk_list(st.pframe[layer], st.summ[layer], bf,
                                                blk_summ, block_start)
    delta = chunk_deltas(lsumm, lframe, n_list, st.prev_summ[layer], st.prev_frame[layer],
                         st.prev_n[layer], self.delta_alignment)
    n_old = jnp.asarray(self._old_table(spec))[n_list + extra]
    old = j < jnp.minimum(n_old, n_list)
    cnt = jnp.sum(old)
    in_list = j < n_list
    return st.replace(
        prev_summ=st.prev_summ.at[layer].set(jnp.where(in_list[:, None], lsumm, 0.0)),
        prev_frame=st.prev_frame.at[layer].set(jnp.where(in_list, lframe, -1)),
        prev_n=st.prev_n.at[layer].set(n_list),
        delta_sum=st.delta_sum.at[layer].add(jnp.sum(jnp.where(old, delta, 0.0))),
        old_chunks=st.old_chunks.at[layer].add(cnt.astype(f32)),
        events=st.events.at[layer].add(jnp.where(cnt > 0, 1.0, 0.0)))

  def recode(self, state, layer, k, v, info: AppendInfo):
    """plan_cadence='every_call': the event of a DiT call at ``layer`` (k, v [B, bf * P, N, H]:
    the call's block at ``info.start_frame``); nothing once the block is appended."""
    spec = state.spec
    if self.plan_cadence != 'every_call' or spec.capacity_frames == 0:
      return state
    blk = block_summaries(k, v, spec.block_frames, spec.frame_tokens)
    s = jnp.asarray(info.start_frame, jnp.int32)
    fresh = jnp.all(state.pframe[layer] < s)            # the block is not appended yet

    def event(st):
      st = self._event(st, layer, s, blk)
      return st.replace(last_block=st.last_block.at[layer].set(s))

    return jax.lax.cond(fresh, event, lambda st: st, state)

  def append(self, state, layer, k, v, info):
    spec = state.spec
    ring = BF16().append(state.ring, layer, k, v, info)
    if spec.capacity_frames == 0:
      return state.replace(ring=ring)
    bf, p = spec.block_frames, spec.frame_tokens
    b, _, n, h = k.shape
    xk, xv = k.reshape(b, bf, p, n, h), v.reshape(b, bf, p, n, h)
    s = jnp.asarray(info.start_frame, jnp.int32)
    st = state
    for i in range(bf):
      ps = self._pslot(s + i, spec)
      st = st.replace(pframe=st.pframe.at[layer, ps].set(s + i),
                      summ=st.summ.at[layer, ps].set(frame_summary(xk[:, i]) + frame_summary(xv[:, i])))
    if self.plan_cadence == 'every_call':     # the block's calls made the events; else one now
      st = jax.lax.cond(st.last_block[layer] == s, lambda t: t,
                        lambda t: self._event(t, layer, s + bf), st)
    else:
      st = self._event(st, layer, s + bf)
    return st.replace(ring=ring)

  def sources(self, state, layer):
    return BF16().sources(state.ring, layer)

  @staticmethod
  def budget_table(state) -> dict:
    """Layer scores (mean delta of old chunks) and budgets 0.7 + 0.6 (s - min) / (max - min)
    (all 1.0 if equal)."""
    scores = np.asarray(state.delta_sum) / np.maximum(np.asarray(state.old_chunks), 1.0)
    lo, hi = float(scores.min()), float(scores.max())
    budgets = (0.7 + 0.6 * (scores - lo) / (hi - lo)) if hi > lo else np.ones_like(scores)
    return {'budgets': [float(x) for x in budgets], 'layer_scores': [float(x) for x in scores],
            'events': [float(x) for x in np.asarray(state.events)],
            'old_chunks': [float(x) for x in np.asarray(state.old_chunks)]}

  def artifacts(self, state) -> dict:
    return {'budget_table.json': self.budget_table(state)}
