"""Weight-port checks on the real checkpoints (skipped unless pointed at them).

  pytest tests/real_checkpoint_test.py --real_checkpoint_dir=/data/ckpts    # or
  KVJAX_REAL_CHECKPOINT_DIR=/data/ckpts pytest tests/real_checkpoint_test.py

The folder holds ``self_forcing_dmd.pt`` (or ``checkpoints/self_forcing_dmd.pt``) and
``Wan2.1-T2V-1.3B/`` (the original release: DiT safetensors + config.json, umT5 .pth, VAE .pth,
google/umt5-xxl). Each test skips when its file is absent. The checks are the tiny-model tests
at full size, float32: the converted DiT (Self-Forcing .pt and Wan safetensors) against diffusers
loaded through diffusers' own single-file converter, a short rollout against the block-causal
recompute, the umT5 encoder against transformers, the VAE decoder against diffusers, and a
prompt-to-video launcher run. Memory: about 60 GB of host RAM (umT5 in float32 twice); on a
GPU machine jax uses the GPU and torch the CPU. See BUILD.md.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import checkpoint as ckpt
from kvjax import wan_dir
from ports import convert
from ports import sources
from tests.conftest import rel_err, requires_torch

pytestmark = requires_torch
TOL = 1e-4


@pytest.fixture(scope='module')
def real(request):
  root = request.config.getoption('--real_checkpoint_dir')
  if not root:
    pytest.skip('real checkpoints: pass --real_checkpoint_dir or set KVJAX_REAL_CHECKPOINT_DIR')
  if not os.path.isdir(root):
    pytest.fail(f'--real_checkpoint_dir {root} is not a folder')
  sf = [p for p in (os.path.join(root, 'self_forcing_dmd.pt'),
                    os.path.join(root, 'checkpoints', 'self_forcing_dmd.pt')) if os.path.isfile(p)]
  wan = os.path.join(root, 'Wan2.1-T2V-1.3B')
  return dict(root=root, sf=sf[0] if sf else None, wan=wan if os.path.isdir(wan) else None)


def _need(real, key):
  if real[key] is None:
    pytest.skip(f'{key} not found under {real["root"]}')
  return real[key]


def _heads_flag(real):
  """--num_heads from the Wan folder's config.json when present (the 1.3B's 12 are also known)."""
  if real['wan'] and os.path.isfile(os.path.join(real['wan'], 'config.json')):
    with open(os.path.join(real['wan'], 'config.json')) as f:
      return [f'--num_heads={json.load(f)["num_heads"]}']
  return []


@pytest.fixture(scope='module')
def converted_sf(real, tmp_path_factory):
  src = _need(real, 'sf')
  dst = tmp_path_factory.mktemp('real') / 'sf_fp32'
  assert convert.main([f'--src={src}', f'--dst={dst}', '--dtype=float32', *_heads_flag(real)]) == 0
  return str(dst)


def _diffusers_dit_from(path, cfg):
  """diffusers WanTransformer3DModel of ``cfg`` loaded from a Self-Forcing .pt (generator_ema,
  'model.' removed) or a Wan folder, renamed by diffusers' own single-file converter."""
  import torch
  from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
  from kvjax import reference_torch as rt
  src = sources.open_file(path) if os.path.isfile(path) else sources.open_checkpoint(
      path, ('diffusion_pytorch_model',))
  sd = {k: torch.from_numpy(np.array(src.get(k), np.float32)) for k in src.keys()}
  model = rt.build_diffusers(cfg.replace(param_dtype='float32', compute_dtype='float32'))
  model.load_state_dict(convert_wan_transformer_to_diffusers(sd), strict=True)
  return model.float().eval()


def _inputs(frames=3, seed=0, text_dim=4096):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((1, frames, 16, 8, 8)).astype(np.float32)
  t = np.array([[1000.0, 937.5, 250.0, 0.0, 625.0, 833.3333][:frames]], np.float32)
  text = rng.standard_normal((1, 512, text_dim)).astype(np.float32) * 0.1
  return x, t, text


def test_sizes(real, converted_sf):
  cfg, params = ckpt.load(converted_sf)
  assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim, cfg.text_dim) == (1536, 12, 30, 8960, 4096)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 1_418_996_800
  wan = _need(real, 'wan')
  t5 = sources.open_file(os.path.join(wan, 'models_t5_umt5-xxl-enc-bf16.pth'))
  assert sum(int(np.prod(t5.shape(k))) for k in t5.keys()) == 5_680_910_336
  vae_src = sources.open_file(os.path.join(wan, 'Wan2.1_VAE.pth'))
  assert len(vae_src) == 194
  assert sum(int(np.prod(vae_src.shape(k))) for k in vae_src.keys()) == 126_892_531
  from kvjax.text import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load(os.path.join(wan, 'google', 'umt5-xxl'))
  assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and len(tok) <= 256384


def _forward(cfg, params, x, t, text):
  cfg = cfg.replace(compute_dtype='float32')
  model = nnx.merge(ckpt.graphdef(cfg), params)
  cross = model.cross_kv(jnp.asarray(text))
  return np.asarray(model.forward_full(jnp.asarray(x), jnp.asarray(t), cross,
                                       np.ones((x.shape[1], x.shape[1]), bool)))


def test_self_forcing_dit_forward(real, converted_sf):
  from kvjax import reference_torch as rt
  cfg, params = ckpt.load(converted_sf)
  x, t, text = _inputs(text_dim=cfg.text_dim)
  ref = rt.forward(_diffusers_dit_from(real['sf'], cfg), x, t, text)
  assert rel_err(_forward(cfg, params, x, t, text), ref) <= TOL


def test_wan_dit_forward(real, tmp_path):
  from kvjax import reference_torch as rt
  wan = _need(real, 'wan')
  assert convert.main([f'--src={wan}', f'--dst={tmp_path / "wan"}', '--dtype=float32']) == 0
  cfg, params = ckpt.load(str(tmp_path / 'wan'))
  x, t, text = _inputs(seed=1, text_dim=cfg.text_dim)
  ref = rt.forward(_diffusers_dit_from(wan, cfg), x, t, text)
  assert rel_err(_forward(cfg, params, x, t, text), ref) <= TOL


def test_self_forcing_rollout(real, converted_sf, sampler_cfg):
  """6 latent frames of 8x8 (2 blocks x (4 steps + context pass)) vs the diffusers recompute."""
  from kvjax import cache as kvcache
  from kvjax import reference_torch as rt
  from kvjax.sampler import SelfForcing, make_noise
  cfg, params = ckpt.load(converted_sf)
  cfg = cfg.replace(compute_dtype='float32')
  noise = make_noise(3, 1, 6, 16, 8, 8, sampler_cfg)
  _, _, text = _inputs(seed=2, text_dim=cfg.text_dim)
  spec = kvcache.CacheSpec(batch=1, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                           head_dim=cfg.head_dim, frame_tokens=16, block_frames=3, window_frames=6,
                           sink_frames=0, dtype=cfg.cdtype)
  sf = SelfForcing(cfg, sampler_cfg, kvcache.get('bf16'), spec, latent_hw=(8, 8), impl='xla',
                   graphdef=ckpt.graphdef(cfg))
  lat, _, _ = sf.rollout(params, noise, text)
  ref = rt.recompute_rollout(_diffusers_dit_from(real['sf'], cfg), noise, text, sampler_cfg, 6, 0)
  assert rel_err(lat, ref) <= TOL


def test_umt5_encoder(real):
  import torch
  from transformers import UMT5Config, UMT5EncoderModel
  from ports import umt5 as up
  wd = wan_dir.inspect(_need(real, 'wan'))
  enc = wan_dir.load_text_encoder(wd, text_len=512, dtype='float32')
  prompts = ['A cat surfing a wave at sunset, cinematic lighting.',
             'Ein Hund l\u00e4uft \u00fcber eine Wiese; \u4e00\u53ea\u732b\u5728\u6d77\u6ee9\u4e0a\u3002']
  ids, mask = enc.tokenize(prompts)
  assert np.all(ids[mask == 0] == 0) and all(ids[i, mask[i].sum() - 1] == 1 for i in range(2))
  ours = enc.encode_ids(ids, mask)
  enc.free()
  src = sources.open_file(wd.text_encoder)
  sd = {k: torch.from_numpy(np.array(src.get(k), np.float32)) for k in src.keys()}
  c = enc.cfg
  model = UMT5EncoderModel(UMT5Config(vocab_size=c.vocab_size, d_model=c.dim, d_kv=c.head_dim,
                                      d_ff=c.ffn_dim, num_layers=c.num_layers, num_heads=c.num_heads,
                                      relative_attention_num_buckets=c.num_buckets,
                                      relative_attention_max_distance=c.max_distance,
                                      feed_forward_proj='gated-gelu', dropout_rate=0.0))
  model.load_state_dict(up.original_to_hf(sd), strict=True)
  n = int(mask.sum(1).max())                    # padded keys are masked: the first n suffice
  with torch.no_grad():
    ref = model.float().eval()(input_ids=torch.from_numpy(ids[:, :n].astype(np.int64)),
                               attention_mask=torch.from_numpy(mask[:, :n].astype(np.int64))
                               ).last_hidden_state.numpy()
  valid = mask[:, :n].astype(bool)
  assert rel_err(ours[:, :n][valid], ref[valid]) <= TOL
  assert np.all(ours[mask == 0] == 0)


def test_vae_decoder(real):
  import torch
  from diffusers import AutoencoderKLWan
  from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
  wd = wan_dir.inspect(_need(real, 'wan'))
  dec = wan_dir.load_vae(wd, dtype='float32')
  z = np.random.default_rng(0).standard_normal((1, 4, 16, 8, 8)).astype(np.float32)
  ours = dec.decode(z)
  s = dec.stream()
  np.testing.assert_array_equal(np.concatenate([s.push(z[:, :3]), s.push(z[:, 3:])], 1), ours)
  src = sources.open_file(wd.vae)
  cfg = dec.cfg
  model = AutoencoderKLWan(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                           num_res_blocks=cfg.num_res_blocks,
                           temperal_downsample=list(cfg.temporal_downsample))
  model.load_state_dict(convert_wan_vae_to_diffusers(
      {k: torch.from_numpy(np.array(src.get(k), np.float32)) for k in src.keys()}), strict=True)
  raw = (z * np.asarray(cfg.latents_std, np.float32)[:, None, None]
         + np.asarray(cfg.latents_mean, np.float32)[:, None, None])
  with torch.no_grad():
    ref = model.float().eval().decode(torch.from_numpy(np.ascontiguousarray(
        raw.transpose(0, 2, 1, 3, 4)))).sample.numpy().transpose(0, 2, 3, 4, 1)
  assert ours.shape == ref.shape == (1, 13, 64, 64, 3)
  assert rel_err(ours, ref) <= TOL


def test_launcher_prompt_to_video(real, tmp_path):
  """The converted Self-Forcing DiT (bf16) + the raw Wan folder + a prompt -> video.mp4."""
  from configs.self_forcing import get_config
  from kvjax import run, runconfig
  from kvjax import video as video_io
  sf, wan = _need(real, 'sf'), _need(real, 'wan')
  assert convert.main([f'--src={sf}', f'--dst={tmp_path / "ckpt"}', *_heads_flag(real)]) == 0
  cfg = get_config('wan2.1_t2v_1.3b')
  cfg.video.latent_height, cfg.video.latent_width = 16, 16
  s = run.resolve(runconfig.override(cfg, checkpoint=str(tmp_path / 'ckpt'), wan_dir=wan,
                                     num_latent_frames=3, prompt='A cat surfing a wave at sunset.',
                                     reference='none'), outdir=str(tmp_path / 'run'))
  res = run.generate(s, progress=False)
  frames, fps = video_io.read_mp4(str(tmp_path / 'run' / 'video.mp4'))
  assert frames.shape == (9, 128, 128, 3) and fps == 16.0 and res['text_len'] == 512
  assert json.loads((tmp_path / 'run' / 'result.json').read_text())['videos'] == ['video.mp4']
