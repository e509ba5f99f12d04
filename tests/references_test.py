"""Stored BF16 references (kvjax.references): computed once per set of inputs, reused by every
method, recomputed when broken, never mixed up between inputs."""

import os

import numpy as np
import pytest

from configs.self_forcing import get_config
from kvjax import references, run, runconfig

PROMPT = 'a big blue circle bouncing on a yellow background'


def _run(tmp_path, name, refs, method='rtn_int4', **kw):
  s = run.resolve(runconfig.override(get_config('world'), method=method, prompt=PROMPT,
                                     reference_dir=refs, **kw), outdir=str(tmp_path / name))
  return run.generate(s, progress=False)


def _entries(refs):
  return sorted(e for e in os.listdir(refs) if not e.startswith('.'))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('refs')
  refs = str(tmp / 'store')
  first = _run(tmp, 'a', refs)                                 # rolls out and stores
  second = _run(tmp, 'b', refs, method='kivi_int4')            # another method: reuses
  fresh = _run(tmp, 'c', '', method='kivi_int4')               # control: no store at all
  return tmp, refs, first, second, fresh


def test_second_method_reuses_the_stored_reference(runs):
  _, refs, first, second, fresh = runs
  assert first['reference']['stored'] is False and second['reference']['stored'] is True
  assert first['reference']['key'] == second['reference']['key']
  assert _entries(refs) == [first['reference']['key']]
  assert second['reference']['runtime_s'] == first['reference']['runtime_s']
  # The metrics against the stored reference are exactly those against a fresh rollout.
  for k in ('latent_psnr', 'latent_rel_l2', 'video_psnr', 'video_ssim', 'video_lpips'):
    assert second[k] == fresh[k], k
  assert 'stored' not in fresh['reference']
  stored = references.load(refs, first['reference']['key'], (1, 9, 12, 8, 8))
  assert stored is not None and stored.info['frames'] == 9 and stored.info['batch'] == 1


def test_other_inputs_get_their_own_entry(runs):
  tmp, refs, first, _, _ = runs
  other = _run(tmp, 'd', refs, seed=5)
  assert other['reference']['stored'] is False and other['reference']['key'] != first['reference']['key']
  assert len(_entries(refs)) == 2
  # The key covers the geometry and every input array, not only the names.
  fields = dict(frames=9, window_frames=-1)
  p, n, t = [np.zeros(3)], (np.zeros(2), np.zeros(1)), np.zeros((1, 2))
  base = references.key_of(fields, p, n, t)
  assert references.key_of(dict(fields, window_frames=6), p, n, t) != base
  assert references.key_of(fields, [np.ones(3)], n, t) != base
  assert references.key_of(fields, p, n, np.zeros((2, 1))) != base          # shape, same bytes
  assert references.key_of(dict(fields), [np.zeros(3)], n, t) == base


def test_a_broken_entry_is_recomputed_never_used(runs):
  tmp, refs, first, _, _ = runs
  key = first['reference']['key']
  lat = os.path.join(refs, key, 'latents.npy')
  data = bytearray(open(lat, 'rb').read())
  data[-5] ^= 0x40                                               # one flipped bit in the data
  open(lat, 'wb').write(bytes(data))
  assert references.load(refs, key, (1, 9, 12, 8, 8)) is None
  again = _run(tmp, 'e', refs)
  assert again['reference']['stored'] is False and again['latent_psnr'] == first['latent_psnr']
  assert references.load(refs, key, (1, 9, 12, 8, 8)) is not None   # replaced by an intact one
  os.remove(os.path.join(refs, key, 'info.json'))
  assert references.load(refs, key, (1, 9, 12, 8, 8)) is None
  assert references.load(refs, 'no-such-key', (1, 9, 12, 8, 8)) is None


def test_unusable_store_is_an_error_before_any_work(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(PermissionError, match='cannot store references'):
    run.resolve(runconfig.override(get_config('world'), method='rtn_int4',
                                   reference_dir=str(blocker / 'refs')),
                outdir=str(tmp_path / 'never'))
  assert not (tmp_path / 'never').exists()
  # A usable store that does not exist yet is checked, not created (a --dry_run leaves nothing).
  references.check_dir(str(tmp_path / 'new' / 'refs'))
  assert not (tmp_path / 'new').exists()


def test_bf16_run_stores_itself_as_the_reference(tmp_path):
  """A BF16 run with a store writes its own rollout as the entry the other methods then read
  (no second BF16 rollout), and the metrics against it equal those against a fresh rollout."""
  refs = str(tmp_path / 'store')
  bf16 = _run(tmp_path, 'bf16', refs, method='bf16')
  assert bf16['reference'] is None and _entries(refs) == [bf16['stored_reference']]
  other = _run(tmp_path, 'q', refs, method='rtn_int2')
  assert other['reference']['stored'] is True
  assert other['reference']['key'] == bf16['stored_reference']
  assert other['reference']['runtime_s'] == bf16['runtime_s']
  fresh = _run(tmp_path, 'f', '', method='rtn_int2')
  assert other['latent_psnr'] == fresh['latent_psnr'] < float('inf')
  lat = np.load(tmp_path / 'bf16' / 'latents.npy')
  np.testing.assert_array_equal(lat, references.load(refs, bf16['stored_reference'],
                                                     lat.shape).latents)
  # A BF16 run with other parameters is not the reference: it stores nothing.
  _run(tmp_path, 'twice', str(tmp_path / 'store2'), method='bf16',
       method_args='requantize=every_call')
  assert not os.path.exists(tmp_path / 'store2') or _entries(str(tmp_path / 'store2')) == []
