"""Every registered cache method through the protocol, on a geometry with eviction and sinks.

Frames of 40 tokens (a 24-token last group), window 10 frames (7 history slots, 1 sink), 6
blocks of 3 frames: every method evicts, AGE_TIER/TPTQ cross their positional boundary,
FlowCache replans with a full window.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.numerics import fwht
from kvjax import kernels
from kvjax.cache import AppendInfo, CacheSpec
from kvjax.cache import flowcache as fc
from kvjax.kernels import dense_attention
from kvjax.kernels.rope import RopeGrid
from kvjax.kernels.source import record_at

SPEC = CacheSpec(batch=1, num_layers=2, num_heads=2, head_dim=32, frame_tokens=40, block_frames=3,
                 window_frames=10, sink_frames=1, dtype=jnp.float32, total_frames=18)
BLOCKS = 6


def _blocks(seed=0, head_dim=32):
  rng = np.random.default_rng(seed)
  ks = rng.standard_normal((BLOCKS, 1, 120, 2, head_dim)).astype(np.float32) + 0.5
  vs = rng.standard_normal((BLOCKS, 1, 120, 2, head_dim)).astype(np.float32)
  return ks, vs


@functools.lru_cache(maxsize=None)
def _jit_append(method):
  """The context pass of one layer as the model runs it: ``recode`` first when the method
  re-encodes its history on that pass (cadence 'every_call' or 'per_block'), then ``append``."""
  def context(state, layer, k, v, info):
    if method.cadence != 'once':
      state = method.recode(state, layer, k, v, info)
    return method.append(state, layer, k, v, info)
  return jax.jit(context)


@functools.lru_cache(maxsize=None)
def _final_state(name):
  return _run(kvcache.get(name))


def _run(method, spec=SPEC, seed=0, check=None):
  ks, vs = _blocks(seed, spec.head_dim)
  app = _jit_append(method)
  state = method.init(spec)
  for b in range(BLOCKS):
    for layer in range(spec.num_layers):
      state = app(state, jnp.int32(layer), ks[b] * (1 + layer), vs[b], AppendInfo(jnp.int32(3 * b)))
    if check is not None:
      check(state, b)
  return state


def _per_row_rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  den = np.maximum(np.linalg.norm(b, axis=-1), 1e-6)
  return float(np.max(np.linalg.norm(a - b, axis=-1) / den))


def test_registry_has_the_33_paper_names_and_aliases():
  assert len(kvcache.PAPER_NAMES) == 33
  for name in kvcache.PAPER_NAMES:
    assert kvcache.get(name).name == name
    assert kvcache.get(name.lower()).name == name
  for alias, name in [('softprune_int4', 'FLOWCACHE_SOFT_PRUNE_INT4'), ('rtn_int4', 'RTN_INT4'),
                      ('quarot_int4', 'QUAROT_KV_INT4'), ('prq_int4', 'PRQ_INT4'),
                      ('prune_int2', 'FLOWCACHE_PRUNE_INT2'), ('kivi_int2', 'KIVI_INT2'),
                      ('native', 'FLOWCACHE_NATIVE'), ('Spatial_RTN4_RTN2', 'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2')]:
    assert kvcache.canonical(alias) == name
  rows = kvcache.describe()
  assert {r['name'] for r in rows} >= set(kvcache.PAPER_NAMES)


def test_bad_method_parameters_list_what_is_valid():
  with pytest.raises(ValueError, match=r'unknown cache method .*Valid names'):
    kvcache.get('rtn_int3')
  with pytest.raises(ValueError, match=r'no parameter.*valid parameters: .*key_bits'):
    kvcache.get('rtn_int4', nbits=4)
  with pytest.raises(ValueError, match=r'valid bit widths'):
    kvcache.get('rtn_int4', key_bits=3)
  with pytest.raises(ValueError, match='group size'):
    kvcache.get('kivi_int4', group_size=0)
  with pytest.raises(ValueError, match="requantize must be"):
    kvcache.get('rtn_int4', requantize='sometimes')
  with pytest.raises(ValueError, match='kind must be'):
    kvcache.get('prune_int4', kind='random')
  assert kvcache.parse_overrides('kivi_int4', 'clamp_zero_point=false,group_size=32') == {
      'clamp_zero_point': False, 'group_size': 32}
  with pytest.raises(ValueError, match='KIVI_INT4: clamp_zero_point expects true or false'):
    kvcache.parse_overrides('kivi_int4', 'clamp_zero_point=maybe')
  with pytest.raises(ValueError, match='no parameter'):
    kvcache.parse_overrides('kivi_int4', 'bogus=1')


@pytest.mark.parametrize('name', kvcache.PAPER_NAMES + ('FLOWCACHE_PROFILE',))
def test_attend_equals_materialize_plus_dense(name):
  """attend == softmax attention over materialize (which expands summary tokens), every block;
  realized bytes are the state's arrays; reconstruction stays close to the exact K/V."""
  m = kvcache.get(name)
  rng = np.random.default_rng(1)
  att = jax.jit(lambda s, q: m.attend(s, jnp.int32(1), q, 'xla'))
  mat = jax.jit(lambda s: m.materialize(s, 1))
  errs = []

  def check(state, b):
    q = jnp.asarray(rng.standard_normal((1, 7, 2, 32)).astype(np.float32))
    out, lse = att(state, q)
    k, v, bias = mat(state)
    errs.append(_per_row_rel(out, dense_attention(q, k, v, bias=bias)))
    assert np.all(np.isfinite(np.asarray(lse)))

  state = _run(m, check=check)
  assert max(errs) <= 1e-5, errs
  leaves = jax.tree.leaves(state)
  assert m.nbytes(state) == sum(x.nbytes for x in leaves)
  assert m.nbytes(jax.eval_shape(lambda: m.init(SPEC))) == m.nbytes(state)


# Methods with a source the fused kernel does not read (read by the XLA walk, logged): none; it
# reads every format, exact outliers and the byte-pool log of positional tiers included.
# head_dim 64 so that INT2 channel slices are 16 wide (the minimum of a Triton dot; at head_dim
# 32 INT2 sources fall back).
# QuaRot read back in the original basis (formats.Derotated, the study's numerics): the XLA walk.
KERNEL_FALLBACK = {'QUAROT_KV_INT4', 'QUAROT_KV_INT2', 'QUAROT_KV_INT4_RECENT2',
                   'QUAROT_KV_INT4_REFRESH', 'SPATIAL_MIXED_FG_QUAROT_KV_INT4_BG_RTN_INT2'}
SPEC64 = dataclasses.replace(SPEC, head_dim=64)


def _pallas_equals_xla(m, spec, fallback: bool, seed: int):
  """After every block, impl='pallas' (interpret mode on CPU) gives impl='xla''s attention
  (float32 cache: 1e-5 per row), and the kernel reads every source unless ``fallback``."""
  rng = np.random.default_rng(seed)
  srcs = jax.jit(lambda s: m.sources(s, jnp.int32(1)))
  xla = jax.jit(lambda s, q: m.attend(s, jnp.int32(1), q, 'xla'))
  pallas = jax.jit(lambda s, q: m.attend(s, jnp.int32(1), q, 'pallas'))

  def check(state, b):
    assert bool(kernels.fallbacks(srcs(state))) == fallback
    q = jnp.asarray(rng.standard_normal((1, 7, 2, 64)).astype(np.float32))
    want, lse_want = xla(state, q)
    got, lse = pallas(state, q)
    assert _per_row_rel(got, want) <= 1e-5, b
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_want), rtol=1e-5, atol=1e-5)

  _run(m, spec=spec, check=check)


@pytest.mark.parametrize('name', kvcache.PAPER_NAMES)
def test_pallas_equals_xla(name):
  """Every study method: the kernel equals the XLA walk; the sources the kernel reads are
  exactly those outside the documented fallback list."""
  _pallas_equals_xla(kvcache.get(name), SPEC64, name in KERNEL_FALLBACK, 7)


@pytest.mark.parametrize('name,params,window,sink', [
    ('QVG_INT2', dict(span_frames=1, centroids=16), 10, 1),                 # spans a frame, sink
    ('QVG_INT4', dict(span_frames=6, centroids=16, stages=2), 13, 0),       # BF16 tail, 2 stages
    ('QVG_INT2', dict(span_frames=3, centroids=16, rope='post'), 10, 0),    # rotated keys
])
def test_qvg_pallas_equals_xla(name, params, window, sink):
  """QVG (beyond the study) read by the kernel equals the XLA walk after every block: centroid
  tables shared by a span's frames, pre-RoPE keys rotated per chunk, the BF16 tail."""
  spec = dataclasses.replace(SPEC64, window_frames=window, sink_frames=sink,
                             rope=RopeGrid(64, 5, 8))
  _pallas_equals_xla(kvcache.get(name, **params), spec, False, 5)


@pytest.mark.parametrize('name', ['RTN_INT4', 'KIVI_INT4', 'QUAROT_KV_INT4', 'PRQ_INT4', 'AGE_TIER_INT2',
                                  'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2', 'FLOWCACHE_SOFT_PRUNE_INT4'])
def test_attention_close_to_exact(name):
  """Negative control in the other direction: quantized attention is near, but not equal to,
  attention over the exact K/V of the visible frames."""
  state = _final_state(name)
  exact = _final_state('BF16')
  q = jnp.asarray(np.random.default_rng(3).standard_normal((1, 7, 2, 32)).astype(np.float32))
  out = np.asarray(kvcache.get(name).attend(state, jnp.int32(1), q, 'xla')[0])
  ref = np.asarray(kvcache.get('BF16').attend(exact, jnp.int32(1), q, 'xla')[0])
  err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  loose = 'PRUNE' in name or 'INT2' in name           # ternary INT2 is coarse
  assert 1e-6 < err < (1.0 if loose else 0.3)


def test_quantize_once_records_never_change():
  """RTN: a frame's codes are written once; later appends leave them bit-identical."""
  m = kvcache.get('RTN_INT4', requantize='once')
  snaps = []
  _run(m, check=lambda st, b: snaps.append(jax.tree.map(np.asarray, st.k)))
  # Frame 1 (a rolling frame) sits in slot 1 from block 0 until it is evicted.
  for b in (1,):
    for key in snaps[0]:
      np.testing.assert_array_equal(snaps[b][key][:, :, 1], snaps[0][key][:, :, 1])


def test_requantize_every_call_is_idempotent_for_rtn_in_float32():
  m = kvcache.get('RTN_INT4')
  state = _final_state('RTN_INT4')
  k = jnp.zeros((1, 120, 2, 32), jnp.float32)
  again = jax.jit(m.recode)(state, jnp.int32(0), k, k, AppendInfo(jnp.int32(3 * BLOCKS)))
  for key in state.k:
    np.testing.assert_array_equal(np.asarray(again.k[key]), np.asarray(state.k[key]))


def test_recent_window_keeps_the_previous_block_exact():
  m = kvcache.get('RTN_INT4_RECENT2')
  ks, vs = _blocks()
  state = _final_state('RTN_INT4_RECENT2')
  k, _, bias = m.materialize(state, 0)
  exact_last = ks[-1][0]                                         # block 5, layer 0
  kk = np.asarray(k[0])
  found = [np.array_equal(kk[i * 40:(i + 1) * 40], exact_last[f * 40:(f + 1) * 40])
           for f in range(3) for i in range(kk.shape[0] // 40)]
  assert sum(found) == 3


@pytest.mark.parametrize('name,kind', [('FLOWCACHE_HYBRID_INT2', 'hybrid'), ('FLOWCACHE_ADAPTIVE_INT2', 'adaptive'),
                                       ('FLOWCACHE_PRUNE_INT2', 'prune'), ('FLOWCACHE_SOFT_PRUNE_INT4', 'prune')])
def test_flowcache_tier_counts_follow_the_plan(name, kind):
  m = kvcache.get(name, plan_scope='window', plan_cadence='ahead', plan_scores='exact',
                  prune_final=True)                  # kvjax's planning (flowcache_test: the study's)
  budgets = fc.layer_budgets(m.budget, SPEC.num_layers)
  seen = []

  def check(state, b):
    for layer in range(SPEC.num_layers):
      n_hist = min(3 * (b + 1), SPEC.capacity_frames)
      rec, imp, ret, pruned, n_old = (int(x) for x in fc.plan_counts(
          n_hist, 3, budgets[layer], kind, m.recent_ratio, m.important_ratio, m.retained_ratio))
      where = np.asarray(state.where[layer])
      stored = int(np.sum(where == fc.A) + np.sum(where == fc.B))
      n_pruned = int(np.sum(where == fc.PRUNED))
      assert stored + n_pruned == n_hist
      assert n_pruned >= pruned                                  # pruning is final
      if kind == 'hybrid':
        assert int(np.sum(where == fc.A)) == rec and int(np.sum(where == fc.B)) == n_old
      lay = m.layout(SPEC)
      assert int(np.sum(np.asarray(state.a_owner)[lay['base_a'][layer]:][:lay['cap_a'][layer]] >= 0)) == \
          int(np.sum(where == fc.A))
      seen.append(n_pruned)

  _run(m, check=check)
  if kind == 'prune':
    assert max(seen) > 0


def test_soft_prune_summary_equals_explicit_repetition():
  """One token with bias log(count) == the study's count identical tokens."""
  q = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5, 2, 32)).astype(np.float32))
  kt = jnp.asarray(np.random.default_rng(5).standard_normal((1, 1, 2, 32)).astype(np.float32))
  vt = jnp.asarray(np.random.default_rng(6).standard_normal((1, 1, 2, 32)).astype(np.float32))
  kx = jnp.asarray(np.random.default_rng(7).standard_normal((1, 9, 2, 32)).astype(np.float32))
  one = dense_attention(q, jnp.concatenate([kx, kt], 1), jnp.concatenate([kx, vt], 1),
                        bias=jnp.concatenate([jnp.zeros((1, 9)), jnp.full((1, 1), math.log(40))], 1))
  rep = dense_attention(q, jnp.concatenate([kx, jnp.repeat(kt, 40, 1)], 1),
                        jnp.concatenate([kx, jnp.repeat(vt, 40, 1)], 1))
  assert _per_row_rel(one, rep) < 1e-5
  no_bias = dense_attention(q, jnp.concatenate([kx, kt], 1), jnp.concatenate([kx, vt], 1))
  assert _per_row_rel(no_bias, rep) > 1e-3


def test_prune_mask_option_drops_pruned_chunks():
  zero = kvcache.get('FLOWCACHE_PRUNE_INT2')
  masked = kvcache.get('FLOWCACHE_PRUNE_INT2', prune_mode='mask')
  sz, sm = _final_state('FLOWCACHE_PRUNE_INT2'), _run(masked)
  _, _, bz = zero.materialize(sz, 1)
  _, _, bm = masked.materialize(sm, 1)
  assert np.isfinite(np.asarray(bz)).sum() > np.isfinite(np.asarray(bm)).sum()


def test_positional_tiers_follow_buffer_position():
  from kvjax.cache.age_tier import positional_threshold
  assert positional_threshold(42, 1560, 0.3) == 29            # slot 45,864 = frame 29.4
  assert positional_threshold(42, 1560, 0.15) == 36           # slot 55,692 = frame 35.7
  m = kvcache.get('AGE_TIER_INT2')
  tiers = m.tier_of(SPEC)
  assert tiers.tolist() == [0] * 13 + [1] * 5
  with pytest.raises(ValueError, match='total_frames'):
    m.init(CacheSpec(1, 1, 2, 32, 40, 3, 10, 0, jnp.float32))


def test_age_tier_age_option_keeps_the_newest_frames_in_int4():
  m = kvcache.get('AGE_TIER_INT2', recency='age', recent_ratio=0.6)
  state = _run(m)
  frames = np.asarray(state.frame_of[0])
  where = np.asarray(state.where[0])
  newest = np.sort(frames[where == fc.A])
  oldest = np.sort(frames[where == fc.B])
  assert len(newest) >= 1 and newest.min() > oldest.max()          # recency by age
  with pytest.raises(ValueError, match='recency must be'):
    kvcache.get('AGE_TIER_INT2', recency='lru')


def test_mixed_log_pool_is_smaller_than_uniform_int4():
  m = kvcache.get('AGE_TIER_INT2')
  lay = m.layout(SPEC)
  int4 = kvcache.get('RTN_INT4')
  rtn_bytes = kvcache.tree_nbytes(jax.eval_shape(lambda: int4.init(SPEC)).k) * 2
  assert lay['pool'] * SPEC.num_layers * SPEC.batch < rtn_bytes


def test_flowcache_profile_writes_a_budget_table(tmp_path):
  m = kvcache.get('FLOWCACHE_PROFILE')
  state = _final_state('FLOWCACHE_PROFILE')
  table = m.budget_table(state)
  assert len(table['budgets']) == SPEC.num_layers
  assert min(table['budgets']) == pytest.approx(0.7) and max(table['budgets']) == pytest.approx(1.3)
  import json
  path = tmp_path / 'budget.json'
  path.write_text(json.dumps(table))
  np.testing.assert_allclose(fc.layer_budgets(f'profile:{path}', SPEC.num_layers), table['budgets'])
  with pytest.raises(ValueError, match='budgets for a'):
    fc.layer_budgets(f'profile:{path}', 30)
  with pytest.raises(FileNotFoundError, match='budget table not found'):
    fc.layer_budgets(str(tmp_path / 'none.json'), 2)
  assert fc.layer_budgets('auto', 30).mean() == pytest.approx(0.9003, abs=1e-4)


@pytest.mark.parametrize('name', ['RTN_INT4', 'KIVI_INT4', 'FLOWCACHE_SOFT_PRUNE_INT4', 'QAQ_INT4'])
def test_nan_input_propagation_is_documented(name):
  """NaN/Inf in appended K/V is not silently dropped: the affected reconstruction is NaN (the
  launcher then stops with FloatingPointError naming the method)."""
  m = kvcache.get(name)
  state = m.init(SPEC)
  ks, vs = _blocks()
  k = np.array(ks[0])
  k[0, 5, 1, 3] = np.nan
  state = _jit_append(m)(state, jnp.int32(0), jnp.asarray(k), jnp.asarray(vs[0]), AppendInfo(jnp.int32(0)))
  kk, _, bias = m.materialize(state, 0)
  assert not np.all(np.isfinite(np.asarray(kk)[np.isfinite(np.asarray(bias))]))


def test_spatial_quarot_read_equals_plain_decode():
  """The QuaRot-foreground spatial store (read back in the original basis, as the study) and its
  plain background source: attention equals attention over every slot decoded in the plain
  basis; control: keys left in the Hadamard basis give another output."""
  name = 'SPATIAL_MIXED_FG_QUAROT_KV_INT4_BG_RTN_INT2'
  m = kvcache.get(name)
  state = _final_state(name)
  kc, vc = m.codecs(SPEC)
  slots = SPEC.capacity_frames
  k = jnp.concatenate([kc.decode(record_at(state.k, 1, j), jnp.float32, rotated=False)[:, 0]
                       for j in range(slots)], axis=1)
  v = jnp.concatenate([vc.decode(record_at(state.v, 1, j), jnp.float32, rotated=False)[:, 0]
                       for j in range(slots)], axis=1)
  q = jnp.asarray(np.random.default_rng(5).standard_normal((1, 7, 2, 32)).astype(np.float32))
  out = m.attend(state, jnp.int32(1), q, 'xla')[0]
  assert _per_row_rel(out, dense_attention(q, k, v)) <= 1e-5
  k_rot = fwht(k, jnp.float32)
  assert _per_row_rel(dense_attention(q, k_rot, v), dense_attention(q, k, v)) > 1e-2  # control


@pytest.mark.parametrize('name', ['RTN_INT4', 'AGE_TIER_INT2', 'FLOWCACHE_SOFT_PRUNE_INT4'])
def test_no_history_reads_nothing(name):
  """window == block: no cache capacity; every engine has no source, attention over it is empty
  (out 0, lse -inf) and materialize is empty (FlowCache's summary expansion included)."""
  spec = dataclasses.replace(SPEC, window_frames=3, sink_frames=0)
  m = kvcache.get(name)
  state = m.init(spec)
  assert m.sources(state, 0) == []
  k, v, bias = m.materialize(state, 0)
  assert k.shape == (1, 0, 2, 32) and bias.shape == (1, 0)
  out, lse = m.attend(state, 0, jnp.ones((1, 5, 2, 32), jnp.float32), 'xla')
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
