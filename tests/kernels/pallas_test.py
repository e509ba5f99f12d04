"""The fused Pallas Triton kernel (``pallas_gpu.source_attention``) against ``reference.walk``.

Layout follows jax.experimental.pallas.ops / tokamax kernel tests: one base class parametrized
over every supported key/value format combination, run natively on a GPU; an interpret-mode
subclass that runs the same cases on CPU; negative controls showing that the metric catches the
usual decode bugs; and a CUDA cross-lowering check (no GPU needed) that every variant lowers to
the Triton custom call. Exact outliers (``WithOutliers``) and byte-pool sources (the mixed-format
log) have their own cases: designed outlier positions (a tile with many, tiles with none, ragged
tile ends, unused slots shuffled in) and a hand-written pool of records of three tiers at odd
byte offsets with garbage between them.
"""

from __future__ import annotations

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from kvjax.cache import codecs as C
from kvjax.cache.mixed_log import _field_layout
from kvjax.cache.qvg import QVGCodec
from kvjax.kernels import formats as F
from kvjax.kernels import pallas_gpu, reference
from kvjax.kernels.rope import RopeGrid
from kvjax.kernels.source import Source

SCALE = 0.125
TOL = {'float32': 1e-5, 'bfloat16': 2e-3}
# bfloat16 queries, a chunk spanning several key tiles: the kernel rounds the probabilities to
# bfloat16 relative to the running max after each key tile, the reference after each whole chunk,
# so the two differ by up to one bfloat16 rounding (2^-8 relative) of the dominant probabilities.
TOL_BF16_MULTI_TILE = 4e-3
TRITON_CALL = '__gpu$xla.gpu.triton'

# Key / value codecs of every supported format combination.
COMBOS = {
    'dense_bf16': (C.Dense(jnp.bfloat16), C.Dense(jnp.bfloat16)),
    'dense_f32': (C.Dense(jnp.float32), C.Dense(jnp.float32)),
    'sym8': (C.SymRTN(8, 16), C.SymRTN(8, 16)),
    'sym4': (C.SymRTN(4, 16), C.SymRTN(4, 16)),
    'sym2': (C.SymRTN(2, 16), C.SymRTN(2, 16)),
    'sym8_bf16dq': (C.SymRTN(8, 16, 'bfloat16'), C.SymRTN(8, 16, 'bfloat16')),
    'sym4_bf16dq': (C.SymRTN(4, 16, 'bfloat16'), C.SymRTN(4, 16, 'bfloat16')),
    'sym2_bf16dq': (C.SymRTN(2, 16, 'bfloat16'), C.SymRTN(2, 16, 'bfloat16')),
    'kivi2': (C.AsymGroup(2, 16), C.AsymToken(2)),
    'kivi4_bf16dq': (C.AsymGroup(4, 16, dequant_dtype='bfloat16'),
                     C.AsymToken(4, dequant_dtype='bfloat16')),
    'prq42': (C.PRQ(4, 2, 16), C.PRQ(4, 2, 16)),
    'quarot4': (C.Rotated(C.SymRTN(4, 16)), C.Rotated(C.SymRTN(4, 16))),
    'mixed_sym2k_sym4v': (C.SymRTN(2, 16), C.SymRTN(4, 16)),
    'mixed_densek_asym8v': (C.Dense(jnp.float16), C.AsymGroup(8, 8)),
    'mixed_prq24k_sym8v_g32': (C.PRQ(2, 4, 32), C.SymRTN(8, 32)),
}

# Source geometries: L=2 layers (layer 1 read), B=2, R=3 records read out of order.
GEOMS = {
    # S=40 with G=16: two groups, the last one 24 tokens; T=20; 2 of 3 records walked.
    'ragged': dict(s=40, t=20, index=(2, 0, 1), num_chunks=2, blocks=(None, None)),
    # Same data in 16x16 tiles: several query blocks, key tiles crossing group boundaries.
    'tiles': dict(s=40, t=20, index=(2, 0, 1), num_chunks=2, blocks=(16, 16)),
    # S=24 (one group of 24 tokens at G=16), all records in a permuted order.
    's24': dict(s=24, t=9, index=(1, 2, 0), num_chunks=3, blocks=(None, None)),
    'empty': dict(s=24, t=9, index=(1, 2, 0), num_chunks=0, blocks=(None, None)),
}
L, B, R, N, H = 2, 2, 3, 2, 64

# (name, combo, geometry, q dtype): every combo on the main geometry, the rest spread around.
CASES = [(f'{c}_ragged_{d}', c, 'ragged', d) for c in COMBOS
         for d in (('float32', 'bfloat16') if c in ('sym4', 'kivi2')
                   else ('bfloat16',) if c.endswith('bf16dq') or c == 'dense_bf16'
                   else ('float32',))]
CASES += [
    ('kivi2_tiles_bfloat16', 'kivi2', 'tiles', 'bfloat16'),
    ('prq42_tiles_float32', 'prq42', 'tiles', 'float32'),
    ('mixed_sym2k_sym4v_tiles_float32', 'mixed_sym2k_sym4v', 'tiles', 'float32'),
    ('sym2_s24_float32', 'sym2', 's24', 'float32'),
    ('quarot4_s24_bfloat16', 'quarot4', 's24', 'bfloat16'),
    ('kivi2_empty_float32', 'kivi2', 'empty', 'float32'),
]


def _normal(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _bias(s: int) -> jnp.ndarray:
  """[L, R, S]: 0 for plain tokens, log(count) for summary tokens, -inf for empty slots."""
  bias = np.zeros((L, R, s), np.float32)
  bias[:, :, 1] = np.log(60.0)
  bias[:, :, 5] = np.log(25.0)
  bias[1, 0, 2] = np.log(90.0)
  bias[:, :, s - 2] = np.log(40.0)
  bias[1, 2, 6:9] = -np.inf
  bias[1, 0, s - 1] = -np.inf
  bias[1, 1, :3] = -np.inf
  return jnp.asarray(bias)


@functools.lru_cache(maxsize=None)
def _records(codec, s: int, seed: int) -> dict:
  """Records [L, B, R, ...]: x [B, L * R, S, N, H] encoded as L * R frames of S tokens, then the
  frame axis split into (layer, record) and the layer axis moved first."""
  x = _normal((B, L * R, s, N, H), seed)
  x[..., 3] *= 4.0                         # an outlier channel, as real keys have
  rec = run_compiled(codec.encode, jnp.asarray(x))
  return {k: jnp.moveaxis(a.reshape((B, L, R) + a.shape[2:]), 1, 0) for k, a in rec.items()}


def _source(kc, vc, geom: str, records, seeds) -> Source:
  """Layer 1 of 2, records read through the geometry's index, with the test bias."""
  g = GEOMS[geom]
  s = g['s']
  return Source(k=records(kc, s, seeds[0]), v=records(vc, s, seeds[1]), layer=jnp.int32(1),
                index=jnp.asarray(g['index'], jnp.int32), num_chunks=jnp.int32(g['num_chunks']),
                bias=_bias(s), kfmt=kc, vfmt=vc, chunk_tokens=s)


@functools.lru_cache(maxsize=None)
def make_source(combo: str, geom: str) -> Source:
  return _source(*COMBOS[combo], geom, _records, (1, 2))


@functools.lru_cache(maxsize=None)
def make_q(geom: str, dtype: str) -> jnp.ndarray:
  return jnp.asarray(_normal((B, GEOMS[geom]['t'], N, H), 7)).astype(dtype)


# ---------------------------------------------------------------- exact outliers
OUT_RATIO = 0.0125            # capacity 64 a frame at S=40, N=2, H=64 (26 used: unused slots)
OUT_THRESHOLD = 5.0           # with sigma 1: only the injected values (|x| >= 8) are outliers
OUT_CAP = F.WithOutliers(capacity_ratio=OUT_RATIO).capacity(40, N, H)


def _outlier_positions(s: int, shift: int, rng) -> list[tuple[int, int, int]]:
  """(token, head, channel) of a frame's outliers: 20 in head 1's first 16-token tile (two patch
  steps), a few in head 0, some on the last (ragged) token; head 1 tokens 16..31 have none."""
  chans = rng.choice(H, 20, replace=False)
  pos = [((shift + i) % 16, 1, int(c)) for i, c in enumerate(chans)]
  pos += [(5 + shift, 0, 0), (17 + shift, 0, H - 1), (s - 1, 0, 3), (s - 1, 1, 40),
          (32, 1, 17 + shift), (s - 1 - shift, 0, 33)]
  return pos


def _inject(x: np.ndarray, seed: int) -> np.ndarray:
  """x [B, F, S, N, H] with large fp16-exact values written at ``_outlier_positions``."""
  rng = np.random.default_rng(seed)
  x = x.copy()
  for bi in range(x.shape[0]):
    for fi in range(x.shape[1]):
      for t, n, c in _outlier_positions(x.shape[2], (bi + fi) % 3, rng):
        x[bi, fi, t, n, c] = np.float16(rng.choice([-1, 1]) * rng.uniform(8, 20))
  return x


@functools.lru_cache(maxsize=None)
def _outlier_records(codec, s: int, seed: int) -> dict:
  """As ``_records``, encoded by the real Outliers codec (sigma 1) from ``_inject``-ed data; the
  outlier slots of every frame are then shuffled so unused ones (index S*N*H) sit in between."""
  x = _inject(_normal((B, L * R, s, N, H), seed), seed)
  rec = dict(run_compiled(lambda x: codec.encode(x, {'sigma': jnp.float32(1.0)}), jnp.asarray(x)))
  idx, val = np.asarray(rec['out_idx']), np.asarray(rec['out_val'])
  assert np.all(np.asarray(rec['dropped']) == 0) and np.any(idx == s * N * H)
  perm = np.argsort(np.random.default_rng(seed).random(idx.shape), axis=-1)
  rec['out_idx'] = jnp.asarray(np.take_along_axis(idx, perm, -1))
  rec['out_val'] = jnp.asarray(np.take_along_axis(val, perm, -1))
  return {k: jnp.moveaxis(a.reshape((B, L, R) + a.shape[2:]), 1, 0) for k, a in rec.items()}


def _tier_records(codec, s: int, seed: int) -> dict:
  return (_outlier_records if isinstance(codec, F.WithOutliers) else _records)(codec, s, seed)


def _qaq(bits):
  return (C.Outliers(C.AsymGroup(bits, 16), OUT_THRESHOLD, OUT_RATIO, clip=True),
          C.Outliers(C.AsymToken(bits), OUT_THRESHOLD, OUT_RATIO, clip=True))


def _tptq_old():
  return (C.Outliers(C.PRQ(2, 2, 16), OUT_THRESHOLD, OUT_RATIO, clip=False), C.PRQ(2, 2, 16))


OUTLIER_COMBOS = {
    'qaq4': _qaq(4),                          # WithOutliers(AsymGroup) / WithOutliers(AsymToken)
    'tptq_old': _tptq_old(),                  # WithOutliers(Residual) / Residual
}


@functools.lru_cache(maxsize=None)
def make_outlier_source(combo: str, geom: str) -> Source:
  return _source(*OUTLIER_COMBOS[combo], geom, _tier_records, (3, 4))




# ---------------------------------------------------------------- byte-pool sources
POOL_S = 40
POOL_TIERS = {
    'int4': (C.SymRTN(4, 16), C.SymRTN(4, 16)),             # AGE_TIER tiers
    'tptq_old': _tptq_old(),                                 # TPTQ's old tier
    'f32k_tokv': (C.Dense(jnp.float32), C.AsymToken(4)),     # 4-byte fields, token rows
}
# Record order in the pool (tier, record) and the garbage bytes before each: odd offsets.
POOL_ORDER = [('int4', 0), ('tptq_old', 1), ('f32k_tokv', 2), ('int4', 2), ('tptq_old', 0),
              ('f32k_tokv', 0), ('int4', 1), ('tptq_old', 2), ('f32k_tokv', 1)]
POOL_GEOMS = {
    # tier: (index order, num_chunks, blocks, q dtype)
    'int4': ((2, 0, 1), 3, (16, 16), 'float32'),
    'tptq_old': ((1, 2, 0), 2, (None, None), 'bfloat16'),
    'f32k_tokv': ((0, 2, 1), 3, (16, 16), 'float32'),
}


def _record_bytes(rec: dict, layout, l: int, b: int, r: int) -> np.ndarray:
  """Record (l, b, r) of typed [L, B, R, ...] fields serialized as the layout says."""
  out = np.zeros(sum(e[5] for e in layout), np.uint8)
  for tensor, name, shape, dt, off, nb in layout:
    a = np.asarray(rec[tensor][name][l, b, r]).astype(np.dtype(dt).newbyteorder('<'))
    assert a.shape == tuple(shape)
    out[off:off + nb] = np.frombuffer(a.tobytes(), np.uint8)
  return out


@functools.lru_cache(maxsize=None)
def make_pool() -> tuple[jnp.ndarray, dict]:
  """A uint8 pool [L, B, bytes] holding every tier's R records (different per layer) at odd
  offsets with random bytes in between; returns it and {tier: (layout, [offset of record r])}."""
  recs, lays = {}, {}
  for i, (tier, (kc, vc)) in enumerate(POOL_TIERS.items()):
    recs[tier] = {'k': _tier_records(kc, POOL_S, 10 + i), 'v': _tier_records(vc, POOL_S, 20 + i)}
    lays[tier] = _field_layout((kc, vc), POOL_S, N, H)
  offsets, cursor = {t: [0] * R for t in POOL_TIERS}, 0
  for i, (tier, r) in enumerate(POOL_ORDER):
    cursor += 3 + 4 * i                    # garbage gap
    offsets[tier][r] = cursor
    cursor += lays[tier][1]
  pool = np.random.default_rng(5).integers(0, 256, (L, B, cursor + 11), np.uint8)
  for tier, r in POOL_ORDER:
    layout, size = lays[tier]
    for l in range(L):
      for b in range(B):
        pool[l, b, offsets[tier][r]:offsets[tier][r] + size] = _record_bytes(
            recs[tier], layout, l, b, r)
  return jnp.asarray(pool), {t: (tuple(lays[t][0]), offsets[t]) for t in POOL_TIERS}


def make_pool_source(tier: str) -> Source:
  pool, lays = make_pool()
  layout, offs = lays[tier]
  order, num_chunks, _, _ = POOL_GEOMS[tier]
  kc, vc = POOL_TIERS[tier]
  return Source(k={'pool': pool}, v={}, layer=jnp.int32(1),
                index=jnp.asarray([offs[r] for r in order], jnp.int32),
                num_chunks=jnp.int32(num_chunks), kfmt=kc, vfmt=vc, chunk_tokens=POOL_S,
                pool=layout)


# ---------------------------------------------------------------- QVG records and pre-RoPE keys
QVG_R = 4                               # records (frames): 2 spans of 2 frames per layer
QVG_GRID = RopeGrid(H, 5, 8)            # S = 40 tokens a frame
QVG_INDEX = (3, 0, 2, 1)                # walked out of order; chunk j's span = index[j] // 2
QVG_POSITIONS = (7, 0, 5, 2)            # absolute frames (pre-RoPE sources)
QVG_COMBOS = {
    # name: (bits, centroid stages, scale dtype, centroid dtype, pre-RoPE keys, q dtype)
    'qvg2_fp8_pre_f32': (2, 1, 'float8_e4m3fn', 'float32', True, 'float32'),
    'qvg2_fp8_pre_bf16': (2, 1, 'float8_e4m3fn', 'bfloat16', True, 'bfloat16'),
    'qvg4_fp16_2stages_post_bf16': (4, 2, 'float16', 'bfloat16', False, 'bfloat16'),
}


@functools.lru_cache(maxsize=None)
def make_qvg_source(combo: str) -> Source:
  """QVG records [L, B, 4, ...] and per-span centroid tables [L, B, 2, ...] of real encodes
  (8 centroids), keys and values from different data; 3 of 4 chunks walked."""
  bits, stages, sdt, cdt, pre, _ = QVG_COMBOS[combo]
  codec = QVGCodec(bits, 8, stages, 64, sdt, cdt)
  out = []
  for seed in (11, 12):
    x = jnp.asarray(_normal((L, 2, B, 2, POOL_S, N, H), seed)).astype(cdt)
    enc = [[run_compiled(codec.encode_span, x[l, sp], jax.random.PRNGKey(10 * l + sp))
            for sp in range(2)] for l in range(L)]
    rec = {k: jnp.stack([jnp.concatenate([e[sp][0][k] for sp in range(2)], 1) for e in enc])
           for k in enc[0][0][0]}
    shared = {k: jnp.stack([jnp.concatenate([e[sp][1][k] for sp in range(2)], 1) for e in enc])
              for k in enc[0][0][1]}
    out.append((rec, shared))
  (kr, ks), (vr, vs) = out
  index = jnp.asarray(QVG_INDEX, jnp.int32)
  return Source(k=kr, v=vr, layer=jnp.int32(1), index=index, num_chunks=jnp.int32(3),
                k_shared=ks, v_shared=vs, shared_index=index // 2,
                positions=jnp.asarray(QVG_POSITIONS, jnp.int32) if pre else None,
                kfmt=codec, vfmt=codec, chunk_tokens=POOL_S, rope=QVG_GRID if pre else None)


def make_prerope_dense_source(dtype: str) -> Source:
  """The BF16 tail of a pre-RoPE cache: dense un-rotated keys, rotated by the reader."""
  src = make_source('dense_bf16' if dtype == 'bfloat16' else 'dense_f32', 'ragged')
  return src.replace(bias=None, positions=jnp.asarray((4, 9, 1), jnp.int32), rope=QVG_GRID)


# Interpret mode compiles the kernel to an XLA CPU program per shape; the tests' cost is that
# compilation, which XLA's backend optimization level 0 cuts by ~40% (numerics unchanged).
FAST_COMPILE = {'xla_backend_optimization_level': 0}


_COMPILED = {}


def teardown_module():
  """The module's executables go with it (see tests/conftest.py: the memory-mapping limit)."""
  _COMPILED.clear()


def run_compiled(fn, *args, key=None):
  """fn(*args) through a jit compiled with FAST_COMPILE, cached by ``key`` and the args' types."""
  leaves, tree = jax.tree.flatten(args)
  sig = (key, tree, tuple((x.shape, jnp.dtype(x.dtype)) for x in leaves))
  if key is None or sig not in _COMPILED:
    compiled = jax.jit(fn).trace(*args).lower().compile(FAST_COMPILE)
    if key is None:
      return compiled(*args)
    _COMPILED[sig] = compiled
  return _COMPILED[sig](*args)


def _walk(q, src, scale):
  return run_compiled(lambda q, src: reference.walk(q, src, scale), q, src, key=('walk', scale))


def _tol(dtype: str, block_k: int | None, s: int) -> float:
  """The agreement bound: bfloat16 chunks read in several key tiles round differently."""
  bk = block_k or max(16, min(pallas_gpu.DEFAULT_BLOCK_K, 1 << (s - 1).bit_length()))
  return TOL_BF16_MULTI_TILE if dtype == 'bfloat16' and bk < s else TOL[dtype]


def per_row_rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  num = np.linalg.norm(a - b, axis=-1)
  den = np.linalg.norm(b, axis=-1)
  return float(np.max(np.where(num == 0, 0.0, num / np.maximum(den, 1e-30))))


def caught(err: float, bound: float) -> bool:
  """A negative control's error is above ``bound`` (NaN, from garbage fp16 bits, counts)."""
  return not err <= bound


def _flat_to_tnc(e):
  """Flat outlier index (t * N + n) * H + c -> (t, n, c)."""
  return e // (N * H), (e // H) % N, e % H


def lse_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  same_inf = np.array_equal(np.isneginf(a), np.isneginf(b))
  if not same_inf:
    return float('inf')
  fin = np.isfinite(b)
  return float(np.max(np.abs(a[fin] - b[fin]), initial=0.0))


class PallasSourceAttentionTest(parameterized.TestCase):
  """Kernel vs ``reference.walk``; natively on a GPU (the interpret subclass runs on CPU)."""
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != 'gpu':
      self.skipTest('native Pallas Triton needs a GPU (see the Interpret subclass)')

  def _attend(self, q, src, blocks=(None, None)):
    def attend(q, src):
      return pallas_gpu.source_attention(q, src, SCALE, interpret=self.INTERPRET,
                                         block_q=blocks[0], block_k=blocks[1])
    if self.INTERPRET:
      return run_compiled(attend, q, src, key=('kernel', blocks))
    return attend(q, src)

  @parameterized.named_parameters(*CASES)
  def test_matches_reference(self, combo, geom, dtype):
    src = make_source(combo, geom)
    self.assertIsNone(pallas_gpu.unsupported(src))
    q = make_q(geom, dtype)
    out, lse = self._attend(q, src, GEOMS[geom]['blocks'])
    ref_out, ref_lse = _walk(q, src, SCALE)
    self.assertEqual(out.shape, q.shape)
    self.assertEqual(out.dtype, jnp.float32)
    self.assertEqual(lse.shape, (B, N, q.shape[1]))
    err = per_row_rel(out, ref_out)
    tol = _tol(dtype, GEOMS[geom]['blocks'][1], GEOMS[geom]['s'])
    self.assertLessEqual(err, tol, f'{combo}/{geom}/{dtype}: per-row rel err {err:.3g}')
    self.assertLessEqual(lse_err(lse, ref_lse), 1e-4 if dtype == 'float32' else 2e-3)
    if GEOMS[geom]['num_chunks'] == 0:
      self.assertTrue(np.all(np.asarray(out) == 0))
      self.assertTrue(np.all(np.isneginf(np.asarray(lse))))

  def test_negative_controls(self):
    """Bugs a kernel could have, simulated on the reference side, fail the same metric."""
    combo, geom, dtype = 'kivi2', 'ragged', 'float32'
    src, q = make_source(combo, geom), make_q(geom, dtype)
    out, _ = self._attend(q, src)
    self.assertLessEqual(per_row_rel(out, _walk(q, src, SCALE)[0]), TOL[dtype])

    def ones_like_f16(a):
      return jnp.full(a.shape, np.float16(1.0).view(np.uint16), a.dtype)

    def zeros_like_f16(a):
      return jnp.zeros(a.shape, a.dtype)

    def remap(fields, name, fn):
      return {k: (fn(a) if k.endswith(name) else a) for k, a in fields.items()}

    bias = np.asarray(src.bias)
    wrong = {
        'kv_swapped': src.replace(k=src.v, v=src.k, kfmt=src.vfmt, vfmt=src.kfmt),
        'scales_ignored': src.replace(k=remap(src.k, 'scale', ones_like_f16),
                                      v=remap(src.v, 'scale', ones_like_f16)),
        'zero_points_ignored': src.replace(k=remap(src.k, 'zp', zeros_like_f16),
                                           v=remap(src.v, 'zp', zeros_like_f16)),
        'num_chunks_plus_one': src.replace(num_chunks=src.num_chunks + 1),
        'num_chunks_minus_one': src.replace(num_chunks=src.num_chunks - 1),
        'summary_bias_dropped': src.replace(
            bias=jnp.asarray(np.where(np.isfinite(bias), 0.0, bias).astype(np.float32))),
        'wrong_layer': src.replace(layer=jnp.int32(0)),
        'index_in_order': src.replace(index=jnp.arange(R, dtype=jnp.int32)),
    }
    for name, bad in wrong.items():
      err = per_row_rel(out, _walk(q, bad, SCALE)[0])
      self.assertGreater(err, 100 * TOL[dtype], f'negative control {name}: err {err:.3g}')

  def _check(self, q, src, dtype, blocks, what):
    """Kernel vs reference at the usual tolerances; returns the kernel's output."""
    out, lse = self._attend(q, src, blocks)
    ref_out, ref_lse = _walk(q, src, SCALE)
    tol = _tol(dtype, blocks[1], src.chunk_tokens)
    err = per_row_rel(out, ref_out)
    self.assertLessEqual(err, tol, f'{what}: per-row rel err {err:.3g}')
    self.assertLessEqual(lse_err(lse, ref_lse), 1e-4 if dtype == 'float32' else 2e-3, what)
    return out

  def test_outliers_match_reference(self):
    """QAQ-style keys WithOutliers(AsymGroup), values WithOutliers(AsymToken) in 16x16 tiles
    (a tile with 20 outliers, tiles with none, outliers on the ragged last tile); then negative
    controls: outliers ignored, on the wrong head, or off the ragged tile end fail the metric.
    (WithOutliers(Residual) with bfloat16 queries: the pool's tptq_old tier.)"""
    geom, dtype = 'tiles', 'float32'
    src, q = make_outlier_source('qaq4', geom), make_q(geom, dtype)
    self.assertIsNone(pallas_gpu.unsupported(src))
    out = self._check(q, src, dtype, GEOMS[geom]['blocks'], 'qaq4')
    s, unused = src.chunk_tokens, src.chunk_tokens * N * H

    def edit(fields, fn):
      e = np.asarray(fields['out_idx'])
      t, n, c = _flat_to_tnc(e)
      new = np.where(e < unused, fn(e, t, n, c), e).astype(np.int32)
      return {**fields, 'out_idx': jnp.asarray(new)}

    none = lambda e, t, n, c: np.full_like(e, unused)
    wrong = {
        'outliers_ignored': src.replace(k=edit(src.k, none), v=edit(src.v, none)),
        'key_outliers_ignored': src.replace(k=edit(src.k, none)),
        'value_outliers_ignored': src.replace(v=edit(src.v, none)),
        'wrong_head': src.replace(k=edit(src.k, lambda e, t, n, c: (t * N + (n + 1) % N) * H + c)),
        'ragged_end_dropped': src.replace(
            k=edit(src.k, lambda e, t, n, c: np.where(t == s - 1, unused, e)),
            v=edit(src.v, lambda e, t, n, c: np.where(t == s - 1, unused, e))),
    }
    for name, bad in wrong.items():
      err = per_row_rel(out, _walk(q, bad, SCALE)[0])
      self.assertTrue(caught(err, 100 * TOL[dtype]), f'negative control {name}: err {err:.3g}')

  @parameterized.named_parameters(*[(t, t) for t in POOL_TIERS])
  def test_pool_matches_reference(self, tier):
    """Each tier's records of the shared pool; for the INT4 tier also negative controls: a field
    read one byte off, a record offset one byte off or another tier's offsets fail the metric."""
    src, dtype = make_pool_source(tier), POOL_GEOMS[tier][3]
    self.assertIsNone(pallas_gpu.unsupported(src))
    q = make_q('ragged', dtype)
    out = self._check(q, src, dtype, POOL_GEOMS[tier][2], f'pool/{tier}')
    if tier != 'int4':
      return

    def shifted(field):
      return tuple(e[:4] + (e[4] + 1,) + e[5:] if e[:2] == field else e for e in src.pool)

    wrong = {
        'k_scale_offset_plus_one': src.replace(pool=shifted(('k', 'scale'))),
        'v_codes_offset_plus_one': src.replace(pool=shifted(('v', 'codes'))),
        'record_offset_plus_one': src.replace(index=src.index + 1),
        'other_tier_offsets': src.replace(index=jnp.asarray(make_pool()[1]['f32k_tokv'][1],
                                                            jnp.int32)),
    }
    for name, bad in wrong.items():
      err = per_row_rel(out, _walk(q, bad, SCALE)[0])
      self.assertTrue(caught(err, 100 * TOL[dtype]), f'negative control {name}: err {err:.3g}')

  def test_residual_stage_matters(self):
    """PRQ: dropping the residual stage is caught by the metric (the kernel sums both)."""
    src, q = make_source('prq42', 'ragged'), make_q('ragged', 'float32')
    out, _ = self._attend(q, src)
    base_only = src.replace(k={**src.k, 'res_scale': jnp.zeros_like(src.k['res_scale'])},
                            v={**src.v, 'res_scale': jnp.zeros_like(src.v['res_scale'])})
    self.assertGreater(per_row_rel(out, _walk(q, base_only, SCALE)[0]), 100 * TOL['float32'])


  @parameterized.named_parameters(*[(c, c) for c in QVG_COMBOS])
  def test_qvg_matches_reference(self, combo):
    """QVG records (centroid gathers from the chunk's span table plus the residual) in one and
    in 16x16 tiles, with pre-RoPE keys rotated per chunk; negative controls: centroids of the
    wrong span, ids ignored, scales decoded as zeros, rotation dropped or to the wrong frames."""
    src, dtype = make_qvg_source(combo), QVG_COMBOS[combo][5]
    self.assertIsNone(pallas_gpu.unsupported(src))
    q = make_q('ragged', dtype)
    for blocks in ((None, None), (16, 16)):
      out = self._check(q, src, dtype, blocks, f'{combo}/{blocks}')
    wrong = {
        'wrong_span_table': src.replace(shared_index=1 - src.shared_index),
        'ids_ignored': src.replace(k={**src.k, 'ids': jnp.zeros_like(src.k['ids'])}),
        'scales_zero': src.replace(k={**src.k, 'scale': jnp.zeros_like(src.k['scale'])},
                                   v={**src.v, 'scale': jnp.zeros_like(src.v['scale'])}),
    }
    if src.rope is not None:
      wrong['rotation_dropped'] = src.replace(rope=None, positions=None)
      wrong['positions_plus_one'] = src.replace(positions=src.positions + 1)
    for name, bad in wrong.items():
      err = per_row_rel(out, _walk(q, bad, SCALE)[0])
      self.assertTrue(caught(err, 100 * TOL[dtype]), f'negative control {name}: err {err:.3g}')

  @parameterized.named_parameters(('float32', 'float32'), ('bfloat16', 'bfloat16'))
  def test_prerope_dense_matches_reference(self, dtype):
    """A dense pre-RoPE source (QVG's BF16 tail): the kernel rotates each key tile."""
    src = make_prerope_dense_source(dtype)
    self.assertIsNone(pallas_gpu.unsupported(src))
    q = make_q('ragged', dtype)
    out = self._check(q, src, dtype, (16, 16), f'prerope/{dtype}')
    err = per_row_rel(out, _walk(q, src.replace(rope=None, positions=None), SCALE)[0])
    self.assertTrue(caught(err, 100 * TOL[dtype]), f'rotation dropped: err {err:.3g}')


class PallasSourceAttentionInterpretTest(PallasSourceAttentionTest):
  INTERPRET = True


class UnsupportedTest(parameterized.TestCase):

  def test_supported_sources(self):
    for combo in COMBOS:
      self.assertIsNone(pallas_gpu.unsupported(make_source(combo, 'ragged')), combo)

  def test_reasons(self):
    base = make_source('sym4', 's24')
    # a pool whose layout does not match the format / its own record size
    pool = base.replace(k={'pool': jnp.zeros((L, B, 64), jnp.uint8)}, v={}, bias=None,
                        pool=(('k', 'codes', (1,), jnp.dtype(jnp.uint8), 0, 1),))
    self.assertIn('do not match', pallas_gpu.unsupported(pool))
    kc = C.SymRTN(4, 16)
    lay, size = _field_layout((kc, kc), POOL_S, N, H)
    lay = tuple(lay)
    pool_src = Source(k={'pool': jnp.zeros((L, B, size + 5), jnp.uint8)}, v={},
                      layer=jnp.int32(0), index=jnp.zeros((R,), jnp.int32),
                      num_chunks=jnp.int32(1), kfmt=kc, vfmt=kc, chunk_tokens=POOL_S, pool=lay)
    self.assertIsNone(pallas_gpu.unsupported(pool_src))
    bad_nbytes = pool_src.replace(pool=(lay[0][:5] + (lay[0][5] + 1,),) + lay[1:])
    self.assertIn('does not fit', pallas_gpu.unsupported(bad_nbytes))
    small = pool_src.replace(k={'pool': pool_src.k['pool'][:, :, :100]})
    self.assertIn('smaller than', pallas_gpu.unsupported(small))
    self.assertIn('bias', pallas_gpu.unsupported(pool_src.replace(bias=_bias(POOL_S))))
    typed_v = pool_src.replace(v={'x': jnp.zeros((L, B, 1), jnp.uint8)})
    self.assertIn('byte-pool', pallas_gpu.unsupported(typed_v))
    outl = base.replace(kfmt=F.WithOutliers(F.AsymGroup(4, 16)))
    self.assertIn('do not match', pallas_gpu.unsupported(outl))   # no out_* fields
    nested = base.replace(kfmt=F.WithOutliers(F.WithOutliers(F.AsymGroup(4, 16))))
    self.assertIn('nested', pallas_gpu.unsupported(nested))
    split = base.replace(kfmt=F.Split())
    self.assertIn('Split', pallas_gpu.unsupported(split))
    bad_bias = base.replace(bias=jnp.zeros((L, R, 7), jnp.float32))
    self.assertIn('bias', pallas_gpu.unsupported(bad_bias))
    # int2 at head_dim 32: 8-channel slices are too narrow for tl.dot.
    kc = C.SymRTN(2, 16)
    x = jnp.asarray(_normal((B, R, 24, N, 32), 0))
    rec = {k: a[None] for k, a in kc.encode(x).items()}
    narrow = Source(k=rec, v=rec, layer=jnp.int32(0), index=jnp.arange(R, dtype=jnp.int32),
                    num_chunks=jnp.int32(R), kfmt=kc, vfmt=kc, chunk_tokens=24)
    self.assertIn('channel slice', pallas_gpu.unsupported(narrow))
    d = C.Dense(jnp.bfloat16)
    x96 = {'x': d.encode(jnp.asarray(_normal((B, R, 24, N, 96), 0)))['x'][None]}
    h96 = Source(k=x96, v=x96, layer=jnp.int32(0), index=jnp.arange(R, dtype=jnp.int32),
                 num_chunks=jnp.int32(R), kfmt=d, vfmt=d, chunk_tokens=24)
    self.assertIn('head_dim 96', pallas_gpu.unsupported(h96))
    qvg = make_qvg_source('qvg2_fp8_pre_f32')
    self.assertIn('shared fields', pallas_gpu.unsupported(
        qvg.replace(k_shared=None, shared_index=qvg.shared_index)))
    bad_table = {'centroids': qvg.k_shared['centroids'][..., :4, :]}
    self.assertIn('centroids', pallas_gpu.unsupported(qvg.replace(k_shared=bad_table)))
    self.assertIn('RoPE grid', pallas_gpu.unsupported(qvg.replace(rope=RopeGrid(32, 5, 8))))
    with self.assertRaisesRegex(ValueError, 'nested'):
      pallas_gpu.source_attention(make_q('s24', 'float32'), nested, SCALE, interpret=True)


class CrossLoweringTest(parameterized.TestCase):
  """Every variant lowers through Pallas -> Triton IR for CUDA (checked on a CPU-only machine)."""

  def _lower(self, src, q, blocks=(None, None)):
    f = jax.jit(lambda q, src: pallas_gpu.source_attention(
        q, src, SCALE, interpret=False, block_q=blocks[0], block_k=blocks[1]))
    return f.trace(q, src).lower(lowering_platforms=('cuda',)).as_text()

  @parameterized.named_parameters(*[(c, c) for c in COMBOS])
  def test_lowers_to_triton(self, combo):
    src = make_source(combo, 'ragged')
    for dtype in ('bfloat16', 'float32'):
      text = self._lower(src, make_q('ragged', dtype))
      self.assertIn(TRITON_CALL, text, f'{combo}/{dtype}')

  @parameterized.named_parameters(*[(c, c) for c in OUTLIER_COMBOS])
  def test_outliers_lower_to_triton(self, combo):
    src = make_outlier_source(combo, 'tiles')
    for dtype in ('bfloat16', 'float32'):
      text = self._lower(src, make_q('tiles', dtype), GEOMS['tiles']['blocks'])
      self.assertIn(TRITON_CALL, text, f'{combo}/{dtype}')

  @parameterized.named_parameters(*[(t, t) for t in POOL_TIERS])
  def test_pool_lowers_to_triton(self, tier):
    src = make_pool_source(tier)
    for dtype in ('bfloat16', 'float32'):
      text = self._lower(src, make_q('ragged', dtype), POOL_GEOMS[tier][2])
      self.assertIn(TRITON_CALL, text, f'pool/{tier}/{dtype}')

  @parameterized.named_parameters(*[(c, c) for c in QVG_COMBOS])
  def test_qvg_lowers_to_triton(self, combo):
    src = make_qvg_source(combo)
    text = self._lower(src, make_q('ragged', QVG_COMBOS[combo][5]), (16, 16))
    self.assertIn(TRITON_CALL, text, combo)

  def test_lowers_with_small_tiles_and_no_bias(self):
    src = make_source('kivi2', 'tiles').replace(bias=None)
    text = self._lower(src, make_q('tiles', 'bfloat16'), GEOMS['tiles']['blocks'])
    self.assertIn(TRITON_CALL, text)

  @parameterized.named_parameters(
      ('sym4', lambda: make_source('sym4', 'ragged'), 1),
      # Outliers and pools: only the walked records' outlier tables ([M, B, cap] int32 / fp16
      # and their bytes, [M, B, N * n_tiles + 1] bounds), never a chunk of values.
      ('qaq4', lambda: make_outlier_source('qaq4', 'tiles'), 4 * R * B * OUT_CAP),
      ('pool_tptq_old', lambda: make_pool_source('tptq_old'), 4 * R * B * OUT_CAP))
  def test_no_cache_sized_intermediates(self, make, limit):
    """Outside the kernel nothing cache-sized is computed (only bitcast reshapes of scalars,
    and for exact outliers the sorted outlier tables)."""
    src, q = make(), make_q('ragged', 'bfloat16')
    limit = min(limit, src.chunk_tokens * N * H // 2)     # well under one chunk of one tensor
    jaxpr = jax.make_jaxpr(lambda q, src: pallas_gpu.source_attention(
        q, src, SCALE, interpret=False))(q, src)
    calls, outside = [], []

    def visit(jx):
      for e in jx.eqns:
        if e.primitive.name == 'pallas_call':
          calls.append(e)
          continue
        subs = list(jax.extend.core.jaxprs_in_params(e.params))
        if not subs:
          outside.extend((e.primitive.name, v.aval) for v in e.outvars)
        for sub in subs:
          visit(sub)

    visit(jaxpr.jaxpr)
    self.assertLen(calls, 1)
    for name, aval in outside:
      # never a cache- or q-sized array
      self.assertLessEqual(int(np.prod(aval.shape)), limit, (name, aval))


if __name__ == '__main__':
  absltest.main()
