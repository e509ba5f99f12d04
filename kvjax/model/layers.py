"""Small building blocks of the Wan DiT: dense layers, norms, time embedding.

Einsum vocabulary used across kvjax: B batch, F latent frames, P tokens per frame, T query tokens,
S key/value tokens, N heads, H head dim, D model width, E text width, C latent channels, L layers.
Norm statistics, modulation and residual adds are computed in float32 (DESIGN section 9).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

f32 = jnp.float32


class Dense(nnx.Module):
  """y = x @ kernel + bias with float32 accumulation, output in ``dtype``.

  kernel: [in, out] (PyTorch's Linear weight transposed); bias: [out].
  """

  def __init__(self, din: int, dout: int, *, dtype, param_dtype, rngs: nnx.Rngs,
               use_bias: bool = True, scale: float = 1.0):
    init = jax.nn.initializers.variance_scaling(scale, 'fan_in', 'normal')
    self.kernel = nnx.Param(init(rngs.params(), (din, dout), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dout,), param_dtype)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
    k = self.kernel[...]
    y = jnp.einsum('...i,io->...o', x.astype(self.dtype), k.astype(self.dtype),
                   preferred_element_type=f32)
    if self.bias is not None:
      y = y + self.bias[...].astype(f32)
    return y.astype(out_dtype or self.dtype)


class RMSNorm(nnx.Module):
  """Wan's RMSNorm: statistics in float32, cast to the input dtype, then times the weight."""

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(f32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters over the last axis; float32 in and out."""
  x = x.astype(f32)
  mu = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps)


class LayerNorm(nnx.Module):
  """Affine LayerNorm (Wan's ``norm3`` before cross-attention); float32 math, output in ``dtype``."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layer_norm(x, self.eps) * self.scale[...].astype(f32) + self.bias[...].astype(f32)
    return y.astype(self.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def timestep_sinusoid(t: jax.Array, dim: int) -> jax.Array:
  """Wan's time embedding: [cos(t w), sin(t w)], w_k = 10000^(-k/(dim/2)) (cos first).

  Args:
    t: [...] float timesteps (e.g. 937.5), not rounded.
    dim: embedding width (256 for Wan).
  Returns:
    [..., dim] float32.
  """
  half = dim // 2
  omega = np.power(10000.0, -np.arange(half, dtype=np.float64) / half).astype(np.float32)
  arg = t.astype(f32)[..., None] * omega
  return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def modulate(x32: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x * (1 + scale) + shift, all float32 (x32 is a normalized activation)."""
  return x32 * (1.0 + scale) + shift


def table_init(shape, dim: int):
  """Initializer of the learned modulation tables: N(0, 1/dim), as Wan."""
  def init(key, dtype):
    return (jax.random.normal(key, shape, f32) / math.sqrt(dim)).astype(dtype)
  return init
