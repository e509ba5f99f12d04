"""Quantizer primitives and codecs: closed-form bounds, packing bit-exactness, the study's quirks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.cache import codecs as C
from kvjax import numerics
from kvjax.cache import quant
from kvjax.kernels import packing


def _x(shape, seed=0, offset=0.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) + offset)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 5), width=st.sampled_from([8, 16, 32, 128]),
       seed=st.integers(0, 10**6))
def test_pack_roundtrip_bit_exact(bits, rows, width, seed):
  codes = np.random.default_rng(seed).integers(0, 2**bits, (rows, width)).astype(np.uint8)
  packed = packing.pack(jnp.asarray(codes), bits)
  assert packed.dtype == jnp.uint8 and packed.shape == (rows, width * bits // 8)
  np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits)), codes)


def test_pack_layout_is_documented_one():
  """INT4: byte j = channel j (low nibble) | channel j + H/2 (high nibble)."""
  codes = jnp.asarray(np.arange(8, dtype=np.uint8) % 16)[None]
  packed = np.asarray(packing.pack(codes, 4))[0]
  assert packed.tolist() == [0 | 4 << 4, 1 | 5 << 4, 2 | 6 << 4, 3 | 7 << 4]


def test_bad_bits_and_groups():
  with pytest.raises(ValueError, match=r'valid bit widths: \[2, 4, 8\]'):
    packing.check_bits(3)
  with pytest.raises(ValueError, match='group size'):
    C.SymRTN(4, 0)
  with pytest.raises(ValueError, match='dequant_dtype'):
    C.SymRTN(4, 16, 'float64')


@pytest.mark.parametrize('p,g', [(1560, 16), (40, 16), (20, 16), (16, 16), (7, 16), (33, 8)])
def test_group_layout_last_group_absorbs_remainder(p, g):
  sizes = quant.group_sizes(p, g)
  assert sizes.sum() == p and len(sizes) == max(1, p // g)
  assert np.all(sizes[:-1] == g) and g <= sizes[-1] < 2 * g or p < g
  x = _x((1, 2, p, 1, 3))
  m = quant.group_reduce(jnp.abs(x), g, jnp.max)
  ends = np.cumsum(sizes)
  for i, (a, b) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
    np.testing.assert_allclose(m[:, :, i], np.abs(np.asarray(x))[:, :, a:b].max(axis=2))
  assert quant.expand_groups(m, p, g).shape == x.shape


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_rtn_error_bound_and_levels(bits):
  x = _x((2, 3, 40, 2, 8), 1) * 3
  c = C.SymRTN(bits, 16)
  rec = c.encode(x)
  y = c.decode(rec, jnp.float32)
  scale = quant.expand_groups(np.asarray(jax.lax.bitcast_convert_type(rec['scale'], jnp.float16),
                                         np.float32), 40, 16)
  # |x - deq| <= scale / 2, up to the fp16 rounding of the stored scale (|q| <= qmax).
  qmax = 2 ** (bits - 1) - 1
  bound = scale / 2 + qmax * scale * 2.0**-10
  assert np.all(np.abs(np.asarray(y) - np.asarray(x)) <= bound + 1e-7)
  levels = np.unique(np.round(np.asarray(y) / scale))
  assert levels.min() >= -qmax and levels.max() <= qmax       # INT2 is ternary {-1, 0, 1}
  if bits == 2:
    assert set(levels.tolist()) <= {-1.0, 0.0, 1.0}


def test_rtn_is_idempotent_in_float32():
  x = _x((1, 2, 40, 2, 8), 2)
  c = C.SymRTN(4, 16)
  r1 = c.encode(x)
  r2 = c.encode(c.decode(r1, jnp.float32))
  for k in r1:
    np.testing.assert_array_equal(np.asarray(r1[k]), np.asarray(r2[k]))


def test_asym_clamped_zero_point_saturates_one_signed_groups():
  """The study's defect (section 2.3): a group in [5, 6] comes back near max - min ~ 1."""
  x = jnp.linspace(5.0, 6.0, 16, dtype=jnp.float32).reshape(1, 1, 16, 1, 1)
  x = jnp.broadcast_to(x, (1, 1, 16, 1, 8))
  paper = C.AsymGroup(4, 16, clamp_zero_point=True)
  fixed = C.AsymGroup(4, 16, clamp_zero_point=False)
  y_paper = np.asarray(paper.decode(paper.encode(x), jnp.float32))
  y_fixed = np.asarray(fixed.decode(fixed.encode(x), jnp.float32))
  assert abs(y_paper.mean() - 1.0) < 0.1                # saturated near qmax * scale = 1
  scale = 1.0 / 15
  assert np.max(np.abs(y_fixed - np.asarray(x))) <= scale / 2 + 1e-2


def test_asym_bound_on_zero_crossing_groups():
  x = _x((1, 2, 40, 2, 8), 3)
  for c in (C.AsymGroup(4, 16), C.AsymToken(4)):
    rec = c.encode(x)
    y = c.decode(rec, jnp.float32)
    rng = (np.asarray(jnp.max(x)) - np.asarray(jnp.min(x)))
    assert np.max(np.abs(np.asarray(y) - np.asarray(x))) <= rng / 15 / 2 + 1e-2


def test_fwht_is_the_normalized_hadamard_and_involutory():
  x = _x((3, 128), 4)
  h = numerics.hadamard_matrix(128)
  np.testing.assert_allclose(np.asarray(numerics.fwht(x, jnp.float32)), np.asarray(x) @ h, atol=1e-5)
  np.testing.assert_allclose(np.asarray(numerics.fwht(numerics.fwht(x, jnp.float32), jnp.float32)),
                             np.asarray(x), atol=1e-5)
  with pytest.raises(ValueError, match='power of two'):
    numerics.fwht(jnp.ones((2, 96)))


def test_prq_residual_beats_base():
  x = _x((1, 2, 40, 2, 8), 5)
  base = C.SymRTN(2, 16, 'float32')
  prq = C.PRQ(2, 4, 16)
  e_base = np.abs(np.asarray(base.decode(base.encode(x), jnp.float32) - x)).max()
  e_prq = np.abs(np.asarray(prq.decode(prq.encode(x), jnp.float32) - x)).max()
  assert e_prq < e_base / 4


def test_outliers_kept_exactly_and_capacity_counted():
  x = np.array(_x((1, 1, 40, 2, 8), 6))
  x[0, 0, 3, 1, 2] = 50.0
  x[0, 0, 30, 0, 7] = -40.0
  c = C.Outliers(C.AsymGroup(4, 16), threshold=6.0, capacity_ratio=0.002, clip=True)
  assert c.capacity(40, 2, 8) == 2
  rec = c.encode(jnp.asarray(x), {'sigma': jnp.float32(1.0)})
  y = np.asarray(c.decode(rec, jnp.float32))
  assert y[0, 0, 3, 1, 2] == 50.0 and y[0, 0, 30, 0, 7] == -40.0
  assert int(rec['dropped'][0, 0]) == 0
  x[0, 0, 10, 0, 0] = 30.0                              # a third outlier: over capacity
  rec = c.encode(jnp.asarray(x), {'sigma': jnp.float32(1.0)})
  assert int(rec['dropped'][0, 0]) == 1
  y = np.asarray(c.decode(rec, jnp.float32))
  assert y[0, 0, 3, 1, 2] == 50.0 and abs(y[0, 0, 10, 0, 0]) <= 6.5    # clipped, not kept


def test_record_bytes_match_the_accounting():
  """Per frame of 1,560 tokens and one channel: INT4 codes 780 B + 97 fp16 scales (4 channels)."""
  p, n, h = 1560, 1, 4
  assert C.SymRTN(4).record_bytes(p, n, h) == 4 * (780 + 97 * 2)
  assert C.SymRTN(2).record_bytes(p, n, h) == 4 * (390 + 97 * 2)
  assert C.PRQ(4, 4).record_bytes(p, n, h) == 4 * 2 * (780 + 97 * 2)
  # 1560 * 2 B of BF16 per channel over (780 + 194) B: at least the nominal 3.2x.
  assert 2 * 1560 / (780 + 194) >= 3.2


def test_integer_bf16_rounding_equals_astype():
  """round_bf16 / cast (integer ops) give exactly astype's round-to-nearest-even bf16 values."""
  rng = np.random.default_rng(7)
  bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
  x = bits.view(np.float32)
  x = x[np.isfinite(x) & (np.abs(x) < 3.0e38)]           # finite, away from the overflow edge
  ties = (np.arange(1, 1000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exact halfway
  x = jnp.asarray(np.concatenate([x, ties, -ties, np.float32([0.0, -0.0, 1e-40, -1e-40])]))
  want = x.astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(numerics.round_bf16(x)), np.asarray(want.astype(jnp.float32)))
  got = numerics.cast(x, jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got.view(jnp.uint16)), np.asarray(want.view(jnp.uint16)))
  nans = np.uint32([0x7F800001, 0xFF800001, 0x7FC00000, 0xFFC00000, 0x7F80FFFF]).view(np.float32)
  assert np.all(np.isnan(np.asarray(numerics.round_bf16(jnp.asarray(nans)))))
  assert np.all(np.isnan(np.asarray(numerics.cast(jnp.asarray(nans), jnp.bfloat16), np.float32)))
  truncated = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32)
  assert np.any(np.asarray(truncated) != np.asarray(want.astype(jnp.float32)))   # control
