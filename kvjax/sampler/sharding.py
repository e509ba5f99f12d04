"""Data parallelism over the batch: a rollout's videos spread across the local devices.

Every video of a batch is independent (its own noise, text and cache rows), so the batch axis of
each array is split across a 1-D mesh (axis ``batch``) and everything else (the weights, the
scalars, arrays without a batch axis) is replicated. Which axis of an array is its batch axis is
not named anywhere for the cache methods' pytrees (codes, scales, outlier tables, pools), so it
is found by shape: ``batch_axes`` compares the abstract shapes at batch B and B + 1, and the one
axis that changes is the batch axis. XLA's partitioner then runs each device's share; an op it
cannot split (a Pallas call) is gathered, which stays correct.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'batch'


def batch_mesh(batch: int, devices: list | None = None) -> Mesh | None:
  """A 1-D mesh over as many local devices as divide ``batch`` evenly (the largest such count);
  None when that is one device (nothing to split)."""
  devices = list(jax.local_devices() if devices is None else devices)
  n = max(d for d in range(1, len(devices) + 1) if batch % d == 0)
  return Mesh(np.array(devices[:n]), (AXIS,)) if n > 1 else None


def batch_axes(make: Callable[[int], Any], batch: int) -> Any:
  """The batch axis of every leaf of ``make(batch)`` (a pytree of ShapeDtypeStructs, e.g. from
  ``jax.eval_shape``): the axis whose size differs at ``batch + 1``; None for leaves without one.
  Raises when a leaf changes in more than one axis (no single batch axis to split)."""
  a, b = make(batch), make(batch + 1)

  def axis(x, y):
    diff = [i for i, (m, n) in enumerate(zip(x.shape, y.shape)) if m != n]
    if len(diff) > 1 or len(x.shape) != len(y.shape):
      raise ValueError(f'a leaf of shape {x.shape} changes in several axes with the batch')
    return diff[0] if diff else None

  # Leaf by leaf: a pytree's static metadata may hold the batch too (a cache's CacheSpec).
  leaves, tree = jax.tree.flatten(a)
  return jax.tree.unflatten(tree, [axis(x, y) for x, y in zip(leaves, jax.tree.leaves(b))])


def shardings(mesh: Mesh, axes: Any) -> Any:
  """NamedShardings splitting each leaf's batch axis (``batch_axes``) over ``mesh``."""
  def one(ax):
    return NamedSharding(mesh, P() if ax is None else P(*([None] * ax), AXIS))
  return jax.tree.map(one, axes, is_leaf=lambda x: x is None or isinstance(x, int))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_shards(mesh: Mesh | None) -> int:
  return 1 if mesh is None else math.prod(mesh.devices.shape)
