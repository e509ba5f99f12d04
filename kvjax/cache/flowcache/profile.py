"""FLOWCACHE_PROFILE: the study's profiling pass that measures per-layer chunk change and writes
the budget table the FlowCache methods read (``budget=profile:<path>``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.cache.base import CacheMethod, CacheSpec, frame_slot
from kvjax.cache.flowcache.plan import chunk_deltas, frame_summary
from kvjax.cache.ring import BF16

f32 = jnp.float32


@struct.dataclass
class ProfileState:
  ring: object            # the BF16 ring state
  frame_of: jax.Array     # [L, C]
  summ: jax.Array         # [L, C, N]
  prev_summ: jax.Array
  prev_frame: jax.Array
  prev_n: jax.Array
  delta_sum: jax.Array    # [L] accumulated mean delta of old chunks
  events: jax.Array       # [L]
  spec: CacheSpec = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class FlowCacheProfile(CacheMethod):
  """The study's profiling pass (spec 3.9.6): an exact BF16 cache that, at every append,
  accumulates per layer the mean delta of the old chunks (all but the newest
  max(1, round(0.25 n))). ``budget_table(state)`` maps the layer scores linearly to
  [0.7, 1.3]; the launcher writes it as ``budget_table.json`` for the FlowCache methods'
  ``budget=profile:<path>``."""
  name = 'FLOWCACHE_PROFILE'
  aliases = ('flowcache_profile', 'profile')
  family = 'FLOWCACHE'
  description = 'profiling pass: exact BF16 cache + per-layer chunk-delta statistics'
  in_study = False
  recent_ratio: float = 0.25
  delta_alignment: str = 'tail'

  def init(self, spec):
    l, c, n = spec.num_layers, spec.capacity_frames, spec.num_heads
    return ProfileState(ring=BF16().init(spec), frame_of=jnp.full((l, c), -1, jnp.int32),
                        summ=jnp.zeros((l, c, n), f32), prev_summ=jnp.zeros((l, c, n), f32),
                        prev_frame=jnp.full((l, c), -1, jnp.int32), prev_n=jnp.zeros((l,), jnp.int32),
                        delta_sum=jnp.zeros((l,), f32), events=jnp.zeros((l,), f32), spec=spec)

  def append(self, state, layer, k, v, info):
    spec = state.spec
    ring = BF16().append(state.ring, layer, k, v, info)
    if spec.capacity_frames == 0:
      return state.replace(ring=ring)
    bf, p = spec.block_frames, spec.frame_tokens
    b, _, n, h = k.shape
    xk, xv = k.reshape(b, bf, p, n, h), v.reshape(b, bf, p, n, h)
    st = state
    for i in range(bf):
      pos = frame_slot(info.start_frame + i, spec)
      st = st.replace(frame_of=st.frame_of.at[layer, pos].set(info.start_frame + i),
                      summ=st.summ.at[layer, pos].set(frame_summary(xk[:, i]) + frame_summary(xv[:, i])))
    frame_of = st.frame_of[layer]
    valid = frame_of >= 0
    order = jnp.argsort(jnp.where(valid, frame_of, jnp.iinfo(jnp.int32).max), stable=True)
    n_hist = jnp.sum(valid).astype(jnp.int32)
    cur = st.summ[layer][order]
    delta = chunk_deltas(cur, frame_of[order], n_hist, st.prev_summ[layer], st.prev_frame[layer],
                         st.prev_n[layer], self.delta_alignment)
    n_all = n_hist + bf
    n_old = n_all - jnp.maximum(1, jnp.round(self.recent_ratio * n_all)).astype(jnp.int32)
    old = jnp.arange(spec.capacity_frames) < jnp.minimum(n_old, n_hist)
    cnt = jnp.sum(old)
    mean_old = jnp.where(cnt > 0, jnp.sum(jnp.where(old, delta, 0.0)) / jnp.maximum(cnt, 1), 0.0)
    in_list = jnp.arange(spec.capacity_frames) < n_hist
    return st.replace(
        ring=ring,
        prev_summ=st.prev_summ.at[layer].set(jnp.where(in_list[:, None], cur, 0.0)),
        prev_frame=st.prev_frame.at[layer].set(jnp.where(in_list, frame_of[order], -1)),
        prev_n=st.prev_n.at[layer].set(n_hist),
        delta_sum=st.delta_sum.at[layer].add(jnp.where(cnt > 0, mean_old, 0.0)),
        events=st.events.at[layer].add(jnp.where(cnt > 0, 1.0, 0.0)))

  def sources(self, state, layer):
    return BF16().sources(state.ring, layer)

  @staticmethod
  def budget_table(state) -> dict:
    """Layer scores and budgets 0.7 + 0.6 (s - min) / (max - min) (all 1.0 if equal)."""
    scores = np.asarray(state.delta_sum) / np.maximum(np.asarray(state.events), 1.0)
    lo, hi = float(scores.min()), float(scores.max())
    budgets = (0.7 + 0.6 * (scores - lo) / (hi - lo)) if hi > lo else np.ones_like(scores)
    return {'budgets': [float(x) for x in budgets], 'layer_scores': [float(x) for x in scores],
            'events': [float(x) for x in np.asarray(state.events)]}

  def artifacts(self, state) -> dict:
    return {'budget_table.json': self.budget_table(state)}
