"""impl='pallas' through the model: the whole step lowers to Triton for CUDA, and the launcher's
rollout equals impl='xla'.

(a) CUDA cross-lowering of the tiny model's denoising step and context pass with the native
kernels (``kernels.lowering_for_gpu``): one Triton custom call per kernel-read source in every
layer body, none with impl='xla' (control). (b) ``run.generate`` with impl='pallas' (interpret
mode on CPU) gives the latents of impl='xla' for one method of each storage format the kernel
reads at the tiny model's head_dim (32: INT2 channel slices are narrower than a Triton dot and
fall back; the method-level test in tests/cache/methods_test.py covers every method at 64):
in float32 to 1e-4 (measured ~2e-7), and in bfloat16 to 1e-2. In bfloat16 the kernel and the
walk round a few probabilities differently (different summation order of the channel slices,
probabilities rounded per key tile) and a random-weight rollout amplifies one such flip: KIVI_INT4
gave bitwise-equal latents for blocks 0 and 1 and 3.6e-3 in block 2.
"""

import jax
import numpy as np
import pytest

from configs.self_forcing import get_config
from kvjax import checkpoint as ckpt
from kvjax import kernels, run, runconfig
from kvjax.sampler import SelfForcing
from launch import bench_attention

TRITON = '__gpu$xla.gpu.triton'


def _settings(method, impl, outdir=None, compute_dtype=None):
  return run.resolve(runconfig.override(get_config('tiny'), method=method, impl=impl,
                                        reference='none', num_latent_frames=9, window_frames=9,
                                        compute_dtype=compute_dtype), outdir=outdir)


def _lowered_steps(method, impl):
  s = _settings(method, impl)
  cfg = s.model_cfg
  sf = SelfForcing(cfg, s.sampler_cfg, s.method, s.spec, latent_hw=(s.height, s.width), impl=impl,
                   graphdef=ckpt.graphdef(cfg))
  params = jax.eval_shape(lambda: ckpt.init_params(cfg, 0))
  a = sf.abstract_args(params, cfg.text_len, cfg.text_dim)
  with kernels.lowering_for_gpu():
    den = jax.jit(sf.denoise_fn).trace(a['params'], a['x'], a['scalar'], a['cross'], a['cache'],
                                       a['start']).lower(lowering_platforms=('cuda',))
    ctx = jax.jit(sf.context_fn).trace(a['params'], a['x'], a['cross'], a['cache'],
                                       a['start']).lower(lowering_platforms=('cuda',))
  n_sources = 1 + len(s.method.sources(s.method.init(s.spec), 0))    # own K/V + the cache's
  return den.as_text(), ctx.as_text(), n_sources


@pytest.mark.parametrize('method', ['BF16', 'KIVI_INT4', 'FLOWCACHE_SOFT_PRUNE_INT4'])
def test_model_steps_lower_to_triton_for_cuda(method):
  den, ctx, n_sources = _lowered_steps(method, 'pallas')
  # One kernel call per source (the block's own K/V and each cache source): none falls back.
  assert den.count(TRITON) == n_sources and ctx.count(TRITON) == n_sources
  den_x, _, _ = _lowered_steps(method, 'xla')
  assert TRITON not in den_x                                     # control: the XLA walk


def _latents_rel(method, dtype, tmp_path):
  lat = {}
  for impl in ('xla', 'pallas'):
    out = tmp_path / impl
    run.generate(_settings(method, impl, str(out), dtype), progress=False)
    lat[impl] = np.load(out / 'latents.npy').astype(np.float64)
  return np.linalg.norm(lat['pallas'] - lat['xla']) / np.linalg.norm(lat['xla'])


@pytest.mark.parametrize('method', ['BF16', 'QUAROT_KV_INT4', 'PRQ_INT4',
                                    'SPATIAL_MIXED_FG_KIVI_INT4_BG_KIVI_INT2',
                                    'FLOWCACHE_SOFT_PRUNE_INT4'])
def test_launcher_pallas_equals_xla_float32(method, tmp_path):
  assert _latents_rel(method, 'float32', tmp_path) <= 1e-4


@pytest.mark.parametrize('method', ['KIVI_INT4'])
def test_launcher_pallas_close_to_xla_bfloat16(method, tmp_path):
  assert _latents_rel(method, 'bfloat16', tmp_path) <= 1e-2


def test_bench_attention_runs_on_cpu(tmp_path):
  """The GPU benchmark script's CPU mode (it must not rot): every requested format has a row timed
  by the kernel (head_dim 64 there, so INT2 too); the e2e table has the requested methods."""
  out = tmp_path / 'attn.md'
  raw = bench_attention.main(['--small', '--methods=bf16', '--formats=int4,kivi_int2,prq_int4',
                              '--repeats=1', f'--out={out}'])
  rows = raw['kernels']['rows']
  assert set(rows) == {'bf16 dot_product_attention', 'int4', 'kivi_int2', 'prq_int4'}
  assert all(r['ms'] > 0 for r in rows.values())      # head_dim 64: every format is timed
  assert set(raw['e2e']) == {'BF16'} and raw['e2e']['BF16']['denoise_ms'] > 0
  assert '| kivi_int2 |' in out.read_text()
