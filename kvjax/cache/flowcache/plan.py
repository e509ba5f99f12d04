"""FlowCache's plan (spec 3.9): per-layer budgets, tier sizes and the chunk-importance score.

Tier sizes are computed once, on the host, into an integer table per layer (``count_table``):
the compiled plan looks its sizes up there and the tier stores are sized from the same table, so
the plan can never ask for more slots than were allocated. (kvjax used to size the stores in
float64 on the host and plan in float32 inside jit; where the two round a product differently the
plan wanted one slot more than the store had and silently overwrote layer 0's first record, e.g.
ADAPTIVE at budget 0.7 with 25 old chunks: 0.2 * 0.7 * 25 is 3.4999999999999996 in float64 and
3.5000002 in float32.)

The table evaluates the study's Python expressions in float64, in its operation order, with
Python's round (half to even), so every size is the study's own, ties included (exact rational
arithmetic would not be: 0.2 * 0.7 * 25 = 7/2 rounds to 4, the study's float64 to 3).

Pure functions; the tier stores that follow a plan are in ``tiers.py``, the profiling pass that
writes a budget table in ``profile.py``.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

f32 = jnp.float32

# The study's profiled MovieGen budget table (spec 3.9), layer 0..29; mean 0.9003. (Recomputed
# from the logged profile scores, to 3 decimals; the study's own table held the full-precision
# values 0.7 + 0.6 * (s - min) / (max - min).)
MOVIEGEN_BUDGETS = (1.300, 1.022, 1.016, 0.878, 0.867, 0.889, 1.013, 0.915, 0.820, 1.016, 0.788,
                    0.889, 0.808, 0.727, 0.710, 0.799, 0.700, 0.757, 0.851, 0.838, 0.856, 0.896,
                    0.878, 0.875, 0.972, 0.919, 0.862, 1.054, 0.979, 1.112)

KINDS = ('hybrid', 'adaptive', 'prune')


def layer_budgets(spec_budget: str, num_layers: int, lo: float = 0.75, hi: float = 1.25) -> np.ndarray:
  """Per-layer budgets [num_layers] float64: 'moviegen' (the study's table, 30 layers), 'linear'
  (the study's ramp lo + (l / (L - 1)) * (hi - lo), in its operation order; 1.0 for one layer, as
  the study), 'auto' (moviegen for 30 layers, else linear), or a path to a JSON profile table."""
  if spec_budget == 'auto':
    spec_budget = 'moviegen' if num_layers == len(MOVIEGEN_BUDGETS) else 'linear'
  if spec_budget == 'moviegen':
    if num_layers != len(MOVIEGEN_BUDGETS):
      raise ValueError(f"budget='moviegen' is the study's 30-layer table; the model has {num_layers} layers")
    return np.asarray(MOVIEGEN_BUDGETS, np.float64)
  if spec_budget == 'linear':
    if num_layers == 1:
      return np.asarray([1.0])
    return np.asarray([lo + (float(l) / float(num_layers - 1)) * (hi - lo) for l in range(num_layers)])
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


def recent_count(n: int, budget: float, recent_ratio: float) -> int:
  """The study's n_recent = clamp(round(min(recent_ratio * budget, 1) * n), 1, n) (0 for n = 0)."""
  if n <= 0:
    return 0
  return min(max(1, int(round(min(float(recent_ratio) * float(budget), 1.0) * n))), n)


def _top_count(ratio: float, budget: float, pool: int) -> int:
  """The study's clamp(round(ratio * budget * pool), 1, pool), 0 for an empty pool or ratio 0."""
  if pool <= 0 or ratio <= 0.0:
    return 0
  return min(pool, max(1, int(round(float(ratio) * float(budget) * pool))))


def tier_counts(n: int, budget: float, kind: str, recent_ratio: float, important_ratio: float,
                retained_ratio: float, always_recent: int = 0) -> tuple[int, int, int]:
  """(n_old, n_imp, n_ret) of a plan over a list of ``n`` chunks.

  The study: the newest n_recent chunks are recent, the other n_old = n - n_recent are old; of
  those, n_imp are important (ADAPTIVE, PRUNE) and of the rest n_ret retained (PRUNE).
  ``always_recent``: the last that many of the n chunks are counted but never old (kvjax's
  ``plan_cadence='ahead'``: the next block, attended exactly); then n_old is the other chunks
  outside the newest n_recent.
  """
  if kind not in KINDS:
    raise ValueError(f'plan kind must be one of {KINDS} (got {kind!r})')
  n_recent = recent_count(n, budget, recent_ratio)
  listed = n - always_recent
  n_old = listed - min(max(n_recent - always_recent, 0), listed)
  if kind == 'hybrid':
    return n_old, 0, 0
  n_imp = _top_count(important_ratio, budget, n_old)
  if kind == 'adaptive':
    return n_old, n_imp, 0
  return n_old, n_imp, _top_count(retained_ratio, budget, n_old - n_imp)


def count_table(budget: float, kind: str, recent_ratio: float, important_ratio: float,
                retained_ratio: float, n_max: int, always_recent: int = 0) -> np.ndarray:
  """[n_max + 1, 3] int32: row n = ``tier_counts(n, ...)`` (n_old, n_imp, n_ret); rows with
  n < always_recent are zero. The compiled plan indexes it with the list length."""
  out = np.zeros((n_max + 1, 3), np.int32)
  for n in range(always_recent, n_max + 1):
    out[n] = tier_counts(n, budget, kind, recent_ratio, important_ratio, retained_ratio,
                         always_recent)
  return out


def plan_counts(n_hist, block, budget, kind, recent_ratio, important_ratio, retained_ratio):
  """Tier sizes of one plan over ``n_hist`` history chunks plus ``block`` chunks that are counted
  but always recent: (history recent, important, retained, pruned, n_old), Python ints.

  ``block=0`` is the study's plan over n_hist chunks."""
  n_hist, block = int(n_hist), int(block)
  n_old, n_imp, n_ret = tier_counts(n_hist + block, budget, kind, recent_ratio, important_ratio,
                                    retained_ratio, always_recent=block)
  pruned = n_old - n_imp - n_ret if kind == 'prune' else 0
  return n_hist - n_old, n_imp, n_ret, pruned, n_old


def block_summaries(k, v, block_frames: int, frame_tokens: int):
  """Chunk summaries [bf, N] of a call's block K/V ([B, bf * P, N, H]): frame_summary(K) +
  frame_summary(V) per frame."""
  b, _, n, h = k.shape
  xk = k.reshape(b, block_frames, frame_tokens, n, h)
  xv = v.reshape(b, block_frames, frame_tokens, n, h)
  return jnp.stack([frame_summary(xk[:, i]) + frame_summary(xv[:, i])
                    for i in range(block_frames)])


def chunk_list(pframe, summ, bf: int, blk_summ=None, block_start=None):
  """One layer's plan list: the planned frames in frame order, then (when ``blk_summ`` is given)
  the block of the call.

  Args:
    pframe: [S] int32 frame of each plan slot (-1: empty); summ: [S, N] float32 summaries.
    bf: block frames; blk_summ: [bf, N] the block's summaries or None; block_start: its frame.
  Returns:
    order [S] (slot of each list row), n_hist, j = arange(S + bf), lframe [S + bf] int32 (-1
    past the list), lsumm [S + bf, N] float32 (0 past the list), n_list.
  """
  s = pframe.shape[0]
  valid = pframe >= 0
  order = jnp.argsort(jnp.where(valid, pframe, jnp.iinfo(jnp.int32).max), stable=True)
  n_hist = jnp.sum(valid).astype(jnp.int32)
  j = jnp.arange(s + bf)
  in_hist = j < n_hist
  pad = jnp.full((bf,), -1, jnp.int32)
  lframe = jnp.where(in_hist, jnp.concatenate([pframe[order], pad]), -1)
  lsumm = jnp.concatenate([summ[order], jnp.zeros((bf,) + summ.shape[1:], f32)])
  lsumm = jnp.where(in_hist[:, None], lsumm, 0.0)
  n_list = n_hist
  if blk_summ is not None:
    bi = j - n_hist
    is_blk = (bi >= 0) & (bi < bf)
    lframe = jnp.where(is_blk, block_start + bi, lframe)
    lsumm = jnp.where(is_blk[:, None], blk_summ[jnp.clip(bi, 0, bf - 1)], lsumm)
    n_list = n_hist + bf
  return order, n_hist, j, lframe, lsumm, n_list


def chunk_deltas(cur, frames, n_cur, prev, prev_frames, prev_n, alignment: str):
  """Relative L1 change of chunk summaries against the previous plan's list.

  Args:
    cur: [C, N] summaries in list (absolute frame) order, first ``n_cur`` valid.
    frames: [C] their frames; prev, prev_frames, prev_n: the previous list.
    alignment: 'tail' pairs the last rows of both lists (the study); 'frame' pairs equal frames.
  Returns:
    [C] float32 deltas mean_h |cur - prev| / max(mean_h |prev|, 1e-6) (1.0 where unpaired, and
    everywhere when there is no previous list, as the study).
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
