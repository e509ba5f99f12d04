"""The launcher with a real text encoder and VAE: --checkpoint + --wan_dir + --prompt writes
video.mp4 beside result.json; bad prompts / wan_dir fail in ``run.resolve`` before any work."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs.self_forcing import get_config
from kvjax import checkpoint as ckpt
from kvjax import metrics
from kvjax import run
from kvjax import runconfig
from kvjax import video as video_io
from kvjax import wan_dir
from ports import convert
from tests.conftest import rel_err, requires_torch

pytestmark = requires_torch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '--config=configs/self_forcing.py:tiny'   # --wan_dir / --checkpoint belong to the Wan configs


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A tiny Wan2.1 folder and the Self-Forcing-format DiT converted from the same model."""
  from tests import wan_fixtures as wf
  root = tmp_path_factory.mktemp('launch_wan')
  models = wf.make_wan_folder(str(root / 'Wan2.1-T2V-1.3B'))
  wf.save_self_forcing(str(root / 'self_forcing_dmd.pt'), models['dit'])
  assert convert.main([f'--src={root / "self_forcing_dmd.pt"}', f'--dst={root / "ckpt"}',
                       '--num_heads=2', '--dtype=float32']) == 0
  return dict(root=root, wan=str(root / 'Wan2.1-T2V-1.3B'), ckpt=str(root / 'ckpt'))


def _resolve(setup, outdir=None, **kw):
  return run.resolve(runconfig.override(get_config('tiny'), **{
      **dict(checkpoint=setup['ckpt'], wan_dir=setup['wan'], reference='none',
             compute_dtype='float32'), **kw}), outdir=outdir)


def test_cli_prompt_to_video(setup, tmp_path):
  out = tmp_path / 'run'
  p = subprocess.run([sys.executable, '-m', 'kvjax.launch', '--method=bf16', TINY,
                      f'--checkpoint={setup["ckpt"]}', f'--wan_dir={setup["wan"]}',
                      '--prompt=a cat runs on the beach at sunset', '--reference=none',
                      f'--outdir={out}', '--noprogress'], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr
  res = json.loads((out / 'result.json').read_text())
  assert res['videos'] == ['video.mp4'] and res['fps'] == 16
  assert res['prompts'] == ['a cat runs on the beach at sunset'] and res['text_encoder_freed']
  assert res['video_frames'] == 1 + 4 * 8
  frames, fps = video_io.read_mp4(str(out / 'video.mp4'))
  assert frames.shape == (33, 64, 64, 3) and fps == 16.0
  assert 'video.mp4' in p.stdout
  assert not [f for f in os.listdir(tmp_path) if '.partial-' in f]


def test_prompt_conditioning_and_video_are_the_encoder_and_vae_outputs(setup, tmp_path):
  """A prompt run equals a run fed the encoder's states as --text_states; its video is the VAE
  decode of its latents (mp4 is lossy: compared after uint8 conversion, small mean error)."""
  prompt = 'the red dog runs in the city at night'
  a = run.generate(_resolve(setup, prompt=prompt, outdir=str(tmp_path / 'a')), progress=False)
  wd = wan_dir.inspect(setup['wan'])
  text_len = ckpt.read_config(setup['ckpt']).text_len     # 512: no config.json beside the .pt
  enc = wan_dir.load_text_encoder(wd, text_len=text_len, dtype='float32')
  np.save(tmp_path / 'states.npy', enc.encode([prompt]))
  b = run.generate(_resolve(setup, text_states=str(tmp_path / 'states.npy'), outdir=str(tmp_path / 'b')),
                   progress=False)
  la, lb = np.load(tmp_path / 'a' / 'latents.npy'), np.load(tmp_path / 'b' / 'latents.npy')
  np.testing.assert_array_equal(la, lb)
  other = run.generate(_resolve(setup, prompt='blue sea', outdir=str(tmp_path / 'c')), progress=False)
  assert rel_err(np.load(tmp_path / 'c' / 'latents.npy'), la) > 1e-3     # the prompt matters
  dec = wan_dir.load_vae(wd)
  want = video_io.to_uint8(dec.decode(la))[0].astype(np.float32)
  got, _ = video_io.read_mp4(str(tmp_path / 'a' / 'video.mp4'))
  assert got.shape == want.shape
  corr = lambda u, v: float(np.corrcoef(u.mean(-1).ravel(), v.mean(-1).ravel())[0, 1])
  # H.264 with 4:2:0 chroma is lossy on the random model's noise-like frames: compare luma-like
  # means. Measured: correlation 0.94 with the decode of these latents, 0.23 with the decode of
  # the same latents in reversed frame order (the negative control); mean |error| 12 vs 28.
  wrong = video_io.to_uint8(dec.decode(la[:, ::-1]))[0].astype(np.float32)
  assert corr(got, want) > 0.85 and corr(got, wrong) < 0.5
  assert np.abs(got - want).mean() < 0.6 * np.abs(got - wrong).mean()
  assert a['text_len'] == 512 and b.get('prompts') is None and other['videos'] == ['video.mp4']


class TestBadInput:

  def test_prompt_needs_wan_dir_and_excludes_text_states(self, setup, tmp_path):
    with pytest.raises(ValueError, match='need --wan_dir'):
      run.resolve(runconfig.override(get_config('tiny'), prompt='a cat'))
    np.save(tmp_path / 's.npy', np.zeros((1, 512, 32), np.float32))
    with pytest.raises(ValueError, match='or --text_states, not both'):
      _resolve(setup, prompt='a cat', text_states=str(tmp_path / 's.npy'))

  def test_wan_dir_missing_parts(self, setup, tmp_path):
    broken = tmp_path / 'wan'
    shutil.copytree(setup['wan'], broken)
    os.remove(broken / 'models_t5_umt5-xxl-enc-bf16.pth')
    with pytest.raises(FileNotFoundError, match=r'missing: models_t5_umt5-xxl-enc-bf16.pth'):
      run.resolve(runconfig.override(get_config('tiny'), wan_dir=str(broken), prompt='a cat'))
    # Without a prompt only the VAE is needed.
    s = run.resolve(runconfig.override(get_config('tiny'), wan_dir=str(broken)))
    assert s.wan_dir.layout == 'wan' and s.prompts is None

  def test_sizes_must_match_the_dit(self, setup):
    cfg = get_config('tiny')
    cfg.model.text_dim = 48
    with pytest.raises(ValueError, match='gives 32-wide states, the DiT expects text_dim=48'):
      run.resolve(runconfig.override(cfg, wan_dir=setup['wan'], prompt='a cat'))

  def test_prompts_file_sets_the_batch(self, setup, tmp_path):
    (tmp_path / 'p.txt').write_text('a cat\nthe sea\n')
    s = _resolve(setup, prompts_file=str(tmp_path / 'p.txt'))
    assert s.batch == 2 and s.spec.batch == 2 and s.prompts == ['a cat', 'the sea']

  def test_cli_fails_before_work(self, setup, tmp_path):
    out = tmp_path / 'never'
    p = subprocess.run([sys.executable, '-m', 'kvjax.launch', TINY, f'--wan_dir={tmp_path / "nope"}',
                        '--prompt=a cat', f'--outdir={out}'], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and '--wan_dir not found' in p.stderr and not out.exists()


def test_video_metrics_on_the_vae_frames(setup, tmp_path):
  """With --wan_dir and a reference, PSNR/SSIM/LPIPS are scored on the VAE's frames of both
  rollouts: the first block (9 frames, attending to no cache) equals the reference's, and the
  whole-video PSNR is what an independent decode of both latents gives."""
  s = run.resolve(runconfig.override(get_config('tiny'), checkpoint=setup['ckpt'],
                                     wan_dir=setup['wan'], method='rtn_int2', reference='bf16',
                                     prompt='a cat',
                                     compute_dtype='float32'), outdir=str(tmp_path / 'q'))
  q = run.generate(s, progress=False)
  ref = run.generate(_resolve(setup, method='bf16', outdir=str(tmp_path / 'r'), prompt='a cat'),
                     progress=False)
  assert q['first_block_frames'] == 9 and q['video_frames'] == 1 + 4 * 8
  assert q['video_psnr_onset'] == metrics.PSNR_CAP > q['video_psnr']
  assert q['video_ssim_onset'] == pytest.approx(1.0) and 0 < q['video_ssim'] < 1
  assert q['video_lpips'] > 0 and set(q['video_drift']) == {'psnr', 'ssim', 'lpips'}
  dec = wan_dir.load_vae(wan_dir.inspect(setup['wan']))
  u8 = lambda lat: video_io.to_uint8(dec.decode(lat))
  lq, lr = (np.load(tmp_path / n / 'latents.npy') for n in ('q', 'r'))
  want = metrics.frame_psnr(u8(lq), u8(lr)).mean()
  assert q['video_psnr'] == pytest.approx(want, abs=0.05)
  # Negative control: against the reference's frames in reverse order the PSNR is far off.
  assert abs(metrics.frame_psnr(u8(lq), u8(lr[:, ::-1])).mean() - want) > 1.0
  assert 'video_psnr' not in ref                   # BF16 itself has no reference
