"""The sweep's plots (matplotlib, Agg): trade-offs, drift and per-frame fidelity, up to 33+ methods.

Colours are per family (``FAMILY_COLORS``), and within a family the methods differ by marker
and line style; points carry short names (``short``), placed where they overlap least, and
legends sit outside the axes. Each PNG is written atomically. Used by launch/aggregate.py.
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kvjax import files  # noqa: E402
from kvjax.metrics.frames import PSNR_CAP  # noqa: E402

FAMILY_COLORS = dict(BF16='#000000', RTN='#1f77b4', KIVI='#ff7f0e', QUAROT='#2ca02c',
                     PRQ='#d62728', QAQ='#9467bd', TPTQ='#8c564b', AGE_TIER='#e377c2',
                     FLOWCACHE='#17becf', SPATIAL_MIXED='#bcbd22', QVG='#7f7f7f')
MARKERS = 'osD^vPX*<>hp'
STYLES = ('-', '--', ':', '-.')
DPI = 100
_ABBREV = (('SPATIAL_MIXED_FG_', 'SM '), ('_BG_', '/'), ('FLOWCACHE_', 'FC '),
           ('QUAROT_KV', 'QUAROT'), ('SOFT_PRUNE', 'SOFTPR'), ('_REFRESH', ' REFR'),
           ('_RECENT2', ' REC2'))


def short(name: str) -> str:
  """A compact label: 'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2' -> 'SM RTN_INT4/RTN_INT2'."""
  for a, b in _ABBREV:
    name = name.replace(a, b)
  return name


def styles(table: pd.DataFrame) -> dict[str, dict]:
  """method -> dict(color, marker, linestyle): the family's colour, the i-th method of its family
  the i-th marker and line style."""
  out, seen = {}, {}
  for m, fam in zip(table.method, table.family):
    i = seen[fam] = seen.get(fam, -1) + 1
    out[m] = dict(color=FAMILY_COLORS.get(fam, '#7f7f7f'), marker=MARKERS[i % len(MARKERS)],
                  linestyle=STYLES[i % len(STYLES)])
  return out


def _save(fig, path: str) -> str:
  try:
    with files.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=DPI, format='png')
  finally:
    plt.close(fig)
  return os.path.basename(path)


def _family_legend(ax, table: pd.DataFrame) -> None:
  fams = list(dict.fromkeys(table.family))
  handles = [plt.Line2D([], [], color=FAMILY_COLORS.get(f, '#7f7f7f'), marker='o', ls='',
                        label=f) for f in fams]
  ax.legend(handles=handles, title='family', fontsize=7, title_fontsize=7, loc='upper left',
            bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _labels(ax, xs, ys, texts, size: float = 6.5) -> None:
  """Writes each text beside its point, at the one of 8 places that overlaps the labels placed so
  far, the points and the axes' border least (boxes estimated in display pixels)."""
  ax.figure.canvas.draw()
  dpi, frame = ax.figure.dpi, ax.bbox
  to_data = ax.transData.inverted()
  pts = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
  placed = [(px - 3, py - 3, px + 3, py + 3) for px, py in pts]
  char_w, h = size * 0.62 * dpi / 72, size * 1.2 * dpi / 72
  for (px, py), text in zip(pts, texts):
    w = len(text) * char_w
    best = None
    for x0, y0 in ((5, 3), (5, -3 - h), (-5 - w, 3), (-5 - w, -3 - h), (5, -h / 2),
                   (-5 - w, -h / 2), (-w / 2, 6), (-w / 2, -6 - h)):
      box = (px + x0, py + y0, px + x0 + w, py + y0 + h)
      cost = sum(max(0, min(box[2], b[2]) - max(box[0], b[0])) *
                 max(0, min(box[3], b[3]) - max(box[1], b[1])) for b in placed)
      if box[0] < frame.x0 or box[2] > frame.x1 or box[1] < frame.y0 or box[3] > frame.y1:
        cost += w * h
      if best is None or cost < best[0]:
        best = (cost, box, x0, y0)
    _, box, x0, y0 = best
    placed.append(box)
    ax.annotate(text, to_data.transform((px, py)), fontsize=size, ha='left', va='bottom',
                xytext=(x0 * 72 / dpi, y0 * 72 / dpi), textcoords='offset points')


def pareto_front(xs, ys, maximize_y: bool = True) -> list[int]:
  """Indices of the points no other point beats in both (higher x; higher, or lower, y)."""
  sign = 1 if maximize_y else -1
  pts = [(x, sign * y) for x, y in zip(xs, ys)]
  return [i for i, (x, y) in enumerate(pts)
          if not any(a >= x and b >= y and (a > x or b > y) for a, b in pts)]


def _pad(v: np.ndarray) -> float:
  return 0.06 * (v.max() - v.min()) or 0.05 * max(abs(v.max()), 1e-9)


def _scatter(ax, table: pd.DataFrame, x: str, y: str, st: dict, front: list[int] | None):
  """Draws the points (and the front); returns (xs, ys, labels) for ``_labels`` once the
  figure's layout is final."""
  for i, (_, r) in enumerate(table.iterrows()):
    s = st[r.method]
    ax.scatter(r[x], r[y], color=s['color'], marker=s['marker'], s=46 if front and i in front
               else 30, edgecolors='black' if front and i in front else 'none', linewidths=1.2,
               zorder=3)
  xs, ys = table[x].to_numpy(float), table[y].to_numpy(float)
  ax.set_xlim(xs.min() - _pad(xs), xs.max() + 3 * _pad(xs))
  ax.set_ylim(ys.min() - _pad(ys), ys.max() + _pad(ys))
  if front:
    f = sorted(front, key=lambda i: xs[i])
    ax.step(xs[f], ys[f], where='post', color='black', lw=0.8, alpha=0.5, zorder=2)
  ax.grid(alpha=0.3)
  return xs, ys, [short(m) for m in table.method]


def compression_fidelity(path: str, table: pd.DataFrame, st: dict) -> str | None:
  """Compression ratio (real) against SSIM and LPIPS (latent PSNR without video metrics), BF16 at
  SSIM 1 / LPIPS 0 by construction; the Pareto front ringed and joined."""
  t = table.copy()
  t.loc[t.method == 'BF16', ['ssim', 'lpips']] = [1.0, 0.0]
  panels = [('ssim', True, 'SSIM (higher is better)'), ('lpips', False, 'LPIPS (lower is better)')]
  if t.ssim.notna().sum() < 2:
    panels = [('latent_psnr', True, 'latent PSNR dB (higher is better)')]
  fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels) + 1.5, 6.2), squeeze=False)
  points, shown = [], set()
  for ax, (col, up, label) in zip(axes[0], panels):
    sub = t[t.compression_ratio.notna() & np.isfinite(t[col].astype(float))]
    if sub.empty:
      continue
    shown.update(sub.method)
    front = pareto_front(sub.compression_ratio, sub[col], up)
    points.append((ax, _scatter(ax, sub.reset_index(drop=True), 'compression_ratio', col, st,
                                front)))
    ax.set_xlabel('compression ratio (real KV bytes, BF16 / method)')
    ax.set_ylabel(label)
    ax.set_title(f'compression vs {col.upper().replace("_", " ")}: ringed = Pareto front',
                 fontsize=10)
  if not points:
    plt.close(fig)
    return None
  _family_legend(axes[0][-1], t[t.method.isin(shown)])
  fig.tight_layout()
  for ax, p in points:
    _labels(ax, *p)
  return _save(fig, path)


def memory_runtime(path: str, table: pd.DataFrame, st: dict, on_cpu: bool) -> str | None:
  """Peak device memory against runtime; on CPU (no peak) the KV-cache bytes instead."""
  t = table.copy()
  col, label = 'peak_memory_gib', 'peak device memory (GiB, max over runs)'
  title = 'peak memory vs runtime'
  if on_cpu:
    t['kv_kib'] = t.kv_cache_bytes / 1024
    col, label = 'kv_kib', 'KV-cache state (KiB, real bytes)'
    title = 'KV-cache bytes vs runtime (CPU: no device peak memory, so KV bytes instead)'
  t = t[t[col].notna() & t.runtime_s.notna()].reset_index(drop=True)
  if t.empty:
    return None
  fig, ax = plt.subplots(figsize=(11, 6.5))
  p = _scatter(ax, t, 'runtime_s', col, st, None)
  if t[col].max() > 5 * t[col].min() > 0:        # one outlier would squash the rest
    ax.set_yscale('log')
    ax.set_ylim(t[col].min() / 1.25, t[col].max() * 1.25)
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    label += ', log scale'
  ax.set_xlabel('rollout runtime per video (s, mean over runs; compile excluded)')
  ax.set_ylabel(label)
  ax.set_title(title, fontsize=10)
  _family_legend(ax, t)
  fig.tight_layout()
  _labels(ax, *p)
  return _save(fig, path)


def _curve_column(curves: dict[str, pd.DataFrame], video: str, latent: str) -> str | None:
  if any(video in c for c in curves.values()):
    return video
  return latent if any(latent in c for c in curves.values()) else None


def _lines(ax, curves: dict, col: str, st: dict, block: int) -> None:
  for m, c in curves.items():
    if col in c and m in st:
      s = st[m]
      y = c[col].replace(np.inf, np.nan)
      ax.plot(c.index, y, color=s['color'], ls=s['linestyle'], marker=s['marker'], ms=3.5,
              lw=1.2, label=short(m))
  ax.axvspan(-0.5, block - 0.5, color='0.85', zorder=0, label='first block (no cache)')
  ax.set_xlabel('latent frame')
  ax.grid(alpha=0.3)


def _method_legend(ax, n: int) -> None:
  ax.legend(fontsize=6.5, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
            ncol=1 if n <= 18 else 2)


def drift(path: str, curves: dict, st: dict, block: int) -> str | None:
  """Per-frame PSNR against the BF16 rollout (mean over runs), one line per method."""
  col = _curve_column(curves, 'video_psnr', 'psnr')
  if col is None:
    return None
  fig, ax = plt.subplots(figsize=(14, 6.5))
  _lines(ax, curves, col, st, block)
  if col == 'video_psnr':
    ax.axhline(PSNR_CAP, color='0.4', lw=0.8, ls=':')
    ax.set_ylabel(f'video PSNR vs BF16 (dB; frames capped at {PSNR_CAP:g})')
  else:
    ax.set_ylabel('latent PSNR vs BF16 (dB; exact frames, inf, not drawn)')
  ax.set_title('drift: per-frame PSNR against the BF16 rollout, mean over runs', fontsize=10)
  _method_legend(ax, len(curves))
  fig.tight_layout()
  return _save(fig, path)


def frame_metrics(path: str, curves: dict, st: dict, block: int) -> str | None:
  """Per-frame SSIM and LPIPS (mean over runs), one line per method."""
  if not any('video_ssim' in c for c in curves.values()):
    return None
  fig, axes = plt.subplots(1, 2, figsize=(16, 6.2))
  for ax, col, label in ((axes[0], 'video_ssim', 'SSIM vs BF16 (higher is better)'),
                         (axes[1], 'video_lpips', 'LPIPS vs BF16 (lower is better)')):
    _lines(ax, curves, col, st, block)
    ax.set_ylabel(label)
    ax.set_title(f'per-frame {label.split()[0]}, mean over runs', fontsize=10)
  _method_legend(axes[1], len(curves))
  fig.tight_layout()
  return _save(fig, path)


def drift_methods(path: str, curves: dict, runs: list, st: dict, block: int) -> str | None:
  """One panel per method: each run's per-frame PSNR (grey) and their mean (family colour)."""
  col = _curve_column(curves, 'video_psnr', 'psnr')
  methods = [m for m in curves if col and col in curves[m] and m in st]
  if not methods:
    return None
  cols = min(6, len(methods))
  rows = math.ceil(len(methods) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.7 * cols, 2.1 * rows + 0.6), sharex=True,
                           sharey=True, squeeze=False)
  for ax, m in zip(axes.flat, methods):
    for r in runs:
      if r.method == m and r.status == 'ok':
        ax.plot(r.curves.frame, r.curves[col].replace(np.inf, np.nan), color='0.65', lw=0.7)
    ax.plot(curves[m].index, curves[m][col].replace(np.inf, np.nan), color=st[m]['color'], lw=1.6)
    ax.axvspan(-0.5, block - 0.5, color='0.9', zorder=0)
    n = int(curves[m].runs.max())
    ax.set_title(f'{short(m)} ({n} run{"s" if n > 1 else ""})', fontsize=7)
    ax.tick_params(labelsize=6)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(methods):]:
    ax.axis('off')
  unit = 'video PSNR dB' if col == 'video_psnr' else 'latent PSNR dB'
  fig.suptitle(f'per-method drift: {unit} per latent frame (grey: runs, colour: mean; shaded: '
               'first block)', fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def write_all(sweep_dir: str, table: pd.DataFrame, curves: dict, runs: list, on_cpu: bool,
              block: int) -> list[str]:
  """Every plot with data into ``sweep_dir``; returns the file names written."""
  st = styles(table)
  ref_free = {m: c for m, c in curves.items() if m != 'BF16'}
  out = [compression_fidelity(os.path.join(sweep_dir, 'pareto.png'), table, st),
         memory_runtime(os.path.join(sweep_dir, 'memory_runtime.png'), table, st, on_cpu),
         drift(os.path.join(sweep_dir, 'drift.png'), ref_free, st, block),
         frame_metrics(os.path.join(sweep_dir, 'frame_metrics.png'), ref_free, st, block),
         drift_methods(os.path.join(sweep_dir, 'drift_methods.png'), ref_free, runs, st, block)]
  return [f for f in out if f]
