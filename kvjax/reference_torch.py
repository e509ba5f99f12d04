"""PyTorch reference: diffusers' WanTransformer3DModel driven as a block-causal recompute.

diffusers 0.42.1 has no KV cache and always starts RoPE at frame 0, so ``recompute_rollout``
recomputes the whole prefix at every call with a frame mask injected through a custom attention
processor, and expands per-frame timesteps to per-token [B, L] timesteps (the Wan2.2 TI2V path).
It checks the kvjax cache, RoPE offsets and sampler independently of kvjax's own code (float32).
The same model driven block by block with a per-layer KV cache, in float32 or bfloat16, is
``kvjax.reference_torch_cache.cached_rollout``.

``build_diffusers(dtype='bfloat16')`` casts the loaded weights as diffusers'
``from_pretrained(torch_dtype=torch.bfloat16)`` does: every parameter to bfloat16 except those of
the modules named in ``WanTransformer3DModel._keep_in_fp32_modules`` (time embedder, modulation
tables, norms), which stay float32, as do the RoPE tables (buffers, float32 here: the model is
built in float32). ``model.to(bf16)`` would cast those too (diffusers warns against it).
Requires the ``torch`` extra (torch, diffusers).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from kvjax.model import WanConfig
from kvjax.sampler import Noise, SamplerConfig, frame_mask, schedule
from ports import dit as dit_port


def _torch():
  try:
    import torch  # noqa: F401
    import diffusers  # noqa: F401
  except ImportError as e:
    raise ImportError('the PyTorch reference needs the torch extra: '
                      'pip install -e ".[torch]"') from e
  import torch
  return torch


def diffusers_config(cfg: WanConfig) -> dict:
  return dict(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads,
              attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
              text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
              num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm='rms_norm_across_heads',
              eps=cfg.eps, rope_max_seq_len=cfg.rope_max_frames)


DTYPES = ('float32', 'bfloat16')


def build_diffusers(cfg: WanConfig, params: Mapping | None = None, seed: int = 0,
                    dtype: str = 'float32'):
  """A diffusers WanTransformer3DModel; with ``params`` (nested kvjax params) loaded.

  Weights are loaded in float32, then, for ``dtype='bfloat16'``, cast as ``from_pretrained``
  casts them (see the module docstring): bfloat16 but for the float32-kept modules.
  """
  torch = _torch()
  from diffusers import WanTransformer3DModel
  if dtype not in DTYPES:
    raise ValueError(f'unsupported torch reference dtype {dtype!r}; valid: {list(DTYPES)}')
  torch.manual_seed(seed)
  model = WanTransformer3DModel(**diffusers_config(cfg)).float().eval()
  if params is not None:
    sd = dit_port.original_to_diffusers(dit_port.params_to_original(params))
    sd = {k: torch.from_numpy(np.array(v, np.float32, copy=True)) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
  if dtype == 'bfloat16':
    keep = WanTransformer3DModel._keep_in_fp32_modules
    for name, p in model.named_parameters():
      if not any(m in name.split('.') for m in keep):
        p.data = p.data.to(torch.bfloat16)
  return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
  return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


class MaskedProcessor:
  """Wraps diffusers' WanAttnProcessor and injects a fixed boolean mask [L, L] (True = attend)."""

  def __init__(self, mask):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    self.inner = WanAttnProcessor()
    self.mask = mask

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               rotary_emb=None):
    return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def set_frame_mask(model, fmask: np.ndarray | None, tokens_per_frame: int):
  """Installs (or removes, with None) a frame-level self-attention mask on every block."""
  torch = _torch()
  from diffusers.models.transformers.transformer_wan import WanAttnProcessor
  for blk in model.blocks:
    if fmask is None:
      blk.attn1.set_processor(WanAttnProcessor())
    else:
      m = np.repeat(np.repeat(np.asarray(fmask, bool), tokens_per_frame, 0), tokens_per_frame, 1)
      blk.attn1.set_processor(MaskedProcessor(torch.from_numpy(m)))


def forward(model, x: np.ndarray, t: np.ndarray, text_states: np.ndarray) -> np.ndarray:
  """x [B, F, C, h, w], t [B, F] per-frame timesteps, text [B, Lt, E] -> v [B, F, C, h, w]."""
  torch = _torch()
  b, nf, c, hh, ww = x.shape
  _, ph, pw = model.config.patch_size
  per_tok = np.repeat(np.asarray(t, np.float32), (hh // ph) * (ww // pw), axis=1)
  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4), np.float32)),
                torch.from_numpy(per_tok),
                torch.from_numpy(np.array(text_states, np.float32, copy=True)), return_dict=False)[0]
  return out.numpy().transpose(0, 2, 1, 3, 4)


def recompute_rollout(model, noise: Noise, text_states, cfg: SamplerConfig,
                      window_frames: int, sink_frames: int = 0) -> np.ndarray:
  """The Self-Forcing rollout by block-causal recomputation in diffusers (float32).

  Returns:
    latents [B, F, C, h, w] float32.
  """
  ts, sigmas = schedule(cfg)
  init = np.asarray(noise.initial, np.float32)
  renoise = np.asarray(noise.renoise, np.float32)
  b, nf, _, hh, ww = init.shape
  bf = cfg.block_frames
  _, ph, pw = model.config.patch_size
  clean: list[np.ndarray] = []
  try:
    for blk in range(nf // bf):
      n = (blk + 1) * bf
      set_frame_mask(model, frame_mask(n, bf, window_frames, sink_frames), (hh // ph) * (ww // pw))
      x = init[:, blk * bf:n]
      for i, (t, s) in enumerate(zip(ts, sigmas)):
        xs = np.concatenate(clean + [x], axis=1)
        tt = np.concatenate([np.full((b, n - bf), cfg.context_noise, np.float32),
                             np.full((b, bf), t, np.float32)], axis=1)
        v = forward(model, xs, tt, text_states)[:, n - bf:]
        x0 = (x - s * v).astype(np.float32)
        if i + 1 < len(ts):
          x = ((1.0 - sigmas[i + 1]) * x0 + sigmas[i + 1] * renoise[blk, i]).astype(np.float32)
      clean.append(x0)
  finally:
    set_frame_mask(model, None, 1)
  return np.concatenate(clean, axis=1)
