"""A method's decoded video against the reference's: every frame metric, both protocols, drift.

``video_fidelity(video, ref, onset_frames, window)`` scores uint8 [B, T, H, W, 3] frames (what
the video writer receives, never a re-encoded mp4) with

- PSNR (``frames.frame_psnr``, each frame capped at ``PSNR_CAP``), SSIM (``frames.frame_ssim``,
  scikit-image's as the study called it) and LPIPS (``perceptual.frame_lpips``, AlexNet as the
  study; ``lpips_net='vgg'``), one value per frame (the mean over the batch);
- two protocols: the study's, the mean over all frames (``video_<m>``), and the onset protocol,
  the mean over the first block (``video_<m>_onset``: frames that attend to no cache, before
  rollouts diverge; whole-video PSNR of a long rollout mostly measures divergence, and its
  capped identical frames lift the all-frames mean);
- drift per metric (``drift.summary``): the last-window mean, the slope after the first block,
  LV-Bench's VDE over 10 chunks (``video_drift``). VDE is a relative change from the first
  chunk, made for scores where higher is better; LPIPS is a distance whose first chunk is ~0
  when the first block equals the reference (measured: 3e-16, which gave a VDE of 263 for a
  curve whose PSNR VDE was 34), so its VDE is taken of the similarity 1 - LPIPS.

Returns the scalars for result.json and the per-frame curves for curves.csv.
"""

from __future__ import annotations

import numpy as np

from kvjax.metrics import drift
from kvjax.metrics.frames import frame_psnr, frame_ssim
from kvjax.metrics.perceptual import LPIPS_NETS, frame_lpips

METRICS = ('psnr', 'ssim', 'lpips')


def video_fidelity(video: np.ndarray, ref: np.ndarray, onset_frames: int, window: int,
                   metrics: tuple[str, ...] = METRICS,
                   lpips_net: str = 'alex') -> tuple[dict, dict[str, list[float]]]:
  """(scalars, per-frame curves) of ``video`` against ``ref`` (module docstring).

  Args:
    video, ref: [B, T, H, W, 3] uint8.
    onset_frames: frames of the onset protocol (the first block); window: frames of the drift's
      last window (the attention window; the whole video when it is -1 or longer).
    metrics: a subset of METRICS.
  """
  bad = [m for m in metrics if m not in METRICS]
  if bad:
    raise ValueError(f'unknown video metric(s) {bad}; valid: {list(METRICS)}')
  if lpips_net not in LPIPS_NETS:
    raise ValueError(f'unknown LPIPS network {lpips_net!r}; valid: {sorted(LPIPS_NETS)}')
  fns = dict(psnr=frame_psnr, ssim=frame_ssim,
             lpips=lambda a, b: frame_lpips(a, b, net=lpips_net))
  t = np.asarray(video).shape[1]
  window = t if window < 1 else min(window, t)
  onset = max(1, min(onset_frames, t))
  scalars: dict = {}
  curves: dict[str, list[float]] = {}
  summaries = {}
  for m in metrics:
    per = np.asarray(fns[m](video, ref), np.float64)
    curves[f'video_{m}'] = [float(x) for x in per]
    scalars[f'video_{m}'] = float(per.mean())
    scalars[f'video_{m}_onset'] = float(per[:onset].mean())
    summaries[m] = drift.summary(per, onset_frames, window,
                                 vde_curve=1.0 - per if m == 'lpips' else None)
  scalars['video_drift'] = summaries
  if 'lpips' in metrics:
    scalars['lpips_net'] = lpips_net
  return scalars, curves
