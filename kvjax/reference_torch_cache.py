"""PyTorch reference with a KV cache: diffusers' Wan modules driven block by block.

Self-Forcing's own pipeline on diffusers' ``WanTransformer3DModel`` (float32 or bfloat16, see
``reference_torch.build_diffusers``): for each block of ``block_frames`` latent frames, the
denoising calls run the model on the block's tokens only, each layer's self-attention reading the
cached K/V of earlier frames; then one clean context pass (t = ``context_noise``) appends the
block's K/V to every layer's cache. Noise, schedule and the x0 / re-noise arithmetic (float32)
are those of ``reference_torch.recompute_rollout`` and of kvjax's rollout.

What is ours and what is diffusers'. Only the self-attention of each block (``attn1``) is
replaced, by ``CachedSelfAttention``, a processor that holds its layer's cache; it uses the
block's own projections and norms (``to_q``/``to_k``/``to_v``, ``norm_q``/``norm_k``,
``to_out``). Patch embedding, time and text embedding, modulation, cross-attention, FFN and the
head run as diffusers' code, called through ``model(...)`` with one timestep a call (the Wan2.1
path: every frame of a call shares its timestep).

Deviations from diffusers, and why:
  - RoPE at absolute frame positions: diffusers' ``WanRotaryPosEmbed`` always starts at frame 0,
    so the processor ignores the ``rotary_emb`` the block passes and rotates with the rows of the
    block's frames, sliced from one table that ``model.rope`` computes for the whole rollout.
  - Attention is one ``scaled_dot_product_attention`` over [cached history ; the block's own K/V]
    (order-free); kvjax merges two partial attentions by log-sum-exp instead.
  - The cache holds rotated K/V in the model's dtype, per layer [B, frames, P, N, H], frames in
    write order. After each context pass it keeps exactly the frames the next block may see
    (``visible_history``: the first ``sink_frames`` and the newest ``window_frames -
    block_frames - sink_frames``), i.e. kvjax's BF16 cache and ``kvjax.sampler.frame_mask``.
  - The text embedding and the cross-attention K/V are recomputed at every call (diffusers has
    no cross-attention cache; kvjax and Self-Forcing compute them once a prompt).

bfloat16: the model's weights, activations and the cache are bfloat16 under diffusers' own
dtype handling (float32 kept modules, float32 norm and modulation math, the output cast back to
bfloat16 by ``proj_out``); the latents enter the model as bfloat16 and its bfloat16 flow
prediction is widened to float32 for the sampler arithmetic, as kvjax widens its head output.
Requires the ``torch`` extra (torch, diffusers).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from kvjax.reference_torch import _torch
from kvjax.sampler import Noise, SamplerConfig, schedule


def visible_history(start_frame: int, window_frames: int, sink_frames: int,
                    block_frames: int) -> list[int]:
  """History frames (before ``start_frame``) visible to the block starting there.

  Frame j < start is visible iff j < sink_frames or j >= start + block_frames - (window_frames -
  sink_frames): row ``start`` of ``kvjax.sampler.frame_mask`` restricted to earlier frames.
  """
  first_rolling = start_frame + block_frames - (window_frames - sink_frames)
  return [j for j in range(start_frame) if j < sink_frames or j >= first_rolling]


def block_rope(table, start_frame: int, num_frames: int, frame_tokens: int):
  """Rows of the RoPE table of frames [start_frame, start_frame + num_frames).

  Args:
    table: (cos, sin), each [1, F_all * P, 1, H] (``model.rope`` output for the whole rollout).
  Returns:
    (cos, sin), each [1, num_frames * P, 1, H].
  """
  lo, hi = start_frame * frame_tokens, (start_frame + num_frames) * frame_tokens
  return tuple(a[:, lo:hi] for a in table)


def rotate(x, cos, sin):
  """Wan's interleaved RoPE: pairs (x[2i], x[2i+1]) rotated by the angle of cos/sin[2i].

  x: [B, T, N, H] (model dtype); cos, sin: [1, T, 1, H] (the RoPE buffers' dtype, float32 from
  ``build_diffusers``). The products are taken in the wider dtype, the result cast to x's.
  """
  x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
  c, s = cos[..., 0::2], sin[..., 1::2]
  return _torch().stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2).type_as(x)


@dataclasses.dataclass
class CallState:
  """What every layer's processor needs to know about the current DiT call.

  start: the block's first absolute frame; rope: (cos, sin) [1, T, 1, H] of the block's absolute
  positions; write: the clean context pass (the layers append the block's K/V after attending).
  """
  start: int = 0
  rope: Any = None
  write: bool = False


class CachedSelfAttention:
  """``attn1`` processor of one layer: the block's queries attend to [cache ; own K/V].

  Holds the layer's cache: ``k``, ``v`` [B, Fc, P, N, H] (rotated keys, model dtype) and
  ``frames`` (the Fc absolute frame indices, in write order).
  """

  def __init__(self, call: CallState, frame_tokens: int):
    self.call, self.frame_tokens = call, frame_tokens
    self.k = self.v = None
    self.frames: list[int] = []

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               rotary_emb=None):
    """hidden_states [B, T, D] (model dtype) -> [B, T, D]; ``rotary_emb`` (frame 0) is unused."""
    torch = _torch()
    q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
    v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
    q, k = rotate(q, *self.call.rope), rotate(k, *self.call.rope)
    keys, values = k, v
    if self.frames:
      keys = torch.cat([self.k.flatten(1, 2), k], 1)
      values = torch.cat([self.v.flatten(1, 2), v], 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)).transpose(1, 2)
    out = out.flatten(2, 3).type_as(q)
    if self.call.write:
      self.append(k.unflatten(1, (-1, self.frame_tokens)), v.unflatten(1, (-1, self.frame_tokens)))
    return attn.to_out[1](attn.to_out[0](out))

  def append(self, k, v):
    """k, v [B, bf, P, N, H]: the clean rotated K/V of the block starting at ``call.start``."""
    torch = _torch()
    self.k = k if self.k is None else torch.cat([self.k, k], 1)
    self.v = v if self.v is None else torch.cat([self.v, v], 1)
    self.frames += list(range(self.call.start, self.call.start + k.shape[1]))

  def keep(self, frames: list[int]):
    """Evicts every stored frame not in ``frames``."""
    wanted = set(frames)
    idx = [i for i, f in enumerate(self.frames) if f in wanted]
    if len(idx) < len(self.frames):
      self.k, self.v = self.k[:, idx], self.v[:, idx]
      self.frames = [self.frames[i] for i in idx]


def _check_geometry(nf: int, bf: int, window_frames: int, sink_frames: int):
  if nf % bf:
    raise ValueError(f'{nf} latent frames is not a multiple of the block ({bf} frames)')
  if window_frames < bf:
    raise ValueError(f'window_frames={window_frames} is smaller than a block ({bf} frames)')
  if sink_frames < 0 or (sink_frames and sink_frames >= window_frames - bf):
    raise ValueError(f'sink_frames={sink_frames} must be >= 0 and < window_frames - '
                     f'block_frames = {window_frames - bf}')


def _dit(model, x, t: float, text):
  """x [B, F, C, h, w] float32, t a timestep, text [B, Lt, E] (model dtype) -> v float32."""
  torch = _torch()
  tt = torch.full((x.shape[0],), float(t), dtype=torch.float32)
  out = model(x.permute(0, 2, 1, 3, 4).to(model.dtype), tt, text, return_dict=False)[0]
  return out.float().permute(0, 2, 1, 3, 4)


def cached_rollout(model, noise: Noise, text_states, cfg: SamplerConfig, window_frames: int,
                   sink_frames: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
  """The Self-Forcing rollout with a per-layer KV cache in diffusers (the model's dtype).

  Args:
    model: a ``WanTransformer3DModel`` (``reference_torch.build_diffusers``); its ``attn1``
      processors are replaced during the rollout and restored after.
    noise: Noise, initial [B, F, C, h, w] and renoise [blocks, steps-1, B, bf, C, h, w].
    text_states: [B, Lt, E] text-encoder states.
    window_frames: frames visible to a block, its own included; sink_frames: first frames
      never evicted (as ``kvjax.cache.CacheSpec``).
  Returns:
    latents [B, F, C, h, w] float32 numpy, and info: ``runtime_s`` (the rollout, model building
    excluded), ``dit_calls``, ``dtype``, ``visible`` (per block, the history frames its calls
    read), ``max_cached_frames`` (the most frames a layer's cache held between blocks).
  """
  torch = _torch()
  from diffusers.models.transformers.transformer_wan import WanAttnProcessor
  ts, sigmas = schedule(cfg)
  init = torch.from_numpy(np.array(noise.initial, np.float32, copy=True))
  renoise = torch.from_numpy(np.array(noise.renoise, np.float32, copy=True))
  _, nf, _, hh, ww = init.shape
  bf = cfg.block_frames
  _check_geometry(nf, bf, window_frames, sink_frames)
  if nf > model.config.rope_max_seq_len:
    raise ValueError(f'{nf} latent frames exceed the RoPE table '
                     f'({model.config.rope_max_seq_len} frames)')
  _, ph, pw = model.config.patch_size
  p = (hh // ph) * (ww // pw)
  call = CallState()
  procs = [CachedSelfAttention(call, p) for _ in model.blocks]
  info: dict[str, Any] = dict(dtype=str(model.dtype).removeprefix('torch.'), dit_calls=0,
                              visible=[], max_cached_frames=0)
  out = []
  with torch.inference_mode():
    try:
      for block, proc in zip(model.blocks, procs):
        block.attn1.set_processor(proc)
      t0 = time.perf_counter()
      text = torch.from_numpy(np.array(text_states, np.float32, copy=True)).to(model.dtype)
      table = model.rope(torch.empty((1, 0, nf, hh, ww)))
      for blk in range(nf // bf):
        start = blk * bf
        call.start, call.rope, call.write = start, block_rope(table, start, bf, p), False
        info['visible'].append(list(procs[0].frames))
        x = init[:, start:start + bf]
        for i, (t, s) in enumerate(zip(ts, sigmas)):
          x0 = x - float(s) * _dit(model, x, t, text)
          if i + 1 < len(ts):
            sn = float(sigmas[i + 1])
            x = (1.0 - sn) * x0 + sn * renoise[blk, i]
        out.append(x0)
        call.write = True
        _dit(model, x0, cfg.context_noise, text)
        info['dit_calls'] += len(ts) + 1
        keep = visible_history(start + bf, window_frames, sink_frames, bf)
        for proc in procs:
          proc.keep(keep)
        info['max_cached_frames'] = max(info['max_cached_frames'], len(procs[0].frames))
      latents = torch.cat(out, 1).numpy()
      info['runtime_s'] = time.perf_counter() - t0
    finally:
      for block in model.blocks:
        block.attn1.set_processor(WanAttnProcessor())
  return latents, info
