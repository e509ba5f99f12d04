"""launch/aggregate.py on a real sweep folder: 3 methods x 2 prompts of the world model (made once
through kvjax.run), one corrupt run and one missing; table, plots, video grid, report, bad input."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from configs.self_forcing import get_config
from kvjax import cache as kvcache
from kvjax import files
from kvjax import run, runconfig
from kvjax import video as video_io
from configs.sweeps import study
from launch import aggregate, published, sweep_plan
from launch import sweep_table as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ('a red circle bouncing on a gray background',
           'a blue square bouncing on a yellow background')
METHODS = ('KIVI_INT2', 'BF16', 'RTN_INT4')          # sweep order; the table's is the study's
CORRUPT, MISSING = 'runs/RTN_INT4/p002_s2', 'runs/KIVI_INT2/p002_s2'


def _entry(method, i):
  return dict(method=method, prompt_index=i, prompt=PROMPTS[i % 2], seed=i,
              dir=f'runs/{method}/p{i:03d}_s{i}')


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp('sweep')
  refs = str(root / 'references')
  entries = [_entry(m, i) for m in METHODS for i in range(2)]
  for e in entries:
    config = runconfig.override(get_config('world'), method=e['method'], prompt=e['prompt'],
                                seed=e['seed'], reference_dir=refs)
    s = run.resolve(config, outdir=str(root / e['dir']))
    run.generate(s, progress=False)
  shutil.copytree(root / 'runs/RTN_INT4/p000_s0', root / CORRUPT)     # then truncated
  text = (root / CORRUPT / 'result.json').read_text()
  (root / CORRUPT / 'result.json').write_text(text[:len(text) // 2])
  entries += [_entry('RTN_INT4', 2), _entry('KIVI_INT2', 2)]          # the latter has no folder
  # sweep.json as launch.sweep writes it (the plan's order: BF16 first, then the list's).
  (root / 'prompts.txt').write_text('\n'.join([*PROMPTS, PROMPTS[0]]) + '\n')
  c = study.get_config('world')
  c.methods, c.prompts_file, c.num_prompts = ','.join(METHODS), str(root / 'prompts.txt'), 3
  plan = {r.dir: r for r in sweep_plan.plan(c)}      # the entries: 8 of its 9 runs
  planned = [plan[e['dir']] for e in entries]
  files.write_json(str(root / 'sweep.json'), sweep_plan.sweep_json(c, planned))
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    assert aggregate.run(str(root), None) == 0
  return root, err.getvalue()


def _results(root, method):
  out = []
  for i in range(2):
    with open(root / f'runs/{method}/p{i:03d}_s{i}/result.json') as f:
      out.append(json.load(f))
  return out


def test_rows_in_study_order_with_coverage(sweep):
  root, _ = sweep
  t = pd.read_csv(root / 'table.csv')
  assert list(t.method) == ['BF16', 'RTN_INT4', 'KIVI_INT2']
  assert list(t.runs) == ['2/2', '2/3', '2/3']
  assert list(t.family) == ['BF16', 'RTN', 'KIVI']
  assert not any(c.startswith('paper_') for c in t.columns)      # the protocol differs


def test_numbers_are_the_means_of_the_result_files(sweep):
  root, _ = sweep
  t = pd.read_csv(root / 'table.csv').set_index('method')
  bf16 = _results(root, 'BF16')
  for m in ('RTN_INT4', 'KIVI_INT2'):
    res, row = _results(root, m), t.loc[m]
    def mean(key, res=res):
      return sum(r[key] for r in res) / len(res)
    for key in ('compression_ratio', 'study_compression_ratio', 'kv_cache_bytes', 'runtime_s',
                'latent_psnr'):
      assert row[key] == pytest.approx(mean(key), rel=1e-9), key
    for key in ('psnr', 'ssim', 'lpips', 'psnr_onset', 'ssim_onset', 'lpips_onset'):
      assert row[key] == pytest.approx(mean(f'video_{key}'), rel=1e-9), key
    assert row.psnr_last_window == pytest.approx(
        sum(r['video_drift']['psnr']['last_window'] for r in res) / 2, rel=1e-9)
    assert row.psnr_slope == pytest.approx(
        sum(r['video_drift']['psnr']['slope'] for r in res) / 2, rel=1e-9)
    assert row.runtime_vs_bf16 == pytest.approx(
        mean('runtime_s') / (sum(r['runtime_s'] for r in bf16) / 2), rel=1e-9)
    assert np.isnan(row.peak_memory_gib) and np.isnan(row.psnr_vde)   # CPU; 9 frames < 10
  assert np.isnan(t.loc['BF16'].ssim) and t.loc['BF16'].runtime_vs_bf16 == 1.0


def test_corrupt_run_left_out_and_reported(sweep):
  root, err = sweep
  assert re.search(f'corrupt run {CORRUPT}: result.json is not JSON', err)
  md, page = (root / 'table.md').read_text(), (root / 'report.html').read_text()
  assert f'corrupt {CORRUPT}' in md and f'corrupt {CORRUPT}' in page
  assert '1 missing, 1 corrupt' in md and f'missing {MISSING}' in page
  assert '2 of 8 runs missing or corrupt' in md                  # the protocol note says so


def test_report_is_self_contained_and_complete(sweep):
  root, _ = sweep
  page = (root / 'report.html').read_text()
  srcs = re.findall(r'<(?:img|video)[^>]* src="([^"]+)"', page)
  assert {'pareto.png', 'drift.png', 'videos.mp4'} <= set(srcs)
  assert any(s.endswith('/video.mp4') for s in srcs)
  for s in srcs:
    assert (root / s).is_file(), s
  assert not re.search(r'(src|href)="(https?:)?//', page) and '<script>' in page
  for m in METHODS:
    assert f'<td>{m}</td>' in page
  assert 'protocol differs' in page and 'Published numbers' in page


def test_pngs_and_video_grid(sweep):
  root, _ = sweep
  pngs = sorted(p for p in os.listdir(root) if p.endswith('.png'))
  assert pngs == ['drift.png', 'drift_methods.png', 'frame_metrics.png', 'memory_runtime.png',
                  'pareto.png']
  for p in pngs:
    assert (root / p).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with Image.open(root / p) as im:
      im.verify()
  frames, _ = video_io.read_mp4(str(root / 'videos.mp4'))     # BF16, best, worst: 3 columns
  assert frames.shape == (9, 24 + 2 * 256, 48 + 3 * 256, 3)
  assert not [p for p in os.listdir(root) if p.startswith('.')]    # no temporary left


@pytest.mark.parametrize('case', ['no_sweep_json', 'not_a_sweep', 'unknown_video'])
def test_bad_input_is_one_error_line(sweep, tmp_path, case):
  root, _ = sweep
  target, extra = str(tmp_path), []
  if case == 'not_a_sweep':
    (tmp_path / 'sweep.json').write_text('[1, 2]')
  if case == 'unknown_video':
    target, extra = str(root), ['--videos=bf16,NO_SUCH_METHOD']
  before = os.stat(root / 'table.csv').st_mtime_ns
  p = subprocess.run([sys.executable, '-m', 'launch.aggregate', f'--sweep_dir={target}', *extra],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and p.stdout == ''
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), p.stderr
  assert os.stat(root / 'table.csv').st_mtime_ns == before


def test_unwritable_folder_and_videos_not_in_sweep(sweep, monkeypatch, capsys):
  root, _ = sweep
  assert aggregate.run(str(root), 'qvg_int2') == 2                  # a method, not this sweep's

  def read_only(*args, **kwargs):                 # what a read-only mount answers
    raise OSError(30, 'Read-only file system')

  monkeypatch.setattr(files.tempfile, 'mkdtemp', read_only)
  assert aggregate.run(str(root), None) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ['error: --videos: QVG_INT2 is not a method of this sweep (BF16, RTN_INT4, '
                 'KIVI_INT2)', f'error: cannot write into {root} (Read-only file system)']


def test_protocol_match_and_psnr_rule():
  res = dict(config='wan2.1_t2v_1.3b_long', params=1_418_996_800, checkpoint='ckpt',
             latent_shape=[1, 42, 16, 60, 104], frames=42, window_frames=21, sink_frames=0,
             reference=dict(kind='bf16'), video_ssim=0.5, compute_dtype='bfloat16',
             method='RTN_INT4', method_params=kvcache.get('RTN_INT4').params())
  config = dict(prompts_file='prompts/MovieGenVideoBench_extended.txt')
  runs = [(dict(method='RTN_INT4', prompt_index=i, seed=i), res) for i in range(10)]
  assert published.protocol_differences(config, runs) == []
  # What changes numbers besides the geometry: the dtype, the reference, the method's arguments.
  for change, phrase in ((dict(compute_dtype='float32'), 'dtype (float32'),
                         (dict(reference=dict(kind='torch')), 'reference (torch'),
                         (dict(method_params=dict(res['method_params'], group_size=64)),
                          'method parameters (RTN_INT4')):
    got = published.protocol_differences(config, [(r, dict(x, **change)) for r, x in runs])
    assert len(got) == 1 and got[0].startswith(phrase), got
  shifted = [(dict(r, seed=r['seed'] + 1), x) for r, x in runs]
  assert published.protocol_differences(config, shifted) == ['seeds (seed != prompt index in '
                                                             '10 of 10 runs)']
  assert published.benchmark('data/prompts/storyeval/all_prompts.txt') == 'storyeval'
  paper = st.build_table(['RTN_INT4'], [], published.table('moviegen')).iloc[0]
  assert (paper.runs, paper.paper_ssim, paper.paper_runtime_s) == ('0/0', 0.6880, 86.2636)
  assert st.psnr_mean([20.0, float('inf')]) == float('inf') and st.psnr_mean([20.0, 30.0]) == 25


def test_run_folders_are_classified(sweep, tmp_path):
  root, _ = sweep
  good = json.loads((root / 'runs/BF16/p000_s0/result.json').read_text())
  cases = dict(lacks={k: v for k, v in good.items() if k != 'runtime_s'},
               other=dict(good, method='RTN_INT4'), malformed=dict(good, batch='1'),
               prompt=dict(good, prompts=['a blue square bouncing on a yellow background']),
               good=good)
  for name, result in cases.items():
    shutil.copytree(root / 'runs/BF16/p000_s0', tmp_path / name)
    (tmp_path / name / 'result.json').write_text(json.dumps(result))
  (tmp_path / 'empty').mkdir()
  entry = dict(method='BF16', prompt_index=0, seed=0, prompt=good['prompts'][0])
  got = {d: st.load_run(str(tmp_path), dict(entry, dir=d))
         for d in ('lacks', 'other', 'malformed', 'prompt', 'good', 'empty', 'absent')}
  assert got.pop('good').status == 'ok'
  assert got.pop('prompt').problem.startswith('result.json is BF16 seed 0 prompt')
  assert {d: r.status for d, r in got.items()} == dict(
      lacks='corrupt', other='corrupt', malformed='corrupt', empty='corrupt', absent='missing')
  assert got['lacks'].problem == 'result.json lacks runtime_s'
  assert got['other'].problem.startswith('result.json is RTN_INT4 seed 0 prompt')
  assert got['malformed'].problem == 'result.json has malformed batch'
  assert got['empty'].problem == 'no result.json' and got['absent'].result is None
  assert st.load_run(str(root), dict(entry, dir='runs/BF16/p000_s0')).status == 'ok'
