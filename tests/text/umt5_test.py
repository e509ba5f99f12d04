"""The umT5 encoder and tokenizer against transformers' UMT5EncoderModel and T5 tokenizer.

A tiny random UMT5EncoderModel is saved as Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (original
names; float32 and bfloat16) and as a transformers folder, converted, and compared in float32
(within 1e-4 relative on real tokens; padded rows exactly zero). The bucket function is checked
against transformers' over +-600 positions; the full umT5-XXL shapes through ``eval_shape``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import text
from kvjax.text import tokenizer as tokenizer_lib
from ports import convert
from ports import umt5 as up
from ports.sources import DictSource, PortError, open_file
from tests.conftest import rel_err, requires_torch

TOL = 1e-4


def _encoder(cfg, nested, text_len=24, tok=None):
  state = text.abstract_params(cfg)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, nested))
  return text.TextEncoder(cfg, state, tok, text_len)


def _ids(seed=0, lens=(13, 24), length=24, vocab=100):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (len(lens), length)).astype(np.int32)
  mask = (np.arange(length)[None] < np.asarray(lens)[:, None]).astype(np.int32)
  return ids * mask, mask


def _hf(model, ids, mask):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state.numpy()


@pytest.fixture(scope='module')
def t5(tmp_path_factory):
  from tests import wan_fixtures as wf
  root = tmp_path_factory.mktemp('t5')
  model = wf.tiny_umt5(0)
  wf.save_wan_t5(str(root / 'models_t5_umt5-xxl-enc-bf16.pth'), model)
  model.save_pretrained(str(root / 'hf'))
  return dict(root=root, model=model)


@requires_torch
class TestParity:

  @pytest.mark.parametrize('fmt', ['wan_pth', 'hf_folder'])
  def test_converted_encoder_matches_transformers(self, t5, tmp_path, fmt):
    src = t5['root'] / ('models_t5_umt5-xxl-enc-bf16.pth' if fmt == 'wan_pth' else 'hf')
    assert convert.main([f'--src={src}', f'--dst={tmp_path / "c"}', '--dtype=float32']) == 0
    from kvjax import checkpoint as ckpt
    meta = json.loads((tmp_path / 'c' / 'config.json').read_text())
    assert meta['format'] == text.FORMAT
    cfg = text.UMT5Config.from_dict(meta['model'])
    assert (cfg.dim, cfg.num_heads, cfg.head_dim, cfg.num_layers, cfg.vocab_size) == (32, 4, 8, 2, 100)
    params = ckpt.restore_tree(str(tmp_path / 'c'), text.abstract_params(cfg))
    enc = text.TextEncoder(cfg, params, None, 24)
    ids, mask = _ids()
    out = enc.encode_ids(ids, mask)
    ref = _hf(t5['model'], ids, mask)
    valid = mask.astype(bool)
    assert rel_err(out[valid], ref[valid]) <= TOL
    assert np.all(out[~valid] == 0.0)                      # padded positions zeroed
    # Negative control: without the padding mask the valid rows change.
    out_nomask = enc.encode_ids(ids, np.ones_like(mask))
    assert rel_err(out_nomask[0, :13], ref[0, :13]) > 1e-3

  def test_bfloat16_weights_file(self, t5, tmp_path):
    """The released file is bf16: its values are read exactly (compared with a transformers model
    holding the same bf16-rounded weights)."""
    import torch
    from tests import wan_fixtures as wf
    path = tmp_path / 'models_t5_umt5-xxl-enc-bf16.pth'
    wf.save_wan_t5(str(path), t5['model'], dtype=torch.bfloat16)
    cfg, nested = up.convert(open_file(str(path)), dtype='float32')
    rounded = wf.tiny_umt5(0)
    with torch.no_grad():
      for p in rounded.parameters():
        p.copy_(p.to(torch.bfloat16).float())
    enc = _encoder(cfg, nested)
    ids, mask = _ids(1)
    out, ref = enc.encode_ids(ids, mask), _hf(rounded, ids, mask)
    assert rel_err(out[mask.astype(bool)], ref[mask.astype(bool)]) <= TOL

  def test_relative_buckets_match_transformers(self, t5):
    import torch
    att = t5['model'].encoder.block[0].layer[0].SelfAttention
    n = 600
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    want = att._relative_position_bucket(rel).numpy()
    got = text.relative_buckets(n, n, 32, 128)
    np.testing.assert_array_equal(got, want)
    assert got.min() == 0 and got.max() == 31

  def test_key_tables_round_trip(self, t5):
    sd = {k: v.numpy() for k, v in t5['model'].state_dict().items()}
    orig = {up.hf_key_to_original(k): v for k, v in sd.items() if k != 'encoder.embed_tokens.weight'}
    assert len(orig) == 2 + 10 * 2                         # embedding, final norm, 10 per block
    back = up.original_to_hf(orig)
    assert back.keys() == sd.keys()
    cfg, nested = up.convert(DictSource(orig), dtype='float32')
    again = up.params_to_original(nested)
    assert again.keys() == orig.keys()
    for k in orig:
      np.testing.assert_array_equal(again[k], orig[k])


def test_full_size_shapes():
  """umT5-XXL through eval_shape: 5,680,910,336 parameters (spec 4.1), nothing allocated."""
  cfg = text.UMT5Config()
  abstract = nnx.to_pure_dict(text.abstract_params(cfg))
  assert text.count_params(abstract) == 5_680_910_336
  assert abstract['token_embedding'].shape == (256384, 4096)
  assert abstract['blocks']['pos_embedding'].shape == (24, 32, 64)
  assert abstract['blocks']['ffn']['gate']['kernel'].shape == (24, 4096, 10240)
  out = jax.eval_shape(lambda p, i, m: nnx.merge(text.graphdef(cfg), p)(i, m),
                       text.abstract_params(cfg), jax.ShapeDtypeStruct((2, 512), jnp.int32),
                       jax.ShapeDtypeStruct((2, 512), jnp.int32))
  assert out.shape == (2, 512, 4096) and out.dtype == jnp.float32


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  from tests import wan_fixtures as wf
  folder = tmp_path_factory.mktemp('tok') / 'google' / 'umt5-xxl'
  wf.tiny_tokenizer(str(folder))
  return tokenizer_lib.load(str(folder))


class TestTokenizer:

  def test_padding_truncation_eos(self, tok):
    ids, mask = tokenizer_lib.tokenize(tok, ['a cat runs on the beach', 'the red dog ' * 30], 16)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == np.int32
    n = int(mask[0].sum())
    assert n == 7                                         # 6 words + </s>
    assert ids[0, n - 1] == tok.eos_token_id == 1
    assert np.all(ids[0, n:] == 0) and np.all(mask[0, n:] == 0)   # <pad> = 0
    assert mask[1].all() and ids[1, -1] == 1              # truncated, </s> kept last
    assert tok.convert_ids_to_tokens(ids[0, :3].tolist()) == ['\u2581a', '\u2581cat', '\u2581runs']

  def test_cleaning(self, tok):
    assert tokenizer_lib.clean('  a&amp;amp;b \n\t cat  ') == 'a&b cat'
    a, _ = tokenizer_lib.tokenize(tok, ['a   cat\n runs'], 8)
    b, _ = tokenizer_lib.tokenize(tok, ['a cat runs'], 8)
    np.testing.assert_array_equal(a, b)

  def test_missing_or_broken_folder(self, tmp_path):
    with pytest.raises(FileNotFoundError, match='tokenizer folder not found'):
      tokenizer_lib.load(str(tmp_path / 'nope'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no tokenizer.json or spiece.model'):
      tokenizer_lib.load(str(tmp_path / 'empty'))
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'tokenizer.json').write_text('{broken')
    with pytest.raises(ValueError, match='cannot load the tokenizer'):
      tokenizer_lib.load(str(tmp_path / 'bad'))


@requires_torch
def test_text_encoder_end_to_end_and_free(t5, tmp_path):
  """Prompts -> tokenizer -> encoder equals transformers on the same ids; free() drops weights."""
  from tests import wan_fixtures as wf
  wf.tiny_tokenizer(str(tmp_path / 'tok'))
  tok = tokenizer_lib.load(str(tmp_path / 'tok'))
  cfg, nested = up.convert(up.as_original(DictSource(
      {k: v.numpy() for k, v in t5['model'].state_dict().items()})), dtype='float32')
  enc = _encoder(cfg, nested, text_len=16, tok=tok)
  prompts = ['a cat runs on the beach at sunset', 'red']
  states = enc.encode(prompts)
  ids, mask = enc.tokenize(prompts)
  assert states.shape == (2, 16, 32) and states.dtype == np.float32
  assert np.all(states[1, 2:] == 0) and np.any(states[1, :2] != 0)
  ref = _hf(t5['model'], ids, mask)
  assert rel_err(states[mask.astype(bool)], ref[mask.astype(bool)]) <= TOL
  leaf = jax.tree.leaves(enc.params)[0]
  enc.free()
  assert leaf.is_deleted() and enc.params is None
  with pytest.raises(RuntimeError, match='freed'):
    enc.encode(prompts)


@requires_torch
class TestBadInput:

  def test_missing_key_and_t5_config(self, t5, tmp_path):
    sd = {k: v.numpy() for k, v in t5['model'].state_dict().items()}
    del sd['encoder.block.1.layer.1.DenseReluDense.wi_1.weight']
    with pytest.raises(PortError, match="missing key 'blocks.1.ffn.fc1.weight'"):
      up.convert(DictSource(sd, 'x.safetensors'), dtype='float32')
    cfg_json = json.loads((t5['root'] / 'hf' / 'config.json').read_text())
    (tmp_path / 'c.json').write_text(json.dumps(dict(cfg_json, model_type='t5')))
    with pytest.raises(PortError, match="model_type='t5'"):
      up.convert(DictSource({k: v.numpy() for k, v in t5['model'].state_dict().items()}),
                 side_config=str(tmp_path / 'c.json'), dtype='float32')
    (tmp_path / 'c.json').write_text(json.dumps(dict(cfg_json, d_model=64)))
    with pytest.raises(PortError, match='says d_model=64, the tensors give 32'):
      up.convert(DictSource({k: v.numpy() for k, v in t5['model'].state_dict().items()}),
                 side_config=str(tmp_path / 'c.json'), dtype='float32')

  def test_t5_passed_as_vae(self, t5, tmp_path, capsys):
    src = t5['root'] / 'models_t5_umt5-xxl-enc-bf16.pth'
    assert convert.main([f'--src={src}', f'--dst={tmp_path / "d"}', '--model=vae']) == 2
    assert 'is a umT5 text encoder, not a Wan VAE' in capsys.readouterr().err
    assert not (tmp_path / 'd').exists()
