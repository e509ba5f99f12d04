"""Self-Forcing sampler: schedule, noise handling, and the cached rollout against recomputation.

(b) A cached rollout (4 steps + context pass per block, >= 3 blocks) equals a cache-free
block-causal recomputation, in diffusers (independent code) and in kvjax's own masked path, for
global attention, a rolling window, and a window with sink frames. (c) Negative controls: the
wrong mask and the wrong RoPE frame offset both break the equality.
"""

import collections

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import cache as kvcache
from kvjax import checkpoint as ckpt
from kvjax.model import WanDiT
from kvjax.sampler import rollout
from kvjax.sampler import (Noise, SamplerConfig, SelfForcing, clear_compile_cache, frame_mask,
                           load_noise, make_noise,
                           reference_rollout, schedule, shifted_grid, validate_noise)
from tests.conftest import HAS_TORCH, rel_err, requires_torch

TOL = 1e-4
# (frames, window, sink): global, rolling window, window + sink, window/sink not multiples of 3.
CASES = [(9, 9, 0), (15, 9, 0), (15, 9, 3), (15, 7, 1)]


def test_schedule_matches_self_forcing():
  ts, sig = schedule(SamplerConfig())
  np.testing.assert_allclose(ts, [1000.0, 937.5, 833.3333, 625.0], rtol=1e-6)
  np.testing.assert_allclose(sig, [1.0, 0.9375, 0.8333333, 0.625], rtol=1e-6)
  grid_t, _ = shifted_grid(1000, 5.0)
  assert grid_t[0] == 1000.0 and abs(grid_t[-1] - 4.98) < 0.01


def test_frame_mask_rows():
  m = frame_mask(12, 3, 9, 3)
  # Block 3 (frames 9..11) sees sinks 0..2 and frames 6..11, not 3..5.
  assert m[9].tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1]
  # Block 0 sees itself only.
  assert m[0].tolist() == [1, 1, 1] + [0] * 9
  assert np.array_equal(frame_mask(9, 3, 9), np.repeat(np.repeat(np.tril(np.ones((3, 3), bool)), 3, 0), 3, 1))


def _cached(cfg, params, noise, text, window, sink, sampler_cfg, method='bf16'):
  nf = noise.initial.shape[1]
  spec = kvcache.CacheSpec(batch=1, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                           head_dim=cfg.head_dim, frame_tokens=16, block_frames=3,
                           window_frames=min(window, nf), sink_frames=sink, dtype=cfg.cdtype)
  sf = SelfForcing(cfg, sampler_cfg, kvcache.get(method), spec, latent_hw=(8, 8), impl='xla',
                   graphdef=ckpt.graphdef(cfg))
  lat, cache, stats = sf.rollout(params, noise, text)
  assert stats.dit_calls == 5 * (nf // 3)
  return lat


@pytest.fixture(scope='module')
def params32(cfg32):
  return ckpt.init_params(cfg32, 3)


@pytest.mark.parametrize('frames,window,sink', CASES)
def test_cached_rollout_equals_kvjax_recompute(cfg32, params32, text32, sampler_cfg, frames, window, sink):
  noise = make_noise(frames, 1, frames, 16, 8, 8, sampler_cfg)
  lat = _cached(cfg32, params32, noise, text32, window, sink, sampler_cfg)
  model = nnx.merge(ckpt.graphdef(cfg32), params32)
  ref = reference_rollout(model, noise, text32, sampler_cfg, window, sink)
  assert rel_err(lat, ref) <= TOL


@requires_torch
@pytest.mark.parametrize('frames,window,sink', CASES)
def test_cached_rollout_equals_diffusers_recompute(cfg32, torch_twin, text32, sampler_cfg, frames, window, sink):
  from kvjax import reference_torch as rt
  tm, params = torch_twin
  noise = make_noise(100 + frames, 1, frames, 16, 8, 8, sampler_cfg)
  lat = _cached(cfg32, params, noise, text32, window, sink, sampler_cfg)
  ref = rt.recompute_rollout(tm, noise, text32, sampler_cfg, window, sink)
  assert rel_err(lat, ref) <= TOL


class TestNegativeControls:
  """(c) The equivalence checks are sensitive to the mask and to the RoPE frame offset."""

  def _setup(self, cfg32, sampler_cfg):
    params = ckpt.init_params(cfg32, 3)
    noise = make_noise(7, 1, 15, 16, 8, 8, sampler_cfg)
    return params, noise

  def test_wrong_mask_fails(self, cfg32, text32, sampler_cfg):
    params, noise = self._setup(cfg32, sampler_cfg)
    model = nnx.merge(ckpt.graphdef(cfg32), params)
    lat = _cached(cfg32, params, noise, text32, 9, 0, sampler_cfg)
    right = reference_rollout(model, noise, text32, sampler_cfg, 9, 0)
    wrong = reference_rollout(model, noise, text32, sampler_cfg, 15, 0)   # global mask
    assert rel_err(lat, right) <= TOL
    assert rel_err(lat, wrong) > 100 * TOL
    # Off-by-one sink in the mask is also detected.
    wrong_sink = reference_rollout(model, noise, text32, sampler_cfg, 9, 3)
    assert rel_err(_cached(cfg32, params, noise, text32, 9, 2, sampler_cfg), wrong_sink) > 100 * TOL

  def test_wrong_rope_offset_fails(self, cfg32, text32, sampler_cfg, monkeypatch):
    params, noise = self._setup(cfg32, sampler_cfg)
    model = nnx.merge(ckpt.graphdef(cfg32), params)
    right = reference_rollout(model, noise, text32, sampler_cfg, 9, 0)
    original = WanDiT._rope
    monkeypatch.setattr(WanDiT, '_rope', lambda self, start, nf, hh, ww: original(self, 0, nf, hh, ww))
    clear_compile_cache()
    try:
      lat = _cached(cfg32, params, noise, text32, 9, 0, sampler_cfg)
    finally:
      clear_compile_cache()
    assert rel_err(lat, right) > 100 * TOL


def test_noise_validation(sampler_cfg, tmp_path):
  good = make_noise(0, 1, 6, 16, 4, 4, sampler_cfg)
  validate_noise(good, sampler_cfg, 16)
  with pytest.raises(ValueError, match='not a multiple of the block'):
    validate_noise(Noise(np.zeros((1, 5, 16, 4, 4)), good.renoise), sampler_cfg, 16)
  with pytest.raises(ValueError, match='channels'):
    validate_noise(Noise(np.zeros((1, 6, 4, 16, 4)), good.renoise), sampler_cfg, 16)
  with pytest.raises(ValueError, match='renoise has shape'):
    validate_noise(Noise(good.initial, np.zeros((2, 3, 1, 3, 16, 4, 5))), sampler_cfg, 16)
  bad = np.array(good.initial)
  bad[0, 0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    validate_noise(Noise(bad, good.renoise), sampler_cfg, 16)
  with pytest.raises(FileNotFoundError):
    load_noise(str(tmp_path / 'missing.npz'), sampler_cfg, 16)
  np.savez(tmp_path / 'partial.npz', initial=np.asarray(good.initial))
  with pytest.raises(ValueError, match='missing array'):
    load_noise(str(tmp_path / 'partial.npz'), sampler_cfg, 16)
  (tmp_path / 'junk.npz').write_bytes(b'not a zip')
  with pytest.raises(ValueError, match='not a numpy .npz archive'):
    load_noise(str(tmp_path / 'junk.npz'), sampler_cfg, 16)


def test_explicit_noise_is_deterministic(cfg32, params32, text32, sampler_cfg):
  noise = make_noise(5, 1, 6, 16, 8, 8, sampler_cfg)
  a = _cached(cfg32, params32, noise, text32, 6, 0, sampler_cfg)
  b = _cached(cfg32, params32, Noise(np.asarray(noise.initial), np.asarray(noise.renoise)), text32, 6, 0,
              sampler_cfg)
  np.testing.assert_array_equal(a, b)
  other = _cached(cfg32, params32, make_noise(6, 1, 6, 16, 8, 8, sampler_cfg), text32, 6, 0, sampler_cfg)
  assert not np.allclose(a, other)


def test_method_hooks_select_the_step_functions(cfg32, sampler_cfg):
  """Step reuse comes from the method's declared hooks (no probing)."""
  spec = kvcache.CacheSpec(batch=1, num_layers=cfg32.num_layers, num_heads=cfg32.num_heads,
                           head_dim=cfg32.head_dim, frame_tokens=16, block_frames=3,
                           window_frames=9, dtype=cfg32.cdtype, total_frames=9)
  abstract = ckpt.abstract_params(cfg32)

  def steps(method):
    sf = SelfForcing(cfg32, sampler_cfg, method, spec, latent_hw=(8, 8), impl='xla',
                     graphdef=ckpt.graphdef(cfg32))
    return sf.reuse_threshold, set(sf._lowerers(abstract, 8, cfg32.text_dim))

  base = {'encode', 'denoise', 'context', 'x0', 'renoise'}
  assert steps(kvcache.get('bf16')) == (0.0, base)
  assert steps(kvcache.get('prune_int4')) == (0.0, base)
  assert steps(kvcache.get('native')) == (1.5, base | {'feature', 'rel_l1'})
  assert steps(kvcache.get('native', reuse_threshold=0.0)) == (0.0, base)
  assert steps(kvcache.get('rtn_int4', requantize='every_call')) == (0.0, base)


def test_compiled_steps_are_bounded_least_recently_used_first(monkeypatch):
  """The process-wide store of compiled steps keeps at most MAX_COMPILED, evicting the least
  recently used; a hit compiles nothing (an unbounded store made a process running many methods
  grow by ~560 memory mappings a method, towards the kernel's limit)."""
  monkeypatch.setattr(rollout, '_COMPILED', collections.OrderedDict())
  monkeypatch.setattr(rollout, 'MAX_COMPILED', 4)
  lowered = []

  class Lowered:
    def __init__(self, key):
      self.key = key

    def compile(self):
      lowered.append(self.key)
      return ('exe', self.key)

  def get(key):
    return rollout._compiled(key, lambda: Lowered(key))

  for k in range(4):
    assert get(k) == ('exe', k)
  assert get(0) == ('exe', 0) and lowered == [0, 1, 2, 3]   # a hit: 0 becomes the most recent
  get(4)                                                   # evicts 1, the least recently used
  assert list(rollout._COMPILED) == [2, 3, 0, 4]
  get(1)                                                   # compiled again, evicting 2
  assert lowered == [0, 1, 2, 3, 4, 1] and list(rollout._COMPILED) == [3, 0, 4, 1]


def test_flowcache_native_reuses_one_step_a_block_at_1_5_and_none_at_0_1(cfg32, params32,
                                                                          sampler_cfg):
  """The study's logged reuse counts (one of four denoising steps a block at 1.5, none at 0.1;
  at 0.1 the output equals BF16's bit for bit), with the reused step named."""
  spec = kvcache.CacheSpec(batch=1, num_layers=cfg32.num_layers, num_heads=cfg32.num_heads,
                           head_dim=cfg32.head_dim, frame_tokens=16, block_frames=3,
                           window_frames=9, dtype=cfg32.cdtype)
  noise = make_noise(0, 1, 9, cfg32.in_dim, 8, 8, sampler_cfg)
  text = np.random.default_rng(1).standard_normal((1, cfg32.text_len, cfg32.text_dim))

  def roll(method):
    sf = SelfForcing(cfg32, sampler_cfg, method, spec, latent_hw=(8, 8), impl='xla',
                     graphdef=ckpt.graphdef(cfg32))
    lat, _, stats = sf.rollout(params32, noise, text.astype(np.float32))
    return lat, stats

  bf16, _ = roll(kvcache.get('bf16'))
  lat, stats = roll(kvcache.get('native'))
  assert stats.reused_at == [(0, 1), (1, 1), (2, 1)] and stats.dit_calls == 3 * 4
  assert not np.array_equal(lat, bf16)
  lat, stats = roll(kvcache.get('native', reuse_threshold=0.1))
  assert stats.reused_at == [] and stats.dit_calls == 3 * 5
  np.testing.assert_array_equal(lat, bf16)
