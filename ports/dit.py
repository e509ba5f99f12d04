"""Wan2.1 DiT weights: PyTorch key table <-> kvjax parameter tree.

The table is declarative: every kvjax leaf names the original Wan key it comes from (``{i}`` =
layer index; per-layer tensors are stacked along a new leading axis for the scanned blocks) and
a named transform. diffusers names are mapped onto original names first. Conversions check that
every source key is consumed (or explicitly ignored) and every destination leaf is written
exactly once with the expected shape; anything else raises naming the key.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Mapping

import numpy as np

from kvjax.model import sizes
from ports import engine
from ports.engine import TRANSFORMS, flat_paths  # noqa: F401  (re-exported)
from ports.sources import PortError, RenamedSource, TensorSource, config_number, read_json

__all__ = ['PortError', 'TRANSFORMS', 'TABLE', 'GLOBAL_KEYS', 'LAYER_KEYS', 'KNOWN_SIZES', 'flat_paths',
           'original_to_params', 'params_to_original', 'diffusers_to_original',
           'original_to_diffusers', 'diffusers_key_to_original', 'infer_config', 'num_layers_of',
           'convert', 'resolve_heads', 'as_original', 'check_t2v', 'flavor']

# kvjax path -> (original key, transform). Paths are '/'-joined nnx State paths.
GLOBAL_KEYS: dict[str, tuple[str, str]] = {
    'patch_embedding': ('patch_embedding.weight', 'conv3d'),
    'patch_bias': ('patch_embedding.bias', 'identity'),
    'text_fc1/kernel': ('text_embedding.0.weight', 'linear'),
    'text_fc1/bias': ('text_embedding.0.bias', 'identity'),
    'text_fc2/kernel': ('text_embedding.2.weight', 'linear'),
    'text_fc2/bias': ('text_embedding.2.bias', 'identity'),
    'time_fc1/kernel': ('time_embedding.0.weight', 'linear'),
    'time_fc1/bias': ('time_embedding.0.bias', 'identity'),
    'time_fc2/kernel': ('time_embedding.2.weight', 'linear'),
    'time_fc2/bias': ('time_embedding.2.bias', 'identity'),
    'time_proj/kernel': ('time_projection.1.weight', 'linear'),
    'time_proj/bias': ('time_projection.1.bias', 'identity'),
    'head/head/kernel': ('head.head.weight', 'linear'),
    'head/head/bias': ('head.head.bias', 'identity'),
    'head/modulation': ('head.modulation', 'identity'),
}


def _layer_keys() -> dict[str, tuple[str, str]]:
  keys = {'blocks/modulation': ('blocks.{i}.modulation', 'identity'),
          'blocks/norm3/scale': ('blocks.{i}.norm3.weight', 'identity'),
          'blocks/norm3/bias': ('blocks.{i}.norm3.bias', 'identity')}
  for attn in ('self_attn', 'cross_attn'):
    for p in 'qkvo':
      keys[f'blocks/{attn}/{p}/kernel'] = (f'blocks.{{i}}.{attn}.{p}.weight', 'linear')
      keys[f'blocks/{attn}/{p}/bias'] = (f'blocks.{{i}}.{attn}.{p}.bias', 'identity')
    for p in 'qk':
      keys[f'blocks/{attn}/norm_{p}/scale'] = (f'blocks.{{i}}.{attn}.norm_{p}.weight', 'identity')
  for ours, theirs in (('fc1', '0'), ('fc2', '2')):
    keys[f'blocks/ffn/{ours}/kernel'] = (f'blocks.{{i}}.ffn.{theirs}.weight', 'linear')
    keys[f'blocks/ffn/{ours}/bias'] = (f'blocks.{{i}}.ffn.{theirs}.bias', 'identity')
  return keys


LAYER_KEYS = _layer_keys()

# diffusers WanTransformer3DModel name -> original Wan name (per-block names after 'blocks.{i}.').
DIFFUSERS_GLOBAL = {
    'patch_embedding.weight': 'patch_embedding.weight',
    'patch_embedding.bias': 'patch_embedding.bias',
    'condition_embedder.text_embedder.linear_1.weight': 'text_embedding.0.weight',
    'condition_embedder.text_embedder.linear_1.bias': 'text_embedding.0.bias',
    'condition_embedder.text_embedder.linear_2.weight': 'text_embedding.2.weight',
    'condition_embedder.text_embedder.linear_2.bias': 'text_embedding.2.bias',
    'condition_embedder.time_embedder.linear_1.weight': 'time_embedding.0.weight',
    'condition_embedder.time_embedder.linear_1.bias': 'time_embedding.0.bias',
    'condition_embedder.time_embedder.linear_2.weight': 'time_embedding.2.weight',
    'condition_embedder.time_embedder.linear_2.bias': 'time_embedding.2.bias',
    'condition_embedder.time_proj.weight': 'time_projection.1.weight',
    'condition_embedder.time_proj.bias': 'time_projection.1.bias',
    'proj_out.weight': 'head.head.weight',
    'proj_out.bias': 'head.head.bias',
    'scale_shift_table': 'head.modulation',
}


def _diffusers_block() -> dict[str, str]:
  m = {'scale_shift_table': 'modulation', 'norm2.weight': 'norm3.weight',
       'norm2.bias': 'norm3.bias', 'ffn.net.0.proj.weight': 'ffn.0.weight',
       'ffn.net.0.proj.bias': 'ffn.0.bias', 'ffn.net.2.weight': 'ffn.2.weight',
       'ffn.net.2.bias': 'ffn.2.bias'}
  for d, o in (('attn1', 'self_attn'), ('attn2', 'cross_attn')):
    for p in 'qkv':
      for w in ('weight', 'bias'):
        m[f'{d}.to_{p}.{w}'] = f'{o}.{p}.{w}'
    for w in ('weight', 'bias'):
      m[f'{d}.to_out.0.{w}'] = f'{o}.o.{w}'
    for p in 'qk':
      m[f'{d}.norm_{p}.weight'] = f'{o}.norm_{p}.weight'
  return m


DIFFUSERS_BLOCK = _diffusers_block()
_BLOCK_RE = re.compile(r'^blocks\.(\d+)\.(.+)$')


def diffusers_key_to_original(key: str) -> str:
  """One diffusers WanTransformer3DModel key -> its original Wan name (raises on others)."""
  m = _BLOCK_RE.match(key)
  if m:
    suffix = DIFFUSERS_BLOCK.get(m.group(2))
    if suffix is None:
      raise PortError(f'unexpected diffusers key {key!r} (not a Wan2.1 T2V block parameter)')
    return f'blocks.{m.group(1)}.{suffix}'
  if key in DIFFUSERS_GLOBAL:
    return DIFFUSERS_GLOBAL[key]
  raise PortError(f'unexpected diffusers key {key!r} (not a Wan2.1 T2V parameter)')


def diffusers_to_original(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a diffusers WanTransformer3DModel state dict to original Wan key names."""
  return {diffusers_key_to_original(k): v for k, v in sd.items()}


def original_to_diffusers(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  inv_g = {v: k for k, v in DIFFUSERS_GLOBAL.items()}
  inv_b = {v: k for k, v in DIFFUSERS_BLOCK.items()}
  out = {}
  for key, val in sd.items():
    m = _BLOCK_RE.match(key)
    out[f'blocks.{m.group(1)}.{inv_b[m.group(2)]}' if m else inv_g[key]] = val
  return out


TABLE: dict[str, tuple[str, str]] = {**GLOBAL_KEYS, **LAYER_KEYS}
NUM_GLOBAL_KEYS, KEYS_PER_BLOCK = 15, 27

# Released Wan2.1 text-to-video DiTs, by width: what shapes cannot tell (heads) and a signature.
KNOWN_SIZES = {
    sizes.SIZES[key]['dim']: dict(name=name, **{f: sizes.SIZES[key][f]
                                                for f in ('num_heads', 'num_layers', 'ffn_dim')})
    for key, name in sizes.RELEASED.items()}
# The Self-Forcing generator; other released sizes need allow_any_size.
SUPPORTED_DIM = sizes.SIZES[sizes.DEFAULT]['dim']
T2V_IN_DIM = 16


def num_layers_of(sd) -> int:
  """Number of transformer blocks (keys ``blocks.N.``); raises on gaps or none."""
  keys = sd.keys() if hasattr(sd, 'keys') else sd
  n = engine.count_layers(keys, _BLOCK_RE, 'blocks') if any(_BLOCK_RE.match(k) for k in keys) else 0
  if not n:
    raise PortError('no transformer blocks (keys "blocks.N....") in the state dict')
  return n


def _shape_of(sd, key: str) -> tuple:
  if isinstance(sd, TensorSource):
    if key not in sd:
      raise PortError(f'{sd.path}: missing key {key!r}: cannot infer the model config')
    return tuple(sd.shape(key))
  if key not in sd:
    raise PortError(f'missing key {key!r}: cannot infer the model config')
  return tuple(np.shape(sd[key]))


def infer_config(sd, num_heads: int) -> dict:
  """Model config fields from original-named tensor shapes (heads cannot be inferred).

  Args:
    sd: a mapping of arrays or a TensorSource, with original Wan key names.
    num_heads: attention heads (from a config.json, the known sizes or the user).
  """
  pe = _shape_of(sd, 'patch_embedding.weight')
  if len(pe) != 5:
    raise PortError(f'patch_embedding.weight has shape {pe}, expected [dim, in, t, h, w]')
  dim, in_dim = pe[0], pe[1]
  where = getattr(sd, 'path', 'state dict')
  if dim % num_heads:
    raise PortError(f'{where}: dim {dim} is not divisible by num_heads={num_heads}')
  for key, axis in (('blocks.0.ffn.0.weight', 1), ('text_embedding.0.weight', 0),
                    ('time_embedding.0.weight', 0), ('head.head.weight', 1)):
    s = _shape_of(sd, key)
    if len(s) != 2 or s[axis] != dim:
      raise PortError(f'{where}: {key} has shape {list(s)}; a Linear of a dim-{dim} model needs '
                      f'{"[*, dim]" if axis else "[dim, *]"} (a transposed tensor or another model?)')
  return dict(dim=dim, in_dim=in_dim, patch_size=tuple(pe[2:]),
              ffn_dim=_shape_of(sd, 'blocks.0.ffn.0.weight')[0],
              freq_dim=_shape_of(sd, 'time_embedding.0.weight')[1],
              text_dim=_shape_of(sd, 'text_embedding.0.weight')[1],
              out_dim=_shape_of(sd, 'head.head.weight')[0] // int(np.prod(pe[2:])),
              num_layers=num_layers_of(sd), num_heads=num_heads)


def original_to_params(sd, expected: Mapping, ignore: Callable[[str], bool] = lambda k: False,
                       dtype=None) -> dict:
  """Builds the kvjax parameter tree from an original-named state dict (or TensorSource).

  Args:
    sd: original Wan key -> array (numpy; any float dtype), or a TensorSource.
    expected: nested mapping of the model's parameters (arrays or ShapeDtypeStructs) giving
      the destination paths and shapes.
    ignore: predicate of source keys that may be present and are dropped.
    dtype: cast every tensor to this dtype (None: the dtype of the leaf in ``expected``).
  Returns:
    Nested dict of numpy arrays with exactly the structure of ``expected``.
  Raises:
    PortError naming the first missing/unexpected key or wrong shape.
  """
  return engine.convert(sd, TABLE, expected, dtype=dtype, ignore=ignore)


def params_to_original(params: Mapping) -> dict[str, np.ndarray]:
  """Inverse of ``original_to_params``: nested kvjax params -> original Wan state dict (numpy)."""
  return engine.invert(TABLE, params)


# The helpers below predate ports.engine; kept for callers and tests.
_get = engine.get_path
_set = engine.set_path


# ---------------------------------------------------------------------------- whole checkpoints
I2V_MARKERS = ('img_emb.', '.k_img.', '.v_img.', '.norm_k_img.', 'condition_embedder.image_embedder.',
               '.add_k_proj.', '.add_v_proj.', '.norm_added_k.')


def flavor(keys) -> str | None:
  """'original' | 'diffusers' key names of a DiT state dict, or None if it is not a Wan DiT."""
  keys = set(keys)
  if 'patch_embedding.weight' in keys and any(k.startswith('blocks.') for k in keys):
    if 'condition_embedder.time_proj.weight' in keys or any('.attn1.' in k for k in keys):
      return 'diffusers'
    return 'original'
  return None


def check_t2v(source: TensorSource) -> None:
  """Raises for image-to-video (I2V) or other-input DiTs, naming the file and the evidence."""
  i2v = sorted(k for k in source.keys() if any(m in k for m in I2V_MARKERS))
  if i2v:
    raise PortError(f'{source.path}: an image-to-video (I2V) Wan DiT (keys like {i2v[:3]}); '
                    'kvjax runs the text-to-video Self-Forcing model (Wan2.1-T2V-1.3B)')
  if 'patch_embedding.weight' in source:
    pe = source.shape('patch_embedding.weight')
    if len(pe) == 5 and pe[1] != T2V_IN_DIM:
      raise PortError(f'{source.path}: the patch embedding takes {pe[1]} latent channels; a '
                      f'Wan2.1 T2V DiT takes {T2V_IN_DIM} (an I2V or other model?)')


def as_original(source: TensorSource) -> TensorSource:
  """The source under original Wan names (diffusers names are renamed key by key)."""
  kind = flavor(source.keys())
  if kind is None:
    raise PortError(f'{source.path}: not a Wan DiT state dict (no patch_embedding.weight and '
                    f'blocks.N.* keys; keys like {sorted(source.keys())[:4]})')
  check_t2v(source)
  if kind == 'original':
    return source
  return RenamedSource(source, {diffusers_key_to_original(k): k for k in source.keys()})


def heads_from_config(cfg: Mapping, path: str) -> int | None:
  """num_heads from an original (``num_heads``) or diffusers (``num_attention_heads``) config."""
  for key in ('num_heads', 'num_attention_heads'):
    if key in cfg:
      heads = config_number(cfg, key, path, int)
      if heads is not None and heads <= 0:
        raise PortError(f'{path}: {key}={cfg[key]!r} is not a positive integer')
      return heads
  return None


def check_side_config(cfg: Mapping, fields: Mapping, path: str) -> None:
  """Checks a config.json found beside the weights against the shapes; raises on conflicts."""
  if str(cfg.get('model_type', 't2v')).lower() not in ('t2v',):
    raise PortError(f'{path}: model_type={cfg["model_type"]!r}; kvjax runs a text-to-video (t2v) DiT')
  if cfg.get('image_dim') or cfg.get('added_kv_proj_dim'):
    raise PortError(f'{path}: an image-to-video config (image_dim={cfg.get("image_dim")}); '
                    'kvjax runs the text-to-video model')
  dim = fields['dim']
  num = lambda *keys: next((config_number(cfg, k, path, int) for k in keys if k in cfg), None)
  pairs = dict(dim=num('dim'), ffn_dim=num('ffn_dim'), freq_dim=num('freq_dim'),
               num_layers=num('num_layers'), in_dim=num('in_dim', 'in_channels'),
               out_dim=num('out_dim', 'out_channels'), text_dim=num('text_dim'))
  head_dim, heads = num('attention_head_dim'), num('num_attention_heads')
  if head_dim is not None and heads is not None:
    pairs['dim'] = head_dim * heads
  for name, val in pairs.items():
    if val is not None and val != int(fields[name]):
      raise PortError(f'{path}: says {name}={val}, but the tensors give {fields[name]} '
                      f'(config.json of another model? dim={dim})')


def resolve_heads(source: TensorSource, num_heads: int | None, side_config: str | None,
                  allow_any_size: bool = False) -> tuple[int, str]:
  """The number of heads and where it came from: --num_heads, config.json, or the known sizes.

  Raises PortError when it cannot be determined (never guessed), when the sources disagree, or
  for a released model other than the 1.3B unless ``allow_any_size``.
  """
  if num_heads is not None and num_heads <= 0:
    raise PortError(f'--num_heads={num_heads}: must be a positive integer')
  dim = source.shape('patch_embedding.weight')[0] if 'patch_embedding.weight' in source else None
  known = KNOWN_SIZES.get(dim)
  if known and dim != SUPPORTED_DIM and not allow_any_size:
    raise PortError(f'{source.path}: a {known["name"]} DiT (dim {dim}, '
                    f'{num_layers_of(source.keys())} layers); kvjax runs the Self-Forcing '
                    f'{KNOWN_SIZES[SUPPORTED_DIM]["name"]} generator (dim {SUPPORTED_DIM}). '
                    'Pass --allow_any_size to convert it anyway.')
  from_cfg = None
  if side_config is not None:
    from_cfg = heads_from_config(read_json(side_config), side_config)
  candidates = [(num_heads, '--num_heads'), (from_cfg, side_config),
                (known['num_heads'] if known else None, f'the known {known["name"]} size' if known else '')]
  given = [(h, w) for h, w in candidates if h is not None]
  if not given:
    raise PortError(f'{source.path}: cannot tell the number of attention heads of a dim-{dim} '
                    'DiT (not a released Wan size, and no config.json beside it): pass --num_heads')
  for h, w in given[1:]:
    if h != given[0][0]:
      raise PortError(f'{source.path}: num_heads={given[0][0]} ({given[0][1]}) contradicts '
                      f'num_heads={h} ({w})')
  return given[0]


def side_config_path(src: str) -> str | None:
  """config.json in the source folder (or beside the source file), if any."""
  folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
  path = os.path.join(folder, 'config.json')
  return path if os.path.isfile(path) else None


def convert(source: TensorSource, *, num_heads: int | None = None, side_config: str | None = None,
            dtype: str = 'bfloat16', allow_any_size: bool = False, text_len: int | None = None,
            log=None, finalize=None):
  """A whole DiT checkpoint -> (WanConfig, nested numpy params), streamed layer by layer.

  Args:
    source: original- or diffusers-named DiT tensors.
    num_heads / side_config: see ``resolve_heads``.
    dtype: 'bfloat16' | 'float32', the stored parameter dtype.
    allow_any_size: convert released sizes other than the 1.3B (e.g. 14B).
    text_len: the text length (default: config.json's ``text_len`` or 512).
    finalize: applied to each converted leaf (see ``engine.convert``).
  """
  from kvjax import checkpoint as ckpt
  from kvjax.model import WanConfig, as_dtype
  src = as_original(source)
  side = read_json(side_config) if side_config else {}
  if side:
    check_side_config(side, infer_config(src, 1), side_config)
  heads, origin = resolve_heads(src, num_heads, side_config, allow_any_size)
  fields = infer_config(src, heads)
  if fields['in_dim'] != T2V_IN_DIM:
    raise PortError(f'{source.path}: in_dim {fields["in_dim"]} is not a T2V DiT')
  cfg = WanConfig.from_dict(dict(
      fields, text_len=int(text_len or config_number(side, 'text_len', side_config, int, 512)),
      eps=config_number(side, 'eps', side_config, float, 1e-6), param_dtype=dtype,
      compute_dtype='bfloat16'))
  if log:
    log(f'{source.path}: Wan DiT dim={cfg.dim} layers={cfg.num_layers} heads={cfg.num_heads} '
        f'(heads from {origin}), {len(src)} tensors -> {dtype}')
  from flax import nnx
  expected = nnx.to_pure_dict(ckpt.abstract_params(cfg))
  params = engine.convert(src, TABLE, expected, dtype=as_dtype(dtype),
                          finalize=finalize)
  return cfg, params
