"""The study's cache hook, emulated call by call in PyTorch, against kvjax's cadences.

The study's hook (spec 5.2-5.3): on every DiT call of a block (4 noisy + the clean context pass)
it rebuilt its BF16 buffer from the quantized state, wrote the call's block K/V into the block's
slots, attended (history = the rebuilt buffer before the block), and re-quantized the whole
buffer (Gen A/C, and Gen B's per-step names) — or, for the _REFRESH names, only on the clean
pass. The emulation uses the study's quantizer classes (``study_ref``) on the whole buffer; kvjax
runs its method's ``recode`` / ``append`` as the model does per layer. What attention reads of
the history must agree element by element on every call (frames of 32 tokens, so the study's
16-token grid over the buffer and kvjax's per-frame groups coincide). A one-signed key channel
makes the clamped zero-point saturate, so a cadence one encode off is caught; ``requantize=once``
is the negative control.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.cache.base import AppendInfo, CacheSpec
from tests.conftest import HAS_TORCH

torch = pytest.importorskip('torch') if HAS_TORCH else None
if HAS_TORCH:
  from tests.cache import study_ref as S

pytestmark = pytest.mark.skipif(not HAS_TORCH, reason='needs the torch extra')

P, BF, BLOCKS, H, D = 32, 3, 4, 2, 16
SPEC = CacheSpec(batch=1, num_layers=1, num_heads=H, head_dim=D, frame_tokens=P, block_frames=BF,
                 window_frames=BF * BLOCKS, total_frames=BF * BLOCKS, dtype=jnp.bfloat16)


def _study_quantizer(name):
  """(keys fn, values fn) of the study's class for ``name``, one call on a [B, L, H, D] buffer."""
  return {
      'KIVI_INT4': (lambda x: S.kivi_keys(x, 4), lambda x: S.kivi_values(x, 4)),
      'KIVI_INT2': (lambda x: S.kivi_keys(x, 2), lambda x: S.kivi_values(x, 2)),
      'KIVI_INT4_REFRESH': (lambda x: S.kivi_keys(x, 4, None), lambda x: S.kivi_values(x, 4, None)),
      'RTN_INT2': (lambda x: S.rtn(x, 2), lambda x: S.rtn(x, 2)),
  }[name]


def _calls(seed=0):
  """Per block: 4 noisy (k, v) pairs then the clean one, bf16 [1, BF*P, H, D]; a one-signed key
  channel (head 0, channel 3) saturates KIVI's clamped zero-point."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(BLOCKS):
    calls = []
    for c in range(5):
      k = rng.standard_normal((1, BF * P, H, D)).astype(np.float32)
      k[:, :, 0, 3] = rng.uniform(5.0, 6.0, BF * P)
      v = rng.standard_normal((1, BF * P, H, D)).astype(np.float32)
      calls.append((torch.tensor(k).to(torch.bfloat16), torch.tensor(v).to(torch.bfloat16)))
    out.append(calls)
  return out


def _study_reads(name, per_block: bool):
  """What the study's attention read of the history on every call: list of [1, S, H, D] f32."""
  qk, qv = _study_quantizer(name)
  total = BF * BLOCKS * P
  buf_k = torch.zeros((1, total, H, D), dtype=torch.bfloat16)
  buf_v = torch.zeros_like(buf_k)
  reads = []
  for b, calls in enumerate(_calls()):
    lo, hi = b * BF * P, (b + 1) * BF * P
    for c, (k, v) in enumerate(calls):
      buf_k[:, lo:hi], buf_v[:, lo:hi] = k, v            # write the call's block
      reads.append((buf_k[:, :lo].float().numpy(), buf_v[:, :lo].float().numpy()))
      if not per_block or c == 4:                          # re-quantize the whole buffer
        buf_k, buf_v = S.cache_write(qk(buf_k)), S.cache_write(qv(buf_v))
  return reads


def _kvjax_reads(method):
  """The same through kvjax: the model calls recode after attention (cadence) and append on the
  clean pass; attention reads ``materialize`` (cast to the bf16 the study's buffer holds)."""
  st = method.init(SPEC)
  reads = []
  recode = method.cadence
  mat = jax.jit(method.materialize, static_argnums=1)
  rec, app = jax.jit(method.recode), jax.jit(method.append)
  for b, calls in enumerate(_calls()):
    info = AppendInfo(jnp.int32(b * BF))
    for c, (k, v) in enumerate(calls):
      kk, vv, _ = mat(st, 0)
      n = b * BF * P
      reads.append((np.asarray(kk[:, :n].astype(jnp.bfloat16), np.float32),
                    np.asarray(vv[:, :n].astype(jnp.bfloat16), np.float32)))
      kj = jnp.asarray(k.float().numpy(), jnp.bfloat16)
      vj = jnp.asarray(v.float().numpy(), jnp.bfloat16)
      if recode == 'every_call' or (recode == 'per_block' and c == 4):
        st = rec(st, jnp.int32(0), kj, vj, info)
      if c == 4:
        st = app(st, jnp.int32(0), kj, vj, info)
  return reads


def _mismatch(a_reads, b_reads):
  """Largest fraction of differing elements over the calls."""
  worst = 0.0
  for (ak, av), (bk, bv) in zip(a_reads, b_reads):
    if ak.size:
      worst = max(worst, float(np.mean(ak != bk)), float(np.mean(av != bv)))
  return worst


@pytest.mark.parametrize('name', ['KIVI_INT4', 'KIVI_INT2', 'RTN_INT2'])
def test_every_call_reads_what_the_studys_hook_read(name):
  study = _study_reads(name, per_block=False)
  assert _mismatch(_kvjax_reads(kvcache.get(name)), study) < 1e-3
  if name.startswith('KIVI'):                               # control: kvjax's quantize-once
    assert _mismatch(_kvjax_reads(kvcache.get(name, requantize='once')), study) > 5e-3


def test_refresh_reads_what_the_studys_refresh_only_hook_read():
  name = 'KIVI_INT4_REFRESH'
  study = _study_reads(name, per_block=True)
  assert _mismatch(_kvjax_reads(kvcache.get(name)), study) < 1e-3
  # Controls: re-encoding on every call, or never, reads something else.
  assert _mismatch(_kvjax_reads(kvcache.get(name, requantize='every_call')), study) > 5e-3
  assert _mismatch(_kvjax_reads(kvcache.get(name, requantize='once')), study) > 5e-3
