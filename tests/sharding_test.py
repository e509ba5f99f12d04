"""A batch split across devices (kvjax.sampler.sharding) equals the batch on one device.

Runs in a subprocess with 4 host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4:
the device count is fixed when the backend starts). float32 compute: the sharded rollout differs
from the single-device one only by the order of float32 sums (~1e-6 measured; bfloat16 rounding
would amplify that to ~0.02, which says nothing). Negative control: the same rollout with the
batch's text states rotated by one video differs by O(1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r'''
import json, tempfile
import jax, numpy as np
from configs.self_forcing import get_config
from kvjax import checkpoint as ckpt, run, runconfig
from kvjax.sampler import SelfForcing, make_noise, sharding
c = get_config('tiny')
c.video.batch_size = 4
c.model.compute_dtype = 'float32'
out = dict(devices=len(jax.local_devices()))
for m in ('bf16', 'KIVI_INT2', 'FLOWCACHE_NATIVE'):      # FLOWCACHE_NATIVE: the step-reuse path
  s = run.resolve(runconfig.override(c, method=m, reference='none'))
  params = ckpt.init_params(s.model_cfg, 0)
  noise = make_noise(0, 4, s.frames, s.model_cfg.in_dim, s.height, s.width, s.sampler_cfg)
  texts = np.asarray(jax.random.normal(jax.random.key(1), (4, s.model_cfg.text_len,
                                                          s.model_cfg.text_dim)))
  res = {}
  for name, mesh, t in (('one', None, texts), ('split', sharding.batch_mesh(4), texts),
                        ('rotated', sharding.batch_mesh(4), np.roll(texts, 1, axis=0))):
    sf = SelfForcing(s.model_cfg, s.sampler_cfg, s.method, s.spec,
                     latent_hw=(s.height, s.width), mesh=mesh)
    lat, cache, _ = sf.rollout(params, noise, t)
    res[name] = lat
    if name == 'split':
      rows = [(l.shape, [x.data.shape for x in l.addressable_shards])
              for l in jax.tree.leaves(cache)]
      out[m + '_split_leaves'] = sum(len({sh for sh in shards}) == 1 and shards[0] != shape
                                     for shape, shards in rows)
      out[m + '_leaves'] = len(rows)
      out[m + '_shard_rows'] = sorted({sh[ax] for shape, shards in rows for sh in shards
                                       for ax in range(len(shape)) if sh[ax] != shape[ax]})
  out[m + '_split_err'] = float(np.abs(res['split'] - res['one']).max())
  out[m + '_rotated_err'] = float(np.abs(res['rotated'] - res['one']).max())
# The launcher's path: a batch of 4 runs split, method and reference alike.
r = run.generate(run.resolve(runconfig.override(c, method='rtn_int4', reference_dir=''),
                             outdir=tempfile.mkdtemp() + '/run'), progress=False)
out.update(generate_devices=r['devices'], generate_psnr=r['latent_psnr'])
print(json.dumps(out))
'''


def test_sharded_batch_equals_unsharded():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  p = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out['devices'] == 4
  for m in ('bf16', 'KIVI_INT2', 'FLOWCACHE_NATIVE'):
    assert out[m + '_split_err'] < 1e-5, (m, out)
    assert out[m + '_rotated_err'] > 0.1, (m, out)
    # Every cache array but the step counter is split: each device holds 1 of the 4 videos.
    assert out[m + '_split_leaves'] == out[m + '_leaves'] - 1 and out[m + '_shard_rows'] == [1]
  assert out['generate_devices'] == 4 and 20 < out['generate_psnr'] < float('inf')
