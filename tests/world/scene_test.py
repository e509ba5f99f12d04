"""The procedural world: caption grammar, bouncing physics against the closed form, the renderer
against analytic areas and a dense point sampling, and deterministic, fast training batches.

References are written here from the spec (kvjax/world/scene.py's docstring), not from the code:
the triangle wave of an elastic bounce, the areas of the three shapes and of a circle-circle
lens, point-in-shape tests on a 64x64 grid per pixel.
"""

import itertools
import math
import time

import numpy as np
import pytest

from kvjax.world import scene

SPEC_COLORS = ('red', 'green', 'blue', 'yellow', 'white', 'black', 'gray')
SPEC_VOCAB = ('a', 'and', 'bouncing', 'on', 'background', 'small', 'big') + SPEC_COLORS + (
    'circle', 'square', 'triangle')


def _obj(color='red', shape='circle', size='small', x=16.0, y=16.0, vx=0.0, vy=0.0):
  return scene.Obj(color=color, shape=shape, size=size, x=x, y=y, vx=vx, vy=vy)


# ------------------------------------------------------------------------------------------------
# Palette, vocabulary, grammar


def test_palette_and_vocab_follow_the_spec():
  assert tuple(scene.COLORS) == SPEC_COLORS
  assert scene.SHAPES == ('circle', 'square', 'triangle')
  assert tuple(scene.SIZES) == ('small', 'big') and scene.SIZES['small'] < scene.SIZES['big']
  assert scene.VOCAB == SPEC_VOCAB and len(set(scene.VOCAB)) == len(scene.VOCAB)
  for a, b in itertools.combinations(SPEC_COLORS, 2):
    assert math.dist(scene.COLORS[a], scene.COLORS[b]) >= 100, (a, b)
  for rgb in scene.COLORS.values():
    assert all(0 <= c <= 255 and isinstance(c, int) for c in rgb)


def test_caption_of_a_known_scene():
  s = scene.Scene('gray', (_obj('red', 'circle', 'big', 10, 10), _obj('blue', 'square', 'small')))
  assert scene.caption(s, True) == ('a big red circle and a small blue square bouncing on a gray '
                                    'background')
  assert scene.caption(s, False) == 'a red circle and a blue square bouncing on a gray background'
  assert scene.parse('a green triangle bouncing on a black background') == scene.Prompt(
      objects=((None, 'green', 'triangle'),), background='black')


def test_round_trip_over_random_scenes():
  rng = np.random.default_rng(0)
  counts = {1: 0, 2: 0}
  for i in range(400):
    s = scene.sample_scene(rng, 32, 32)
    counts[len(s.objects)] += 1
    for with_sizes in (True, False):
      text = scene.caption(s, with_sizes)
      assert set(text.split()) <= set(SPEC_VOCAB)
      p = scene.parse(text)
      assert p.background == s.background
      assert p.objects == tuple((o.size if with_sizes else None, o.color, o.shape)
                                for o in s.objects)
      assert scene.format_prompt(p) == text
  assert 150 < counts[1] < 250 and 150 < counts[2] < 250        # about half each


def test_round_trip_over_every_valid_prompt_form():
  """All single-object captions and a sample of two-object ones, built here from the grammar."""
  rng = np.random.default_rng(1)
  sizes = (None, 'small', 'big')
  texts = []
  for bg, color, shape, size in itertools.product(SPEC_COLORS, SPEC_COLORS, scene.SHAPES, sizes):
    if color != bg:
      texts.append((((size, color, shape),), bg))
  for _ in range(500):
    bg, c0, c1 = rng.permutation(SPEC_COLORS)[:3]
    if {bg, c0, c1} == {'black', 'gray', 'white'}:
      continue
    objs = tuple((sizes[rng.integers(3)], str(c), scene.SHAPES[rng.integers(3)]) for c in (c0, c1))
    texts.append((objs, str(bg)))
  for objs, bg in texts:
    words = ' and '.join(' '.join(['a'] + ([s] if s else []) + [c, sh]) for s, c, sh in objs)
    text = f'{words} bouncing on a {bg} background'
    assert scene.parse(text) == scene.Prompt(objects=objs, background=bg), text


def test_case_whitespace_and_period_are_tolerated():
  want = scene.parse('a big red circle and a blue square bouncing on a gray background')
  for text in ('  A Big RED circle\tand a blue   SQUARE\nbouncing on a gray background.  ',
               'a big red circle and a blue square bouncing on a gray background.',
               'a big red circle and a blue square bouncing on a gray background .'):
    assert scene.parse(text) == want
  with pytest.raises(scene.CaptionError, match="unknown word 'background.'"):
    scene.parse('a big red circle bouncing on a gray background..')


def test_unknown_word_names_it_and_lists_the_vocabulary():
  with pytest.raises(scene.CaptionError) as e:
    scene.parse('a purple circle bouncing on a gray background')
  msg = str(e.value)
  assert "'purple'" in msg and 'word 2' in msg and '\n' not in msg
  for w in SPEC_VOCAB:
    assert w in msg.split('vocabulary:')[1].split()
  with pytest.raises(scene.CaptionError, match="'an'"):
    scene.parse('an red circle bouncing on a gray background')


@pytest.mark.parametrize('text, fragment', [
    ('', "expected 'a' at word 1, got the end of the caption"),
    ('red circle bouncing on a gray background', "expected 'a' at word 1, got 'red'"),
    ('a circle bouncing on a gray background', "expected a size (small, big) or a color"),
    ('a big small red circle bouncing on a gray background', "expected a color (red, green"),
    ('a red bouncing on a gray background',
     "expected a shape (circle, square, triangle) at word 3"),
    ('a red circle on a gray background', "expected 'and' or 'bouncing' at word 4, got 'on'"),
    ('a red circle and bouncing on a gray background', "expected 'a' at word 5, got 'bouncing'"),
    ('a red circle bouncing a gray background', "expected 'on' at word 5, got 'a'"),
    ('a red circle bouncing on gray background', "expected 'a' at word 6, got 'gray'"),
    ('a red circle bouncing on a circle background', "expected a color (red"),
    ('a red circle bouncing on a gray', "expected 'background' at word 8, got the end"),
    ('a red circle bouncing on a gray background background',
     'expected the end of the caption at word 9'),
])
def test_grammar_errors_name_the_position_and_what_was_expected(text, fragment):
  with pytest.raises(scene.CaptionError) as e:
    scene.parse(text)
  assert fragment in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('text, fragment', [
    ('a red circle bouncing on a red background', "background color 'red'"),
    ('a red circle and a red square bouncing on a gray background', 'share a color'),
    ('a red circle and a blue square and a green triangle bouncing on a gray background',
     '1 to 2 objects, got 3'),
    ('a black circle and a white square bouncing on a gray background', 'black, gray and white'),
    ('a gray circle and a black square bouncing on a white background', 'black, gray and white'),
])
def test_semantic_errors(text, fragment):
  with pytest.raises(scene.CaptionError, match=fragment):
    scene.parse(text)


def test_invalid_prompts_and_scenes_are_refused():
  with pytest.raises(scene.CaptionError, match='share a color'):
    scene.Prompt(objects=((None, 'red', 'circle'), ('big', 'red', 'square')), background='gray')
  with pytest.raises(scene.CaptionError, match='unknown shape'):
    scene.Prompt(objects=((None, 'red', 'hexagon'),), background='gray')
  with pytest.raises(ValueError, match='invalid scene'):
    scene.Scene('red', (_obj('red'),))
  with pytest.raises(ValueError, match='invalid scene'):
    scene.Scene('gray', ())
  with pytest.raises(ValueError, match='unknown size'):
    _obj(size='huge')
  with pytest.raises(ValueError, match='finite'):
    _obj(x=float('nan'))


# ------------------------------------------------------------------------------------------------
# Physics


def _triangle_wave(p0, v, lo, hi, t):
  """Closed form of an elastic bounce between lo and hi: unfold, then fold with period 2 L."""
  span = hi - lo
  u = np.mod(p0 - lo + v * t, 2 * span)
  return lo + span - np.abs(u - span)


def test_trajectory_is_the_closed_form_triangle_wave():
  rng = np.random.default_rng(2)
  t = np.arange(600.0)
  for h, w in ((32, 32), (24, 40), (64, 48)):
    for _ in range(40):
      s = scene.sample_scene(rng, h, w)
      traj = scene.trajectory(s, len(t), h, w)                             # [T, K, 2]
      assert traj.shape == (len(t), len(s.objects), 2)
      for k, o in enumerate(s.objects):
        r = scene.SIZES[o.size] * min(h, w)
        np.testing.assert_allclose(traj[:, k, 0], _triangle_wave(o.x, o.vx, r, w - r, t), atol=1e-8)
        np.testing.assert_allclose(traj[:, k, 1], _triangle_wave(o.y, o.vy, r, h - r, t), atol=1e-8)
        assert traj[:, k, 0].min() >= r - 1e-9 and traj[:, k, 0].max() <= w - r + 1e-9
        assert traj[:, k, 1].min() >= r - 1e-9 and traj[:, k, 1].max() <= h - r + 1e-9
        for axis, (v, side) in enumerate(((o.vx, w), (o.vy, h))):
          if abs(v) * len(t) > 2 * (side - 2 * r):               # long enough to reach both
            assert np.ptp(traj[:, k, axis]) > 0.95 * (side - 2 * r)


def test_bounce_happens_exactly_at_the_border():
  r = scene.SIZES['small'] * 32
  s = scene.Scene('gray', (_obj(x=r + 10.0, y=16.0, vx=-2.0, vy=0.0),))
  x = scene.trajectory(s, 12)[:, 0, 0]
  np.testing.assert_allclose(x[:6], r + 10 - 2 * np.arange(6), atol=1e-12)   # touches at frame 5
  np.testing.assert_allclose(x[6:], r + 2 * np.arange(1, 7), atol=1e-12)     # and comes back
  # crossing mid-step: 0.5 px past the border is reflected to 0.5 px inside
  s = scene.Scene('gray', (_obj(x=32 - r - 1.0, y=16.0, vx=1.5),))
  np.testing.assert_allclose(scene.trajectory(s, 4)[:, 0, 0],
                             [32 - r - 1.0, 32 - r - 0.5, 32 - r - 2.0, 32 - r - 3.5], atol=1e-12)


def test_a_missing_bounce_is_caught():
  """Negative control: an unreflected straight line leaves the frame and fails the closed form."""
  s = scene.Scene('gray', (_obj(x=10.0, y=16.0, vx=1.7, vy=0.0),))
  straight = 10.0 + 1.7 * np.arange(30)
  assert not np.allclose(scene.trajectory(s, 30)[:, 0, 0], straight, atol=1e-3)
  assert straight.max() > 32


def test_trajectory_refuses_objects_outside_the_frame():
  with pytest.raises(ValueError, match='outside'):
    scene.trajectory(scene.Scene('gray', (_obj(x=2.0),)), 3)
  with pytest.raises(ValueError, match='farther'):
    scene.trajectory(scene.Scene('gray', (_obj(vx=40.0),)), 3)


def test_sample_scene_with_a_prompt_matches_it():
  rng = np.random.default_rng(3)
  p = scene.parse('a green triangle and a big white circle bouncing on a black background')
  sizes = set()
  for _ in range(60):
    s = scene.sample_scene(rng, 32, 48, p)
    assert s.background == 'black'
    assert [(o.color, o.shape) for o in s.objects] == [('green', 'triangle'), ('white', 'circle')]
    assert s.objects[1].size == 'big'
    sizes.add(s.objects[0].size)
    a, b = s.objects
    assert math.dist((a.x, a.y), (b.x, b.y)) >= (scene.SIZES[a.size] + scene.SIZES['big']) * 32
    for o in s.objects:
      r = scene.SIZES[o.size] * 32
      assert r <= o.x <= 48 - r and r <= o.y <= 32 - r
      assert 0.8 - 1e-9 <= math.hypot(o.vx, o.vy) <= 2.0 + 1e-9
  assert sizes == {'small', 'big'}
  s = scene.sample_scene(rng, 64, 64, p)
  assert all(1.6 - 1e-9 <= math.hypot(o.vx, o.vy) <= 4.0 + 1e-9 for o in s.objects)


# ------------------------------------------------------------------------------------------------
# Rendering


def _inside(shape, r, dx, dy):
  """Point-in-shape from the spec: circle radius r; square half-side 0.85 r; upright equilateral
  triangle inscribed in the circle (apex up, y down)."""
  if shape == 'circle':
    return dx * dx + dy * dy <= r * r
  if shape == 'square':
    return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
  verts = [(0.0, -r), (-r * math.sqrt(3) / 2, r / 2), (r * math.sqrt(3) / 2, r / 2)]
  ok = np.ones_like(dx, bool)
  for i in range(3):
    (ax, ay), (bx, by), (cx, cy) = verts[i], verts[(i + 1) % 3], verts[(i + 2) % 3]
    side = lambda px, py: (bx - ax) * (py - ay) - (by - ay) * (px - ax)
    ok &= np.sign(side(dx, dy)) == np.sign(side(cx, cy))
  return ok


def _dense_coverage(shape, r, cx, cy, h, w, n=64):
  o = (np.arange(n) + 0.5) / n
  ys = (np.arange(h)[:, None] + o).reshape(-1)
  xs = (np.arange(w)[:, None] + o).reshape(-1)
  gx, gy = np.meshgrid(xs, ys)
  return _inside(shape, r, gx - cx, gy - cy).reshape(h, n, w, n).mean((1, 3))


AREA = {'circle': lambda r: math.pi * r * r, 'square': lambda r: (1.7 * r) ** 2,
        'triangle': lambda r: 3 * math.sqrt(3) / 4 * r * r}


@pytest.mark.parametrize('h, w', [(32, 32), (24, 40)])
@pytest.mark.parametrize('shape', scene.SHAPES)
def test_coverage_matches_area_and_dense_sampling(shape, h, w):
  rng = np.random.default_rng(4)
  for size in scene.SIZES:
    r = scene.SIZES[size] * min(h, w)
    for _ in range(3):
      cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
      frames, cov = scene.render(scene.Scene('gray', (_obj('red', shape, size, cx, cy),)), 1, h, w)
      assert frames.shape == (1, h, w, 3) and cov.shape == (1, 1, h, w)
      assert frames.dtype == np.float32 and cov.dtype == np.float32
      area_tol = 3e-3 if shape == 'circle' else 1e-4         # circle: 0.21% measured at r = 3.4
      assert abs(cov.sum() / AREA[shape](r) - 1) < area_tol
      ref = _dense_coverage(shape, r, cx, cy, h, w)
      tol = 0.07 if shape == 'circle' else 0.02           # midpoint rule on the curve; else exact
      assert np.abs(cov[0, 0] - ref).max() < tol, (shape, size)


def test_a_wrong_shape_fails_the_dense_reference():
  """Negative control: a square rendered where a circle is expected is off by whole pixels."""
  _, cov = scene.render(scene.Scene('gray', (_obj('red', 'square', 'big', 15.3, 16.6),)), 1)
  ref = _dense_coverage('circle', scene.SIZES['big'] * 32, 15.3, 16.6, 32, 32)
  assert np.abs(cov[0, 0] - ref).max() > 0.3


def test_triangle_points_up():
  r = scene.SIZES['big'] * 32
  s = scene.Scene('gray', (_obj(shape='triangle', size='big', x=16.0, y=16.0),))
  _, cov = scene.render(s, 1)
  c = cov[0, 0]
  assert c[int(16 - 0.8 * r), 16] > 0.5 and c[int(16 + 0.8 * r), 16] == 0
  assert c[int(16 + 0.4 * r), 16 - 4] > 0.5                        # wide near its base


def _lens(r0, r1, d):
  """Area of the intersection of two circles (closed form)."""
  a = r0 * r0 * math.acos((d * d + r0 * r0 - r1 * r1) / (2 * d * r0))
  b = r1 * r1 * math.acos((d * d + r1 * r1 - r0 * r0) / (2 * d * r1))
  return a + b - 0.5 * math.sqrt((-d + r0 + r1) * (d + r0 - r1) * (d - r0 + r1) * (d + r0 + r1))


@pytest.mark.parametrize('sizes, front', [(('small', 'small'), 1), (('big', 'big'), 1),
                                          (('small', 'big'), 0), (('big', 'small'), 1)])
def test_overlap_hides_the_object_behind(sizes, front):
  """Two overlapping circles: the front one (smaller; equal sizes: later) keeps its full area, the
  one behind loses the lens; coverages never sum past 1 and colours composite exactly."""
  a = _obj('red', 'circle', sizes[0], 14.2, 15.1)
  b = _obj('blue', 'circle', sizes[1], 18.7, 17.4)
  frames, cov = scene.render(scene.Scene('yellow', (a, b)), 1)
  r = [scene.SIZES[s] * 32 for s in sizes]
  d = math.dist((a.x, a.y), (b.x, b.y))
  areas = cov[0].sum((1, 2))
  behind = 1 - front
  assert abs(areas[front] / (math.pi * r[front] ** 2) - 1) < 2e-3
  assert abs(areas[behind] / (math.pi * r[behind] ** 2 - _lens(r[0], r[1], d)) - 1) < 5e-3
  assert cov[0].sum(0).max() <= 1 + 1e-6 and cov.min() >= 0
  bg, ca, cb = (np.array(scene.COLORS[c], np.float32) for c in ('yellow', 'red', 'blue'))
  want = bg + cov[0, 0, ..., None] * (ca - bg) + cov[0, 1, ..., None] * (cb - bg)
  np.testing.assert_allclose((frames[0] + 1) * 127.5, want, atol=1e-3)


def test_pixel_colours_are_the_palette():
  s = scene.Scene('blue', (_obj('yellow', 'square', 'big', 8.5, 8.5),
                           _obj('white', 'circle', 'small', 24.5, 24.5)))
  frames, _ = scene.render(s, 1)
  u8 = lambda c: np.array(scene.COLORS[c], np.float32) / np.float32(127.5) - 1
  np.testing.assert_allclose(frames[0, 8, 8], u8('yellow'), atol=1e-6)     # pixel centre (8.5, 8.5)
  np.testing.assert_allclose(frames[0, 24, 24], u8('white'), atol=1e-6)
  np.testing.assert_allclose(frames[0, 2, 30], u8('blue'), atol=1e-6)      # far corners
  np.testing.assert_allclose(frames[0, 30, 2], u8('blue'), atol=1e-6)
  assert frames.min() >= -1 and frames.max() <= 1


def test_render_uses_the_trajectory():
  rng = np.random.default_rng(5)
  s = scene.sample_scene(rng, 32, 32, scene.parse('a big red square bouncing on a gray background'))
  _, cov = scene.render(s, 40)
  ys, xs = np.mgrid[0:32, 0:32] + 0.5
  m = cov[:, 0].sum((1, 2))
  centroid = np.stack([(cov[:, 0] * xs).sum((1, 2)) / m, (cov[:, 0] * ys).sum((1, 2)) / m], -1)
  np.testing.assert_allclose(centroid, scene.trajectory(s, 40)[:, 0], atol=0.025)  # pixel centres


# ------------------------------------------------------------------------------------------------
# Batches


def test_sample_batch_is_deterministic_and_well_formed():
  f0, c0 = scene.sample_batch(7, 3, 8, 5)
  f1, c1 = scene.sample_batch(7, 3, 8, 5)
  assert f0.shape == (8, 5, 32, 32, 3) and f0.dtype == np.float32
  assert f0.min() >= -1 and f0.max() <= 1
  np.testing.assert_array_equal(f0, f1)
  assert c0 == c1
  f2, c2 = scene.sample_batch(7, 4, 8, 5)
  f3, _ = scene.sample_batch(8, 3, 8, 5)
  assert not np.array_equal(f0, f2) and c0 != c2
  assert not np.array_equal(f0, f3)
  assert len(set(c0)) > 4                                                # members differ
  for text in c0:
    scene.parse(text)
  frames, _ = scene.sample_batch(7, 3, 2, 5, 24, 40)
  assert frames.shape == (2, 5, 24, 40, 3)


def test_sample_batch_caption_sizes_follow_with_sizes_p():
  _, none = scene.sample_batch(0, 0, 32, 3, with_sizes_p=0.0)
  _, all_ = scene.sample_batch(0, 0, 32, 3, with_sizes_p=1.0)
  _, half = scene.sample_batch(0, 1, 64, 3)
  has_size = lambda t: any(o[0] is not None for o in scene.parse(t).objects)
  assert not any(map(has_size, none)) and all(map(has_size, all_))
  assert 16 < sum(map(has_size, half)) < 48


def test_sample_batch_frames_match_their_captions():
  """Each batch video is a render of a scene its caption describes: its first frame's background
  pixels are the caption's background colour."""
  frames, captions = scene.sample_batch(11, 0, 16, 2)
  for f, text in zip(frames, captions):
    p = scene.parse(text)
    bg = np.array(scene.COLORS[p.background], np.float32) / np.float32(127.5) - 1
    share = np.mean(np.all(np.abs(f[0] - bg) < 1e-5, -1))
    assert share > 0.5, text


def test_sample_batch_speed():
  scene.sample_batch(0, 0, 16, 9)
  times = []
  for i in range(5):
    t = time.perf_counter()
    scene.sample_batch(0, i, 16, 9)
    times.append(time.perf_counter() - t)
  assert min(times) < 0.05, f'16 x 9 frames at 32x32 took {min(times) * 1e3:.1f} ms'
