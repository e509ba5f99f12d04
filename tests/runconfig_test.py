"""One config per run: the size table, the launcher's flags as overrides of config fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from configs import self_forcing
from configs.self_forcing import get_config
from kvjax import cli, launch, run, runconfig
from kvjax.model import WanConfig, sizes
from ports import dit as dit_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ('world', 'world_long', 'tiny', 'tiny_long', 'mid', 'wan2.1_t2v_1.3b',
            'wan2.1_t2v_1.3b_long')


def test_one_size_table():
  """WanConfig's defaults, every config variant and the port's known sizes read sizes.SIZES."""
  default = WanConfig()
  assert {k: getattr(default, k) for k in sizes.SIZES[sizes.DEFAULT]} == sizes.SIZES[sizes.DEFAULT]
  for v in VARIANTS:
    model = get_config(v).model
    assert {k: model[k] for k in sizes.SIZES[v.removesuffix('_long')]} == sizes.SIZES[
        v.removesuffix('_long')]
  assert set(dit_port.KNOWN_SIZES) == {sizes.SIZES[k]['dim'] for k in sizes.RELEASED}
  for key, name in sizes.RELEASED.items():
    known = dit_port.KNOWN_SIZES[sizes.SIZES[key]['dim']]
    assert known['name'] == name and known['num_layers'] == sizes.SIZES[key]['num_layers']
  assert dit_port.SUPPORTED_DIM == 1536
  with pytest.raises(ValueError, match='unknown model size'):
    sizes.get('huge')


@pytest.mark.parametrize('variant', VARIANTS)
def test_every_flag_is_a_field_of_every_config(variant):
  c = get_config(variant)
  for name, field in runconfig.FLAG_FIELDS.items():
    node = c
    for part in field.path.split('.'):
      node = node[part]
  assert all(f in c for f in run.RUN_FIELDS)


def test_override():
  c = get_config('tiny')
  o = runconfig.override(c, method='kivi_int2', seed=4, num_latent_frames=12, window_frames=6,
                         compute_dtype='float32', impl=None)
  assert (o.method, o.seed, o.video.num_latent_frames, o.cache.window_frames,
          o.model.compute_dtype, o.impl) == ('kivi_int2', 4, 12, 6, 'float32', 'auto')
  assert (c.method, c.seed, c.video.num_latent_frames) == ('bf16', 0, 9)   # a copy
  assert runconfig.override(c, noise_file='n.npz').video.num_latent_frames == -1
  assert runconfig.override(c, noise_file='n.npz',
                            num_latent_frames=9).video.num_latent_frames == 9
  with pytest.raises(ValueError, match="unknown run field"):
    runconfig.override(c, methd='x')
  with pytest.raises(ValueError, match='config.seed'):
    runconfig.override(c, seed='four')
  with pytest.raises(ValueError, match='needs a noise file'):
    run.resolve(runconfig.override(c, num_latent_frames=-1))
  bare = get_config('tiny')
  del bare['method']
  with pytest.raises(ValueError, match=r"lacks the run field\(s\) \['method'\]"):
    run.resolve(bare)


_RESOLVED = (
    'import json, sys\n'
    'from kvjax import launch, run, runconfig\n'
    'launch.parse_flags(sys.argv)\n'
    'c = runconfig.override(launch.FLAGS.config,\n'
    '                       **{k: launch.FLAGS[k].value for k in runconfig.FLAG_FIELDS})\n'
    'print(json.dumps(run.resolve(c).config, sort_keys=True))\n')


def _resolved(argv) -> dict:
  """The resolved config of the launcher's command line ``argv`` (a subprocess: ml_collections
  defines the --config.* flags from sys.argv when the launcher is imported)."""
  p = subprocess.run([sys.executable, '-c', _RESOLVED, *argv], cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  return json.loads(p.stdout)


def test_a_flag_and_its_config_field_are_the_same_run():
  tiny = '--config=configs/self_forcing.py:tiny'
  plain = _resolved([tiny])
  want = json.loads(json.dumps(run.resolve(get_config('tiny')).config))
  for d in (plain, want):            # the tests' reference store is a session folder (conftest)
    d.pop('reference_dir')
  assert plain == want               # the flags default to "not given"
  flags = ['--method=kivi_int2', '--num_latent_frames=12', '--window_frames=6',
           '--sink_frames=1', '--seed=3', '--compute_dtype=float32']
  fields = ['--config.method=kivi_int2', '--config.video.num_latent_frames=12',
            '--config.cache.window_frames=6', '--config.cache.sink_frames=1', '--config.seed=3',
            '--config.model.compute_dtype=float32']
  a, b = _resolved([tiny, *flags]), _resolved([tiny, *fields])
  assert a == b != plain
  assert (a['method'], a['video']['num_latent_frames'], a['cache']['window_frames'],
          a['seed'], a['model']['compute_dtype']) == ('kivi_int2', 12, 6, 3, 'float32')
  assert self_forcing.get_config().name == self_forcing.DEFAULT_VARIANT
  assert cli.INPUT_ERRORS == launch.INPUT_ERRORS
