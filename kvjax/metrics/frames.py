"""Fidelity of decoded videos against a reference video: per-frame PSNR and SSIM on uint8 RGB.

Frames are [B, T, H, W, 3] uint8 (what the video writer receives, never a re-encoded mp4).
A frame identical to its reference has infinite PSNR; each frame's value is capped at
``PSNR_CAP`` dB so that an average over frames stays finite and comparable (a capped frame
differs from its reference by less than one uint8 level in ~1 pixel in 10^6).

SSIM (``frame_ssim``) is scikit-image's ``structural_similarity`` as the study called it: a 7x7
uniform window, sample (co)variances (x 49/48), K1 = 0.01, K2 = 0.03, data range 255, the mean over
the windows that fit inside the image (scikit-image filters the whole image and then crops 3
pixels from each border, which leaves exactly those windows), then the mean over the 3 channels.
The window statistics are taken around each window's own mean (49 shifted slices), not as
E[x^2] - E[x]^2, which in float32 would lose ~1e-4 of the SSIM to cancellation at 255-scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 7
_K1, _K2, _RANGE = 0.01, 0.03, 255.0

PSNR_CAP = 100.0


def frame_psnr(video: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """[B, T, H, W, 3] uint8 x 2 -> [T] PSNR in dB (data range 255, MSE over batch and pixels,
  each frame capped at PSNR_CAP)."""
  a = np.asarray(video, np.float64)
  b = np.asarray(ref, np.float64)
  if a.shape != b.shape or a.ndim != 5:
    raise ValueError(f'videos must be equal [B, T, H, W, 3] arrays, got {a.shape} and {b.shape}')
  mse = np.mean((a - b) ** 2, axis=(0, 2, 3, 4))
  with np.errstate(divide='ignore'):
    out = 10.0 * np.log10(255.0**2 / mse)
  return np.minimum(out, PSNR_CAP)


def _box_mean(x, w: int):
  """Mean of every w x w window inside x [..., H, W] -> [..., H - w + 1, W - w + 1]."""
  h, wd = x.shape[-2] - w + 1, x.shape[-1] - w + 1
  return sum(x[..., i:i + h, j:j + wd] for i in range(w) for j in range(w)) / (w * w)


def _centered_moments(x, y, w: int):
  """Window means of x, y and their sample variances and covariance, each taken around the
  window's own means: [..., H - w + 1, W - w + 1] x 5."""
  mx, my = _box_mean(x, w), _box_mean(y, w)
  h, wd = mx.shape[-2], mx.shape[-1]
  vx = vy = cxy = 0.0
  for i in range(w):
    for j in range(w):
      dx = x[..., i:i + h, j:j + wd] - mx
      dy = y[..., i:i + h, j:j + wd] - my
      vx, vy, cxy = vx + dx * dx, vy + dy * dy, cxy + dx * dy
  n = w * w
  return mx, my, vx / (n - 1), vy / (n - 1), cxy / (n - 1)


@functools.partial(jax.jit, static_argnames='window')
def _ssim_images(a, b, window: int = SSIM_WINDOW):
  """a, b: [N, H, W, 3] float32 in [0, 255] -> [N] SSIM (mean over windows, then channels)."""
  x, y = jnp.moveaxis(a, -1, 1), jnp.moveaxis(b, -1, 1)             # [N, 3, H, W]
  mx, my, vx, vy, cxy = _centered_moments(x, y, window)
  c1, c2 = (_K1 * _RANGE) ** 2, (_K2 * _RANGE) ** 2
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def frame_ssim(video: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """[B, T, H, W, 3] uint8 x 2 -> [T] SSIM: per image as scikit-image's (module docstring), the
  mean over the batch. Frames must be at least SSIM_WINDOW pixels high and wide."""
  a, b = np.asarray(video), np.asarray(ref)
  if a.shape != b.shape or a.ndim != 5 or a.shape[-1] != 3:
    raise ValueError(f'videos must be equal [B, T, H, W, 3] arrays, got {a.shape} and {b.shape}')
  if min(a.shape[2:4]) < SSIM_WINDOW:
    raise ValueError(f'SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, '
                     f'got {a.shape[2]}x{a.shape[3]}')
  bb, t = a.shape[:2]
  flat = lambda v: jnp.asarray(v.reshape(bb * t, *v.shape[2:]), jnp.float32)
  per = np.asarray(_ssim_images(flat(a), flat(b)), np.float64).reshape(bb, t)
  return per.mean(axis=0)
