"""Model parameters: random init, abstract shapes, and the kvjax checkpoint format.

A kvjax checkpoint directory holds ``config.json`` (the WanConfig fields plus a ``format``
marker) and ``params/`` (an orbax StandardCheckpointer tree of the parameters, layer-stacked).
``ports.convert`` writes the same format from PyTorch checkpoints.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.model import WanConfig, WanDiT

FORMAT = 'kvjax.wan_dit.v1'


def graphdef(cfg: WanConfig):
  return nnx.graphdef(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))


def abstract_params(cfg: WanConfig) -> nnx.State:
  """ShapeDtypeStruct parameters of the model (nothing allocated)."""
  return nnx.state(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))


@functools.lru_cache(maxsize=8)
def _init_fn(cfg: WanConfig):
  return jax.jit(lambda key: nnx.state(WanDiT(cfg, rngs=nnx.Rngs(key))))


def init_params(cfg: WanConfig, seed: int = 0) -> nnx.State:
  """Random parameters (fixed by ``seed``), created on device by one jitted init."""
  return _init_fn(cfg)(jax.random.key(seed))


def params_from_nested(cfg: WanConfig, nested: Mapping) -> nnx.State:
  """nnx.State from a nested mapping of arrays with exactly the model's structure."""
  state = abstract_params(cfg)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a), dict(nested)))
  return state


def to_nested(params: nnx.State) -> dict:
  """Pure nested dict of numpy arrays (for ports and the torch reference)."""
  return jax.tree.map(np.asarray, nnx.to_pure_dict(params))


def cast(params: nnx.State, dtype) -> nnx.State:
  return jax.tree.map(lambda a: a.astype(dtype), params)


def save(directory: str, cfg: WanConfig, params: nnx.State, extra: Mapping[str, Any] | None = None):
  """Writes config.json + params/ into ``directory`` (which must not exist yet)."""
  write_tree(directory, dict(format=FORMAT, model=cfg.to_dict(), **(extra or {})),
             nnx.to_pure_dict(params))


def read_config(directory: str) -> WanConfig:
  """Reads and validates ``directory/config.json``."""
  return WanConfig.from_dict(read_meta(directory, FORMAT, 'kvjax DiT checkpoint')['model'])


def load(directory: str, param_dtype=None) -> tuple[WanConfig, nnx.State]:
  """Loads a checkpoint written by ``save`` (or ports.convert); shapes are checked by orbax."""
  cfg = read_config(directory)
  if param_dtype is not None:
    cfg = cfg.replace(param_dtype=param_dtype)
  return cfg, restore_tree(directory, abstract_params(cfg))


# ---------------------------------------------------------------------------- any kvjax checkpoint
# The same layout serves every converted model (DiT, umT5 encoder, VAE decoder): config.json
# with a ``format`` marker and the model config, and params/ holding the nnx pure-dict tree.
def write_tree(directory: str, meta: Mapping[str, Any], tree: Mapping) -> None:
  """Writes ``meta`` as config.json and ``tree`` (numpy or jax leaves) with orbax.

  ``directory`` must not exist yet. The arrays are written uncompressed and synchronously: with
  compression, orbax holds compressed copies of (nearly) the whole tree in memory until the write
  ends (+0.8x the weights, measured), and weights hardly compress. ``restore_tree`` (orbax's
  StandardCheckpointer) reads either form.
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f'checkpoint directory already exists: {directory}')
  os.makedirs(directory)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
    ckptr.save(os.path.join(directory, 'params'), args=ocp.args.PyTreeSave(dict(tree)))
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(dict(meta), f, indent=2)


def read_meta(directory: str, fmt: str, what: str) -> dict:
  """Reads ``directory/config.json`` and checks its ``format`` is ``fmt``; errors name the file."""
  path = os.path.join(directory, 'config.json')
  if os.path.isfile(directory):
    raise ValueError(f'{directory} is a file, not a converted kvjax checkpoint folder; convert it '
                     f'first: python -m ports.convert --src={directory} --dst=DIR')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'checkpoint directory not found: {directory}')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory} is not a kvjax checkpoint: no config.json '
                            '(convert PyTorch checkpoints with python -m ports.convert)')
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from None
  if not isinstance(meta, dict) or meta.get('format') != fmt or 'model' not in meta:
    got = meta.get('format') if isinstance(meta, dict) else None
    raise ValueError(f'{path}: not a {what} (format={got!r}, expected {fmt!r})')
  return meta


def verify_tree(directory: str, target: nnx.State) -> None:
  """Checks params/ against the abstract ``target`` from orbax's metadata alone (no array is
  read): the same parameter names and shapes. Raises ValueError naming the first mismatch."""
  import orbax.checkpoint as ocp
  pdir = os.path.join(os.path.abspath(directory), 'params')
  if not os.path.isdir(pdir):
    raise FileNotFoundError(f'{directory}: missing params/ (incomplete or corrupt checkpoint)')
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(pdir).item_metadata
    stored = {jax.tree_util.keystr(k): tuple(v.shape)
              for k, v in jax.tree_util.tree_leaves_with_path(meta.tree)}
  except Exception as e:  # orbax raises many types; name the folder
    raise ValueError(f'{directory}: unreadable parameter metadata ({type(e).__name__}); '
                     'incomplete or corrupt checkpoint') from None
  want = {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(target))}
  for name in sorted(set(want) | set(stored)):
    if name not in stored:
      raise ValueError(f'{directory}: parameter {name} missing (config.json does not match '
                       'the weights)')
    if name not in want:
      raise ValueError(f'{directory}: unexpected parameter {name} (config.json does not match '
                       'the weights)')
    if want[name] != stored[name]:
      raise ValueError(f'{directory}: parameter {name} has shape {list(stored[name])}, '
                       f'config.json implies {list(want[name])}')


def restore_tree(directory: str, target: nnx.State) -> nnx.State:
  """Restores params/ into the structure, shapes and dtypes of the abstract ``target`` state."""
  import orbax.checkpoint as ocp
  pdir = os.path.join(os.path.abspath(directory), 'params')
  if not os.path.isdir(pdir):
    raise FileNotFoundError(f'{directory}: missing params/ (incomplete or corrupt checkpoint)')
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(pdir, nnx.to_pure_dict(target))
  except Exception as e:  # orbax raises many types; name the file and re-raise as ValueError.
    raise ValueError(f'{directory}: cannot restore parameters ({type(e).__name__}: {e})') from e
  nnx.replace_by_pure_dict(target, restored)
  return target
