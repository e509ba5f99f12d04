"""Wan's 3-D rotary position embedding, complex-interleaved.

Head channels (2i, 2i+1) form one complex number. The H/2 complex channels are split into
time | height | width with sizes [c - 2*(c//3), c//3, c//3] (c = H/2); each axis has its own
frequency ladder theta^(-2j/dim_axis). In the causal model the time position is the absolute
latent-frame index, so cached keys carry absolute positions.

The model rotates queries and keys before attention. A cache that stores *pre-RoPE* keys (QVG's
``rope='pre'``) hands its sources a ``RopeGrid``; the attention readers then rotate each decoded
chunk (one latent frame of ``height x width`` tokens) by its absolute frame (``frame_angles``).
Living in ``kvjax.kernels`` lets both the model and the kernels use it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def axis_channels(head_dim: int) -> tuple[int, int, int]:
  """Complex channels of the (time, height, width) axes."""
  c = head_dim // 2
  return c - 2 * (c // 3), c // 3, c // 3


@functools.lru_cache(maxsize=16)
def tables(head_dim: int, max_pos: int, theta: float) -> tuple[np.ndarray, ...]:
  """Per-axis angle tables computed in float64: ([max_pos, c_t], [max_pos, c_h], [max_pos, c_w])."""
  out = []
  pos = np.arange(max_pos, dtype=np.float64)[:, None]
  for c_axis in axis_channels(head_dim):
    dim_axis = 2 * c_axis
    inv = 1.0 / np.power(theta, np.arange(0, dim_axis, 2, dtype=np.float64) / dim_axis)
    out.append(pos * inv)
  return tuple(out)


def block_angles(start_frame: jax.Array | int, num_frames: int, height: int, width: int, *,
                 head_dim: int, max_pos: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin of the rotation of every token of a block of frames.

  Args:
    start_frame: absolute index of the block's first latent frame (may be traced).
    num_frames, height, width: the block's token grid (post-patchify), tokens ordered f, h, w.
  Returns:
    cos, sin: [num_frames * height * width, head_dim // 2] float32.
  """
  t_tab, h_tab, w_tab = tables(head_dim, max_pos, theta)
  if height > max_pos or width > max_pos:
    raise ValueError(f'token grid {height}x{width} exceeds the RoPE table ({max_pos} positions)')
  t_cos = jax.lax.dynamic_slice_in_dim(jnp.asarray(np.cos(t_tab), jnp.float32), start_frame,
                                       num_frames, axis=0)
  t_sin = jax.lax.dynamic_slice_in_dim(jnp.asarray(np.sin(t_tab), jnp.float32), start_frame,
                                       num_frames, axis=0)
  grid = (num_frames, height, width)

  def expand(tf, th, tw):
    ct, ch, cw = tf.shape[-1], th.shape[-1], tw.shape[-1]
    return jnp.concatenate([
        jnp.broadcast_to(tf[:, None, None, :], grid + (ct,)),
        jnp.broadcast_to(th[None, :, None, :], grid + (ch,)),
        jnp.broadcast_to(tw[None, None, :, :], grid + (cw,)),
    ], axis=-1).reshape(num_frames * height * width, -1)

  cos = expand(t_cos, jnp.asarray(np.cos(h_tab[:height]), jnp.float32),
               jnp.asarray(np.cos(w_tab[:width]), jnp.float32))
  sin = expand(t_sin, jnp.asarray(np.sin(h_tab[:height]), jnp.float32),
               jnp.asarray(np.sin(w_tab[:width]), jnp.float32))
  return cos, sin


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved channel pairs.

  Args:
    x: [B, T, N, H] query or key.
    cos, sin: [T, H // 2] float32.
  Returns:
    [B, T, N, H] in x's dtype (rotation computed in float32).
  """
  b, t, n, h = x.shape
  xr = x.astype(jnp.float32).reshape(b, t, n, h // 2, 2)
  x0, x1 = xr[..., 0], xr[..., 1]
  c = cos[None, :, None, :]
  s = sin[None, :, None, :]
  out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
  return out.reshape(b, t, n, h).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class RopeGrid:
  """The rotary embedding of one latent frame's token grid (hashable: static metadata).

  head_dim, theta, max_pos: the model's RoPE (``WanConfig.head_dim / rope_theta /
  rope_max_frames``); height, width: a frame's token grid after patchify (P = height * width).
  """
  head_dim: int
  height: int
  width: int
  max_pos: int = 1024
  theta: float = 10000.0

  @property
  def frame_tokens(self) -> int:
    return self.height * self.width

  def frame_angles(self, frame: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [height * width, head_dim // 2] float32 of the tokens of frame ``frame``."""
    return block_angles(frame, 1, self.height, self.width, head_dim=self.head_dim,
                        max_pos=self.max_pos, theta=self.theta)

  def rotate_frame(self, k: jax.Array, frame: jax.Array | int) -> jax.Array:
    """k [B, height * width, N, H] of one frame, rotated to absolute frame ``frame`` (``apply``)."""
    return apply(k, *self.frame_angles(frame))

  def channel_tables(self, positions: jax.Array) -> tuple[jax.Array, ...]:
    """Per-channel rotation tables for a kernel, split into the frame and in-frame parts.

    Returns (t_cos, t_sin [M, H] for the frames ``positions`` [M], s_cos, s_sin [P, H] for a
    frame's tokens), float32, each complex channel's value repeated on its two real channels.
    On every channel one part is the identity (cos 1, sin 0), so the angle-sum products
    t_cos * s_cos - t_sin * s_sin and t_sin * s_cos + t_cos * s_sin are exactly the
    ``frame_angles`` values.
    """
    t_tab, h_tab, w_tab = tables(self.head_dim, self.max_pos, self.theta)
    c_t = t_tab.shape[1]
    c_hw = h_tab.shape[1] + w_tab.shape[1]
    pos = jnp.clip(positions, 0, self.max_pos - 1)
    t_cos = jnp.concatenate([jnp.asarray(np.cos(t_tab), jnp.float32)[pos],
                             jnp.ones((pos.shape[0], c_hw), jnp.float32)], axis=1)
    t_sin = jnp.concatenate([jnp.asarray(np.sin(t_tab), jnp.float32)[pos],
                             jnp.zeros((pos.shape[0], c_hw), jnp.float32)], axis=1)
    s_cos, s_sin = block_angles(0, 1, self.height, self.width, head_dim=self.head_dim,
                                max_pos=self.max_pos, theta=self.theta)
    p = self.frame_tokens
    s_cos = jnp.concatenate([jnp.ones((p, c_t), jnp.float32), s_cos[:, c_t:]], axis=1)
    s_sin = jnp.concatenate([jnp.zeros((p, c_t), jnp.float32), s_sin[:, c_t:]], axis=1)
    twice = lambda a: jnp.repeat(a, 2, axis=1)
    return twice(t_cos), twice(t_sin), twice(s_cos), twice(s_sin)
