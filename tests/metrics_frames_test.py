"""Frame metrics against scikit-image, the study's own implementation (an independent reference)."""

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kvjax import metrics


def _skimage_ssim(a, b):
  """The study's call: uint8 RGB, 7x7 window, sample covariance, data range 255, channel mean."""
  return structural_similarity(a, b, win_size=7, data_range=255, channel_axis=-1)


def _pairs(rng):
  """[B, T, H, W, 3] uint8 video pairs: uniform noise, smooth images with a little noise, a
  saturated video (0 and 255 only), constant frames, an identical pair, a non-square shape."""
  h, w = 16, 24
  noise = rng.integers(0, 256, (2, 3, h, w, 3), dtype=np.uint8)
  yy, xx = np.mgrid[0:h, 0:w]
  smooth = np.stack([np.sin(xx / 3.0 + c) * 100 + yy * 4 + 20 for c in range(3)], -1)
  smooth = np.broadcast_to(smooth, (2, 3, h, w, 3))
  smooth_b = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
  sat = (rng.random((1, 2, h, w, 3)) < 0.5).astype(np.uint8) * 255
  const = np.full((1, 2, h, w, 3), 200, np.uint8)
  return [
      (noise, rng.integers(0, 256, noise.shape, dtype=np.uint8)),
      (np.clip(smooth, 0, 255).astype(np.uint8), smooth_b),
      (sat, 255 - sat),
      (const, np.full_like(const, 37)),
      (smooth_b, smooth_b.copy()),
      (rng.integers(0, 256, (1, 2, 9, 40, 3), dtype=np.uint8),
       rng.integers(0, 256, (1, 2, 9, 40, 3), dtype=np.uint8)),
  ]


def test_ssim_matches_scikit_image_per_frame():
  rng = np.random.default_rng(0)
  for a, b in _pairs(rng):
    got = metrics.frame_ssim(a, b)
    want = np.array([np.mean([_skimage_ssim(a[i, t], b[i, t]) for i in range(a.shape[0])])
                     for t in range(a.shape[1])])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # Negative controls: the other common SSIM settings (a 5x5 window; population covariance,
  # 1.8e-4 away here; Wang et al.'s Gaussian window) differ from the study's by more than the
  # tolerance.
  a = _pairs(np.random.default_rng(0))[1][0][:1, :1]
  b = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)      # SSIM ~ 0.5
  ours = metrics.frame_ssim(a, b)[0]
  a, b = a[0, 0], b[0, 0]
  for kw in (dict(win_size=5), dict(use_sample_covariance=False),
             dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)):
    other = structural_similarity(a, b, data_range=255, channel_axis=-1, **{'win_size': 7, **kw})
    assert abs(ours - other) > 1e-4, kw                 # the tolerance above


def test_psnr_matches_scikit_image_per_frame():
  rng = np.random.default_rng(1)
  for a, b in _pairs(rng)[:4]:
    got = metrics.frame_psnr(a, b)
    want = [peak_signal_noise_ratio(a[:, t], b[:, t], data_range=255) for t in range(a.shape[1])]
    np.testing.assert_allclose(got, want, atol=1e-6)
  same = rng.integers(0, 256, (1, 2, 8, 8, 3), dtype=np.uint8)
  assert np.all(metrics.frame_psnr(same, same) == metrics.PSNR_CAP)


def test_ssim_bad_input():
  a = np.zeros((1, 2, 6, 16, 3), np.uint8)
  with pytest.raises(ValueError, match='at least 7x7'):
    metrics.frame_ssim(a, a)
  with pytest.raises(ValueError, match='equal'):
    metrics.frame_ssim(np.zeros((1, 2, 8, 8, 3), np.uint8), np.zeros((1, 3, 8, 8, 3), np.uint8))
