"""The causal Wan DiT against diffusers' WanTransformer3DModel and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.self_forcing import get_config
from kvjax import checkpoint as ckpt
from kvjax.kernels import rope
from kvjax.model import WanConfig, WanDiT, count_params
from kvjax.model.layers import timestep_sinusoid
from tests.conftest import rel_err, requires_torch, tiny_config


def _inputs(cfg, frames=6, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((1, frames, cfg.in_dim, 8, 8)).astype(np.float32)
  t = np.array([[1000, 1000, 937.5, 833.3333, 250.0, 0.0][:frames]], np.float32)
  return x, t


@requires_torch
class TestDiffusersParity:
  """(a) One DiT call with per-frame timesteps equals diffusers (per-token timesteps)."""

  def test_full_forward(self, cfg32, torch_twin, text32):
    from kvjax import reference_torch as rt
    tm, params = torch_twin
    model = nnx.merge(ckpt.graphdef(cfg32), params)
    x, t = _inputs(cfg32)
    ref = rt.forward(tm, x, t, text32)
    cross = model.cross_kv(jnp.asarray(text32))
    out = model.forward_full(jnp.asarray(x), jnp.asarray(t), cross, np.ones((6, 6), bool))
    assert rel_err(out, ref) <= 1e-4

  def test_cached_call_without_history(self, cfg32, torch_twin, text32):
    """The chunked own-block attention path (no cache) is the same bidirectional call."""
    from kvjax import reference_torch as rt
    tm, params = torch_twin
    model = nnx.merge(ckpt.graphdef(cfg32), params)
    x, t = _inputs(cfg32)
    ref = rt.forward(tm, x, t, text32)
    out, _ = model.forward_cached(jnp.asarray(x), jnp.asarray(t), model.cross_kv(jnp.asarray(text32)), 0)
    assert rel_err(out, ref) <= 1e-4

  def test_per_frame_timesteps_matter(self, cfg32, torch_twin, text32):
    """Negative control: a single shared timestep gives a different answer."""
    from kvjax import reference_torch as rt
    tm, params = torch_twin
    model = nnx.merge(ckpt.graphdef(cfg32), params)
    x, t = _inputs(cfg32)
    ref = rt.forward(tm, x, t, text32)
    wrong = np.full_like(t, 1000.0)
    out, _ = model.forward_cached(jnp.asarray(x), jnp.asarray(wrong), model.cross_kv(jnp.asarray(text32)), 0)
    assert rel_err(out, ref) > 1e-2


def test_rope_against_closed_form():
  """Interleaved 3-D RoPE equals the complex rotation x * exp(i * pos * theta_axis)."""
  head_dim, f0, nf, hh, ww = 32, 5, 2, 3, 4
  cos, sin = rope.block_angles(f0, nf, hh, ww, head_dim=head_dim, max_pos=64, theta=10000.0)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, nf * hh * ww, 2, head_dim)).astype(np.float32)
  out = np.asarray(rope.apply(jnp.asarray(x), cos, sin))
  ct, ch, cw = rope.axis_channels(head_dim)
  assert (ct, ch, cw) == (6, 5, 5)
  z = x[..., 0::2] + 1j * x[..., 1::2]
  tok = 0
  for f in range(nf):
    for h in range(hh):
      for w in range(ww):
        ang = np.concatenate([(f0 + f) * 10000.0 ** (-2 * np.arange(ct) / (2 * ct)),
                              h * 10000.0 ** (-2 * np.arange(ch) / (2 * ch)),
                              w * 10000.0 ** (-2 * np.arange(cw) / (2 * cw))])
        zr = z[0, tok] * np.exp(1j * ang)
        np.testing.assert_allclose(out[0, tok, :, 0::2], zr.real, atol=2e-5)
        np.testing.assert_allclose(out[0, tok, :, 1::2], zr.imag, atol=2e-5)
        tok += 1


def test_rope_1p3b_split():
  assert rope.axis_channels(128) == (22, 21, 21)


def test_timestep_sinusoid_cos_first():
  t = jnp.array([0.0, 937.5])
  e = np.asarray(timestep_sinusoid(t, 8))
  omega = 10000.0 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(e[1, :4], np.cos(937.5 * omega), atol=1e-4)
  np.testing.assert_allclose(e[1, 4:], np.sin(937.5 * omega), atol=1e-4)
  np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_patchify_unpatchify_roundtrip_order(cfg32):
  """Unpatchify inverts a head emitting each patch's channels in (ph, pw, c) order."""
  model = nnx.eval_shape(lambda: WanDiT(cfg32, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 16, 4, 6)).astype(np.float32)
  patches = x.reshape(2, 3, 16, 2, 2, 3, 2).transpose(0, 1, 3, 5, 4, 6, 2).reshape(2, 3, 6, 64)
  back = np.asarray(WanDiT.unpatchify(model, jnp.asarray(patches), 4, 6))
  np.testing.assert_array_equal(back, x)


def test_full_size_parameter_count():
  """(d) The 1.3B config through eval_shape: 1,418,996,800 parameters, nothing allocated."""
  cfg = WanConfig.from_dict(get_config('wan2.1_t2v_1.3b').model)
  params = ckpt.abstract_params(cfg)
  assert count_params(params) == 1_418_996_800
  blocks = nnx.to_pure_dict(params)['blocks']
  assert blocks['ffn']['fc1']['kernel'].shape == (30, 1536, 8960)
  assert blocks['self_attn']['q']['kernel'].shape == (30, 1536, 1536)


def test_config_validation():
  with pytest.raises(ValueError, match='divisible'):
    tiny_config(num_heads=3)
  with pytest.raises(ValueError, match='unsupported dtype'):
    tiny_config(compute_dtype='int8')
  with pytest.raises(ValueError, match='unknown model config keys'):
    WanConfig.from_dict({'dim': 64, 'bogus': 1})
  with pytest.raises(ValueError, match='unknown config variant'):
    get_config('wan2.1_t2v_14b')


def test_bf16_forward_is_finite_and_close(cfg32, text32):
  """The bf16 fast path stays within bf16 error of the float32 path on the same weights."""
  params = ckpt.init_params(cfg32, 0)
  cfg16 = cfg32.replace(compute_dtype='bfloat16')
  x, t = _inputs(cfg32, frames=3)
  outs = []
  for cfg in (cfg32, cfg16):
    model = nnx.merge(ckpt.graphdef(cfg), params)
    v, _ = model.forward_cached(jnp.asarray(x), jnp.asarray(t), model.cross_kv(jnp.asarray(text32)), 0)
    outs.append(np.asarray(v))
  assert np.all(np.isfinite(outs[1]))
  assert rel_err(outs[1], outs[0]) < 5e-2
