r"""kvjax's BF16 rollout against the PyTorch KV-cache reference on the same machine: time, fidelity.

  python -m launch.compare_torch                                    # tiny, bfloat16, 3 repeats
  python -m launch.compare_torch --config=mid --frames=9 --repeats=2
  python -m launch.compare_torch --config=tiny_long --dtype=float32  # exactness: ~1e-5 max abs
  python -m launch.compare_torch --config=mid --window=9 --sink=3 --json=/tmp/mid.json

What runs. The model of ``configs/self_forcing.py:<--config>`` with random weights (seed
``--seed``; timing and implementation fidelity do not need trained ones) in ``--dtype`` compute
(parameters in the config's ``param_dtype``), one batch of one video, noise from ``--seed``
(``kvjax.sampler.make_noise``) and random text states. Two rollouts of the same inputs:

  kvjax  ``SelfForcing`` with the BF16 cache method (``--impl``); its ``RolloutStats.runtime_s``
         (compile excluded).
  torch  ``kvjax.reference_torch_cache.cached_rollout``: diffusers' ``WanTransformer3DModel``
         (``build_diffusers(dtype=...)``) driven block by block with a per-layer KV cache;
         its ``runtime_s`` (model building excluded).

Each runs once to warm up (kvjax compiles then; torch initialises its kernels), then
``--repeats`` timed times; the table gives the median and the minimum. Fidelity is
``metrics.latent_fidelity`` of kvjax's latents against torch's (latent PSNR over the torch
latents' range, relative L2, max abs error). Both use the machine's CPU threads (XLA's own pool;
torch's ``--torch_threads``, 0 = its default): on a shared machine, run nothing beside it.

Where torch spends extra work: diffusers recomputes the text embedding and the cross-attention
K/V at every DiT call and computes the head on the context pass; kvjax computes the cross K/V
once a prompt and skips the head on the context pass.
"""

from __future__ import annotations

import json
import statistics
import sys

from absl import app, flags, logging

flags.DEFINE_string('config', 'tiny', 'Variant of configs/self_forcing.py (tiny, mid, world, ...).')
flags.DEFINE_integer('frames', 0, 'Latent frames (0: the config\'s; a multiple of the block).')
flags.DEFINE_integer('window', None, 'Frames visible to a block, its own included (-1: all; '
                     'default: the config\'s).')
flags.DEFINE_integer('sink', None, 'Sink frames (default: the config\'s).')
flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Compute dtype of both.')
flags.DEFINE_integer('repeats', 3, 'Timed rollouts of each, after one warm-up rollout.')
flags.DEFINE_integer('seed', 0, 'Weights, noise and text seed.')
flags.DEFINE_string('impl', 'auto', 'kvjax attention implementation (auto, xla, pallas).')
flags.DEFINE_integer('torch_threads', 0, 'torch intra-op threads (0: torch\'s default).')
flags.DEFINE_string('json', None, 'Also write the numbers here as JSON.')
FLAGS = flags.FLAGS

# Heavy imports after the flags: --help answers at once.
import numpy as np  # noqa: E402
import torch  # noqa: E402

from configs.self_forcing import get_config  # noqa: E402
from kvjax import cache as kvcache  # noqa: E402
from kvjax import checkpoint as ckpt  # noqa: E402
from kvjax import metrics  # noqa: E402
from kvjax import reference_torch as rt  # noqa: E402
from kvjax import reference_torch_cache as rtc  # noqa: E402
from kvjax.model import WanConfig  # noqa: E402
from kvjax.sampler import SamplerConfig, SelfForcing, make_noise  # noqa: E402


def setup(variant: str, frames: int, window: int | None, sink: int | None, dtype: str):
  """(model config, sampler config, CacheSpec, (height, width)) of the comparison."""
  c = get_config(variant)
  model_cfg = WanConfig.from_dict(c.model).replace(compute_dtype=dtype)
  sampler_cfg = SamplerConfig.from_dict(c.sampler)
  frames = frames or int(c.video.num_latent_frames)
  window = int(c.cache.window_frames) if window is None else window
  sink = int(c.cache.sink_frames) if sink is None else sink
  window = frames if window == -1 else min(window, frames)
  hh, ww = int(c.video.latent_height), int(c.video.latent_width)
  _, ph, pw = model_cfg.patch_size
  spec = kvcache.CacheSpec(batch=1, num_layers=model_cfg.num_layers,
                           num_heads=model_cfg.num_heads, head_dim=model_cfg.head_dim,
                           frame_tokens=(hh // ph) * (ww // pw),
                           block_frames=sampler_cfg.block_frames, window_frames=window,
                           sink_frames=sink, dtype=model_cfg.cdtype, total_frames=frames)
  if frames % sampler_cfg.block_frames:
    raise ValueError(f'{frames} frames is not a multiple of the block '
                     f'({sampler_cfg.block_frames} frames)')
  return model_cfg, sampler_cfg, spec, (hh, ww)


def compare(variant: str = 'tiny', frames: int = 0, window: int | None = None,
            sink: int | None = None, dtype: str = 'bfloat16', repeats: int = 3, seed: int = 0,
            impl: str = 'auto') -> dict:
  """Times both rollouts (median of ``repeats`` after a warm-up) and scores kvjax against torch.

  Returns:
    dict with the geometry, ``kvjax`` / ``torch`` (runtime_s median, min, all, warm-up s) and
    ``fidelity`` (latent_psnr, latent_rel_l2, latent_max_abs_err of kvjax against torch).
  """
  model_cfg, sampler_cfg, spec, (hh, ww) = setup(variant, frames, window, sink, dtype)
  nf = spec.total_frames
  params = ckpt.init_params(model_cfg, seed)
  noise = make_noise(seed, 1, nf, model_cfg.in_dim, hh, ww, sampler_cfg)
  text = np.random.default_rng(seed).standard_normal(
      (1, model_cfg.text_len, model_cfg.text_dim)).astype(np.float32)

  sf = SelfForcing(model_cfg, sampler_cfg, kvcache.BF16(), spec, latent_hw=(hh, ww), impl=impl,
                   graphdef=ckpt.graphdef(model_cfg))
  lat_k, _, st = sf.rollout(params, noise, text)
  warm_k = st.compile_s + st.runtime_s
  times_k = [sf.rollout(params, noise, text)[2].runtime_s for _ in range(repeats)]

  tm = rt.build_diffusers(model_cfg, ckpt.to_nested(params), dtype=dtype)
  lat_t, info = rtc.cached_rollout(tm, noise, text, sampler_cfg, spec.window_frames,
                                   spec.sink_frames)
  warm_t = info['runtime_s']
  times_t = [rtc.cached_rollout(tm, noise, text, sampler_cfg, spec.window_frames,
                                spec.sink_frames)[1]['runtime_s'] for _ in range(repeats)]

  fid = metrics.latent_fidelity(lat_k, lat_t)

  def timing(times, warm):
    return dict(runtime_s=statistics.median(times), min_s=min(times), all_s=times,
                warmup_s=warm)

  return dict(config=variant, dtype=dtype, layers=model_cfg.num_layers, dim=model_cfg.dim,
              latent_hw=[hh, ww], frame_tokens=spec.frame_tokens, frames=nf,
              window_frames=spec.window_frames, sink_frames=spec.sink_frames, repeats=repeats,
              impl=impl, torch_threads=torch.get_num_threads(), kvjax=timing(times_k, warm_k),
              torch=timing(times_t, warm_t),
              fidelity={k: fid[k] for k in ('latent_psnr', 'latent_rel_l2',
                                            'latent_max_abs_err')})


def table(r: dict) -> str:
  h, w = r['latent_hw']
  head = (f'{r["config"]}: {r["layers"]} layers dim {r["dim"]}, {h}x{w} latents '
          f'({r["frame_tokens"]} tokens a frame), {r["frames"]} frames, '
          f'window {r["window_frames"]}, sink {r["sink_frames"]}, {r["dtype"]}; median of '
          f'{r["repeats"]} after a warm-up; torch threads {r["torch_threads"]}')
  rows = ['| pipeline | runtime_s (median) | min_s | warm-up s | x kvjax |',
          '|---|---|---|---|---|']
  base = r['kvjax']['runtime_s']
  for name, key in (('kvjax BF16 (SelfForcing)', 'kvjax'), ('torch cached (diffusers)', 'torch')):
    t = r[key]
    rows.append(f'| {name} | {t["runtime_s"]:.3f} | {t["min_s"]:.3f} | {t["warmup_s"]:.2f} | '
                f'{t["runtime_s"] / base:.2f} |')
  f = r['fidelity']
  fid = (f'kvjax vs torch: latent PSNR {f["latent_psnr"]:.2f} dB, rel L2 '
         f'{f["latent_rel_l2"]:.2e}, max abs {f["latent_max_abs_err"]:.2e}')
  return '\n'.join([head, *rows, fid])


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    return 2
  logging.set_verbosity(logging.WARNING)
  if FLAGS.repeats < 1:
    print('error: --repeats must be >= 1', file=sys.stderr)
    return 2
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  try:
    r = compare(FLAGS.config, FLAGS.frames, FLAGS.window, FLAGS.sink, FLAGS.dtype,
                FLAGS.repeats, FLAGS.seed, FLAGS.impl)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(table(r))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(r, f, indent=2)
  return 0


if __name__ == '__main__':
  app.run(main)
