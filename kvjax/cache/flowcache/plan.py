"""FlowCache's plan (spec 3.9): per-layer budgets, tier sizes and the chunk-importance score.

Pure functions (numpy on the host for static capacities, jnp inside the compiled append); the tier
stores that follow a plan are in ``tiers.py``, the profiling pass that writes a budget table in
``profile.py``.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

f32 = jnp.float32

# The study's profiled MovieGen budget table (spec 3.9), layer 0..29; mean 0.9003.
MOVIEGEN_BUDGETS = (1.300, 1.022, 1.016, 0.878, 0.867, 0.889, 1.013, 0.915, 0.820, 1.016, 0.788,
                    0.889, 0.808, 0.727, 0.710, 0.799, 0.700, 0.757, 0.851, 0.838, 0.856, 0.896,
                    0.878, 0.875, 0.972, 0.919, 0.862, 1.054, 0.979, 1.112)


def py_round(x):
  """Python's round (half to even) on numpy/jax scalars."""
  return jnp.round(x)


def layer_budgets(spec_budget: str, num_layers: int, lo: float = 0.75, hi: float = 1.25) -> np.ndarray:
  """Per-layer budgets: 'moviegen' (the study's table, 30 layers), 'linear' (lo -> hi ramp),
  'auto' (moviegen for 30 layers, else linear), or a path to a JSON profile table."""
  if spec_budget == 'auto':
    spec_budget = 'moviegen' if num_layers == len(MOVIEGEN_BUDGETS) else 'linear'
  if spec_budget == 'moviegen':
    if num_layers != len(MOVIEGEN_BUDGETS):
      raise ValueError(f"budget='moviegen' is the study's 30-layer table; the model has {num_layers} layers")
    return np.asarray(MOVIEGEN_BUDGETS, np.float64)
  if spec_budget == 'linear':
    if num_layers == 1:
      return np.asarray([(lo + hi) / 2])
    return lo + (hi - lo) * np.arange(num_layers) / (num_layers - 1)
  path = spec_budget.removeprefix('profile:')
  if not os.path.isfile(path):
    raise FileNotFoundError(f"budget table not found: {path} (use 'auto', 'moviegen', 'linear' or "
                            'a JSON written by the FLOWCACHE_PROFILE method)')
  try:
    with open(path) as f:
      table = json.load(f)
    budgets = np.asarray(table['budgets'], np.float64)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path}: not a budget table ({e})') from None
  if budgets.shape != (num_layers,) or not np.all(np.isfinite(budgets)):
    raise ValueError(f'{path}: {budgets.shape[0] if budgets.ndim else 0} budgets for a '
                     f'{num_layers}-layer model')
  return budgets


def plan_counts(n_hist, block, budget, kind, recent_ratio, important_ratio, retained_ratio, xp=np):
  """Tier sizes of one plan: (history recent, important, retained, pruned, n_old)."""
  n = n_hist + block
  n_recent = xp.clip(xp.round(xp.minimum(recent_ratio * budget, 1.0) * n), 1, n)
  hist_recent = xp.clip(n_recent - block, 0, n_hist)
  n_old = n_hist - hist_recent
  zero = n_old * 0
  if kind == 'hybrid':
    return hist_recent, zero, zero, zero, n_old
  n_imp = xp.where(n_old >= 1, xp.clip(xp.round(important_ratio * budget * n_old), 1, n_old), 0)
  if kind == 'adaptive':
    return hist_recent, n_imp, zero, zero, n_old
  n_rem = n_old - n_imp
  n_ret = xp.where(n_rem >= 1, xp.clip(xp.round(retained_ratio * budget * n_rem), 1, n_rem), 0)
  return hist_recent, n_imp, n_ret, n_rem - n_ret, n_old


def chunk_deltas(cur, frames, n_cur, prev, prev_frames, prev_n, alignment: str):
  """Relative L1 change of chunk summaries against the previous plan's list.

  Args:
    cur: [C, N] summaries in list (absolute frame) order, first ``n_cur`` valid.
    frames: [C] their frames; prev, prev_frames, prev_n: the previous list.
    alignment: 'tail' pairs the last rows of both lists (the study); 'frame' pairs equal frames.
  Returns:
    [C] deltas (1.0 where unpaired).
  """
  c = cur.shape[0]
  j = jnp.arange(c)
  in_list = j < n_cur
  if alignment == 'tail':
    pj = j - n_cur + prev_n
    paired = in_list & (pj >= 0) & (pj < prev_n)
  else:
    match = (prev_frames[None, :] == frames[:, None]) & (frames[:, None] >= 0)
    paired = jnp.any(match, axis=1) & in_list
    pj = jnp.argmax(match, axis=1)
  pv = prev[jnp.clip(pj, 0, c - 1)]
  num = jnp.mean(jnp.abs(cur - pv), axis=-1)
  den = jnp.maximum(jnp.mean(jnp.abs(pv), axis=-1), 1e-6)
  return jnp.where(paired, num / den, 1.0)


def frame_summary(x):
  """Per-head chunk summary part of one tensor: mean |x| over batch, tokens, head_dim.

  x: [B, P, N, H] -> [N] float32 (the study's summary is this for K plus this for V)."""
  return jnp.mean(jnp.abs(x.astype(f32)), axis=(0, 1, 3))
