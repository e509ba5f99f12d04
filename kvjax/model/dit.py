"""The causal Wan2.1 DiT (Self-Forcing's CausalWanModel) in Flax NNX.

Layout conventions: latents are [B, F, C, h, w] (frames before channels, as Self-Forcing);
tokens are [B, F, P, D] with P = (h/2)(w/2) tokens per frame in raster (row-major) order.
The transformer blocks are one module whose parameters carry a leading layer axis; they are
applied with ``jax.lax.scan`` so the 30-layer model traces and compiles once per layer body.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import kernels
from kvjax.cache.base import AppendInfo, ordered_after
from kvjax.kernels import rope
from kvjax.model.config import WanConfig
from kvjax.model.layers import (Dense, LayerNorm, RMSNorm, f32, gelu_tanh, layer_norm, modulate,
                                table_init, timestep_sinusoid)


class SelfAttention(nnx.Module):
  """q/k/v/o projections with RMSNorm over the full width of q and k (before the head split)."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.cdtype, param_dtype=cfg.pdtype, rngs=rngs)
    d = cfg.dim
    self.q, self.k, self.v, self.o = (Dense(d, d, **kw) for _ in range(4))
    self.norm_q = RMSNorm(d, eps=cfg.eps, param_dtype=cfg.pdtype)
    self.norm_k = RMSNorm(d, eps=cfg.eps, param_dtype=cfg.pdtype)


class CrossAttention(SelfAttention):
  """Same parameters as self-attention; keys/values come from the text context (no RoPE)."""


class FeedForward(nnx.Module):

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.cdtype, param_dtype=cfg.pdtype, rngs=rngs)
    self.fc1 = Dense(cfg.dim, cfg.ffn_dim, **kw)
    self.fc2 = Dense(cfg.ffn_dim, cfg.dim, **kw)

  def __call__(self, x):
    return self.fc2(gelu_tanh(self.fc1(x, out_dtype=f32)).astype(x.dtype))


# self_attn_fn(q, k, v) -> out: q, k, v, out [B, T, N, H] (k already rotated).
SelfAttnFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class Block(nnx.Module):
  """One causal Wan block: modulated self-attention, cross-attention, modulated FFN."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.modulation = nnx.Param(table_init((1, 6, cfg.dim), cfg.dim)(rngs.params(), cfg.pdtype))
    self.self_attn = SelfAttention(cfg, rngs=rngs)
    self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps, dtype=cfg.cdtype, param_dtype=cfg.pdtype)
    self.cross_attn = CrossAttention(cfg, rngs=rngs)
    self.ffn = FeedForward(cfg, rngs=rngs)

  def cross_kv(self, ctx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ctx [B, Lt, D] (text MLP output) -> k, v [B, Lt, N, H], computed once per prompt."""
    cfg = self.cfg
    b, lt, _ = ctx.shape
    k = self.cross_attn.norm_k(self.cross_attn.k(ctx)).reshape(b, lt, cfg.num_heads, cfg.head_dim)
    v = self.cross_attn.v(ctx).reshape(b, lt, cfg.num_heads, cfg.head_dim)
    return k, v

  def __call__(self, x, e0, ctx_kv, cos_sin, self_attn_fn: SelfAttnFn, pre_rope_keys=False):
    """Applies the block.

    Args:
      x: [B, F, P, D] tokens (compute dtype).
      e0: [B, F, 6, D] float32 time projection of each frame.
      ctx_kv: (k, v) [B, Lt, N, H] cross-attention keys/values of the prompt.
      cos_sin: RoPE (cos, sin) [F*P, H/2] for the block's absolute positions.
      self_attn_fn: attention of the block's queries (see SelfAttnFn).
      pre_rope_keys: return the keys before RoPE (for a cache that stores them so).
    Returns:
      x [B, F, P, D]; the block's keys (rotated, or pre-RoPE) and its values, [B, F*P, N, H].
    """
    cfg = self.cfg
    b, nf, p, d = x.shape
    n, h = cfg.num_heads, cfg.head_dim
    m = e0 + self.modulation[...].astype(f32)[:, None]                 # [B, F, 6, D]
    m = [m[:, :, i, None, :] for i in range(6)]                        # 6 x [B, F, 1, D]
    cdt = cfg.cdtype

    # Self-attention.
    hid = modulate(layer_norm(x, cfg.eps), m[0], m[1]).astype(cdt).reshape(b, nf * p, d)
    sa = self.self_attn
    q = sa.norm_q(sa.q(hid)).reshape(b, nf * p, n, h)
    k = sa.norm_k(sa.k(hid)).reshape(b, nf * p, n, h)
    v = sa.v(hid).reshape(b, nf * p, n, h)
    q = rope.apply(q, *cos_sin)
    k_rot = rope.apply(k, *cos_sin)
    y = sa.o(self_attn_fn(q, k_rot, v).reshape(b, nf * p, d), out_dtype=f32)
    x = (x.astype(f32) + y.reshape(b, nf, p, d) * m[2]).astype(cdt)

    # Cross-attention (no modulation, no gate, no mask).
    ca = self.cross_attn
    hid = self.norm3(x).reshape(b, nf * p, d)
    cq = ca.norm_q(ca.q(hid)).reshape(b, nf * p, n, h)
    y = ca.o(kernels.dense_attention(cq, *ctx_kv).reshape(b, nf * p, d), out_dtype=f32)
    x = (x.astype(f32) + y.reshape(b, nf, p, d)).astype(cdt)

    # Feed-forward.
    hid = modulate(layer_norm(x, cfg.eps), m[3], m[4]).astype(cdt)
    y = self.ffn(hid).astype(f32)
    x = (x.astype(f32) + y * m[5]).astype(cdt)
    return x, (k if pre_rope_keys else k_rot), v


class Head(nnx.Module):

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.modulation = nnx.Param(table_init((1, 2, cfg.dim), cfg.dim)(rngs.params(), cfg.pdtype))
    self.head = Dense(cfg.dim, cfg.patch_dim, dtype=cfg.cdtype, param_dtype=cfg.pdtype, rngs=rngs)

  def __call__(self, x, e):
    """x [B, F, P, D], e [B, F, D] float32 (time embedding) -> [B, F, P, patch_dim] float32."""
    m = self.modulation[...].astype(f32)[:, None] + e[:, :, None, :]   # [B, F, 2, D]
    shift, scale = m[:, :, 0:1], m[:, :, 1:2]
    hid = modulate(layer_norm(x, self.cfg.eps), shift, scale).astype(self.cfg.cdtype)
    return self.head(hid, out_dtype=f32)


class WanDiT(nnx.Module):
  """Causal Wan2.1 text-to-video DiT with scanned, stacked transformer blocks."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pt, ph, pw = cfg.patch_size
    init = jax.nn.initializers.variance_scaling(1.0, 'fan_in', 'normal',
                                                in_axis=(0, 1, 2, 3), out_axis=4)
    # Conv3d kernel in Flax layout [kt, kh, kw, in, out].
    self.patch_embedding = nnx.Param(init(rngs.params(), (pt, ph, pw, cfg.in_dim, cfg.dim),
                                          cfg.pdtype))
    self.patch_bias = nnx.Param(jnp.zeros((cfg.dim,), cfg.pdtype))
    kw = dict(param_dtype=cfg.pdtype, rngs=rngs)
    self.text_fc1 = Dense(cfg.text_dim, cfg.dim, dtype=cfg.cdtype, **kw)
    self.text_fc2 = Dense(cfg.dim, cfg.dim, dtype=cfg.cdtype, **kw)
    self.time_fc1 = Dense(cfg.freq_dim, cfg.dim, dtype=f32, **kw)
    self.time_fc2 = Dense(cfg.dim, cfg.dim, dtype=f32, **kw)
    self.time_proj = Dense(cfg.dim, 6 * cfg.dim, dtype=f32, **kw)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(r):
      return Block(cfg, rngs=r)

    self.blocks = make_blocks(rngs)
    self.head = Head(cfg, rngs=rngs)

  # ---------------------------------------------------------------- embeddings
  def patchify(self, x: jax.Array) -> jax.Array:
    """x [B, F, C, h, w] -> tokens [B, F, P, D] (compute dtype)."""
    cfg = self.cfg
    _, ph, pw = cfg.patch_size
    b, nf, c, hh, ww = x.shape
    if c != cfg.in_dim or hh % ph or ww % pw:
      raise ValueError(f'latents {x.shape} do not fit in_dim={cfg.in_dim}, patch={cfg.patch_size}')
    x = x.astype(cfg.cdtype).reshape(b, nf, c, hh // ph, ph, ww // pw, pw)
    x = x.transpose(0, 1, 3, 5, 4, 6, 2)                                # [B, F, h', w', ph, pw, C]
    kern = self.patch_embedding[...][0].astype(cfg.cdtype)              # [ph, pw, C, D]
    y = jnp.einsum('BFhwijc,ijcD->BFhwD', x, kern, preferred_element_type=f32)
    y = y + self.patch_bias[...].astype(f32)
    return y.reshape(b, nf, (hh // ph) * (ww // pw), cfg.dim).astype(cfg.cdtype)

  def unpatchify(self, y: jax.Array, height: int, width: int) -> jax.Array:
    """y [B, F, P, patch_dim] -> [B, F, C, h, w]; patch_dim index = (ph*pw_size + pw)*C + c."""
    cfg = self.cfg
    _, ph, pw = cfg.patch_size
    b, nf, _, _ = y.shape
    y = y.reshape(b, nf, height // ph, width // pw, ph, pw, cfg.out_dim)
    y = y.transpose(0, 1, 6, 2, 4, 3, 5)                                # [B, F, C, h', ph, w', pw]
    return y.reshape(b, nf, cfg.out_dim, height, width)

  def time_embed(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """t [B, F] float -> e [B, F, D] (head), e0 [B, F, 6, D] (blocks); both float32."""
    emb = timestep_sinusoid(t, self.cfg.freq_dim)
    e = self.time_fc2(jax.nn.silu(self.time_fc1(emb)))
    e0 = self.time_proj(jax.nn.silu(e))
    return e, e0.reshape(*t.shape, 6, self.cfg.dim)

  def embed_text(self, text_states: jax.Array) -> jax.Array:
    """text_states [B, Lt, E] -> [B, Lt, D] (Linear, GELU-tanh, Linear)."""
    h = gelu_tanh(self.text_fc1(text_states, out_dtype=f32)).astype(self.cfg.cdtype)
    return self.text_fc2(h)

  def cross_kv(self, text_states: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-layer cross-attention K/V of a prompt: ([L, B, Lt, N, H], [L, B, Lt, N, H])."""
    ctx = self.embed_text(text_states)
    gdef, state = nnx.split(self.blocks)

    def body(_, layer_state):
      return None, nnx.merge(gdef, layer_state).cross_kv(ctx)

    _, kv = jax.lax.scan(body, None, state)
    return kv

  # ---------------------------------------------------------------- forward passes
  def _run_blocks(self, x, e0, cross_kv, cos_sin, make_attn, carry_init=None, update=None,
                  pre_rope_keys=False):
    """Scans the stacked blocks.

    make_attn(layer, carry) -> SelfAttnFn for that layer; update(layer, carry, k, v, token)
    -> carry (the per-layer cache write of the context pass) or None; ``token`` is a scalar of
    the layer's output, to order the write after the layer's reads. ``pre_rope_keys``: update
    receives the keys before RoPE.
    """
    gdef, state = nnx.split(self.blocks)
    layers = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)

    def body(c, xs):
      x, extra = c
      layer_state, ck, cv, layer = xs
      blk = nnx.merge(gdef, layer_state)
      x, k, v = blk(x, e0, (ck, cv), cos_sin, make_attn(layer, extra), pre_rope_keys)
      if update is not None:
        extra = update(layer, extra, k, v, x.reshape(-1)[0].astype(f32))
      return (x, extra), None

    (x, extra), _ = jax.lax.scan(body, (x, carry_init), (state, *cross_kv, layers))
    return x, extra

  def _grid(self, hh, ww) -> rope.RopeGrid:
    _, ph, pw = self.cfg.patch_size
    return self.cfg.rope_grid(hh // ph, ww // pw)

  def _rope(self, start_frame, nf, hh, ww):
    g = self._grid(hh, ww)
    return rope.block_angles(start_frame, nf, g.height, g.width, head_dim=g.head_dim,
                             max_pos=g.max_pos, theta=g.theta)

  def forward_cached(self, x, t, cross_kv, start_frame, *, cache=None, method=None,
                     write: bool = False, impl: str = 'auto', info=None, predict: bool = True):
    """One Self-Forcing DiT call on a block, attending to the KV cache.

    Args:
      x: [B, F, C, h, w] latents of the block.
      t: [B, F] float timesteps per frame.
      cross_kv: output of ``cross_kv``.
      start_frame: absolute index of the block's first frame (int32, may be traced).
      cache, method: cache state and its method (None: no history).
      write: append the block's K/V to the cache (the clean context pass). Whatever ``write``,
        a method with cadence ``'every_call'`` re-encodes its history (``method.recode``) after
        each layer's attention, so the returned cache is then a new one.
      info: AppendInfo passed to ``method.append`` (default: AppendInfo(start_frame)).
      predict: compute the head (the flow prediction); False skips it (context pass).
    Returns:
      (v [B, F, C, h, w] float32 flow prediction or None, cache).
    """
    b, nf, _, hh, ww = x.shape
    tokens = self.patchify(x)
    e, e0 = self.time_embed(t)
    cos_sin = self._rope(start_frame, nf, hh, ww)
    p = tokens.shape[2]

    def make_attn(layer, state):
      state = cache if state is None else state

      def attn(q, k, v):
        own = kernels.dense_source(k, v, p)
        hist = [] if method is None else method.sources(state, layer)
        return kernels.attention(q, [own, *hist], impl=impl)[0]
      return attn

    # The context pass appends the block; a method whose cadence re-encodes its history does
    # so after the layer's attention of every call ('every_call') or of the context pass only
    # ('per_block'), before the append, as the study's hook re-quantized its whole buffer.
    recode = method is not None and (method.cadence == 'every_call' or
                                     (method.cadence == 'per_block' and write))
    carry = write or recode
    update = None
    if write and method is None:
      raise ValueError('write=True needs a cache method')
    if carry:
      base_info = info if info is not None else AppendInfo(start_frame=start_frame)
      if write and method.pre_rope_keys and cache.spec.rope != self._grid(hh, ww):
        raise ValueError(f'{method.name} stores pre-RoPE keys, and its CacheSpec.rope '
                         f'{cache.spec.rope} is not the model\'s {self._grid(hh, ww)}')

      def update(layer, state, k, v, token):
        call = base_info._replace(start_frame=ordered_after(base_info.start_frame, token))
        if recode:
          state = method.recode(state, layer, k, v, call)
        if write:
          state = method.append(state, layer, k, v, call)
        return state

    x_out, new_cache = self._run_blocks(
        tokens, e0, cross_kv, cos_sin, make_attn, carry_init=cache if carry else None,
        update=update, pre_rope_keys=write and method.pre_rope_keys)
    new_cache = new_cache if carry else cache
    if not predict:
      return None, new_cache
    return self.unpatchify(self.head(x_out, e), hh, ww), new_cache

  def reuse_feature(self, x, t):
    """The step-reuse probe: the first block's modulated self-attention input, float32.

    x [B, F, C, h, w], t [B, F] -> [B, F, P, D] = LN(tokens) * (1 + scale_msa) + shift_msa of
    layer 0 (what TeaCache-style reuse compares between denoising steps).
    """
    tokens = self.patchify(x)
    _, e0 = self.time_embed(t)
    mod0 = self.blocks.modulation[...][0].astype(f32)                   # [1, 6, D]
    m = e0 + mod0[:, None]
    return modulate(layer_norm(tokens, self.cfg.eps), m[:, :, 0, None, :], m[:, :, 1, None, :])

  def forward_full(self, x, t, cross_kv, frame_mask, frame_pos=None):
    """Cache-free forward over a whole clip with a frame-level attention mask (reference path).

    Args:
      x: [B, F, C, h, w] latents; t: [B, F] timesteps per frame.
      frame_mask: [F, F] bool, True where query frame i may attend to key frame j.
      frame_pos: [F] static ints, the RoPE frame index of each frame (default 0..F-1). Teacher
        forcing (``kvjax.world.train``) runs a clip's clean and noisy copies side by side, both
        at the clip's own positions.
    Returns:
      v: [B, F, C, h, w] float32.
    """
    b, nf, _, hh, ww = x.shape
    tokens = self.patchify(x)
    p = tokens.shape[2]
    e, e0 = self.time_embed(t)
    if frame_pos is None:
      cos_sin = self._rope(0, nf, hh, ww)
    else:
      pos = np.asarray(frame_pos, np.int64)
      if pos.shape != (nf,) or pos.min() < 0:
        raise ValueError(f'frame_pos must be [{nf}] non-negative ints, got {pos}')
      table = self._rope(0, int(pos.max()) + 1, hh, ww)
      cos_sin = tuple(a.reshape(-1, p, a.shape[-1])[pos].reshape(nf * p, -1) for a in table)
    token_mask = jnp.repeat(jnp.repeat(jnp.asarray(frame_mask, bool), p, axis=0), p, axis=1)

    def make_attn(layer, _):
      return lambda q, k, v: kernels.dense_attention(q, k, v, mask=token_mask)

    x_out, _ = self._run_blocks(tokens, e0, cross_kv, cos_sin, make_attn)
    return self.unpatchify(self.head(x_out, e), hh, ww)


def count_params(tree) -> int:
  """Total number of parameters in a (possibly abstract) parameter tree."""
  return int(sum(int(x.size) for x in jax.tree.leaves(tree)))
