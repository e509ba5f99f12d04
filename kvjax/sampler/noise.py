"""Explicit rollout noise: shapes, generation from a seed, validation and loading.

``initial`` [B, F, C, h, w] starts every block; ``renoise`` [blocks, steps-1, B, bf, C, h, w] is
the fresh noise of each re-noising between denoising steps. Both are float32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.sampler.scheduler import SamplerConfig

f32 = jnp.float32


class Noise(NamedTuple):
  """initial: [B, F, C, h, w]; renoise: [num_blocks, steps - 1, B, block_frames, C, h, w]."""
  initial: Any
  renoise: Any


def noise_shapes(batch, frames, channels, height, width, cfg: SamplerConfig):
  nb = frames // cfg.block_frames
  return ((batch, frames, channels, height, width),
          (nb, len(cfg.denoising_steps) - 1, batch, cfg.block_frames, channels, height, width))


def make_noise(seed: int, batch, frames, channels, height, width, cfg: SamplerConfig) -> Noise:
  """Gaussian noise for a whole rollout from ``seed`` (float32)."""
  s_init, s_re = noise_shapes(batch, frames, channels, height, width, cfg)
  k1, k2 = jax.random.split(jax.random.key(seed))
  return Noise(jax.random.normal(k1, s_init, f32), jax.random.normal(k2, s_re, f32))


def validate_noise(noise: Noise, cfg: SamplerConfig, channels: int, what: str = 'noise') -> None:
  """Checks shapes and finiteness of explicit noise; raises ValueError naming the problem."""
  init = np.asarray(noise.initial)
  if init.ndim != 5:
    raise ValueError(f'{what}: initial must be [B, F, C, h, w], got shape {init.shape}')
  b, f, c, h, w = init.shape
  if c != channels:
    raise ValueError(f'{what}: initial has {c} channels, the model expects {channels} '
                     '(layout is [B, F, C, h, w]: frames before channels)')
  if f % cfg.block_frames:
    raise ValueError(f'{what}: {f} latent frames is not a multiple of the block '
                     f'({cfg.block_frames} frames)')
  _, want = noise_shapes(b, f, c, h, w, cfg)
  if tuple(np.shape(noise.renoise)) != want:
    raise ValueError(f'{what}: renoise has shape {tuple(np.shape(noise.renoise))}, expected '
                     f'{want} = [num_blocks, steps-1, B, block_frames, C, h, w]')
  for name, arr in (('initial', init), ('renoise', np.asarray(noise.renoise))):
    if not np.all(np.isfinite(arr)):
      raise ValueError(f'{what}: {name} contains NaN or Inf')


def load_noise(path: str, cfg: SamplerConfig, channels: int) -> Noise:
  """Loads and validates a noise .npz with arrays ``initial`` and ``renoise``."""
  try:
    with np.load(path, allow_pickle=False) as z:
      files = list(getattr(z, 'files', []))
      arrays = {k: np.asarray(z[k], np.float32) for k in ('initial', 'renoise') if k in files}
  except FileNotFoundError:
    raise FileNotFoundError(f'noise file not found: {path}') from None
  except (OSError, EOFError, ValueError, AttributeError) as e:
    # numpy's own message suggests allow_pickle for text or pickled files: wrong and unsafe here.
    raise ValueError(f'noise file {path} is not a numpy .npz archive of arrays '
                     f'({type(e).__name__}); see --save_inputs for the format') from None
  missing = [k for k in ('initial', 'renoise') if k not in arrays]
  if missing:
    raise ValueError(f'noise file {path}: missing array(s) {missing} (has {files})')
  noise = Noise(arrays['initial'], arrays['renoise'])
  validate_noise(noise, cfg, channels, what=f'noise file {path}')
  return noise
