"""Wan2.1 DiT weights: PyTorch key table <-> kvjax parameter tree.

The table is declarative: every kvjax leaf names the original Wan key it comes from (``{i}`` =
layer index; per-layer tensors are stacked along a new leading axis for the scanned blocks) and
a named transform. diffusers names are mapped onto original names first. Conversions check that
every source key is consumed (or explicitly ignored) and every destination leaf is written
exactly once with the expected shape; anything else raises naming the key.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

# ------------------------------------------------------------------ transforms
# PyTorch layout -> kvjax layout (and back).
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    'identity': (lambda a: a, lambda a: a),
    'linear': (lambda a: a.T, lambda a: a.T),                       # [out, in] <-> [in, out]
    'conv3d': (lambda a: a.transpose(2, 3, 4, 1, 0),                # [o, i, t, h, w] <-> [t, h, w, i, o]
               lambda a: a.transpose(4, 3, 0, 1, 2)),
}

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


class PortError(ValueError):
  """A checkpoint does not match the expected key table (the message names the key)."""


def diffusers_to_original(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a diffusers WanTransformer3DModel state dict to original Wan key names."""
  out = {}
  for key, val in sd.items():
    m = _BLOCK_RE.match(key)
    if m:
      suffix = DIFFUSERS_BLOCK.get(m.group(2))
      if suffix is None:
        raise PortError(f'unexpected diffusers key {key!r} (not a Wan2.1 T2V block parameter)')
      out[f'blocks.{m.group(1)}.{suffix}'] = val
    elif key in DIFFUSERS_GLOBAL:
      out[DIFFUSERS_GLOBAL[key]] = val
    else:
      raise PortError(f'unexpected diffusers key {key!r} (not a Wan2.1 T2V parameter)')
  return out


def original_to_diffusers(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  inv_g = {v: k for k, v in DIFFUSERS_GLOBAL.items()}
  inv_b = {v: k for k, v in DIFFUSERS_BLOCK.items()}
  out = {}
  for key, val in sd.items():
    m = _BLOCK_RE.match(key)
    out[f'blocks.{m.group(1)}.{inv_b[m.group(2)]}' if m else inv_g[key]] = val
  return out


def num_layers_of(sd: Mapping[str, np.ndarray]) -> int:
  idx = {int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))}
  if not idx:
    raise PortError('no transformer blocks (keys "blocks.N....") in the state dict')
  n = max(idx) + 1
  missing = sorted(set(range(n)) - idx)
  if missing:
    raise PortError(f'blocks {missing} are missing from the state dict (found up to {n - 1})')
  return n


def infer_config(sd: Mapping[str, np.ndarray], num_heads: int) -> dict:
  """Model config fields from original-named tensor shapes (heads cannot be inferred)."""
  def shape(key):
    if key not in sd:
      raise PortError(f'missing key {key!r}: cannot infer the model config')
    return tuple(sd[key].shape)
  pe = shape('patch_embedding.weight')
  if len(pe) != 5:
    raise PortError(f'patch_embedding.weight has shape {pe}, expected [dim, in, t, h, w]')
  dim, in_dim = pe[0], pe[1]
  if dim % num_heads:
    raise PortError(f'dim {dim} is not divisible by num_heads={num_heads}')
  return dict(dim=dim, in_dim=in_dim, patch_size=tuple(pe[2:]),
              ffn_dim=shape('blocks.0.ffn.0.weight')[0],
              freq_dim=shape('time_embedding.0.weight')[1],
              text_dim=shape('text_embedding.0.weight')[1],
              out_dim=shape('head.head.weight')[0] // int(np.prod(pe[2:])),
              num_layers=num_layers_of(sd), num_heads=num_heads)


def _set(tree: dict, path: str, val):
  *parents, leaf = path.split('/')
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = val


def _get(tree: Mapping, path: str):
  for p in path.split('/'):
    tree = tree[p]
  return tree


def flat_paths(tree: Mapping, prefix: str = '') -> dict[str, tuple]:
  """'/'-joined path -> shape of every leaf of a nested mapping."""
  out = {}
  for k, v in tree.items():
    p = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(flat_paths(v, p + '/'))
    else:
      out[p] = tuple(v.shape)
  return out


def original_to_params(sd: Mapping[str, np.ndarray], expected: Mapping,
                       ignore: Callable[[str], bool] = lambda k: False,
                       dtype=None) -> dict:
  """Builds the kvjax parameter tree from an original-named state dict.

  Args:
    sd: original Wan key -> array (numpy; any float dtype).
    expected: nested mapping of the model's parameters (arrays or ShapeDtypeStructs) giving
      the destination paths and shapes.
    ignore: predicate of source keys that may be present and are dropped.
    dtype: cast every tensor to this dtype (None: keep).
  Returns:
    Nested dict of numpy arrays with exactly the structure of ``expected``.
  Raises:
    PortError naming the first missing/unexpected key or wrong shape.
  """
  want = flat_paths(expected)
  out: dict = {}
  consumed: set[str] = set()
  for path, shp in want.items():
    if path in GLOBAL_KEYS:
      key, tf = GLOBAL_KEYS[path]
      val = _take(sd, key, consumed)
      val = TRANSFORMS[tf][0](val)
    elif path in LAYER_KEYS:
      pattern, tf = LAYER_KEYS[path]
      layers = []
      for i in range(shp[0]):
        key = pattern.format(i=i)
        t = TRANSFORMS[tf][0](_take(sd, key, consumed))
        if tuple(t.shape) != shp[1:]:
          raise PortError(f'{key} -> {path}[{i}]: shape {tuple(t.shape)} after transform, '
                          f'expected {shp[1:]} (wrong model size or a transposed tensor?)')
        layers.append(t)
      val = np.stack(layers)
    else:
      raise PortError(f'kvjax parameter {path!r} has no entry in the key table')
    if tuple(val.shape) != shp:
      raise PortError(f'{path}: source tensor gives shape {tuple(val.shape)} after transform, '
                      f'expected {shp} (wrong model size or a transposed tensor?)')
    if dtype is not None:
      val = val.astype(dtype)
    _set(out, path, val)
  extra = sorted(k for k in sd if k not in consumed and not ignore(k))
  if extra:
    raise PortError(f'unexpected source key(s) {extra[:8]}{" ..." if len(extra) > 8 else ""} '
                    f'(a different model? expected {len(consumed)} keys of a Wan2.1 T2V DiT)')
  return out


def _take(sd, key, consumed):
  if key not in sd:
    raise PortError(f'missing key {key!r} in the source state dict')
  if key in consumed:
    raise PortError(f'key {key!r} consumed twice')
  consumed.add(key)
  return np.asarray(sd[key])


def params_to_original(params: Mapping) -> dict[str, np.ndarray]:
  """Inverse of ``original_to_params``: nested kvjax params -> original Wan state dict (numpy)."""
  out = {}
  for path in flat_paths(params):
    val = np.asarray(_get(params, path))
    if path in GLOBAL_KEYS:
      key, tf = GLOBAL_KEYS[path]
      out[key] = TRANSFORMS[tf][1](val)
    elif path in LAYER_KEYS:
      pattern, tf = LAYER_KEYS[path]
      for i in range(val.shape[0]):
        out[pattern.format(i=i)] = TRANSFORMS[tf][1](val[i])
    else:
      raise PortError(f'kvjax parameter {path!r} has no entry in the key table')
  return out
