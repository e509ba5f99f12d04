"""Benchmark every cache method: CPU/GPU time per denoising step and context pass relative to
BF16, and compile-only memory at the full 1.3B config.

  python launch/bench_methods.py                              # tiny + mid timings, 1.3B plan
  python launch/bench_methods.py --configs=mid --methods=rtn_int4,softprune_int4 --no_plan
  python launch/bench_methods.py --out=bench.md               # also write the markdown
  python launch/bench_methods.py --modes=study                # the study's behaviour only

Modes: every method is measured as the study ran it (its name's defaults) and, in a second row
``NAME [fixed]``, with kvjax's corrections (``CacheMethod.FIXES``: quantize once instead of
re-encoding the history on every call, unclamped zero-points, ...), so the cost of the study's
bugs in time, memory and bytes is visible side by side.

Timing: the cache is filled by context passes of every block but the last (a full window),
then the last block's denoising call and context pass are timed ``--repeats`` times. A sample
repeats the call until it lasts >= 50 ms and reports the mean per call; samples of the method
and of BF16 alternate (ABBA) so machine drift and order effects cancel. The tables report the
method's median time and the median of the per-pair ratios (the BF16 row, BF16 against itself,
shows the noise). Memory: ``kvjax.run.plan`` (abstract shapes, nothing allocated): realized KV
bytes and the compiled step's argument + temp bytes, with XLA CPU's float32 copies of bf16
weights (``cpu_weight_upcast_bytes``, identical for every method) subtracted so methods
compare on what they add.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.self_forcing import get_config  # noqa: E402
from kvjax import cache as kvcache  # noqa: E402
from kvjax import checkpoint as ckpt  # noqa: E402
from kvjax import kernels  # noqa: E402
from kvjax import run  # noqa: E402
from kvjax import runconfig  # noqa: E402
from kvjax.cache import accounting  # noqa: E402
from kvjax.sampler import SelfForcing  # noqa: E402

REFERENCE = kvcache.BF16.name  # the baseline every method is timed and sized against


def prepare(config_name: str, method: str, params_cache: dict, impl: str = 'xla',
            method_args: str | None = None):
  """Compiled step functions of ``method`` (attention ``impl``, parameter overrides
  ``method_args``) and a cache filled up to the last block."""
  s = run.resolve(runconfig.override(get_config(config_name), method=method, reference='none',
                                     method_args=method_args))
  cfg = s.model_cfg
  if config_name not in params_cache:
    params_cache[config_name] = ckpt.init_params(cfg, 0)
  params = params_cache[config_name]
  sf = SelfForcing(cfg, s.sampler_cfg, s.method, s.spec, latent_hw=(s.height, s.width),
                   impl=impl, graphdef=ckpt.graphdef(cfg))
  compile_s = sf.compile(params, cfg.text_len, cfg.text_dim)
  fn = sf._compiled
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.standard_normal((s.batch, cfg.text_len, cfg.text_dim)), cfg.cdtype)
  cross = fn['encode'](params, text)
  bf = s.sampler_cfg.block_frames
  shape = (s.batch, bf, cfg.in_dim, s.height, s.width)
  cache = jax.jit(s.method.init, static_argnums=0)(s.spec)
  nb = s.frames // bf
  for b in range(nb - 1):
    x0 = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    cache = fn['context'](params, x0, cross, cache, jnp.int32(b * bf))
  start = jnp.int32((nb - 1) * bf)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  t = jnp.float32(sf.timesteps[1])
  box = [cache]

  def denoise():
    if sf.recodes_every_call:           # the call re-encodes (and returns) the donated cache
      v, box[0] = fn['denoise'](params, x, t, cross, box[0], start)
      return v
    return fn['denoise'](params, x, t, cross, box[0], start)

  def context():
    box[0] = fn['context'](params, x, cross, box[0], start)
    return box[0]

  jax.block_until_ready(denoise())
  jax.block_until_ready(context())
  return dict(denoise=denoise, context=context, compile_s=compile_s, settings=s, box=box)


MIN_SAMPLE_S = 0.05  # each timing sample repeats a call until it lasts about this long


def _inner_calls(f) -> int:
  """Calls per timing sample so a sample lasts >= MIN_SAMPLE_S (tiny steps take ~2 ms)."""
  t0 = time.perf_counter()
  jax.block_until_ready(f())
  return max(1, int(np.ceil(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-6))))


def _once(f, n: int) -> float:
  """Mean seconds per call over ``n`` back-to-back calls."""
  t0 = time.perf_counter()
  for _ in range(n):
    out = f()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n


def time_against(ref: dict, run_: dict, repeats: int) -> dict:
  """Interleaved A/B timing against the BF16 reference (cancels machine drift).

  Returns the method's median times and the median of the per-pair ratios.
  """
  out = {}
  for step in ('denoise', 'context'):
    n = max(_inner_calls(ref[step]), _inner_calls(run_[step]))
    pairs = []
    for i in range(repeats):  # alternate which runs first (ABBA), so order effects cancel
      if i % 2:
        b = _once(run_[step], n)
        pairs.append((_once(ref[step], n), b))
      else:
        a = _once(ref[step], n)
        pairs.append((a, _once(run_[step], n)))
    out[step + '_ms'] = 1e3 * statistics.median(p[1] for p in pairs)
    out[step + '_ratio'] = statistics.median(p[1] / p[0] for p in pairs)
  s = run_['settings']
  out.update(compile_s=run_['compile_s'], kv_bytes=s.method.nbytes(run_['box'][0]),
             bf16_bytes=s.spec.bf16_bytes(),
             study_ratio=accounting.study_ratio(s.method, s.spec, run_['box'][0]))
  return out


def _fmt_ratio(r: float | None) -> str:
  return '-' if r is None else f'{r:.3f}'


def plan_method(method: str, config_name: str, method_args: str | None = None) -> dict:
  s = run.resolve(runconfig.override(get_config(config_name), method=method,
                                     method_args=method_args))
  p = run.plan(s)
  out = dict(kv_bytes=p['kv_cache_bytes'], bf16_bytes=p['bf16_kv_cache_bytes'],
             ratio=p['compression_ratio'], study_ratio=accounting.study_ratio(s.method, s.spec))
  for step in ('denoise_step', 'context_pass'):
    m = p[step]
    upcast = m.get('cpu_weight_upcast_bytes', 0)
    out[step] = m['argument_size_in_bytes'] + m['temp_size_in_bytes'] - upcast
    out[step + '_full_copies'] = m['full_extent_float_cache_arrays']
  return out


MODES = ('study', 'fixed')


def variants(method: str, modes) -> list[tuple[str, str, str | None]]:
  """(row label, method, ``--method_args``) of ``method`` in each mode: 'study' is the paper name
  as the study ran it (the default parameters), 'fixed' applies kvjax's corrections
  (``CacheMethod.FIXES``; no row when the method has none)."""
  fixes = kvcache.get(method).FIXES
  out = []
  for mode in modes:
    if mode == 'study' or not fixes:
      out.append((method, method, None))
    else:
      out.append((f'{method} [fixed]', method, ','.join(f'{k}={v}' for k, v in fixes.items())))
  return list(dict.fromkeys(out))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--configs', default='tiny,mid')
  ap.add_argument('--methods', default='all', help="comma list of names/aliases, or 'all'")
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--impl', default='xla', choices=kernels.IMPLS,
                  help='attention implementation (pallas: the fused kernel; interpret mode on CPU)')
  ap.add_argument('--plan_config', default='wan2.1_t2v_1.3b')
  ap.add_argument('--no_plan', action='store_true')
  ap.add_argument('--out', default=None, help='write the markdown tables here too')
  ap.add_argument('--json', default=None, help='write raw numbers as JSON')
  ap.add_argument('--modes', default='study,fixed',
                  help="comma list of 'study' (each name as the study ran it) and 'fixed' (with "
                       "kvjax's corrections, CacheMethod.FIXES): what the study's bugs cost")
  args = ap.parse_args(argv)
  modes = [m for m in args.modes.split(',') if m]
  bad = sorted(set(modes) - set(MODES))
  if bad or not modes:
    ap.error(f'--modes: unknown {bad or "(empty)"}; valid: {", ".join(MODES)}')
  methods = list(kvcache.PAPER_NAMES) if args.methods == 'all' else [
      kvcache.canonical(m) for m in args.methods.split(',')]
  if REFERENCE not in methods:
    methods = [REFERENCE] + methods
  configs = [c for c in args.configs.split(',') if c]
  raw: dict = {'backend': jax.default_backend(), 'device': str(jax.devices()[0]), 'timing': {}, 'plan': {}}
  lines = []
  params_cache: dict = {}
  for cfg in configs:
    rows = {}
    ref = prepare(cfg, REFERENCE, params_cache, args.impl)
    for m, name, margs in [v for name in methods for v in variants(name, modes)]:
      run_ = ref if m == REFERENCE else prepare(cfg, name, params_cache, args.impl, margs)
      rows[m] = time_against(ref, run_, args.repeats)
      print(f'[{cfg}] {m:53s} denoise {rows[m]["denoise_ms"]:8.2f} ms x{rows[m]["denoise_ratio"]:.2f}  '
            f'context {rows[m]["context_ms"]:8.2f} ms x{rows[m]["context_ratio"]:.2f}',
            file=sys.stderr, flush=True)
    raw['timing'][cfg] = rows
    lines += [f'\n### Step time, config `{cfg}` ({raw["backend"]}; median of {args.repeats} '
              'interleaved method/BF16 pairs)\n',
              '| method | denoise ms | x BF16 | context ms | x BF16 | KV bytes | ratio | study ratio |',
              '|---|---:|---:|---:|---:|---:|---:|---:|']
    for m, r in rows.items():
      lines.append(f'| {m} | {r["denoise_ms"]:.2f} | {r["denoise_ratio"]:.2f} | '
                   f'{r["context_ms"]:.2f} | {r["context_ratio"]:.2f} | '
                   f'{r["kv_bytes"]:,} | {r["bf16_bytes"] / r["kv_bytes"]:.3f} | '
                   f'{_fmt_ratio(r["study_ratio"])} |')
  if not args.no_plan:
    rows = {}
    for m, name, margs in [v for name in methods for v in variants(name, modes)]:
      rows[m] = plan_method(name, args.plan_config, margs)
      print(f'[plan] {m:45s} kv {rows[m]["kv_bytes"]:,}', file=sys.stderr, flush=True)
    raw['plan'] = rows
    b = rows[REFERENCE]
    lines += [f'\n### Compile-only memory at `{args.plan_config}` (bytes; arguments + temp, CPU weight upcast removed)\n',
              '| method | KV bytes | ratio | study ratio | denoise step | x BF16 | context pass | x BF16 | full-size float cache copies |',
              '|---|---:|---:|---:|---:|---:|---:|---:|---|']
    for m, r in rows.items():
      copies = sorted(set(r['denoise_step_full_copies'] + r['context_pass_full_copies']))
      lines.append(f'| {m} | {r["kv_bytes"]:,} | {r["ratio"]:.3f} | {_fmt_ratio(r["study_ratio"])} | '
                   f'{r["denoise_step"]:,} | '
                   f'{r["denoise_step"] / b["denoise_step"]:.3f} | {r["context_pass"]:,} | '
                   f'{r["context_pass"] / b["context_pass"]:.3f} | {", ".join(copies) or "none"} |')
  write_outputs('\n'.join(lines), raw, args.out, args.json)


def write_outputs(text: str, raw: dict, out: str | None, json_path: str | None) -> None:
  """Prints the markdown tables; writes them to ``out`` and the raw numbers to ``json_path``."""
  print(text)
  if out:
    with open(out, 'w') as f:
      f.write(text + '\n')
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(raw, f, indent=2, default=str)


if __name__ == '__main__':
  main()
