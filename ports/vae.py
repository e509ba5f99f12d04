"""Wan2.1 VAE weights: original ``Wan2.1_VAE.pth`` names <-> diffusers AutoencoderKLWan <-> kvjax.

Only the decoder half is converted (kvjax decodes; it never encodes): the encoder and the
quantisation conv (``encoder.*``, ``conv1.*``) are explicitly ignored. The kvjax table is built
from the VAEConfig, stage by stage, mirroring the flat ``decoder.upsamples.N`` list of the
original code (num_res_blocks + 1 residual blocks, then an upsampler, per stage).
"""

from __future__ import annotations

import re
from typing import Mapping

from ports import engine
from ports.sources import PortError, RenamedSource, TensorSource, config_number, read_json

# Residual block: original Sequential indices <-> diffusers names (both sides share the prefix).
_RES_ORIG_TO_DIFF = {'residual.0.gamma': 'norm1.gamma', 'residual.2.weight': 'conv1.weight',
                     'residual.2.bias': 'conv1.bias', 'residual.3.gamma': 'norm2.gamma',
                     'residual.6.weight': 'conv2.weight', 'residual.6.bias': 'conv2.bias',
                     'shortcut.weight': 'conv_shortcut.weight', 'shortcut.bias': 'conv_shortcut.bias'}
_RES_DIFF_TO_ORIG = {v: k for k, v in _RES_ORIG_TO_DIFF.items()}
_TOP = {'conv1': 'quant_conv', 'conv2': 'post_quant_conv'}
_HALF = {'conv1': 'conv_in', 'head.0.gamma': 'norm_out.gamma', 'head.2': 'conv_out'}
WAN21_RES_BLOCKS = 2


def _split_param(rest: str) -> tuple[str, str]:
  mod, _, leaf = rest.rpartition('.')
  return mod, leaf


def original_key_to_diffusers(key: str, num_res_blocks: int = WAN21_RES_BLOCKS) -> str:
  """One original Wan VAE key -> its diffusers AutoencoderKLWan name (raises on unknown keys)."""
  per_stage = num_res_blocks + 2
  top, _, rest = key.partition('.')
  if top in _TOP and rest in ('weight', 'bias'):
    return f'{_TOP[top]}.{rest}'
  if top not in ('encoder', 'decoder'):
    raise PortError(f'unexpected Wan VAE key {key!r}')
  mod, leaf = _split_param(rest)
  for ours, theirs in _HALF.items():
    if mod == ours or rest == ours:
      return f'{top}.{theirs}' + ('' if rest == ours else f'.{leaf}')
  m = re.match(r'^middle\.(\d)\.(.+)$', rest)
  if m:
    i, inner = int(m.group(1)), m.group(2)
    if i == 1:
      return f'{top}.mid_block.attentions.0.{inner}'
    if i in (0, 2) and inner in _RES_ORIG_TO_DIFF:
      return f'{top}.mid_block.resnets.{i // 2}.{_RES_ORIG_TO_DIFF[inner]}'
  m = re.match(r'^(downsamples|upsamples)\.(\d+)\.(.+)$', rest)
  if m:
    kind, j, inner = m.group(1), int(m.group(2)), m.group(3)
    resample = inner.startswith(('resample.', 'time_conv.'))
    if kind == 'downsamples' and top == 'encoder':
      name = inner if resample else _RES_ORIG_TO_DIFF.get(inner)
      if name:
        return f'encoder.down_blocks.{j}.{name}'
    if kind == 'upsamples' and top == 'decoder':
      b, r = divmod(j, per_stage)
      if resample and r == per_stage - 1:
        return f'decoder.up_blocks.{b}.upsamplers.0.{inner}'
      if not resample and r < per_stage - 1 and inner in _RES_ORIG_TO_DIFF:
        return f'decoder.up_blocks.{b}.resnets.{r}.{_RES_ORIG_TO_DIFF[inner]}'
  raise PortError(f'unexpected Wan VAE key {key!r}')


def diffusers_key_to_original(key: str, num_res_blocks: int = WAN21_RES_BLOCKS) -> str:
  """One diffusers AutoencoderKLWan key -> its original Wan VAE name (raises on unknown keys)."""
  per_stage = num_res_blocks + 2
  inv_top = {v: k for k, v in _TOP.items()}
  top, _, rest = key.partition('.')
  if top in inv_top and rest in ('weight', 'bias'):
    return f'{inv_top[top]}.{rest}'
  if top not in ('encoder', 'decoder'):
    raise PortError(f'unexpected diffusers VAE key {key!r}')
  for ours, theirs in _HALF.items():
    if rest == theirs or rest.startswith(theirs + '.'):
      return f'{top}.{ours}{rest[len(theirs):]}'
  m = re.match(r'^mid_block\.(resnets|attentions)\.(\d)\.(.+)$', rest)
  if m:
    kind, i, inner = m.group(1), int(m.group(2)), m.group(3)
    if kind == 'attentions' and i == 0:
      return f'{top}.middle.1.{inner}'
    if kind == 'resnets' and i in (0, 1) and inner in _RES_DIFF_TO_ORIG:
      return f'{top}.middle.{2 * i}.{_RES_DIFF_TO_ORIG[inner]}'
  m = re.match(r'^down_blocks\.(\d+)\.(.+)$', rest)
  if m and top == 'encoder':
    j, inner = int(m.group(1)), m.group(2)
    if inner.startswith(('resample.', 'time_conv.')):
      return f'encoder.downsamples.{j}.{inner}'
    if inner in _RES_DIFF_TO_ORIG:
      return f'encoder.downsamples.{j}.{_RES_DIFF_TO_ORIG[inner]}'
  m = re.match(r'^up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)$', rest)
  if m and top == 'decoder':
    b, inner = int(m.group(1)), m.group(4)
    if m.group(3) is not None and inner in _RES_DIFF_TO_ORIG and int(m.group(3)) < per_stage - 1:
      return f'decoder.upsamples.{b * per_stage + int(m.group(3))}.{_RES_DIFF_TO_ORIG[inner]}'
    if m.group(3) is None:
      return f'decoder.upsamples.{b * per_stage + per_stage - 1}.{inner}'
  raise PortError(f'unexpected diffusers VAE key {key!r}')


def diffusers_to_original(sd: Mapping, num_res_blocks: int = WAN21_RES_BLOCKS) -> dict:
  return {diffusers_key_to_original(k, num_res_blocks): v for k, v in sd.items()}


def original_to_diffusers(sd: Mapping, num_res_blocks: int = WAN21_RES_BLOCKS) -> dict:
  return {original_key_to_diffusers(k, num_res_blocks): v for k, v in sd.items()}


# ---------------------------------------------------------------------------- kvjax table
def _res(q: str, p: str, cin: int, cout: int) -> dict:
  t = {f'{q}/norm1/scale': (f'{p}.residual.0.gamma', 'gamma3'),
       f'{q}/conv1/kernel': (f'{p}.residual.2.weight', 'conv3d'),
       f'{q}/conv1/bias': (f'{p}.residual.2.bias', 'identity'),
       f'{q}/norm2/scale': (f'{p}.residual.3.gamma', 'gamma3'),
       f'{q}/conv2/kernel': (f'{p}.residual.6.weight', 'conv3d'),
       f'{q}/conv2/bias': (f'{p}.residual.6.bias', 'identity')}
  if cin != cout:
    t[f'{q}/shortcut/kernel'] = (f'{p}.shortcut.weight', 'conv3d')
    t[f'{q}/shortcut/bias'] = (f'{p}.shortcut.bias', 'identity')
  return t


def table(cfg) -> dict[str, tuple[str, str]]:
  """kvjax decoder path -> (original key, transform) for a VAEConfig."""
  d0 = cfg.dims[0]
  t = {'conv2/kernel': ('conv2.weight', 'conv3d'), 'conv2/bias': ('conv2.bias', 'identity'),
       'decoder/conv_in/kernel': ('decoder.conv1.weight', 'conv3d'),
       'decoder/conv_in/bias': ('decoder.conv1.bias', 'identity'),
       'decoder/mid_attn/norm/scale': ('decoder.middle.1.norm.gamma', 'gamma2'),
       'decoder/mid_attn/qkv/kernel': ('decoder.middle.1.to_qkv.weight', 'conv1x1'),
       'decoder/mid_attn/qkv/bias': ('decoder.middle.1.to_qkv.bias', 'identity'),
       'decoder/mid_attn/proj/kernel': ('decoder.middle.1.proj.weight', 'conv1x1'),
       'decoder/mid_attn/proj/bias': ('decoder.middle.1.proj.bias', 'identity'),
       'decoder/head_norm/scale': ('decoder.head.0.gamma', 'gamma3'),
       'decoder/conv_out/kernel': ('decoder.head.2.weight', 'conv3d'),
       'decoder/conv_out/bias': ('decoder.head.2.bias', 'identity')}
  t.update(_res('decoder/mid_res0', 'decoder.middle.0', d0, d0))
  t.update(_res('decoder/mid_res1', 'decoder.middle.2', d0, d0))
  j = 0
  for i, (cin, cout, mode) in enumerate(cfg.stages()):
    for r in range(cfg.num_res_blocks + 1):
      t.update(_res(f'decoder/up{i}/res{r}', f'decoder.upsamples.{j}', cin if r == 0 else cout, cout))
      j += 1
    if mode:
      q, p = f'decoder/up{i}/upsample', f'decoder.upsamples.{j}'
      t[f'{q}/conv/kernel'] = (f'{p}.resample.1.weight', 'conv2d')
      t[f'{q}/conv/bias'] = (f'{p}.resample.1.bias', 'identity')
      if mode == 'upsample3d':
        t[f'{q}/time_conv/kernel'] = (f'{p}.time_conv.weight', 'conv3d')
        t[f'{q}/time_conv/bias'] = (f'{p}.time_conv.bias', 'identity')
      j += 1
  return t


def ignored(key: str) -> bool:
  """The encoder half and the quantisation conv: present in every VAE file, unused by kvjax."""
  return key.startswith('encoder.') or key in ('conv1.weight', 'conv1.bias')


def flavor(keys) -> str | None:
  keys = set(keys)
  if 'decoder.conv1.weight' in keys and 'decoder.head.2.weight' in keys:
    return 'original'
  if 'decoder.conv_in.weight' in keys and 'post_quant_conv.weight' in keys:
    return 'diffusers'
  return None


def params_to_original(cfg, params: Mapping) -> dict:
  return engine.invert(table(cfg), params)


# ---------------------------------------------------------------------------- whole checkpoints
def config_from_diffusers(side: Mapping, path: str) -> dict:
  """VAEConfig fields from a diffusers AutoencoderKLWan config.json; rejects other VAEs."""
  if side.get('is_residual') or side.get('patch_size') not in (None, 1):
    raise PortError(f'{path}: a Wan2.2-style VAE (is_residual={side.get("is_residual")}, '
                    f'patch_size={side.get("patch_size")}); kvjax decodes the Wan2.1 VAE')
  if side.get('attn_scales'):
    raise PortError(f'{path}: attn_scales={side["attn_scales"]} is not supported (Wan2.1 has none)')
  out = {}
  dim = (config_number(side, 'decoder_base_dim', path, int)
         or config_number(side, 'base_dim', path, int))
  if dim is not None:
    out['dim'] = dim
  for ours, theirs in (('z_dim', 'z_dim'), ('dim_mult', 'dim_mult'),
                       ('num_res_blocks', 'num_res_blocks'), ('out_channels', 'out_channels'),
                       ('temporal_downsample', 'temperal_downsample'),
                       ('latents_mean', 'latents_mean'), ('latents_std', 'latents_std')):
    if side.get(theirs) is not None:
      out[ours] = side[theirs]
  return out


def infer_config(source: TensorSource, side: Mapping | None = None, side_path: str = '',
                 dtype: str = 'float32'):
  """VAEConfig from original-named shapes (+ a diffusers config.json, if any)."""
  from kvjax.vae import LATENTS_MEAN, LATENTS_STD, VAEConfig
  for key in ('decoder.conv1.weight', 'decoder.head.2.weight'):
    if key not in source:
      raise PortError(f'{source.path}: missing key {key!r}: cannot infer the VAE config')
  ci, ho = source.shape('decoder.conv1.weight'), source.shape('decoder.head.2.weight')
  if len(ci) != 5 or len(ho) != 5:
    raise PortError(f'{source.path}: decoder convolutions are not 3-D (shapes {ci}, {ho})')
  fields = dict(z_dim=ci[1], dim=ho[1], out_channels=ho[0])
  if side:
    given = config_from_diffusers(side, side_path)
    for k in ('z_dim', 'dim', 'out_channels'):
      if k in given and config_number(given, k, side_path, int) != fields[k]:
        raise PortError(f'{side_path}: says {k}={given[k]}, the tensors give {fields[k]}')
    fields.update(given)
  if 'latents_mean' not in fields:
    if fields['z_dim'] != len(LATENTS_MEAN):
      raise PortError(f'{source.path}: a {fields["z_dim"]}-channel VAE; the published Wan2.1 '
                      f'latent mean/std have {len(LATENTS_MEAN)} channels (convert a diffusers '
                      'folder whose config.json gives latents_mean/latents_std)')
    fields.update(latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
  try:
    return VAEConfig.from_dict(dict(fields, param_dtype=dtype, compute_dtype='float32'))
  except ValueError as e:
    raise PortError(f'{side_path or source.path}: {e}') from None


def as_original(source: TensorSource, num_res_blocks: int = WAN21_RES_BLOCKS) -> TensorSource:
  kind = flavor(source.keys())
  if kind is None:
    raise PortError(f'{source.path}: not a Wan VAE state dict (no decoder.conv1/decoder.conv_in '
                    f'keys; keys like {sorted(source.keys())[:4]})')
  if kind == 'original':
    return source
  return RenamedSource(source, {diffusers_key_to_original(k, num_res_blocks): k
                                for k in source.keys()})


def convert(source: TensorSource, *, side_config: str | None = None, dtype: str = 'float32',
            log=None, finalize=None):
  """A Wan VAE checkpoint (original or diffusers names) -> (VAEConfig, nested decoder params)."""
  from kvjax.model import as_dtype
  from kvjax.vae import abstract_params
  from flax import nnx
  side = read_json(side_config) if side_config else {}
  if side and side.get('_class_name') not in (None, 'AutoencoderKLWan'):
    raise PortError(f'{side_config}: _class_name={side.get("_class_name")!r}, not AutoencoderKLWan')
  src = as_original(source, config_number(side, 'num_res_blocks', side_config, int,
                                          WAN21_RES_BLOCKS))
  cfg = infer_config(src, side, side_config or '', dtype)
  if log:
    log(f'{source.path}: Wan VAE dim={cfg.dim} z_dim={cfg.z_dim} ({len(src)} tensors; the '
        f'encoder is ignored) -> {dtype}')
  expected = nnx.to_pure_dict(abstract_params(cfg))
  params = engine.convert(src, table(cfg), expected, dtype=as_dtype(dtype), ignore=ignored,
                          finalize=finalize)
  return cfg, params
