"""What the study's behaviour costs in fidelity: every method as the study ran it against the same
method with kvjax's corrections, on a synthetic rollout driven call by call as the model does.

  python launch/bench_faithful.py                       # all table rows, both modes
  python launch/bench_faithful.py --methods=kivi_int4,qaq_int4 --blocks=14 --out=faithful.md

Each block makes four noisy calls (the block's K/V mixed with fresh noise at the sampler's
sigmas 1, 0.9375, 0.8333, 0.625) and the clean context pass. On every call the method's history
is read as attention reads it (``materialize``) and a fixed set of queries attends to it; the
error is the relative L2 distance of that attention output from attention over the exact clean
history (the BF16 method driven the same way), averaged over the calls of the blocks after the
first two. After the read, the method re-encodes as its cadence says (``recode``) and the context
pass appends the block. K/V have what makes quantizers differ: per-channel offsets (one-signed
key channels, as RoPE phases and biases make them), a few tokens large in every channel
(attention-sink-like rows) and a slowly drifting content, so re-encoding, masks and plans change
between calls. Modes: ``study`` = the name's defaults; ``fixed`` = with ``CacheMethod.FIXES``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvjax import cache as kvcache  # noqa: E402
from kvjax.cache.base import AppendInfo, CacheSpec  # noqa: E402
from kvjax.kernels.reference import dense_attention  # noqa: E402

SIGMAS = (1.0, 0.9375, 0.8333333, 0.625)


def synthetic_blocks(spec: CacheSpec, blocks: int, seed: int = 0):
  """Clean K/V per block, [blocks, B, bf * P, N, H] float32, with channel offsets, sink rows
  and a content that drifts from block to block."""
  rng = np.random.default_rng(seed)
  b, bf, p, n, h = spec.batch, spec.block_frames, spec.frame_tokens, spec.num_heads, spec.head_dim
  offset = rng.standard_normal((n, h)) * 2.0                        # one-signed channels
  base = rng.standard_normal((b, p, n, h))
  ks, vs = [], []
  for _ in range(blocks):
    frames_k, frames_v = [], []
    for _ in range(bf):
      base = 0.9 * base + 0.45 * rng.standard_normal(base.shape)     # drifting content
      k = base + offset + 0.3 * rng.standard_normal(base.shape)
      v = rng.standard_normal(base.shape) + 0.5 * base
      k[:, :2] *= 8.0                                                # sink-like rows
      v[:, :2] *= 8.0
      frames_k.append(k)
      frames_v.append(v)
    ks.append(np.concatenate(frames_k, 1))
    vs.append(np.concatenate(frames_v, 1))
  return np.stack(ks).astype(np.float32), np.stack(vs).astype(np.float32)


def _calls(k, v, rng):
  """The five (k, v) of a block's calls: four noisy at the sampler's sigmas, then the clean."""
  out = []
  for s in SIGMAS:
    out.append(((1 - s) * k + s * rng.standard_normal(k.shape).astype(np.float32),
                (1 - s) * v + s * rng.standard_normal(v.shape).astype(np.float32)))
  return out + [(k, v)]


def history_reads(method, spec: CacheSpec, ks, vs, q, seed: int = 1):
  """Attention outputs of ``q`` over the history on every call: list of [B, T, N, H] float32."""
  rng = np.random.default_rng(seed)
  dt = spec.dtype
  mat = jax.jit(method.materialize, static_argnums=1)
  rec, app = jax.jit(method.recode), jax.jit(method.append)
  st = method.init(spec)
  outs = []
  for b in range(ks.shape[0]):
    info = AppendInfo(jnp.int32(b * spec.block_frames))
    for c, (k, v) in enumerate(_calls(ks[b], vs[b], rng)):
      kk, vv, bias = mat(st, 0)
      outs.append(None if b == 0 else
                  np.asarray(dense_attention(q, kk, vv, bias=bias)[0], np.float32))
      kj, vj = jnp.asarray(k, dt), jnp.asarray(v, dt)
      if method.cadence == 'every_call' or (method.cadence == 'per_block' and c == 4):
        for layer in range(spec.num_layers):
          st = rec(st, jnp.int32(layer), kj, vj, info)
      if c == 4:
        for layer in range(spec.num_layers):
          st = app(st, jnp.int32(layer), kj, vj, info)
  return outs


def relative_error(reads, exact, skip_blocks: int = 2):
  errs = [np.linalg.norm(a - e) / np.linalg.norm(e)
          for i, (a, e) in enumerate(zip(reads, exact)) if a is not None and i >= 5 * skip_blocks]
  return float(np.mean(errs))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--methods', default='all', help="comma list of names/aliases, or 'all'")
  ap.add_argument('--blocks', type=int, default=8)
  ap.add_argument('--window', type=int, default=12, help='frames a block sees, its own included')
  ap.add_argument('--frame_tokens', type=int, default=48)
  ap.add_argument('--out', default=None, help='write the markdown table here too')
  args = ap.parse_args(argv)
  names = [n for n in kvcache.PAPER_NAMES if n != kvcache.BF16.name] if args.methods == 'all' \
      else [kvcache.canonical(m) for m in args.methods.split(',')]
  spec = CacheSpec(batch=1, num_layers=2, num_heads=2, head_dim=64,
                   frame_tokens=args.frame_tokens, block_frames=3, window_frames=args.window,
                   total_frames=3 * args.blocks, dtype=jnp.bfloat16)
  ks, vs = synthetic_blocks(spec, args.blocks)
  q = jnp.asarray(np.random.default_rng(7).standard_normal((1, 32, 2, 64)), jnp.float32)
  exact = history_reads(kvcache.get('BF16'), spec, ks, vs, q)
  lines = [f'History-attention error vs exact (synthetic, {args.blocks} blocks, window '
           f'{args.window}, {args.frame_tokens} tokens a frame; mean over the calls of blocks 2+)',
           '', '| method | cadence | study (default) | fixed | study / fixed | fixes |',
           '|---|---|---:|---:|---:|---|']
  for name in names:
    m = kvcache.get(name)
    study = relative_error(history_reads(m, spec, ks, vs, q), exact)
    if m.FIXES:
      fixed = relative_error(history_reads(m.fixed(), spec, ks, vs, q), exact)
      row = f'| {name} | {m.cadence} | {study:.4f} | {fixed:.4f} | {study / fixed:.2f} | ' + \
          ', '.join(f'`{k}={v}`' for k, v in m.FIXES.items()) + ' |'
    else:
      row = f'| {name} | {m.cadence} | {study:.4f} | - | - | - |'
    print(row, file=sys.stderr, flush=True)
    lines.append(row)
  text = '\n'.join(lines)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
