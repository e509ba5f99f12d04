"""launch/vbench_eval.py with a stub scorer on a fake sweep folder (real small mp4s, minimal
result.json files), its vbench.csv in launch.aggregate's table, and the CLI without VBench."""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from kvjax import video as video_io
from launch import aggregate, published, vbench_eval
from launch import sweep_table as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ('a red circle', 'a blue square', 'a green triangle')
METHODS = ('BF16', 'RTN_INT4')
T, N = 8, 3                                   # frames of a video, drift prefix
INCOMPLETE, MISSING = 'runs/RTN_INT4/p002_s2', 'runs/BF16/p002_s2'
DIMS = list(vbench_eval.DIMENSIONS)


def _frames(k: int) -> np.ndarray:
  """Run k's video [T, 16, 16, 3] uint8: flat frames getting brighter, red lifted, a dark corner
  growing with k (so the consistency scores differ between runs)."""
  v = np.zeros((T, 16, 16, 3), np.uint8)
  for t in range(T):
    v[t] = 30 + 10 * k + 15 * t
  v[..., 0] += 20
  v[:, :4 + 2 * k, :4] = 10
  return v


def _result(method: str, i: int, k: int) -> dict:
  """result.json with the fields sweep_plan.is_complete and launch.aggregate read."""
  return dict(method=method, config='world', params=1000, seed=i, frames=T, batch=1,
              latent_shape=[1, T, 12, 8, 8], kv_cache_bytes=100 + k, bf16_kv_cache_bytes=400,
              compression_ratio=400 / (100 + k), runtime_s=0.5 + k, peak_memory_bytes=None,
              reference=None if method == 'BF16' else dict(kind='bf16', runtime_s=0.5),
              window_frames=T, sink_frames=0, prompts=[PROMPTS[i]], videos=['video.mp4'],
              fps=16, video_psnr=30.0 + k, video_ssim=0.9, video_lpips=0.1)


def _entry(method: str, i: int) -> dict:
  return dict(method=method, prompt_index=i, prompt=PROMPTS[i], seed=i,
              dir=f'runs/{method}/p{i:03d}_s{i}')


class Stub:
  """A deterministic scorer of each video's pixels; records the frame counts it saw."""

  def __init__(self):
    self.calls = []                 # (dimension, [frames of each video])

  def __call__(self, videos, dimension):
    frames = [video_io.read_mp4(p)[0] for p in videos]
    self.calls.append((dimension, [len(f) for f in frames]))
    return [score(f, dimension) for f in frames]


def score(v: np.ndarray, dimension: str) -> float:
  """v [T, H, W, 3] uint8 -> the stub's value in [0, 1]."""
  v = v.astype(np.float64)
  if dimension == 'imaging_quality':
    return v.mean() / 255
  if dimension == 'aesthetic_quality':
    return v[..., 0].mean() / 255
  if dimension == 'subject_consistency':
    return 1 - np.abs(np.diff(v, axis=0)).mean() / 255
  return 1 - np.abs(v[1:] - v[:1]).mean() / 255          # background: each frame vs the first


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp('vbench_sweep')
  entries = [_entry(m, i) for m in METHODS for i in range(3)]
  for k, e in enumerate(entries):
    if e['dir'] == MISSING:
      continue
    folder = root / e['dir']
    folder.mkdir(parents=True)
    result = _result(e['method'], e['prompt_index'], k)
    if e['dir'] == INCOMPLETE:
      del result['runtime_s']
    (folder / 'result.json').write_text(json.dumps(result))
    pd.DataFrame(dict(frame=range(T), psnr=30.0, video_psnr=30.0, video_ssim=0.9,
                      video_lpips=0.1)).to_csv(folder / 'curves.csv', index=False)
    video_io.write_mp4(str(folder / 'video.mp4'), _frames(k))
  (root / 'sweep.json').write_text(json.dumps(dict(
      format=1, config=dict(prompts_file='prompts.txt', num_prompts=3), fingerprint='test',
      methods=list(METHODS), runs=entries)))
  quiet = contextlib.redirect_stdout(io.StringIO())
  with contextlib.redirect_stderr(io.StringIO()), quiet:
    assert aggregate.run(str(root), None) == 0
  before = pd.read_csv(root / 'table.csv')
  stub, err = Stub(), io.StringIO()
  with contextlib.redirect_stderr(err), quiet:
    assert vbench_eval.run(str(root), ','.join(DIMS), N, stub) == 0
  with contextlib.redirect_stderr(io.StringIO()), quiet:
    assert aggregate.run(str(root), None) == 0
  return root, stub, err.getvalue(), before


def _video(root, run_dir) -> np.ndarray:
  return video_io.read_mp4(str(root / run_dir / 'video.mp4'))[0]


def test_one_row_per_complete_run_with_the_scores(sweep):
  root, _, _, _ = sweep
  got = pd.read_csv(root / 'vbench.csv')
  assert list(got.columns) == [*vbench_eval.KEYS, *DIMS, vbench_eval.DRIFT, 'drift_frames']
  complete = [f'runs/{m}/p{i:03d}_s{i}' for m in METHODS for i in range(2)]
  assert list(got.dir) == complete
  assert list(got.method) == ['BF16', 'BF16', 'RTN_INT4', 'RTN_INT4']
  assert list(got.prompt_index) == [0, 1, 0, 1] and list(got.seed) == [0, 1, 0, 1]
  assert list(got.videos) == [1] * 4
  for _, row in got.iterrows():
    v = _video(root, row.dir)
    for d in DIMS:
      assert row[d] == pytest.approx(score(v, d), rel=1e-12), (row.dir, d)
  assert got[DIMS].nunique().min() == 4                   # every run's value differs
  assert not [p for p in os.listdir(root) if p.startswith('.')]     # no temporary left


def test_incomplete_runs_skipped_and_reported(sweep):
  _, _, err, _ = sweep
  lines = err.strip().splitlines()
  assert len(lines) == 2
  assert lines[0].startswith(f'vbench_eval: skipped {MISSING}: incomplete')
  assert lines[1].startswith(f'vbench_eval: skipped {INCOMPLETE}: incomplete')


def test_drift_scores_the_prefix(sweep):
  root, stub, _, _ = sweep
  assert stub.calls == [(d, [T] * 4) for d in DIMS] + [('imaging_quality', [N] * 4)]
  got = pd.read_csv(root / 'vbench.csv')
  assert list(got.drift_frames) == [N] * 4
  for _, row in got.iterrows():
    v = _video(root, row.dir)
    want = score(v[:N], 'imaging_quality')              # the prefix is re-encoded: near, not equal
    assert row.drift_imaging_quality == pytest.approx(want, abs=0.01)
    assert abs(row.drift_imaging_quality - row.imaging_quality) > 0.1   # not the whole video


def test_default_drift_is_the_whole_video_and_caps_clip(sweep, tmp_path, capsys):
  root, _, _, _ = sweep
  for cap in (None, 100):
    stub = Stub()
    assert vbench_eval.run(str(root), 'imaging_quality', cap, stub) == 0
    assert stub.calls == [('imaging_quality', [T] * 4)] * 2
    got = pd.read_csv(root / 'vbench.csv')
    assert list(got.columns) == [*vbench_eval.KEYS, 'imaging_quality', vbench_eval.DRIFT,
                                 'drift_frames']
    assert list(got.drift_frames) == [T] * 4
    assert np.allclose(got.drift_imaging_quality, got.imaging_quality, atol=0.01)
  capsys.readouterr()
  # Restores the fixture's file for the other tests (a rerun overwrites).
  assert vbench_eval.run(str(root), ','.join(DIMS), N, Stub()) == 0


def test_aggregate_adds_the_method_means(sweep):
  root, _, _, before = sweep
  assert not set(st.VBENCH) & set(before.columns) and 'vbench_runs' not in before.columns
  table = pd.read_csv(root / 'table.csv').set_index('method')
  assert list(table.index) == ['BF16', 'RTN_INT4']
  assert list(table.runs) == ['2/3', '2/3'] and list(table.vbench_runs) == ['2/2', '2/2']
  for m in METHODS:
    videos = [_video(root, f'runs/{m}/p{i:03d}_s{i}') for i in range(2)]
    for d in DIMS:
      assert table.loc[m, d] == pytest.approx(np.mean([score(v, d) for v in videos]), abs=1e-4)
    drift = np.mean([score(v[:N], 'imaging_quality') for v in videos])
    assert table.loc[m, vbench_eval.DRIFT] == pytest.approx(drift, abs=0.01)
  assert not any(c.startswith('paper_') for c in table.columns)      # the protocol differs
  md, page = (root / 'table.md').read_text(), (root / 'report.html').read_text()
  for header in ('VBench runs', 'imaging', 'aesthetic', 'subject cons.', 'bg cons.',
                 'drift imaging'):
    assert f' {header} |' in md and f'>{header}<' in page, header


def test_vbench_means_cover_scored_complete_runs_and_paper_columns():
  runs = [st.Run('RTN_INT4', i, PROMPTS[i], i, f'runs/RTN_INT4/p{i:03d}_s{i}', status='ok',
                 result=_result('RTN_INT4', i, i)) for i in range(2)]
  runs.append(st.Run('RTN_INT4', 2, PROMPTS[2], 2, 'runs/RTN_INT4/p002_s2'))    # missing
  scores = pd.DataFrame(dict(dir=['runs/RTN_INT4/p000_s0', 'runs/RTN_INT4/p002_s2'],
                             imaging_quality=[0.5, 0.9]))                     # a stale row
  row = st.build_table(['RTN_INT4'], runs, published.table('moviegen'), scores).iloc[0]
  assert (row.runs, row.vbench_runs, row.imaging_quality) == ('2/3', '1/2', 0.5)
  assert np.isnan(row.aesthetic_quality) and np.isnan(row.drift_imaging_quality)
  assert (row.paper_imaging_quality, row.paper_drift_imaging_quality) == (0.7353, 0.7341)
  plain = st.build_table(['RTN_INT4'], runs, published.table('moviegen'))
  assert 'paper_ssim' in plain and 'paper_imaging_quality' not in plain


def test_broken_vbench_csv_is_left_out(tmp_path):
  assert st.load_vbench(str(tmp_path)) == (None, '')
  (tmp_path / 'vbench.csv').write_text('method,imaging_quality\nBF16,0.5\n')
  assert st.load_vbench(str(tmp_path)) == (None, 'vbench.csv has no dir column')
  (tmp_path / 'vbench.csv').write_text('dir,imaging_quality\nruns/x,high\n')
  assert st.load_vbench(str(tmp_path)) == (None, 'vbench.csv has non-numeric imaging_quality')


@pytest.mark.parametrize('dims, cap, message', [
    ('imaging_quality,overall_consistency', None, 'error: --dimensions: overall_consistency not '
     'supported'),
    (' , ', None, 'error: --dimensions is empty'),
    ('imaging_quality', 0, 'error: --drift_frames must be >= 1')])
def test_bad_input_is_one_error_line(sweep, capsys, dims, cap, message):
  root, _, _, _ = sweep
  before = os.stat(root / 'vbench.csv').st_mtime_ns
  stub = Stub()
  assert vbench_eval.run(str(root), dims, cap, stub) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(message), err
  assert stub.calls == [] and os.stat(root / 'vbench.csv').st_mtime_ns == before


def test_cli_without_vbench_is_one_error_line(sweep, tmp_path):
  if importlib.util.find_spec('vbench') is not None:
    pytest.skip('vbench is installed')
  root, _, _, _ = sweep
  before = os.stat(root / 'vbench.csv').st_mtime_ns
  p = subprocess.run([sys.executable, '-m', 'launch.vbench_eval', f'--sweep_dir={root}',
                      '--drift_frames=3'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and p.stdout == '', p.stderr
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      'error: VBench is not installed (pip install vbench; it needs a CUDA GPU and downloads its '
      'weights)'), p.stderr
  assert os.stat(root / 'vbench.csv').st_mtime_ns == before
  p = subprocess.run([sys.executable, '-m', 'launch.vbench_eval', f'--sweep_dir={tmp_path}'],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and p.stderr.startswith('error: ') and 'no sweep.json' in p.stderr


def test_real_vbench_scores_a_video(tmp_path):
  """Needs the optional package, a CUDA GPU and VBench's weights (downloaded on first use)."""
  pytest.importorskip('vbench')
  torch = pytest.importorskip('torch')
  if not torch.cuda.is_available():
    pytest.skip('VBench needs a CUDA GPU')
  path = video_io.write_mp4(str(tmp_path / 'v.mp4'), _frames(0).repeat(4, axis=1).repeat(4, axis=2))
  scores = vbench_eval.VBenchScorer()([path, path], 'imaging_quality')
  assert len(scores) == 2 and 0 <= scores[0] <= 1 and scores[0] == pytest.approx(scores[1])
