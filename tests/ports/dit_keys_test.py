"""The DiT key table: round trips between kvjax, original Wan and diffusers names, and its errors."""

import numpy as np
import pytest
from flax import nnx

from kvjax import checkpoint as ckpt
from ports import dit as dp
from tests.conftest import requires_torch, tiny_config


@pytest.fixture(scope='module')
def setup():
  cfg = tiny_config()
  params = ckpt.to_nested(ckpt.init_params(cfg, 1))
  expected = nnx.to_pure_dict(ckpt.abstract_params(cfg))
  return cfg, params, expected


def _eq(a, b):
  fa, fb = dp.flat_paths(a), dp.flat_paths(b)
  assert fa == fb
  for p in fa:
    np.testing.assert_array_equal(dp._get(a, p), dp._get(b, p))


def test_roundtrip(setup):
  cfg, params, expected = setup
  sd = dp.params_to_original(params)
  assert len(sd) == 15 + 27 * cfg.num_layers          # 27 tensors a block, 15 global (spec 1.1)
  assert sd['blocks.1.self_attn.q.weight'].shape == (cfg.dim, cfg.dim)
  assert sd['patch_embedding.weight'].shape == (cfg.dim, cfg.in_dim, 1, 2, 2)
  _eq(dp.original_to_params(sd, expected), params)
  via_diffusers = dp.diffusers_to_original(dp.original_to_diffusers(sd))
  assert via_diffusers.keys() == sd.keys()
  assert dp.infer_config(sd, num_heads=cfg.num_heads) == dict(
      dim=cfg.dim, in_dim=16, patch_size=(1, 2, 2), ffn_dim=cfg.ffn_dim, freq_dim=256,
      text_dim=cfg.text_dim, out_dim=16, num_layers=cfg.num_layers, num_heads=cfg.num_heads)


@requires_torch
def test_diffusers_strict_load_of_our_names(setup):
  """Our diffusers names are exactly the ones WanTransformer3DModel expects (strict load)."""
  from kvjax import reference_torch as rt
  cfg, params, _ = setup
  model = rt.build_diffusers(cfg, params)             # load_state_dict(strict=True) inside
  got = rt.state_dict_numpy(model)
  np.testing.assert_array_equal(got['blocks.0.attn1.to_q.weight'], params['blocks']['self_attn']['q']['kernel'][0].T)
  np.testing.assert_array_equal(got['blocks.1.norm2.weight'], params['blocks']['norm3']['scale'][1])


def test_missing_unexpected_and_wrong_shape(setup):
  cfg, params, expected = setup
  sd = dp.params_to_original(params)
  broken = dict(sd)
  del broken['blocks.1.cross_attn.k.bias']
  with pytest.raises(dp.PortError, match=r"missing key 'blocks.1.cross_attn.k.bias'"):
    dp.original_to_params(broken, expected)
  extra = dict(sd, **{'blocks.0.img_emb.weight': np.zeros(3)})
  with pytest.raises(dp.PortError, match='unexpected source key.*img_emb'):
    dp.original_to_params(extra, expected)
  assert dp.original_to_params(extra, expected, ignore=lambda k: 'img_emb' in k)
  tr = dict(sd)
  tr['blocks.0.ffn.0.weight'] = sd['blocks.0.ffn.0.weight'].T
  with pytest.raises(dp.PortError, match=r'blocks.0.ffn.0.weight -> blocks/ffn/fc1/kernel\[0\].*transposed'):
    dp.original_to_params(tr, expected)
  with pytest.raises(dp.PortError, match='unexpected diffusers key'):
    dp.diffusers_to_original({'blocks.0.attn1.to_q.lora_A': np.zeros(1)})
  gap = {k: v for k, v in sd.items() if not k.startswith('blocks.0.')}
  with pytest.raises(dp.PortError, match=r'blocks \[0\] are missing'):
    dp.num_layers_of(gap)
