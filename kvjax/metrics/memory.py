"""Memory probes: compiled memory analysis and an HLO audit for full-size copies of the cache."""

from __future__ import annotations

import re
from typing import Any

_ELEM = re.compile(r'\b(f64|f32|bf16|f16|f8e4m3fn|f8e5m2)\[([0-9,]*)\]')


def compiled_memory(compiled) -> dict[str, int]:
  """The fields of ``compiled.memory_analysis()`` as a dict of ints."""
  ma = compiled.memory_analysis()
  keys = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
          'alias_size_in_bytes', 'generated_code_size_in_bytes', 'peak_memory_in_bytes')
  return {k: int(getattr(ma, k)) for k in keys if hasattr(ma, k)}


def full_extent_float_arrays(hlo_text: str, frame_tokens: int, slot_counts,
                             block_frames: int = 1, num_heads: int = 1) -> list[str]:
  """Float array shapes in (optimized) HLO text that span a cache store's whole token extent.

  ``slot_counts`` are the frame-slot counts of the cache's stores (``CacheMethod.slot_counts``:
  the ring capacity, tier-store sizes). An array with adjacent dims (c, P) or a dim c * P for a
  slot count c > block_frames is a float (dequantized or upcast) copy of a whole store: the thing
  kvjax must never build (stores of at most a block's frames cannot be told from the current
  block's own K/V and are skipped, as is the flattened dim block_frames * num_heads * P of the
  block's queries). A pair (N, P) where a store happens to have N = num_heads slots is read as a
  head-major chunk [.., N, P, H] (one frame, heads first) unless a heads dim sits right after P
  (the stores' slot-major layout [.., c, P, N, H]) or right before N. Use distinctive sizes in
  tests to avoid chance matches.

  Returns:
    Sorted unique offending type strings, e.g. ['f32[2,1,7,20,2,32]'].
  """
  bad = set()
  p = frame_tokens
  counts = {int(c) for c in slot_counts if int(c) > max(block_frames, 1)}
  for m in _ELEM.finditer(hlo_text):
    dims = [int(d) for d in m.group(2).split(',') if d]
    slots = False
    for i in range(len(dims) - 1):
      if dims[i] in counts and dims[i + 1] == p:
        head_major = dims[i] == num_heads and not (
            (i + 2 < len(dims) and dims[i + 2] == num_heads) or (i > 0 and dims[i - 1] == num_heads))
        slots = slots or not head_major
    flat = any(d % p == 0 and d // p in counts and d // p != block_frames * num_heads
               for d in dims)
    if slots or flat:
      bad.add(m.group(0))
  return sorted(bad)


def cpu_weight_upcast_bytes(hlo_text: str, params) -> int:
  """Estimated bytes of float32 copies of bf16 layer-stacked weights in a CPU executable.

  XLA CPU normalizes bf16 dynamic slices to float32 and hoists the conversion of every
  layer-stacked bf16 weight out of the layer scan (one float32 copy per leaf). GPUs keep bf16.
  Counts each bf16 leaf of ``params`` with >= 2 dims whose float32 shape appears in the HLO.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  total = 0
  for leaf in jax.tree.leaves(params):
    if leaf.dtype == jnp.bfloat16 and len(leaf.shape) >= 2:
      if f'f32[{",".join(map(str, leaf.shape))}]' in hlo_text:
        total += int(np.prod(leaf.shape)) * 4
  return total


def summary(d: dict[str, Any]) -> str:
  return ', '.join(f'{k.replace("_size_in_bytes", "")}={v / 2**20:.1f}MiB' for k, v in d.items())
