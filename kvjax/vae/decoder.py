"""The Wan2.1 VAE decoder in Flax NNX: causal 3-D convolutions with a 2-frame feature cache.

Layout is NDHWC: video and activations are [B, T, H, W, C]; Conv3d kernels [kt, kh, kw, in, out].
The decoder runs one latent frame at a time, as Wan does. Every causal 3x3x3 convolution keeps the
last two frames of its input (the feature cache, zeros before the first frame, which equals the
causal zero padding), so decoding frame by frame reproduces a whole-sequence causal decode, and
so does decoding a stream of blocks: ``DecodeStream`` feeds frames through the same two compiled
functions whatever the block size.

The first latent frame is special (Wan's ``first_chunk``): temporal upsamplers skip their time
convolution, so it yields 1 video frame; every later latent frame yields 4.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.model.layers import Dense
from kvjax.vae.config import VAEConfig

f32 = jnp.float32
CACHE_T = 2   # frames of history kept per causal convolution


class FeatureCache:
  """Cursor over the per-convolution caches during one decoder call (trace-time helper).

  ``prev`` is the list returned by the previous call (None before the first frame: zeros);
  ``new`` collects this call's caches in the same order.
  """

  def __init__(self, prev: list | None):
    self.prev = prev
    self.new: list[jax.Array] = []

  def _take(self, x: jax.Array) -> jax.Array:
    i = len(self.new)
    if self.prev is None:
      b, _, h, w, c = x.shape
      return jnp.zeros((b, CACHE_T, h, w, c), x.dtype)
    if i >= len(self.prev):
      raise ValueError('feature cache has fewer entries than the decoder has causal convolutions')
    return self.prev[i].astype(x.dtype)

  def conv(self, conv: 'CausalConv3d', x: jax.Array) -> jax.Array:
    """Causal conv of x [B, T, H, W, C] with the cached frames in front; stores the last two."""
    xin = jnp.concatenate([self._take(x), x], axis=1)        # [B, 2 + T, H, W, C]
    self.new.append(xin[:, -CACHE_T:])
    return conv(xin)

  def skip(self, x: jax.Array) -> None:
    """The first chunk's temporal upsampler: no convolution, the cache stays zeros."""
    b, _, h, w, c = x.shape
    self._take(x)
    self.new.append(jnp.zeros((b, CACHE_T, h, w, c), x.dtype))


class CausalConv3d(nnx.Module):
  """Conv3d over frames already carrying their causal history: 'valid' in time, zero-padded
  (kernel // 2) in space. kernel: [kt, kh, kw, in, out]; bias: [out]."""

  def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), *, cfg: VAEConfig, rngs: nnx.Rngs):
    kt, kh, kw = kernel
    init = jax.nn.initializers.variance_scaling(1.0, 'fan_in', 'normal', in_axis=(0, 1, 2, 3),
                                                out_axis=4)
    self.kernel = nnx.Param(init(rngs.params(), (kt, kh, kw, cin, cout), cfg.param_dtype))
    self.bias = nnx.Param(jnp.zeros((cout,), cfg.param_dtype))
    self.cdtype = cfg.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T + kt - 1, H, W, in] -> [B, T, H, W, out] (compute dtype, float32 accumulation)."""
    kt, kh, kw = self.kernel.shape[:3]
    cdt = jnp.dtype(self.cdtype)
    y = jax.lax.conv_general_dilated(
        x.astype(cdt), self.kernel[...].astype(cdt), window_strides=(1, 1, 1),
        padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'), preferred_element_type=f32)
    return (y + self.bias[...].astype(f32)).astype(cdt)


class Conv2d(nnx.Module):
  """Per-frame 3x3 Conv2d, zero-padded by 1. kernel: [kh, kw, in, out]; bias: [out]."""

  def __init__(self, cin: int, cout: int, *, cfg: VAEConfig, rngs: nnx.Rngs):
    init = jax.nn.initializers.variance_scaling(1.0, 'fan_in', 'normal', in_axis=(0, 1, 2),
                                                out_axis=3)
    self.kernel = nnx.Param(init(rngs.params(), (3, 3, cin, cout), cfg.param_dtype))
    self.bias = nnx.Param(jnp.zeros((cout,), cfg.param_dtype))
    self.cdtype = cfg.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [N, H, W, in] -> [N, H, W, out]."""
    cdt = jnp.dtype(self.cdtype)
    y = jax.lax.conv_general_dilated(
        x.astype(cdt), self.kernel[...].astype(cdt), window_strides=(1, 1),
        padding=((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        preferred_element_type=f32)
    return (y + self.bias[...].astype(f32)).astype(cdt)


class RMSNorm(nnx.Module):
  """Wan's RMS_norm: x / max(||x||_2, 1e-12) * sqrt(C) * scale over channels, in float32."""

  def __init__(self, dim: int, *, cfg: VAEConfig):
    self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype))
    self.cdtype = cfg.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(f32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * math.sqrt(x.shape[-1]) * self.scale[...].astype(f32)
    return y.astype(self.cdtype)


class ResidualBlock(nnx.Module):
  """RMS -> SiLU -> CausalConv 3^3 -> RMS -> SiLU -> CausalConv 3^3, plus a 1^3 conv shortcut
  when the width changes."""

  def __init__(self, cin: int, cout: int, *, cfg: VAEConfig, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(cin, cfg=cfg)
    self.conv1 = CausalConv3d(cin, cout, cfg=cfg, rngs=rngs)
    self.norm2 = RMSNorm(cout, cfg=cfg)
    self.conv2 = CausalConv3d(cout, cout, cfg=cfg, rngs=rngs)
    self.shortcut = CausalConv3d(cin, cout, (1, 1, 1), cfg=cfg, rngs=rngs) if cin != cout else None

  def __call__(self, x: jax.Array, cache: FeatureCache) -> jax.Array:
    """x [B, T, H, W, in] -> [B, T, H, W, out]."""
    h = x if self.shortcut is None else self.shortcut(x)
    x = cache.conv(self.conv1, jax.nn.silu(self.norm1(x)))
    x = cache.conv(self.conv2, jax.nn.silu(self.norm2(x)))
    return (x.astype(f32) + h.astype(f32)).astype(x.dtype)


class AttentionBlock(nnx.Module):
  """Single-head spatial self-attention within each frame (head dim = C, scale 1/sqrt(C))."""

  def __init__(self, dim: int, *, cfg: VAEConfig, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.norm = RMSNorm(dim, cfg=cfg)
    self.qkv = Dense(dim, 3 * dim, **kw)           # Conv2d 1x1 as Dense: [C, 3C], q | k | v
    self.proj = Dense(dim, dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, H, W, C] -> [B, T, H, W, C]."""
    b, t, hh, ww, c = x.shape
    q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b * t, hh * ww, 3 * c), 3, axis=-1)
    s = jnp.einsum('NTC,NSC->NTS', q, k, preferred_element_type=f32) / math.sqrt(c)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum('NTS,NSC->NTC', p, v, preferred_element_type=f32).astype(x.dtype)
    y = self.proj(o).reshape(b, t, hh, ww, c)
    return (y.astype(f32) + x.astype(f32)).astype(x.dtype)


class Upsample(nnx.Module):
  """x2 nearest spatial upsampling + Conv2d (C -> C/2); 'upsample3d' first doubles the frames
  with a causal (3, 1, 1) time convolution (C -> 2C, halves interleaved as two frames)."""

  def __init__(self, dim: int, mode: str, *, cfg: VAEConfig, rngs: nnx.Rngs):
    self.mode = mode
    self.conv = Conv2d(dim, dim // 2, cfg=cfg, rngs=rngs)
    self.time_conv = (CausalConv3d(dim, 2 * dim, (3, 1, 1), cfg=cfg, rngs=rngs)
                      if mode == 'upsample3d' else None)

  def __call__(self, x: jax.Array, cache: FeatureCache, first: bool) -> jax.Array:
    """x [B, T, H, W, C] -> [B, T', 2H, 2W, C/2]; T' = T (2d, or the first chunk) else 2T."""
    if self.time_conv is not None:
      if first:
        cache.skip(x)
      else:
        b, t, hh, ww, c = x.shape
        y = cache.conv(self.time_conv, x).reshape(b, t, hh, ww, 2, c)
        x = y.transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, hh, ww, c)
    b, t, hh, ww, c = x.shape
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3).reshape(b * t, 2 * hh, 2 * ww, c)
    return self.conv(x).reshape(b, t, 2 * hh, 2 * ww, c // 2)


class Stage(nnx.Module):
  """num_res_blocks + 1 residual blocks, then an optional upsampler."""

  def __init__(self, cin: int, cout: int, mode: str | None, *, cfg: VAEConfig, rngs: nnx.Rngs):
    self.num = cfg.num_res_blocks + 1
    for r in range(self.num):
      setattr(self, f'res{r}', ResidualBlock(cin if r == 0 else cout, cout, cfg=cfg, rngs=rngs))
    self.upsample = Upsample(cout, mode, cfg=cfg, rngs=rngs) if mode else None

  def __call__(self, x, cache: FeatureCache, first: bool):
    for r in range(self.num):
      x = getattr(self, f'res{r}')(x, cache)
    if self.upsample is not None:
      x = self.upsample(x, cache, first)
    return x


class Decoder3d(nnx.Module):
  """conv_in -> middle (res, attention, res) -> stages -> RMS, SiLU, conv_out."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    d0 = cfg.dims[0]
    self.conv_in = CausalConv3d(cfg.z_dim, d0, cfg=cfg, rngs=rngs)
    self.mid_res0 = ResidualBlock(d0, d0, cfg=cfg, rngs=rngs)
    self.mid_attn = AttentionBlock(d0, cfg=cfg, rngs=rngs)
    self.mid_res1 = ResidualBlock(d0, d0, cfg=cfg, rngs=rngs)
    self.num_stages = len(cfg.stages())
    for i, (cin, cout, mode) in enumerate(cfg.stages()):
      setattr(self, f'up{i}', Stage(cin, cout, mode, cfg=cfg, rngs=rngs))
    self.head_norm = RMSNorm(cfg.dims[-1], cfg=cfg)
    self.conv_out = CausalConv3d(cfg.dims[-1], cfg.out_channels, cfg=cfg, rngs=rngs)

  def __call__(self, x: jax.Array, cache: FeatureCache, first: bool) -> jax.Array:
    """x [B, T, h, w, z] -> [B, T', 8h, 8w, 3] (T' = T on the first chunk, else 4T)."""
    x = cache.conv(self.conv_in, x)
    x = self.mid_res0(x, cache)
    x = self.mid_attn(x)
    x = self.mid_res1(x, cache)
    for i in range(self.num_stages):
      x = getattr(self, f'up{i}')(x, cache, first)
    return cache.conv(self.conv_out, jax.nn.silu(self.head_norm(x)))


class WanVAEDecoder(nnx.Module):
  """De-normalisation, the 1x1x1 post-quantisation conv (Wan's ``conv2``) and the decoder."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), cfg=cfg, rngs=rngs)
    self.decoder = Decoder3d(cfg, rngs=rngs)

  def __call__(self, z: jax.Array, cache: list | None, first: bool):
    """Decodes a chunk of normalized latents.

    Args:
      z: [B, T, h, w, z_dim] normalized latents ((raw - mean) / std, as the sampler makes them).
      cache: the list returned by the previous call, or None before the first frame.
      first: True for the chunk holding latent frame 0 (its temporal upsamplers are skipped).
    Returns:
      video [B, T', 8h, 8w, out_channels] float32 in [-1, 1]; the new cache (list of arrays).
    """
    mean = jnp.asarray(self.cfg.latents_mean, f32)
    std = jnp.asarray(self.cfg.latents_std, f32)
    x = self.conv2(z.astype(f32) * std + mean)
    fc = FeatureCache(cache)
    y = self.decoder(x, fc, first)
    return jnp.clip(y.astype(f32), -1.0, 1.0), fc.new


# ---------------------------------------------------------------------------- runtime wrapper
def abstract_params(cfg: VAEConfig) -> nnx.State:
  return nnx.state(nnx.eval_shape(lambda: WanVAEDecoder(cfg, rngs=nnx.Rngs(0))))


def graphdef(cfg: VAEConfig):
  return nnx.graphdef(nnx.eval_shape(lambda: WanVAEDecoder(cfg, rngs=nnx.Rngs(0))))


def init_params(cfg: VAEConfig, seed: int = 0) -> nnx.State:
  return jax.jit(lambda k: nnx.state(WanVAEDecoder(cfg, rngs=nnx.Rngs(k))))(jax.random.key(seed))


@functools.lru_cache(maxsize=8)
def _step_fns(gdef):
  def first(params, z):
    return nnx.merge(gdef, params)(z, None, True)

  def step(params, cache, z):
    return nnx.merge(gdef, params)(z, cache, False)

  return jax.jit(first), jax.jit(step, donate_argnums=(1,))


class VAEDecoder:
  """Compiled frame-by-frame decoding with explicit parameters.

  ``stream()`` gives a DecodeStream for latents arriving block by block; ``decode`` decodes a
  whole clip through the same stream, so streamed and one-shot decodes are the same computation.
  """

  def __init__(self, cfg: VAEConfig, params: nnx.State):
    self.cfg, self.params = cfg, params
    self._first, self._step = _step_fns(graphdef(cfg))

  def stream(self) -> 'DecodeStream':
    return DecodeStream(self)

  def decode(self, latents) -> np.ndarray:
    """latents [B, F, C, h, w] (sampler layout) -> video [B, 1 + 4(F-1), 8h, 8w, 3] float32."""
    return self.stream().push(latents)

  def free(self) -> None:
    """Deletes the parameters from device memory."""
    for leaf in jax.tree.leaves(self.params):
      if isinstance(leaf, jax.Array):
        leaf.delete()
    self.params = None


class DecodeStream:
  """Decodes latents in arrival order; state is the per-convolution 2-frame cache."""

  def __init__(self, dec: VAEDecoder):
    self.dec, self.cache, self.frames_in = dec, None, 0

  def push(self, latents) -> np.ndarray:
    """latents [B, T, C, h, w] (the next T latent frames) -> video frames [B, T', H, W, 3]."""
    z = jnp.asarray(latents, f32)
    if z.ndim != 5 or z.shape[2] != self.dec.cfg.z_dim:
      raise ValueError(f'latents must be [B, T, {self.dec.cfg.z_dim}, h, w], got {z.shape}')
    z = z.transpose(0, 1, 3, 4, 2)                              # [B, T, h, w, C]
    outs = []
    for i in range(z.shape[1]):
      zi = z[:, i:i + 1]
      if self.cache is None:
        video, self.cache = self.dec._first(self.dec.params, zi)
      else:
        video, self.cache = self.dec._step(self.dec.params, self.cache, zi)
      outs.append(np.asarray(video))
      self.frames_in += 1
    if not outs:
      return np.zeros((z.shape[0], 0) + (0,) * 3, np.float32)
    return np.concatenate(outs, axis=1)
