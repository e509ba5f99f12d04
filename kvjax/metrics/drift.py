"""Drift of a per-frame fidelity curve: how a method's error grows over a long rollout.

A curve is one value per frame, e.g. PSNR [T] of a method's frames against the BF16 rollout's
(``frames.frame_psnr``). Three summaries:

- ``last_window``: the mean over the last ``window`` frames (the attention window: what the
  rollout's newest frames see);
- ``slope``: the least-squares slope over the frames from ``start`` on (per frame; the first block
  attends to no cache and usually equals the reference, so callers start after it);
- ``video_drift_error``: LV-Bench's Video Drift Error (VDE, from the BlockVid paper's benchmark):
  the curve is split into ``chunks`` consecutive chunks (``np.array_split``: the first
  ``T mod chunks`` chunks are one frame longer), each chunk scored by its mean, and
  VDE = sum_{i=2..N} w_i |m_i - m_1| / |m_1| with linear weights w_i = N - i + 1 (the chunk after
  the first weighs N - 1, the last 1) or logarithmic ones w_i = log(N - i + 1). 0 means no drift
  from the first chunk; a first chunk scoring 0 gives inf. LV-Bench applies it to a quality score
  of one video; kvjax applies it to the fidelity curve against the reference, so it measures how
  far the fidelity moves from where it started.
"""

from __future__ import annotations

import numpy as np

VDE_CHUNKS = 10
VDE_WEIGHTS = ('linear', 'log')


def _curve(per_frame) -> np.ndarray:
  per = np.asarray(per_frame, np.float64)
  if per.ndim != 1 or per.size == 0:
    raise ValueError(f'a per-frame curve must be a non-empty [T] array, got shape {per.shape}')
  return per


def last_window(per_frame, window: int) -> float:
  """The mean of the last ``window`` frames (all of them when the curve is shorter)."""
  if window < 1:
    raise ValueError(f'window must be >= 1, got {window}')
  return float(np.mean(_curve(per_frame)[-window:]))


def slope(per_frame, start: int = 0) -> float:
  """Least-squares slope of the curve against the frame index over frames ``start..T-1`` (units
  per frame); NaN with fewer than two such frames. A constant curve gives exactly 0."""
  per = _curve(per_frame)[start:]
  if per.size < 2:
    return float('nan')
  x = np.arange(per.size) - (per.size - 1) / 2.0
  return float(np.sum(x * (per - per.mean())) / np.sum(x * x))


def video_drift_error(per_frame, chunks: int = VDE_CHUNKS, weights: str = 'linear') -> float:
  """LV-Bench's VDE of a per-frame curve (module docstring). Needs at least ``chunks`` frames."""
  per = _curve(per_frame)
  if weights not in VDE_WEIGHTS:
    raise ValueError(f'unknown VDE weights {weights!r}; valid: {VDE_WEIGHTS}')
  if chunks < 2 or per.size < chunks:
    raise ValueError(f'VDE needs at least 2 chunks of one frame each, got {chunks} chunks of a '
                     f'{per.size}-frame curve')
  m = np.array([c.mean() for c in np.array_split(per, chunks)])
  if m[0] == 0:
    return float('inf')
  i = np.arange(2, chunks + 1, dtype=np.float64)
  w = chunks - i + 1 if weights == 'linear' else np.log(chunks - i + 1)
  return float(np.sum(w * np.abs(m[1:] - m[0]) / abs(m[0])))


def summary(per_frame, block_frames: int, window: int, chunks: int = VDE_CHUNKS,
            vde_curve=None) -> dict:
  """{last_window, slope (after the first block), vde (None when the curve is shorter than
  ``chunks`` frames)} of one curve; the VDE of ``vde_curve`` when given (a similarity form of
  the same curve, see ``video.video_fidelity``)."""
  per = _curve(per_frame)
  v = per if vde_curve is None else _curve(vde_curve)
  return dict(last_window=last_window(per, window), slope=slope(per, block_frames),
              vde=video_drift_error(v, chunks) if v.size >= chunks else None)
