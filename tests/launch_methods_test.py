"""Every paper method through the launcher on the default tiny model, with eviction and a sink.

Geometry: 8 x 10 latents (20 tokens a frame), 12 frames (4 blocks), window 10 (7 history slots),
1 sink frame. Checks result.json's realized compression and fidelity fields, and audits the
method's compiled denoising step and context pass (bf16) for float copies of whole stores.
"""

import json

import jax
import numpy as np
import pytest

from configs.self_forcing import get_config
from kvjax import cache as kvcache
from kvjax import run, runconfig, sampler
from kvjax.metrics import full_extent_float_arrays


def _settings(name, outdir):
  cfg = get_config('tiny')
  cfg.video.latent_width = 10
  return run.resolve(runconfig.override(cfg, method=name, num_latent_frames=12, window_frames=10,
                                        sink_frames=1), outdir=str(outdir))


@pytest.mark.parametrize('name', kvcache.PAPER_NAMES)
def test_method_runs_and_reports_realized_compression(name, tmp_path):
  s = _settings(name, tmp_path / 'run')
  res = run.generate(s, progress=False)
  on_disk = json.loads((tmp_path / 'run' / 'result.json').read_text())
  assert on_disk['method'] == name
  abstract = jax.eval_shape(lambda: s.method.init(s.spec))
  assert on_disk['kv_cache_bytes'] == s.method.nbytes(abstract)
  assert on_disk['compression_ratio'] == pytest.approx(s.spec.bf16_bytes() / on_disk['kv_cache_bytes'])
  lat = np.load(tmp_path / 'run' / 'latents.npy')
  assert lat.shape == (1, 12, 16, 8, 10) and np.all(np.isfinite(lat))
  if name != 'BF16':
    assert on_disk['reference']['kind'] == 'bf16'
    assert np.isfinite(on_disk['latent_rel_l2']) and on_disk['latent_rel_l2'] >= 0
    if name == 'FLOWCACHE_NATIVE':
      assert on_disk['reused_steps'] == 4 and on_disk['latent_rel_l2'] > 0   # one step a block
    elif name not in ('FLOWCACHE_NATIVE',):
      assert on_disk['latent_rel_l2'] > 0 and on_disk['reused_steps'] == (4 if 'NATIVE' in name else 0)
  # No float copy of a whole store in the compiled steps of this method.
  compiled = [v for k, v in sampler._COMPILED.items()
              if k[0] in ('denoise', 'context') and len(k) > 2 and k[2] == s.method and k[3] == s.spec]
  assert len(compiled) == 2
  for c in compiled:
    bad = full_extent_float_arrays(c.as_text(), s.spec.frame_tokens, s.method.slot_counts(s.spec),
                                   s.spec.block_frames, s.spec.num_heads)
    assert bad == [], bad
  del res


@pytest.mark.parametrize('name,args,frames,window,sink,heads', [
    ('QVG_INT2', 'span_frames=1,centroids=8', 12, 10, 1, 2),        # a span a frame, eviction, sink
    ('QVG_INT4', 'span_frames=6,centroids=8,rope=post', 15, 15, 0, 1),  # 2 spans + BF16 tail, post-RoPE
])
def test_qvg_runs_on_packed_storage(name, args, frames, window, sink, heads, tmp_path):
  """QVG (beyond the study) through the launcher: realized bytes, fidelity, and the compiled
  steps' audit (no float copy of the frame store). The audit needs two span slots or more (one
  span being encoded is a float array of a span) and, with 6-frame spans, one head (else the
  k-means input, heads x span tokens, has the extent of the 12-frame store by chance)."""
  cfg = get_config('tiny')
  cfg.video.latent_width = 10
  cfg.model.num_heads = heads
  s = run.resolve(runconfig.override(cfg, method=name, method_args=args, num_latent_frames=frames,
                                     window_frames=window,
                                     sink_frames=sink), outdir=str(tmp_path / 'run'))
  run.generate(s, progress=False)
  res = json.loads((tmp_path / 'run' / 'result.json').read_text())
  abstract = jax.eval_shape(lambda: s.method.init(s.spec))
  assert res['method'] == name and res['kv_cache_bytes'] == s.method.nbytes(abstract)
  assert res['method_params']['rope'] == ('post' if 'post' in args else 'pre')
  assert 0 < res['latent_rel_l2'] < 0.5
  compiled = [v for k, v in sampler._COMPILED.items()
              if k[0] in ('denoise', 'context') and len(k) > 2 and k[2] == s.method and k[3] == s.spec]
  assert len(compiled) == 2
  for c in compiled:
    assert full_extent_float_arrays(c.as_text(), s.spec.frame_tokens, s.method.slot_counts(s.spec),
                                    s.spec.block_frames, s.spec.num_heads) == []


@pytest.mark.parametrize('args,frames,sink,phrase', [
    ('span_frames=24', None, None, 'does not fit'),           # the official span on tiny
    ('span_frames=2', None, None, 'multiple of the block'),
    (None, 12, 1, 'whole spans'),                             # a sink frame inside a span
])
def test_qvg_geometry_errors_before_any_work(args, frames, sink, phrase, tmp_path):
  with pytest.raises(ValueError, match=phrase):
    run.resolve(runconfig.override(get_config('tiny'), method='QVG_INT2', method_args=args,
                                   num_latent_frames=frames, window_frames=9 if sink else None,
                                   sink_frames=sink), outdir=str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
