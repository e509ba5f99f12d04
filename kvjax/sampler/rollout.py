"""The compiled Self-Forcing rollout with a KV-cache method (``SelfForcing``).

The block loop is described in the package docstring (``kvjax/sampler/__init__.py``).

Step reuse (FLOWCACHE_NATIVE; methods with ``step_reuse_threshold`` > 0). The study's reuse
manager is not published; kvjax reconstructs it TeaCache-style: at every denoising step after the
first, the relative L1 change of the first block's modulated input (``WanDiT.reuse_feature``)
against the previous step is added to an accumulator; while the accumulator stays below the
threshold the DiT call is skipped and the last computed flow prediction is reused; a computed
step resets it. The first and the last denoising step of a block are always computed and the
context pass is never skipped. With fresh re-noising every step the change is ~1.2 per step, so a
threshold of 1.5 skips exactly one of the four steps of every block — always the second (step
1: the first change is the only one below 1.5, and a skip is followed by two computed steps) —
and 0.1 skips none: the study's logged counts (spec 3.9.7). What is reused is the last flow
prediction (the x0 of the skipped step is computed from it at the step's own sigma); the study's
notes speak of a cached "denoising residual", whose exact form is not published.

Cadence (``CacheMethod.cadence``). A method that re-encodes its history on every DiT call (the
study's hook) does it inside the model, per layer after attention (``method.recode``); its
denoising step then returns the cache too, donated, and the rollout threads it through the four
noisy calls as well as the context pass.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kvjax.cache.base import AppendInfo, CacheMethod, CacheSpec
from kvjax.model import WanConfig, WanDiT
from kvjax.sampler import sharding
from kvjax.sampler.noise import Noise
from kvjax.sampler.scheduler import SamplerConfig, schedule

f32 = jnp.float32


# Compiled step functions shared by every SelfForcing of the process, keyed by (step, geometry)
# or, for the steps that read the cache, (step, geometry, method, spec, impl); least recently used
# first. Bounded: a process that runs many methods in turn (an inline sweep, a benchmark over the
# 33 rows) would otherwise keep every method's executables, and XLA:CPU maps each one's code into
# memory regions of its own (~500-1,500 mappings a method on the world model, measured), until
# Linux's vm.max_map_count (65,530) kills the process inside a compilation. A run needs at most 9
# (5 method-free steps, its method's 2 and the BF16 reference's 2); a SelfForcing keeps its own
# after they are evicted here.
_COMPILED: collections.OrderedDict[Any, Any] = collections.OrderedDict()
MAX_COMPILED = 16


def clear_compile_cache() -> None:
  """Forgets compiled step functions (tests that patch model code call this)."""
  _COMPILED.clear()


def _compiled(key, lower: Callable[[], Any]) -> Any:
  """The compiled step of ``key``: reused if compiled before, else ``lower().compile()``."""
  if key in _COMPILED:
    _COMPILED.move_to_end(key)
  else:
    _COMPILED[key] = lower().compile()
    while len(_COMPILED) > MAX_COMPILED:
      _COMPILED.popitem(last=False)
  return _COMPILED[key]


@dataclasses.dataclass
class RolloutStats:
  compile_s: float = 0.0
  runtime_s: float = 0.0
  dit_calls: int = 0
  reused_steps: int = 0
  reused_at: list = dataclasses.field(default_factory=list)   # (block, denoising step) pairs
  reuse_rel_l1: list = dataclasses.field(default_factory=list)


class SelfForcing:
  """Compiled Self-Forcing rollout for one model, cache method and latent geometry.

  Step functions are compiled ahead of time (``compile``) so compile time is measured apart
  from run time; the cache goes in and out of the context pass as a donated pytree.
  """

  def __init__(self, model_cfg: WanConfig, sampler_cfg: SamplerConfig, method: CacheMethod,
               spec: CacheSpec, *, latent_hw: tuple[int, int], impl: str = 'auto',
               graphdef=None, mesh: Mesh | None = None):
    """``mesh``: a 1-D ``batch`` mesh (``sharding.batch_mesh``) over which every array's batch
    axis is split (the videos of a batch run on different devices); None: one device."""
    self.model_cfg, self.cfg, self.method, self.spec = model_cfg, sampler_cfg, method, spec
    self.impl, self.mesh = impl, mesh
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
    """One denoising call: x_t [B, bf, C, h, w] float32 -> flow prediction v float32, or
    (v, cache) when the method re-encodes its history on every call (``recodes_every_call``)."""
    b, nf = x_t.shape[:2]
    tt = jnp.full((b, nf), t, f32)
    v, cache = self._model(params).forward_cached(x_t, tt, cross_kv, start_frame, cache=cache,
                                                  method=self.method, impl=self.impl)
    return (v, cache) if self.recodes_every_call else v

  @property
  def recodes_every_call(self) -> bool:
    """The method's cadence is 'every_call': denoising calls change (and return) the cache."""
    return self.method.cadence == 'every_call'

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
    """The method's ``step_reuse_threshold`` (0: every denoising step is computed)."""
    return float(self.method.step_reuse_threshold)

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
    args = dict(params=params, x=x, text=text, cross=cross, cache=cache, scalar=scalar,
                start=start)
    if self.mesh is None:
      return args
    shard = self.shardings(params, text_len, text_dim)
    return {k: jax.tree.map(lambda a, s: sds(a.shape, a.dtype, sharding=s), v, shard[k])
            for k, v in args.items()}

  def shardings(self, params, text_len: int, text_dim: int) -> dict[str, Any]:
    """The NamedSharding of every step argument over ``self.mesh`` (batch axes split)."""
    sds, spec, mesh = jax.ShapeDtypeStruct, self.spec, self.mesh
    h, w = self.latent_hw
    c, cdt = self.model_cfg.in_dim, self.model_cfg.cdtype
    rep = sharding.replicated(mesh)
    text = lambda b: sds((b, text_len, text_dim), cdt)
    axes = dict(
        x=sharding.batch_axes(lambda b: sds((b, spec.block_frames, c, h, w), f32), spec.batch),
        text=sharding.batch_axes(text, spec.batch),
        cross=sharding.batch_axes(lambda b: jax.eval_shape(self.encode_fn, params, text(b)),
                                  spec.batch),
        cache=sharding.batch_axes(lambda b: jax.eval_shape(
            lambda: self.method.init(dataclasses.replace(spec, batch=b))), spec.batch))
    out = {k: sharding.shardings(mesh, v) for k, v in axes.items()}
    out.update(params=jax.tree.map(lambda _: rep, params), scalar=rep, start=rep)
    return out

  # Which step functions depend on the cache method (the others are shared across methods).
  _METHOD_FREE = ('encode', 'x0', 'renoise', 'feature', 'rel_l1')

  def _lowerers(self, params, text_len: int, text_dim: int):
    """name -> zero-argument function returning the lowered step (nothing is allocated)."""
    a = self.abstract_args(params, text_len, text_dim)
    p = a['params']
    # With a mesh the outputs keep the inputs' shardings (AOT executables take exactly those).
    outs = {}
    if self.mesh is not None:
      sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
      v_sh, cache_sh = sh(a['x']), sh(a['cache'])
      outs = dict(encode=sh(a['cross']), context=cache_sh, x0=v_sh, renoise=v_sh,
                  denoise=(v_sh, cache_sh) if self.recodes_every_call else v_sh,
                  rel_l1=sharding.replicated(self.mesh))
    jit = lambda name, fn, **kw: jax.jit(fn, **kw, **(
        {'out_shardings': outs[name]} if name in outs else {}))
    out = dict(
        encode=lambda: jit('encode', self.encode_fn).lower(p, a['text']),
        denoise=lambda: jit('denoise', self.denoise_fn,
                            donate_argnums=(4,) if self.recodes_every_call else ()).lower(
                                p, a['x'], a['scalar'], a['cross'], a['cache'], a['start']),
        context=lambda: jit('context', self.context_fn, donate_argnums=(3,)).lower(
            p, a['x'], a['cross'], a['cache'], a['start']),
        x0=lambda: jit('x0', self.x0_fn).lower(a['x'], a['x'], a['scalar']),
        renoise=lambda: jit('renoise', self.renoise_fn).lower(a['x'], a['x'], a['scalar']),
    )
    if self.reuse_threshold > 0:
      feat = jax.eval_shape(self.feature_fn, p, a['x'], a['scalar'])
      if self.mesh is not None:    # the feature's batch axis is split like x's
        axes = sharding.batch_axes(lambda b: jax.eval_shape(
            self.feature_fn, p, jax.ShapeDtypeStruct((b, *a['x'].shape[1:]), f32), a['scalar']),
            self.spec.batch)
        fsh = sharding.shardings(self.mesh, axes)
        feat = jax.tree.map(lambda f, s: jax.ShapeDtypeStruct(f.shape, f.dtype, sharding=s),
                            feat, fsh)
        outs['feature'] = fsh
      out['feature'] = lambda: jit('feature', self.feature_fn).lower(p, a['x'], a['scalar'])
      out['rel_l1'] = lambda: jit('rel_l1', self.rel_l1_fn).lower(feat, feat)
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
              text_len, text_dim, self.mesh, jax.tree.structure(abstract),
              tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(abstract)))
    t0 = time.perf_counter()
    compiled = {}
    for name, lower in self._lowerers(abstract, text_len, text_dim).items():
      key = (name, shared) if name in self._METHOD_FREE else (
          name, shared, self.method, self.spec, self.impl)
      compiled[name] = _compiled(key, lower)
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
    cache_init = jax.jit(self.method.init, static_argnums=0)
    if self.mesh is not None:      # each video's rows on its device, the weights on all
      shard = self.shardings(params, text_states.shape[1], text_states.shape[2])
      params = jax.device_put(params, shard['params'])
      text_states = jax.device_put(text_states, shard['text'])
      split = lambda axis: NamedSharding(self.mesh, P(*([None] * axis), sharding.AXIS))
      init, renoise = jax.device_put(init, split(0)), jax.device_put(renoise, split(2))
      cache_init = jax.jit(self.method.init, static_argnums=0, out_shardings=shard['cache'])

    t0 = time.perf_counter()
    cross = fn['encode'](params, text_states)
    cache = cache_init(spec)
    out = []
    num_blocks = nf // bf
    steps = len(self.timesteps)
    tau = self.reuse_threshold
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
          stats.reused_at.append((blk, i))
        else:
          if self.recodes_every_call:
            v, cache = fn['denoise'](params, x, t32, cross, cache, start)
          else:
            v = fn['denoise'](params, x, t32, cross, cache, start)
          stats.dit_calls += 1
          acc = 0.0
        x0 = fn['x0'](x, v, s32)
        if i + 1 < steps:
          x = fn['renoise'](x0, renoise[blk, i], jnp.float32(self.sigmas[i + 1]))
      out.append(x0)
      cache = fn['context'](params, x0, cross, cache, start)
      stats.dit_calls += 1
      if on_block is not None:
        jax.block_until_ready(cache)
        on_block(blk, num_blocks)
    latents = np.asarray(jnp.concatenate(out, axis=1))
    jax.block_until_ready(cache)
    stats.runtime_s = time.perf_counter() - t0
    return latents, cache, stats
