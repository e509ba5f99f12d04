"""QVG (Quant VideoGen): the QVG specification's test cases (two clusters, k-means semantics,
quantizer idempotence, grid exactness, zero groups, packing, byte accounting, chunked read), with
negative controls.

k-means semantics against an independent numpy implementation, the residual quantizer's
idempotence and grid, the zero-scale guard, packing goldens of kvjax's own layout, E4M3 decoding,
byte accounting against the spec's table, the chunked read of the cache method (pre- and
post-RoPE keys) and the checks of bad parameters.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax import kernels
from kvjax.cache import AppendInfo, CacheSpec
from kvjax.cache.qvg import QVGCodec, kmeans, residual_quantize
from kvjax.kernels import formats as F
from kvjax.kernels import packing
from kvjax.kernels.rope import RopeGrid, apply, block_angles

f32 = jnp.float32


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _fmt(bits, scale_dtype='float8_e4m3fn'):
  return F.QVG(bits=bits, scale_dtype=scale_dtype, centroid_dtype=f32)


# ---------------------------------------------------------------- 7.1 two clusters
def _two_clusters():
  """N = 1000 tokens of D = 128: two centers 3 * N(0, 1) (|.|_inf = 8.1 and 8.6) + 0.01 noise."""
  rng = np.random.default_rng(1)
  centers = (3.0 * rng.standard_normal((2, 128))).astype(np.float32)
  labels = rng.integers(0, 2, 1000)
  x = (centers[labels] + 0.01 * rng.standard_normal((1000, 128))).astype(np.float32)
  return x, labels, centers


@functools.lru_cache(maxsize=None)
def _span_codec(bits, k):
  codec = QVGCodec(bits, k, 1, 64, 'float8_e4m3fn', f32, iters=2)

  def run(x, key):
    rec = codec.encode(x, {'key': key})
    return codec.centroid_sum(rec), codec.decode(rec, f32)
  return jax.jit(run)


def _init_draw(key, k, m):
  """The initial rows ``QVGCodec.encode_span`` draws for stage 0 of (batch 0, head 0)."""
  sub = jax.random.split(jax.random.fold_in(key, 0), 1)[0]
  return np.asarray(jax.random.randint(sub, (k,), 0, m))


def test_two_clusters():
  """Spec 7.1. The spec's numbers (2.6e-3 INT2, 4.3e-4 INT4, 0.55 with K = 1) come from an
  independent numpy reference; this data set (centers 3 * N(0, 1), seed 1) gives 2.61e-3,
  4.33e-4 and 0.557. The init draw is random with replacement: 8 keys are run, both the keys
  whose two draws land in one cluster and those that split (both occur, asserted) must pass: with
  T = 2 the second assignment separates the clusters either way."""
  x, true_labels, _ = _two_clusters()
  xx = jnp.asarray(x).reshape(1, 1, 1000, 1, 128)
  kinds = set()
  for seed in range(8):
    key = jax.random.key(seed)
    kinds.add(len(set(true_labels[_init_draw(key, 2, 1000)])))
    for bits, want in ((2, 2.6e-3), (4, 4.3e-4)):
      csum, dec = _span_codec(bits, 2)(xx, key)
      assert np.abs(x - np.asarray(csum).reshape(1000, 128)).max() < 0.05, (seed, bits)
      err = _rel(np.asarray(dec).reshape(1000, 128), x)
      assert 0.5 * want < err < 2 * want, (seed, bits, err)
  assert kinds == {1, 2}, kinds
  # Negative control: one centroid cannot absorb the two clusters.
  csum, dec = _span_codec(2, 1)(xx, jax.random.key(0))
  assert np.abs(x - np.asarray(csum).reshape(1000, 128)).max() > 5.0
  assert 0.4 < _rel(np.asarray(dec).reshape(1000, 128), x) < 0.7


# ---------------------------------------------------------------- 7.2 k-means semantics
def _np_kmeans(x, init, iters):
  """The spec's algorithm in numpy (float64 distances and sums, centroids in x's dtype)."""
  xf = x.astype(np.float64)
  c = x[init].copy()
  k = len(init)
  prev = a = None
  for t in range(iters):
    cf = c.astype(np.float64)
    d = (xf * xf).sum(1)[:, None] + (cf * cf).sum(1)[None, :] - 2.0 * xf @ cf.T
    a = np.argmin(np.maximum(d, 0.0), axis=1)
    if t >= 1 and np.mean(a != prev) < 1e-4:
      return c, a
    counts = np.bincount(a, minlength=k)
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, a, xf)
    new = c.copy()
    nz = counts > 0
    new[nz] = (sums[nz] / counts[nz, None]).astype(x.dtype)
    c, prev = new, a
  return c, a


def _means(x, labels, c):
  """Cluster means of labels (float64), the centroid c where a cluster is empty."""
  out = c.astype(np.float64).copy()
  for j in range(c.shape[0]):
    if np.any(labels == j):
      out[j] = x[labels == j].astype(np.float64).mean(0)
  return out


_kmeans = jax.jit(kmeans, static_argnums=(1, 2))


@pytest.mark.parametrize('seed', [0, 1])
def test_kmeans_matches_numpy_reference_and_t2_semantics(seed):
  """Spec 7.2: labels a1 are assigned against C1, the returned centroids are C2 = the means of
  a1 (an empty cluster keeps its centroid); identical to a numpy implementation of the spec."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (300, 16)).astype(np.float32)     # unstructured: labels keep moving
  key = jax.random.key(10 + seed)
  init = np.asarray(jax.random.randint(key, (8,), 0, 300))
  for iters in (1, 2, 3):
    c, a = _kmeans(jnp.asarray(x), 8, iters, key)
    c, a = np.asarray(c), np.asarray(a)
    rc, ra = _np_kmeans(x, init, iters)
    np.testing.assert_array_equal(a, ra)
    np.testing.assert_allclose(c, rc, rtol=1e-6, atol=1e-6)
    assert c.dtype == np.float32 and np.all(np.isfinite(c))
  # T = 2 directly: labels = argmin against C1 (the T = 1 centroids), centroids = their means.
  c1, _ = _kmeans(jnp.asarray(x), 8, 1, key)
  c2, a1 = _kmeans(jnp.asarray(x), 8, 2, key)
  c1, c2, a1 = np.asarray(c1), np.asarray(c2), np.asarray(a1)
  d1 = ((x[:, None, :].astype(np.float64) - c1[None].astype(np.float64)) ** 2).sum(-1)
  np.testing.assert_array_equal(a1, np.argmin(d1, 1))
  np.testing.assert_allclose(c2, _means(x, a1, c1), rtol=1e-6, atol=1e-6)
  # Negative control: the labels are *not* those of the returned centroids (C2 moved on).
  d2 = ((x[:, None, :].astype(np.float64) - c2[None].astype(np.float64)) ** 2).sum(-1)
  assert np.sum(a1 != np.argmin(d2, 1)) > 0


def test_kmeans_duplicate_initial_centroids_leave_empty_clusters():
  """Draws with replacement repeat (two distinct rows, K = 4; and K > M): a duplicate of a lower
  centroid never wins a tie, stays empty, keeps its initial value exactly, and nothing is NaN."""
  x = np.array([[1.5, -2.25]] * 24 + [[-0.5, 4.0]] * 40, np.float32)
  key = jax.random.key(3)
  init = np.asarray(jax.random.randint(key, (4,), 0, 64))
  c, a = _kmeans(jnp.asarray(x), 4, 2, key)
  c, a = np.asarray(c), np.asarray(a)
  assert np.all(np.isfinite(c))
  firsts = {tuple(x[i]): j for j, i in reversed(list(enumerate(init)))}   # lowest index per row
  for j, i in enumerate(init):
    if firsts[tuple(x[i])] != j:                     # a duplicate: empty, initial value
      assert not np.any(a == j)
      np.testing.assert_array_equal(c[j], x[i])
  assert len(firsts) < 4 and len(set(a.tolist())) == len(firsts)
  np.testing.assert_array_equal(c, _means(x, a, c).astype(np.float32))
  # K > M: at least K - M clusters are empty; same as the numpy reference.
  y = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
  key = jax.random.key(4)
  c, a = _kmeans(jnp.asarray(y), 12, 2, key)
  rc, ra = _np_kmeans(y, np.asarray(jax.random.randint(key, (12,), 0, 5)), 2)
  assert np.all(np.isfinite(np.asarray(c))) and len(set(np.asarray(a).tolist())) <= 5
  np.testing.assert_array_equal(np.asarray(a), ra)
  np.testing.assert_allclose(np.asarray(c), rc, rtol=1e-6, atol=1e-6)


def _swing_data(m_a, key):
  """1-D points (as [M, 2]): m_a at 0, m_a - 1 at 10, one at 6 and a 'swing' point at 3.5, with
  the initial draw (0, 6). Iteration 0 puts 3.5 with 6, C1 = (0, ~9.999); iteration 1 moves it to
  0: exactly one label of M = 2 m_a + 1 changes."""
  m = 2 * m_a + 1
  init = np.asarray(jax.random.randint(key, (2,), 0, m))
  assert init[0] != init[1]
  vals = np.empty(m)
  rest = np.ones(m, bool)
  rest[init] = False
  vals[rest] = [0.0] * (m_a - 1) + [10.0] * (m_a - 1) + [3.5]
  vals[init[0]], vals[init[1]] = 0.0, 6.0
  x = np.stack([vals, np.zeros(m)], 1).astype(np.float32)
  return x, int(np.flatnonzero(vals == 3.5)[0])


@pytest.mark.parametrize('m_a,early', [(10_000, True), (1_000, False)])
def test_kmeans_early_exit_returns_pre_update_centroids(m_a, early):
  """One label of 20,001 changes between iterations 0 and 1 (5e-5 < 1e-4): T = 2 stops and
  returns C1 with labels a1, so the centroid of the swing point's new cluster is not its mean.
  With 2,001 rows (5e-4 >= 1e-4) the same change gives C2 = the means of a1 (control).
  (A run whose labels do not change at all cannot tell C1 from C2: they are equal.)"""
  key = jax.random.key(5)
  x, swing = _swing_data(m_a, key)
  c, a = _kmeans(jnp.asarray(x), 2, 2, key)
  c, a = np.asarray(c), np.asarray(a)
  rc, ra = _np_kmeans(x, np.asarray(jax.random.randint(key, (2,), 0, len(x))), 2)
  np.testing.assert_array_equal(a, ra)
  np.testing.assert_allclose(c, rc, rtol=1e-6)
  assert a[swing] == 0
  c1 = np.array([[0.0, 0.0], [(10.0 * (m_a - 1) + 6.0 + 3.5) / (m_a + 1), 0.0]])
  c2 = _means(x, a, c)
  np.testing.assert_allclose(c, c1 if early else c2, rtol=1e-6)
  assert np.abs(c - (c2 if early else c1)).max() > 1e-4


# ---------------------------------------------------------------- 7.3 - 7.5 the residual quantizer
def _quantize_roundtrip(r, fmt):
  rec = residual_quantize(r, fmt)
  return rec, fmt.residual(rec)


_roundtrip = jax.jit(_quantize_roundtrip, static_argnums=1)


@pytest.mark.parametrize('bits,scale_dtype', [(2, 'float8_e4m3fn'), (4, 'float8_e4m3fn'),
                                              (4, 'float16')])
def test_quantizer_idempotent_and_hits_qmax(bits, scale_dtype):
  """Spec 7.3 over 100 heavy-tailed cases (student-t, df 1.5..5, scales 1e-3..10, some
  saturating the 448 scale): Q(deq(Q(r))) == Q(r) bit for bit, and every group except the
  all-zero one (appended) holds a code of +-q_max.

  Exception (E4M3 itself, not the code): INT4 groups whose scale is an E4M3 *subnormal*
  (amax / 7 < 2^-6) may do neither: the scale's rounding step is up to 50% there, e.g. amax
  0.021 -> scale E4M3(0.003) = 2^-8, max |q| = round(5.38) = 5, and the second pass rounds
  5 * 2^-8 / 7 to the scale 2^-9 (``test_int4_subnormal_scale_example``). INT2 (q_max 1) and
  normal scales (relative step <= 1/16 < 1/(2 q_max)) are exact; the test asserts both sides."""
  fmt = _fmt(bits, scale_dtype)
  rng = np.random.default_rng(bits)
  df = rng.uniform(1.5, 5.0, (100, 1, 1))
  scale = 10.0 ** rng.uniform(-3, 1, (100, 1, 1))
  r = (rng.standard_t(df, (100, 4, 128)) * scale).astype(np.float32)
  r[7, 2, 64:] = 0.0                                       # one all-zero group
  rec, deq = _roundtrip(jnp.asarray(r), fmt)
  rec2, deq2 = _roundtrip(deq, fmt)
  u1 = np.asarray(packing.unpack(rec['codes'], bits)).reshape(100, 4, 2, 64)
  u2 = np.asarray(packing.unpack(rec2['codes'], bits)).reshape(100, 4, 2, 64)
  s1, s2 = np.asarray(rec['scale']), np.asarray(rec2['scale'])
  same = np.all(u1 == u2, -1) & (s1 == s2)
  hit = np.any((u1 == 0) | (u1 == 2 * fmt.qmax), axis=-1)
  zero = np.all(r.reshape(100, 4, 2, 64) == 0, axis=-1)
  assert zero.sum() == 1 and int(u1.max()) <= 2 * fmt.qmax
  subnormal = (s1 & 0x78) == 0 if scale_dtype == 'float8_e4m3fn' else np.zeros_like(zero)
  assert (~subnormal).sum() > 600, (~subnormal).sum()      # most groups have a normal scale
  assert np.all(same | subnormal) and np.all((hit == ~zero) | subnormal)
  if bits == 2 or scale_dtype == 'float16':
    assert np.all(same) and np.all(hit == ~zero)
    for name in ('codes', 'scale'):
      np.testing.assert_array_equal(np.asarray(rec2[name]), np.asarray(rec[name]))
    np.testing.assert_array_equal(np.asarray(deq2), np.asarray(deq))
  else:
    assert not np.all(same) and not np.all(hit | zero)     # the documented exception occurs
  # Negative control: the quantizer is lossy, deq != r.
  assert _rel(deq, r) > 1e-3


def test_int4_subnormal_scale_example():
  """The exception above, by hand: amax 0.021 at INT4 with E4M3 scales (0.021 / 7 = 0.003 ->
  2^-8; 0.021 / 2^-8 = 5.38 -> 5; 5 * 2^-8 / 7 = 0.00279 -> 2^-9)."""
  fmt = _fmt(4)
  r = np.zeros((1, 128), np.float32)
  r[0, :64] = np.linspace(-0.021, 0.021, 64)
  rec, deq = _roundtrip(jnp.asarray(r), fmt)
  assert np.asarray(rec['scale'])[0, 0] == 2                 # 2 * 2^-9 = 2^-8
  assert np.abs(np.asarray(deq)[0, :64]).max() == 5 * 2.0**-8
  rec2, _ = _roundtrip(deq, fmt)
  assert np.asarray(rec2['scale'])[0, 0] == 1                # 2^-9: not idempotent


@pytest.mark.parametrize('bits,step,k', [(2, 0.375, 1), (4, 0.125, 7)])
def test_grid_values_round_trip_exactly(bits, step, k):
  """Spec 7.4: a group on the grid step * {-q_max .. q_max} that reaches +-q_max step, with
  step an E4M3 value, decodes exactly (INT2: {-0.375, 0, 0.375}). For INT4 the spec's
  {-0.375, 0, 0.375} is *not* exact: its scale is E4M3(0.375 / 7) = 0.0546875 and 0.375 decodes
  to 7 x 0.0546875 = 0.3828125 (asserted below), so INT4 uses the grid 0.125 * {-7 .. 7}."""
  fmt = _fmt(bits)
  rng = np.random.default_rng(bits)
  q = rng.integers(-k, k + 1, (6, 128))
  q[:, 0], q[:, 64] = k, -k
  r = (step * q).astype(np.float32)
  _, deq = _roundtrip(jnp.asarray(r), fmt)
  np.testing.assert_array_equal(np.asarray(deq), r)
  # The spec's 3-value group: exact at INT2, 0.3828125 at INT4.
  g = np.tile(np.float32([0.375, 0.0, -0.375, 0.0]), (1, 32))
  _, deq = _roundtrip(jnp.asarray(g), fmt)
  want = g if bits == 2 else g * np.float32(0.3828125 / 0.375)
  np.testing.assert_array_equal(np.asarray(deq), want)
  # Negative control: off-grid values are not reproduced.
  _, deq = _roundtrip(jnp.asarray(r + 0.01 * (q != 0)), fmt)
  assert not np.array_equal(np.asarray(deq), r + 0.01 * (q != 0))


def test_codes_round_half_away_from_zero():
  """q = round_half_away(r / scale) (half-even would give 2, 0, -2, 0 below). Exact scales:
  INT4 0.875 / 7 = 0.125, INT2 0.5 / 1 = 0.5."""
  r4 = np.zeros((1, 128), np.float32)
  r4[0, :6] = [0.875, 0.3125, 0.0625, -0.3125, -0.0625, 0.1875]    # 7, 2.5, 0.5, -2.5, -0.5, 1.5
  _, deq = _roundtrip(jnp.asarray(r4), _fmt(4))
  np.testing.assert_array_equal(np.asarray(deq)[0, :6], [0.875, 0.375, 0.125, -0.375, -0.125, 0.25])
  r2 = np.zeros((1, 128), np.float32)
  r2[0, :4] = [0.5, 0.25, -0.25, 0.2499]                           # 1, 0.5, -0.5, < 0.5
  _, deq = _roundtrip(jnp.asarray(r2), _fmt(2))
  np.testing.assert_array_equal(np.asarray(deq)[0, :4], [0.5, 0.5, -0.5, 0.0])


@pytest.mark.parametrize('bits', [2, 4])
def test_zero_and_tiny_groups_decode_to_zero(bits):
  """Spec 7.5 and 6.6: an all-zero group and groups whose scale rounds to 0 in E4M3 (amax / q_max
  from 1e-12 up to below 2^-10, half the smallest subnormal) decode to exactly 0 without NaN
  (stored u = q_max); the smallest E4M3 scale 2^-9 is kept (control). Also through the codec: an
  all-zero span decodes to 0."""
  fmt = _fmt(bits)
  qmax = fmt.qmax
  r = np.zeros((5, 128), np.float32)
  r[1, :64] = 1e-12
  r[2, 64:] = -1e-12 * np.arange(64)
  r[3, 3] = 0.9 * 2.0**-10 * qmax                        # rounds to scale 0
  r[4, 5] = 2.0**-9 * qmax                               # the smallest subnormal scale: kept
  rec, deq = _roundtrip(jnp.asarray(r), fmt)
  deq = np.asarray(deq)
  assert np.all(np.isfinite(deq))
  np.testing.assert_array_equal(deq[:4], 0.0)
  assert np.all(np.asarray(packing.unpack(rec['codes'], bits))[:4] == qmax)
  assert deq[4, 5] == np.float32(2.0**-9 * qmax)
  csum, out = _span_codec(bits, 2)(jnp.zeros((1, 1, 1000, 1, 128), f32), jax.random.key(0))
  assert np.all(np.asarray(csum) == 0.0) and np.all(np.asarray(out) == 0.0)


# ---------------------------------------------------------------- 7.6 packing
def _official_pack(u, bits):
  """QVG's official bit order ([O] quant_pack.py): neighbours share a byte, first code high."""
  k = 8 // bits
  u = np.asarray(u, np.uint8).reshape(-1, k)
  out = np.zeros(len(u), np.uint8)
  for i in range(k):
    out |= u[:, i] << (bits * (k - 1 - i))
  return out


def test_packing_goldens_in_kvjax_layout():
  """Spec 7.6. kvjax does NOT use QVG's official bit order (INT2 [0, 1, 2, 0] -> 0x18, INT4
  [3, 12] -> 0x3C): it packs with its own kernel-friendly layout (``packing.py``): byte j of H
  channels holds channels j, j + H/k, j + 2H/k, ... (k codes per byte), low bits first."""
  int2 = np.array([[0, 1, 2, 0, 2, 2, 1, 0]], np.uint8)
  # byte 0 = ch0 | ch2 << 2 | ch4 << 4 | ch6 << 6 = 0 | 2<<2 | 2<<4 | 1<<6 = 0x68
  # byte 1 = ch1 | ch3 << 2 | ch5 << 4 | ch7 << 6 = 1 | 0 | 2<<4 | 0 = 0x21
  assert np.asarray(packing.pack(jnp.asarray(int2), 2)).tolist() == [[0x68, 0x21]]
  int4 = np.array([[3, 12, 7, 14]], np.uint8)
  # byte 0 = ch0 | ch2 << 4 = 3 | 7<<4 = 0x73; byte 1 = ch1 | ch3 << 4 = 12 | 14<<4 = 0xEC
  assert np.asarray(packing.pack(jnp.asarray(int4), 4)).tolist() == [[0x73, 0xEC]]
  # The spec's goldens are the official order, which differs from the project's bytes.
  assert _official_pack([0, 1, 2, 0], 2).tolist() == [0x18]
  assert _official_pack([3, 12], 4).tolist() == [0x3C]
  assert np.asarray(packing.pack(jnp.asarray(np.uint8([[0, 1, 2, 0]])), 2)).tolist() == [[0x24]]
  assert np.asarray(packing.pack(jnp.asarray(np.uint8([[3, 12]])), 4)).tolist() == [[0xC3]]
  for bits in (2, 4):
    u = np.random.default_rng(bits).integers(0, 2**bits, (3, 5, 128)).astype(np.uint8)
    packed = packing.pack(jnp.asarray(u), bits)
    assert packed.shape == (3, 5, 128 * bits // 8)
    np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits)), u)


def test_int2_never_emits_code_3():
  r = np.random.default_rng(0).standard_t(2.0, (64, 4, 128)).astype(np.float32)
  rec, _ = _roundtrip(jnp.asarray(r), _fmt(2))
  u = np.asarray(packing.unpack(rec['codes'], 2))
  assert u.max() == 2 and u.min() == 0 and not np.any(u == 3)
  assert set(np.unique(u).tolist()) == {0, 1, 2}


# ---------------------------------------------------------------- E4M3
def test_e4m3_decode_all_bit_patterns_and_saturation():
  bits = np.arange(256, dtype=np.uint8)
  finite = (bits != 0x7F) & (bits != 0xFF)
  want = bits.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
  got = np.asarray(F.e4m3_decode(jnp.asarray(bits)))
  np.testing.assert_array_equal(got[finite], want[finite])
  np.testing.assert_array_equal(
      got[finite], np.asarray(jnp.asarray(bits).view(jnp.float8_e4m3fn).astype(f32))[finite])
  assert got[0x7E] == 448.0 and got[0x01] == 2.0**-9
  # Scales above 448 saturate (a plain cast would give NaN).
  assert np.isnan(np.float32(1e4).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
  for bits_, big in ((2, 1e4), (4, 1e6)):
    fmt = _fmt(bits_)
    r = np.zeros((2, 128), np.float32)
    r[0, 0] = big
    r[1, 70] = -big
    rec, deq = _roundtrip(jnp.asarray(r), fmt)
    scale = np.asarray(rec['scale'])
    assert scale[0, 0] == 0x7E and scale[1, 1] == 0x7E
    assert np.all(np.isfinite(np.asarray(deq)))
    assert np.asarray(deq)[0, 0] == 448.0 * fmt.qmax and np.asarray(deq)[1, 70] == -448.0 * fmt.qmax


# ---------------------------------------------------------------- 7.7 byte accounting
P, NH, HD = 1560, 12, 128
BF16_FRAME = P * NH * HD * 2


def _span_bytes(fmt, frames):
  return frames * fmt.record_bytes(P, NH, HD) + fmt.shared_bytes(NH, HD)


def test_byte_accounting_official_span():
  fmt = F.QVG(bits=2, centroids=256, stages=1, group=64)
  assert fmt.shared_bytes(NH, HD) == 786_432                        # bf16 centroid table
  assert 24 * fmt.record_bytes(P, NH, HD) == 449_280 + 14_376_960 + 898_560
  span = _span_bytes(fmt, 24)
  assert span == 16_511_232
  fp16 = F.QVG(bits=2, centroids=256, scale_dtype='float16')
  assert _span_bytes(fp16, 24) - span == 898_560
  ratio = 168 * BF16_FRAME * 2 / (7 * span * 2)
  assert round(ratio, 3) == 6.966
  assert 7 * span * 2 == 231_157_248                                 # 220.449 MiB a layer


@pytest.mark.parametrize('frames,k,int2,int4', [(1, 256, 3.24, 2.31), (1, 128, 4.41, 2.84),
                                                (3, 256, 5.02, 3.08), (3, 128, 5.82, 3.37),
                                                (24, 256, 6.61, 3.62)])
def test_byte_accounting_spec_table_fp16_scales(frames, k, int2, int4):
  """Spec section 3, "Mapping to the target": bf16 bytes of the span / (records + centroids)."""
  for bits, want in ((2, int2), (4, int4)):
    fmt = F.QVG(bits=bits, centroids=k, scale_dtype='float16')
    assert round(frames * BF16_FRAME / _span_bytes(fmt, frames), 2) == want, (bits, frames, k)


def test_storage_of_the_official_geometry():
  spec = CacheSpec(batch=1, num_layers=1, num_heads=NH, head_dim=HD, frame_tokens=P,
                   block_frames=3, window_frames=180, total_frames=180, dtype=jnp.bfloat16,
                   rope=RopeGrid(HD, 30, 52))
  m = kvcache.get('QVG_INT2', span_frames=24)
  state = jax.eval_shape(lambda: m.init(spec))
  s = m.storage(state)
  assert s['span_slots'] == 7 and s['tail_frames'] == 21 and s['packed_frames'] == 168
  assert s['packed_bytes'] == 231_157_248 and s['bytes_per_span_per_tensor_per_layer'] == 16_511_232
  assert round(s['packed_ratio'], 3) == 6.966
  assert s['tail_bytes'] == 2 * 21 * BF16_FRAME
  s4 = kvcache.get('QVG_INT4', span_frames=24).storage(
      jax.eval_shape(lambda: kvcache.get('QVG_INT4', span_frames=24).init(spec)))
  assert round(s4['packed_ratio'], 2) == 3.72


# ---------------------------------------------------------------- 7.8 chunked read
SMALL = CacheSpec(batch=1, num_layers=1, num_heads=2, head_dim=64, frame_tokens=16,
                  block_frames=3, window_frames=12, total_frames=18, dtype=jnp.float32,
                  rope=RopeGrid(64, 4, 4))
BLOCKS = 6


def _small_blocks(seed=0):
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((BLOCKS, 1, 48, 2, 64)).astype(np.float32) + 0.5
  v = rng.standard_normal((BLOCKS, 1, 48, 2, 64)).astype(np.float32)
  return k, v


def _rotate_block(k, b):
  """Block b's keys [1, 48, N, H] rotated at their absolute frames 3b .. 3b + 2."""
  return apply(k, *block_angles(3 * b, 3, 4, 4, head_dim=64, max_pos=1024, theta=10000.0))


@functools.lru_cache(maxsize=None)
def _appender(m):
  """m.append, jitted where a span is longer than a block (its lax.cond retraces when eager);
  the per-block encodes of shorter spans run eagerly (cached op compiles beat a jit each)."""
  return jax.jit(m.append) if m.geometry(SMALL).tail else m.append


@functools.lru_cache(maxsize=None)
def _attender(m):
  return jax.jit(lambda s, q: m.attend(s, 0, q, impl='xla'))


def _small_method(span, rope):
  return kvcache.get('QVG_INT2', span_frames=span, rope=rope, centroids=32)


def _visible(span, frames):
  """Frames [lo, frames) the SMALL cache holds: the last 9 (spans <= a block), or the last
  complete 6-frame span plus the BF16 tail (span 6: 1 span slot)."""
  if span <= 3:
    return max(0, frames - 9), frames
  done = frames // 6
  return (6 * (done - 1) if done else 0), frames


@pytest.mark.parametrize('span', [1, 3, 6])
def test_attend_equals_dense_over_materialize(span):
  """Spec 7.8: the online-softmax walk over the decoded chunks (spans, their shared centroid
  tables and the BF16 tail) equals dense attention over the materialized cache, after every
  block (6 blocks of 3 frames through a 9-frame history: spans are evicted), rope 'pre' and
  'post'; the valid chunks are the expected frames."""
  ks, vs = _small_blocks()
  for rope in ('pre', 'post'):
    m = _small_method(span, rope)
    app, att = _appender(m), _attender(m)
    rng = np.random.default_rng(2)
    state = m.init(SMALL)
    for b in range(BLOCKS):
      state = app(state, jnp.int32(0), jnp.asarray(ks[b]), jnp.asarray(vs[b]),
                  AppendInfo(jnp.int32(3 * b)))
      q = jnp.asarray(rng.standard_normal((1, 5, 2, 64)).astype(np.float32))
      out, lse = att(state, q)
      k, v, bias = m.materialize(state, 0)
      np.testing.assert_allclose(np.asarray(out), np.asarray(
          kernels.dense_attention(q, k, v, bias=bias)), rtol=1e-5, atol=1e-5)
      assert np.all(np.isfinite(np.asarray(lse)))
      lo, hi = _visible(span, 3 * b + 3)
      assert int(np.sum(np.isfinite(np.asarray(bias)))) == 16 * (hi - lo)
    assert int(state.frames[0]) == 3 * BLOCKS


def _clustered_blocks(seed=3):
  """K and V where every 6-frame group holds 2 distinct rows per head (values k / 8, |.| <= 4,
  so float32 sums are exact): k-means with 32 centroids reproduces them exactly, the residual is
  0 and every span (1, 3 or 6 frames) decodes exactly."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(2):
    rows = rng.integers(-32, 33, (BLOCKS // 2, 2, 2, 64)) / 8.0        # [group, row, head, H]
    pick = rng.integers(0, 2, (BLOCKS // 2, 96, 2))                    # [group, token, head]
    x = rows[np.arange(BLOCKS // 2)[:, None, None], pick, np.arange(2)[None, None, :]]
    out.append(x.reshape(BLOCKS, 1, 48, 2, 64).astype(np.float32))
  return out


@pytest.mark.parametrize('span', [1, 3, 6])
def test_cache_reads_keys_at_their_frames(span):
  """With an exact codec (clustered K/V), rope='pre' fed un-rotated keys attends exactly as
  dense attention over the visible frames' keys rotated at their absolute frames, after every
  block (ring eviction, span slots, shared centroid tables and the BF16 tail's positions
  included); rope='post' returns its keys as given (no rotation on read). Controls: the same
  reference with keys rotated one frame later, and 'pre' fed rotated keys, are clearly off."""
  ks, vs = _clustered_blocks()
  rot = np.concatenate([np.asarray(_rotate_block(jnp.asarray(ks[b]), b)) for b in range(BLOCKS)], 1)
  late = np.concatenate([np.asarray(apply(jnp.asarray(ks[b]), *block_angles(
      3 * b + 1, 3, 4, 4, head_dim=64, max_pos=1024, theta=10000.0))) for b in range(BLOCKS)], 1)
  kall, vall = np.concatenate(list(ks), 1), np.concatenate(list(vs), 1)
  pre, post = _small_method(span, 'pre'), _small_method(span, 'post')
  rng = np.random.default_rng(5)
  states = {'pre': pre.init(SMALL), 'post': post.init(SMALL), 'twice': pre.init(SMALL)}
  for b in range(BLOCKS):
    info = AppendInfo(jnp.int32(3 * b))
    k, v = jnp.asarray(ks[b]), jnp.asarray(vs[b])
    states['pre'] = _appender(pre)(states['pre'], jnp.int32(0), k, v, info)
    states['post'] = _appender(post)(states['post'], jnp.int32(0), k, v, info)
    states['twice'] = _appender(pre)(states['twice'], jnp.int32(0), _rotate_block(k, b), v, info)
    q = jnp.asarray(rng.standard_normal((1, 5, 2, 64)).astype(np.float32))
    lo, hi = _visible(span, 3 * b + 3)
    tok = slice(16 * lo, 16 * hi)
    want = kernels.dense_attention(q, jnp.asarray(rot[:, tok]), jnp.asarray(vall[:, tok]))
    np.testing.assert_allclose(np.asarray(_attender(pre)(states['pre'], q)[0]), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
    plain = kernels.dense_attention(q, jnp.asarray(kall[:, tok]), jnp.asarray(vall[:, tok]))
    np.testing.assert_allclose(np.asarray(_attender(post)(states['post'], q)[0]),
                               np.asarray(plain), rtol=1e-5, atol=1e-5)
    off = kernels.dense_attention(q, jnp.asarray(late[:, tok]), jnp.asarray(vall[:, tok]))
    assert _rel(off, want) > 1e-2 and _rel(plain, want) > 1e-2
    assert _rel(_attender(pre)(states['twice'], q)[0], want) > 1e-2


# ---------------------------------------------------------------- pre-RoPE sources by hand
GRID = RopeGrid(64, 4, 4)
_chunked = jax.jit(lambda q, src: kernels.chunked_attention(q, src))
POS = np.array([5, 2, 9, 0, 7], np.int32)


def _rotated(k, pos):
  """k [B, F, P, N, H] with frame f rotated to absolute frame pos[f] (rope.apply)."""
  out = [apply(k[:, f], *block_angles(int(p), 1, GRID.height, GRID.width, head_dim=64,
                                      max_pos=GRID.max_pos, theta=GRID.theta))
         for f, p in enumerate(pos)]
  return jnp.stack(out, 1)


def _dense(k, v, pos=None):
  fmt = F.Dense(f32)
  nf = k.shape[1]
  return kernels.Source(
      k={'x': k[None]}, v={'x': v[None]}, layer=jnp.int32(0),
      index=jnp.arange(nf, dtype=jnp.int32), num_chunks=jnp.int32(nf), kfmt=fmt, vfmt=fmt,
      chunk_tokens=16, positions=None if pos is None else jnp.asarray(pos),
      rope=None if pos is None else GRID)


def test_pre_rope_source_equals_post_rope_storage():
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.standard_normal((1, 5, 16, 2, 64)).astype(np.float32))
  v = jnp.asarray(rng.standard_normal((1, 5, 16, 2, 64)).astype(np.float32))
  q = jnp.asarray(rng.standard_normal((1, 7, 2, 64)).astype(np.float32))
  want = np.asarray(_chunked(q, _dense(_rotated(k, POS), v))[0])
  got = np.asarray(_chunked(q, _dense(k, v, POS))[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(want, np.asarray(kernels.dense_attention(
      q, _rotated(k, POS).reshape(1, 80, 2, 64), v.reshape(1, 80, 2, 64))), rtol=1e-5, atol=1e-5)
  # Negative controls: shifted positions and un-rotated keys give another result.
  assert _rel(_chunked(q, _dense(k, v, POS + 1))[0], want) > 1e-2
  assert _rel(_chunked(q, _dense(k, v))[0], want) > 1e-2


def test_qvg_pre_rope_source_equals_rotated_decode():
  """A hand-built QVG source (per-frame records + the span's shared centroid table, pre-RoPE
  keys at positions POS) reads as a dense source of the rotated decode. Control: ids zeroed
  (every token takes centroid 0) decodes and attends clearly worse."""
  rng = np.random.default_rng(1)
  centers = 3.0 * rng.standard_normal((4, 2, 64))
  lab = rng.integers(0, 4, (1, 5, 16, 2))
  x = centers[lab, np.arange(2)]                              # [1, 5, 16, 2, 64]
  x = jnp.asarray((x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32))
  v = jnp.asarray(rng.standard_normal((1, 5, 16, 2, 64)).astype(np.float32))
  q = jnp.asarray(rng.standard_normal((1, 7, 2, 64)).astype(np.float32))
  codec = QVGCodec(4, 8, 1, 64, 'float8_e4m3fn', f32)
  encode = jax.jit(codec.encode_span)
  rec, shared = encode(x, jax.random.key(0))
  vrec, vshared = encode(v, jax.random.key(1))

  def source(rec):
    return kernels.Source(
        k={n: a[None] for n, a in rec.items()}, v={n: a[None] for n, a in vrec.items()},
        layer=jnp.int32(0), index=jnp.arange(5, dtype=jnp.int32), num_chunks=jnp.int32(5),
        k_shared={n: a[None] for n, a in shared.items()},
        v_shared={n: a[None] for n, a in vshared.items()},
        shared_index=jnp.zeros(5, jnp.int32), positions=jnp.asarray(POS), kfmt=codec,
        vfmt=codec, chunk_tokens=16, rope=GRID)

  kdec = codec.decode({**rec, **shared}, f32)
  vdec = codec.decode({**vrec, **vshared}, f32)
  assert _rel(kdec, x) < 0.02
  want = np.asarray(_chunked(q, _dense(_rotated(kdec, POS), vdec))[0])
  got = np.asarray(_chunked(q, source(rec))[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  bad = {**rec, 'ids': jnp.zeros_like(rec['ids'])}
  assert _rel(codec.decode({**bad, **shared}, f32), x) > 10 * _rel(kdec, x)
  assert _rel(_chunked(q, source(bad))[0], want) > 1e-2


# ---------------------------------------------------------------- bad parameters
def test_bad_parameters_raise_with_what_is_valid():
  spec = CacheSpec(batch=1, num_layers=1, num_heads=2, head_dim=64, frame_tokens=16,
                   block_frames=3, window_frames=24, total_frames=48, dtype=jnp.float32,
                   rope=RopeGrid(64, 4, 4))
  m = kvcache.get('QVG_INT2', span_frames=2)              # constructs; the geometry refuses
  with pytest.raises(ValueError, match=r'span_frames=2 must be a multiple of the block'):
    m.geometry(spec)
  with pytest.raises(ValueError, match='span_frames=2'):
    m.init(spec)
  for k in (300, 0):
    with pytest.raises(ValueError, match=rf'centroids={k}.*\[1, 256\]'):
      kvcache.get('QVG_INT2', centroids=k)
  with pytest.raises(ValueError, match=r"scale_dtype 'bfloat16'.*float8_e4m3fn.*float16"):
    kvcache.get('QVG_INT4', scale_dtype='bfloat16')
  with pytest.raises(ValueError, match=r"rope='x'.*'pre', 'post'"):
    kvcache.get('QVG_INT2', rope='x')
  with pytest.raises(ValueError, match='span_frames=24 does not fit'):
    kvcache.get('QVG_INT2', span_frames=24).init(spec)       # 21 history frames, sliding
  with pytest.raises(ValueError, match='needs CacheSpec.rope'):
    kvcache.get('QVG_INT2').init(CacheSpec(1, 1, 2, 64, 16, 3, 24))
  with pytest.raises(ValueError, match='bits=3'):
    kvcache.get('QVG_INT2', bits=3)
  with pytest.raises(ValueError, match='QVG codec for float32 values got bfloat16'):
    QVGCodec(2, 4, 1, 64, 'float8_e4m3fn', f32).encode_span(
        jnp.zeros((1, 1, 16, 1, 64), jnp.bfloat16), jax.random.key(0))
  # Control: the valid neighbours construct and fit.
  assert kvcache.get('QVG_INT2', span_frames=1).geometry(spec).spans == 21
  assert kvcache.get('QVG_INT2', span_frames=6).geometry(spec).tail == 3
  assert kvcache.get('QVG_INT2', centroids=256, scale_dtype='float16', rope='post').init(spec)


def test_repeated_context_pass_re_encodes_the_same_span():
  """A span-completing append repeated (the same block's context pass again) must re-encode the
  span from the same staged frames: the state is unchanged. (The staged frames once got
  overwritten by the completing block; frames 0-2 then decoded as frames 3-5.)"""
  spec = CacheSpec(1, 1, 1, 32, 4, 3, 18, 0, jnp.bfloat16, 0, RopeGrid(32, 2, 2))
  m = kvcache.get('QVG_INT2', span_frames=6)
  k = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4, 1, 32)), jnp.bfloat16)
  app = jax.jit(lambda st, x, s: m.append(st, 0, x, x, AppendInfo(jnp.int32(s))))
  blk = lambda s: k[s:s + 3].reshape(1, 12, 1, 32)   # noqa: E731
  st = app(app(m.init(spec), blk(0), 0), blk(3), 3)
  once = jax.tree.map(np.asarray, st)
  twice = jax.tree.map(np.asarray, app(st, blk(3), 3))
  for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice)):
    np.testing.assert_array_equal(a, b)
  kk = np.asarray(m.materialize(st, 0)[0])[0, :, 0]                # pre-RoPE frames decoded
  assert not np.allclose(kk[:12], kk[12:24], atol=0.05)           # frames 0-2 are not 3-5


def test_pre_rope_beyond_the_rope_table_is_refused():
  spec = CacheSpec(1, 1, 1, 32, 4, 3, 2000, 0, jnp.bfloat16, 2000, RopeGrid(32, 2, 2, 1024))
  with pytest.raises(ValueError, match='RoPE table'):
    kvcache.get('QVG_INT2').init(spec)
  assert kvcache.get('QVG_INT2', rope='post').init(spec) is not None
