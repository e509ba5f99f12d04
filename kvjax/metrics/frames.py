"""Fidelity of decoded videos against a reference video: per-frame PSNR on uint8 RGB.

Frames are [B, T, H, W, 3] uint8 (what the video writer receives, never a re-encoded mp4).
A frame identical to its reference has infinite PSNR; each frame's value is capped at
``PSNR_CAP`` dB so that an average over frames stays finite and comparable (a capped frame
differs from its reference by less than one uint8 level in ~1 pixel in 10^6).
"""

from __future__ import annotations

import numpy as np

PSNR_CAP = 100.0


def frame_psnr(video: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """[B, T, H, W, 3] uint8 x 2 -> [T] PSNR in dB (data range 255, MSE over batch and pixels,
  each frame capped at PSNR_CAP)."""
  a = np.asarray(video, np.float64)
  b = np.asarray(ref, np.float64)
  if a.shape != b.shape or a.ndim != 5:
    raise ValueError(f'videos must be equal [B, T, H, W, 3] arrays, got {a.shape} and {b.shape}')
  mse = np.mean((a - b) ** 2, axis=(0, 2, 3, 4))
  with np.errstate(divide='ignore'):
    out = 10.0 * np.log10(255.0**2 / mse)
  return np.minimum(out, PSNR_CAP)


def video_fidelity(video: np.ndarray, ref: np.ndarray, onset_frames: int) -> dict[str, float]:
  """video_psnr: the mean over all frames (the study's protocol); video_psnr_onset: the mean over
  the first ``onset_frames`` frames (the first block, before rollouts diverge)."""
  per = frame_psnr(video, ref)
  return dict(video_psnr=float(np.mean(per)), video_psnr_onset=float(np.mean(per[:onset_frames])))
