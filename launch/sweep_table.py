"""A sweep's run folders -> one row per method: loading, validation and the study's means.

``load_run`` reads one planned run's folder (result.json and curves.csv, docs/RESULTS.md) and says
whether it is complete, missing or corrupt; ``build_table`` averages the complete runs of each
method into ``COLUMNS`` the way ``NOTES`` states, with the VBench means of ``load_vbench``'s
vbench.csv (launch/vbench_eval.py) when the folder has one; ``markdown_table`` and ``fmt`` print
them; ``method_curves`` averages the per-frame curves. Used by launch/aggregate.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pandas as pd

from kvjax import cache as kvcache
from kvjax.metrics.frames import PSNR_CAP
from launch import sweep_plan, vbench_eval

REFERENCE = kvcache.BF16.name

# (column, markdown/html header, format); the paper_* columns appear only under the protocol.
COLUMNS = (
    ('method', 'method', ''), ('family', 'family', ''), ('runs', 'runs', ''),
    ('compression_ratio', 'ratio (real)', '.3f'),
    ('study_compression_ratio', 'ratio (study)', '.3f'),
    ('kv_cache_bytes', 'KV bytes', ',.0f'), ('peak_memory_gib', 'peak GiB', '.2f'),
    ('runtime_s', 'runtime s', '.3f'), ('runtime_vs_bf16', 'x BF16', '.2f'),
    ('psnr', 'PSNR dB', '.2f'), ('ssim', 'SSIM', '.4f'), ('lpips', 'LPIPS', '.4f'),
    ('psnr_onset', 'PSNR onset', '.2f'), ('ssim_onset', 'SSIM onset', '.4f'),
    ('lpips_onset', 'LPIPS onset', '.4f'), ('psnr_last_window', 'last-window dB', '.2f'),
    ('psnr_slope', 'slope dB/frame', '+.3f'), ('psnr_vde', 'PSNR VDE', '.3f'),
    ('latent_psnr', 'latent PSNR dB', '.2f'),
    ('vbench_runs', 'VBench runs', ''), ('imaging_quality', 'imaging', '.4f'),
    ('aesthetic_quality', 'aesthetic', '.4f'), ('subject_consistency', 'subject cons.', '.4f'),
    ('background_consistency', 'bg cons.', '.4f'),
    ('drift_imaging_quality', 'drift imaging', '.4f'),
    ('paper_compression_ratio', 'paper ratio', '.4f'),
    ('paper_peak_vram_gib', 'paper peak GiB', '.2f'),
    ('paper_runtime_s', 'paper runtime s', '.1f'), ('paper_psnr', 'paper PSNR', '.2f'),
    ('paper_ssim', 'paper SSIM', '.4f'), ('paper_lpips', 'paper LPIPS', '.4f'),
    ('paper_imaging_quality', 'paper imaging', '.4f'),
    ('paper_drift_imaging_quality', 'paper drift imaging', '.4f'))
VBENCH = (*vbench_eval.DIMENSIONS, vbench_eval.DRIFT)
"""vbench.csv's score columns (launch/vbench_eval.py) averaged per method when the file exists;
with it, ``vbench_runs`` and (under the protocol) the paper's imaging and drift columns appear."""

NOTES = (
    'Means are over runs (one video each), as the study averages over videos (its section 6.3); '
    'runs (n/m) counts the complete runs of the planned ones, and a row averages only those.',
    f'PSNR: each frame is capped at {PSNR_CAP:g} dB (kvjax.metrics.PSNR_CAP), so a video\'s mean '
    'over frames is finite and frames identical to BF16 (the first block, which reads no cache) '
    'lift it; the study, uncapped, reports inf for a method once any of its frames is identical. '
    'Latent PSNR is not capped: a run identical to BF16 gives inf and the mean over runs is then '
    'inf, the study\'s rule for its PSNR.',
    'onset = the mean over the first block (it attends to no cache); last-window dB, slope '
    '(dB/frame after the first block) and PSNR VDE (LV-Bench video drift error, blank under 10 '
    'frames) are the per-frame PSNR drift summaries of kvjax/metrics/drift.py, averaged over runs.',
    'ratio (real) = BF16 bytes of the history / the cache state\'s bytes; ratio (study) = the '
    'study\'s accounting formula (kvjax/cache/accounting.py). KV bytes is the mean state size.',
    'peak GiB = the maximum over runs of the device allocator\'s peak (blank on CPU, where JAX '
    'reports none), as the study takes the maximum over prompts.',
    'runtime s = the mean over runs of the rollout seconds per video (compile excluded); x BF16 = '
    'that mean over the mean BF16 time of the same prompts and seeds: the BF16 method\'s run, '
    'timed like every method (the first rollout of its process), else the run\'s own reference '
    'rollout (reference.runtime_s, the second rollout of a process, or a stored one\'s time), '
    'which on CPU runs warmer and so reads faster.',
    'BF16 is the reference: its fidelity columns are blank (PSNR inf, SSIM 1, LPIPS 0 by '
    'construction).',
    'imaging, aesthetic, subject cons., bg cons. and drift imaging (present when the folder has '
    'vbench.csv, from python -m launch.vbench_eval) are VBench scores in [0, 1] (imaging quality '
    '/ 100), each run\'s the mean over its videos, then the mean over the method\'s complete runs '
    'that vbench.csv scored (VBench runs = those of the complete ones; rerun launch.vbench_eval '
    'when the sweep changes). drift imaging = imaging quality of each video\'s re-encoded prefix '
    '(vbench.csv\'s drift_frames), the study\'s "drift_last", an end-of-video level, not a slope. '
    'The paper imaging / drift columns (under the protocol) compare with ours: the same VBench '
    'back-end (MUSIQ, longer preprocessing) on 165-frame 480x832 H.264 videos, ours encoded by '
    'imageio-ffmpeg, the study\'s by torchvision; the study\'s MovieGen drift is the whole video '
    '(the default), its StoryEval drift the first 150 frames (--drift_frames=150).')


@dataclasses.dataclass
class Run:
  """One planned run of sweep.json and what its folder holds."""
  method: str
  prompt_index: int
  prompt: str
  seed: int
  dir: str                          # relative to the sweep folder
  status: str = 'missing'           # 'ok', 'missing' or 'corrupt'
  problem: str = ''
  result: dict | None = None
  curves: pd.DataFrame | None = None


def load_run(sweep_dir: str, entry: dict) -> Run:
  """The planned run ``entry`` with its folder's result and curves (or why it has none)."""
  run = Run(entry['method'], entry['prompt_index'], entry.get('prompt', ''), entry['seed'],
            entry['dir'])
  folder = os.path.join(sweep_dir, run.dir)
  problem = sweep_plan.run_problem(
      sweep_dir, sweep_plan.Run(run.method, run.prompt_index, run.prompt, run.seed), run.dir)
  if problem == 'missing':
    return run
  run.status, run.problem = 'corrupt', problem
  if problem:
    return run
  with open(os.path.join(folder, 'result.json')) as f:
    result = json.load(f)
  try:
    run.curves = pd.read_csv(os.path.join(folder, 'curves.csv'))
  except (OSError, ValueError) as e:
    run.problem = f'curves.csv unreadable ({type(e).__name__})'
    return run
  run.status, run.result = 'ok', result
  return run


def load_vbench(sweep_dir: str) -> tuple[pd.DataFrame | None, str]:
  """(vbench.csv's rows, '') when the file exists and holds ``dir`` and ``VBENCH``'s columns that
  it has; (None, '') without it; (None, why) when it is unreadable."""
  path = os.path.join(sweep_dir, vbench_eval.CSV)
  if not os.path.isfile(path):
    return None, ''
  try:
    scores = pd.read_csv(path)
  except (OSError, ValueError) as e:
    return None, f'vbench.csv unreadable ({type(e).__name__})'
  if 'dir' not in scores.columns:
    return None, 'vbench.csv has no dir column'
  bad = [c for c in VBENCH if c in scores.columns and not pd.api.types.is_numeric_dtype(scores[c])]
  if bad:
    return None, f'vbench.csv has non-numeric {", ".join(bad)}'
  return scores, ''


def _mean(values) -> float:
  v = [float(x) for x in values if x is not None and not np.isnan(x)]
  return float(np.mean(v)) if v else math.nan


def psnr_mean(values) -> float:
  """The study's PSNR over videos: the mean, inf when any video is inf (NaN/None left out)."""
  v = [float(x) for x in values if x is not None and not np.isnan(x)]
  if any(math.isinf(x) for x in v):
    return math.inf
  return float(np.mean(v)) if v else math.nan


def _drift(r: dict, key: str):
  return ((r.get('video_drift') or {}).get('psnr') or {}).get(key)


def _bf16_time(run: Run, bf16: dict) -> float | None:
  """The BF16 seconds per video for ``run``'s prompt and seed (see ``NOTES``)."""
  if (run.prompt_index, run.seed) in bf16:
    return bf16[(run.prompt_index, run.seed)]
  ref = run.result['reference'] or {}
  if ref.get('kind') == 'bf16' and ref.get('runtime_s'):
    return ref['runtime_s'] / run.result['batch']
  return None


def build_table(methods: list[str], runs: list[Run], paper: pd.DataFrame | None,
                vbench: pd.DataFrame | None = None) -> pd.DataFrame:
  """One row per method (``COLUMNS``); ``paper``: the published table to print beside ours;
  ``vbench``: vbench.csv's rows (``load_vbench``), whose means become the ``VBENCH`` columns."""
  family = {d['name']: d['family'] for d in kvcache.describe()}
  bf16 = {(r.prompt_index, r.seed): r.result['runtime_s'] / r.result['batch']
          for r in runs if r.method == REFERENCE and r.status == 'ok'}
  rows = []
  for m in methods:
    planned = [r for r in runs if r.method == m]
    ok = [r for r in planned if r.status == 'ok']
    res = [r.result for r in ok]
    peaks = [x['peak_memory_bytes'] for x in res if x['peak_memory_bytes'] is not None]
    paired = [(r.result['runtime_s'] / r.result['batch'], _bf16_time(r, bf16)) for r in ok]
    paired = [(t, b) for t, b in paired if b]
    row = dict(method=m, family=family.get(m, '?'), runs=f'{len(ok)}/{len(planned)}',
               compression_ratio=_mean(x['compression_ratio'] for x in res),
               study_compression_ratio=_mean(x.get('study_compression_ratio') for x in res),
               kv_cache_bytes=_mean(x['kv_cache_bytes'] for x in res),
               peak_memory_gib=max(peaks) / 1024**3 if peaks else math.nan,
               runtime_s=_mean(x['runtime_s'] / x['batch'] for x in res),
               runtime_vs_bf16=(_mean(t for t, _ in paired) / _mean(b for _, b in paired)
                                if paired else math.nan))
    for k in ('psnr', 'ssim', 'lpips'):
      mean = psnr_mean if k == 'psnr' else _mean
      row[k] = mean(x.get(f'video_{k}') for x in res)
      row[f'{k}_onset'] = mean(x.get(f'video_{k}_onset') for x in res)
    row.update(psnr_last_window=psnr_mean(_drift(x, 'last_window') for x in res),
               psnr_slope=_mean(_drift(x, 'slope') for x in res),
               psnr_vde=_mean(_drift(x, 'vde') for x in res),
               latent_psnr=psnr_mean(x.get('latent_psnr') for x in res))
    if vbench is not None:
      scored = vbench[vbench.dir.isin([r.dir for r in ok])]
      row['vbench_runs'] = f'{scored.dir.nunique()}/{len(ok)}'
      row.update({k: _mean(scored[k]) if k in scored else math.nan for k in VBENCH})
    if paper is not None:
      src = paper.loc[m] if m in paper.index else pd.Series(dtype=float)
      for k in ('compression_ratio', 'peak_vram_gib', 'runtime_s', 'psnr', 'ssim', 'lpips',
                'imaging_quality'):
        row[f'paper_{k}'] = src.get(k, math.nan)
      row['paper_drift_imaging_quality'] = src.get('drift_last_imaging_quality', math.nan)
    rows.append(row)
  with_vbench = ('vbench_runs', *VBENCH, 'paper_imaging_quality', 'paper_drift_imaging_quality')
  names = [c for c, _, _ in COLUMNS if (paper is not None or not c.startswith('paper_'))
           and (vbench is not None or c not in with_vbench)]
  return pd.DataFrame(rows, columns=names)


def fmt(value, spec: str) -> str:
  """A table cell: '' for NaN/None, 'inf' for an infinite number, else ``format(value, spec)``."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ''
  if isinstance(value, float) and math.isinf(value):
    return 'inf' if value > 0 else '-inf'
  return format(value, spec)


def markdown_table(df: pd.DataFrame) -> list[str]:
  """The rows of ``df`` as a markdown table with ``COLUMNS``' headers and formats."""
  spec = {c: (h, f) for c, h, f in COLUMNS}
  cols = [c for c in df.columns if c in spec]
  out = ['| ' + ' | '.join(spec[c][0] for c in cols) + ' |',
         '|' + '|'.join('---' if not spec[c][1] else '---:' for c in cols) + '|']
  for _, row in df.iterrows():
    out.append('| ' + ' | '.join(fmt(row[c], spec[c][1]) for c in cols) + ' |')
  return out


def method_curves(runs: list[Run]) -> dict[str, pd.DataFrame]:
  """method -> its runs' curves.csv rows averaged per frame (with a ``runs`` column)."""
  out = {}
  for m in dict.fromkeys(r.method for r in runs):
    frames = [r.curves for r in runs if r.method == m and r.status == 'ok']
    if frames:
      both = pd.concat(frames, ignore_index=True).replace(-np.inf, np.nan)
      mean = both.groupby('frame').mean(numeric_only=True)
      mean['runs'] = both.groupby('frame').size()
      out[m] = mean
  return out


def block_frames(runs: list[Run]) -> int:
  """Latent frames of a generation block (the first block reads no cache), from the first
  complete run's resolved config; 3, Self-Forcing's, when none says."""
  for r in runs:
    if r.status == 'ok':
      return int(((r.result.get('config_full') or {}).get('sampler') or {}).get('block_frames', 3))
  return 3
