"""FlowCache-inspired methods (spec 3.9): frame-chunk tiers planned per layer from a budget,
recency and a chunk-importance score; low tiers re-encoded at fewer bits, pruned or summarized.

Chunks are latent frames. Every append (the clean context pass, once a block) replans the
layer's window (the study refreshes PRUNE/SOFT_PRUNE plans once a block too; HYBRID/ADAPTIVE
replanned on every call, including noisy ones — kvjax plans once a block, when clean K/V exist).

Plan (per layer l, budget b = budget(l)): the chunk list is the layer's history window plus the
next block (``block_frames`` virtual chunks that are attended exactly, as the study counted the
block being generated): n = history + block_frames.
  n_recent = clamp(round(min(recent_ratio * b, 1) * n), 1, n)  -> the newest; history part INT4
  old = the rest (history only)
  HYBRID   : old -> INT2
  ADAPTIVE : top n_imp = clamp(round(important_ratio * b * n_old), 1, n_old) old by score -> INT4,
             other old -> INT2
  PRUNE    : top n_imp (important_ratio 0.1) -> INT4; of the remaining n_rem, the top
             n_ret = clamp(round(retained_ratio * b * n_rem), 1, n_rem) -> retained at ``bits``;
             the rest pruned.
score = alpha * delta + beta * linspace(0, 1, n); delta = relative L1 change of the chunk's
summary (per head: mean |K| + mean |V|) against the previous plan's list, tail-aligned as the
study (``delta_alignment='tail'``: after a new block row j meets the old row j - 3, weakness
W9) or matched by frame (``'frame'``, the fix).

Pruned chunks (hard): the study zeroes them and they keep softmax mass (1,560 zero keys ->
weight 1,560 * exp(0)); kvjax stores one zero key with logit bias log(count)
(``prune_mode='zero'``, the paper's semantics without expansion) or drops them
(``prune_mode='mask'``, the fix). Soft-pruned chunks become one summary token (mean K, mean V
over the chunk, float32 mean stored in the cache dtype) with bias log(count). Pruning is final,
as in the study (its later plans may still pick a pruned chunk, spending budget on it).
Demotions and promotions re-encode the current reconstruction, as the study's re-quantization.

Storage: per tier a slot store whose per-layer capacity is the largest tier count the plan can
produce for that layer's budget (host-side simulation), laid out flat across layers, so a layer
with a small budget does not pay for a large one.

Planning math: ``plan.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import kernels
from kvjax.cache import codecs as C
from kvjax.cache.base import AppendInfo, CacheMethod, CacheSpec, frame_slot
from kvjax.cache.flowcache.plan import chunk_deltas, frame_summary, layer_budgets, plan_counts
from kvjax.cache.ring import write_record
from kvjax.kernels.source import record_at
from kvjax.kernels import packing
from kvjax.numerics import storage_dtype, to_storage

f32 = jnp.float32
A, B, PRUNED = 0, 1, 2


@struct.dataclass
class FlowState:
  a: dict                 # high tier records, [1, B, R_A, ...] (flat over layers)
  b: dict                 # low tier records, [1, B, R_B, ...]
  a_owner: jax.Array      # [R_A] ring position owning the record, -1 free
  b_owner: jax.Array      # [R_B]
  sum_k: jax.Array        # [L, B, C, N, H] summary / zero tokens of pruned chunks (raw bits)
  sum_v: jax.Array
  sum_ok: jax.Array       # [L, C] bool: ring position holds a pruned chunk
  frame_of: jax.Array     # [L, C] absolute frame at ring position, -1 empty
  where: jax.Array        # [L, C] 0 = A, 1 = B, 2 = pruned, -1 empty
  slot: jax.Array         # [L, C] record index in its store
  summ: jax.Array         # [L, C, N] current chunk summaries
  prev_summ: jax.Array    # [L, C, N] previous plan's list (absolute order, front-aligned)
  prev_frame: jax.Array   # [L, C] frames of that list (-1 past its end)
  prev_n: jax.Array       # [L]
  frames: jax.Array       # [L]
  spec: CacheSpec = struct.field(pytree_node=False)


def store_source(fields, owner, base, cap, codec, frame_tokens):
  """Source over the occupied records of one layer in a flat slot store ([1, B, R, ...] fields):
  the records whose slot lies in the layer's range [base, base + cap) and has an owner."""
  idx = jnp.arange(owner.shape[0])
  mine = (idx >= base) & (idx < base + cap) & (owner >= 0)
  return kernels.Source(k=fields['k'], v=fields['v'], layer=jnp.int32(0),
                        index=jnp.argsort(~mine, stable=True).astype(jnp.int32),
                        num_chunks=jnp.sum(mine).astype(jnp.int32), kfmt=codec, vfmt=codec,
                        chunk_tokens=frame_tokens)


def summary_source(state: 'FlowState', layer, log_count: float, masked: bool):
  """The layer's pruned chunks as one chunk of C tokens (one per ring position), each with
  logit bias log(count) (or -inf: not pruned, or ``masked``)."""
  spec = state.spec
  c = spec.capacity_frames
  shape = (spec.num_layers, spec.batch, 1, c, spec.num_heads, spec.head_dim)
  ok = state.sum_ok & (not masked)                                       # [L, C]
  bias = jnp.where(ok, log_count, -jnp.inf).astype(f32)[:, None, :]      # [L, 1, C]
  fmt = C.Dense(spec.dtype)
  return kernels.Source(k={'x': state.sum_k.reshape(shape)}, v={'x': state.sum_v.reshape(shape)},
                        layer=jnp.asarray(layer, jnp.int32), index=jnp.zeros((1,), jnp.int32),
                        num_chunks=jnp.any(ok[layer]).astype(jnp.int32), bias=bias, kfmt=fmt,
                        vfmt=fmt, chunk_tokens=c)


@dataclasses.dataclass(frozen=True)
class FlowCache(CacheMethod):
  family = 'FLOWCACHE'
  kind: str = 'prune'                 # 'hybrid' | 'adaptive' | 'prune' | 'soft_prune'
  bits: int = 4                       # retained tier (prune) / low tier (hybrid, adaptive)
  recent_bits: int = 4
  recent_ratio: float = 0.25
  important_ratio: float = 0.1
  retained_ratio: float = 0.45
  alpha: float = 0.7
  beta: float = 0.3
  budget: str = 'auto'
  budget_min: float = 0.75
  budget_max: float = 1.25
  delta_alignment: str = 'tail'
  prune_mode: str = 'zero'
  group_size: int = 16
  reuse_threshold: float = 0.0        # > 0: FLOWCACHE_NATIVE step reuse in the sampler

  @property
  def step_reuse_threshold(self) -> float:
    return self.reuse_threshold

  def __post_init__(self):
    if self.kind not in ('hybrid', 'adaptive', 'prune', 'soft_prune'):
      raise ValueError(f'kind must be hybrid, adaptive, prune or soft_prune (got {self.kind!r})')
    packing.check_bits(self.bits)
    packing.check_bits(self.recent_bits, 'recent_bits')
    C.SymRTN(self.bits, self.group_size)
    for r in ('recent_ratio', 'important_ratio', 'retained_ratio'):
      if not 0.0 <= getattr(self, r) <= 1.0:
        raise ValueError(f'{r} must be in [0, 1] (got {getattr(self, r)})')
    if self.delta_alignment not in ('tail', 'frame'):
      raise ValueError(f"delta_alignment must be 'tail' or 'frame' (got {self.delta_alignment!r})")
    if self.prune_mode not in ('zero', 'mask'):
      raise ValueError(f"prune_mode must be 'zero' or 'mask' (got {self.prune_mode!r})")

  # ------------------------------------------------------------------ static layout
  @property
  def plan_kind(self):
    return 'prune' if self.kind == 'soft_prune' else self.kind

  def codecs(self):
    hi = C.SymRTN(self.recent_bits, self.group_size)
    lo = C.SymRTN(self.bits, self.group_size)
    return hi, lo

  def retained_in_a(self) -> bool:
    return self.plan_kind == 'prune' and self.bits == self.recent_bits

  def layout(self, spec: CacheSpec):
    return _flow_layout(self, spec)

  def slot_counts(self, spec: CacheSpec):
    lay = self.layout(spec)
    return (spec.capacity_frames, lay['ra'], lay['rb'], *lay['cap_a'], *lay['cap_b'])

  def init(self, spec: CacheSpec) -> FlowState:
    lay = self.layout(spec)
    hi, lo = self.codecs()
    b, l, p, n, h, c = (spec.batch, spec.num_layers, spec.frame_tokens, spec.num_heads,
                        spec.head_dim, spec.capacity_frames)

    def store(codec, r):
      return {name: jnp.zeros((1, s.shape[0], r) + s.shape[2:], s.dtype)
              for name, s in codec.fields(b, 1, p, n, h).items()}

    sd = storage_dtype(spec.dtype)
    return FlowState(
        a={'k': store(hi, lay['ra']), 'v': store(hi, lay['ra'])},
        b={'k': store(lo, lay['rb']), 'v': store(lo, lay['rb'])},
        a_owner=jnp.full((lay['ra'],), -1, jnp.int32), b_owner=jnp.full((lay['rb'],), -1, jnp.int32),
        sum_k=jnp.zeros((l, b, c, n, h), sd), sum_v=jnp.zeros((l, b, c, n, h), sd),
        sum_ok=jnp.zeros((l, c), bool), frame_of=jnp.full((l, c), -1, jnp.int32),
        where=jnp.full((l, c), -1, jnp.int32), slot=jnp.zeros((l, c), jnp.int32),
        summ=jnp.zeros((l, c, n), f32), prev_summ=jnp.zeros((l, c, n), f32),
        prev_frame=jnp.full((l, c), -1, jnp.int32), prev_n=jnp.zeros((l,), jnp.int32),
        frames=jnp.zeros((l,), jnp.int32), spec=spec)

  # ------------------------------------------------------------------ store helpers
  def _store(self, st, which):
    return (st.a, st.a_owner) if which == A else (st.b, st.b_owner)

  def _set_store(self, st, which, fields, owner):
    return st.replace(a=fields, a_owner=owner) if which == A else st.replace(b=fields, b_owner=owner)

  def _free_slot(self, owner, base, cap):
    idx = jnp.arange(owner.shape[0])
    cand = (owner < 0) & (idx >= base) & (idx < base + cap)
    return jnp.argmax(cand).astype(jnp.int32)

  def _decode(self, st, which, g, dtype):
    codec = self.codecs()[0 if which == A else 1]
    fields, _ = self._store(st, which)
    k = codec.decode(record_at(fields['k'], 0, g), dtype)
    v = codec.decode(record_at(fields['v'], 0, g), dtype)
    return k, v                                                    # [B, 1, P, N, H]

  def _put(self, st, which, layer, pos, xk, xv, g=None):
    """Encodes xk, xv [B, 1, P, N, H] into store ``which`` (at g, or the first free slot)."""
    lay = self.layout(st.spec)
    codec = self.codecs()[0 if which == A else 1]
    fields, owner = self._store(st, which)
    base = jnp.asarray(lay['base_a' if which == A else 'base_b'], jnp.int32)[layer]
    cap = jnp.asarray(lay['cap_a' if which == A else 'cap_b'], jnp.int32)[layer]
    if g is None:
      g = self._free_slot(owner, base, cap)
    fields = {'k': write_record(fields['k'], 0, g, codec.encode(xk)),
              'v': write_record(fields['v'], 0, g, codec.encode(xv))}
    owner = owner.at[g].set(pos)
    st = self._set_store(st, which, fields, owner)
    return st.replace(where=st.where.at[layer, pos].set(which), slot=st.slot.at[layer, pos].set(g))

  def _release(self, st, which, g):
    fields, owner = self._store(st, which)
    return self._set_store(st, which, fields, owner.at[g].set(-1))

  def _prune(self, st, layer, pos, xk, xv):
    """Stores the pruned chunk at ring position ``pos`` as one token (from xk, xv [B, 1, P, N, H])."""
    spec = st.spec
    if self.kind == 'soft_prune':
      kt, vt = jnp.mean(xk.astype(f32), axis=(1, 2)), jnp.mean(xv.astype(f32), axis=(1, 2))
    else:
      kt = vt = jnp.zeros((xk.shape[0],) + xk.shape[3:], f32)
    summ = jnp.mean(jnp.abs(kt), axis=(0, 2)) + jnp.mean(jnp.abs(vt), axis=(0, 2))
    st = st.replace(
        sum_k=st.sum_k.at[layer, :, pos].set(to_storage(kt, spec.dtype)),
        sum_v=st.sum_v.at[layer, :, pos].set(to_storage(vt, spec.dtype)),
        sum_ok=st.sum_ok.at[layer, pos].set(True),
        where=st.where.at[layer, pos].set(PRUNED), summ=st.summ.at[layer, pos].set(summ))
    return st

  # ------------------------------------------------------------------ the plan
  def _targets(self, st, layer, budget):
    """Target tier (A, B, PRUNED) of every ring position; -1 for empty positions."""
    spec = st.spec
    c, bf = spec.capacity_frames, spec.block_frames
    frame_of = st.frame_of[layer]
    valid = frame_of >= 0
    order = jnp.argsort(jnp.where(valid, frame_of, jnp.iinfo(jnp.int32).max), stable=True)
    n_hist = jnp.sum(valid).astype(jnp.int32)
    hist_recent, n_imp, n_ret, _, n_old = plan_counts(
        n_hist.astype(f32), bf, budget, self.plan_kind, self.recent_ratio, self.important_ratio,
        self.retained_ratio, xp=jnp)
    n_old = n_old.astype(jnp.int32)
    j = jnp.arange(c)
    in_list = j < n_hist
    is_old = j < n_old

    # Chunk summaries in list order and deltas against the previous list.
    cur = st.summ[layer][order]                                       # [C, N]
    delta = chunk_deltas(cur, frame_of[order], n_hist, st.prev_summ[layer],
                         st.prev_frame[layer], st.prev_n[layer], self.delta_alignment)
    n_plan = (n_hist + bf).astype(f32)
    rec = j.astype(f32) / jnp.maximum(n_plan - 1.0, 1.0)
    score = self.alpha * delta + self.beta * rec

    # Rank old chunks by score (descending, stable).
    key = jnp.where(is_old, -score, jnp.inf)
    rank = jnp.argsort(jnp.argsort(key, stable=True), stable=True)      # 0 = best old chunk
    if self.plan_kind == 'hybrid':
      tier_old = jnp.full((c,), B)
    elif self.plan_kind == 'adaptive':
      tier_old = jnp.where(rank < n_imp, A, B)
    else:
      ret_tier = A if self.retained_in_a() else B
      tier_old = jnp.where(rank < n_imp, A, jnp.where(rank < n_imp + n_ret, ret_tier, PRUNED))
    tier_list = jnp.where(is_old, tier_old, A)
    tier_list = jnp.where(in_list, tier_list, -1)
    targets = jnp.full((c,), -1, jnp.int32).at[order].set(tier_list.astype(jnp.int32))
    new_prev = st.replace(
        prev_summ=st.prev_summ.at[layer].set(jnp.where(in_list[:, None], cur, 0.0)),
        prev_frame=st.prev_frame.at[layer].set(jnp.where(in_list, frame_of[order], -1)),
        prev_n=st.prev_n.at[layer].set(n_hist))
    return targets, new_prev

  # ------------------------------------------------------------------ protocol
  def append(self, state: FlowState, layer, k, v, info: AppendInfo) -> FlowState:
    spec = state.spec
    c, bf, p = spec.capacity_frames, spec.block_frames, spec.frame_tokens
    if c == 0:
      return state
    lay = self.layout(spec)
    b, _, n, h = k.shape
    xk = k.reshape(b, bf, p, n, h)
    xv = v.reshape(b, bf, p, n, h)
    s = info.start_frame
    st = state

    # 1. New frames take their ring positions; the frames there leave the window.
    new_pos = []
    for i in range(bf):
      pos = frame_slot(s + i, spec).astype(jnp.int32)
      new_pos.append(pos)
      w, g = st.where[layer, pos], st.slot[layer, pos]
      st = jax.lax.cond(w == A, lambda t: self._release(t, A, g), lambda t: t, st)
      st = jax.lax.cond(w == B, lambda t: self._release(t, B, g), lambda t: t, st)
      summ = frame_summary(xk[:, i]) + frame_summary(xv[:, i])
      st = st.replace(frame_of=st.frame_of.at[layer, pos].set(s + i),
                      where=st.where.at[layer, pos].set(-1),
                      sum_ok=st.sum_ok.at[layer, pos].set(False),
                      summ=st.summ.at[layer, pos].set(summ))

    # 2. Plan.
    budget = jnp.asarray(lay['budgets'], f32)[layer]
    target, st = self._targets(st, layer, budget)
    where = st.where[layer]
    target = jnp.where(where == PRUNED, PRUNED, target)              # pruning is final

    # 3. Prune stored chunks that the plan drops.
    def prune_one(i, st):
      pos = order_prune[i]
      w, g = st.where[layer, pos], st.slot[layer, pos]

      def from_store(which):
        def fn(st):
          kx, vx = self._decode(st, which, g, f32)
          return self._prune(self._release(st, which, g), layer, pos, kx, vx)
        return fn
      return jax.lax.switch(w, [from_store(A), from_store(B)], st)

    prune_mask = ((where == A) | (where == B)) & (target == PRUNED)
    order_prune = jnp.argsort(~prune_mask, stable=True)
    st = jax.lax.fori_loop(0, jnp.sum(prune_mask), prune_one, st)

    # 4. Moves between tiers: swap pairs first, then the remainder (capacities are exact).
    dem = (where == A) & (target == B)
    prom = (where == B) & (target == A)
    dem_l = jnp.argsort(~dem, stable=True)
    prom_l = jnp.argsort(~prom, stable=True)
    nd, npr = jnp.sum(dem), jnp.sum(prom)
    npair = jnp.minimum(nd, npr)

    def swap(i, st):
      x, y = dem_l[i], prom_l[i]
      gx, gy = st.slot[layer, x], st.slot[layer, y]
      kx, vx = self._decode(st, A, gx, spec.dtype)
      ky, vy = self._decode(st, B, gy, spec.dtype)
      st = self._put(st, B, layer, x, kx, vx, g=gy)
      return self._put(st, A, layer, y, ky, vy, g=gx)

    def move(src, dst, lst):
      def fn(i, st):
        x = lst[i]
        g = st.slot[layer, x]
        kx, vx = self._decode(st, src, g, spec.dtype)
        return self._put(self._release(st, src, g), dst, layer, x, kx, vx)
      return fn

    st = jax.lax.fori_loop(0, npair, swap, st)
    st = jax.lax.fori_loop(npair, nd, move(A, B, dem_l), st)
    st = jax.lax.fori_loop(npair, npr, move(B, A, prom_l), st)

    # 5. The new block's frames, encoded once from exact values.
    for i, pos in enumerate(new_pos):
      t = target[pos]
      fk, fv = xk[:, i:i + 1], xv[:, i:i + 1]
      st = jax.lax.switch(jnp.clip(t, 0, 2), [
          lambda st: self._put(st, A, layer, pos, fk, fv),
          lambda st: self._put(st, B, layer, pos, fk, fv),
          lambda st: self._prune(st, layer, pos, fk.astype(f32), fv.astype(f32))], st)
    return st.replace(frames=st.frames.at[layer].set(s + bf))

  def sources(self, state: FlowState, layer):
    spec = state.spec
    if spec.capacity_frames == 0:
      return []
    lay = self.layout(spec)
    hi, lo = self.codecs()
    out = []
    for which, codec, owner, fields in ((A, hi, state.a_owner, state.a), (B, lo, state.b_owner, state.b)):
      caps = lay['cap_a' if which == A else 'cap_b']
      if int(np.max(caps, initial=0)) == 0:
        continue
      base = jnp.asarray(lay['base_a' if which == A else 'base_b'], jnp.int32)[layer]
      cap = jnp.asarray(caps, jnp.int32)[layer]
      out.append(store_source(fields, owner, base, cap, codec, spec.frame_tokens))
    if self.plan_kind == 'prune':
      out.append(summary_source(state, layer, math.log(spec.frame_tokens),
                                masked=(self.kind == 'prune' and self.prune_mode == 'mask')))
    return out

  def expand_source(self, src, spec: CacheSpec):
    """Stored frames decoded; a pruned chunk's summary token expanded to its ``count`` tokens."""
    k, v, bias = kernels.materialize_source(src)
    if src.bias is None:
      return k, v, bias
    p = spec.frame_tokens                             # the summary: a token stands for p tokens
    return (jnp.repeat(k, p, axis=1), jnp.repeat(v, p, axis=1),
            jnp.repeat(jnp.where(jnp.isfinite(bias), 0.0, -jnp.inf), p, axis=1))


@functools.lru_cache(maxsize=64)
def _flow_layout(method: FlowCache, spec: CacheSpec):
  budgets = layer_budgets(method.budget, spec.num_layers, method.budget_min, method.budget_max)
  c, bf = spec.capacity_frames, spec.block_frames
  horizon = spec.total_frames or (c + bf)
  cap_a, cap_b = np.zeros(spec.num_layers, np.int64), np.zeros(spec.num_layers, np.int64)
  for l, bud in enumerate(budgets):
    for written in range(bf, max(horizon, bf) + bf, bf):
      n_hist = min(written, c)
      rec, imp, ret, _, n_old = (int(x) for x in plan_counts(
          n_hist, bf, bud, method.plan_kind, method.recent_ratio, method.important_ratio,
          method.retained_ratio))
      if method.plan_kind in ('hybrid', 'adaptive'):
        a, b_ = rec + imp, n_old - imp
      elif method.retained_in_a():
        a, b_ = rec + imp + ret, 0
      else:
        a, b_ = rec + imp, ret
      cap_a[l], cap_b[l] = max(cap_a[l], a), max(cap_b[l], b_)
  base_a = np.concatenate([[0], np.cumsum(cap_a)[:-1]])
  base_b = np.concatenate([[0], np.cumsum(cap_b)[:-1]])
  return {'budgets': budgets, 'cap_a': cap_a, 'cap_b': cap_b, 'base_a': base_a, 'base_b': base_b,
          'ra': max(int(cap_a.sum()), 1), 'rb': max(int(cap_b.sum()), 1)}
