"""The Wan2.1 folder: where the text encoder, its tokenizer and the VAE come from.

Three layouts are accepted (``inspect`` tells them apart and names any missing part):
  wan        the original release: models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/, Wan2.1_VAE.pth
  diffusers  a diffusers pipeline folder: text_encoder/, tokenizer/, vae/
  kvjax      converted by ``python -m ports.convert --model=wan_dir``: umt5/, vae/ (kvjax
             checkpoints), google/umt5-xxl/ (tokenizer copied), marker kvjax_wan_dir.json
Raw layouts are converted in memory on load (through ``ports``; ``.pth`` files need torch).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
from flax import nnx

MARKER = 'kvjax_wan_dir.json'
MARKER_FORMAT = 'kvjax.wan_dir.v1'
PARTS = ('text_encoder', 'tokenizer', 'vae')
WHAT = dict(text_encoder='umT5 text encoder', tokenizer='umT5 tokenizer', vae='Wan VAE')
LAYOUTS = {
    'kvjax': dict(text_encoder='umt5', tokenizer='google/umt5-xxl', vae='vae'),
    'wan': dict(text_encoder='models_t5_umt5-xxl-enc-bf16.pth', tokenizer='google/umt5-xxl',
                vae='Wan2.1_VAE.pth'),
    'diffusers': dict(text_encoder='text_encoder', tokenizer='tokenizer', vae='vae'),
}


@dataclasses.dataclass(frozen=True)
class WanDir:
  """A validated Wan folder: its layout and the path of each part."""
  path: str
  layout: str
  text_encoder: str
  tokenizer: str
  vae: str


def _layout(path: str) -> str | None:
  has = lambda name: os.path.exists(os.path.join(path, name))
  if has(MARKER):
    return 'kvjax'
  if any(has(n) for n in LAYOUTS['wan'].values()):
    return 'wan'
  if has('model_index.json') or has('text_encoder') or has('tokenizer') or has('vae'):
    return 'diffusers'
  return None


def inspect(path: str, need=PARTS) -> WanDir:
  """Finds the layout of ``path`` and checks that the parts in ``need`` exist.

  Raises:
    FileNotFoundError naming the folder, its layout and each missing file.
  """
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f'--wan_dir not found (or not a folder): {path}')
  layout = _layout(path)
  if layout is None:
    expected = '; '.join(f'{k}: {", ".join(v.values())}' for k, v in LAYOUTS.items())
    raise FileNotFoundError(f'--wan_dir {path}: not a Wan2.1 folder (expected one of: {expected})')
  parts = {k: os.path.join(path, v) for k, v in LAYOUTS[layout].items()}
  missing = [f'{LAYOUTS[layout][k]} ({WHAT[k]})' for k in need if not os.path.exists(parts[k])]
  if layout == 'kvjax':
    for k in ('text_encoder', 'vae'):
      if k in need and os.path.isdir(parts[k]) and not os.path.isfile(
          os.path.join(parts[k], 'config.json')):
        missing.append(f'{LAYOUTS[layout][k]}/config.json ({WHAT[k]})')
  if missing:
    raise FileNotFoundError(f'--wan_dir {path} ({layout} layout) is missing: {"; ".join(missing)}')
  return WanDir(path=path, layout=layout, **parts)


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: unreadable ({type(e).__name__}: {e})') from None


def _source(path: str, checkpoint_names):
  from ports import sources
  try:
    if os.path.isdir(path):
      return sources.open_checkpoint(path, checkpoint_names)
    return sources.open_file(path)
  except sources.PortError as e:
    raise ValueError(str(e)) from None


def text_dim(wd: WanDir) -> int:
  """Width of the text states (umT5 d_model) from metadata only."""
  if wd.layout == 'kvjax':
    return int(_read_json(os.path.join(wd.text_encoder, 'config.json'))['model']['dim'])
  if wd.layout == 'diffusers':
    return int(_read_json(os.path.join(wd.text_encoder, 'config.json'))['d_model'])
  src = _source(wd.text_encoder, ())
  for key in ('token_embedding.weight', 'shared.weight', 'encoder.embed_tokens.weight'):
    if key in src:
      return int(src.shape(key)[1])
  raise ValueError(f'{wd.text_encoder}: not a umT5 encoder (no token embedding)')


def vae_z_dim(wd: WanDir) -> int:
  """Latent channels of the VAE from metadata only."""
  if wd.layout == 'kvjax':
    return int(_read_json(os.path.join(wd.vae, 'config.json'))['model']['z_dim'])
  if wd.layout == 'diffusers':
    return int(_read_json(os.path.join(wd.vae, 'config.json')).get('z_dim', 16))
  src = _source(wd.vae, ())
  if 'decoder.conv1.weight' not in src:
    raise ValueError(f'{wd.vae}: not a Wan VAE (no decoder.conv1.weight)')
  return int(src.shape('decoder.conv1.weight')[1])


def _to_state(abstract: nnx.State, nested) -> nnx.State:
  nnx.replace_by_pure_dict(abstract, nested)
  return abstract


def load_text_encoder(wd: WanDir, *, text_len: int = 512, dtype: str = 'bfloat16', log=None):
  """The TextEncoder (weights on device) and its tokenizer from a Wan folder."""
  from kvjax import checkpoint as ckpt
  from kvjax import text
  tok = text.tokenizer_lib.load(wd.tokenizer)
  if wd.layout == 'kvjax':
    meta = ckpt.read_meta(wd.text_encoder, text.FORMAT, 'kvjax umT5 checkpoint')
    cfg = text.UMT5Config.from_dict(meta['model']).replace(param_dtype=dtype, compute_dtype=dtype)
    params = ckpt.restore_tree(wd.text_encoder, text.abstract_params(cfg))
  else:
    from ports import umt5 as port
    from ports.sources import PortError
    side = os.path.join(wd.text_encoder, 'config.json') if os.path.isdir(wd.text_encoder) else None
    try:
      cfg, nested = port.convert(_source(wd.text_encoder, ('model', 'pytorch_model')),
                                 side_config=side, dtype=dtype, log=log, finalize=jnp.asarray)
    except PortError as e:
      raise ValueError(str(e)) from None
    params = _to_state(text.abstract_params(cfg), nested)
    del nested
  if len(tok) > cfg.vocab_size:
    raise ValueError(f'{wd.tokenizer}: the tokenizer has {len(tok)} tokens, the encoder '
                     f'{wd.text_encoder} only {cfg.vocab_size}')
  return text.TextEncoder(cfg, params, tok, text_len)


def load_vae(wd: WanDir, *, dtype: str = 'float32', log=None):
  """The VAEDecoder (weights on device) from a Wan folder."""
  from kvjax import checkpoint as ckpt
  from kvjax import vae
  if wd.layout == 'kvjax':
    meta = ckpt.read_meta(wd.vae, vae.FORMAT, 'kvjax Wan VAE checkpoint')
    cfg = vae.VAEConfig.from_dict(meta['model']).replace(param_dtype=dtype, compute_dtype=dtype)
    params = ckpt.restore_tree(wd.vae, vae.abstract_params(cfg))
  else:
    from ports import vae as port
    from ports.sources import PortError
    side = os.path.join(wd.vae, 'config.json') if os.path.isdir(wd.vae) else None
    try:
      cfg, nested = port.convert(_source(wd.vae, ('diffusion_pytorch_model',)), side_config=side,
                                 dtype=dtype, log=log, finalize=jnp.asarray)
    except PortError as e:
      raise ValueError(str(e)) from None
    cfg = cfg.replace(compute_dtype=dtype)
    params = _to_state(vae.abstract_params(cfg), nested)
  return vae.VAEDecoder(cfg, params)


# ---------------------------------------------------------------------------- launcher helpers
def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str] | None:
  """The prompts of a run: ``--prompt`` or one per non-empty line of ``--prompts_file``."""
  if prompt is not None and prompts_file is not None:
    raise ValueError('give --prompt or --prompts_file, not both')
  if prompt is not None:
    if not prompt.strip():
      raise ValueError('--prompt is empty')
    return [prompt]
  if prompts_file is None:
    return None
  if not os.path.isfile(prompts_file):
    raise FileNotFoundError(f'prompts file not found: {prompts_file}')
  try:
    with open(prompts_file, encoding='utf-8') as f:
      prompts = [line.strip() for line in f if line.strip()]
  except UnicodeDecodeError as e:
    raise ValueError(f'prompts file {prompts_file} is not UTF-8 text: {e}') from None
  if not prompts:
    raise ValueError(f'prompts file {prompts_file} holds no prompt')
  return prompts


def validate(path: str, prompts: list[str] | None, *, dit_text_dim: int,
             latent_channels: int) -> WanDir:
  """Checks a --wan_dir for a run before any compute: parts present, sizes matching the DiT, the
  tokenizer loadable. Raises FileNotFoundError / ValueError naming the file and the problem."""
  need = PARTS if prompts else ('vae',)
  wd = inspect(path, need)
  if prompts:
    got = text_dim(wd)
    if got != dit_text_dim:
      raise ValueError(f'--wan_dir {path}: the text encoder {wd.text_encoder} gives {got}-wide '
                       f'states, the DiT expects text_dim={dit_text_dim}')
    from kvjax.text import tokenizer as tokenizer_lib
    tokenizer_lib.load(wd.tokenizer)
  z = vae_z_dim(wd)
  if z != latent_channels:
    raise ValueError(f'--wan_dir {path}: the VAE {wd.vae} decodes {z}-channel latents, the DiT '
                     f'makes {latent_channels}')
  return wd


def encode_prompts(wd: WanDir, prompts: list[str], *, text_len: int, dtype: str,
                   free: bool = True) -> tuple:
  """Text states [B, text_len, dim] float32 of ``prompts`` (encoded once) and timing info.

  With ``free`` the encoder's weights are deleted from device memory afterwards, before the DiT.
  """
  import time
  t0 = time.perf_counter()
  enc = load_text_encoder(wd, text_len=text_len, dtype=dtype)
  t1 = time.perf_counter()
  states = enc.encode(prompts)
  t2 = time.perf_counter()
  if free:
    enc.free()
  return states, dict(text_encoder_load_s=round(t1 - t0, 3), text_encode_s=round(t2 - t1, 3),
                      text_encoder_freed=bool(free), text_len=text_len)


def decode_latents(wd: WanDir, latents, *, block_frames: int, dtype: str = 'float32',
                   reference=None) -> tuple:
  """Decodes sampler latents [B, F, C, h, w] block by block through one VAE stream, and the
  ``reference`` latents (same shape) through a second stream of the same loaded VAE.

  Returns:
    video [B, 1 + 4(F-1), 8h, 8w, 3] float32 in [-1, 1]; the reference's video or None; timing
    info (vae_load_s, vae_decode_s of the method's latents, video_frames, first_block_frames,
    frames_per_latent: video frames per later latent frame).
  """
  import time
  import numpy as np
  t0 = time.perf_counter()
  dec = load_vae(wd, dtype=dtype)
  t1 = time.perf_counter()

  def run(lat):
    stream = dec.stream()
    return np.concatenate([stream.push(lat[:, i:i + block_frames])
                           for i in range(0, lat.shape[1], block_frames)], axis=1)

  video = run(latents)
  t2 = time.perf_counter()
  ref_video = run(reference) if reference is not None else None
  dec.free()
  return video, ref_video, dict(vae_load_s=round(t1 - t0, 3), vae_decode_s=round(t2 - t1, 3),
                                video_frames=int(video.shape[1]),
                                first_block_frames=dec.cfg.num_frames(block_frames),
                                frames_per_latent=dec.cfg.temporal_factor)
