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

import jax
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
