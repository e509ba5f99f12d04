"""The cache-method protocol and the frame ring buffer all methods share.

Storage layout and capacity. The cache holds *history* only: the current block always attends to
its own K/V exactly (dense, in the compute dtype) and the two partial attentions are merged by
log-sum-exp. A block may see ``window_frames`` frames, its own ``block_frames`` included, so the
cache needs ``capacity_frames = window_frames - block_frames`` frame slots. Slots
``[0, sink_frames)`` hold the first frames forever; the rest is a ring: frame f >= sink lives in
slot ``sink + (f - sink) mod (capacity - sink)``. Softmax attention is order-free and keys are
stored already rotated (absolute RoPE positions), so a ring is output-equivalent to Self-Forcing's
roll-and-shift eviction. Slots fill in order, so the valid slots are always the prefix
``[0, min(frames_written, capacity))``; attention walks exactly those, one frame slot a chunk.
A frame (1,560 tokens at 480x832) is the unit of storage, eviction and of the attention walk.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import kernels


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Static description of a KV cache (hashable: usable as a static jit argument).

  Attributes:
    batch, num_layers, num_heads, head_dim: cache geometry ([L, B, ..., N, H]).
    frame_tokens: tokens per latent frame P (1,560 at 480x832).
    block_frames: latent frames per generation block (3).
    window_frames: frames visible to a block, its own included (>= block_frames).
    sink_frames: first frames never evicted.
    dtype: dtype of unquantized K/V (the compute dtype).
    total_frames: latent frames of the whole rollout (0 = unknown); methods whose definition
      refers to the study's whole-video buffer (positional tiers, buffer-wide statistics) need it.
    rope: the model's RoPE over one frame's token grid (``kernels.rope.RopeGrid``), or None;
      methods that store pre-RoPE keys (``CacheMethod.pre_rope_keys``) need it to read them.
  """
  batch: int
  num_layers: int
  num_heads: int
  head_dim: int
  frame_tokens: int
  block_frames: int
  window_frames: int
  sink_frames: int = 0
  dtype: Any = jnp.bfloat16
  total_frames: int = 0
  rope: Any = None

  def __post_init__(self):
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype))
    for f in ('batch', 'num_layers', 'num_heads', 'head_dim', 'frame_tokens', 'block_frames'):
      if int(getattr(self, f)) < 1:
        raise ValueError(f'CacheSpec.{f} must be >= 1 (got {getattr(self, f)})')
    if self.window_frames < self.block_frames:
      raise ValueError(f'window_frames={self.window_frames} is smaller than a block '
                       f'({self.block_frames} frames): a block must at least see itself')
    if self.total_frames < 0:
      raise ValueError(f'total_frames must be >= 0 (got {self.total_frames})')
    if self.rope is not None and self.rope.frame_tokens != self.frame_tokens:
      raise ValueError(f'CacheSpec.rope grid {self.rope.height}x{self.rope.width} does not hold '
                       f'frame_tokens={self.frame_tokens}')
    if self.sink_frames < 0:
      raise ValueError(f'sink_frames must be >= 0 (got {self.sink_frames})')
    if self.sink_frames and self.sink_frames >= self.capacity_frames:
      raise ValueError(
          f'sink_frames={self.sink_frames} leaves no rolling history: need sink_frames < '
          f'window_frames - block_frames = {self.capacity_frames}')

  def require_rope(self, who: str):
    if self.rope is None:
      raise ValueError(f'{who} stores pre-RoPE keys and needs CacheSpec.rope (the frame grid)')
    return self.rope

  def require_total_frames(self, who: str) -> int:
    if self.total_frames <= 0:
      raise ValueError(f'{who} needs CacheSpec.total_frames (the rollout length in latent frames)')
    return self.total_frames

  @property
  def capacity_frames(self) -> int:
    """History frame slots: the window minus the block's own frames."""
    return self.window_frames - self.block_frames

  @property
  def capacity_tokens(self) -> int:
    return self.capacity_frames * self.frame_tokens

  @property
  def block_tokens(self) -> int:
    return self.block_frames * self.frame_tokens

  def bf16_bytes(self) -> int:
    """Bytes of a BF16 K+V cache holding the same history tokens (the compression numerator)."""
    return (2 * 2 * self.num_layers * self.batch * self.capacity_tokens * self.num_heads
            * self.head_dim)


CADENCES = ('once', 'per_block', 'every_call')


class AppendInfo(NamedTuple):
  """What the sampler tells a method when a block's clean K/V are appended.

  start_frame: int32 absolute index of the block's first latent frame. Methods derive write
    positions from it (never from their own counters) so that the model can order the write
    after the layer's attention (see ``ordered_after``) and a repeated context pass of the same
    block overwrites the same slots, as Self-Forcing does.
  """
  start_frame: jax.Array


def ordered_after(index, token):
  """``index`` (int32) unchanged, but data-dependent on the float scalar ``token``.

  The context pass appends a block's K/V, which depend only on pre-attention activations, to
  the cache that the same layer's attention reads. Without a data dependency XLA may schedule
  the in-place write before the attention loop and then has to copy the whole cache to keep
  the read correct (seen on CPU: two full copies per layer). Making the write position depend
  on the layer's output orders the write after the read. min(i, i + isnan(t)) == i always,
  which XLA cannot prove, so the dependency survives optimization.
  """
  index = jnp.asarray(index, jnp.int32)
  return jnp.minimum(index, index + (token != token).astype(jnp.int32))


def frame_slot(frame, spec: CacheSpec):
  """Ring slot of absolute frame index ``frame`` (int or int32 array)."""
  rolling = spec.capacity_frames - spec.sink_frames
  return jnp.where(frame < spec.sink_frames, frame,
                   spec.sink_frames + (frame - spec.sink_frames) % rolling)


def tree_nbytes(tree) -> int:
  """Sum of the bytes of every array (or ShapeDtypeStruct) leaf of a pytree."""
  return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class CacheMethod:
  """Base class of cache methods: frozen (hashable) objects built by ``kvjax.cache.get``.

  Subclasses define the class attributes ``name`` (the paper name), ``aliases`` and
  ``family``, and the methods below. A state is a pytree whose arrays have a leading layer axis;
  it carries its CacheSpec as static pytree metadata.

  Everything a caller (sampler, launcher) asks of a method is declared here with a default, so
  callers never probe for attributes or compare names:

  - ``in_study``: the method is a row of the study's tables (``registry.study_names()`` lists
    the registered ones in registration order, which is the tables' order).
  - ``beyond_study``: a method published after the study (QVG), listed and tabled apart.
  - ``is_reference``: the method's rollout *is* the exact BF16 reference, so the launcher runs
    no separate reference rollout for it (True for BF16 only; a subclass that changes the
    rollout, e.g. FLOWCACHE_NATIVE's step reuse, sets it back to False).
  - ``build(**params)``: how ``kvcache.get`` constructs the method from its parameters.
  - ``step_reuse_threshold``: > 0 makes the sampler skip (reuse) denoising steps.
  - ``cadence`` / ``recode(state, layer, k, v, info)``: how often the stored history is
    re-encoded from its own reconstruction (the study's hook re-quantized its whole buffer after
    the attention of every DiT call, or once a block for its REFRESH names); kvjax's fix,
    encoding each token once, is ``'once'``.
  - ``artifacts(state)``: extra files the launcher writes beside result.json;
    ``counters(state)``: event counts it writes into result.json (``method_counters``).
  - ``pre_rope_keys``: the model appends keys *before* RoPE (its sources rotate on read).
  - ``storage(state)``: a breakdown of the stored bytes for ``--plan`` (QVG's packed spans).
  - ``FIXES`` / ``fixed()``: the parameters that replace the study's behaviour (each paper
    name's default) by kvjax's corrections, and the method with all of them applied
    (``launch/bench_methods.py --modes=study,fixed`` measures what the study's bugs cost).
  """
  name: ClassVar[str] = ''
  aliases: ClassVar[tuple[str, ...]] = ()
  family: ClassVar[str] = ''
  description: ClassVar[str] = ''
  in_study: ClassVar[bool] = True
  beyond_study: ClassVar[bool] = False
  is_reference: ClassVar[bool] = False
  FIXES: ClassVar[dict[str, Any]] = {}

  @classmethod
  def build(cls, **params: Any) -> CacheMethod:
    """The method with these (already name-checked) parameters; ``kvcache.get`` calls it.

    The default is ``cls(**params)``. A class whose parameters select a different storage
    engine returns an instance of that engine's class instead (AGE_TIER's ``recency='age'``).
    """
    return cls(**params)

  def fixed(self) -> CacheMethod:
    """This method with kvjax's corrections (``FIXES``) over its current parameters."""
    return type(self).build(**{**self.params(), **self.FIXES})

  @property
  def step_reuse_threshold(self) -> float:
    """> 0: the sampler skips a denoising step and reuses the last flow prediction while the
    accumulated input change stays below this (FLOWCACHE_NATIVE; ``kvjax.sampler.rollout``).
    0 (the default): every step is computed."""
    return 0.0

  @property
  def cadence(self) -> str:
    """When the stored history is re-encoded from its reconstruction (``CADENCES``):

    - ``'once'`` (the default): every token is encoded once, when its block is appended;
    - ``'per_block'``: the model calls ``recode`` at every layer of the clean context pass, after
      the layer's attention and before the block is appended (the study's REFRESH names);
    - ``'every_call'``: at every layer of every DiT call, the four noisy ones included (the study's
      Gen A/B/C hook: dequantize, write, attend, re-quantize the whole cache). Denoising calls
      then return the cache too (donated), so the sampler threads it through them.
    """
    return 'once'

  def recode(self, state, layer, k, v, info: AppendInfo):
    """Re-encodes the layer's stored history (frames before ``info.start_frame``) from its own
    reconstruction, after the layer's attention of a call, as the study's hook did.

    Args:
      state: the cache state; layer: int32 layer index (may be traced).
      k, v: [B, block_frames * frame_tokens, N, H] this call's K/V of the block being generated
        (noisy on denoising calls, clean on the context pass): what the study's buffer held at
        the block's slots when it re-quantized (methods with buffer-wide statistics use them).
      info: the call's AppendInfo (its ``start_frame`` is the block's first frame).
    Returns:
      The new state. The default (cadence ``'once'``) returns it unchanged.
    """
    return state

  @property
  def pre_rope_keys(self) -> bool:
    """True: ``append`` receives keys *before* the rotary embedding, and the method's sources
    carry ``positions`` and ``rope`` so that readers rotate each chunk (QVG's ``rope='pre'``).
    False (the default): keys arrive rotated to their absolute positions."""
    return False

  def storage(self, state) -> dict[str, Any]:
    """Named parts of the stored bytes (JSON-able) for ``--plan``; none by default."""
    return {}

  def counters(self, state) -> dict[str, int]:
    """Event counts of the rollout for result.json (QAQ's outliers clamped for lack of
    capacity); none by default."""
    return {}

  def artifacts(self, state) -> dict[str, Any]:
    """Extra JSON files for the result directory, ``{file name: JSON-able object}``, computed
    from the final cache state (FLOWCACHE_PROFILE's ``budget_table.json``); none by default."""
    return {}

  def init(self, spec: CacheSpec):
    raise NotImplementedError

  def append(self, state, layer, k, v, info: AppendInfo):
    """Stores the clean, rotated K/V of one block at ``layer``.

    Args:
      state: the cache state; layer: int32 layer index (may be traced).
      k, v: [B, block_frames * frame_tokens, N, H].
    Returns:
      The new state (same structure and shapes).
    """
    raise NotImplementedError

  def sources(self, state, layer) -> list[kernels.Source]:
    """What attention reads of the layer's history: kernel sources (``kvjax/kernels/source.py``),
    each a pytree of record arrays plus their static formats; an empty list when nothing is
    stored. (Readers decode chunks to the query's dtype.)
    """
    raise NotImplementedError

  def attend(self, state, layer, q, impl: str = 'auto'):
    """Attention of q [B, T, N, H] over the layer's history -> (out [B, T, N, H], lse [B, N, T]).

    The model does not call this: it passes ``sources`` together with the block's own K/V to
    ``kernels.attention`` (one dispatch, one log-sum-exp merge).
    """
    return kernels.attention(q, self.sources(state, layer), impl=impl)

  def materialize(self, state, layer):
    """Reference/debug only: what attention sees, expanded (every source, un-rotated).

    Returns:
      k, v: [B, S, N, H] float32, bias: [B, S] float32 (-inf for empty slots).
    """
    parts = [self.expand_source(src, state.spec) for src in self.sources(state, layer)]
    if not parts:
      spec = state.spec
      z = jnp.zeros((spec.batch, 0, spec.num_heads, spec.head_dim), jnp.float32)
      return z, z, jnp.zeros((spec.batch, 0), jnp.float32)
    return tuple(jnp.concatenate(x, 1) for x in zip(*parts))

  def expand_source(self, src: kernels.Source, spec: CacheSpec):
    """``materialize`` of one source: its chunks decoded (k, v [B, S, N, H], bias [B, S]).

    A method whose source tokens stand for several tokens (FlowCache's summaries) expands them.
    """
    return kernels.materialize_source(src)

  def nbytes(self, state) -> int:
    """Bytes of every array of the state (realized storage, never a formula)."""
    return tree_nbytes(state)

  def slot_counts(self, spec: CacheSpec) -> tuple[int, ...]:
    """Frame-slot counts of the state's stores (for the full-copy audit of compiled steps)."""
    return (spec.capacity_frames,)

  def params(self) -> dict[str, Any]:
    """The method's parameters (overridable through ``kvjax.cache.get(name, **overrides)``)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
