"""The caller-facing hooks of ``CacheMethod`` and the registry (the study's rows, ``build``).

Callers (sampler, launcher) never probe a method for attributes: every hook is declared on the
base class with a default. AGE_TIER's ``recency='age'`` is its own class, AGE_TIER_BY_AGE,
built by ``AgeTier.build``; it behaves exactly as the FlowCache hybrid configuration that the
AGE_TIER class used to delegate to.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.cache import AppendInfo, CacheSpec, registry
from kvjax.cache.age_recency import AgeTierByAge
from kvjax.cache.age_tier import AgeTier
from kvjax.cache.base import CacheMethod
from kvjax.cache.flowcache import FlowCache

SPEC = CacheSpec(batch=1, num_layers=2, num_heads=2, head_dim=32, frame_tokens=40, block_frames=3,
                 window_frames=10, sink_frames=1, dtype=jnp.float32, total_frames=18)
BLOCKS = 6

# The study's tables, in order (a literal here on purpose: the registry must reproduce it).
TABLE = (
    'BF16', 'RTN_INT4', 'RTN_INT2', 'RTN_K2_V4', 'RTN_INT4_RECENT2', 'RTN_INT4_REFRESH',
    'KIVI_INT4', 'KIVI_INT2', 'KIVI_INT4_REFRESH', 'KIVI_K2_V4', 'QUAROT_KV_INT4', 'QUAROT_KV_INT2',
    'QUAROT_KV_INT4_RECENT2', 'QUAROT_KV_INT4_REFRESH', 'PRQ_INT4', 'PRQ_INT2', 'QAQ_INT4',
    'QAQ_INT2', 'TPTQ_INT2', 'AGE_TIER_INT4', 'AGE_TIER_INT2', 'FLOWCACHE_HYBRID_INT2',
    'FLOWCACHE_ADAPTIVE_INT2', 'FLOWCACHE_PRUNE_INT4', 'FLOWCACHE_PRUNE_INT2',
    'FLOWCACHE_SOFT_PRUNE_INT4', 'FLOWCACHE_SOFT_PRUNE_INT2', 'FLOWCACHE_NATIVE',
    'FLOWCACHE_NATIVE_SOFT_PRUNE_INT4', 'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2',
    'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT4', 'SPATIAL_MIXED_FG_KIVI_INT4_BG_KIVI_INT2',
    'SPATIAL_MIXED_FG_QUAROT_KV_INT4_BG_RTN_INT2')


def test_study_names_come_from_the_registry_in_table_order():
  names = registry.study_names()
  assert names == TABLE and len(names) == 33
  assert kvcache.PAPER_NAMES == names
  assert 'FLOWCACHE_PROFILE' not in names and 'AGE_TIER_BY_AGE' not in names
  assert {'FLOWCACHE_PROFILE', 'AGE_TIER_BY_AGE'} <= set(kvcache.names())
  assert [n for n in kvcache.names() if n in names] == list(names)   # registration order
  for name in names:
    m = kvcache.get(name)
    assert m.name == name and m.in_study and isinstance(m, CacheMethod)
  assert not kvcache.get('FLOWCACHE_PROFILE').in_study


def test_derived_classes_inherit_the_class_hooks():
  bf16 = registry.derive(kvcache.BF16, 'X_BF16_COPY', (), 'test')
  assert bf16.is_reference and bf16.in_study and bf16.name == 'X_BF16_COPY'
  assert 'X_BF16_COPY' not in kvcache.names()                        # derive does not register
  prof = registry.derive(type(kvcache.get('FLOWCACHE_PROFILE')), 'X_PROFILE', (), 'test')
  assert not prof.in_study


def test_only_bf16_is_the_reference():
  assert [n for n in kvcache.names() if kvcache.get(n).is_reference] == ['BF16']
  assert kvcache.get('BF16', requantize='every_call').is_reference
  assert not kvcache.get('FLOWCACHE_NATIVE').is_reference           # BF16 storage, step reuse


def test_step_reuse_threshold():
  reuse = {n: kvcache.get(n).step_reuse_threshold for n in kvcache.names()}
  assert {n: t for n, t in reuse.items() if t} == {
      'FLOWCACHE_NATIVE': 1.5, 'FLOWCACHE_NATIVE_SOFT_PRUNE_INT4': 1.5}
  assert kvcache.get('native', reuse_threshold=0.1).step_reuse_threshold == 0.1
  assert kvcache.get('prune_int4', reuse_threshold=2.0).step_reuse_threshold == 2.0


def test_cadence_and_artifacts_defaults():
  assert kvcache.get('RTN_INT4', requantize='once').cadence == 'once'
  m = kvcache.get('AGE_TIER_INT4')                                  # base defaults
  assert m.cadence == 'once'
  state = jax.eval_shape(lambda: m.init(SPEC))
  assert m.recode(state, 0, None, None, None) is state
  assert m.artifacts(state) == {} and kvcache.get('BF16').artifacts(None) == {}
  prof = kvcache.get('FLOWCACHE_PROFILE')
  assert set(prof.artifacts(prof.init(SPEC))) == {'budget_table.json'}


def _run(method, seed=0):
  rng = np.random.default_rng(seed)
  app = jax.jit(method.append)
  state = method.init(SPEC)
  for b in range(BLOCKS):
    k = rng.standard_normal((1, 120, 2, 32)).astype(np.float32) + 0.5
    v = rng.standard_normal((1, 120, 2, 32)).astype(np.float32)
    for layer in range(SPEC.num_layers):
      state = app(state, jnp.int32(layer), k * (1 + layer), v, AppendInfo(jnp.int32(3 * b)))
  return state


def _same(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_age_recency_is_its_own_class():
  m = kvcache.get('AGE_TIER_INT2', recency='age')
  assert type(m) is AgeTierByAge and isinstance(m, FlowCache) and not isinstance(m, AgeTier)
  assert m.name == 'AGE_TIER_BY_AGE' and m.family == 'AGE_TIER' and not m.in_study
  assert (m.bits, m.recent_bits, m.recent_ratio, m.group_size) == (2, 4, 0.3, 16)
  assert kvcache.get('AGE_TIER_BY_AGE') == m
  four = kvcache.get('agetier4', recency='age', recent_ratio=0.6)
  assert four == AgeTierByAge(bits=4, recent_ratio=0.6)
  # The launcher's path: --method=AGE_TIER_INT2 --method_args=recency=age.
  over = kvcache.parse_overrides('AGE_TIER_INT2', 'recency=age,recent_bits=2')
  assert kvcache.get('AGE_TIER_INT2', **over) == AgeTierByAge(bits=2, recent_bits=2)
  # Positional recency (the study) stays the mixed-log AgeTier; 'age' never lives on an AgeTier.
  assert type(kvcache.get('AGE_TIER_INT2', recency='position')) is type(kvcache.get('AGE_TIER_INT2'))
  assert isinstance(kvcache.get('AGE_TIER_INT2'), AgeTier)
  with pytest.raises(ValueError, match='AGE_TIER_BY_AGE'):
    AgeTier(recency='age')
  with pytest.raises(ValueError, match='recency must be'):
    kvcache.get('AGE_TIER_INT2', recency='lru')
  with pytest.raises(ValueError, match='valid bit widths'):           # shared params validated
    kvcache.get('AGE_TIER_INT2', recency='age', bits=3)


def test_age_recency_equals_the_flowcache_hybrid_it_replaced():
  """The state and attention equal FlowCache(kind='hybrid', flat linear budget) with the row's
  parameters (what AGE_TIER delegated to before); control: another recent_ratio differs."""
  new = kvcache.get('AGE_TIER_INT2', recency='age', recent_ratio=0.6)
  old = FlowCache(kind='hybrid', bits=2, recent_bits=4, recent_ratio=0.6, budget='linear',
                  budget_min=1.0, budget_max=1.0, group_size=16, plan_scope='window',
                  plan_cadence='ahead', plan_scores='exact', prune_final=True)
  control = dataclasses.replace(old, recent_ratio=0.3)
  assert new.slot_counts(SPEC) == old.slot_counts(SPEC)
  s_new, s_old, s_ctl = _run(new), _run(old), _run(control)
  assert _same(s_new, s_old)
  assert not _same(s_new, s_ctl)
  q = jnp.asarray(np.random.default_rng(1).standard_normal((1, 7, 2, 32)).astype(np.float32))
  for layer in range(SPEC.num_layers):
    o_new, l_new = new.attend(s_new, jnp.int32(layer), q, 'xla')
    o_old, l_old = old.attend(s_old, jnp.int32(layer), q, 'xla')
    np.testing.assert_array_equal(np.asarray(o_new), np.asarray(o_old))
    np.testing.assert_array_equal(np.asarray(l_new), np.asarray(l_old))
