"""No compiled step ever holds a float copy of the whole cache (HLO audit), with a negative control."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.self_forcing import get_config
from kvjax import cache as kvcache
from kvjax import checkpoint as ckpt
from kvjax import run
from kvjax import runconfig
from kvjax.kernels import dense_attention
from kvjax.metrics import compiled_memory, full_extent_float_arrays
from kvjax.sampler import SelfForcing


def _settings(compute_dtype):
  cfg = get_config('tiny')
  cfg.video.latent_width = 10              # 4 x 5 = 20 tokens per frame (distinctive)
  return run.resolve(runconfig.override(cfg, method='bf16', num_latent_frames=12, window_frames=10,
                                        compute_dtype=compute_dtype))   # capacity 7 frames


def test_steps_hold_no_full_float_cache():
  """bf16 fast path: the state is stored as raw 16-bit bits; only chunks are ever floats."""
  s = _settings('bfloat16')
  assert (s.spec.capacity_frames, s.spec.frame_tokens) == (7, 20)
  sf = SelfForcing(s.model_cfg, s.sampler_cfg, s.method, s.spec, latent_hw=(s.height, s.width),
                   impl='xla', graphdef=ckpt.graphdef(s.model_cfg))
  lowered = sf.lower(ckpt.abstract_params(s.model_cfg), 8, s.model_cfg.text_dim)
  for name in ('denoise', 'context'):
    compiled = lowered[name].compile()
    bad = full_extent_float_arrays(compiled.as_text(), 20, [7])
    assert bad == [], f'{name}: full-extent float arrays {bad}'
    assert compiled_memory(compiled)['temp_size_in_bytes'] > 0


def test_audit_catches_a_dequantizing_attention():
  """Negative control: attention through ``materialize`` (a full copy) is flagged."""
  s = _settings('bfloat16')
  m = kvcache.get('BF16')
  state = jax.eval_shape(lambda: m.init(s.spec))
  q = jax.ShapeDtypeStruct((1, 60, 2, 32), jnp.bfloat16)

  def bad(state, q):
    k, v, bias = m.materialize(state, 0)
    return dense_attention(q, k.astype(jnp.float32), v.astype(jnp.float32), bias=bias)

  def good(state, q):
    return m.attend(state, jnp.int32(0), q, 'xla')[0]

  text_bad = jax.jit(bad).lower(state, q).compile().as_text()
  text_good = jax.jit(good).lower(state, q).compile().as_text()
  assert full_extent_float_arrays(text_bad, 20, [7])
  assert full_extent_float_arrays(text_good, 20, [7]) == []


def test_audit_tells_head_major_chunks_from_store_copies():
  """A store of 12 slots and 12 heads: one frame heads-first is not a store copy; the store is."""
  kw = dict(frame_tokens=1560, slot_counts=[18, 12], block_frames=3, num_heads=12)
  chunk = 'x = bf16[1,12,1560,128] fusion(y), y = bf16[12,1560,128] copy(z)'
  assert full_extent_float_arrays(chunk, **kw) == []
  store = 'x = bf16[1,12,1560,12,128] fusion(y)'            # [B, c=12, P, N, H]
  assert full_extent_float_arrays(store, **kw) == ['bf16[1,12,1560,12,128]']
  moved = 'x = f32[1,12,12,1560,128] transpose(y)'          # [B, N, c=12, P, H]
  assert full_extent_float_arrays(moved, **kw) == ['f32[1,12,12,1560,128]']
  ring = 'x = f32[1,18,1560,12,128] fusion(y)'              # the 18-frame ring, whole
  assert full_extent_float_arrays(ring, **kw) == ['f32[1,18,1560,12,128]']
