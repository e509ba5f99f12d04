"""Cache-free references: the block-causal frame mask and the masked recomputation rollout."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.model import WanDiT
from kvjax.sampler.noise import Noise
from kvjax.sampler.scheduler import SamplerConfig, schedule

f32 = jnp.float32


def frame_mask(num_frames: int, block_frames: int, window_frames: int, sink_frames: int = 0):
  """Block-causal frame mask equivalent to the KV-cache rollout.

  Query frame i of block k (ending at e_k = block_frames * (k + 1)) may attend to key frame j iff
  j < e_k and (j < sink_frames or j >= e_k - (window_frames - sink_frames)).

  Returns:
    [num_frames, num_frames] numpy bool.
  """
  i = np.arange(num_frames)[:, None]
  j = np.arange(num_frames)[None, :]
  end = (i // block_frames + 1) * block_frames
  return (j < end) & ((j < sink_frames) | (j >= end - (window_frames - sink_frames)))


@functools.lru_cache(maxsize=8)
def _jit_cross(gdef):
  return jax.jit(lambda p, t: nnx.merge(gdef, p).cross_kv(t))


@functools.lru_cache(maxsize=8)
def _jit_full(gdef):
  return jax.jit(lambda p, x, t, c, m: nnx.merge(gdef, p).forward_full(x, t, c, m))


def reference_rollout(model: WanDiT, noise: Noise, text_states, cfg: SamplerConfig,
                      window_frames: int, sink_frames: int = 0, mask_fn=frame_mask):
  """Cache-free rollout: every DiT call recomputes the whole prefix under the frame mask.

  Block b's call at timestep t runs the model on [clean frames 0..e_b-bf at t=context_noise ||
  the block's noisy frames at t] with ``mask_fn`` and keeps the last block's outputs. This is
  the independent path the KV-cache rollout is checked against.

  Returns:
    latents [B, F, C, h, w] float32 numpy.
  """
  ts, sigmas = schedule(cfg)
  init = jnp.asarray(noise.initial, f32)
  b, nf = init.shape[:2]
  bf = cfg.block_frames
  gdef, params = nnx.split(model)
  cross = _jit_cross(gdef)(params, jnp.asarray(text_states, model.cfg.cdtype))
  fwd = functools.partial(_jit_full(gdef), params)
  clean = []
  for blk in range(nf // bf):
    n = (blk + 1) * bf
    mask = jnp.asarray(mask_fn(n, bf, window_frames, sink_frames))
    x = init[:, blk * bf:n]
    for i, (t, s) in enumerate(zip(ts, sigmas)):
      xs = jnp.concatenate(clean + [x], axis=1)
      tt = jnp.concatenate([jnp.full((b, n - bf), cfg.context_noise, f32),
                            jnp.full((b, bf), t, f32)], axis=1)
      v = fwd(xs, tt, cross, mask)[:, n - bf:]
      x0 = x - s * v
      if i + 1 < len(ts):
        x = (1.0 - sigmas[i + 1]) * x0 + sigmas[i + 1] * jnp.asarray(noise.renoise)[blk, i]
    clean.append(x0)
  return np.asarray(jnp.concatenate(clean, axis=1))
