"""--wan_dir: the three layouts (original Wan2.1, diffusers, converted) load the same text encoder,
tokenizer and VAE; a folder missing parts fails naming them."""

import json
import os
import shutil

import numpy as np
import pytest

from kvjax import wan_dir
from ports import convert
from tests.conftest import requires_torch

pytestmark = requires_torch


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  from tests import wan_fixtures as wf
  root = tmp_path_factory.mktemp('wan_dirs')
  models = wf.make_wan_folder(str(root / 'Wan2.1-T2V-1.3B'))
  wf.make_diffusers_folder(str(root / 'diffusers'), models)
  (root / 'diffusers' / 'model_index.json').write_text(json.dumps({'_class_name': 'WanPipeline'}))
  assert convert.main([f'--src={root / "Wan2.1-T2V-1.3B"}', f'--dst={root / "converted"}',
                       '--model=wan_dir', '--dtype=float32']) == 0
  return root


def test_layouts_load_the_same_models(folders):
  prompts = ['a cat runs on the beach', 'the sea at night']
  states, videos = {}, {}
  z = np.random.default_rng(0).standard_normal((1, 4, 16, 4, 4)).astype(np.float32)
  for name, layout in (('Wan2.1-T2V-1.3B', 'wan'), ('diffusers', 'diffusers'), ('converted', 'kvjax')):
    wd = wan_dir.inspect(str(folders / name))
    assert wd.layout == layout
    assert wan_dir.text_dim(wd) == 32 and wan_dir.vae_z_dim(wd) == 16
    enc = wan_dir.load_text_encoder(wd, text_len=12, dtype='float32')
    states[name] = enc.encode(prompts)
    videos[name] = wan_dir.load_vae(wd).decode(z)
  for name in ('diffusers', 'converted'):
    np.testing.assert_array_equal(states[name], states['Wan2.1-T2V-1.3B'])
    np.testing.assert_array_equal(videos[name], videos['Wan2.1-T2V-1.3B'])
  assert states['converted'].shape == (2, 12, 32)
  meta = json.loads((folders / 'converted' / wan_dir.MARKER).read_text())
  assert meta['format'] == wan_dir.MARKER_FORMAT and meta['layout'] == 'wan'


def test_missing_parts_are_named(folders, tmp_path):
  broken = tmp_path / 'wan'
  shutil.copytree(folders / 'Wan2.1-T2V-1.3B', broken)
  os.remove(broken / 'Wan2.1_VAE.pth')
  with pytest.raises(FileNotFoundError, match=r'\(wan layout\) is missing: Wan2.1_VAE.pth \(Wan VAE\)'):
    wan_dir.inspect(str(broken))
  shutil.rmtree(broken / 'google')
  with pytest.raises(FileNotFoundError, match=r'google/umt5-xxl \(umT5 tokenizer\); Wan2.1_VAE.pth'):
    wan_dir.inspect(str(broken))
  assert wan_dir.inspect(str(broken), need=('text_encoder',)).layout == 'wan'
  conv = tmp_path / 'conv'
  shutil.copytree(folders / 'converted', conv)
  os.remove(conv / 'umt5' / 'config.json')
  with pytest.raises(FileNotFoundError, match=r'umt5/config.json \(umT5 text encoder\)'):
    wan_dir.inspect(str(conv))
  (tmp_path / 'other').mkdir()
  with pytest.raises(FileNotFoundError, match='not a Wan2.1 folder'):
    wan_dir.inspect(str(tmp_path / 'other'))
  with pytest.raises(FileNotFoundError, match='--wan_dir not found'):
    wan_dir.inspect(str(tmp_path / 'nope'))


def test_convert_wan_dir_errors(folders, tmp_path, capsys):
  assert convert.main([f'--src={folders / "converted"}', f'--dst={tmp_path / "x"}',
                       '--model=wan_dir']) == 2
  assert 'already converted' in capsys.readouterr().err
  broken = tmp_path / 'wan'
  shutil.copytree(folders / 'Wan2.1-T2V-1.3B', broken)
  os.remove(broken / 'models_t5_umt5-xxl-enc-bf16.pth')
  assert convert.main([f'--src={broken}', f'--dst={tmp_path / "y"}', '--model=wan_dir']) == 2
  assert 'missing: models_t5_umt5-xxl-enc-bf16.pth' in capsys.readouterr().err
  assert not (tmp_path / 'y').exists()
  assert not [p for p in os.listdir(tmp_path) if '.partial-' in p]
  # A diffusers pipeline root is not one model: the error says what to pass instead.
  assert convert.main([f'--src={folders / "diffusers"}', f'--dst={tmp_path / "z"}']) == 2
  assert '--src=.../transformer' in capsys.readouterr().err


def test_prompts(tmp_path):
  assert wan_dir.read_prompts('a cat', None) == ['a cat']
  assert wan_dir.read_prompts(None, None) is None
  (tmp_path / 'p.txt').write_text('a cat\n\n  the sea  \n')
  assert wan_dir.read_prompts(None, str(tmp_path / 'p.txt')) == ['a cat', 'the sea']
  (tmp_path / 'e.txt').write_text('\n \n')
  with pytest.raises(ValueError, match='holds no prompt'):
    wan_dir.read_prompts(None, str(tmp_path / 'e.txt'))
  with pytest.raises(ValueError, match='not both'):
    wan_dir.read_prompts('a', str(tmp_path / 'p.txt'))
  with pytest.raises(ValueError, match='empty'):
    wan_dir.read_prompts('  ', None)
  with pytest.raises(FileNotFoundError, match='prompts file not found'):
    wan_dir.read_prompts(None, str(tmp_path / 'nope.txt'))
