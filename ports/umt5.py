"""umT5 encoder weights: Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` names <-> transformers'
UMT5EncoderModel names <-> kvjax.

The token embedding is tied in transformers (``shared.weight`` = ``encoder.embed_tokens.weight``,
either or both may be stored). A full encoder-decoder UMT5 checkpoint may be given: its decoder
and LM head are explicitly ignored.
"""

from __future__ import annotations

import re
from typing import Mapping

from ports import engine
from ports.sources import PortError, RenamedSource, TensorSource, config_number, read_json

TABLE: dict[str, tuple[str, str]] = {
    'token_embedding': ('token_embedding.weight', 'identity'),
    'norm/scale': ('norm.weight', 'identity'),
    'blocks/norm1/scale': ('blocks.{i}.norm1.weight', 'identity'),
    'blocks/norm2/scale': ('blocks.{i}.norm2.weight', 'identity'),
    'blocks/pos_embedding': ('blocks.{i}.pos_embedding.embedding.weight', 'identity'),
    'blocks/ffn/gate/kernel': ('blocks.{i}.ffn.gate.0.weight', 'linear'),
    'blocks/ffn/fc1/kernel': ('blocks.{i}.ffn.fc1.weight', 'linear'),
    'blocks/ffn/fc2/kernel': ('blocks.{i}.ffn.fc2.weight', 'linear'),
    **{f'blocks/attn/{p}/kernel': (f'blocks.{{i}}.attn.{p}.weight', 'linear') for p in 'qkvo'},
}

# Per-block original suffix <-> transformers suffix (after 'blocks.N.' / 'encoder.block.N.').
_BLOCK_HF = {
    'norm1.weight': 'layer.0.layer_norm.weight',
    'pos_embedding.embedding.weight': 'layer.0.SelfAttention.relative_attention_bias.weight',
    'norm2.weight': 'layer.1.layer_norm.weight',
    'ffn.gate.0.weight': 'layer.1.DenseReluDense.wi_0.weight',
    'ffn.fc1.weight': 'layer.1.DenseReluDense.wi_1.weight',
    'ffn.fc2.weight': 'layer.1.DenseReluDense.wo.weight',
    **{f'attn.{p}.weight': f'layer.0.SelfAttention.{p}.weight' for p in 'qkvo'},
}
_HF_BLOCK = {v: k for k, v in _BLOCK_HF.items()}
_ORIG_BLOCK_RE = re.compile(r'^blocks\.(\d+)\.(.+)$')
_HF_BLOCK_RE = re.compile(r'^encoder\.block\.(\d+)\.(.+)$')
TIED = ('shared.weight', 'encoder.embed_tokens.weight')


def hf_ignored(key: str) -> bool:
  """Keys of a full UMT5 (encoder-decoder) checkpoint that the encoder does not use."""
  return key.startswith(('decoder.', 'lm_head.'))


def original_key_to_hf(key: str) -> str:
  if key == 'token_embedding.weight':
    return 'shared.weight'
  if key == 'norm.weight':
    return 'encoder.final_layer_norm.weight'
  m = _ORIG_BLOCK_RE.match(key)
  if m and m.group(2) in _BLOCK_HF:
    return f'encoder.block.{m.group(1)}.{_BLOCK_HF[m.group(2)]}'
  raise PortError(f'unexpected umT5 key {key!r}')


def hf_key_to_original(key: str) -> str:
  if key in TIED:
    return 'token_embedding.weight'
  if key == 'encoder.final_layer_norm.weight':
    return 'norm.weight'
  m = _HF_BLOCK_RE.match(key)
  if m and m.group(2) in _HF_BLOCK:
    return f'blocks.{m.group(1)}.{_HF_BLOCK[m.group(2)]}'
  raise PortError(f'unexpected UMT5EncoderModel key {key!r}')


def original_to_hf(sd: Mapping) -> dict:
  """Original names -> transformers names (the tied embedding under both of its names)."""
  out = {original_key_to_hf(k): v for k, v in sd.items()}
  if 'shared.weight' in out:
    out['encoder.embed_tokens.weight'] = out['shared.weight']
  return out


def flavor(keys) -> str | None:
  keys = set(keys)
  if 'token_embedding.weight' in keys and 'blocks.0.attn.q.weight' in keys:
    return 'original'
  if 'encoder.block.0.layer.0.SelfAttention.q.weight' in keys:
    return 'hf'
  return None


def as_original(source: TensorSource) -> TensorSource:
  kind = flavor(source.keys())
  if kind is None:
    raise PortError(f'{source.path}: not a umT5 encoder state dict (keys like '
                    f'{sorted(source.keys())[:4]})')
  if kind == 'original':
    return source
  if all(k in source for k in TIED) and source.shape(TIED[0]) != source.shape(TIED[1]):
    raise PortError(f'{source.path}: the tied embeddings {TIED} have different shapes '
                    f'{source.shape(TIED[0])} / {source.shape(TIED[1])}')
  names = {}
  for k in source.keys():
    if hf_ignored(k):
      continue
    if k in TIED and 'shared.weight' in source and k != 'shared.weight':
      continue                              # the tied copy: one name is enough
    names[hf_key_to_original(k)] = k
  return RenamedSource(source, names)


def infer_config(source: TensorSource, side: Mapping | None = None, side_path: str = '',
                 dtype: str = 'bfloat16'):
  """UMT5Config from original-named shapes (+ a transformers config.json, if any)."""
  from kvjax.text.umt5 import UMT5Config

  def shape(key):
    if key not in source:
      raise PortError(f'{source.path}: missing key {key!r}: cannot infer the umT5 config')
    return source.shape(key)
  vocab, dim = shape('token_embedding.weight')
  inner = shape('blocks.0.attn.q.weight')[0]
  buckets, heads = shape('blocks.0.pos_embedding.embedding.weight')
  if inner % heads:
    raise PortError(f'{source.path}: attention width {inner} is not divisible by {heads} heads')
  fields = dict(vocab_size=vocab, dim=dim, num_heads=heads, head_dim=inner // heads,
                ffn_dim=shape('blocks.0.ffn.fc1.weight')[0],
                num_layers=engine.count_layers(source.keys(), _ORIG_BLOCK_RE, 'blocks'),
                num_buckets=buckets)
  if side:
    if side.get('model_type') not in (None, 'umt5'):
      raise PortError(f'{side_path}: model_type={side.get("model_type")!r}; expected umt5 '
                      '(per-layer relative position bias)')
    if side.get('feed_forward_proj') not in (None, 'gated-gelu'):
      raise PortError(f'{side_path}: feed_forward_proj={side["feed_forward_proj"]!r}; the umT5 '
                      'encoder uses gated-gelu')
    checks = dict(vocab_size='vocab_size', dim='d_model', num_heads='num_heads',
                  head_dim='d_kv', ffn_dim='d_ff', num_layers='num_layers',
                  num_buckets='relative_attention_num_buckets')
    for ours, theirs in checks.items():
      if config_number(side, theirs, side_path, int) not in (None, fields[ours]):
        raise PortError(f'{side_path}: says {theirs}={side[theirs]}, the tensors give {fields[ours]}')
    fields['max_distance'] = config_number(side, 'relative_attention_max_distance', side_path,
                                           int, 128)
    fields['eps'] = config_number(side, 'layer_norm_epsilon', side_path, float, 1e-6)
  return UMT5Config.from_dict(dict(fields, param_dtype=dtype, compute_dtype=dtype))


def convert(source: TensorSource, *, side_config: str | None = None, dtype: str = 'bfloat16',
            log=None, finalize=None):
  """A umT5 encoder checkpoint (Wan or transformers names) -> (UMT5Config, nested params)."""
  from flax import nnx
  from kvjax.model import as_dtype
  from kvjax.text import umt5
  side = read_json(side_config) if side_config else {}
  src = as_original(source)
  cfg = infer_config(src, side, side_config or '', dtype)
  if log:
    log(f'{source.path}: umT5 encoder dim={cfg.dim} layers={cfg.num_layers} heads={cfg.num_heads} '
        f'vocab={cfg.vocab_size} ({len(src)} tensors) -> {dtype}')
  expected = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: umt5.UMT5Encoder(cfg, rngs=nnx.Rngs(0)))))
  params = engine.convert(src, TABLE, expected, dtype=as_dtype(dtype),
                          finalize=finalize)
  return cfg, params


def params_to_original(params: Mapping) -> dict:
  return engine.invert(TABLE, params)
