"""Latent-space fidelity of a rollout against a reference rollout with the same noise.

All inputs are latents [B, F, C, h, w]; statistics are float64 numpy.
"""

from __future__ import annotations

import numpy as np


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float) -> float:
  """10 log10(range^2 / MSE); +inf when identical."""
  mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(ref, np.float64)) ** 2))
  return float('inf') if mse == 0.0 else float(10.0 * np.log10(data_range**2 / mse))


def rel_l2(x: np.ndarray, ref: np.ndarray) -> float:
  """||x - ref|| / ||ref||."""
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def _range(ref: np.ndarray) -> float:
  return float(np.max(ref) - np.min(ref)) or 1.0


def per_frame_curves(latents: np.ndarray, ref: np.ndarray | None = None) -> dict[str, list]:
  """Per-latent-frame curves (over batch, channels, space).

  Returns:
    dict of equal-length lists: frame, rms, and with a reference rel_l2, psnr (data range =
    the reference clip's max - min), max_abs_err.
  """
  lat = np.asarray(latents, np.float64)
  nf = lat.shape[1]
  out = {'frame': list(range(nf)),
         'rms': [float(np.sqrt(np.mean(lat[:, f] ** 2))) for f in range(nf)]}
  if ref is not None:
    ref = np.asarray(ref, np.float64)
    if ref.shape != lat.shape:
      raise ValueError(f'reference latents {ref.shape} do not match {lat.shape}')
    dr = _range(ref)
    out['rel_l2'] = [rel_l2(lat[:, f], ref[:, f]) for f in range(nf)]
    out['psnr'] = [psnr(lat[:, f], ref[:, f], dr) for f in range(nf)]
    out['max_abs_err'] = [float(np.max(np.abs(lat[:, f] - ref[:, f]))) for f in range(nf)]
  return out


def latent_fidelity(latents: np.ndarray, ref: np.ndarray) -> dict[str, float]:
  """Whole-clip latent PSNR, relative L2 error, and drift (rel. error of the last block / first).

  ``latent_drift`` is the ratio of the relative error of the last third of the frames to that
  of the first third: > 1 means the error grows along the rollout.
  """
  lat = np.asarray(latents, np.float64)
  ref = np.asarray(ref, np.float64)
  nf = lat.shape[1]
  k = max(1, nf // 3)
  first, last = rel_l2(lat[:, :k], ref[:, :k]), rel_l2(lat[:, -k:], ref[:, -k:])
  return dict(latent_psnr=psnr(lat, ref, _range(ref)), latent_rel_l2=rel_l2(lat, ref),
              latent_max_abs_err=float(np.max(np.abs(lat - ref))),
              latent_drift=(last / first) if first > 0 else (0.0 if last == 0 else float('inf')))
