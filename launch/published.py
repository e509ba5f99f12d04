"""The study's published per-method numbers (arXiv 2603.27469), copied as data, and its protocol.

Sources (the study's repository, as its paper reports them):
  MOVIEGEN   the MovieGen headline table, ``docs/analysis_assets/moviegen/readme_method_table.md``
             (33 rows; the paper's MovieGen method table).
  STORYEVAL  the StoryEval derived table,
             ``docs/analysis_assets/storyeval/derived_method_table.csv`` (30 rows: KIVI_K2_V4,
             RTN_K2_V4 and QUAROT_KV_INT4_REFRESH had no StoryEval run); it holds the
             BF16-referenced PSNR/SSIM/LPIPS that the StoryEval headline table leaves out.
Each row is ``COLUMNS``: compression ratio (the study's accounting), peak VRAM in GiB (max over
the 10 prompts, RTX A5000), runtime in seconds per 10-second video, PSNR (dB), SSIM and LPIPS
against the BF16 videos (mean over frames, then over the 10 videos, on the decoded H.264 mp4s),
VBench imaging quality and its "drift" (imaging quality of the last prefix, not a slope). ``None``
is a blank cell (the three MovieGen runs that hit CUDA OOM have no ratio). ``INF`` PSNR: at least
one video had a frame identical to BF16's (the study averages per-frame PSNR without a cap, so
one identical frame makes the video, and then the method, infinite). BF16's own fidelity is
infinite / 1 / 0 by construction. Rows are in the published tables' order (sorted by peak VRAM).

The protocol (``PROTOCOL``): Self-Forcing on Wan2.1-T2V-1.3B, 480x832, 42 latent frames through a
21-frame attention window without sinks, the first 10 prompts of MovieGen (1,003 extended prompts)
or StoryEval (422), one video a prompt with seed = prompt index. ``protocol_differences`` names the
fields in which a sweep departs from it; only a sweep without any may be printed beside these.
"""

from __future__ import annotations

import json
import math
import os

import pandas as pd

from kvjax import cache as kvcache
from kvjax.world import codec

INF = math.inf

COLUMNS = ('compression_ratio', 'peak_vram_gib', 'runtime_s', 'psnr', 'ssim', 'lpips',
           'imaging_quality', 'drift_last_imaging_quality')

MOVIEGEN = {
    'FLOWCACHE_PRUNE_INT2': (7.7774, 11.1145, 69.8677, 15.2597, 0.4666, 0.4825, 0.6371, 0.6334),
    'FLOWCACHE_PRUNE_INT4': (5.4981, 11.7083, 72.2211, 15.3004, 0.4569, 0.4119, 0.7269, 0.7261),
    'FLOWCACHE_SOFT_PRUNE_INT4':
        (5.4899, 11.7114, 74.9954, 17.6734, 0.5442, 0.2975, 0.7390, 0.7383),
    'FLOWCACHE_SOFT_PRUNE_INT2':
        (6.8245, 11.7114, 76.1179, 15.8380, 0.4822, 0.4398, 0.6623, 0.6583),
    'FLOWCACHE_NATIVE_SOFT_PRUNE_INT4':
        (5.4899, 11.7387, 63.6137, 13.2571, 0.4108, 0.4755, 0.7259, 0.7243),
    'FLOWCACHE_ADAPTIVE_INT2': (4.2682, 14.3755, 92.6335, 15.1943, 0.4479, 0.4645, 0.6155, 0.6105),
    'SPATIAL_MIXED_FG_QUAROT_KV_INT4_BG_RTN_INT2':
        (3.4606, 14.3760, 224.8226, 14.0597, 0.4327, 0.5696, 0.3987, 0.3942),
    'FLOWCACHE_HYBRID_INT2': (4.6066, 14.3769, 82.5925, 15.6244, 0.4707, 0.4538, 0.6163, 0.6116),
    'AGE_TIER_INT4': (3.1843, 14.3775, 103.8574, 21.3176, 0.6880, 0.1804, 0.7351, 0.7339),
    'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT4':
        (3.1843, 14.3775, 105.4578, 18.8866, 0.5772, 0.3099, 0.6934, 0.6898),
    'AGE_TIER_INT2': (4.4145, 14.3775, 105.2508, 15.1818, 0.4566, 0.4704, 0.5781, 0.5731),
    'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2':
        (3.6834, 14.3775, 106.6273, 13.9269, 0.4212, 0.5580, 0.4113, 0.4069),
    'SPATIAL_MIXED_FG_KIVI_INT4_BG_KIVI_INT2':
        (3.4528, 14.3833, 110.3590, 13.7229, 0.4268, 0.6418, 0.5289, 0.5210),
    'QAQ_INT2': (5.1842, 14.4214, 109.7803, 13.3364, 0.3646, 0.5299, 0.6200, 0.6182),
    'QAQ_INT4': (3.1448, 14.4218, 110.0065, 11.9680, 0.2617, 0.6470, 0.5889, 0.5863),
    'BF16': (1.0000, 19.2801, 58.5726, INF, 1.0000, 0.0000, 0.7390, 0.7394),
    'FLOWCACHE_NATIVE': (1.0000, 19.3075, 48.2873, 13.2549, 0.4115, 0.4506, 0.7377, 0.7373),
    'TPTQ_INT2': (2.7166, 19.8546, 167.2228, 19.9062, 0.6268, 0.2397, 0.7237, 0.7222),
    'QUAROT_KV_INT4': (3.2000, 19.9831, 236.6028, 22.6420, 0.7240, 0.1483, 0.7376, 0.7378),
    'RTN_INT4': (3.2000, 19.9831, 86.2636, 21.3205, 0.6880, 0.1803, 0.7353, 0.7341),
    'RTN_INT2': (5.3333, 19.9831, 87.1161, 15.0444, 0.4515, 0.4750, 0.5668, 0.5617),
    'QUAROT_KV_INT2': (5.3333, 19.9831, 242.0181, 14.7310, 0.4403, 0.4670, 0.6008, 0.5968),
    'KIVI_INT4': (3.1933, 19.9904, 92.6862, 13.0698, 0.4048, 0.5709, 0.6812, 0.6784),
    'KIVI_INT2': (5.3149, 19.9904, 95.4773, 11.4240, 0.2414, 0.6714, 0.6211, 0.6181),
    'PRQ_INT4': (1.6000, 20.6861, 159.9706, 26.5446, 0.8239, 0.0819, 0.7389, 0.7393),
    'PRQ_INT2': (2.0000, 20.6861, 156.6343, 25.1333, 0.7997, 0.0938, 0.7392, 0.7396),
    'RTN_INT4_RECENT2': (2.4348, 21.3741, 68.8637, 23.6918, 0.7320, 0.1482, 0.7356, 0.7351),
    'QUAROT_KV_INT4_RECENT2': (2.4348, 21.6854, 111.3048, INF, 0.7058, 0.1834, 0.7302, 0.7290),
    'KIVI_INT4_REFRESH': (3.1933, 22.6322, 68.0524, 13.7329, 0.4203, 0.5095, 0.7137, 0.7116),
    'RTN_INT4_REFRESH': (3.2000, 22.6361, 65.0466, 21.4496, 0.6934, 0.1777, 0.7361, 0.7352),
    'KIVI_K2_V4': (None, 22.6740, 76.2940, 13.0301, 0.3742, 0.5783, 0.6233, 0.6186),
    'RTN_K2_V4': (None, 22.6779, 75.3167, 14.7430, 0.4340, 0.4953, 0.5305, 0.5242),
    'QUAROT_KV_INT4_REFRESH': (None, 22.8235, 97.5132, 19.6354, 0.6129, 0.2144, 0.7218, 0.7192),
}
"""MovieGen headline table (paper / repository table above), method -> ``COLUMNS``."""

STORYEVAL = {
    'FLOWCACHE_PRUNE_INT2': (7.6797, 11.1395, 70.1576, 14.2570, 0.4924, 0.5056, 0.5161, 0.5161),
    'FLOWCACHE_PRUNE_INT4': (5.4315, 11.7534, 72.4063, INF, 0.4653, 0.4899, 0.6815, 0.6797),
    'FLOWCACHE_SOFT_PRUNE_INT4': (5.4236, 11.7564, 75.1512, INF, 0.5184, 0.4162, 0.6803, 0.6789),
    'FLOWCACHE_SOFT_PRUNE_INT2':
        (6.7224, 11.7564, 74.3772, 14.1835, 0.4970, 0.4946, 0.5320, 0.5361),
    'FLOWCACHE_NATIVE_SOFT_PRUNE_INT4':
        (5.4236, 11.7837, 64.2319, 11.9428, 0.4363, 0.5230, 0.6575, 0.6572),
    'FLOWCACHE_ADAPTIVE_INT2': (4.2575, 14.3752, 91.2923, INF, 0.4507, 0.5284, 0.4977, 0.4960),
    'SPATIAL_MIXED_FG_QUAROT_KV_INT4_BG_RTN_INT2':
        (3.4606, 14.3760, 224.0546, 12.9688, 0.4442, 0.5988, 0.3997, 0.3979),
    'FLOWCACHE_HYBRID_INT2': (4.5922, 14.3766, 82.1753, 13.9500, 0.4791, 0.5121, 0.4921, 0.4937),
    'AGE_TIER_INT4': (3.1843, 14.3775, 102.4500, 18.6599, 0.6610, 0.2452, 0.6735, 0.6756),
    'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT4':
        (3.1843, 14.3775, 106.6432, INF, 0.5873, 0.3493, 0.6056, 0.6066),
    'AGE_TIER_INT2': (4.4145, 14.3775, 101.9456, 13.6716, 0.4633, 0.5230, 0.4691, 0.4734),
    'SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2':
        (3.6932, 14.3775, 106.5983, 12.6389, 0.4305, 0.5870, 0.4214, 0.4195),
    'SPATIAL_MIXED_FG_KIVI_INT4_BG_KIVI_INT2':
        (3.4528, 14.3833, 110.1912, 13.2025, 0.4532, 0.6537, 0.4542, 0.4509),
    'QAQ_INT2': (5.1855, 14.4209, 109.8903, 11.7939, 0.3244, 0.6351, 0.5790, 0.5852),
    'QAQ_INT4': (3.1458, 14.4210, 109.8911, 11.0290, 0.2375, 0.7186, 0.5671, 0.5706),
    'BF16': (1.0000, 19.2801, 56.8107, INF, 1.0000, 0.0000, 0.6932, 0.6951),
    'FLOWCACHE_NATIVE': (1.0000, 19.3075, 49.0442, 11.9548, 0.4507, 0.5077, 0.6815, 0.6821),
    'TPTQ_INT2': (2.7166, 19.7662, 166.5541, 17.0350, 0.6147, 0.3008, 0.6537, 0.6580),
    'QUAROT_KV_INT4': (3.2000, 19.9831, 239.5797, 19.2542, 0.6854, 0.2166, 0.6870, 0.6889),
    'RTN_INT4': (3.2000, 19.9831, 88.7893, 18.6615, 0.6608, 0.2452, 0.6738, 0.6753),
    'RTN_INT2': (5.3333, 19.9831, 86.1275, 13.5731, 0.4591, 0.5263, 0.4644, 0.4709),
    'QUAROT_KV_INT2': (5.3333, 19.9831, 239.0473, 13.0086, 0.4427, 0.5322, 0.4775, 0.4802),
    'KIVI_INT4': (3.1933, 19.9904, 92.9985, 12.4050, 0.4243, 0.5746, 0.6348, 0.6352),
    'KIVI_INT2': (5.3149, 19.9904, 94.7113, INF, 0.2425, 0.7354, 0.5312, 0.5271),
    'PRQ_INT2': (2.0000, 20.6861, 155.6378, 20.6645, 0.7327, 0.1791, 0.6975, 0.6982),
    'PRQ_INT4': (1.6000, 20.6861, 157.9600, INF, 0.7241, 0.1876, 0.6989, 0.6994),
    'RTN_INT4_RECENT2': (2.4348, 21.3741, 68.6420, INF, 0.7206, 0.1870, 0.6803, 0.6836),
    'QUAROT_KV_INT4_RECENT2': (2.4348, 21.6854, 112.9255, INF, 0.7069, 0.2223, 0.6665, 0.6698),
    'KIVI_INT4_REFRESH': (3.1933, 22.6322, 66.7335, 12.4865, 0.4140, 0.5691, 0.6448, 0.6414),
    'RTN_INT4_REFRESH': (3.2000, 22.6361, 64.6068, 18.5491, 0.6543, 0.2521, 0.6779, 0.6787),
}
"""StoryEval derived table (paper / repository table above), method -> ``COLUMNS``."""

BENCHMARKS = {'moviegen': MOVIEGEN, 'storyeval': STORYEVAL}

PROTOCOL = dict(params=1_418_996_800, height=480, width=832, frames=42, window_frames=21,
                sink_frames=0, num_prompts=10)
"""The study's generation settings (module docstring); ``params`` counts the 1.3B DiT."""

VAE_STRIDE = 8
"""Pixels per latent row/column of the Wan VAE (60x104 latents -> 480x832)."""


def benchmark(prompts_file: str | None) -> str | None:
  """'moviegen' or 'storyeval' when the prompts file's path names one of the study's prompt sets
  (e.g. MovieGenVideoBench_extended.txt, storyeval/all_prompts.txt), else None."""
  path = (prompts_file or '').lower()
  if 'moviegen' in os.path.basename(path):
    return 'moviegen'
  return 'storyeval' if 'storyeval' in path else None


def _distinct(results: list[dict], key) -> list:
  return sorted({key(r) for r in results}, key=str)


def protocol_differences(config: dict, runs: list[tuple[dict, dict | None]]) -> list[str]:
  """The fields in which a sweep departs from ``PROTOCOL``, one phrase each ([] = it matches).

  ``config`` is the sweep's config (sweep.json), ``runs`` every planned run as (its entry in
  sweep.json, its result.json or None when the run is missing or corrupt)."""
  out = []
  prompts_file = config.get('prompts_file')
  if benchmark(prompts_file) is None:
    out.append(f'prompts ({prompts_file or "no prompts file"}: not MovieGen or StoryEval)')
  indices = sorted({r['prompt_index'] for r, _ in runs})
  if indices != list(range(PROTOCOL['num_prompts'])):
    shown = indices if len(indices) <= 12 else indices[:12] + ['...']
    out.append(f'prompts (indices {shown}, not the first {PROTOCOL["num_prompts"]})')
  off = sum(r['seed'] != r['prompt_index'] for r, _ in runs)
  if off:
    out.append(f'seeds (seed != prompt index in {off} of {len(runs)} runs)')
  results = [res for _, res in runs if res is not None]
  if not results:
    return out + ['runs (none complete)']
  missing = len(runs) - len(results)
  if missing:
    out.append(f'coverage ({missing} of {len(runs)} runs missing or corrupt)')
  models = _distinct(results, lambda r: (r['config'], r['params'], 'checkpoint' if r.get(
      'checkpoint') else 'world model' if r.get('world') else 'random weights'))
  if any(p != PROTOCOL['params'] or w != 'checkpoint' for _, p, w in models):
    out.append('model (' + ', '.join(f'{c}: {p:,} parameters, {w}' for c, p, w in models) +
               '; the study: the 1.3B Self-Forcing checkpoint)')
  # Pixels per latent cell: the world's space-to-depth codec, else the Wan VAE.
  stride = lambda r: codec.FACTOR if r.get('world') else VAE_STRIDE
  sizes = _distinct(results, lambda r: (r['latent_shape'][-2] * stride(r),
                                        r['latent_shape'][-1] * stride(r)))
  if sizes != [(PROTOCOL['height'], PROTOCOL['width'])]:
    out.append('resolution (' + ', '.join(f'{h}x{w}' for h, w in sizes) + ' px from the latents; '
               f'the study: {PROTOCOL["height"]}x{PROTOCOL["width"]})')
  frames = _distinct(results, lambda r: r['frames'])
  if frames != [PROTOCOL['frames']]:
    out.append(f'frames ({", ".join(map(str, frames))} latent frames; the study: '
               f'{PROTOCOL["frames"]})')
  windows = _distinct(results, lambda r: (r['window_frames'], r['sink_frames']))
  if windows != [(PROTOCOL['window_frames'], PROTOCOL['sink_frames'])]:
    out.append('window (' + ', '.join(f'{w} frames, {s} sinks' for w, s in windows) +
               f'; the study: {PROTOCOL["window_frames"]} frames, no sinks)')
  if any(r.get('reference') is not None and 'video_ssim' not in r for r in results):
    out.append('fidelity (no decoded-video metrics in some runs: Wan runs need --wan_dir)')
  dtypes = _distinct(results, lambda r: r.get('compute_dtype'))
  if dtypes != ['bfloat16']:
    out.append(f'dtype ({", ".join(map(str, dtypes))}; the study: bfloat16)')
  kinds = _distinct([r for r in results if r.get('reference')], lambda r: r['reference']['kind'])
  if kinds not in ([], ['bf16']):
    out.append(f'reference ({", ".join(kinds)}; the study: its own BF16 rollout)')
  changed = sorted({r['method'] for r in results if 'method_params' in r and
                    r['method_params'] != _default_params(r['method'])})
  if changed:
    out.append(f'method parameters ({", ".join(changed)} not as the study ran them)')
  return out


def _default_params(method: str) -> dict | None:
  """The parameters ``method`` has without overrides (as the study ran it); None if unknown."""
  try:
    return json.loads(json.dumps(kvcache.get(method).params(), default=str))
  except ValueError:
    return None


def table(name: str) -> pd.DataFrame:
  """A published table (``BENCHMARKS`` key) as a frame indexed by method, ``COLUMNS`` columns."""
  rows = BENCHMARKS[name]
  return pd.DataFrame([list(v) for v in rows.values()], index=list(rows), columns=list(COLUMNS),
                      dtype=float)
