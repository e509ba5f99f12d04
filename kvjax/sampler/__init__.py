"""Self-Forcing block-autoregressive sampler and its flow-matching scheduler.

Per block of ``block_frames`` latent frames:
  for i, t in enumerate(timesteps):            # (1000, 937.5, 833.33, 625) after warping
      v  = DiT(x_t, t, cache)                  # cache read-only
      x0 = x_t - sigma(t) * v
      if i < last: x_t = (1 - sigma(t_next)) * x0 + sigma(t_next) * eps_{block, i}   # fresh noise
  DiT(x0, t=context_noise, cache, write)       # the context pass appends the block's clean K/V
Noise is explicit: ``initial`` [B, F, C, h, w] and ``renoise`` [blocks, steps-1, B, bf, C, h, w].
Scheduler, conversions and latents are float32.

Modules, by concern:
  scheduler  ``SamplerConfig`` and the scheduler (``schedule``, ``shifted_grid``, ``sigma_of``);
  noise      ``Noise`` and its shapes, generation, validation and loading;
  rollout    ``SelfForcing``, the compiled KV-cache rollout (step reuse, cache refresh), and the
             process-wide cache of compiled step functions;
  reference  ``frame_mask`` and ``reference_rollout``, the cache-free masked recomputation.
"""

from kvjax.sampler.noise import Noise, load_noise, make_noise, noise_shapes, validate_noise
from kvjax.sampler.reference import frame_mask, reference_rollout
# _COMPILED (the compiled step functions, by key) is re-exported for tests that audit them.
from kvjax.sampler.rollout import _COMPILED, RolloutStats, SelfForcing, clear_compile_cache
from kvjax.sampler.scheduler import SamplerConfig, schedule, shifted_grid, sigma_of

__all__ = [
    'Noise', 'RolloutStats', 'SamplerConfig', 'SelfForcing', 'clear_compile_cache', 'frame_mask',
    'load_noise', 'make_noise', 'noise_shapes', 'reference_rollout', 'schedule', 'shifted_grid',
    'sigma_of', 'validate_noise',
]
