"""Lazy readers of PyTorch checkpoint files: one tensor at a time, shapes before data.

A ``TensorSource`` maps a key to a tensor whose shape and dtype are known from the file's metadata
(safetensors header, or the unpickled index of a memory-mapped ``torch.load``) and whose data are
read only when ``get`` is called, so a converter can check every key and shape first and then
convert layer by layer with about one copy of the weights in memory.

Formats:
  * ``.safetensors``: one file, or shards listed by a ``*.safetensors.index.json``. The header is
    parsed here (8-byte length + JSON) and checked against the file size, so a truncated file is
    reported before anything is converted.
  * ``.pt`` / ``.pth`` / ``.bin``: ``torch.load(weights_only=True, mmap=True)`` (zip format; legacy
    pickles are loaded without mmap). Needs the ``torch`` extra.
Every error is a ``PortError`` naming the file and the problem.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import zipfile
from typing import Iterable, Mapping, NamedTuple

import ml_dtypes
import numpy as np


class PortError(ValueError):
  """A checkpoint does not match what the converter expects (the message names file/key)."""


class TensorInfo(NamedTuple):
  shape: tuple[int, ...]
  dtype: np.dtype


SAFETENSORS_DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8),
    'BOOL': np.dtype(np.bool_), 'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
}
FLOAT_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16),
                np.dtype(ml_dtypes.bfloat16))
# Wrappers that training code (FSDP, activation checkpointing, DDP, Self-Forcing's wrapper) adds.
WRAPPER_PREFIXES = ('model.', 'module.')
WRAPPER_INFIXES = ('_fsdp_wrapped_module.', '_checkpoint_wrapped_module.', '_orig_mod.')


class TensorSource:
  """Read-only mapping key -> tensor with metadata up front; ``get`` reads one tensor."""

  path: str = '?'

  def info(self) -> dict[str, TensorInfo]:
    raise NotImplementedError

  def get(self, key: str) -> np.ndarray:
    raise NotImplementedError

  def keys(self) -> list[str]:
    return list(self.info())

  def shape(self, key: str) -> tuple[int, ...]:
    return self.info()[key].shape

  def __contains__(self, key: str) -> bool:
    return key in self.info()

  def __len__(self) -> int:
    return len(self.info())


class DictSource(TensorSource):
  """A source over an in-memory mapping of arrays (numpy or anything ``np.asarray`` accepts)."""

  def __init__(self, tensors: Mapping, path: str = '<state dict>'):
    self._t = tensors
    self.path = path
    self._info = {k: TensorInfo(tuple(np.shape(v)), _np_dtype(v)) for k, v in tensors.items()}

  def info(self):
    return self._info

  def get(self, key):
    return np.asarray(self._t[key])


class RenamedSource(TensorSource):
  """A view of ``base`` under new key names: ``names`` maps new key -> base key."""

  def __init__(self, base: TensorSource, names: Mapping[str, str]):
    self.base, self.names, self.path = base, dict(names), base.path
    binfo = base.info()
    self._info = {new: binfo[old] for new, old in self.names.items()}

  def info(self):
    return self._info

  def get(self, key):
    return self.base.get(self.names[key])


def _np_dtype(v) -> np.dtype:
  dt = getattr(v, 'dtype', None)
  if dt is not None and type(dt).__module__.startswith('torch'):
    return torch_to_numpy_dtype(dt)
  return np.dtype(dt if dt is not None else np.asarray(v).dtype)


# ---------------------------------------------------------------------------- safetensors
def read_safetensors_header(path: str) -> tuple[int, dict[str, dict]]:
  """Parses and validates a safetensors header.

  Returns:
    (data_start, {key: {'dtype', 'shape', 'data_offsets'}}) with offsets relative to data_start.
  Raises:
    PortError for a file that is not safetensors, a corrupt header, or truncated tensor data.
  """
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise PortError(f'{path}: not a safetensors file (only {size} bytes)')
    (n,) = struct.unpack('<Q', head)
    if n < 2 or 8 + n > size:
      raise PortError(f'{path}: not a safetensors file or truncated header (header length {n}, '
                      f'file size {size})')
    raw = f.read(n)
  try:
    header = json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PortError(f'{path}: corrupt safetensors header ({e})') from None
  if not isinstance(header, dict):
    raise PortError(f'{path}: corrupt safetensors header (not a JSON object)')
  header.pop('__metadata__', None)
  data_start = 8 + n
  end = 0
  for key, meta in header.items():
    try:
      dtype = SAFETENSORS_DTYPES[meta['dtype']]
      shape = tuple(int(s) for s in meta['shape'])
      b, e = (int(o) for o in meta['data_offsets'])
    except (KeyError, TypeError, ValueError):
      raise PortError(f'{path}: corrupt safetensors header entry for {key!r}: {meta}') from None
    if any(d < 0 for d in shape) or not 0 <= b <= e:
      raise PortError(f'{path}: corrupt safetensors header entry for {key!r}: shape '
                      f'{list(shape)}, data_offsets {[b, e]}')
    if e - b != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise PortError(f'{path}: corrupt safetensors header: {key!r} spans {e - b} bytes, its '
                      f'shape {list(shape)} x {dtype} needs {int(np.prod(shape)) * dtype.itemsize}')
    end = max(end, e)
  if data_start + end > size:
    raise PortError(f'{path}: truncated: the header declares {end} bytes of tensor data, the file '
                    f'holds {size - data_start}')
  return data_start, header


class SafetensorsSource(TensorSource):
  """One or more safetensors files (shards) read tensor by tensor with ``np.fromfile``."""

  def __init__(self, files: Iterable[str], path: str | None = None):
    files = list(files)
    self.path = path or files[0]
    self._where: dict[str, tuple[str, int, int, np.dtype, tuple]] = {}
    for fn in files:
      start, header = read_safetensors_header(fn)
      for key, meta in header.items():
        if key in self._where:
          raise PortError(f'{fn}: key {key!r} also appears in {self._where[key][0]}')
        b = int(meta['data_offsets'][0])
        dtype = SAFETENSORS_DTYPES[meta['dtype']]
        self._where[key] = (fn, start + b, int(np.prod(meta['shape'], dtype=np.int64)), dtype,
                            tuple(int(s) for s in meta['shape']))
    self._info = {k: TensorInfo(w[4], w[3]) for k, w in self._where.items()}

  def info(self):
    return self._info

  def get(self, key):
    fn, offset, count, dtype, shape = self._where[key]
    arr = np.fromfile(fn, dtype=dtype, count=count, offset=offset)
    if arr.size != count:
      raise PortError(f'{fn}: truncated while reading {key!r}')
    return arr.reshape(shape)


def sharded_safetensors(index_path: str) -> SafetensorsSource:
  """The shards listed in a ``*.safetensors.index.json`` (every shard must exist)."""
  try:
    with open(index_path, encoding='utf-8') as f:
      index = json.load(f)
    weight_map = index['weight_map']
  except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: JSON and UTF-8 errors
    raise PortError(f'{index_path}: not a valid safetensors index ({type(e).__name__}: '
                    f'{one_line(e)})') from None
  if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise PortError(f'{index_path}: not a valid safetensors index (weight_map must map tensor '
                    'names to shard file names)')
  folder = os.path.dirname(index_path)
  shards = sorted(set(weight_map.values()))
  outside = [s for s in shards if not s or os.path.basename(s) != s or s in ('.', '..')]
  if outside:
    raise PortError(f'{index_path}: shard names must be file names in its folder, not '
                    f'{outside[:3]}')
  missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
  if missing:
    raise PortError(f'{index_path}: shard file(s) {missing} listed in the index are missing')
  src = SafetensorsSource([os.path.join(folder, s) for s in shards], path=index_path)
  for key, shard in weight_map.items():
    where = src._where.get(key)
    if where is None or os.path.basename(where[0]) != shard:
      raise PortError(f'{index_path}: the index puts {key!r} in {shard}, which does not hold it')
  extra = sorted(set(src.keys()) - set(weight_map))
  if extra:
    raise PortError(f'{index_path}: shards hold keys the index does not list: {extra[:5]}')
  return src


# ---------------------------------------------------------------------------- torch pickles
def _torch():
  try:
    import torch
  except ImportError:
    raise PortError('reading .pt/.pth files needs PyTorch: pip install -e ".[torch]"') from None
  return torch


def torch_to_numpy_dtype(dt) -> np.dtype:
  torch = _torch()
  table = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
           torch.bfloat16: ml_dtypes.bfloat16, torch.int64: np.int64, torch.int32: np.int32,
           torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}
  if dt not in table:
    raise PortError(f'unsupported tensor dtype {dt}')
  return np.dtype(table[dt])


def tensor_to_numpy(t) -> np.ndarray:
  """A torch tensor as a numpy array without a copy (bfloat16 through a uint16 view)."""
  torch = _torch()
  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def load_torch_file(path: str):
  """``torch.load(weights_only=True)``, memory-mapped for zip checkpoints; errors name the file."""
  torch = _torch()
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic.startswith(b'PK'):
    try:
      with zipfile.ZipFile(path) as z:
        bad = z.testzip() if os.path.getsize(path) < (64 << 20) else None
    except zipfile.BadZipFile as e:
      raise PortError(f'{path}: truncated or corrupt PyTorch checkpoint (zip archive: {e})') from None
    if bad is not None:
      raise PortError(f'{path}: corrupt PyTorch checkpoint (CRC error in {bad})')
    mmap = True
  elif magic[:1] == b'\x80':
    mmap = False                            # legacy (pre-1.6) pickle format: no mmap possible
  else:
    raise PortError(f'{path}: not a PyTorch checkpoint or a safetensors file '
                    f'(starts with {magic!r})')
  try:
    return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, OSError, EOFError...
    text = str(e)
    why = re.search(r'WeightsUnpickler error:\s*(.*?)(?:\n\n|Check the documentation|$)', text,
                    re.S)
    detail = one_line(why.group(1) if why else text)[:300]
    if why and 'Unsupported global' in why.group(1):
      detail = re.sub(r' Please use .*', '', detail)
      raise PortError(f'{path}: holds objects other than tensors; refusing to unpickle them '
                      f'(torch.load weights_only=True): {detail}') from None
    raise PortError(f'{path}: cannot read as a PyTorch checkpoint (truncated or corrupt?): '
                    f'{type(e).__name__}: {detail}') from None


def strip_wrappers(sd: Mapping, path: str) -> dict:
  """Removes training-wrapper prefixes (``model.``, ``module.``, FSDP/checkpoint infixes)."""
  out = {}
  for key, val in sd.items():
    if not isinstance(key, str):
      raise PortError(f'{path}: non-string key {key!r} in the state dict')
    new = key
    for infix in WRAPPER_INFIXES:
      new = new.replace(infix, '')
    changed = True
    while changed:
      changed = False
      for p in WRAPPER_PREFIXES:
        if new.startswith(p):
          new, changed = new[len(p):], True
    if new in out:
      raise PortError(f'{path}: keys collide after removing wrapper prefixes: {key!r} -> {new!r}')
    out[new] = val
  return out


class TorchSource(TensorSource):
  """A flat state dict of tensors from a torch pickle (memory-mapped when possible)."""

  def __init__(self, sd: Mapping, path: str):
    torch = _torch()
    self.path = path
    self._t = {}
    for key, val in sd.items():
      if not isinstance(val, torch.Tensor):
        raise PortError(f'{path}: entry {key!r} is a {type(val).__name__}, not a tensor '
                        '(not a flat state dict)')
      self._t[key] = val
    self._info = {k: TensorInfo(tuple(v.shape), torch_to_numpy_dtype(v.dtype))
                  for k, v in self._t.items()}

  def info(self):
    return self._info

  def get(self, key):
    return tensor_to_numpy(self._t[key])


STATE_DICT_KEYS = ('generator_ema', 'generator', 'model', 'state_dict')


def torch_source(path: str, ema: bool | None = None, log=None) -> TensorSource:
  """A torch checkpoint as a source; Self-Forcing/trainer dicts select one state dict.

  Args:
    path: .pt/.pth/.bin file.
    ema: for a Self-Forcing checkpoint ({'generator_ema', 'generator', ...}): True takes
      ``generator_ema``, False ``generator``, None prefers ``generator_ema`` when present.
    log: optional callable for a note about the selection.
  """
  obj = load_torch_file(path)
  if not isinstance(obj, Mapping):
    raise PortError(f'{path}: holds a {type(obj).__name__}, not a state dict')
  containers = [k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)]
  if containers:
    if ema is True and 'generator_ema' not in obj:
      raise PortError(f'{path}: no "generator_ema" state dict (has {sorted(map(str, obj))}); '
                      'use --no_ema for the "generator" weights')
    if ema is False and 'generator' not in obj:
      raise PortError(f'{path}: no "generator" state dict (has {sorted(map(str, obj))})')
    if ema is True:
      pick = 'generator_ema'
    elif ema is False:
      pick = 'generator'
    else:
      pick = containers[0]
    if log is not None:
      log(f'{path}: using the "{pick}" state dict (of {sorted(map(str, obj))})')
    obj = obj[pick]
  elif ema is not None:
    raise PortError(f'{path}: --ema/--no_ema given but the file is a plain state dict, not a '
                    'Self-Forcing checkpoint with generator/generator_ema')
  return TorchSource(strip_wrappers(obj, path), path)


def open_file(path: str, ema: bool | None = None, log=None) -> TensorSource:
  """A single checkpoint file (safetensors or torch pickle), detected from its first bytes."""
  if not os.path.isfile(path):
    raise PortError(f'{path}: no such file')
  with open(path, 'rb') as f:
    head = f.read(9)
  if len(head) == 9 and head[8:9] == b'{':
    return SafetensorsSource([path])
  if path.endswith('.safetensors'):
    read_safetensors_header(path)            # raises naming the problem
  return torch_source(path, ema=ema, log=log)


def open_checkpoint(path: str, names: Iterable[str]) -> TensorSource:
  """The checkpoint in a folder: ``<name>.safetensors.index.json``, ``<name>.safetensors`` or
  ``<name>`` itself for each candidate ``name`` (e.g. 'diffusion_pytorch_model', 'model')."""
  for name in names:
    index = os.path.join(path, f'{name}.safetensors.index.json')
    if os.path.isfile(index):
      return sharded_safetensors(index)
    single = os.path.join(path, f'{name}.safetensors')
    if os.path.isfile(single):
      return SafetensorsSource([single])
    shards = sorted(glob.glob(os.path.join(glob.escape(path), f'{name}-*-of-*.safetensors')))
    if shards:                                # shards without their index: all must be present
      total = {re.search(r'-of-(\d+)\.safetensors$', s).group(1) for s in shards}
      if len(total) != 1 or len(shards) != int(next(iter(total))):
        raise PortError(f'{path}: incomplete set of shards without an index: '
                        f'{[os.path.basename(s) for s in shards]}')
      return SafetensorsSource(shards, path=os.path.join(path, f'{name}-*.safetensors'))
  for name in names:
    for ext in ('.bin', '.pth', '.pt'):
      fn = os.path.join(path, name + ext)
      if os.path.isfile(fn):
        return torch_source(fn)
  raise PortError(f'{path}: no checkpoint file ({", ".join(n + ".safetensors" for n in names)} '
                  'or an index) in this folder')


def read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise PortError(f'{path}: not valid JSON ({e})') from None
  except UnicodeDecodeError as e:
    raise PortError(f'{path}: not valid JSON (not UTF-8 text: {e.reason} at byte '
                    f'{e.start})') from None
  except OSError as e:
    raise PortError(f'{path}: cannot read ({e.strerror or e})') from None
  if not isinstance(out, dict):
    raise PortError(f'{path}: expected a JSON object')
  return out


def config_number(cfg: Mapping, key: str, path: str, kind=int, default=None):
  """``cfg[key]`` (a config.json field) as ``kind`` (int or float), or ``default`` when absent
  or null; a value of another type is a PortError naming the file and the field."""
  val = cfg.get(key)
  if val is None:
    return default
  try:
    if isinstance(val, bool) or (kind is int and isinstance(val, float) and not val.is_integer()):
      raise ValueError
    return kind(val)
  except (TypeError, ValueError):
    raise PortError(f'{path}: {key}={val!r} is not {"an integer" if kind is int else "a number"}'
                    ) from None


def one_line(e) -> str:
  """An exception's (or a text's) message on one line, without terminal colour codes."""
  text = re.sub(r'\x1b\[[0-9;]*m', '', str(e))
  return ' '.join(text.split()) or (type(e).__name__ if isinstance(e, BaseException) else '')
