"""FlowCache planning as the study ran it (spec 3.9, 5.2, 5.4), and the plan's integer sizes.

The study's hook re-quantized the active prefix after the attention of every DiT call (4 noisy
calls and the clean context pass a block) and the next call read that state. ``_drive`` runs the
same call sequence through the method (``recode`` after each call, ``append`` on the context
pass) and records what every call's attention reads. References, written from the spec:

- HYBRID: the closed form. INT4 history frames are r(3b) on a block's first call and
  r(3b + 3) - 3 on calls 2-5, r(n) = clamp(round(min(0.25 * budget, 1) * n), 1, n).
- ADAPTIVE, PRUNE, SOFT_PRUNE: ``Study``, an emulation of the study's quantizers under its hook:
  a buffer of every written frame's reconstruction, the call's block written into it, plans made
  from the buffer's summaries and the buffer re-quantized tier by tier. (Its RTN is kvjax's codec:
  what is under test is the planning.)

Negative controls rerun the reference with the old behaviour (the plan over the window only, the
plan read by the call that made it, scores of the exact K/V, pruning final) and require it to
disagree with the method. Ties between equal scores rank the older chunk first in both (the
study's unsorted topk leaves them unspecified).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.cache import AppendInfo, CacheSpec
from kvjax.cache import codecs as C
from kvjax.cache.flowcache import A, B, PRUNED, FlowCache, count_table, layer_budgets
from kvjax.cache.flowcache import MOVIEGEN_BUDGETS
from kvjax.kernels.source import record_at

SPEC = CacheSpec(batch=1, num_layers=2, num_heads=2, head_dim=16, frame_tokens=16, block_frames=3,
                 window_frames=12, dtype=jnp.float32, total_frames=30)
BLOCKS = 10
SIGMAS = (1.0, 0.9, 0.7, 0.4, 0.0)          # a block's 4 noisy calls, then the clean context pass
KVJAX_PLANNING = dict(plan_scope='window', plan_cadence='ahead', plan_scores='exact',
                      prune_final=True)
TIER = {A: 'A', B: 'B', PRUNED: 'P'}


def r(n, budget, ratio=0.25):
  """The study's n_recent (spec 3.9)."""
  return min(max(1, int(round(min(ratio * budget, 1.0) * n))), n) if n else 0


def top(ratio, budget, pool):
  """The study's clamp(round(ratio * budget * pool), 1, pool) (0 for an empty pool)."""
  return min(pool, max(1, int(round(ratio * budget * pool)))) if pool and ratio > 0 else 0


# --------------------------------------------------------------------------- the call sequence
@functools.lru_cache(maxsize=None)
def _data(spec=SPEC, blocks=BLOCKS, seed=0):
  """Per block and call, the block's K/V [L, 1, bf * P, N, H]: clean K/V with a per-frame scale
  and a per-channel key bias (so chunk summaries differ), mixed with fresh noise on noisy calls."""
  rng = np.random.default_rng(seed)
  bf, p, n, h, nl = (spec.block_frames, spec.frame_tokens, spec.num_heads, spec.head_dim,
                     spec.num_layers)
  out = []
  for _ in range(blocks):
    scale = rng.uniform(0.5, 2.0, (bf, 1, 1, 1))
    ck = rng.standard_normal((bf, p, n, h)) * scale + 0.5 * rng.standard_normal((1, 1, n, h))
    cv = rng.standard_normal((bf, p, n, h)) * scale
    calls = []
    for sig in SIGMAS:
      k = (1 - sig) * ck + sig * rng.standard_normal(ck.shape)
      v = (1 - sig) * cv + sig * rng.standard_normal(cv.shape)
      calls.append(np.stack([np.stack([k * (1 + 0.5 * l), v]) for l in range(nl)])
                   .astype(np.float32).reshape(nl, 2, 1, bf * p, n, h))
    out.append(calls)
  return out


@functools.lru_cache(maxsize=None)
def _jitted(method):
  return jax.jit(method.recode), jax.jit(method.append)


def _snapshot(st):
  return {'tier': np.asarray(st.tier), 'pframe': np.asarray(st.pframe),
          'where': np.asarray(st.where), 'frame_of': np.asarray(st.frame_of)}


@functools.lru_cache(maxsize=None)
def _drive(method, spec=SPEC, blocks=BLOCKS):
  """(final state, [block][call] what that call's attention read), the study's call sequence."""
  rec, app = _jitted(method)
  st = method.init(spec)
  reads = []
  for b, calls in enumerate(_data(spec, blocks)):
    info = AppendInfo(jnp.int32(spec.block_frames * b))
    row = []
    for c, kv in enumerate(calls):
      row.append(_snapshot(st))
      for layer in range(spec.num_layers):
        st = rec(st, jnp.int32(layer), jnp.asarray(kv[layer, 0]), jnp.asarray(kv[layer, 1]), info)
      _check_records(method, st)
    for layer in range(spec.num_layers):
      kv = calls[-1]
      st = app(st, jnp.int32(layer), jnp.asarray(kv[layer, 0]), jnp.asarray(kv[layer, 1]), info)
    _check_records(method, st)
    reads.append(row)
  return st, reads


def _check_records(method, st):
  """Every stored frame's record lies in its layer's range of its store and is owned by it."""
  lay = method.layout(st.spec)
  for layer in range(st.spec.num_layers):
    held, slot = np.asarray(st.where[layer]), np.asarray(st.slot[layer])
    for which, owner, base, cap in ((A, st.a_owner, lay['base_a'], lay['cap_a']),
                                    (B, st.b_owner, lay['base_b'], lay['cap_b'])):
      for pos in np.flatnonzero(held == which):
        g = slot[pos]
        assert base[layer] <= g < base[layer] + cap[layer] and int(owner[g]) == pos


def _plan_tiers(snap, layer):
  """{frame: tier} over every frame the plan holds."""
  return {int(f): TIER[int(t)] for f, t in zip(snap['pframe'][layer], snap['tier'][layer])
          if f >= 0}


def _window_tiers(snap, layer):
  """{frame: tier} over the attended history (the ring)."""
  return {int(f): TIER[int(t)] for f, t in zip(snap['frame_of'][layer], snap['where'][layer])
          if f >= 0}


# --------------------------------------------------------------------------- the study's hook
@functools.lru_cache(maxsize=None)
def _round_trip(bits):
  codec = C.SymRTN(bits, 16)
  return jax.jit(lambda x: codec.decode(codec.encode(x), x.dtype))


def _summary(x):
  """[F, P, N, H] -> [F, N]: mean |x| over tokens and head_dim, float32 (spec 3.9.2)."""
  return np.abs(x.astype(np.float32)).mean(axis=(1, 3))


class Study:
  """One layer of a study FlowCache quantizer under its Gen C hook (spec 3.9, 5.2), batch 1.

  ``call(start, k, v)``: the block at frame ``start`` writes k, v [bf, P, N, H] into the buffer
  (frames [0, start) hold the previous call's reconstruction); returns the tiers the call's
  attention read for frames [0, start), then plans (HYBRID/ADAPTIVE every call, PRUNE when the
  chunk count changes) and re-quantizes the buffer. Controls: ``window`` (plan over the last
  ``window`` history frames and the block), ``lag=False`` (the call reads its own plan),
  ``exact`` (summaries of the exact K/V), ``final`` (pruned stays pruned).
  """

  def __init__(self, kind, bits, budget, total, important_ratio=0.1, retained_ratio=0.45,
               soft=False, window=None, lag=True, exact=False, final=False):
    self.kind, self.bits, self.budget, self.total = kind, bits, budget, total
    self.ir, self.tr, self.soft = important_ratio, retained_ratio, soft
    self.window, self.lag, self.exact, self.final = window, lag, exact, final
    self.rk = self.rv = self.xk = self.xv = None
    self.prev = self.plan = None
    self.held = []                                  # tier of each buffer frame

  def _plan(self, s):
    n = s.shape[0]
    delta = np.ones(n, np.float32)
    if self.prev is not None and min(len(self.prev), n):
      o = min(len(self.prev), n)
      cur, prev = s[-o:], self.prev[-o:]
      delta[-o:] = np.abs(cur - prev).mean(1) / np.maximum(np.abs(prev).mean(1), np.float32(1e-6))
    old = n - r(n, self.budget)
    rec = np.arange(n, dtype=np.float32) / np.float32(max(n - 1, 1))
    score = np.float32(0.7) * delta + np.float32(0.3) * rec
    tiers = ['B'] * old + ['A'] * (n - old)
    if self.kind == 'hybrid':
      return tiers
    ranked = sorted(range(old), key=lambda j: (-score[j], j))
    n_imp = top(self.ir, self.budget, old)
    for j in ranked[:n_imp]:
      tiers[j] = 'A'
    if self.kind == 'adaptive':
      return tiers
    rest = ranked[n_imp:]
    n_ret = top(self.tr, self.budget, len(rest))
    for j in rest[:n_ret]:
      tiers[j] = 'A' if self.bits == 4 else 'B'
    for j in rest[n_ret:]:
      tiers[j] = 'P'
    return tiers

  def call(self, start, k, v):
    before = list(self.held[:start])
    bk = k if start == 0 else np.concatenate([self.rk[:start], k])
    bv = v if start == 0 else np.concatenate([self.rv[:start], v])
    xk = k if start == 0 else np.concatenate([self.xk[:start], k])
    xv = v if start == 0 else np.concatenate([self.xv[:start], v])
    n = bk.shape[0]
    first = 0 if self.window is None else max(0, start - self.window)
    if self.kind in ('hybrid', 'adaptive') or self.plan is None or len(self.plan) != n - first:
      s = _summary(xk) + _summary(xv) if self.exact else _summary(bk) + _summary(bv)
      self.plan = self._plan(s[first:])
      self.prev = s[first:]
    tiers = ['-'] * first + list(self.plan)
    if self.final:
      tiers = ['P' if i < len(self.held) and self.held[i] == 'P' else t for i, t in enumerate(tiers)]
    pad = ((0, self.total - n), (0, 0), (0, 0), (0, 0))
    hi = [np.asarray(_round_trip(4)(jnp.asarray(np.pad(x, pad)[None])))[0, :n] for x in (bk, bv)]
    lo = [np.asarray(_round_trip(self.bits)(jnp.asarray(np.pad(x, pad)[None])))[0, :n]
          for x in (bk, bv)]
    rk, rv = bk.copy(), bv.copy()
    for i, t in enumerate(tiers):
      if t == 'A':
        rk[i], rv[i] = hi[0][i], hi[1][i]
      elif t == 'B':
        rk[i], rv[i] = lo[0][i], lo[1][i]
      elif t == 'P':
        if self.soft:
          rk[i] = bk[i].astype(np.float32).mean(0, keepdims=True)
          rv[i] = bv[i].astype(np.float32).mean(0, keepdims=True)
        else:
          rk[i] = rv[i] = 0.0
    self.rk, self.rv, self.xk, self.xv, self.held = rk, rv, xk, xv, tiers
    return before if self.lag else list(tiers[:start])


def _study_reads(method, spec=SPEC, blocks=BLOCKS, **control):
  """[block][call][layer] the tiers the study's attention read, frames [0, 3b)."""
  budgets = method.layout(spec)['budgets']
  refs = [Study(method.plan_kind, method.bits, float(budgets[l]), spec.total_frames,
                method.important_ratio, method.retained_ratio, soft=method.kind == 'soft_prune',
                **control) for l in range(spec.num_layers)]
  bf, p, n, h = spec.block_frames, spec.frame_tokens, spec.num_heads, spec.head_dim
  out = []
  for b, calls in enumerate(_data(spec, blocks)):
    out.append([[ref.call(bf * b, kv[l, 0].reshape(bf, p, n, h), kv[l, 1].reshape(bf, p, n, h))
                 for l, ref in enumerate(refs)] for kv in calls])
  return out


def _mismatches(reads, study, window_only):
  bad = 0
  for b, row in enumerate(reads):
    for c, snap in enumerate(row):
      for layer in range(SPEC.num_layers):
        ours = (_window_tiers if window_only else _plan_tiers)(snap, layer)
        theirs = {f: t for f, t in enumerate(study[b][c][layer]) if f in ours or not window_only}
        bad += ours != theirs
  return bad


# --------------------------------------------------------------------------- tests
def test_options_and_their_defaults():
  for name in ('FLOWCACHE_HYBRID_INT2', 'FLOWCACHE_ADAPTIVE_INT2', 'FLOWCACHE_PRUNE_INT4',
               'FLOWCACHE_PRUNE_INT2', 'FLOWCACHE_SOFT_PRUNE_INT4', 'FLOWCACHE_SOFT_PRUNE_INT2',
               'FLOWCACHE_NATIVE_SOFT_PRUNE_INT4'):
    m = kvcache.get(name)
    assert (m.plan_scope, m.plan_cadence, m.plan_scores, m.prune_final) == (
        'written', 'every_call', 'decoded', False)
    assert m.cadence == 'every_call'
  assert kvcache.get('prune_int2', **KVJAX_PLANNING).cadence == 'once'
  assert kvcache.get('prune_int2', plan_cadence='per_block').cadence == 'once'
  with pytest.raises(ValueError, match='plan_scope must be one of'):
    kvcache.get('prune_int2', plan_scope='all')
  with pytest.raises(ValueError, match='plan_cadence must be one of'):
    kvcache.get('prune_int2', plan_cadence='sometimes')
  with pytest.raises(ValueError, match='total_frames'):
    kvcache.get('prune_int2').init(CacheSpec(1, 1, 2, 16, 16, 3, 12, 0, jnp.float32))
  kvcache.get('prune_int2', plan_scope='window').init(CacheSpec(1, 1, 2, 16, 16, 3, 12, 0, jnp.float32))


def _independent_counts(n, budget, kind, ir, tr):
  """(recent, important, retained, pruned, low) of the study's plan over n chunks, from the
  study's own expressions (flowcache_adaptive.py / flowcache_prune.py, spec 3.9.3-3.9.4)."""
  recent = r(n, budget)
  old = n - recent
  imp = top(ir, budget, old) if kind != 'hybrid' else 0
  ret = top(tr, budget, old - imp) if kind == 'prune' else 0
  if kind == 'prune':
    return recent, imp, ret, old - imp - ret, 0
  return recent, imp, 0, 0, old - imp


@pytest.mark.parametrize('kind,ir,tr', [('hybrid', 0.1, 0.45), ('adaptive', 0.2, 0.45),
                                        ('prune', 0.1, 0.45), ('prune', 0.1, 0.3)])
def test_size_table_is_the_studys_float64_and_fits_the_stores(kind, ir, tr):
  """Every row of the size table is the study's float64 arithmetic, for all 30 MovieGen budgets,
  a 0.7 budget and every n up to 51; the stores hold every count a plan can produce at windows
  of 28 to 45 frames. Control: the float32 plan kvjax compiled before asked, at a 30-frame window
  and budget 0.7 (ADAPTIVE, 25 old chunks: 0.2 * 0.7 * 25 = 3.4999999999999996 in float64,
  3.5000002 in float32), for one INT4 slot more than the float64 capacity had."""
  budgets = list(MOVIEGEN_BUDGETS) + [0.7, 0.875, 1.0]
  for bud in budgets:
    table = count_table(bud, kind, 0.25, ir, tr, 51)
    for n in range(52):
      recent, imp, ret, pruned, low = _independent_counts(n, bud, kind, ir, tr)
      assert tuple(table[n]) == (n - recent, imp, ret), (bud, n)
  for bits in (2, 4):
    for window in (28, 30, 33, 45):
      spec = CacheSpec(1, 30, 1, 16, 16, 3, window, 0, jnp.float32, total_frames=48)
      c = spec.capacity_frames
      # (options, list lengths, chunks listed but not stored: the block on its noisy calls)
      for opts, lengths, unstored in (({}, range(1, 49), (0, 3)),
                                      (dict(plan_scope='window'), range(1, c + 4), (0, 3)),
                                      (dict(plan_cadence='per_block'), range(1, 49), (0,)),
                                      (KVJAX_PLANNING, range(1, c + 1), (0,))):
        m = FlowCache(kind=kind, bits=bits, important_ratio=ir, retained_ratio=tr, **opts)
        lay = m.layout(spec)
        assert max(lay['cap_a'].max(), lay['cap_b'].max()) <= c
        for l, bud in enumerate(lay['budgets']):
          for n in lengths:
            for nb in unstored:
              if opts is KVJAX_PLANNING:           # n history chunks + the next block, recent
                recent = max(r(n + 3, bud) - 3, 0)
                imp = top(ir, bud, n - recent) if kind != 'hybrid' else 0
                ret = top(tr, bud, n - recent - imp) if kind == 'prune' else 0
                low = n - recent - imp if kind != 'prune' else 0
                held = n
              else:
                recent, imp, ret, _, low = _independent_counts(n, bud, kind, ir, tr)
                recent, held = max(recent - nb, 0), min(n - nb, c)
              # Recent chunks are the newest, so the window holds them; old ones may be anywhere.
              recent = min(recent, held)
              hi_old = imp + (ret if kind == 'prune' and bits == 4 else 0)
              lo_all = low + (ret if kind == 'prune' and bits != 4 else 0)
              assert lay['cap_a'][l] >= min(recent + hi_old, held), (opts, l, n, nb)
              assert lay['cap_b'][l] >= min(lo_all, held - recent), (opts, l, n, nb)
  if kind == 'adaptive':                       # the old float32 plan against its float64 capacity
    old_cap = max(top(0.2, 0.7, n_h - max(r(n_h + 3, 0.7) - 3, 0)) + max(r(n_h + 3, 0.7) - 3, 0)
                  for n_h in range(1, 28))
    q = np.float32(0.2) * np.float32(0.7) * np.float32(25)
    assert old_cap == 5 and int(np.round(q)) + max(r(30, 0.7) - 3, 0) == 6


def test_no_plan_overflows_its_layers_slots_at_a_30_frame_window():
  """ADAPTIVE with kvjax's window plan at a 30-frame window (27 history frames), layer budgets
  1.0 and 0.7: after every append each stored frame's record lies in its layer's range and is
  owned by it, and the high tier holds exactly the plan's frames (recent + important). The
  float32 plan before issue 9 gave layer 1 a 6th INT4 frame at 27 history frames; its capacity
  was 5, and the free-slot search then wrote record 0, layer 0's first (this test failed there)."""
  spec = CacheSpec(batch=1, num_layers=2, num_heads=1, head_dim=16, frame_tokens=16,
                   block_frames=3, window_frames=30, dtype=jnp.float32, total_frames=36)
  m = FlowCache(kind='adaptive', bits=2, important_ratio=0.2, budget='linear', budget_min=1.0,
                budget_max=0.7, **KVJAX_PLANNING)
  lay = m.layout(spec)
  assert lay['cap_a'][1] == 5
  app = jax.jit(m.append)
  rng = np.random.default_rng(3)
  st = m.init(spec)
  for b in range(12):
    k = jnp.asarray(rng.standard_normal((1, 48, 1, 16)).astype(np.float32))
    for layer in range(2):
      st = app(st, jnp.int32(layer), k * (1 + layer), k, AppendInfo(jnp.int32(3 * b)))
    n_hist = min(3 * b + 3, 27)
    _check_records(m, st)
    for layer in range(2):
      held = np.asarray(st.where[layer])
      recent = max(r(n_hist + 3, lay['budgets'][layer]) - 3, 0)
      assert int(np.sum(held == A)) == recent + top(0.2, lay['budgets'][layer], n_hist - recent)


def test_hybrid_int4_history_per_call_follows_the_studys_formula():
  """HYBRID, layer budgets 0.9 and 1.3: every call's attended INT4 history is r(3b) frames on a
  block's first call (it reads the previous block's plan) and r(3b + 3) - 3 on calls 2-5, at most
  the window; the plan covers all 3b written frames. Controls: without the lag (r(3b + 3) - 3 on
  call 1 too) and with kvjax's window plan (r(min(3b, C) + 3) - 3) the counts differ."""
  m = FlowCache(kind='hybrid', bits=2, budget='linear', budget_min=0.9, budget_max=1.3)
  _, reads = _drive(m)
  c = SPEC.capacity_frames
  budgets = m.layout(SPEC)['budgets']
  seen, no_lag, window = [], [], []
  for b, row in enumerate(reads):
    for call, snap in enumerate(row):
      for layer, bud in enumerate(budgets):
        h = 3 * b
        int4 = r(h, bud) if call == 0 else max(r(h + 3, bud) - 3, 0)
        got = int(np.sum(snap['where'][layer] == A))
        plan = _plan_tiers(snap, layer)
        assert got == min(int4, c), (b, call, layer)
        assert len(plan) == h and sum(t == 'A' for t in plan.values()) == int4
        assert all(t == 'A' for f, t in plan.items() if f >= h - int4)       # the newest
        seen.append(got)
        no_lag.append(min(max(r(h + 3, bud) - 3, 0), c) if h else 0)
        window.append(min(max(r(min(h, c) + 3, bud) - 3, 0), c) if h else 0)
  assert seen != no_lag and seen != window


@pytest.mark.parametrize('name', ['FLOWCACHE_ADAPTIVE_INT2', 'FLOWCACHE_PRUNE_INT2',
                                  'FLOWCACHE_SOFT_PRUNE_INT4'])
def test_tiers_per_call_equal_the_studys_hook(name):
  """The tier of every written frame, as each call's attention reads it (frames outside the
  window included), equals the study emulation's, call by call, for layer budgets 0.9 and 0.7
  over 10 blocks with a 9-frame history window. Controls: the reference with the plan over the
  window, without the one-call lag, scored from the exact K/V, or (PRUNE kinds) with final
  pruning disagrees with the method on the attended frames."""
  m = kvcache.get(name, budget='linear', budget_min=0.9, budget_max=0.7)
  _, reads = _drive(m)
  study = _study_reads(m)
  assert _mismatches(reads, study, window_only=False) == 0
  controls = [dict(window=SPEC.capacity_frames), dict(lag=False), dict(exact=True)]
  if m.plan_kind == 'prune':
    controls.append(dict(final=True))
  for control in controls:
    assert _mismatches(reads, _study_reads(m, **control), window_only=True) > 0, control
  # The plan's sizes over all written frames: call 1 reads the plan over the 3b frames of the
  # previous block's last call, calls 2-5 the plan over 3b + 3 (checked where the block's own
  # chunks are all recent, so that the history holds every old chunk).
  budgets = m.layout(SPEC)['budgets']
  hi = m.retained_in_a()
  for b, row in enumerate(reads[1:], 1):
    for layer, bud in enumerate(budgets):
      for call, n, block in ((0, 3 * b, 0), (1, 3 * b + 3, 3)):
        recent, imp, ret, pruned, _ = _independent_counts(n, bud, m.plan_kind, m.important_ratio,
                                                          m.retained_ratio)
        if recent < block:
          continue
        tiers = list(_plan_tiers(row[call], layer).values())
        assert tiers.count('A') == recent - block + imp + (ret if hi else 0), (b, call, layer)
        assert tiers.count('P') == pruned, (b, call, layer)


def test_scores_are_those_of_what_the_cache_holds():
  """After the PRUNE_INT2 rollout, every frame's chunk summary is that of its stored record's
  decode (INT4 or INT2), exactly 0 for a pruned chunk (zeros), and a chunk pruned earlier was
  selected again by a later plan (its content stays zeros). Control: the exact K/V's summaries
  differ from the INT2 frames'."""
  m = kvcache.get('FLOWCACHE_PRUNE_INT2', budget='linear', budget_min=0.9, budget_max=0.7)
  st, reads = _drive(m)
  hi, lo = m.codecs()
  data = _data()
  ring_gap = 0.0
  for layer in range(SPEC.num_layers):
    summ = np.asarray(st.summ[layer])
    for pos, f in enumerate(np.asarray(st.frame_of[layer])):
      held, g = int(st.where[layer, pos]), int(st.slot[layer, pos])
      if held == PRUNED:
        assert np.all(summ[f] == 0)
        continue
      codec, fields = (hi, st.a) if held == A else (lo, st.b)
      xk = codec.decode(record_at(fields['k'], 0, g), SPEC.dtype)[:, 0]
      xv = codec.decode(record_at(fields['v'], 0, g), SPEC.dtype)[:, 0]
      np.testing.assert_allclose(summ[f], _summary(np.asarray(xk))[0] + _summary(np.asarray(xv))[0],
                                 rtol=1e-6)
      if held == B:
        exact = data[f // 3][-1][layer].reshape(2, 3, 16, 2, 16)[:, f % 3]
        ring_gap = max(ring_gap, float(np.max(np.abs(summ[f] - _summary(exact[0][None])[0]
                                                     - _summary(exact[1][None])[0]))))
    tiers = np.asarray(st.tier[layer])
    assert np.all(np.asarray(st.summ[layer])[tiers == PRUNED] == 0)
  assert ring_gap > 1e-3
  back = 0
  for layer in range(SPEC.num_layers):
    was = set()
    for row in reads:
      for snap in row:
        plan = _plan_tiers(snap, layer)
        back += sum(plan[f] != 'P' for f in was if f in plan)
        was |= {f for f, t in plan.items() if t == 'P'}
  assert back > 0


def test_layer_budgets_follow_the_studys_ramp(tmp_path):
  """linear: the study's min + (l / (L - 1)) * (max - min), 1.0 for one layer; a profile table
  is read as written."""
  got = layer_budgets('linear', 30)
  assert list(got) == [0.75 + (l / 29) * 0.5 for l in range(30)]
  assert list(layer_budgets('linear', 1)) == [1.0]
  path = tmp_path / 'budget_table.json'
  path.write_text(json.dumps({'budgets': [0.7, 1.2999999999999998]}))
  assert list(layer_budgets(f'profile:{path}', 2)) == [0.7, 1.2999999999999998]


def _profile_reference(spec=SPEC, blocks=BLOCKS, per_event_mean=False):
  """The study's profiler (spec 3.9.6) over ``_data``: after every call, the summaries of the
  exact buffer (clean history, the call's block), tail-aligned deltas against the previous call,
  and the old chunks' (all but the newest max(1, round(0.25 n))) deltas summed per layer.
  Returns the layer scores (their mean; ``per_event_mean``: the mean of per-call means)."""
  bf, p, n, h = spec.block_frames, spec.frame_tokens, spec.num_heads, spec.head_dim
  scores = []
  for layer in range(spec.num_layers):
    hist, prev, total, count, means = None, None, 0.0, 0, []
    for calls in _data(spec, blocks):
      for kv in calls:
        k, v = kv[layer, 0].reshape(bf, p, n, h), kv[layer, 1].reshape(bf, p, n, h)
        bk = k if hist is None else np.concatenate([hist[0], k])
        bv = v if hist is None else np.concatenate([hist[1], v])
        s = _summary(bk) + _summary(bv)
        delta = np.ones(len(s), np.float32)
        if prev is not None:
          o = min(len(prev), len(s))
          delta[-o:] = (np.abs(s[-o:] - prev[-o:]).mean(1)
                        / np.maximum(np.abs(prev[-o:]).mean(1), np.float32(1e-6)))
        old = len(s) - max(1, int(round(0.25 * len(s))))
        if old > 0:
          total, count = total + float(delta[:old].sum()), count + old
          means.append(float(delta[:old].mean()))
        prev = s
      hist = (bk, bv)
    scores.append(np.mean(means) if per_event_mean else total / count)
  return np.asarray(scores)


def test_profile_scores_every_call_as_the_study():
  """FLOWCACHE_PROFILE's layer scores are the study profiler's: every call scored over every
  written frame plus the call's block, the mean over all old chunks. Controls: the mean of
  per-call means, and kvjax's former once-a-block pass over the window, differ."""
  m = kvcache.get('FLOWCACHE_PROFILE')
  assert m.cadence == 'every_call'
  old = kvcache.get('FLOWCACHE_PROFILE', plan_scope='window', plan_cadence='ahead')
  got = {}
  for method in (m, old):
    rec, app = _jitted(method)
    st = method.init(SPEC)
    for b, calls in enumerate(_data()):
      info = AppendInfo(jnp.int32(3 * b))
      for kv in calls:
        for layer in range(SPEC.num_layers):
          st = rec(st, jnp.int32(layer), jnp.asarray(kv[layer, 0]), jnp.asarray(kv[layer, 1]), info)
      for layer in range(SPEC.num_layers):
        st = app(st, jnp.int32(layer), jnp.asarray(calls[-1][layer, 0]),
                 jnp.asarray(calls[-1][layer, 1]), info)
    got[method] = np.asarray(method.budget_table(st)['layer_scores'])
  ref = _profile_reference()
  np.testing.assert_allclose(got[m], ref, rtol=1e-5)
  for control in (_profile_reference(per_event_mean=True), got[old]):
    assert np.max(np.abs(control - ref) / ref) > 1e-3
