"""The Wan VAE decoder against diffusers' AutoencoderKLWan, and streamed vs one-shot decoding.

A tiny random AutoencoderKLWan (base_dim 8, z_dim 16) is saved as ``Wan2.1_VAE.pth`` (original
names, encoder included) and as a diffusers folder, converted with ``ports.convert`` and
compared with ``AutoencoderKLWan.decode(z * std + mean)`` within 1e-4 relative (float32).
Streaming per latent frame and per 3-frame block equals the one-shot decode exactly.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import checkpoint as ckpt
from kvjax import vae
from ports import convert
from ports import engine
from ports import vae as vp
from ports.sources import DictSource, PortError
from tests.conftest import rel_err, requires_torch

TOL = 1e-4


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  from tests import wan_fixtures as wf
  root = tmp_path_factory.mktemp('vae')
  model = wf.tiny_vae(0)
  wf.save_wan_vae(str(root / 'Wan2.1_VAE.pth'), model)
  model.save_pretrained(str(root / 'vae'))
  return dict(root=root, model=model)


def _latents(frames=6, seed=0, h=4, w=6):
  return np.random.default_rng(seed).standard_normal((1, frames, 16, h, w)).astype(np.float32)


def _diffusers_decode(model, z, cfg):
  """diffusers decodes raw latents: z * std + mean; [B, F, C, h, w] -> [B, T, H, W, 3]."""
  import torch
  mean = np.asarray(cfg.latents_mean, np.float32)[None, None, :, None, None]
  std = np.asarray(cfg.latents_std, np.float32)[None, None, :, None, None]
  raw = np.ascontiguousarray((z * std + mean).transpose(0, 2, 1, 3, 4))
  with torch.no_grad():
    out = model.decode(torch.from_numpy(raw)).sample.numpy()
  return out.transpose(0, 2, 3, 4, 1)


def _load(path):
  meta = json.loads((path / 'config.json').read_text())
  assert meta['format'] == vae.FORMAT
  cfg = vae.VAEConfig.from_dict(meta['model'])
  return cfg, ckpt.restore_tree(str(path), vae.abstract_params(cfg))


@pytest.fixture(scope='module')
def converted(tiny, tmp_path_factory):
  out = tmp_path_factory.mktemp('vae_out') / 'c'
  assert convert.main([f'--src={tiny["root"] / "Wan2.1_VAE.pth"}', f'--dst={out}']) == 0
  return _load(out)


@requires_torch
class TestParity:

  def test_decode_matches_diffusers(self, tiny, converted):
    cfg, params = converted
    assert (cfg.dim, cfg.z_dim, cfg.param_dtype) == (8, 16, 'float32')
    z = _latents(frames=4, w=4)
    video = vae.VAEDecoder(cfg, params).decode(z)
    ref = _diffusers_decode(tiny['model'], z, cfg)
    assert video.shape == ref.shape == (1, 1 + 4 * 3, 32, 32, 3)
    assert 0.2 < np.mean(np.abs(ref) < 0.999)              # not everything is clipped
    assert rel_err(video, ref) <= TOL
    # Negative control: the same latents decoded without de-normalisation are far off.
    raw = _diffusers_decode(tiny['model'], (z[:, :2] - np.asarray(cfg.latents_mean, np.float32)[:, None, None])
                            / np.asarray(cfg.latents_std, np.float32)[:, None, None], cfg)
    assert rel_err(video[:, :5], raw) > 1e-2

  def test_diffusers_folder_gives_same_params(self, tiny, converted, tmp_path):
    assert convert.main([f'--src={tiny["root"] / "vae"}', f'--dst={tmp_path / "d"}']) == 0
    cfg, params = _load(tmp_path / 'd')
    a, b = nnx.to_pure_dict(converted[1]), nnx.to_pure_dict(params)
    for p in engine.flat_paths(a):
      np.testing.assert_array_equal(np.asarray(engine.get_path(a, p)),
                                    np.asarray(engine.get_path(b, p)), err_msg=p)
    assert cfg.latents_mean == converted[0].latents_mean

  def test_key_tables_round_trip(self, tiny):
    sd = {k: v.numpy() for k, v in tiny['model'].state_dict().items()}
    orig = vp.diffusers_to_original(sd)
    assert len(orig) == len(sd) == 194
    assert 'decoder.upsamples.3.time_conv.weight' in orig
    assert 'decoder.upsamples.4.shortcut.weight' in orig
    assert 'encoder.downsamples.2.resample.1.weight' in orig
    assert vp.original_to_diffusers(orig).keys() == sd.keys()
    cfg = vp.infer_config(DictSource(orig))
    nested = engine.convert(DictSource(orig), vp.table(cfg),
                            nnx.to_pure_dict(vae.abstract_params(cfg)), ignore=vp.ignored)
    back = vp.params_to_original(cfg, nested)
    assert set(back) == {k for k in orig if not vp.ignored(k)}
    for k in back:
      np.testing.assert_array_equal(back[k], orig[k])


@requires_torch
def test_original_names_agree_with_diffusers_single_file_converter(tiny):
  """diffusers' convert_wan_vae_to_diffusers maps our original names back to the same state dict
  (an independent check of the table that wrote Wan2.1_VAE.pth)."""
  import torch
  from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
  sd = {k: v.clone() for k, v in tiny['model'].state_dict().items()}
  theirs = convert_wan_vae_to_diffusers(vp.diffusers_to_original(sd))
  assert theirs.keys() == sd.keys()
  assert all(torch.equal(theirs[k], sd[k]) for k in sd)


def test_streaming_equals_one_shot(converted):
  """Per frame, per 3-frame block (first block, then the rest) and one shot: bit-identical."""
  cfg, params = converted
  dec = vae.VAEDecoder(cfg, params)
  z = _latents(frames=9, seed=3, w=4)
  one = dec.decode(z)
  s = dec.stream()
  blocks = [s.push(z[:, i:i + 3]) for i in range(0, 9, 3)]
  assert [b.shape[1] for b in blocks] == [1 + 4 * 2, 12, 12]
  np.testing.assert_array_equal(np.concatenate(blocks, axis=1), one)
  s = dec.stream()
  frames = [s.push(z[:, i:i + 1]) for i in range(9)]
  np.testing.assert_array_equal(np.concatenate(frames, axis=1), one)
  # The cache matters: restarting the stream mid-way gives a different second half.
  s2 = dec.stream()
  restarted = s2.push(z[:, 3:])
  assert restarted.shape[1] == 1 + 4 * 5
  assert not np.allclose(restarted[:, 1:], one[:, 1 + 4 * 3:], atol=1e-3)


def test_full_size_shapes():
  """The Wan2.1 decoder through eval_shape: 73,295,331 parameters (spec 4.2), plus 272 for the
  post-quantisation conv; 21 latent frames of 60x104 decode to 81 frames of 480x832."""
  cfg = vae.VAEConfig()
  abstract = nnx.to_pure_dict(vae.abstract_params(cfg))
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  assert count(abstract['decoder']) == 73_295_331
  assert count(abstract) == 73_295_331 + 16 * 16 + 16
  assert cfg.num_frames(21) == 81
  gdef = vae.graphdef(cfg)
  video, cache = jax.eval_shape(lambda p, z: nnx.merge(gdef, p)(z, None, True),
                                vae.abstract_params(cfg), jax.ShapeDtypeStruct((1, 1, 60, 104, 16), jnp.float32))
  assert video.shape == (1, 1, 480, 832, 3)
  video, _ = jax.eval_shape(lambda p, c, z: nnx.merge(gdef, p)(z, c, False),
                            vae.abstract_params(cfg), cache, jax.ShapeDtypeStruct((1, 1, 60, 104, 16), jnp.float32))
  assert video.shape == (1, 4, 480, 832, 3)
  assert len(cache) == 32                                # one per causal 3x3x3/3x1x1 convolution


@requires_torch
def test_full_size_key_table_against_diffusers_shapes():
  """The whole-VAE key set of diffusers' default AutoencoderKLWan (meta tensors: no memory):
  126,892,531 parameters, 194 tensors, mapped through the original names onto our decoder table."""
  import torch
  from diffusers import AutoencoderKLWan
  with torch.device('meta'):
    model = AutoencoderKLWan()
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert sum(int(np.prod(s)) for s in shapes.values()) == 126_892_531 and len(shapes) == 194
  zeros = {vp.diffusers_key_to_original(k): np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  src = DictSource(zeros, 'Wan2.1_VAE.pth')
  cfg = vp.infer_config(src)
  assert cfg == vae.VAEConfig()
  plan, consumed = engine._plan(src, vp.table(cfg),
                                engine.flat_paths(nnx.to_pure_dict(vae.abstract_params(cfg))))
  assert set(consumed) == {k for k in zeros if not vp.ignored(k)}


@requires_torch
class TestBadInput:

  def test_missing_and_unexpected_keys(self, tiny):
    sd = vp.diffusers_to_original({k: v.numpy() for k, v in tiny['model'].state_dict().items()})
    broken = {k: v for k, v in sd.items() if k != 'decoder.upsamples.7.time_conv.bias'}
    with pytest.raises(PortError, match="missing key 'decoder.upsamples.7.time_conv.bias'"):
      vp.convert(DictSource(broken, 'Wan2.1_VAE.pth'))
    with pytest.raises(PortError, match=r"unexpected source key\(s\) \['decoder.middle.3.gamma'\]"):
      vp.convert(DictSource(dict(sd, **{'decoder.middle.3.gamma': np.ones(3)}), 'Wan2.1_VAE.pth'))
    tr = dict(sd)
    tr['decoder.upsamples.11.resample.1.weight'] = sd['decoder.upsamples.11.resample.1.weight'].transpose(1, 0, 2, 3)
    with pytest.raises(PortError, match=r'decoder.upsamples.11.resample.1.weight -> decoder/up2/upsample/conv/kernel'):
      vp.convert(DictSource(tr, 'Wan2.1_VAE.pth'))

  def test_other_vaes(self, tiny, tmp_path):
    sd = {k: v.numpy() for k, v in tiny['model'].state_dict().items()}
    cfg = json.loads((tiny['root'] / 'vae' / 'config.json').read_text())
    (tmp_path / 'c.json').write_text(json.dumps(dict(cfg, is_residual=True, patch_size=2, z_dim=48)))
    with pytest.raises(PortError, match='a Wan2.2-style VAE'):
      vp.convert(DictSource(sd), side_config=str(tmp_path / 'c.json'))
    # A VAE with other than 16 latent channels has no published mean/std.
    orig = vp.diffusers_to_original(sd)
    orig['decoder.conv1.weight'] = orig['decoder.conv1.weight'][:, :4]
    with pytest.raises(PortError, match='a 4-channel VAE; the published Wan2.1 latent mean/std'):
      vp.convert(DictSource(orig, 'Wan2.1_VAE.pth'))

  def test_dit_passed_as_vae(self, tmp_path, capsys):
    from tests import wan_fixtures as wf
    cfg, model = wf.tiny_dit(0)
    wf.save_wan_dit(str(tmp_path / 'wan'), cfg, model)
    assert convert.main([f'--src={tmp_path / "wan"}', f'--dst={tmp_path / "d"}', '--model=vae']) == 2
    assert 'is a Wan DiT, not a Wan VAE' in capsys.readouterr().err
    assert not (tmp_path / 'd').exists()
