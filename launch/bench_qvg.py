"""QVG (beyond the study) against the study's best methods: compression, compiled memory, step
time and fidelity, in one table.

  python launch/bench_qvg.py                       # everything below (about 10 min on 2 CPU cores)
  python launch/bench_qvg.py --no_time --out=qvg.md

Rows: QVG_INT2 / QVG_INT4 at their defaults (256 centroids per one-block span, pre-RoPE keys),
QVG_INT2 with post-RoPE keys, QVG_INT2 / INT4 with 4 centroids (on the tiny model a span holds
48 tokens, so 256 centroids are more centroids than tokens and the "compression" is lossless and
larger than BF16; 4 centroids give about 12 tokens a centroid, as 256 do at 1.3B's 4,680), and
the study's best: FLOWCACHE_SOFT_PRUNE_INT4, KIVI_INT2, QUAROT_KV_INT2, RTN_INT2.

Columns:
  * fidelity on ``--fidelity_config`` (default ``tiny_long``: 18 frames through a 9-frame window
    with 3 sink frames, random weights) against the BF16 rollout of the same noise: latent PSNR
    over the rollout, PSNR of the first block that reads a compressed cache (the paper's
    "first generated chunk" protocol), and ``latent_drift`` (relative error of the last third
    of the frames over the first third; > 1: the error grows).
  * realized compression on that config, and at 1.3B from ``--plan`` (abstract shapes):
    KV bytes and the compiled denoising step / context pass (arguments + temporaries minus
    XLA CPU's float32 weight copies) relative to BF16.
  * pre- vs post-RoPE keys: the codec's reconstruction error (relative L2, all layers) of the
    keys of a BF16 rollout on ``--rope_config`` (default ``mid``, 240 tokens a frame), encoded
    one span (block) at a time either before RoPE (then rotated) or after, at
    ``--rope_centroids`` (default 256: 720 tokens a span, about 3 a centroid; 1.3B has 18).
  * step time on ``--time_config`` (default ``mid``) relative to BF16, paired A/B medians
    (``bench_methods.time_against``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.self_forcing import get_config  # noqa: E402
from kvjax import cache as kvcache  # noqa: E402
from kvjax import checkpoint as ckpt  # noqa: E402
from kvjax import run  # noqa: E402
from kvjax import runconfig  # noqa: E402
from kvjax.cache.ring import ring_frame  # noqa: E402
from kvjax.kernels import rope  # noqa: E402
from launch import bench_methods  # noqa: E402

# (label, method, method_args)
ROWS = (
    ('QVG_INT2', 'QVG_INT2', None),
    ('QVG_INT4', 'QVG_INT4', None),
    ('QVG_INT2 rope=post', 'QVG_INT2', 'rope=post'),
    ('QVG_INT2 centroids=4', 'QVG_INT2', 'centroids=4'),
    ('QVG_INT2 centroids=4 rope=post', 'QVG_INT2', 'centroids=4,rope=post'),
    ('QVG_INT4 centroids=4', 'QVG_INT4', 'centroids=4'),
    ('FLOWCACHE_SOFT_PRUNE_INT4', 'FLOWCACHE_SOFT_PRUNE_INT4', None),
    ('KIVI_INT2', 'KIVI_INT2', None),
    ('QUAROT_KV_INT2', 'QUAROT_KV_INT2', None),
    ('RTN_INT2', 'RTN_INT2', None),
)


def fidelity(config: str, method: str, args: str | None) -> dict:
  """One rollout against BF16: result.json's fields plus the first-history-block PSNR."""
  with tempfile.TemporaryDirectory() as tmp:
    s = run.resolve(runconfig.override(get_config(config), method=method,
                                       method_args=args), outdir=os.path.join(tmp, 'run'))
    res = run.generate(s, progress=False)
    with open(os.path.join(tmp, 'run', 'curves.csv')) as f:
      rows = list(csv.DictReader(f))
  bf = s.sampler_cfg.block_frames
  first = [r for r in rows if bf <= int(r['frame']) < 2 * bf]
  err = np.mean([float(r['rel_l2']) ** 2 for r in first])
  rms = np.mean([float(r['rms']) ** 2 for r in first])
  # PSNR of the block as the curves define it per frame: peak = the reference's max |x|.
  psnr_first = float(np.mean([float(r['psnr']) for r in first]))
  return dict(psnr=res['latent_psnr'], psnr_first_block=psnr_first, drift=res['latent_drift'],
              rel_l2=res['latent_rel_l2'], rel_l2_first_block=float(np.sqrt(err)) if rms else 0.0,
              ratio=res['compression_ratio'])


def rope_reconstruction(config: str, centroids: int, bits: int = 2) -> dict:
  """Relative L2 reconstruction error of the keys of a BF16 rollout, QVG-encoded per block
  before RoPE (decoded, then rotated) or after RoPE (module docstring)."""
  s = run.resolve(runconfig.override(get_config(config), method='BF16', reference='none'))
  gdef = ckpt.graphdef(s.model_cfg)
  params = ckpt.init_params(s.model_cfg, 0)
  noise = run.make_noise(s.seed, s.batch, s.frames, s.model_cfg.in_dim, s.height, s.width,
                         s.sampler_cfg)
  text = np.asarray(jax.random.normal(jax.random.key(1), (s.batch, s.model_cfg.text_len,
                                                           s.model_cfg.text_dim)))
  _, cache, _ = run._rollout(s, kvcache.BF16(), params, noise, text, gdef, 'BF16', None)
  spec, grid, bf = s.spec, s.spec.rope, s.spec.block_frames
  codec = kvcache.get(f'QVG_INT{bits}', centroids=centroids).codec(spec.dtype, spec.head_dim)
  enc = jax.jit(lambda x, key: codec.decode(codec.encode(x, {'key': key}), jnp.float32))
  err = {'pre': [0.0, 0.0], 'post': [0.0, 0.0]}
  if spec.sink_frames:
    raise ValueError(f'--rope_config {config} has sink frames; use a config without')
  written, cap, p = int(cache.frames[0]), spec.capacity_frames, spec.frame_tokens
  slots = min(written, cap) // bf * bf
  frame_of = lambda slot: int(ring_frame(slot, written, cap, 0))   # noqa: E731
  for layer in range(spec.num_layers):
    k, _, _ = kvcache.BF16().materialize(cache, layer)          # rotated keys [B, S, N, H]
    for blk in range(slots // bf):
      frames = [frame_of(sl) for sl in range(blk * bf, (blk + 1) * bf)]
      post = [k[:, sl * p:(sl + 1) * p] for sl in range(blk * bf, (blk + 1) * bf)]
      cos_sin = [grid.frame_angles(f) for f in frames]
      pre = [rope.apply(x, c, -sn) for x, (c, sn) in zip(post, cos_sin)]   # inverse rotation
      key = jax.random.PRNGKey(layer * 1000 + blk)
      x_post = jnp.stack(post, 1).astype(spec.dtype)
      x_pre = jnp.stack(pre, 1).astype(spec.dtype)
      dec_post = enc(x_post, key)
      dec_pre = enc(x_pre, key)
      rot = jnp.stack([rope.apply(dec_pre[:, i], *cs) for i, cs in enumerate(cos_sin)], 1)
      ref = x_post.astype(jnp.float32)
      for name, got in (('post', dec_post), ('pre', rot)):
        err[name][0] += float(jnp.sum((got - ref) ** 2))
        err[name][1] += float(jnp.sum(ref ** 2))
  out = {name: (a / b) ** 0.5 for name, (a, b) in err.items()}
  out.update(config=config, centroids=centroids, bits=bits,
             post_over_pre=out['post'] / out['pre'])
  return out


def markdown(raw: dict) -> str:
  f = raw['fidelity_config']
  lines = [f'### QVG vs the study\'s best: fidelity on `{f}` (random weights), '
           f'compression, 1.3B plan, step time on `{raw["time_config"]}`\n',
           '| method | PSNR dB | first block PSNR | drift | ratio (tiny) | ratio 1.3B | '
           'denoise mem 1.3B x BF16 | context mem 1.3B x BF16 | denoise x BF16 | context x BF16 |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  ref = raw.get('plan_bf16')
  for label, r in raw['rows'].items():
    fi, pl, tm = r.get('fidelity', {}), r.get('plan', {}), r.get('time', {})
    cells = [f'{fi["psnr"]:.2f}' if fi else '', f'{fi["psnr_first_block"]:.2f}' if fi else '',
             f'{fi["drift"]:.2f}' if fi else '', f'{fi["ratio"]:.2f}' if fi else '',
             f'{pl["ratio"]:.2f}' if pl else '',
             f'{pl["denoise_step"] / ref["denoise_step"]:.2f}' if pl and ref else '',
             f'{pl["context_pass"] / ref["context_pass"]:.2f}' if pl and ref else '',
             f'{tm["denoise_ratio"]:.2f}' if tm else '', f'{tm["context_ratio"]:.2f}' if tm else '']
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  if raw.get('rope'):
    r = raw['rope']
    lines += [f'\nKey reconstruction (rel. L2) on `{r["config"]}`, INT{r["bits"]}, {r["centroids"]} '
              f'centroids: pre-RoPE {r["pre"]:.4f}, post-RoPE {r["post"]:.4f} '
              f'(post / pre = {r["post_over_pre"]:.2f})']
  return '\n'.join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--fidelity_config', default='tiny_long')
  ap.add_argument('--time_config', default='mid')
  ap.add_argument('--plan_config', default='wan2.1_t2v_1.3b')
  ap.add_argument('--rows', default='all', help='comma list of row labels, or all')
  ap.add_argument('--rope_config', default='mid')
  ap.add_argument('--rope_centroids', type=int, default=256)
  ap.add_argument('--no_rope', action='store_true')
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--no_time', action='store_true')
  ap.add_argument('--no_plan', action='store_true')
  ap.add_argument('--out', default=None)
  ap.add_argument('--json', default=None)
  args = ap.parse_args(argv)
  rows = ROWS if args.rows == 'all' else [r for r in ROWS if r[0] in args.rows.split(',')]
  raw = dict(fidelity_config=args.fidelity_config, time_config=args.time_config, rows={})
  if not args.no_plan:
    raw['plan_bf16'] = bench_methods.plan_method('BF16', args.plan_config)
  if not args.no_rope:
    raw['rope'] = rope_reconstruction(args.rope_config, args.rope_centroids)
    print(f'rope: {raw["rope"]}', file=sys.stderr, flush=True)
  params_cache: dict = {}
  ref = None
  if not args.no_time:
    ref = bench_methods.prepare(args.time_config, 'BF16', params_cache)
  for label, method, margs in rows:
    r = raw['rows'][label] = {}
    r['fidelity'] = fidelity(args.fidelity_config, method, margs)
    if not args.no_plan:
      r['plan'] = bench_methods.plan_method(method, args.plan_config, margs)
    if ref is not None:
      run_ = bench_methods.prepare(args.time_config, method, params_cache, method_args=margs)
      r['time'] = bench_methods.time_against(ref, run_, args.repeats)
    print(f'{label}: {json.dumps(r, default=str)}', file=sys.stderr, flush=True)
  bench_methods.write_outputs(markdown(raw), raw, args.out, args.json)
  return raw


if __name__ == '__main__':
  main()
