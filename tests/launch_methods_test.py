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
from kvjax import run, sampler
from kvjax.metrics import full_extent_float_arrays


def _settings(name, outdir):
  cfg = get_config('tiny')
  cfg.video.latent_width = 10
  return run.resolve(cfg, method=name, num_latent_frames=12, window_frames=10, sink_frames=1,
                     outdir=str(outdir))


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
