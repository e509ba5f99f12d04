"""Self-Forcing block-autoregressive sampler and its flow-matching scheduler.

Per block of ``block_frames`` latent frames (spec/model.md section 2.4):
  for i, t in enumerate(timesteps):            # (1000, 937.5, 833.33, 625) after warping
      v  = DiT(x_t, t, cache)                  # cache read-only
      x0 = x_t - sigma(t) * v
      if i < last: x_t = (1 - sigma(t_next)) * x0 + sigma(t_next) * eps_{block, i}   # fresh noise
  DiT(x0, t=context_noise, cache, write)       # the context pass appends the block's clean K/V
Noise is explicit: ``initial`` [B, F, C, h, w] and ``renoise`` [blocks, steps-1, B, bf, C, h, w].
Scheduler, conversions and latents are float32.

Step reuse (FLOWCACHE_NATIVE; methods with ``reuse_threshold`` > 0). The study's reuse manager
is not published; kvjax reconstructs it TeaCache-style: at every denoising step after the first,
the relative L1 change of the first block's modulated input (``WanDiT.reuse_feature``) against
the previous step is added to an accumulator; while the accumulator stays below the threshold
the DiT call is skipped and the last computed flow prediction is reused; a computed step resets
it. The first and the last denoising step of a block are always computed and the context pass
is never skipped. With fresh re-noising every step the change is ~1.2 per step, so a threshold
of 1.5 skips exactly one of the four steps of every block and 0.1 skips none — the study's
logged behaviour (spec 3.9.7).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.cache.base import AppendInfo, CacheMethod, CacheSpec
from kvjax.configlib import FrozenConfig
from kvjax.model import WanConfig, WanDiT

f32 = jnp.float32


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
    raise ValueError(f'noise file {path} is not a readable .npz: {e}') from None
  missing = [k for k in ('initial', 'renoise') if k not in arrays]
  if missing:
    raise ValueError(f'noise file {path}: missing array(s) {missing} (has {files})')
  noise = Noise(arrays['initial'], arrays['renoise'])
  validate_noise(noise, cfg, channels, what=f'noise file {path}')
  return noise


_COMPILED: dict[Any, dict[str, Any]] = {}


def clear_compile_cache() -> None:
  """Forgets compiled step functions (tests that patch model code call this)."""
  _COMPILED.clear()


@dataclasses.dataclass
class RolloutStats:
  compile_s: float = 0.0
  runtime_s: float = 0.0
  dit_calls: int = 0
  reused_steps: int = 0
  reuse_rel_l1: list = dataclasses.field(default_factory=list)


class SelfForcing:
  """Compiled Self-Forcing rollout for one model, cache method and latent geometry.

  Step functions are compiled ahead of time (``compile``) so compile time is measured apart
  from run time; the cache goes in and out of the context pass as a donated pytree.
  """

  def __init__(self, model_cfg: WanConfig, sampler_cfg: SamplerConfig, method: CacheMethod,
               spec: CacheSpec, *, latent_hw: tuple[int, int], impl: str = 'auto',
               graphdef=None):
    self.model_cfg, self.cfg, self.method, self.spec = model_cfg, sampler_cfg, method, spec
    self.impl = impl
    self.latent_hw = latent_hw
    self.timesteps, self.sigmas = schedule(sampler_cfg)
    if graphdef is None:
      graphdef = nnx.graphdef(nnx.eval_shape(lambda: WanDiT(model_cfg, rngs=nnx.Rngs(0))))
    self.graphdef = graphdef
    self._compiled: dict[str, Any] = {}

  # ------------------------------------------------------------ pure step functions
  def _model(self, params) -> WanDiT:
    return nnx.merge(self.graphdef, params)

  def encode_fn(self, params, text_states):
    """text_states [B, Lt, E] -> per-layer cross K/V."""
    return self._model(params).cross_kv(text_states)

  def denoise_fn(self, params, x_t, t, cross_kv, cache, start_frame):
    """One denoising call: x_t [B, bf, C, h, w] float32 -> flow prediction v float32."""
    b, nf = x_t.shape[:2]
    tt = jnp.full((b, nf), t, f32)
    v, _ = self._model(params).forward_cached(x_t, tt, cross_kv, start_frame, cache=cache,
                                              method=self.method, impl=self.impl)
    return v

  def feature_fn(self, params, x_t, t):
    b, nf = x_t.shape[:2]
    return self._model(params).reuse_feature(x_t, jnp.full((b, nf), t, f32))

  @staticmethod
  def rel_l1_fn(a, b):
    return jnp.mean(jnp.abs(a - b)) / jnp.maximum(jnp.mean(jnp.abs(b)), 1e-12)

  def context_fn(self, params, x0, cross_kv, cache, start_frame):
    """The clean context pass: appends the block's K/V computed from x0 at t=context_noise."""
    b, nf = x0.shape[:2]
    tt = jnp.full((b, nf), self.cfg.context_noise, f32)
    _, cache = self._model(params).forward_cached(
        x0, tt, cross_kv, start_frame, cache=cache, method=self.method, write=True,
        impl=self.impl, info=AppendInfo(start_frame=start_frame), predict=False)
    return cache

  @staticmethod
  def x0_fn(x_t, v, sigma):
    return x_t - sigma * v

  @staticmethod
  def renoise_fn(x0, eps, sigma_next):
    return (1.0 - sigma_next) * x0 + sigma_next * eps

  @property
  def reuse_threshold(self) -> float:
    return float(getattr(self.method, 'reuse_threshold', 0.0) or 0.0)

  # ------------------------------------------------------------ compilation
  def abstract_args(self, params, text_len: int, text_dim: int):
    """ShapeDtypeStructs of every step's arguments (for ahead-of-time lowering)."""
    sds = jax.ShapeDtypeStruct
    spec = self.spec
    h, w = self.latent_hw
    c = self.model_cfg.in_dim
    x = sds((spec.batch, spec.block_frames, c, h, w), f32)
    text = sds((spec.batch, text_len, text_dim), self.model_cfg.cdtype)
    cross = jax.eval_shape(self.encode_fn, params, text)
    cache = jax.eval_shape(lambda: self.method.init(spec))
    scalar = sds((), f32)
    start = sds((), jnp.int32)
    return dict(params=params, x=x, text=text, cross=cross, cache=cache, scalar=scalar,
                start=start)

  # Which step functions depend on the cache method (the others are shared across methods).
  _METHOD_FREE = ('encode', 'x0', 'renoise', 'feature', 'rel_l1')

  def _lowerers(self, params, text_len: int, text_dim: int):
    """name -> zero-argument function returning the lowered step (nothing is allocated)."""
    a = self.abstract_args(params, text_len, text_dim)
    p = a['params']
    out = dict(
        encode=lambda: jax.jit(self.encode_fn).lower(p, a['text']),
        denoise=lambda: jax.jit(self.denoise_fn).lower(p, a['x'], a['scalar'], a['cross'],
                                                       a['cache'], a['start']),
        context=lambda: jax.jit(self.context_fn, donate_argnums=(3,)).lower(
            p, a['x'], a['cross'], a['cache'], a['start']),
        x0=lambda: jax.jit(self.x0_fn).lower(a['x'], a['x'], a['scalar']),
        renoise=lambda: jax.jit(self.renoise_fn).lower(a['x'], a['x'], a['scalar']),
    )
    if self.reuse_threshold > 0:
      feat = jax.eval_shape(self.feature_fn, p, a['x'], a['scalar'])
      out['feature'] = lambda: jax.jit(self.feature_fn).lower(p, a['x'], a['scalar'])
      out['rel_l1'] = lambda: jax.jit(self.rel_l1_fn).lower(feat, feat)
    if getattr(self.method, 'refresh_every_call', False):
      out['refresh'] = lambda: jax.jit(self.method.refresh, donate_argnums=(0,)).lower(a['cache'])
    return out

  def lower(self, params, text_len: int, text_dim: int):
    """Lowers all step functions with abstract (or concrete) ``params``; nothing is allocated."""
    return {k: f() for k, f in self._lowerers(params, text_len, text_dim).items()}

  def compile(self, params, text_len: int, text_dim: int) -> float:
    """Compiles every step function (reusing earlier compilations); returns the seconds spent."""
    if self._compiled:
      return 0.0
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shared = (self.model_cfg, self.cfg, self.latent_hw, self.spec.batch, self.spec.block_frames,
              text_len, text_dim, jax.tree.structure(abstract),
              tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(abstract)))
    t0 = time.perf_counter()
    compiled = {}
    for name, lower in self._lowerers(abstract, text_len, text_dim).items():
      key = (name, shared) if name in self._METHOD_FREE else (
          name, shared, self.method, self.spec, self.impl)
      if key not in _COMPILED:
        _COMPILED[key] = lower().compile()
      compiled[name] = _COMPILED[key]
    self._compiled = compiled
    return time.perf_counter() - t0

  # ------------------------------------------------------------ the rollout
  def rollout(self, params, noise: Noise, text_states, *,
              on_block: Callable[[int, int], None] | None = None):
    """Generates all latent frames.

    Args:
      params: model parameters (nnx.State).
      noise: explicit Noise (validated by the caller).
      text_states: [B, Lt, E] text-encoder states.
      on_block: optional callback(block_index, num_blocks) after each block (progress).
    Returns:
      latents [B, F, C, h, w] float32 (numpy), final cache state, RolloutStats.
    """
    spec, cfg = self.spec, self.cfg
    init = jnp.asarray(noise.initial, f32)
    b, nf = init.shape[:2]
    bf = cfg.block_frames
    if nf % bf:
      raise ValueError(f'{nf} latent frames is not a multiple of the block ({bf} frames)')
    if nf > self.model_cfg.rope_max_frames:
      raise ValueError(f'{nf} latent frames exceed the RoPE table '
                       f'({self.model_cfg.rope_max_frames} frames)')
    text_states = jnp.asarray(text_states, self.model_cfg.cdtype)
    stats = RolloutStats()
    stats.compile_s = self.compile(params, text_states.shape[1], text_states.shape[2])
    fn = self._compiled
    renoise = jnp.asarray(noise.renoise, f32)

    t0 = time.perf_counter()
    cross = fn['encode'](params, text_states)
    cache = jax.jit(self.method.init, static_argnums=0)(spec)
    out = []
    num_blocks = nf // bf
    steps = len(self.timesteps)
    tau = self.reuse_threshold
    refresh = fn.get('refresh')
    for blk in range(num_blocks):
      start = jnp.int32(blk * bf)
      x = init[:, blk * bf:(blk + 1) * bf]
      v = feat_prev = None
      acc = 0.0
      for i, (t, s) in enumerate(zip(self.timesteps, self.sigmas)):
        t32, s32 = jnp.float32(t), jnp.float32(s)
        reuse = False
        if tau > 0:
          feat = fn['feature'](params, x, t32)
          if feat_prev is not None:
            rel = float(fn['rel_l1'](feat, feat_prev))
            stats.reuse_rel_l1.append(rel)
            acc += rel
            reuse = 0 < i < steps - 1 and acc < tau
          feat_prev = feat
        if reuse:
          stats.reused_steps += 1
        else:
          if refresh is not None:
            cache = refresh(cache)
          v = fn['denoise'](params, x, t32, cross, cache, start)
          stats.dit_calls += 1
          acc = 0.0
        x0 = fn['x0'](x, v, s32)
        if i + 1 < steps:
          x = fn['renoise'](x0, renoise[blk, i], jnp.float32(self.sigmas[i + 1]))
      out.append(x0)
      if refresh is not None:
        cache = refresh(cache)
      cache = fn['context'](params, x0, cross, cache, start)
      stats.dit_calls += 1
      if on_block is not None:
        jax.block_until_ready(cache)
        on_block(blk, num_blocks)
    latents = np.asarray(jnp.concatenate(out, axis=1))
    jax.block_until_ready(cache)
    stats.runtime_s = time.perf_counter() - t0
    return latents, cache, stats


# ---------------------------------------------------------------------------- references
def frame_mask(num_frames: int, block_frames: int, window_frames: int, sink_frames: int = 0):
  """Block-causal frame mask equivalent to the KV-cache rollout (spec/model.md section 2.5).

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
