"""Static model configuration of the causal Wan DiT."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from kvjax.configlib import FrozenConfig
from kvjax.kernels.rope import RopeGrid
from kvjax.model import sizes

_DEFAULT = sizes.SIZES[sizes.DEFAULT]

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def as_dtype(name: Any) -> jnp.dtype:
  """Maps 'float32' | 'bfloat16' | 'float16' (or a dtype) to a jnp dtype; raises on others."""
  if isinstance(name, str):
    if name not in _DTYPES:
      raise ValueError(f'unsupported dtype {name!r}; valid: {sorted(_DTYPES)}')
    return jnp.dtype(_DTYPES[name])
  return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class WanConfig(FrozenConfig):
  """Hyper-parameters of the Wan2.1 text-to-video DiT (Wan2.1-T2V-1.3B by default: the sizes
  come from ``kvjax.model.sizes``).

  Attributes:
    dim: model width D.
    ffn_dim: hidden width of the GELU-tanh feed-forward.
    freq_dim: width of the sinusoidal time embedding.
    num_heads: attention heads N; head dim H = dim // num_heads.
    num_layers: transformer blocks (scanned over stacked parameters).
    patch_size: (t, h, w) patch; only t = 1 is supported (as every Wan2.1 T2V checkpoint).
    in_dim / out_dim: latent channels.
    text_len / text_dim: text-encoder sequence length and width.
    eps: epsilon of every LayerNorm / RMSNorm.
    rope_theta: RoPE base; rope_max_frames: positions per axis in the RoPE table.
    param_dtype / compute_dtype: storage dtype of the weights / dtype of activations and matmuls.
  """
  _what = 'model config'

  dim: int = _DEFAULT['dim']
  ffn_dim: int = _DEFAULT['ffn_dim']
  freq_dim: int = 256
  num_heads: int = _DEFAULT['num_heads']
  num_layers: int = _DEFAULT['num_layers']
  patch_size: tuple[int, int, int] = (1, 2, 2)
  in_dim: int = _DEFAULT['in_dim']
  out_dim: int = _DEFAULT['out_dim']
  text_len: int = _DEFAULT['text_len']
  text_dim: int = _DEFAULT['text_dim']
  eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_max_frames: int = 1024
  param_dtype: str = 'bfloat16'
  compute_dtype: str = 'bfloat16'

  def __post_init__(self):
    object.__setattr__(self, 'patch_size', tuple(int(p) for p in self.patch_size))
    if self.dim % self.num_heads:
      raise ValueError(f'dim {self.dim} is not divisible by num_heads {self.num_heads}')
    if self.head_dim % 2:
      raise ValueError(f'head_dim {self.head_dim} must be even for the interleaved RoPE')
    if self.patch_size[0] != 1:
      raise ValueError(f'temporal patch size must be 1 (got {self.patch_size})')
    if self.freq_dim % 2:
      raise ValueError(f'freq_dim must be even (got {self.freq_dim})')
    as_dtype(self.param_dtype)
    as_dtype(self.compute_dtype)

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  def rope_grid(self, height: int, width: int) -> RopeGrid:
    """The RoPE of a frame of ``height x width`` tokens (after patchify): the one description
    the model rotates with and pre-RoPE caches read with (``CacheSpec.rope``)."""
    return RopeGrid(self.head_dim, height, width, self.rope_max_frames, self.rope_theta)

  @property
  def patch_dim(self) -> int:
    """Output channels of the head per token: out_dim * prod(patch_size)."""
    t, h, w = self.patch_size
    return self.out_dim * t * h * w

  @property
  def pdtype(self) -> jnp.dtype:
    return as_dtype(self.param_dtype)

  @property
  def cdtype(self) -> jnp.dtype:
    return as_dtype(self.compute_dtype)
