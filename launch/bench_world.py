"""The study on the trained world model: every cache method's rollout against the BF16 rollout.

  python -m launch.bench_world                                   # 33 methods, world_long
  python -m launch.bench_world --methods=bf16,rtn_int4,kivi_int2 --frames=12
  python -m launch.bench_world --out=world.md --json=world.json

What runs. ``--config`` (default ``world_long``: 36 latent frames through a 12-frame window with 3
sink frames, 4x the training clip) with the trained model in ``config.world.weights`` (or
``--weights``), whatever bundle is there. The three captions of ``PROMPTS`` run as one batch
(B = 3) with one noise seed. Every run is validated by ``kvjax.run.resolve`` before any rollout
(so every method's geometry error comes first); the BF16 rollout is computed once and every
method rolls out on the same noise and the same caption-encoder text states. Latents decode
through the exact space-to-depth codec and ``kvjax.video.to_uint8`` into the uint8 frames the
video writer would receive.

Held-out prompts. Training draws random scenes (``scene.sample_batch``: background, 1-2 objects,
colours, shapes and sizes uniformly), so every caption of the grammar has some chance of being
seen and none is strictly unseen; what is held out is these exact scenes (their positions and
velocities come from the rollout noise, not from any training stream). The captions below were
chosen to be unlike the default prompt (no gray background, no red circle / blue square pair).

Columns (one row per method, the study's table order; BF16's own row compares BF16 to itself):
  ratio        real compression: ``spec.bf16_bytes() / method.nbytes(final cache)``.
  study ratio  the study's formula (``kvjax.cache.accounting.study_ratio``); '-' where none.
  PSNR         ``metrics.video_fidelity``: mean over all frames of the per-frame PSNR (uint8 RGB,
               MSE over the batch, each frame capped at ``metrics.PSNR_CAP``; the study's
               protocol); onset: the mean over the first block.
  rel L2       latent ||x - ref|| / ||ref|| over the whole clip (``metrics.latent_fidelity``).
  last win     drift: mean per-frame PSNR over the last ``window_frames`` frames (the attention
               window; 12 on world_long).
  slope        drift: least-squares slope of per-frame PSNR against frame index over the frames
               after the first block (dB/frame; negative = the error grows). The first block is
               left out because it attends to no cache (it usually matches BF16 exactly and sits
               at the cap). Frames that also sit at the cap flatten the slope: read it with the
               last-window PSNR. NaN with fewer than two frames after the first block.
  checks       ``kvjax.world.checks.evaluate(...)['passed']`` per prompt: passed / prompts.
  x BF16       rollout runtime (``RolloutStats.runtime_s``, compile excluded) over BF16's; each
               is the minimum over ``1 + --repeats`` rollouts (the first, cold, one included) so
               that the shared machine's noise inflates neither; ``--repeats=0`` times the one
               rollout whose latents are scored. Whether the reruns reproduced the scored
               latents bit for bit is ``deterministic`` in the JSON.

After the table, lines computed from the rows answer the study's orderings (INT2 below INT4;
FlowCache soft-prune near BF16 at ~5x; KIVI and QuaRot drifting); nothing in them is fixed in
advance. ``--out`` gets the markdown (settings, table, orderings), ``--json`` the raw numbers
(per-frame PSNR, every check's margins, times); both are written atomically.

Cost (world_long, 2 idle CPU cores): compiling each method's step functions dominates; a method
takes 5-9 s with its three timed rollouts, and all 33 about 5 minutes (4 min 51 s measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.self_forcing import get_config  # noqa: E402
from kvjax import files  # noqa: E402
from kvjax import cache as kvcache  # noqa: E402
from kvjax import checkpoint as ckpt  # noqa: E402
from kvjax import metrics  # noqa: E402
from kvjax import run  # noqa: E402
from kvjax import runconfig  # noqa: E402
from kvjax import video as video_io  # noqa: E402
from kvjax.cache import accounting  # noqa: E402
from kvjax.sampler import SelfForcing, make_noise  # noqa: E402
from kvjax.world import bundle, checks, codec, scene  # noqa: E402
from kvjax.world import text as world_text  # noqa: E402

REFERENCE = kvcache.BF16.name

PROMPTS = (
    'a yellow triangle and a white circle bouncing on a blue background',
    'a big green square and a small red triangle bouncing on a black background',
    'a white square bouncing on a green background',
)
"""Held-out captions (see the module docstring), run as one batch; two with two objects."""

CONFIG_FILE = 'configs/self_forcing.py'


def config_variant(text: str) -> str:
  """'world_long' or 'configs/self_forcing.py:world_long' -> 'world_long'."""
  path, _, variant = text.rpartition(':')
  if path and os.path.normpath(path) != os.path.normpath(CONFIG_FILE):
    raise ValueError(f'--config must be a variant of {CONFIG_FILE} (got {text!r})')
  return variant


def select_methods(text: str) -> list[str]:
  """'all' or a comma list of names/aliases -> canonical names: BF16 first, then the study's
  methods in table order, then methods beyond the study in the order given (duplicates once).
  Raises ValueError naming an unknown method."""
  if text.strip().lower() == 'all':
    picked = list(kvcache.PAPER_NAMES)
  else:
    picked = [kvcache.canonical(m) for m in text.split(',') if m.strip()]
  if not picked:
    raise ValueError('--methods is empty')
  picked = list(dict.fromkeys([REFERENCE] + picked))
  order = {n: i for i, n in enumerate(kvcache.PAPER_NAMES)}
  return sorted(picked, key=lambda n: (n not in order, order.get(n, 0)))


def _rollout(s: run.RunSettings, params, noise, texts, gdef, repeats: int):
  """The rollout of ``s.method`` and its runtime: the minimum over 1 + ``repeats`` rollouts
  (compile excluded); reruns are compared bit for bit with the first."""
  sf = SelfForcing(s.model_cfg, s.sampler_cfg, s.method, s.spec, latent_hw=(s.height, s.width),
                   impl=s.impl, graphdef=gdef)
  latents, cache, stats = sf.rollout(params, noise, texts)
  times, same = [stats.runtime_s], True
  for _ in range(repeats):
    again, _, st = sf.rollout(params, noise, texts)
    times.append(st.runtime_s)
    same = same and bool(np.array_equal(again, latents))
  return latents, cache, stats, min(times), same


def score(s: run.RunSettings, latents, cache, ref_latents, ref_u8, prompts) -> dict:
  """Every column but the time of one rollout against the reference (see the module docstring)."""
  bf16 = s.spec.bf16_bytes()
  kv = s.method.nbytes(cache)
  row = dict(method=s.method.name, family=s.method.family, kv_bytes=int(kv), bf16_bytes=int(bf16),
             ratio=bf16 / kv if kv else None,
             study_ratio=accounting.study_ratio(s.method, s.spec, cache),
             finite=bool(np.all(np.isfinite(latents))))
  if not row['finite']:                 # no metric of NaN frames means anything
    return row
  frames = video_io.to_uint8(codec.decode(latents))                       # [B, T, H, W, 3]
  bf = s.sampler_cfg.block_frames
  scores, curves = metrics.video_fidelity(frames, ref_u8, onset_frames=bf,
                                          window=s.spec.window_frames, metrics=('psnr',))
  row.update(video_psnr=scores['video_psnr'], video_psnr_onset=scores['video_psnr_onset'])
  row.update(metrics.latent_fidelity(latents, ref_latents))
  d = scores['video_drift']['psnr']
  row.update(last_window_psnr=d['last_window'], psnr_slope=d['slope'], psnr_vde=d['vde'])
  row['frame_psnr'] = curves['video_psnr']
  row['checks'] = [checks.evaluate(f, scene.parse(p)) for f, p in zip(frames, prompts)]
  row['checks_passed'] = sum(c['passed'] for c in row['checks'])
  return row


def _f(x, fmt: str) -> str:
  return '-' if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def format_table(rows: list[dict], num_prompts: int) -> list[str]:
  out = ['| method | family | ratio | study ratio | PSNR dB | onset dB | latent rel L2 | '
         'last-window dB | slope dB/frame | checks | x BF16 |',
         '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    if not r['finite']:
      out.append(f'| {r["method"]} | {r["family"]} | {_f(r["ratio"], ".2f")} | '
                 f'{_f(r["study_ratio"], ".2f")} | NaN/Inf latents | | | | | | '
                 f'{_f(r.get("time_ratio"), ".2f")} |')
      continue
    out.append(
        f'| {r["method"]} | {r["family"]} | {_f(r["ratio"], ".2f")} | '
        f'{_f(r["study_ratio"], ".2f")} | '
        f'{r["video_psnr"]:.2f} | {r["video_psnr_onset"]:.2f} | {r["latent_rel_l2"]:.4f} | '
        f'{r["last_window_psnr"]:.2f} | {_f(r["psnr_slope"], "+.3f")} | '
        f'{r["checks_passed"]}/{num_prompts} | {_f(r.get("time_ratio"), ".2f")} |')
  return out


def bit_class(name: str) -> str | None:
  """'INT2' or 'INT4' when the name carries exactly one of them; None otherwise (mixed rows such
  as SPATIAL_MIXED_FG_RTN_INT4_BG_RTN_INT2, or no width in the name such as RTN_K2_V4)."""
  two, four = 'INT2' in name, 'INT4' in name
  return 'INT2' if two and not four else 'INT4' if four and not two else None


def orderings(rows: list[dict]) -> list[str]:
  """Lines that answer the study's orderings from the rows (finite rows only)."""
  ok = {r['method']: r for r in rows if r['finite']}
  methods = [r for n, r in ok.items() if n != REFERENCE]
  out = []

  groups = {c: [r for r in methods if bit_class(r['method']) == c] for c in ('INT2', 'INT4')}
  if groups['INT2'] and groups['INT4']:
    m2, m4 = (float(np.mean([r['video_psnr'] for r in groups[c]])) for c in ('INT2', 'INT4'))
    out.append(f'- INT2 vs INT4 (by name; mixed-width names left out): mean video PSNR '
               f'{m2:.2f} dB over {len(groups["INT2"])} INT2 rows, {m4:.2f} dB over '
               f'{len(groups["INT4"])} INT4 rows (INT2 - INT4 = {m2 - m4:+.2f} dB).')
    pairs = [(r, ok[r['method'].replace('INT2', 'INT4')]) for r in groups['INT2']
             if r['method'].replace('INT2', 'INT4') in ok]
    if pairs:
      below = [a['method'] for a, b in pairs if a['video_psnr'] < b['video_psnr']]
      out.append(f'  Same name with INT4 for INT2: INT2 below INT4 in {len(below)} of {len(pairs)} '
                 'pairs (' + ', '.join(f'{a["method"]} {a["video_psnr"]:.2f} vs '
                                       f'{b["video_psnr"]:.2f}' for a, b in pairs) + ').')
  else:
    out.append('- INT2 vs INT4: the selection lacks INT2 or INT4 rows.')

  ranked = sorted(methods, key=lambda r: -r['video_psnr'])
  soft = [r for r in methods if 'SOFT_PRUNE' in r['method']]
  ref = ok.get(REFERENCE)
  for r in soft:
    rank = ranked.index(r) + 1
    ref_checks = f' (BF16 {ref["checks_passed"]})' if ref else ''
    out.append(f'- {r["method"]}: ratio {_f(r["ratio"], ".2f")}x (study '
               f'{_f(r["study_ratio"], ".2f")}x), video PSNR {r["video_psnr"]:.2f} dB, rank '
               f'{rank} of {len(ranked)} methods by PSNR, last-window {r["last_window_psnr"]:.2f} '
               f'dB, checks passed {r["checks_passed"]}{ref_checks}.')
  if not soft:
    out.append('- FlowCache soft-prune: no SOFT_PRUNE row selected.')

  slopes = [r['psnr_slope'] for r in methods if np.isfinite(r['psnr_slope'])]
  drifters = [r for r in methods if r['family'] in ('KIVI', 'QUAROT')]
  if slopes and drifters:
    med = float(np.median(slopes))
    steeper = [r for r in drifters if np.isfinite(r['psnr_slope']) and r['psnr_slope'] < med]
    out.append(f'- Drift: median PSNR slope over {len(slopes)} methods {med:+.3f} dB/frame; '
               f'KIVI/QuaRot rows steeper (more negative) than the median: {len(steeper)} of '
               f'{len(drifters)} (' + ', '.join(
                   f'{r["method"]} {_f(r["psnr_slope"], "+.3f")}' for r in drifters) + ').')
  else:
    out.append('- Drift: no KIVI/QuaRot row with a finite slope selected.')
  return out


def _json_default(o):
  if isinstance(o, (np.floating, np.integer, np.bool_)):
    return o.item()
  return str(o)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='world_long',
                  help=f'a world variant of {CONFIG_FILE} (world, world_long)')
  ap.add_argument('--methods', default='all', help="comma list of names/aliases, or 'all'")
  ap.add_argument('--seed', type=int, default=0, help='noise seed (one for the whole batch)')
  ap.add_argument('--frames', type=int, default=None, help='override num_latent_frames')
  ap.add_argument('--repeats', type=int, default=2,
                  help='extra rollouts per method for the time (minimum taken)')
  ap.add_argument('--weights', default=None,
                  help='a world model bundle folder (default: the config\'s, the shipped model)')
  ap.add_argument('--impl', default='auto', help='attention implementation (kvjax.kernels.IMPLS)')
  ap.add_argument('--out', default=None, help='write the markdown here too')
  ap.add_argument('--json', default=None, help='write the raw numbers here')
  args = ap.parse_args(argv)
  try:
    config = get_config(config_variant(args.config))
    methods = select_methods(args.methods)
  except ValueError as e:
    ap.error(str(e))
  if config.get('world') is None:
    ap.error(f'--config {args.config} has no world model (use world or world_long)')
  if args.repeats < 0:
    ap.error('--repeats must be >= 0')
  if args.weights is not None:
    config.world.weights = args.weights

  with tempfile.TemporaryDirectory() as tmp:   # resolve reads prompts from a file
    prompts_file = os.path.join(tmp, 'prompts.txt')
    with open(prompts_file, 'w') as f:
      f.write('\n'.join(PROMPTS) + '\n')
    try:                                       # every method's errors before any work
      settings = {m: run.resolve(runconfig.override(config, method=m, seed=args.seed,
                                                    num_latent_frames=args.frames, impl=args.impl,
                                                    reference='none', prompts_file=prompts_file))
                  for m in methods}
    except (ValueError, FileNotFoundError) as e:
      ap.error(str(e))
  s0 = settings[REFERENCE]
  params, text_params = bundle.load(s0.world, s0.model_cfg)
  texts = world_text.encode(s0.world.text_cfg, text_params, s0.prompts)
  noise = make_noise(s0.seed, s0.batch, s0.frames, s0.model_cfg.in_dim, s0.height, s0.width,
                     s0.sampler_cfg)
  gdef = ckpt.graphdef(s0.model_cfg)
  training = s0.world.meta.get('training', {})
  meta = dict(config=s0.config_name, frames=s0.frames, batch=s0.batch,
              window_frames=s0.spec.window_frames, sink_frames=s0.spec.sink_frames,
              block_frames=s0.sampler_cfg.block_frames, seed=s0.seed, prompts=list(s0.prompts),
              weights=s0.world.path, training_steps=training.get('steps'),
              backend=jax.default_backend(), device=str(jax.devices()[0]),
              impl=s0.impl, repeats=args.repeats, psnr_cap=metrics.PSNR_CAP)
  print(f'[bench_world] {meta["config"]}: {meta["frames"]} frames, window {meta["window_frames"]}, '
        f'sink {meta["sink_frames"]}, B={meta["batch"]}, {len(methods)} methods, weights trained '
        f'{meta["training_steps"]} steps', file=sys.stderr, flush=True)

  t0 = time.perf_counter()
  ref, ref_cache, ref_stats, ref_time, ref_same = _rollout(s0, params, noise, texts, gdef,
                                                           args.repeats)
  if not np.all(np.isfinite(ref)):
    raise FloatingPointError('the BF16 reference rollout produced NaN/Inf latents')
  ref_u8 = video_io.to_uint8(codec.decode(ref))
  rows = []
  for m in methods:
    s = settings[m]
    if m == REFERENCE:
      lat, cache, stats, rt, same = ref, ref_cache, ref_stats, ref_time, ref_same
    else:
      t0 = time.perf_counter()
      lat, cache, stats, rt, same = _rollout(s, params, noise, texts, gdef, args.repeats)
    row = score(s, lat, cache, ref, ref_u8, s0.prompts)
    row.update(runtime_s=rt, time_ratio=rt / ref_time, compile_s=stats.compile_s,
               dit_calls=stats.dit_calls, reused_steps=stats.reused_steps, deterministic=same,
               wall_s=time.perf_counter() - t0)
    rows.append(row)
    psnr = f'{row["video_psnr"]:6.2f} dB' if row['finite'] else 'NaN/Inf'
    print(f'[bench_world] {m:40s} PSNR {psnr}  ratio {_f(row["ratio"], ".2f")}  '
          f'x{row["time_ratio"]:.2f}  wall {row["wall_s"]:.1f} s', file=sys.stderr, flush=True)

  lines = [f'### The study on the world model (`{meta["config"]}`: {meta["frames"]} latent frames, '
           f'window {meta["window_frames"]}, sink {meta["sink_frames"]}; B = {meta["batch"]}, seed '
           f'{meta["seed"]}; weights trained {meta["training_steps"]} steps; {meta["backend"]})',
           '', 'Prompts: ' + '; '.join(f'"{p}"' for p in meta['prompts']), '',
           *format_table(rows, len(s0.prompts)), '', 'Orderings:', *orderings(rows)]
  text = '\n'.join(lines)
  print(text)
  if args.out:
    files.write_text(args.out, text + '\n')
  raw = dict(meta=meta, rows=rows)
  if args.json:
    files.write_text(args.json, json.dumps(raw, indent=2, default=_json_default) + '\n')
  return raw


if __name__ == '__main__':
  main()
