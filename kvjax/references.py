"""The stored BF16 references: a method's reference rollout computed once and reused.

Every compressed run is compared against kvjax's BF16 rollout of the same inputs. That rollout
depends only on what goes into it, so the first run computes it and stores it under a key of
exactly those inputs, and every later run with the same inputs (another method, another sweep)
reads it instead of rolling out again:

  key = SHA-256 of the model config, the sampler config, the cache geometry (frames, window,
        sinks, batch, latent height and width), the compute dtype, the backend and device kind,
        the bytes of the parameters, of the noise and of the text states.

The parameters' and inputs' bytes stand for the checkpoint, the world bundle, the weight seed,
the prompts, the seed, a noise file and a text-states file at once, so two runs share an entry
exactly when their BF16 rollouts would be the same computation. The backend and device are in
the key because XLA's numerics differ between them.

Layout: ``<dir>/<key>/latents.npy`` ([B, F, C, h, w] float32) and ``info.json`` (the key's
readable fields, the rollout's runtime and compile time, the latents' SHA-256), written under a
hidden staging name and renamed, so a reader never sees half an entry. An entry whose files are
missing, unreadable, misshapen or whose latents do not match the recorded hash is recomputed and
replaced, never used. The default folder is ``DEFAULT_DIR`` under the working directory (beside
``runs/<stamp>_...``); ``--reference_dir=`` (empty) turns storing off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from kvjax import files

DEFAULT_DIR = os.path.join('runs', 'references')
FORMAT = 'kvjax.reference.v1'


def _hash_arrays(h, tree) -> None:
  for leaf in jax.tree.leaves(tree):
    a = np.asarray(leaf)
    h.update(f'{a.dtype}{a.shape}'.encode())
    h.update(np.ascontiguousarray(a).tobytes())


def key_of(fields: dict[str, Any], params, noise, texts) -> str:
  """The entry name: SHA-256 over ``fields`` (JSON, sorted) and the arrays' dtypes, shapes and
  bytes (module docstring)."""
  h = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
  for tree in (params, noise, texts):
    _hash_arrays(h, tree)
  return h.hexdigest()


def check_dir(directory: str) -> None:
  """Raises (one line) unless ``directory`` exists or can be created, and is writable; creates
  nothing (``store`` creates it)."""
  try:
    files.writable_root(directory)
  except OSError as e:
    raise PermissionError(f'--reference_dir {directory}: cannot store references there '
                          f'({e.strerror})') from None


@dataclasses.dataclass(frozen=True)
class Entry:
  latents: np.ndarray          # [B, F, C, h, w] float32
  info: dict


def _sha(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def load(directory: str, key: str, shape: tuple[int, ...]) -> Entry | None:
  """The stored entry, or None when there is none or it is not intact (then it is recomputed)."""
  path = os.path.join(directory, key)
  try:
    with open(os.path.join(path, 'info.json')) as f:
      info = json.load(f)
    lat = np.load(os.path.join(path, 'latents.npy'), allow_pickle=False)
  except (OSError, ValueError):
    return None
  if (info.get('format') != FORMAT or lat.dtype != np.float32 or tuple(lat.shape) != tuple(shape)
      or info.get('latents_sha256') != _sha(lat) or not np.all(np.isfinite(lat))):
    return None
  return Entry(lat, info)


def store(directory: str, key: str, latents: np.ndarray, info: dict,
          partial: set | None = None) -> str:
  """Writes the entry atomically (replacing a broken one); returns its folder. The staging
  folder is in ``partial`` while it exists (the launcher's interrupt handler removes those)."""
  lat = np.asarray(latents, np.float32)
  final = os.path.join(directory, key)
  os.makedirs(directory, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=f'.{key}.partial-', dir=directory)
  partial = set() if partial is None else partial
  partial.add(stage)
  try:
    np.save(os.path.join(stage, 'latents.npy'), lat)
    with open(os.path.join(stage, 'info.json'), 'w') as f:
      json.dump(dict(info, format=FORMAT, key=key, latents_sha256=_sha(lat)), f, indent=2,
                default=str)
    if os.path.exists(final):
      if load(directory, key, lat.shape) is not None:   # another run stored it meanwhile
        shutil.rmtree(stage, ignore_errors=True)
        return final
      shutil.rmtree(final, ignore_errors=True)          # a broken entry: replaced
    try:
      os.rename(stage, final)
    except OSError:
      if not os.path.isdir(final):
        raise
      shutil.rmtree(stage, ignore_errors=True)   # another run stored the same entry meanwhile
  except BaseException:
    shutil.rmtree(stage, ignore_errors=True)
    raise
  finally:
    partial.discard(stage)
  return final
