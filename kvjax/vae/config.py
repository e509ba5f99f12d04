"""Static configuration of the Wan2.1 VAE decoder."""

from __future__ import annotations

import dataclasses

from kvjax.configlib import FrozenConfig
from kvjax.model.config import as_dtype

# Per-channel statistics of Wan2.1 latents (published with the model; diffusers' latents_mean/std).
# The sampler works with normalized latents (z - mean) / std; decoding starts with z * std + mean.
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class VAEConfig(FrozenConfig):
  """Hyper-parameters of the Wan2.1 VAE decoder.

  Attributes:
    dim: base width (96); stage widths are dim * dim_mult, widest first.
    z_dim: latent channels (16).
    dim_mult, num_res_blocks: the stage layout (each decoder stage has num_res_blocks + 1
      residual blocks, then an upsampler except the last stage).
    temporal_downsample: the encoder's per-stage temporal downsampling; the decoder upsamples
      in time where the reversed list is True (x4 in total for Wan2.1).
    out_channels: video channels (3).
    latents_mean / latents_std: per-channel de-normalisation (length z_dim).
    param_dtype / compute_dtype: storage dtype / activation and convolution dtype. Norms, the
      attention softmax and de-normalisation are float32.
  """
  _what = 'VAE config'

  dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  out_channels: int = 3
  latents_mean: tuple[float, ...] = LATENTS_MEAN
  latents_std: tuple[float, ...] = LATENTS_STD
  param_dtype: str = 'float32'
  compute_dtype: str = 'float32'

  def __post_init__(self):
    for name in ('dim_mult', 'temporal_downsample', 'latents_mean', 'latents_std'):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if len(self.temporal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(f'temporal_downsample {self.temporal_downsample} needs '
                       f'{len(self.dim_mult) - 1} entries for dim_mult {self.dim_mult}')
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise ValueError(f'latents_mean/std need {self.z_dim} entries (z_dim), got '
                       f'{len(self.latents_mean)}/{len(self.latents_std)}')
    as_dtype(self.param_dtype)
    as_dtype(self.compute_dtype)

  @property
  def dims(self) -> list[int]:
    """Widths: decoder input, then each stage's output (widest first)."""
    return [self.dim * m for m in (self.dim_mult[-1],) + self.dim_mult[::-1]]

  def stages(self) -> list[tuple[int, int, str | None]]:
    """(in_dim, out_dim, upsample mode or None) of every decoder stage."""
    dims, up_t = self.dims, self.temporal_downsample[::-1]
    out = []
    for i in range(len(self.dim_mult)):
      cin = dims[i] // 2 if i > 0 else dims[i]       # the previous upsampler halves the width
      mode = None
      if i != len(self.dim_mult) - 1:
        mode = 'upsample3d' if up_t[i] else 'upsample2d'
      out.append((cin, dims[i + 1], mode))
    return out

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(bool(t) for t in self.temporal_downsample)

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  def num_frames(self, latent_frames: int) -> int:
    """Video frames decoded from ``latent_frames`` (the first latent frame gives one frame)."""
    return 1 + self.temporal_factor * (latent_frames - 1) if latent_frames else 0
