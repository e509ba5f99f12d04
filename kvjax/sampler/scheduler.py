"""The sampler's configuration and Self-Forcing's flow-matching scheduler (float32 numpy)."""

from __future__ import annotations

import dataclasses

import numpy as np

from kvjax.configlib import FrozenConfig


@dataclasses.dataclass(frozen=True)
class SamplerConfig(FrozenConfig):
  denoising_steps: tuple[float, ...] = (1000, 750, 500, 250)
  warp_denoising_step: bool = True
  timestep_shift: float = 5.0
  num_train_timesteps: int = 1000
  block_frames: int = 3
  context_noise: float = 0.0

  _what = 'sampler config'

  def __post_init__(self):
    object.__setattr__(self, 'denoising_steps', tuple(float(s) for s in self.denoising_steps))
    if not self.denoising_steps:
      raise ValueError('sampler.denoising_steps is empty')
    if int(self.block_frames) < 1:
      raise ValueError(f'sampler.block_frames must be >= 1 (got {self.block_frames})')
    if int(self.num_train_timesteps) < 1:
      raise ValueError(f'sampler.num_train_timesteps must be >= 1 (got {self.num_train_timesteps})')
    if not self.timestep_shift > 0:
      raise ValueError(f'sampler.timestep_shift must be > 0 (got {self.timestep_shift})')


def shifted_grid(num_train_timesteps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
  """Self-Forcing's FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True) training grid.

  Returns:
    timesteps [N] float32 (1000 ... 4.98), sigmas [N] float32.
  """
  s = np.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=np.float32)[:-1]
  sig = (shift * s / (1.0 + (shift - 1.0) * s)).astype(np.float32)
  return (sig * num_train_timesteps).astype(np.float32), sig


def schedule(cfg: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
  """The denoising timesteps and their sigmas (nearest-grid lookup), both float32 [K]."""
  grid_t, grid_s = shifted_grid(cfg.num_train_timesteps, cfg.timestep_shift)
  steps = np.asarray(cfg.denoising_steps, np.float64)
  if cfg.warp_denoising_step:
    ext = np.concatenate([grid_t, np.zeros(1, np.float32)])
    idx = (cfg.num_train_timesteps - steps).astype(np.int64)
    if idx.min() < 0 or idx.max() > cfg.num_train_timesteps:
      raise ValueError(f'denoising_steps {cfg.denoising_steps} outside [0, {cfg.num_train_timesteps}]')
    ts = ext[idx]
  else:
    ts = steps.astype(np.float32)
  return ts.astype(np.float32), np.asarray([sigma_of(t, cfg) for t in ts], np.float32)


def sigma_of(t: float, cfg: SamplerConfig) -> float:
  """sigma[argmin |t_grid - t|]; 0 for t = 0 (a clean input)."""
  if t <= 0:
    return 0.0
  grid_t, grid_s = shifted_grid(cfg.num_train_timesteps, cfg.timestep_shift)
  return float(grid_s[np.argmin(np.abs(grid_t.astype(np.float64) - t))])
