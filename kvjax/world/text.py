"""The world's text encoder: caption words -> the text states the DiT cross-attends to.

Tokens are whole words of the world's caption grammar (``scene.VOCAB``), id 0 is padding; a
caption is parsed first (``scene.parse``), so an unknown word or a sentence outside the grammar
is a one-line ``CaptionError`` listing the vocabulary before anything runs. The encoder is
learned embeddings plus learned positions and a few pre-LayerNorm bidirectional transformer
layers, trained jointly with the DiT (``launch/train_tiny.py``). It stands in for umT5: its
output has the DiT's text shape [B, text_len, text_dim], padded rows zeroed as Wan's are.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.configlib import FrozenConfig
from kvjax.model.layers import Dense, LayerNorm, f32, gelu_tanh
from kvjax.world import scene

PAD = 0


@dataclasses.dataclass(frozen=True)
class CaptionEncoderConfig(FrozenConfig):
  """vocab_size: words + 1 (padding); text_len: tokens per caption; dim: width (= the DiT's
  text_dim); num_layers / num_heads / ffn_dim: the transformer."""
  _what = 'caption encoder config'

  vocab_size: int = len(scene.VOCAB) + 1
  text_len: int = 16
  dim: int = 32
  num_layers: int = 2
  num_heads: int = 2
  ffn_dim: int = 64
  eps: float = 1e-6

  def __post_init__(self):
    if self.dim % self.num_heads:
      raise ValueError(f'caption encoder dim {self.dim} not divisible by heads {self.num_heads}')
    if self.vocab_size != len(scene.VOCAB) + 1:
      raise ValueError(f'caption encoder vocab_size {self.vocab_size} != the grammar\'s '
                       f'{len(scene.VOCAB)} words + padding')


def tokenize(prompts: list[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts -> ids, mask [B, text_len] int32; each prompt is parsed (CaptionError on a word or
  sentence outside the grammar) and must fit ``text_len`` words."""
  index = {w: i + 1 for i, w in enumerate(scene.VOCAB)}
  ids = np.zeros((len(prompts), text_len), np.int32)
  for b, text in enumerate(prompts):
    scene.parse(text)
    words = text.lower().strip().rstrip('.').split()
    if len(words) > text_len:
      raise scene.CaptionError(f'caption has {len(words)} words; the encoder takes at most '
                               f'{text_len}: {text!r}')
    ids[b, :len(words)] = [index[w] for w in words]
  return ids, (ids != PAD).astype(np.int32)


class EncoderLayer(nnx.Module):
  """Pre-LN self-attention (padding keys masked) and a GELU-tanh MLP, residual, float32 norms."""

  def __init__(self, cfg: CaptionEncoderConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=f32, param_dtype=f32, rngs=rngs)
    d = cfg.dim
    self.cfg = cfg
    self.norm1 = LayerNorm(d, eps=cfg.eps, dtype=f32, param_dtype=f32)
    self.qkv = Dense(d, 3 * d, **kw)
    self.o = Dense(d, d, **kw)
    self.norm2 = LayerNorm(d, eps=cfg.eps, dtype=f32, param_dtype=f32)
    self.fc1 = Dense(d, cfg.ffn_dim, **kw)
    self.fc2 = Dense(cfg.ffn_dim, d, **kw)

  def __call__(self, x, mask):
    """x [B, L, D] float32, mask [B, L] -> [B, L, D]."""
    b, ln, d = x.shape
    n = self.cfg.num_heads
    q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, ln, 3 * n, d // n), 3, axis=2)
    s = jnp.einsum('BTNH,BSNH->BNTS', q, k) / np.sqrt(d // n)
    s = jnp.where(mask[:, None, None, :] > 0, s, -1e30)
    a = jnp.einsum('BNTS,BSNH->BTNH', jax.nn.softmax(s, axis=-1), v)
    x = x + self.o(a.reshape(b, ln, d))
    return x + self.fc2(gelu_tanh(self.fc1(self.norm2(x))))


class CaptionEncoder(nnx.Module):
  """ids, mask [B, L] -> text states [B, L, dim] float32 (padding rows zero)."""

  def __init__(self, cfg: CaptionEncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = jax.nn.initializers.normal(1.0)
    self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.dim), f32))
    self.pos = nnx.Param(init(rngs.params(), (cfg.text_len, cfg.dim), f32))   # as strong as words

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(r):
      return EncoderLayer(cfg, rngs=r)

    self.layers = make_layers(rngs)     # stacked on a leading layer axis, scanned as the DiT's
    self.norm = LayerNorm(cfg.dim, eps=cfg.eps, dtype=f32, param_dtype=f32)

  def __call__(self, ids, mask):
    x = self.embed[...][ids] + self.pos[...][None, :ids.shape[1]]
    gdef, state = nnx.split(self.layers)
    x, _ = jax.lax.scan(lambda h, st: (nnx.merge(gdef, st)(h, mask), None), x, state)
    return self.norm(x) * mask[..., None].astype(f32)


def init_params(cfg: CaptionEncoderConfig, seed: int = 0) -> nnx.State:
  return nnx.state(CaptionEncoder(cfg, rngs=nnx.Rngs(seed)))


def graphdef(cfg: CaptionEncoderConfig):
  return nnx.graphdef(nnx.eval_shape(lambda: CaptionEncoder(cfg, rngs=nnx.Rngs(0))))


def abstract_params(cfg: CaptionEncoderConfig) -> nnx.State:
  return nnx.state(nnx.eval_shape(lambda: CaptionEncoder(cfg, rngs=nnx.Rngs(0))))


@functools.lru_cache(maxsize=4)
def _encode_fn(gdef):
  return jax.jit(lambda params, ids, mask: nnx.merge(gdef, params)(ids, mask))


def encode(cfg: CaptionEncoderConfig, params: nnx.State, prompts: list[str]) -> np.ndarray:
  """Prompts -> [B, text_len, dim] float32 text states (CaptionError before any work)."""
  ids, mask = tokenize(prompts, cfg.text_len)
  return np.asarray(_encode_fn(graphdef(cfg))(params, jnp.asarray(ids), jnp.asarray(mask)))
