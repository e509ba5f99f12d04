"""FlowCache-inspired methods (spec 3.9): frame-chunk tiers planned per layer from a budget,
recency and a chunk-importance score; low tiers re-encoded at fewer bits, pruned or summarized.

Chunks are latent frames. Tier sizes (per layer l, budget b = budget(l), a plan over n chunks;
the table is computed on the host, ``plan.count_table``):
  n_recent = clamp(round(min(recent_ratio * b, 1) * n), 1, n)   the newest chunks -> INT4
  old = the other n_old = n - n_recent chunks
  HYBRID   : old -> INT2
  ADAPTIVE : the n_imp = clamp(round(important_ratio * b * n_old), 1, n_old) old chunks of highest
             score -> INT4, other old -> INT2
  PRUNE    : the n_imp best old (important_ratio 0.1) -> INT4; of the remaining n_rem the best
             n_ret = clamp(round(retained_ratio * b * n_rem), 1, n_rem) -> retained at ``bits``;
             the rest pruned.
score = alpha * delta + beta * rec, rec = linspace(0, 1, n) (computed as j / (n - 1), which may
differ from torch's linspace in the last bit: only an exact score tie could notice); delta = the
relative L1 change of the chunk's summary (per head: mean |K| + mean |V|) against the previous
plan's list, tail-aligned as the study (``delta_alignment='tail'``: after a new block row j meets
the old row j - 3, weakness W9) or matched by frame (``'frame'``, the fix). Old chunks of equal
score rank older first (the study's unsorted torch.topk leaves ties unspecified).

How the study planned (spec 3.9, 5.2, 5.4), the defaults: its hook re-quantized the active prefix
of its buffer after the attention of every DiT call, the current block's K/V of that call
included (noisy on the four denoising calls), and the next call read that state.

- ``plan_scope='written'``: a plan covers every frame written so far plus the block being
  generated (n = 3b + 3 chunks during block b, up to 42), frames outside the attention window
  included. Their tier membership is kept per frame (``FlowState.tier``, ``census``); only the
  attended window is stored. ``'window'`` (kvjax): the frames in the attention window.
- ``plan_cadence='every_call'``: the model calls ``recode`` after each layer's attention on every
  DiT call. HYBRID and ADAPTIVE replan on each of them; PRUNE and SOFT_PRUNE only on the first
  call of each block (the study's rule "the chunk count changed"; over all written frames the
  count changes exactly when a block starts), and keep that plan for the block. The block's own
  chunks are in the plan, scored from that call's K/V, and the plan also gives the block's frames
  the tiers they are stored in when the context pass appends them. The plan made after call c is
  read by call c + 1: the first call of block b reads the plan of block b - 1's last call, e.g.
  HYBRID's INT4 history is r(3b) frames on call 1 and r(3b + 3) - 3 on calls 2-5 (r = n_recent).
  ``'per_block'``: one plan a block, when the context pass appends it (the block's clean chunks
  in the plan; no ``recode``). ``'ahead'`` (kvjax): one plan a block at the append, for the next
  block, which is counted as ``block_frames`` chunks that are always recent and never scored.
- ``plan_scores='decoded'``: chunk summaries are those of what the cache holds: the current
  reconstruction of every stored frame (INT4 or INT2 decode), zeros for a pruned chunk under
  PRUNE, the pooled constant under SOFT_PRUNE; the block's from its exact K/V. (A pruned chunk's
  zero summary then divides the next paired delta by the 1e-6 floor, the study's mean delta of
  ~2e5.) ``'exact'`` (kvjax): summaries of the exact K/V at append, the pooled token's once pruned.
- ``prune_final=False``: the study's later plans may select a pruned chunk as important or
  retained: it is then stored in that tier, re-encoded from its pruned content (zeros, or the
  pooled constant), and counts in that tier. ``True`` (kvjax): a pruned chunk stays pruned
  (``prune_mode='mask'`` implies it: a dropped chunk never comes back as zero keys).

Deviations that remain: frames outside the window are not stored, so their summaries after a
tier change are estimated (computed when the frame leaves the window: the summary of its
reconstruction re-encoded at ``bits`` for a demotion, of its pooled token for a pruning;
promotions and re-selections keep the summary); a frame whose tier is unchanged is not re-encoded
(symmetric RTN re-encoding is idempotent: exactly in float32, up to BF16 rounding of the
reconstruction in BF16). An emulation of the study's hook (tests/cache/flowcache_test.py) gives
the same tier for every written frame on every call of a 10-block rollout through a 9-frame
history window, frames outside the window included.

kvjax's planning before issue 9 is plan_scope='window', plan_cadence='ahead',
plan_scores='exact', prune_final=True.

Pruned chunks (hard): the study zeroes them and they keep softmax mass (1,560 zero keys ->
weight 1,560 * exp(0)); kvjax stores one zero key with logit bias log(count)
(``prune_mode='zero'``, the paper's semantics without expansion) or drops them
(``prune_mode='mask'``, the fix). Soft-pruned chunks become one summary token (mean K, mean V
over the chunk's reconstruction, float32 mean stored in the cache dtype) with bias log(count).
Demotions and promotions re-encode the current reconstruction, as the study's re-quantization.

Storage: per tier a slot store whose per-layer capacity is the largest count of window frames
the size table allows in that tier for that layer (``_flow_layout``), laid out flat across
layers, so a layer with a small budget does not pay for a large one. Plan and capacities read the
same integer table, so no plan can overflow a layer's slots. With plan_scope='written' the INT4
share of the window grows as the video gets longer (the plan's recent chunks are r(n) of all n
written frames) while the INT2 share peaks early; each store is sized for its own peak, so the
two hold more slots than the window has frames (HYBRID_INT2 at 42 frames through a 21-frame
window, MovieGen budgets: 25.7 slots a layer for 18 history frames, against 18 with 'window').

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
from kvjax.cache.base import AppendInfo, CacheMethod, CacheSpec, frame_slot, ordered_after
from kvjax.cache.flowcache.plan import (block_summaries, chunk_deltas, chunk_list, count_table,
                                        frame_summary, layer_budgets)
from kvjax.cache.ring import write_record
from kvjax.kernels.source import record_at
from kvjax.kernels import packing
from kvjax.numerics import from_storage, storage_dtype, to_storage

f32 = jnp.float32
A, B, PRUNED = 0, 1, 2
SCOPES = ('written', 'window')
PLAN_CADENCES = ('every_call', 'per_block', 'ahead')
SCORES = ('decoded', 'exact')


@struct.dataclass
class FlowState:
  """FlowCache's state. C = ``capacity_frames`` ring positions, S = plan slots (a slot per frame
  of the rollout, ``total_frames``, with plan_scope='written'; the ring positions with 'window'),
  bf = ``block_frames``."""
  a: dict                 # high tier records, [1, B, R_A, ...] (flat over layers)
  b: dict                 # low tier records, [1, B, R_B, ...]
  a_owner: jax.Array      # [R_A] ring position owning the record, -1 free
  b_owner: jax.Array      # [R_B]
  sum_k: jax.Array        # [L, B, C, N, H] summary / zero tokens of pruned chunks (raw bits)
  sum_v: jax.Array
  sum_ok: jax.Array       # [L, C] bool: ring position holds a pruned chunk
  frame_of: jax.Array     # [L, C] absolute frame at ring position, -1 empty
  where: jax.Array        # [L, C] how the ring position is held: 0 = A, 1 = B, 2 = pruned, -1 empty
  slot: jax.Array         # [L, C] record index in its store
  pframe: jax.Array       # [L, S] frame of each plan slot, -1 none
  tier: jax.Array         # [L, S] the frame's tier in the plan (A, B, PRUNED), -1 not yet placed
  summ: jax.Array         # [L, S, N] the frame's chunk summary (see plan_scores)
  summ_lo: jax.Array      # [L, S or 0, N] estimates for frames outside the window: demoted,
  summ_pool: jax.Array    #   pruned (plan_scope='written' only)
  prev_summ: jax.Array    # [L, S + bf, N] the previous plan's list (in frame order)
  prev_frame: jax.Array   # [L, S + bf] its frames (-1 past its end)
  prev_n: jax.Array       # [L] its length
  plan_block: jax.Array   # [L] first frame of the block the last plan was made on, -1 none
  vtier: jax.Array        # [L, bf] the tiers that plan gave that block's frames
  frames: jax.Array       # [L] frames appended
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


def _frame(x, i):
  """Frame i of x [B, F, P, N, H] (i may be traced) -> [B, 1, P, N, H]."""
  return jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1)


def _summary(xk, xv):
  """xk, xv [B, 1, P, N, H] -> [N] float32 chunk summary."""
  return frame_summary(xk[:, 0]) + frame_summary(xv[:, 0])


@dataclasses.dataclass(frozen=True)
class FlowCache(CacheMethod):
  """The FlowCache tier store (module docstring). Parameters beyond the study's ratios:

  Attributes:
    plan_scope: 'written' (the study: all frames written so far) or 'window' (kvjax: the
      attended window's frames). 'written' needs ``CacheSpec.total_frames``.
    plan_cadence: 'every_call' (the study: after every DiT call through ``recode``; PRUNE kinds
      once a block, at its first call), 'per_block' (at the context pass's append) or 'ahead'
      (kvjax: at the append, planning for the next block).
    plan_scores: 'decoded' (the study: summaries of what the cache holds) or 'exact' (kvjax).
    prune_final: False (the study: a later plan may re-select a pruned chunk, which keeps its
      pruned content) or True (kvjax: pruned stays pruned; implied by prune_mode='mask').
    prune_mode: 'zero' (the study's zero keys, as one token with bias log(count)) or 'mask'.
    delta_alignment: 'tail' (the study) or 'frame'.
  """
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
  plan_scope: str = 'written'
  plan_cadence: str = 'every_call'
  plan_scores: str = 'decoded'
  prune_final: bool = False
  FIXES = {'plan_scope': 'window', 'plan_cadence': 'ahead', 'plan_scores': 'exact',
           'prune_final': True, 'delta_alignment': 'frame'}
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
    for name, value, valid in (('delta_alignment', self.delta_alignment, ('tail', 'frame')),
                               ('prune_mode', self.prune_mode, ('zero', 'mask')),
                               ('plan_scope', self.plan_scope, SCOPES),
                               ('plan_cadence', self.plan_cadence, PLAN_CADENCES),
                               ('plan_scores', self.plan_scores, SCORES)):
      if value not in valid:
        raise ValueError(f'{name} must be one of {list(valid)} (got {value!r})')

  @property
  def cadence(self) -> str:
    """'every_call' with plan_cadence='every_call' (the model calls ``recode`` after each layer's
    attention on every DiT call); otherwise 'once' (plans are made in ``append``)."""
    return 'every_call' if self.plan_cadence == 'every_call' else 'once'

  # ------------------------------------------------------------------ static layout
  @property
  def plan_kind(self):
    return 'prune' if self.kind == 'soft_prune' else self.kind

  @property
  def final_pruning(self) -> bool:
    return self.prune_final or self.prune_mode == 'mask'

  def codecs(self):
    hi = C.SymRTN(self.recent_bits, self.group_size)
    lo = C.SymRTN(self.bits, self.group_size)
    return hi, lo

  def retained_in_a(self) -> bool:
    return self.plan_kind == 'prune' and self.bits == self.recent_bits

  def plan_slots(self, spec: CacheSpec) -> int:
    """S: one per frame of the rollout (plan_scope='written') or per ring position ('window')."""
    if self.plan_scope == 'written':
      return spec.require_total_frames(f"{self.name or 'FlowCache'} with plan_scope='written'")
    return spec.capacity_frames

  def _pslot(self, frame, spec: CacheSpec):
    """Plan slot of absolute frame ``frame`` (int32, may be traced)."""
    return frame if self.plan_scope == 'written' else frame_slot(frame, spec).astype(jnp.int32)

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
    ns, bf = lay['slots'], spec.block_frames
    ns_out = ns if self.plan_scope == 'written' else 0

    def store(codec, r):
      return {name: jnp.zeros((1, f.shape[0], r) + f.shape[2:], f.dtype)
              for name, f in codec.fields(b, 1, p, n, h).items()}

    sd = storage_dtype(spec.dtype)
    return FlowState(
        a={'k': store(hi, lay['ra']), 'v': store(hi, lay['ra'])},
        b={'k': store(lo, lay['rb']), 'v': store(lo, lay['rb'])},
        a_owner=jnp.full((lay['ra'],), -1, jnp.int32), b_owner=jnp.full((lay['rb'],), -1, jnp.int32),
        sum_k=jnp.zeros((l, b, c, n, h), sd), sum_v=jnp.zeros((l, b, c, n, h), sd),
        sum_ok=jnp.zeros((l, c), bool), frame_of=jnp.full((l, c), -1, jnp.int32),
        where=jnp.full((l, c), -1, jnp.int32), slot=jnp.zeros((l, c), jnp.int32),
        pframe=jnp.full((l, ns), -1, jnp.int32), tier=jnp.full((l, ns), -1, jnp.int32),
        summ=jnp.zeros((l, ns, n), f32), summ_lo=jnp.zeros((l, ns_out, n), f32),
        summ_pool=jnp.zeros((l, ns_out, n), f32), prev_summ=jnp.zeros((l, ns + bf, n), f32),
        prev_frame=jnp.full((l, ns + bf), -1, jnp.int32), prev_n=jnp.zeros((l,), jnp.int32),
        plan_block=jnp.full((l,), -1, jnp.int32), vtier=jnp.zeros((l, bf), jnp.int32),
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

  def _note(self, st, layer, pos, tier, summ=None):
    """Records the tier (and summary) of the frame at ring position ``pos`` in its plan slot."""
    ps = self._pslot(st.frame_of[layer, pos], st.spec)
    st = st.replace(tier=st.tier.at[layer, ps].set(tier))
    return st if summ is None else st.replace(summ=st.summ.at[layer, ps].set(summ))

  def _put(self, st, which, layer, pos, xk, xv, g=None):
    """Encodes xk, xv [B, 1, P, N, H] into store ``which`` (at g, or the first free slot)."""
    spec = st.spec
    lay = self.layout(spec)
    codec = self.codecs()[0 if which == A else 1]
    fields, owner = self._store(st, which)
    base = jnp.asarray(lay['base_a' if which == A else 'base_b'], jnp.int32)[layer]
    cap = jnp.asarray(lay['cap_a' if which == A else 'cap_b'], jnp.int32)[layer]
    if g is None:
      g = self._free_slot(owner, base, cap)
    rk, rv = codec.encode(xk), codec.encode(xv)
    fields = {'k': write_record(fields['k'], 0, g, rk), 'v': write_record(fields['v'], 0, g, rv)}
    owner = owner.at[g].set(pos)
    st = self._set_store(st, which, fields, owner)
    st = st.replace(where=st.where.at[layer, pos].set(which), slot=st.slot.at[layer, pos].set(g))
    summ = None
    if self.plan_scores == 'decoded':                       # what the cache now holds
      summ = _summary(codec.decode(rk, spec.dtype), codec.decode(rv, spec.dtype))
    return self._note(st, layer, pos, which, summ)

  def _release(self, st, which, g):
    fields, owner = self._store(st, which)
    return self._set_store(st, which, fields, owner.at[g].set(-1))

  def _pool(self, xk, xv):
    """The pruned representation of a chunk xk, xv [B, 1, P, N, H]: per (batch, head, channel)
    the float32 mean over its tokens (SOFT_PRUNE) or zeros (PRUNE): kt, vt [B, N, H] float32."""
    if self.kind == 'soft_prune':
      return jnp.mean(xk.astype(f32), axis=(1, 2)), jnp.mean(xv.astype(f32), axis=(1, 2))
    z = jnp.zeros((xk.shape[0],) + xk.shape[3:], f32)
    return z, z

  def _prune(self, st, layer, pos, xk, xv):
    """Stores the pruned chunk at ring position ``pos`` as one token (from xk, xv [B, 1, P, N, H])."""
    spec = st.spec
    kt, vt = self._pool(xk, xv)
    kt, vt = to_storage(kt, spec.dtype), to_storage(vt, spec.dtype)
    held_k, held_v = from_storage(kt, spec.dtype), from_storage(vt, spec.dtype)
    summ = _summary(held_k[:, None, None], held_v[:, None, None])
    st = st.replace(sum_k=st.sum_k.at[layer, :, pos].set(kt),
                    sum_v=st.sum_v.at[layer, :, pos].set(vt),
                    sum_ok=st.sum_ok.at[layer, pos].set(True),
                    where=st.where.at[layer, pos].set(PRUNED))
    return self._note(st, layer, pos, PRUNED, summ)

  def _leave(self, st, layer, pos):
    """plan_scope='written': the frame at ring position ``pos`` leaves the window. Its tier stays
    in the plan; the summaries it would have if demoted or pruned later are computed now."""
    spec = st.spec
    frame = st.frame_of[layer, pos]
    held, g = st.where[layer, pos], st.slot[layer, pos]
    ps = jnp.maximum(frame, 0)
    lo = self.codecs()[1]

    def stored(which):
      def fn(st):
        kx, vx = self._decode(st, which, g, spec.dtype)
        if which == A:
          lk, lv = lo.encode(kx), lo.encode(vx)
          s_lo = _summary(lo.decode(lk, spec.dtype), lo.decode(lv, spec.dtype))
        else:
          s_lo = st.summ[layer, ps]
        kt, vt = self._pool(kx, vx)
        kt = from_storage(to_storage(kt, spec.dtype), spec.dtype)
        vt = from_storage(to_storage(vt, spec.dtype), spec.dtype)
        return s_lo, _summary(kt[:, None, None], vt[:, None, None])
      return fn

    def pruned(st):
      return st.summ[layer, ps], st.summ[layer, ps]

    s_lo, s_pool = jax.lax.switch(jnp.clip(held, 0, 2), [stored(A), stored(B), pruned], st)
    keep = (frame >= 0) & (held >= 0)
    return st.replace(
        summ_lo=st.summ_lo.at[layer, ps].set(jnp.where(keep, s_lo, st.summ_lo[layer, ps])),
        summ_pool=st.summ_pool.at[layer, ps].set(jnp.where(keep, s_pool, st.summ_pool[layer, ps])))

  # ------------------------------------------------------------------ the plan
  def _event(self, st, layer, block_start, blk_summ=None):
    """One plan of the layer (spec 3.9.2-3.9.4).

    The list is the plan's frames (``pframe``) in frame order, then, with ``blk_summ`` [bf, N],
    the block at ``block_start`` being generated (chunks scored from that call's K/V); with
    plan_cadence='ahead' ``block_frames`` more chunks are counted (never listed, never old).
    Returns (target [S]: the tier of every listed frame, -1 elsewhere; vt [bf]: the block's
    tiers; the state with this list saved as the previous one).
    """
    spec = st.spec
    lay = self.layout(spec)
    bf = spec.block_frames
    order, n_hist, j, lframe, lsumm, n_list = chunk_list(st.pframe[layer], st.summ[layer], bf,
                                                         blk_summ, block_start)
    s, size = order.shape[0], j.shape[0]
    in_hist = j < n_hist
    lslot = jnp.concatenate([order.astype(jnp.int32), jnp.full((bf,), -1, jnp.int32)])
    n = n_list + lay['extra']
    counts = jnp.asarray(lay['table'])[layer, n]                       # (n_old, n_imp, n_ret)
    n_old, n_imp, n_ret = counts[0], counts[1], counts[2]
    in_list = j < n_list
    is_old = j < n_old

    delta = chunk_deltas(lsumm, lframe, n_list, st.prev_summ[layer], st.prev_frame[layer],
                         st.prev_n[layer], self.delta_alignment)
    rec = j.astype(f32) / jnp.maximum(n - 1, 1).astype(f32)
    score = self.alpha * delta + self.beta * rec

    key = jnp.where(is_old, -score, jnp.inf)
    rank = jnp.argsort(jnp.argsort(key, stable=True), stable=True)       # 0 = best old chunk
    if self.plan_kind == 'hybrid':
      tier_old = jnp.full((size,), B)
    elif self.plan_kind == 'adaptive':
      tier_old = jnp.where(rank < n_imp, A, B)
    else:
      ret_tier = A if self.retained_in_a() else B
      tier_old = jnp.where(rank < n_imp, A, jnp.where(rank < n_imp + n_ret, ret_tier, PRUNED))
    tier_list = jnp.where(in_list, jnp.where(is_old, tier_old, A), -1).astype(jnp.int32)
    target = jnp.full((s,), -1, jnp.int32).at[jnp.where(in_hist, lslot, s)].set(
        tier_list, mode='drop')
    vt = tier_list[jnp.clip(n_hist + jnp.arange(bf), 0, size - 1)]
    st = st.replace(
        prev_summ=st.prev_summ.at[layer].set(jnp.where(in_list[:, None], lsumm, 0.0)),
        prev_frame=st.prev_frame.at[layer].set(jnp.where(in_list, lframe, -1)),
        prev_n=st.prev_n.at[layer].set(n_list))
    return target, vt, st

  def _apply(self, st, layer, target):
    """Moves the layer's frames to their ``target`` tiers [S] (-1: unchanged): the stored ones
    re-encoded frame by frame from their reconstruction, those outside the window (plan_scope
    'written') re-labelled with an estimated summary."""
    spec = st.spec
    dt = spec.dtype
    tier = st.tier[layer]
    if self.final_pruning:
      target = jnp.where((tier == PRUNED) & (target >= 0), PRUNED, target)

    if self.plan_scope == 'written':
      pf = st.pframe[layer]
      ring = frame_slot(jnp.maximum(pf, 0), spec)
      outside = (pf >= 0) & (st.frame_of[layer][ring] != pf) & (target >= 0)
      to_pruned = outside & (target == PRUNED) & (tier != PRUNED)
      demoted = outside & (target == B) & (tier == A)
      summ = st.summ[layer]
      summ = jnp.where(to_pruned[:, None], st.summ_pool[layer], summ)
      if self.plan_scores == 'decoded':
        summ = jnp.where(demoted[:, None], st.summ_lo[layer], summ)
      st = st.replace(summ=st.summ.at[layer].set(summ),
                      tier=st.tier.at[layer].set(jnp.where(outside, target, tier)))

    # The stored frames, by ring position.
    fo = st.frame_of[layer]
    ps = self._pslot(jnp.maximum(fo, 0), spec)
    tr = jnp.where(fo >= 0, target[ps], -1)                              # [C]
    held = st.where[layer]

    def prune_one(i, st):
      pos = order_prune[i]
      w, g = st.where[layer, pos], st.slot[layer, pos]

      def from_store(which):
        def fn(st):
          kx, vx = self._decode(st, which, g, dt)
          return self._prune(self._release(st, which, g), layer, pos, kx, vx)
        return fn
      return jax.lax.switch(w, [from_store(A), from_store(B)], st)

    prune_mask = ((held == A) | (held == B)) & (tr == PRUNED)
    order_prune = jnp.argsort(~prune_mask, stable=True)
    st = jax.lax.fori_loop(0, jnp.sum(prune_mask), prune_one, st)

    # Moves between tiers: swap pairs first, then the remainder (capacities are exact).
    dem = (held == A) & (tr == B)
    prom = (held == B) & (tr == A)
    dem_l = jnp.argsort(~dem, stable=True)
    prom_l = jnp.argsort(~prom, stable=True)
    nd, npr = jnp.sum(dem), jnp.sum(prom)
    npair = jnp.minimum(nd, npr)

    def swap(i, st):
      x, y = dem_l[i], prom_l[i]
      gx, gy = st.slot[layer, x], st.slot[layer, y]
      kx, vx = self._decode(st, A, gx, dt)
      ky, vy = self._decode(st, B, gy, dt)
      # Both records are read before either is overwritten: without this data dependency XLA
      # keeps the reads valid by copying both whole stores.
      token = sum(x.reshape(-1)[0].astype(f32) for x in (kx, vx, ky, vy))
      st = self._put(st, B, layer, x, kx, vx, g=ordered_after(gy, token))
      return self._put(st, A, layer, y, ky, vy, g=ordered_after(gx, token))

    def move(src, dst, lst):
      def fn(i, st):
        x = lst[i]
        g = st.slot[layer, x]
        kx, vx = self._decode(st, src, g, dt)
        return self._put(self._release(st, src, g), dst, layer, x, kx, vx)
      return fn

    st = jax.lax.fori_loop(0, npair, swap, st)
    st = jax.lax.fori_loop(npair, nd, move(A, B, dem_l), st)
    st = jax.lax.fori_loop(npair, npr, move(B, A, prom_l), st)

    # A pruned chunk the plan selects again: its pruned content re-encoded in the new tier.
    back = (held == PRUNED) & ((tr == A) | (tr == B))
    back_l = jnp.argsort(~back, stable=True)
    shape = (spec.batch, 1, spec.frame_tokens, spec.num_heads, spec.head_dim)

    def bring_back(i, st):
      pos = back_l[i]
      kx = jnp.broadcast_to(from_storage(st.sum_k[layer, :, pos], dt)[:, None, None], shape)
      vx = jnp.broadcast_to(from_storage(st.sum_v[layer, :, pos], dt)[:, None, None], shape)
      st = st.replace(sum_ok=st.sum_ok.at[layer, pos].set(False))
      return self._to_tier(st, tr[pos], layer, pos, kx, vx, (A, B))

    if not self.final_pruning:
      st = jax.lax.fori_loop(0, jnp.sum(back), bring_back, st)
    return st

  def _to_tier(self, st, t, layer, pos, xk, xv, tiers=(A, B, PRUNED)):
    """Stores xk, xv [B, 1, P, N, H] at ring position ``pos`` in tier t (traced, one of
    ``tiers``). One conditional per tier: a single conditional whose branches write different
    stores makes XLA copy the stores."""
    for which in tiers:
      put = ((lambda st, w=which: self._put(st, w, layer, pos, xk, xv)) if which != PRUNED
             else (lambda st: self._prune(st, layer, pos, xk, xv)))
      st = jax.lax.cond(t == which, put, lambda st: st, st)
    return st

  # ------------------------------------------------------------------ protocol
  def recode(self, state: FlowState, layer, k, v, info: AppendInfo) -> FlowState:
    """plan_cadence='every_call': the study's plan after a DiT call's attention at ``layer``.

    k, v: [B, block_frames * frame_tokens, N, H], this call's K/V of the block starting at
    ``info.start_frame`` (noisy on denoising calls, clean on the context pass, which appends
    the block after this). HYBRID/ADAPTIVE replan on every call; PRUNE kinds on the block's first
    call only. Nothing happens once the block is appended."""
    spec = state.spec
    if self.plan_cadence != 'every_call' or spec.capacity_frames == 0:
      return state
    blk = block_summaries(k, v, spec.block_frames, spec.frame_tokens)
    s = jnp.asarray(info.start_frame, jnp.int32)
    go = state.frames[layer] == s
    if self.plan_kind == 'prune':
      go = go & (state.plan_block[layer] != s)

    def plan(st):
      target, vt, st = self._event(st, layer, s, blk)
      st = self._apply(st, layer, target)
      return st.replace(vtier=st.vtier.at[layer].set(vt), plan_block=st.plan_block.at[layer].set(s))

    return jax.lax.cond(go, plan, lambda st: st, state)

  def append(self, state: FlowState, layer, k, v, info: AppendInfo) -> FlowState:
    spec = state.spec
    c, bf, p = spec.capacity_frames, spec.block_frames, spec.frame_tokens
    if c == 0:
      return state
    b, _, n, h = k.shape
    xk = k.reshape(b, bf, p, n, h)
    xv = v.reshape(b, bf, p, n, h)
    s = jnp.asarray(info.start_frame, jnp.int32)
    st = state

    # 1. New frames take their ring positions; the frames there leave the window.
    def enter(i, st):
      pos = frame_slot(s + i, spec).astype(jnp.int32)
      if self.plan_scope == 'written':
        st = self._leave(st, layer, pos)
      w, g = st.where[layer, pos], st.slot[layer, pos]
      st = jax.lax.cond(w == A, lambda t: self._release(t, A, g), lambda t: t, st)
      st = jax.lax.cond(w == B, lambda t: self._release(t, B, g), lambda t: t, st)
      ps = self._pslot(s + i, spec)
      fk, fv = _frame(xk, i), _frame(xv, i)
      return st.replace(frame_of=st.frame_of.at[layer, pos].set(s + i),
                        where=st.where.at[layer, pos].set(-1),
                        sum_ok=st.sum_ok.at[layer, pos].set(False),
                        pframe=st.pframe.at[layer, ps].set(s + i),
                        tier=st.tier.at[layer, ps].set(-1),
                        summ=st.summ.at[layer, ps].set(_summary(fk, fv)))

    st = jax.lax.fori_loop(0, bf, enter, st)

    # 2. The plan: this block's (made by recode on its calls), or one made now.
    def plan_now(st):
      target, _, st = self._event(st, layer, s + bf)
      st = self._apply(st, layer, target)
      tiers = jnp.stack([target[self._pslot(s + i, spec)] for i in range(bf)])
      return st.replace(plan_block=st.plan_block.at[layer].set(s),
                        vtier=st.vtier.at[layer].set(tiers))

    if self.plan_cadence == 'every_call':
      # The writing branch goes first: as the false branch, XLA (CPU) copies both stores.
      st = jax.lax.cond(st.plan_block[layer] != s, plan_now, lambda st: st, st)
    else:
      st = plan_now(st)
    tiers = st.vtier[layer]

    # 3. The new block's frames, encoded once from exact values.
    def place(i, st):
      pos = frame_slot(s + i, spec).astype(jnp.int32)
      return self._to_tier(st, tiers[i], layer, pos, _frame(xk, i), _frame(xv, i))

    st = jax.lax.fori_loop(0, bf, place, st)
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

  @staticmethod
  def census(state: FlowState) -> dict[str, np.ndarray]:
    """Frames per tier (columns A, B, PRUNED) and layer, on the host: ``'plan'`` [L, 3] over the
    frames the plan covers (every written frame with plan_scope='written', the window's with
    'window'), ``'window'`` [L, 3] over the attended history (the ring)."""
    tier, held = np.asarray(state.tier), np.asarray(state.where)
    return {'plan': np.stack([(tier == t).sum(1) for t in (A, B, PRUNED)], 1),
            'window': np.stack([(held == t).sum(1) for t in (A, B, PRUNED)], 1)}


@functools.lru_cache(maxsize=64)
def _flow_layout(method: FlowCache, spec: CacheSpec):
  """Budgets, the per-layer size tables [L, n_max + 1, 3] (n_old, n_imp, n_ret) the compiled
  plan reads, and the tier stores' capacities.

  A layer's capacity for a tier is the most window frames that tier can hold over every plan
  length n up to n_max, from the same table: a plan's recent chunks are the newest, so the window
  holds them (the block's own chunks, listed on its noisy calls, are not stored yet); the other
  stored frames are old, and only n_imp (+ n_ret where retained is INT4) of those are INT4.
  Moves between tiers never exceed the larger of the counts before and after (``_apply``).
  """
  budgets = layer_budgets(method.budget, spec.num_layers, method.budget_min, method.budget_max)
  c, bf, sink = spec.capacity_frames, spec.block_frames, spec.sink_frames
  slots = method.plan_slots(spec)
  extra = bf if method.plan_cadence == 'ahead' else 0
  listed_max = slots + (bf if method.plan_cadence == 'every_call' and method.plan_scope == 'window'
                        else 0)
  n_max = listed_max + extra
  tables = np.stack([count_table(float(bud), method.plan_kind, method.recent_ratio,
                                 method.important_ratio, method.retained_ratio, n_max, extra)
                     for bud in budgets])
  n = np.arange(n_max + 1)
  n_old, n_imp, n_ret = tables[..., 0], tables[..., 1], tables[..., 2]
  listed_recent = np.maximum(n - extra, 0) - n_old              # the block's chunks included
  if method.plan_kind in ('hybrid', 'adaptive'):
    hi_old, lo_all = n_imp, n_old - n_imp
  elif method.retained_in_a():
    hi_old, lo_all = n_imp + n_ret, np.zeros_like(n_old)
  else:
    hi_old, lo_all = n_imp, n_ret
  cap_a = np.zeros(spec.num_layers, np.int64)
  cap_b = np.zeros(spec.num_layers, np.int64)
  for unstored in ((0, bf) if method.plan_cadence == 'every_call' else (0,)):
    stored = np.clip(n - extra - unstored, 0, c)
    recent = np.clip(listed_recent - unstored, 0, stored)        # the newest: in the window
    surely_held = np.minimum(recent, c - sink)                   # (sinks hold the oldest)
    cap_a = np.maximum(cap_a, np.minimum(recent + hi_old, stored).max(axis=1, initial=0))
    cap_b = np.maximum(cap_b, np.minimum(lo_all, stored - surely_held).max(axis=1, initial=0))
  base_a = np.concatenate([[0], np.cumsum(cap_a)[:-1]]).astype(np.int64)
  base_b = np.concatenate([[0], np.cumsum(cap_b)[:-1]]).astype(np.int64)
  return {'budgets': budgets, 'table': tables.astype(np.int32), 'extra': extra, 'slots': slots,
          'cap_a': cap_a, 'cap_b': cap_b, 'base_a': base_a, 'base_b': base_b,
          'ra': max(int(cap_a.sum()), 1), 'rb': max(int(cap_b.sum()), 1)}
