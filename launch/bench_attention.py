"""Attention over packed caches: the fused Pallas kernel per storage format against BF16 attention,
and end-to-end step time and device peak memory per cache method.

  python launch/bench_attention.py                      # on a GPU: Self-Forcing shapes, 1.3B e2e
  python launch/bench_attention.py --small              # CPU smoke run (interpret mode, tiny e2e)
  python launch/bench_attention.py --formats=int4,kivi_int2 --methods=rtn_int4 --out=attn.md

Kernel table (one row per storage format): a query block of ``--query_frames`` frames against
``--history_frames`` cached frames of ``--frame_tokens`` tokens, ``--heads`` x ``--head_dim``.
The BF16 baseline is ``jax.nn.dot_product_attention`` over the same tokens held dense in
bfloat16 (``implementation='cudnn'`` on GPU, XLA elsewhere); the XLA walk is kvjax's chunked jnp
path over the packed records. Each time is the median of ``--repeats`` samples, a sample
repeating the call until it lasts >= 50 ms; TFLOP/s counts 4 * B * N * T * S * H.

End-to-end table: ``launch/bench_methods.py``'s paired method/BF16 step timing with
``impl`` at ``--e2e_config`` (random weights; no checkpoint needed), plus the device's peak memory
(``memory_stats()['peak_bytes_in_use']``) after each method: the process's running peak, so run one
method per process (``--methods=NAME``) to read a method's own peak.

On CPU the kernels run with ``interpret=True``: the numbers only prove the script works.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvjax import cache as kvcache  # noqa: E402
from kvjax import kernels  # noqa: E402
from kvjax.cache import codecs as C  # noqa: E402
from kvjax.cache.qvg import QVGCodec  # noqa: E402
from kvjax.kernels.rope import RopeGrid  # noqa: E402
from kvjax.kernels import pallas_gpu, reference  # noqa: E402
from launch import bench_methods  # noqa: E402  (paired step timing, shared)

# name -> (key codec, value codec): the typed-record formats of the methods' sources. Exact
# outliers (QAQ, TPTQ) and the byte pool (AGE_TIER, TPTQ) are timed end to end per method.
FORMATS = {
    'bf16': (C.Dense(jnp.bfloat16), C.Dense(jnp.bfloat16)),
    'int8': (C.SymRTN(8), C.SymRTN(8)),
    'int4': (C.SymRTN(4), C.SymRTN(4)),
    'int2': (C.SymRTN(2), C.SymRTN(2)),
    'k2_v4': (C.SymRTN(2), C.SymRTN(4)),
    'int4_bf16_dequant': (C.SymRTN(4, dequant_dtype='bfloat16'), C.SymRTN(4, dequant_dtype='bfloat16')),
    'kivi_int4': (C.AsymGroup(4), C.AsymToken(4)),
    'kivi_int2': (C.AsymGroup(2), C.AsymToken(2)),
    'quarot_int4': (C.Rotated(C.SymRTN(4)), C.Rotated(C.SymRTN(4))),
    'prq_int4': (C.PRQ(4, 4), C.PRQ(4, 4)),
    'prq_int2': (C.PRQ(2, 2), C.PRQ(2, 2)),
    # QVG (beyond the study): 256 centroids per 3-frame span, FP8 scales; pre-RoPE keys are
    # rotated per key tile in the kernel (the default), post-RoPE keys are not.
    'qvg_int2_prerope': (QVGCodec(2), QVGCodec(2)),
    'qvg_int2': (QVGCodec(2), QVGCodec(2)),
    'qvg_int4': (QVGCodec(4), QVGCodec(4)),
    'bf16_prerope': (C.Dense(jnp.bfloat16), C.Dense(jnp.bfloat16)),   # QVG's exact tail
}
PRE_ROPE = ('qvg_int2_prerope', 'bf16_prerope')
QVG_SPAN = 3                      # frames per span in the kernel table

MIN_SAMPLE_S = 0.05


def _grid(p: int) -> tuple[int, int]:
  """A token grid of p tokens for RoPE tables (30 x 52 at Wan's 1,560)."""
  hh = max(d for d in range(1, int(p**0.5) + 1) if p % d == 0)
  return hh, p // hh


def make_source(kc, vc, b, r, p, n, h, seed=0, pre_rope=False) -> kernels.Source:
  """A one-layer source of ``r`` records of ``p`` tokens encoded from random bf16 K/V (QVG:
  spans of ``QVG_SPAN`` frames with their shared centroid tables)."""
  rng = np.random.default_rng(seed)
  x = lambda: jnp.asarray(rng.standard_normal((b, r, p, n, h)), jnp.bfloat16)  # noqa: E731
  extra = {}
  if isinstance(kc, QVGCodec):
    if r % QVG_SPAN:
      raise ValueError(f'QVG formats need history_frames divisible by {QVG_SPAN} (got {r})')
    spans = r // QVG_SPAN
    enc = jax.jit(kc.encode_span)

    def encode(xs):
      parts = [enc(xs[:, i * QVG_SPAN:(i + 1) * QVG_SPAN], jax.random.PRNGKey(i))
               for i in range(spans)]
      rec = {f: jnp.concatenate([pt[0][f] for pt in parts], 1) for f in parts[0][0]}
      shared = {f: jnp.concatenate([pt[1][f] for pt in parts], 1)[None] for f in parts[0][1]}
      return rec, shared
    (k, ks), (v, vs) = encode(x()), encode(x())
    extra = dict(k_shared=ks, v_shared=vs,
                 shared_index=jnp.arange(r, dtype=jnp.int32) // QVG_SPAN)
  else:
    k, v = jax.jit(kc.encode)(x()), jax.jit(vc.encode)(x())
  if pre_rope:
    extra.update(rope=RopeGrid(h, *_grid(p)), positions=jnp.arange(r, dtype=jnp.int32))
  return kernels.Source(k={n_: a[None] for n_, a in k.items()},
                        v={n_: a[None] for n_, a in v.items()}, layer=jnp.int32(0),
                        index=jnp.arange(r, dtype=jnp.int32), num_chunks=jnp.int32(r), kfmt=kc,
                        vfmt=vc, chunk_tokens=p, **extra)


def qvg_encode_ms(args, frames: int, bits: int) -> float:
  """Median ms of one jitted QVG span encode (k-means + residual) of K or V [1, frames, P, N, H]."""
  codec = QVGCodec(bits)
  x = jnp.asarray(np.random.default_rng(3).standard_normal(
      (1, frames, args.frame_tokens, args.heads, args.head_dim)), jnp.bfloat16)
  enc = jax.jit(codec.encode_span)
  key = jax.random.PRNGKey(0)
  return time_fn(lambda: enc(x, key), args.repeats) * 1e3


def time_fn(f, repeats: int) -> float:
  """Median seconds per call (each sample repeats the call for >= MIN_SAMPLE_S)."""
  t0 = time.perf_counter()
  jax.block_until_ready(f())
  n = max(1, int(np.ceil(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-6))))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(n):
      out = f()
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / n)
  return statistics.median(samples)


def bench_kernels(args, formats) -> dict:
  b, n, h, p = 1, args.heads, args.head_dim, args.frame_tokens
  t, r = args.query_frames * p, args.history_frames
  s = r * p
  gpu = jax.default_backend() == 'gpu'
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.bfloat16)
  kd = jnp.asarray(rng.standard_normal((b, s, n, h)), jnp.bfloat16)
  vd = jnp.asarray(rng.standard_normal((b, s, n, h)), jnp.bfloat16)
  flops = 4.0 * b * n * t * s * h
  dpa = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation='cudnn' if gpu else 'xla'))
  base = time_fn(lambda: dpa(q, kd, vd), args.repeats)
  rows = {'bf16 dot_product_attention': dict(ms=base * 1e3, tflops=flops / base / 1e12, ratio=1.0)}
  print(f'baseline {"cudnn" if gpu else "xla"} bf16: {base * 1e3:.3f} ms', file=sys.stderr, flush=True)
  scale = 1.0 / h**0.5
  for name in formats:
    kc, vc = FORMATS[name]
    src = make_source(kc, vc, b, r, p, n, h, pre_rope=name in PRE_ROPE)
    reason = pallas_gpu.unsupported(src)
    row = {}
    if reason is None:
      kern = jax.jit(lambda q, src: pallas_gpu.source_attention(
          q, src, scale, interpret=not gpu, block_q=args.block_q, block_k=args.block_k,
          num_warps=args.num_warps, num_stages=args.num_stages))
      sec = time_fn(lambda: kern(q, src), args.repeats)
      row.update(ms=sec * 1e3, tflops=flops / sec / 1e12, ratio=base / sec)
    else:
      row.update(unsupported=reason)
    if args.xla_walk:
      walk = jax.jit(lambda q, src: reference.walk(q, src, scale))
      row['xla_walk_ms'] = time_fn(lambda: walk(q, src), args.repeats) * 1e3
    stored = (src.k, src.v, src.k_shared, src.v_shared)          # QVG: centroid tables too
    row['kv_bytes'] = int(sum(x.nbytes for x in jax.tree.leaves(stored)))
    rows[name] = row
    print(f'{name:20s} {row}', file=sys.stderr, flush=True)
  encode = {}
  if any(isinstance(FORMATS[f][0], QVGCodec) for f in formats):
    for frames in sorted({QVG_SPAN, args.qvg_span_frames}):
      for bits in (2, 4):
        encode[f'qvg_int{bits}_span{frames}'] = qvg_encode_ms(args, frames, bits)
        print(f'QVG encode int{bits}, {frames}-frame span: {encode[f"qvg_int{bits}_span{frames}"]:.2f} ms',
              file=sys.stderr, flush=True)
  return dict(shape=dict(batch=b, query_tokens=t, cached_tokens=s, heads=n, head_dim=h), rows=rows,
              qvg_encode_ms=encode)


def tune(args, formats) -> dict:
  """Kernel ms per (block_q, block_k, num_warps, num_stages) for a few formats."""
  b, n, h, p = 1, args.heads, args.head_dim, args.frame_tokens
  t, r = args.query_frames * p, args.history_frames
  gpu = jax.default_backend() == 'gpu'
  q = jnp.asarray(np.random.default_rng(1).standard_normal((b, t, n, h)), jnp.bfloat16)
  scale = 1.0 / h**0.5
  out = {}
  for name in formats:
    kc, vc = FORMATS[name]
    src = make_source(kc, vc, b, r, p, n, h, pre_rope=name in PRE_ROPE)
    for bq in (64, 128):
      for bk in (32, 64, 128):
        for warps in (4, 8):
          for stages in (2, 3):
            key = f'{name} bq={bq} bk={bk} warps={warps} stages={stages}'
            try:
              kern = jax.jit(lambda q, src, bq=bq, bk=bk, w=warps, st=stages:
                             pallas_gpu.source_attention(q, src, scale, interpret=not gpu,
                                                         block_q=bq, block_k=bk, num_warps=w,
                                                         num_stages=st))
              out[key] = time_fn(lambda: kern(q, src), args.repeats) * 1e3
            except Exception as e:  # a configuration Triton rejects (registers, shared memory)
              out[key] = f'failed: {type(e).__name__}'
            print(f'[tune] {key}: {out[key]}', file=sys.stderr, flush=True)
  return out


def bench_e2e(args, methods) -> dict:
  params_cache: dict = {}
  ref = bench_methods.prepare(args.e2e_config, 'BF16', params_cache, impl=args.impl)
  rows = {}
  for m in methods:
    run_ = ref if m == 'BF16' else bench_methods.prepare(args.e2e_config, m, params_cache, impl=args.impl)
    rows[m] = bench_methods.time_against(ref, run_, args.repeats)
    stats = jax.devices()[0].memory_stats() or {}
    rows[m]['peak_bytes_in_use'] = stats.get('peak_bytes_in_use')
    print(f'[e2e] {m:45s} {rows[m]}', file=sys.stderr, flush=True)
  return rows


def markdown(raw: dict) -> str:
  k = raw['kernels']
  sh = k['shape']
  lines = [f'### Attention kernels ({raw["device"]}): B={sh["batch"]}, T={sh["query_tokens"]}, '
           f'S={sh["cached_tokens"]}, {sh["heads"]} heads x {sh["head_dim"]}\n',
           '| format | ms | TFLOP/s | x BF16 throughput | XLA walk ms | KV bytes |',
           '|---|---:|---:|---:|---:|---:|']
  for name, r in k['rows'].items():
    if 'unsupported' in r:
      lines.append(f'| {name} | unsupported: {r["unsupported"]} | | | | |')
      continue
    walk = f'{r["xla_walk_ms"]:.3f}' if 'xla_walk_ms' in r else ''
    lines.append(f'| {name} | {r["ms"]:.3f} | {r["tflops"]:.3g} | {r["ratio"]:.2f} | {walk} | '
                 f'{r.get("kv_bytes", "")} |')
  if k.get('qvg_encode_ms'):
    lines += ['\n| QVG span encode (K or V, k-means + residual) | ms |', '|---|---:|']
    lines += [f'| {name} | {ms:.2f} |' for name, ms in k['qvg_encode_ms'].items()]
  if raw.get('tune'):
    lines += ['\n| kernel configuration | ms |', '|---|---:|']
    lines += [f'| {name} | {v if isinstance(v, str) else f"{v:.3f}"} |'
              for name, v in raw['tune'].items()]
  if raw.get('e2e'):
    lines += [f'\n### End to end, `{raw["e2e_config"]}`, impl={raw["impl"]}\n',
              '| method | denoise ms | x BF16 | context ms | x BF16 | KV bytes | peak bytes |',
              '|---|---:|---:|---:|---:|---:|---:|']
    for m, r in raw['e2e'].items():
      lines.append(f'| {m} | {r["denoise_ms"]:.2f} | {r["denoise_ratio"]:.2f} | {r["context_ms"]:.2f} '
                   f'| {r["context_ratio"]:.2f} | {r["kv_bytes"]:,} | {r["peak_bytes_in_use"] or "n/a"} |')
  return '\n'.join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--small', action='store_true', help='CPU smoke shapes (tiny e2e config)')
  ap.add_argument('--formats', default='all', help=f'comma list of {sorted(FORMATS)} or all')
  ap.add_argument('--methods', default='all', help="e2e methods (names/aliases), 'all' or 'none'")
  ap.add_argument('--frame_tokens', type=int, default=1560)
  ap.add_argument('--history_frames', type=int, default=18)
  ap.add_argument('--query_frames', type=int, default=3)
  ap.add_argument('--heads', type=int, default=12)
  ap.add_argument('--head_dim', type=int, default=128)
  ap.add_argument('--e2e_config', default='wan2.1_t2v_1.3b')
  ap.add_argument('--impl', default='auto', choices=kernels.IMPLS)
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--xla_walk', action='store_true', help='also time the XLA walk per format')
  ap.add_argument('--qvg_span_frames', type=int, default=24,
                  help='also time the QVG encode of a span of this many frames')
  ap.add_argument('--block_q', type=int, default=None, help='kernel query tile (default: the kernel\'s)')
  ap.add_argument('--block_k', type=int, default=None, help='kernel key tile')
  ap.add_argument('--num_warps', type=int, default=None)
  ap.add_argument('--num_stages', type=int, default=None)
  ap.add_argument('--tune', default='', help='comma list of formats to sweep kernel tile sizes on')
  ap.add_argument('--out', default=None, help='write the markdown tables here too')
  ap.add_argument('--json', default=None, help='write raw numbers as JSON')
  args = ap.parse_args(argv)
  if args.small:
    args.frame_tokens, args.history_frames, args.query_frames = 64, 3, 1
    args.heads, args.head_dim, args.e2e_config, args.repeats = 2, 64, 'tiny', 2
    args.qvg_span_frames = 3
  formats = sorted(FORMATS) if args.formats == 'all' else args.formats.split(',')
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    ap.error(f'unknown formats {unknown}; valid: {sorted(FORMATS)}')
  if args.methods == 'all':
    methods = list(kvcache.PAPER_NAMES)
  elif args.methods == 'none':
    methods = []
  else:
    methods = [kvcache.canonical(m) for m in args.methods.split(',')]
  raw = dict(backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
             impl=args.impl, e2e_config=args.e2e_config)
  raw['kernels'] = bench_kernels(args, formats)
  if args.tune:
    raw['tune'] = tune(args, args.tune.split(','))
  raw['e2e'] = bench_e2e(args, methods) if methods else {}
  bench_methods.write_outputs(markdown(raw), raw, args.out, args.json)
  return raw


if __name__ == '__main__':
  main()
