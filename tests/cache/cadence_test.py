"""When the history is re-encoded: the study's cadence per name, and what re-encoding does.

The study's hook re-quantized its whole buffer from its own reconstruction after the attention of
every DiT call (Gen A and C, and Gen B's per-step names) or once a block, at the clean context
pass (the _REFRESH names). The cadence table below is written from the study's method table, not
from the registry; the rollout test counts the re-encodes the sampler really makes; the KIVI
test checks the closed-form collapse of a saturated one-signed group that makes re-encoding
matter; the spatial tests check that the mask churns with the call's block.
"""

import dataclasses

import jax
import ml_dtypes
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax import checkpoint as ckpt
from kvjax.cache.base import AppendInfo, CacheSpec
from kvjax.cache.rtn import RTN
from kvjax.sampler import SelfForcing, make_noise

EVERY, BLOCK, ONCE = 'every_call', 'per_block', 'once'

# The study's cadence per table row (its method table: "per call, whole buffer" for Gen A and
# the Gen C ring quantizers, "per_step" for Gen B, "refresh_only" for the _REFRESH names).
STUDY_CADENCE = {
    'RTN_INT4': EVERY, 'RTN_INT2': EVERY, 'RTN_K2_V4': EVERY, 'RTN_INT4_RECENT2': EVERY,
    'RTN_INT4_REFRESH': BLOCK, 'KIVI_INT4': EVERY, 'KIVI_INT2': EVERY,
    'KIVI_INT4_REFRESH': BLOCK, 'KIVI_K2_V4': EVERY, 'QUAROT_KV_INT4': EVERY,
    'QUAROT_KV_INT2': EVERY, 'QUAROT_KV_INT4_RECENT2': EVERY, 'QUAROT_KV_INT4_REFRESH': BLOCK,
    'PRQ_INT4': EVERY, 'PRQ_INT2': EVERY, 'QAQ_INT4': EVERY, 'QAQ_INT2': EVERY,
    'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2': EVERY, 'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT4': EVERY,
    'SPATIAL_MIXED_FG_KIVI_INT4_BG_KIVI_INT2': EVERY,
    'SPATIAL_MIXED_FG_QUAROT_KV_INT4_BG_RTN_INT2': EVERY,
}

SPEC = CacheSpec(batch=1, num_layers=2, num_heads=2, head_dim=16, frame_tokens=32,
                 block_frames=3, window_frames=12, total_frames=18, dtype=jnp.bfloat16)


def test_ring_methods_default_to_the_studys_cadence():
  got = {n: kvcache.get(n).cadence for n in STUDY_CADENCE}
  assert got == STUDY_CADENCE
  assert kvcache.get('BF16').cadence == ONCE                  # exact storage: nothing to redo
  for n in ('RTN_INT4', 'KIVI_INT4_REFRESH', 'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2'):
    assert kvcache.get(n, requantize=ONCE).cadence == ONCE     # kvjax's fix, by name
  with pytest.raises(ValueError, match='requantize must be one of'):
    kvcache.get('RTN_INT4', requantize='sometimes')


@dataclasses.dataclass(frozen=True)
class _CountingRTN(RTN):
  """RTN INT4 that counts ``recode`` calls per layer in its stats."""
  name = 'COUNTING_RTN'
  in_study = False

  def init_stats(self, spec):
    return {'recodes': jnp.zeros((spec.num_layers,), jnp.int32)}

  def recode(self, state, layer, k, v, info):
    state = super().recode(state, layer, k, v, info)
    return state.replace(stats={'recodes': state.stats['recodes'].at[layer].add(1)})


@pytest.mark.parametrize('cadence,per_block', [(EVERY, 5), (BLOCK, 1), (ONCE, 0)])
def test_rollout_recodes_as_often_as_the_cadence_says(cfg32, sampler_cfg, cadence, per_block):
  """4 denoising calls + the context pass a block: 5 re-encodes (every call), 1, or none."""
  spec = CacheSpec(batch=1, num_layers=cfg32.num_layers, num_heads=cfg32.num_heads,
                   head_dim=cfg32.head_dim, frame_tokens=16, block_frames=3, window_frames=9,
                   dtype=cfg32.cdtype)
  method = _CountingRTN(requantize=cadence)
  sf = SelfForcing(cfg32, sampler_cfg, method, spec, latent_hw=(8, 8), impl='xla',
                   graphdef=ckpt.graphdef(cfg32))
  noise = make_noise(0, 1, 9, cfg32.in_dim, 8, 8, sampler_cfg)
  text = np.zeros((1, cfg32.text_len, cfg32.text_dim), np.float32)
  _, cache, stats = sf.rollout(ckpt.init_params(cfg32, 0), noise, text)
  assert stats.dit_calls == 15
  np.testing.assert_array_equal(np.asarray(cache.stats['recodes']),
                                [3 * per_block] * cfg32.num_layers)


def _bf16(x):
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)


def test_reencoding_collapses_a_saturated_kivi_key_group_to_zero():
  """A one-signed key group in [5, 6]: the clamped zero-point saturates every code at qmax, so
  the first encode reconstructs ~(max - min); the second sees a constant group, whose scale
  1e-8 underflows fp16 to 0, and reconstructs exactly 0 (closed form in numpy)."""
  rng = np.random.default_rng(0)
  k = rng.standard_normal((1, 96, 2, 16)).astype(np.float32)
  k[:, :, 0, 3] = rng.uniform(5.0, 6.0, 96)                  # channel 3 of head 0, one-signed
  v = rng.standard_normal((1, 96, 2, 16)).astype(np.float32)
  kb = jnp.asarray(k, jnp.bfloat16)
  info = AppendInfo(jnp.int32(0))

  def history(method, recodes):
    st = method.append(method.init(SPEC), jnp.int32(0), kb, jnp.asarray(v, jnp.bfloat16), info)
    for _ in range(recodes):
      st = method.recode(st, jnp.int32(0), kb, jnp.asarray(v, jnp.bfloat16), AppendInfo(jnp.int32(3)))
    return np.asarray(method.materialize(st, 0)[0][0, :96, 0, 3])   # the channel, frames 0-2

  x = np.asarray(kb[0, :, 0, 3], np.float32)
  once = history(kvcache.get('KIVI_INT4'), 0)
  for g in range(6):                                          # closed form, group by group
    grp = x[16 * g:16 * (g + 1)]
    # The study: scale computed in the tensor dtype (bf16), stored fp16.
    scale = np.float32(np.float16(np.float32((_bf16(grp.max()) - _bf16(grp.min())) / _bf16(15))))
    np.testing.assert_allclose(once[16 * g:16 * (g + 1)], 15 * scale, rtol=0, atol=0)
  assert np.all(np.abs(once - x) > 3.5)                       # far from the true 5..6
  np.testing.assert_array_equal(history(kvcache.get('KIVI_INT4'), 1), 0.0)
  # Controls: the unclamped zero-point keeps the group near its values through re-encodes.
  fixed = history(kvcache.get('KIVI_INT4', clamp_zero_point=False), 3)
  assert np.max(np.abs(fixed - x)) < 0.1
  assert np.array_equal(np.float16(np.float32(1e-8)), np.float16(0))


def test_reencoding_rtn_is_nearly_idempotent():
  """Symmetric RTN re-encoded from its own reconstruction: codes barely move (BF16 rounding of
  the recomputed scale), unlike the clamped asymmetric quantizer above."""
  rng = np.random.default_rng(1)
  k = jnp.asarray(rng.standard_normal((1, 96, 2, 16)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((1, 96, 2, 16)), jnp.bfloat16)
  m = kvcache.get('RTN_INT4')
  st = m.append(m.init(SPEC), jnp.int32(0), k, v, AppendInfo(jnp.int32(0)))
  a = np.asarray(m.materialize(st, 0)[0])[:, :96]
  for _ in range(3):
    st = m.recode(st, jnp.int32(0), k, v, AppendInfo(jnp.int32(3)))
  b = np.asarray(m.materialize(st, 0)[0])[:, :96]
  err = np.abs(a - np.asarray(k, np.float32)).mean()
  assert np.abs(a - b).mean() < 0.02 * err


SPATIAL = 'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2'


def _spatial_state(method, blocks=2, seed=0):
  rng = np.random.default_rng(seed)
  st = method.init(SPEC)
  for b in range(blocks):
    k = jnp.asarray(rng.standard_normal((1, 96, 2, 16)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((1, 96, 2, 16)), jnp.bfloat16)
    info = AppendInfo(jnp.int32(3 * b))
    for layer in range(SPEC.num_layers):
      st = method.recode(st, jnp.int32(layer), k, v, info)
      st = method.append(st, jnp.int32(layer), k, v, info)
  return st


def _noisy_block(loud_positions, seed=5):
  rng = np.random.default_rng(seed)
  v = rng.standard_normal((1, 3, 32, 2, 16)).astype(np.float32) * 0.1
  v[:, :, loud_positions] *= 80.0                            # these positions vary the most
  return jnp.asarray(rng.standard_normal((1, 96, 2, 16)), jnp.bfloat16), \
      jnp.asarray(v.reshape(1, 96, 2, 16), jnp.bfloat16)


def test_spatial_mask_churns_with_the_calls_noisy_block():
  """Two calls whose noisy blocks are loud at different positions give two masks, and the
  stored history is re-tiered with each; the mask is the top-n_fg positions by variance."""
  m = kvcache.get(SPATIAL)
  st = _spatial_state(m)
  info = AppendInfo(jnp.int32(6))
  n_fg = m.n_fg(SPEC.frame_tokens)
  loud_a, loud_b = np.arange(0, 8), np.arange(20, 28)
  s_a = m.recode(st, jnp.int32(0), *_noisy_block(loud_a), info)
  s_b = m.recode(st, jnp.int32(0), *_noisy_block(loud_b), info)
  fg_a = set(np.asarray(s_a.stats['order'][0, :n_fg]).tolist())
  fg_b = set(np.asarray(s_b.stats['order'][0, :n_fg]).tolist())
  assert set(loud_a) <= fg_a and set(loud_b) <= fg_b and fg_a != fg_b
  # Re-tiered: the same history decodes differently under the two masks.
  ka, kb = (np.asarray(m.materialize(s, 0)[0]) for s in (s_a, s_b))
  assert not np.allclose(np.sort(ka.ravel()), np.sort(kb.ravel()))
  # The other layer is untouched by a layer-0 call.
  np.testing.assert_array_equal(np.asarray(s_a.stats['order'][1]), np.asarray(st.stats['order'][1]))


def test_spatial_retiering_keeps_each_token_at_its_position():
  """Re-tiering maps record tokens back to their positions: with an exact (INT4/INT4, loud)
  history the reconstruction of every position stays close to its true value after the mask
  moves (a wrong inverse permutation would scramble positions)."""
  m = kvcache.get('SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT4')
  rng = np.random.default_rng(3)
  k = rng.standard_normal((1, 96, 2, 16)).astype(np.float32)
  k += np.linspace(-20, 20, 32)[None, None, :, None, None].repeat(3, 1).reshape(1, 96, 1, 1)
  kb = jnp.asarray(k, jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((1, 96, 2, 16)), jnp.bfloat16)
  st = m.init(SPEC)
  st = m.recode(st, jnp.int32(0), kb, v, AppendInfo(jnp.int32(0)))
  st = m.append(st, jnp.int32(0), kb, v, AppendInfo(jnp.int32(0)))
  for loud in (np.arange(0, 8), np.arange(24, 32)):
    st = m.recode(st, jnp.int32(0), *_noisy_block(loud), AppendInfo(jnp.int32(3)))
    order = np.asarray(st.stats['order'][0])
    kk = np.asarray(m.materialize(st, 0)[0])[0]
    # Sources read foreground then background tokens in record order: map back to positions.
    n_fg, slots = m.n_fg(32), SPEC.capacity_frames
    fg = kk[:slots * n_fg].reshape(slots, n_fg, 2, 16)[:3]
    bg = kk[slots * n_fg:].reshape(slots, 32 - n_fg, 2, 16)[:3]
    recon = np.zeros((3, 32, 2, 16), np.float32)
    recon[:, order] = np.concatenate([fg, bg], axis=1)
    true = np.asarray(kb, np.float32).reshape(3, 32, 2, 16)
    assert np.abs(recon - true).mean() < 0.25 * np.abs(true).mean()


def test_quantize_once_spatial_mask_is_fixed_at_append():
  """Control: with kvjax's fix the records of a frame never change after its append."""
  m = kvcache.get(SPATIAL, requantize=ONCE)
  rng = np.random.default_rng(0)
  st = m.init(SPEC)
  k = jnp.asarray(rng.standard_normal((1, 96, 2, 16)), jnp.bfloat16)
  st = m.append(st, jnp.int32(0), k, k, AppendInfo(jnp.int32(0)))
  before = jax.tree.map(np.asarray, st.k)
  st = m.append(st, jnp.int32(0), *_noisy_block(np.arange(8)), AppendInfo(jnp.int32(3)))
  for key, a in before.items():
    np.testing.assert_array_equal(np.asarray(st.k[key])[:, :, :3], a[:, :, :3])


def test_fixes_name_kvjax_corrections_and_build():
  """Every study row's FIXES are parameters of the method and ``fixed()`` builds the corrected
  method (quantize-once for the ring methods, age tiers for AGE_TIER); BF16 has none."""
  for name in kvcache.PAPER_NAMES:
    m = kvcache.get(name)
    if not m.FIXES:
      assert m.fixed() == m
      continue
    assert set(m.FIXES) <= set(m.params()), name
    f = m.fixed()
    assert f != m and all(f.params().get(k, v) == v for k, v in m.FIXES.items()), name
    if name in STUDY_CADENCE:
      assert f.cadence == ONCE
  assert kvcache.get('BF16').FIXES == {}
  assert type(kvcache.get('AGE_TIER_INT2').fixed()).__name__ == 'AgeTierByAge'
