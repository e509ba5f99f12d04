"""Text conditioning: the umT5 encoder in Flax and its tokenizer.

``TextEncoder.encode(prompts)`` returns the [B, text_len, dim] states the DiT consumes (rows past
each prompt's length zeroed), computed once per prompt; ``free()`` deletes the encoder's weights
from device memory (11.4 GB in bf16 at full size) before the DiT runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.text import tokenizer as tokenizer_lib
from kvjax.text.umt5 import UMT5Config, UMT5Encoder, count_params, relative_buckets

FORMAT = 'kvjax.umt5.v1'
TEXT_LEN = 512

__all__ = ['FORMAT', 'TEXT_LEN', 'TextEncoder', 'UMT5Config', 'UMT5Encoder', 'abstract_params',
           'count_params', 'graphdef', 'init_params', 'relative_buckets', 'tokenizer_lib']


def abstract_params(cfg: UMT5Config) -> nnx.State:
  return nnx.state(nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0))))


def graphdef(cfg: UMT5Config):
  return nnx.graphdef(nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0))))


def init_params(cfg: UMT5Config, seed: int = 0) -> nnx.State:
  return jax.jit(lambda k: nnx.state(UMT5Encoder(cfg, rngs=nnx.Rngs(k))))(jax.random.key(seed))


@functools.lru_cache(maxsize=8)
def _encode_fn(gdef):
  return jax.jit(lambda params, ids, mask: nnx.merge(gdef, params)(ids, mask))


class TextEncoder:
  """The umT5 encoder with its tokenizer.

  Attributes:
    cfg: UMT5Config; params: nnx.State on device; tokenizer: a transformers tokenizer;
    text_len: tokens per prompt (512 for Wan).
  """

  def __init__(self, cfg: UMT5Config, params: nnx.State, tokenizer, text_len: int = TEXT_LEN):
    self.cfg, self.params, self.tokenizer, self.text_len = cfg, params, tokenizer, text_len
    self._fn = _encode_fn(graphdef(cfg))

  def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return tokenizer_lib.tokenize(self.tokenizer, list(prompts), self.text_len)

  def encode_ids(self, ids, mask) -> np.ndarray:
    """ids, mask [B, L] -> states [B, L, dim] float32 (padded rows zero)."""
    if self.params is None:
      raise RuntimeError('the text encoder was freed')
    if int(np.max(ids)) >= self.cfg.vocab_size:
      raise ValueError(f'token id {int(np.max(ids))} >= vocab size {self.cfg.vocab_size} '
                       '(tokenizer and encoder do not match)')
    return np.asarray(self._fn(self.params, jnp.asarray(ids, jnp.int32),
                               jnp.asarray(mask, jnp.int32)))

  def encode(self, prompts: list[str]) -> np.ndarray:
    """Prompts -> [B, text_len, dim] float32 text states."""
    ids, mask = self.tokenize(prompts)
    return self.encode_ids(ids, mask)

  def free(self) -> None:
    """Deletes the encoder's parameters from device memory."""
    if self.params is not None:
      for leaf in jax.tree.leaves(self.params):
        if isinstance(leaf, jax.Array):
          leaf.delete()
    self.params = None
