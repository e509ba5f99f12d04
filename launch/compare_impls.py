"""--impl=pallas against --impl=xla end to end: the launcher's rollout for every method, both ways.

  python launch/compare_impls.py                                   # all 33, tiny model, float32
  python launch/compare_impls.py --methods=kivi_int2,qaq_int4 --compute_dtype=bfloat16
  python launch/compare_impls.py --shard=0/2 & python launch/compare_impls.py --shard=1/2

Each method runs ``kvjax.run.generate`` on the built-in default model twice (``impl=xla``, then
``impl=pallas``: the Pallas kernel, in interpret mode on a CPU) from the same seed, and the table
reports the relative L2 difference of the latents, per block and overall, and which sources the
kernel did not read (``result.json``'s ``kernel_fallbacks``). ``--num_heads=1`` (the default)
gives the tiny model a head_dim of 64, so that INT2 channel slices are as wide as a Triton dot
needs and every method is read by the kernel. The test suite runs this comparison for one method
per storage format (``tests/kernels/integration_test.py``); this script covers all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.self_forcing import get_config  # noqa: E402
from kvjax import cache as kvcache  # noqa: E402
from kvjax import run  # noqa: E402
from kvjax import runconfig  # noqa: E402


def compare(method: str, args, workdir: str) -> dict:
  lat, fallbacks = {}, []
  for impl in ('xla', 'pallas'):
    cfg = get_config(args.config)
    cfg.model.num_heads = args.num_heads
    out = os.path.join(workdir, f'{method}_{impl}')
    s = run.resolve(runconfig.override(cfg, method=method, impl=impl, reference='none',
                                       num_latent_frames=args.frames, window_frames=args.window,
                                       sink_frames=args.sink,
                                       compute_dtype=args.compute_dtype), outdir=out)
    res = run.generate(s, progress=False)
    bf = s.sampler_cfg.block_frames
    lat[impl] = np.load(os.path.join(out, 'latents.npy')).astype(np.float64)
    if impl == 'pallas':
      fallbacks = res['kernel_fallbacks']
  d = lat['pallas'] - lat['xla']
  per_block = [float(np.linalg.norm(d[:, i:i + bf]) / np.linalg.norm(lat['xla'][:, i:i + bf]))
               for i in range(0, d.shape[1], bf)]
  return dict(rel_l2=float(np.linalg.norm(d) / np.linalg.norm(lat['xla'])), per_block=per_block,
              fallbacks=fallbacks)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--methods', default='all', help="comma list of names/aliases, or 'all'")
  ap.add_argument('--config', default='tiny')
  ap.add_argument('--num_heads', type=int, default=1)
  ap.add_argument('--compute_dtype', default='float32', choices=('float32', 'bfloat16'))
  ap.add_argument('--frames', type=int, default=12)
  ap.add_argument('--window', type=int, default=9)
  ap.add_argument('--sink', type=int, default=1)
  ap.add_argument('--shard', default='0/1', help='i/n: run every n-th method from the i-th')
  ap.add_argument('--json', default=None, help='write the rows as JSON')
  args = ap.parse_args(argv)
  methods = list(kvcache.PAPER_NAMES) if args.methods == 'all' else [
      kvcache.canonical(m) for m in args.methods.split(',')]
  i, n = (int(x) for x in args.shard.split('/'))
  methods = methods[i::n]
  rows = {}
  with tempfile.TemporaryDirectory() as workdir:
    for m in methods:
      rows[m] = compare(m, args, workdir)
      r = rows[m]
      print(f'| {m} | {r["rel_l2"]:.2e} | {" / ".join(f"{x:.1e}" for x in r["per_block"])} | '
            f'{", ".join(r["fallbacks"]) or "none"} |', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == '__main__':
  main()
