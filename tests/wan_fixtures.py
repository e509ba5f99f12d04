"""Tiny random PyTorch models saved in each real on-disk format (for the weight-port tests).

The reference models come from diffusers (WanTransformer3DModel, AutoencoderKLWan) and
transformers (UMT5EncoderModel) with tiny configs; "original" Wan / Self-Forcing files are made by
renaming their state dicts with the inverse tables in ``ports`` and saving them in the released
layouts:
  self_forcing_dmd.pt               {'generator_ema': {'model.<wan key>': t}, 'generator': {...}}
  Wan2.1-T2V-1.3B/                  diffusion_pytorch_model.safetensors (or shards + index),
                                    config.json, models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth,
                                    google/umt5-xxl/ (tokenizer)
  diffusers folders                 save_pretrained of each model
"""

from __future__ import annotations

import json
import os
import string

import numpy as np

from ports import dit as dit_port
from ports import umt5 as umt5_port
from ports import vae as vae_port
from tests.conftest import tiny_config

TINY_UMT5 = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj='gated-gelu', dropout_rate=0.0)
TINY_VAE = dict(base_dim=8, z_dim=16)
WORDS = ['a', 'cat', 'dog', 'the', 'on', 'in', 'red', 'blue', 'runs', 'beach', 'sunset', 'over',
         'sea', 'city', 'at', 'night']


def _torch():
  import torch
  return torch


def to_torch(sd, dtype=None):
  torch = _torch()
  out = {}
  for k, v in sd.items():
    t = torch.from_numpy(np.array(v, np.float32, copy=True))
    out[k] = t.to(dtype) if dtype is not None else t
  return out


def numpy_sd(model) -> dict:
  return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- DiT
def tiny_dit(seed: int = 0, cfg=None):
  """(WanConfig, diffusers WanTransformer3DModel with random weights)."""
  from kvjax import reference_torch as rt
  cfg = cfg or tiny_config()
  return cfg, rt.build_diffusers(cfg, seed=seed)


def dit_config_json(cfg) -> dict:
  """The original Wan ``config.json`` of a DiT (as in the Wan2.1-T2V-1.3B folder)."""
  return dict(_class_name='WanModel', _diffusers_version='0.30.0', model_type='t2v',
              dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, in_dim=cfg.in_dim,
              num_heads=cfg.num_heads, num_layers=cfg.num_layers, out_dim=cfg.out_dim,
              text_len=cfg.text_len, eps=cfg.eps)


def save_self_forcing(path: str, ema_model, gen_model=None, critic=True) -> None:
  """A Self-Forcing checkpoint: original Wan names prefixed 'model.' under generator(_ema)."""
  torch = _torch()
  def wrap(model):
    sd = dit_port.diffusers_to_original(numpy_sd(model))
    return {f'model.{k}': v for k, v in to_torch(sd).items()}
  obj = {'generator_ema': wrap(ema_model)}
  if gen_model is not None:
    obj['generator'] = wrap(gen_model)
  if critic:
    obj['critic'] = {'model.blocks.0.bogus.weight': torch.zeros(2)}
  torch.save(obj, path)


def save_wan_dit(folder: str, cfg, model, shards: int = 1) -> None:
  """Original Wan2.1 DiT files: one safetensors, or ``shards`` shards with an index."""
  from safetensors.torch import save_file
  os.makedirs(folder, exist_ok=True)
  sd = to_torch(dit_port.diffusers_to_original(numpy_sd(model)))
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(dit_config_json(cfg), f)
  if shards == 1:
    save_file(sd, os.path.join(folder, 'diffusion_pytorch_model.safetensors'))
    return
  keys = sorted(sd)
  weight_map = {}
  for s in range(shards):
    name = f'diffusion_pytorch_model-{s + 1:05d}-of-{shards:05d}.safetensors'
    part = {k: sd[k] for k in keys[s::shards]}
    save_file(part, os.path.join(folder, name))
    weight_map.update({k: name for k in part})
  total = sum(int(v.numel()) * 4 for v in sd.values())
  with open(os.path.join(folder, 'diffusion_pytorch_model.safetensors.index.json'), 'w') as f:
    json.dump(dict(metadata=dict(total_size=total), weight_map=weight_map), f)


# ---------------------------------------------------------------------------- umT5
def tiny_umt5(seed: int = 0):
  torch = _torch()
  from transformers import UMT5Config, UMT5EncoderModel
  torch.manual_seed(seed)
  return UMT5EncoderModel(UMT5Config(**TINY_UMT5)).float().eval()


def umt5_original_sd(model) -> dict:
  sd = numpy_sd(model)
  sd.pop('encoder.embed_tokens.weight', None)            # tied to shared.weight
  return {umt5_port.hf_key_to_original(k): v for k, v in sd.items()}


def save_wan_t5(path: str, model, dtype=None) -> None:
  """``models_t5_umt5-xxl-enc-bf16.pth``: a flat state dict with Wan's names (bf16 if asked)."""
  _torch().save(to_torch(umt5_original_sd(model), dtype), path)


def tiny_tokenizer(folder: str) -> None:
  """A small Unigram T5 tokenizer saved like google/umt5-xxl (<pad>=0, </s>=1, <unk>=2)."""
  from transformers import T5Tokenizer
  vocab = [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0), ('\u2581', -2.0)]
  vocab += [(c, -3.0) for c in string.ascii_lowercase + string.digits + '.,!?']
  vocab += [('\u2581' + w, -1.0) for w in WORDS]
  assert len(vocab) <= TINY_UMT5['vocab_size']
  T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)


# ---------------------------------------------------------------------------- VAE
def tiny_vae(seed: int = 0):
  torch = _torch()
  from diffusers import AutoencoderKLWan
  torch.manual_seed(seed)
  return AutoencoderKLWan(**TINY_VAE).float().eval()


def save_wan_vae(path: str, model) -> None:
  """``Wan2.1_VAE.pth``: the full (encoder + decoder) state dict under original Wan names."""
  _torch().save(to_torch(vae_port.diffusers_to_original(numpy_sd(model))), path)


# ---------------------------------------------------------------------------- whole folders
def make_wan_folder(root: str, seed: int = 0, dit_shards: int = 1, t5_dtype=None) -> dict:
  """A tiny Wan2.1-T2V folder in the original layout; returns the torch reference models."""
  os.makedirs(root, exist_ok=True)
  cfg, dit = tiny_dit(seed)
  save_wan_dit(root, cfg, dit, shards=dit_shards)
  t5 = tiny_umt5(seed)
  save_wan_t5(os.path.join(root, 'models_t5_umt5-xxl-enc-bf16.pth'), t5, t5_dtype)
  vae = tiny_vae(seed)
  save_wan_vae(os.path.join(root, 'Wan2.1_VAE.pth'), vae)
  tiny_tokenizer(os.path.join(root, 'google', 'umt5-xxl'))
  return dict(cfg=cfg, dit=dit, t5=t5, vae=vae)


def make_diffusers_folder(root: str, models: dict) -> None:
  """A diffusers-pipeline-like folder (transformer/, text_encoder/, tokenizer/, vae/)."""
  models['dit'].save_pretrained(os.path.join(root, 'transformer'))
  models['t5'].save_pretrained(os.path.join(root, 'text_encoder'))
  models['vae'].save_pretrained(os.path.join(root, 'vae'))
  tiny_tokenizer(os.path.join(root, 'tokenizer'))
