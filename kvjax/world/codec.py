"""The world's codec, in place of the Wan VAE at tiny size: RGB frames <-> latents, exact.

Space-to-depth by ``FACTOR`` = 2: every 2x2 pixel patch of a frame becomes one latent position
with 2 * 2 * 3 = 12 channels, so a 16x16 RGB frame is a [12, 8, 8] latent and one latent frame
is one video frame (no temporal compression, unlike the Wan VAE's 4x). Values are not rescaled:
a latent holds the frame's pixels in [-1, 1] (uint8 c maps to c / 127.5 - 1), whose standard
deviation on the world's videos is about 0.6, close enough to the unit-variance noise of flow
matching. ``decode(encode(x)) == x`` bit for bit; decoded frames go through the same
``kvjax.video`` path (clip, round to uint8, H.264 mp4) as the VAE's.

Why not a learned autoencoder: an exact codec adds no error of its own, so every difference
between two rollouts' videos is the cache method's; and it costs nothing to train or run. Its
price is no spatial compression beyond 2x2 (the world's 16x16 frames are 16 DiT tokens each).

Channel order: channel ``(i * FACTOR + j) * 3 + c`` of latent position (y, x) is colour c of
pixel (FACTOR * y + i, FACTOR * x + j).
"""

from __future__ import annotations

import numpy as np

FACTOR = 2
CHANNELS = FACTOR * FACTOR * 3


def latent_shape(height: int, width: int) -> tuple[int, int, int]:
  """(C, h, w) of a latent frame of a ``height x width`` RGB frame; both must divide by FACTOR."""
  if height % FACTOR or width % FACTOR:
    raise ValueError(f'frame size {height}x{width} is not divisible by the codec factor {FACTOR}')
  return CHANNELS, height // FACTOR, width // FACTOR


def encode(frames) -> np.ndarray:
  """frames [..., T, H, W, 3] float in [-1, 1] -> latents [..., T, 12, H/2, W/2] float32."""
  x = np.asarray(frames, np.float32)
  if x.ndim < 4 or x.shape[-1] != 3:
    raise ValueError(f'frames must be [..., T, H, W, 3], got {x.shape}')
  *lead, h, w, _ = x.shape
  c, hh, ww = latent_shape(h, w)
  x = x.reshape(*lead, hh, FACTOR, ww, FACTOR, 3)
  n = len(lead)
  x = x.transpose(*range(n), n + 1, n + 3, n + 4, n, n + 2)        # [..., i, j, rgb, h, w]
  return np.ascontiguousarray(x.reshape(*lead, c, hh, ww))


def decode(latents) -> np.ndarray:
  """latents [..., T, 12, h, w] -> frames [..., T, 2h, 2w, 3] float32 (values as stored)."""
  z = np.asarray(latents, np.float32)
  if z.ndim < 4 or z.shape[-3] != CHANNELS:
    raise ValueError(f'latents must be [..., T, {CHANNELS}, h, w], got {z.shape}')
  *lead, _, hh, ww = z.shape
  n = len(lead)
  z = z.reshape(*lead, FACTOR, FACTOR, 3, hh, ww)
  z = z.transpose(*range(n), n + 3, n, n + 4, n + 1, n + 2)        # [..., h, i, w, j, rgb]
  return np.ascontiguousarray(z.reshape(*lead, hh * FACTOR, ww * FACTOR, 3))
