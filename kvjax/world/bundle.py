"""The shipped world model: the trained DiT and caption encoder as one checked folder.

Layout (``save``): ``config.json`` (format ``kvjax.world.v1``; the DiT config, the caption
encoder config, how it was trained, and the SHA-256 of every parameter file) and ``params/`` (one
orbax tree ``{'dit': ..., 'text': ...}``). ``check`` verifies a folder before any work: it exists,
its config parses, every listed file is present with its hash and no parameter is missing or
misshapen; a failure is one error naming the file and the command that rebuilds the folder
(``REBUILD``). The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
from flax import nnx

from kvjax import checkpoint as ckpt
from kvjax.model import WanConfig
from kvjax.world import text as text_lib

FORMAT = 'kvjax.world.v1'
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
REBUILD = 'python -m launch.train_tiny --export=kvjax/world/weights'


@dataclasses.dataclass(frozen=True)
class WorldModel:
  """A checked bundle: its folder, configs and metadata (parameters are read by ``load``)."""
  path: str
  dit_cfg: WanConfig
  text_cfg: text_lib.CaptionEncoderConfig
  meta: dict


def _abstract(dit_cfg: WanConfig, text_cfg: text_lib.CaptionEncoderConfig) -> nnx.State:
  return nnx.State(dict(dit=ckpt.abstract_params(dit_cfg), text=text_lib.abstract_params(text_cfg)))


def _hashes(folder: str) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(os.path.join(folder, 'params')):
    for name in sorted(files):
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return dict(sorted(out.items()))


def save(directory: str, dit_cfg: WanConfig, text_cfg: text_lib.CaptionEncoderConfig,
         params: Mapping[str, nnx.State], info: Mapping[str, Any]) -> None:
  """Writes the bundle into ``directory`` (replaced if it exists), atomically."""
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=f'.{os.path.basename(directory)}.partial-', dir=parent)
  try:
    inner = os.path.join(stage, 'bundle')
    meta = dict(format=FORMAT, model=dit_cfg.to_dict(), text=text_cfg.to_dict(),
                training=dict(info))
    ckpt.write_tree(inner, meta, {k: nnx.to_pure_dict(v) for k, v in params.items()})
    meta['sha256'] = _hashes(inner)
    with open(os.path.join(inner, 'config.json'), 'w') as f:
      json.dump(meta, f, indent=2)
    if os.path.exists(directory):
      old = directory + '.old'
      os.rename(directory, old)
      os.rename(inner, directory)
      shutil.rmtree(old)
    else:
      os.rename(inner, directory)
  finally:
    shutil.rmtree(stage, ignore_errors=True)


def _fail(directory: str, problem: str, exc=ValueError):
  raise exc(f'world model {directory}: {problem}; rebuild it with: {REBUILD}')


def check(directory: str = DEFAULT_DIR) -> WorldModel:
  """Validates the bundle without reading an array (hashes, config, parameter names/shapes)."""
  if not os.path.isdir(directory):
    _fail(directory, 'missing', FileNotFoundError)
  try:
    meta = ckpt.read_meta(directory, FORMAT, 'kvjax world model')
    dit_cfg = WanConfig.from_dict(meta['model'])
    text_cfg = text_lib.CaptionEncoderConfig.from_dict(meta['text'])
  except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
    _fail(directory, f'bad config.json ({e})')
  listed = meta.get('sha256')
  if not isinstance(listed, dict) or not listed:
    _fail(directory, 'config.json lists no parameter files')
  found = _hashes(directory)
  for name, digest in listed.items():
    if name not in found:
      _fail(directory, f'{name} is missing')
    if found[name] != digest:
      _fail(directory, f'{name} is corrupt (SHA-256 differs from config.json)')
  extra = sorted(set(found) - set(listed))
  if extra:
    _fail(directory, f'{extra[0]} is not part of the trained model')
  try:
    ckpt.verify_tree(directory, _abstract(dit_cfg, text_cfg))
  except (ValueError, FileNotFoundError) as e:
    _fail(directory, str(e).removeprefix(f'{directory}: '))
  return WorldModel(os.path.abspath(directory), dit_cfg, text_cfg, meta)


def load(world: WorldModel, dit_cfg: WanConfig | None = None) -> tuple[nnx.State, nnx.State]:
  """(DiT params, caption encoder params) of a checked bundle, on device; ``dit_cfg`` (default
  the bundle's) may change the dtypes the DiT's parameters are restored in."""
  try:
    params = ckpt.restore_tree(world.path, _abstract(dit_cfg or world.dit_cfg, world.text_cfg))
  except ValueError as e:
    _fail(world.path, str(e).removeprefix(f'{world.path}: '))
  return params['dit'], params['text']


def param_count(world: WorldModel) -> dict[str, int]:
  a = _abstract(world.dit_cfg, world.text_cfg)
  return {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in a.items()}
