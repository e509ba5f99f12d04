"""The umT5 encoder (Wan's text encoder, umT5-XXL at full size) in Flax NNX.

Pre-norm blocks ``x += Attn(RMS(x)); x += FFN(RMS(x))`` with a final RMSNorm. T5 specifics:
attention has no 1/sqrt(d) scaling and adds a learned relative-position bias that every layer
owns (umT5: not shared), bucketed bidirectionally; the FFN is gated GELU (tanh approximation):
``fc2(fc1(x) * gelu(gate(x)))``; RMSNorm has no mean and no bias. Padded key positions are masked,
and padded output positions are zeroed (what Wan's text encoder hands to the DiT).

The 24 blocks are stacked along a leading layer axis and applied with ``jax.lax.scan``, so the
5.7B-parameter encoder traces one block.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.configlib import FrozenConfig
from kvjax.model.config import as_dtype
from kvjax.model.layers import Dense, gelu_tanh

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class UMT5Config(FrozenConfig):
  """Hyper-parameters of the umT5 encoder (defaults: umT5-XXL).

  Attributes:
    vocab_size, dim: token embedding [vocab_size, dim].
    num_heads, head_dim: attention heads (inner width num_heads * head_dim may differ from dim).
    ffn_dim: hidden width of the gated FFN.
    num_layers: encoder blocks.
    num_buckets, max_distance: relative-position buckets (bidirectional) and the largest
      distance with its own log-spaced bucket.
    eps: RMSNorm epsilon.
    param_dtype / compute_dtype: storage / activation dtype; norms and softmax are float32.
  """
  _what = 'umT5 config'

  vocab_size: int = 256384
  dim: int = 4096
  num_heads: int = 64
  head_dim: int = 64
  ffn_dim: int = 10240
  num_layers: int = 24
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  param_dtype: str = 'bfloat16'
  compute_dtype: str = 'bfloat16'

  def __post_init__(self):
    as_dtype(self.param_dtype)
    as_dtype(self.compute_dtype)
    if self.num_buckets % 2:
      raise ValueError(f'num_buckets must be even (bidirectional), got {self.num_buckets}')

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.head_dim


def relative_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bidirectional relative-position bucket of every (query, key) pair.

  Half the buckets are for keys after the query. Within a half, distances below half of it get
  their own bucket; larger ones share log-spaced buckets up to ``max_distance`` (then the last).
  The log is evaluated in float32 as the PyTorch implementations do, so boundaries agree.

  Returns:
    [q_len, k_len] int32 numpy (static: depends only on the lengths).
  """
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]          # key - query
  half = num_buckets // 2
  out = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  exact = half // 2
  far = np.maximum(dist, exact).astype(np.float32)                     # only used where dist >= exact
  ratio = np.log(far / np.float32(exact)) / np.float32(math.log(max_distance / exact))
  large = exact + (ratio * np.float32(half - exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  out = out + np.where(dist < exact, dist, large)
  return out.astype(np.int32)


class RMSNorm(nnx.Module):
  """T5 RMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast to ``dtype``, times the weight."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(f32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype, rngs=rngs, use_bias=False)
    self.q = Dense(cfg.dim, cfg.inner_dim, **kw)
    self.k = Dense(cfg.dim, cfg.inner_dim, **kw)
    self.v = Dense(cfg.dim, cfg.inner_dim, **kw)
    self.o = Dense(cfg.inner_dim, cfg.dim, **kw)
    self.cfg = cfg

  def __call__(self, x, bias, key_mask):
    """x [B, L, D]; bias [N, L, L] float32; key_mask [B, L] bool -> [B, L, D]."""
    b, l, _ = x.shape
    n, h = self.cfg.num_heads, self.cfg.head_dim
    q = self.q(x).reshape(b, l, n, h)
    k = self.k(x).reshape(b, l, n, h)
    v = self.v(x).reshape(b, l, n, h)
    s = jnp.einsum('BTNH,BSNH->BNTS', q, k, preferred_element_type=f32) + bias[None]
    s = jnp.where(key_mask[:, None, None, :], s, jnp.finfo(f32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum('BNTS,BSNH->BTNH', p, v, preferred_element_type=f32).astype(x.dtype)
    return self.o(o.reshape(b, l, n * h))


class FeedForward(nnx.Module):
  """fc2(fc1(x) * gelu_tanh(gate(x))); Wan's ``gate`` is HF's wi_0, ``fc1`` wi_1, ``fc2`` wo."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype, rngs=rngs, use_bias=False)
    self.gate = Dense(cfg.dim, cfg.ffn_dim, **kw)
    self.fc1 = Dense(cfg.dim, cfg.ffn_dim, **kw)
    self.fc2 = Dense(cfg.ffn_dim, cfg.dim, **kw)

  def __call__(self, x):
    h = gelu_tanh(self.gate(x, out_dtype=f32)) * self.fc1(x, out_dtype=f32)
    return self.fc2(h.astype(x.dtype))


class Block(nnx.Module):
  """One encoder block; owns its relative-position bias table [num_buckets, num_heads]."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    kw = dict(eps=cfg.eps, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
    self.norm1 = RMSNorm(cfg.dim, **kw)
    self.attn = Attention(cfg, rngs=rngs)
    self.norm2 = RMSNorm(cfg.dim, **kw)
    self.ffn = FeedForward(cfg, rngs=rngs)
    init = jax.nn.initializers.normal(1.0)
    self.pos_embedding = nnx.Param(init(rngs.params(), (cfg.num_buckets, cfg.num_heads),
                                        cfg.param_dtype))

  def __call__(self, x, buckets, key_mask):
    """x [B, L, D] (compute dtype); buckets [L, L] int32; key_mask [B, L] bool."""
    bias = jnp.take(self.pos_embedding[...].astype(f32), buckets, axis=0)   # [L, L, N]
    bias = bias.transpose(2, 0, 1)                                           # [N, L, L]
    x = (x.astype(f32) + self.attn(self.norm1(x), bias, key_mask).astype(f32)).astype(x.dtype)
    x = (x.astype(f32) + self.ffn(self.norm2(x)).astype(f32)).astype(x.dtype)
    return x


class UMT5Encoder(nnx.Module):
  """Token embedding -> scanned blocks -> final RMSNorm; padded positions zeroed."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = jax.nn.initializers.normal(1.0)
    self.token_embedding = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.dim),
                                          cfg.param_dtype))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(r):
      return Block(cfg, rngs=r)

    self.blocks = make_blocks(rngs)
    self.norm = RMSNorm(cfg.dim, eps=cfg.eps, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Encodes token ids.

    Args:
      ids: [B, L] int32 token ids (padding id 0).
      mask: [B, L] 1 for real tokens (``</s>`` included), 0 for padding.
    Returns:
      [B, L, D] float32 text states; rows where mask == 0 are exactly zero.
    """
    cfg = self.cfg
    l = ids.shape[1]
    key_mask = mask.astype(bool)
    buckets = jnp.asarray(relative_buckets(l, l, cfg.num_buckets, cfg.max_distance))
    x = jnp.take(self.token_embedding[...], ids, axis=0).astype(cfg.compute_dtype)
    gdef, state = nnx.split(self.blocks)

    def body(x, layer_state):
      return nnx.merge(gdef, layer_state)(x, buckets, key_mask), None

    x, _ = jax.lax.scan(body, x, state)
    x = self.norm(x).astype(f32)
    return x * key_mask[..., None].astype(f32)


def count_params(tree) -> int:
  return int(sum(int(x.size) for x in jax.tree.leaves(tree)))
