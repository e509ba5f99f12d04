"""Drift summaries (closed form, scipy, a hand-computed VDE), LPIPS (identity, symmetry,
monotonic under growing noise) and the combined video_fidelity."""

import math

import numpy as np
import pytest
from scipy import stats

from kvjax import metrics
from kvjax.metrics import drift, perceptual
from kvjax.metrics.video import video_fidelity


class TestDrift:

  def test_slope_skips_the_first_block_and_matches_scipy(self):
    rng = np.random.default_rng(0)
    t = np.arange(36)
    per = 60.0 - 0.25 * t + rng.normal(0, 0.5, 36)
    per[:3] = metrics.PSNR_CAP                       # the first block at the cap, as in a rollout
    ref = stats.linregress(t[3:], per[3:])
    assert drift.slope(per, 3) == pytest.approx(ref.slope, rel=1e-9, abs=1e-12)
    assert drift.last_window(per, 9) == pytest.approx(per[-9:].mean(), rel=1e-12)
    # Negative control: a fit over every frame is pulled far up by the capped first block.
    assert abs(stats.linregress(t, per).slope - drift.slope(per, 3)) > 0.5

  def test_exact_line_constant_and_too_short(self):
    t = np.arange(12, dtype=np.float64)
    per = np.concatenate([[100.0] * 3, 50.0 - 0.75 * t[3:]])
    assert drift.slope(per, 3) == pytest.approx(-0.75)
    assert drift.last_window(per, 4) == pytest.approx(50.0 - 0.75 * 9.5)
    assert drift.slope(np.full(12, 100.0), 3) == 0.0          # BF16 against itself: exactly 0
    assert np.isnan(drift.slope([40.0, 41.0, 42.0], 3))
    assert drift.last_window([40.0, 41.0, 42.0], 9) == pytest.approx(41.0)

  def test_vde_by_hand(self):
    # chunk means m = 10, 12, 9, 10 x 6, 5: |m_i - m_1| / m_1 = .2 (i=2), .1 (i=3), .5 (i=10).
    m = np.array([10, 12, 9, 10, 10, 10, 10, 10, 10, 5], np.float64)
    # linear weights N - i + 1: 9 x .2 + 8 x .1 + 1 x .5 = 3.1
    assert drift.video_drift_error(m) == pytest.approx(3.1, rel=1e-12)
    # log weights log(N - i + 1): the last chunk weighs log 1 = 0
    assert drift.video_drift_error(m, weights='log') == pytest.approx(
        0.2 * math.log(9) + 0.1 * math.log(8), rel=1e-12)
    # Two frames a chunk give the same chunk means; 11 frames put the extra one in chunk 1.
    assert drift.video_drift_error(np.repeat(m, 2)) == pytest.approx(3.1, rel=1e-12)
    assert drift.video_drift_error(np.concatenate([[10.0], m])) == pytest.approx(3.1, rel=1e-12)
    # Negative controls: no drift is 0, drift that grows scores higher, order matters.
    assert drift.video_drift_error(np.full(30, 7.0)) == 0.0
    assert drift.video_drift_error(m[::-1]) != pytest.approx(3.1)
    assert drift.video_drift_error(np.zeros(10)) == math.inf

  def test_bad_input(self):
    with pytest.raises(ValueError, match='at least 2 chunks'):
      drift.video_drift_error(np.ones(9))
    with pytest.raises(ValueError, match='unknown VDE weights'):
      drift.video_drift_error(np.ones(10), weights='cubic')
    with pytest.raises(ValueError, match='non-empty'):
      drift.slope([], 0)
    with pytest.raises(ValueError, match='window'):
      drift.last_window([1.0], 0)
    assert drift.summary(np.ones(9), 3, 9)['vde'] is None


def _video(rng, b=2, t=4, h=32, w=32):
  """Smooth random frames (a coarse random field enlarged), uint8."""
  coarse = rng.integers(0, 256, (b, t, h // 8, w // 8, 3))
  return np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3).astype(np.uint8)


class TestLpips:

  def test_identity_symmetry_and_growing_noise(self):
    rng = np.random.default_rng(0)
    a = _video(rng)
    assert np.all(np.abs(perceptual.frame_lpips(a, a)) < 1e-9)     # float rounding only
    noisy = [np.clip(a + rng.normal(0, s, a.shape), 0, 255).astype(np.uint8)
             for s in (4, 16, 48, 96)]
    d = [perceptual.frame_lpips(a, n).mean() for n in noisy]
    assert all(x < y for x, y in zip(d, d[1:])), d
    assert d[0] > 0
    np.testing.assert_allclose(perceptual.frame_lpips(noisy[1], a),
                               perceptual.frame_lpips(a, noisy[1]), rtol=1e-5, atol=1e-7)

  def test_small_frames_are_enlarged_and_vgg_is_an_option(self):
    rng = np.random.default_rng(1)
    a = _video(rng, b=1, t=2, h=16, w=16)
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255).astype(np.uint8)
    assert perceptual.upscale_factor(16, 16) == 4 and perceptual.upscale_factor(480, 832) == 1
    alex = perceptual.frame_lpips(a, b)
    vgg = perceptual.frame_lpips(a, b, net='vgg')
    assert alex.shape == vgg.shape == (2,) and np.all(alex > 0) and np.all(vgg > 0)
    assert not np.allclose(alex, vgg)
    with pytest.raises(ValueError, match='unknown LPIPS network'):
      perceptual.frame_lpips(a, b, net='squeeze')


class TestVideoFidelity:

  def test_against_itself_and_a_damaged_copy(self):
    rng = np.random.default_rng(2)
    ref = _video(rng, b=2, t=12, h=16, w=16)
    same, per = video_fidelity(ref, ref.copy(), onset_frames=3, window=6)
    assert same['video_psnr'] == metrics.PSNR_CAP and same['video_ssim'] == pytest.approx(1.0)
    assert abs(same['video_lpips']) < 1e-9 and same['lpips_net'] == 'alex'
    assert same['video_drift']['psnr'] == dict(last_window=metrics.PSNR_CAP, slope=0.0, vde=0.0)
    assert set(per) == {'video_psnr', 'video_ssim', 'video_lpips'}
    assert all(len(v) == 12 for v in per.values())
    # Damage that grows after the first block: onset stays exact, the rest falls and drifts.
    bad = ref.copy()
    for f in range(3, 12):
      bad[:, f] = np.clip(ref[:, f] + rng.normal(0, 4 * f, ref[:, f].shape), 0, 255)
    got, per = video_fidelity(bad, ref, onset_frames=3, window=6)
    assert got['video_psnr_onset'] == metrics.PSNR_CAP > got['video_psnr']
    assert got['video_ssim_onset'] == pytest.approx(1.0) and got['video_ssim'] < 0.95
    assert abs(got['video_lpips_onset']) < 1e-9 and got['video_lpips'] > 1e-3
    assert got['video_drift']['psnr']['slope'] < 0 < got['video_drift']['lpips']['slope']
    assert got['video_drift']['ssim']['vde'] > 0
    lp = np.asarray(per['video_lpips'])
    assert got['video_drift']['lpips']['vde'] == pytest.approx(drift.video_drift_error(1 - lp))
    np.testing.assert_allclose(per['video_psnr'], metrics.frame_psnr(bad, ref))

  def test_bad_input(self):
    v = np.zeros((1, 3, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match='unknown video metric'):
      video_fidelity(v, v, 3, 3, metrics=('psnr', 'fvd'))
    with pytest.raises(ValueError, match='unknown LPIPS network'):
      video_fidelity(v, v, 3, 3, lpips_net='squeeze')
