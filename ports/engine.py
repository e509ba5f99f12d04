"""The table-driven conversion shared by every port: named transforms, checks, streaming fill.

A key table maps each kvjax parameter path ('/'-joined, as in ``nnx.to_pure_dict``) to
``(source key pattern, transform name)``. A pattern with ``{i}`` is a per-layer tensor: layer i
fills row i of a destination stacked along a new leading axis (the scanned blocks).

``convert`` first checks everything that metadata can tell (every destination has an entry, every
source key exists, is a float tensor, is consumed once, has the expected shape after its
transform; every remaining source key is explicitly ignored) and only then reads tensor data,
one source tensor at a time, into preallocated destination arrays.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import numpy as np

from ports.sources import FLOAT_DTYPES, DictSource, PortError, TensorSource


class Transform(NamedTuple):
  """fwd: PyTorch layout -> kvjax layout; inv: back; shape: fwd on shapes (no data)."""
  fwd: Callable[[np.ndarray], np.ndarray]
  inv: Callable[[np.ndarray], np.ndarray]
  shape: Callable[[tuple], tuple]


def _perm(order):
  inv = tuple(int(i) for i in np.argsort(order))
  return Transform(lambda a: a.transpose(order), lambda a: a.transpose(inv),
                   lambda s: tuple(s[i] for i in order) if len(s) == len(order) else None)


def _squeeze_tail(n):
  """[C, 1, ..., 1] (n ones) <-> [C]: the VAE's RMS_norm gammas."""
  return Transform(lambda a: a.reshape(a.shape[0]), lambda a: a.reshape(a.shape[0], *([1] * n)),
                   lambda s: (s[0],) if len(s) == n + 1 and all(d == 1 for d in s[1:]) else None)


def _conv1x1_dense():
  """Conv2d 1x1 [out, in, 1, 1] <-> Dense kernel [in, out]."""
  return Transform(lambda a: a.reshape(a.shape[0], a.shape[1]).T,
                   lambda a: a.T.reshape(a.shape[1], a.shape[0], 1, 1),
                   lambda s: (s[1], s[0]) if len(s) == 4 and s[2:] == (1, 1) else None)


TRANSFORMS: dict[str, Transform] = {
    'identity': Transform(lambda a: a, lambda a: a, lambda s: tuple(s)),
    'linear': _perm((1, 0)),                       # Linear [out, in] -> Dense [in, out]
    'conv3d': _perm((2, 3, 4, 1, 0)),              # Conv3d [o, i, t, h, w] -> [t, h, w, i, o]
    'conv2d': _perm((2, 3, 1, 0)),                 # Conv2d [o, i, h, w] -> [h, w, i, o]
    'conv1x1': _conv1x1_dense(),                   # Conv2d 1x1 [o, i, 1, 1] -> Dense [i, o]
    'gamma3': _squeeze_tail(3),                    # [C, 1, 1, 1] -> [C]
    'gamma2': _squeeze_tail(2),                    # [C, 1, 1] -> [C]
}

Table = Mapping[str, tuple[str, str]]


# ---------------------------------------------------------------------------- nested trees
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


def set_path(tree: dict, path: str, val):
  *parents, leaf = path.split('/')
  for p in parents:
    tree = tree.setdefault(p, {})
  if leaf in tree:
    raise PortError(f'destination {path!r} written twice')
  tree[leaf] = val


def get_path(tree: Mapping, path: str):
  for p in path.split('/'):
    tree = tree[p]
  return tree


def expected_dtypes(tree: Mapping) -> dict[str, np.dtype]:
  out = {}
  for p in flat_paths(tree):
    leaf = get_path(tree, p)
    out[p] = np.dtype(getattr(leaf, 'dtype', np.float32))
  return out


# ---------------------------------------------------------------------------- conversion
def _plan(source: TensorSource, table: Table, want: Mapping[str, tuple]):
  """Checks metadata; returns [(path, [(key, transform)], shape)] and the consumed keys."""
  info = source.info()
  consumed: dict[str, str] = {}
  plan = []
  for path, shp in want.items():
    if path not in table:
      raise PortError(f'kvjax parameter {path!r} has no entry in the key table')
    pattern, tf_name = table[path]
    tf = TRANSFORMS[tf_name]
    stacked = '{i}' in pattern
    keys = [pattern.format(i=i) for i in range(shp[0])] if stacked else [pattern]
    want_one = shp[1:] if stacked else shp
    for j, key in enumerate(keys):
      if key not in info:
        raise PortError(f'{source.path}: missing key {key!r} in the source state dict')
      if key in consumed:
        raise PortError(f'{source.path}: key {key!r} consumed twice ({consumed[key]}, {path})')
      consumed[key] = path
      ti = info[key]
      if ti.dtype not in FLOAT_DTYPES:
        raise PortError(f'{source.path}: {key!r} has dtype {ti.dtype}, expected a float tensor')
      got = tf.shape(ti.shape)
      if got != tuple(want_one):
        where = f'{path}[{j}]' if stacked else path
        raise PortError(f'{source.path}: {key} -> {where}: shape {list(ti.shape)} gives '
                        f'{list(got) if got else "no valid layout"} after the {tf_name!r} '
                        f'transform, expected {list(want_one)} (wrong model size or a '
                        'transposed tensor?)')
    plan.append((path, [(k, tf) for k in keys], stacked, tuple(shp)))
  return plan, consumed


def convert(source: TensorSource | Mapping, table: Table, expected: Mapping,
            dtype=None, ignore: Callable[[str], bool] = lambda k: False,
            progress: Callable[[str], None] | None = None,
            finalize: Callable[[np.ndarray], object] | None = None) -> dict:
  """Fills the kvjax parameter tree ``expected`` from ``source`` through ``table``.

  Args:
    source: a TensorSource (or a mapping of arrays).
    table: path -> (source key pattern, transform name).
    expected: nested mapping of arrays / ShapeDtypeStructs giving every destination leaf.
    dtype: destination dtype of every leaf (None: the leaf's dtype in ``expected``).
    ignore: predicate of source keys that are dropped on purpose.
    progress: optional callback(path) after each destination leaf is filled.
    finalize: optional function applied to each filled leaf, whose result is stored instead
      (e.g. ``jax.device_put``: the numpy leaf is then dropped, so at most one leaf is held twice).
  Returns:
    nested dict of numpy arrays (or ``finalize`` results) with exactly the structure and shapes
    of ``expected``.
  Raises:
    PortError naming the file and the first missing/unexpected/mis-shaped key.
  """
  if not isinstance(source, TensorSource):
    source = DictSource(source)
  want = flat_paths(expected)
  dtypes = expected_dtypes(expected)
  plan, consumed = _plan(source, table, want)
  extra = sorted(k for k in source.keys() if k not in consumed and not ignore(k))
  if extra:
    raise PortError(f'{source.path}: unexpected source key(s) {extra[:8]}'
                    f'{" ..." if len(extra) > 8 else ""} (a different model? expected '
                    f'{len(consumed)} keys)')
  out: dict = {}
  for path, keys, stacked, shp in plan:
    dst = np.empty(shp, np.dtype(dtype) if dtype is not None else dtypes[path])
    for j, (key, tf) in enumerate(keys):
      val = tf.fwd(source.get(key))
      target = dst[j] if stacked else dst
      if val.shape != target.shape:            # metadata and data disagree: a corrupt file
        raise PortError(f'{source.path}: {key} holds shape {val.shape}, its header said '
                        f'{target.shape}')
      np.copyto(target, val, casting='unsafe')
      del val
    if finalize is not None:
      dst = finalize(dst)
    set_path(out, path, dst)
    if progress is not None:
      progress(path)
  return out


def invert(table: Table, params: Mapping) -> dict[str, np.ndarray]:
  """kvjax nested params -> source-named state dict (numpy), through the inverse transforms."""
  out = {}
  for path in flat_paths(params):
    if path not in table:
      raise PortError(f'kvjax parameter {path!r} has no entry in the key table')
    pattern, tf_name = table[path]
    val = np.asarray(get_path(params, path))
    inv = TRANSFORMS[tf_name].inv
    if '{i}' in pattern:
      for i in range(val.shape[0]):
        out[pattern.format(i=i)] = inv(val[i])
    else:
      out[pattern] = inv(val)
  return out


def count_layers(keys, regex, what: str = 'layers') -> int:
  """Number of consecutive layers 0..n-1 matched by ``regex`` (group 1 = index); raises on gaps."""
  idx = {int(m.group(1)) for k in keys if (m := regex.match(k))}
  if not idx:
    return 0
  n = max(idx) + 1
  missing = sorted(set(range(n)) - idx)
  if missing:
    raise PortError(f'{what} {missing} are missing from the state dict (found up to {n - 1})')
  return n
