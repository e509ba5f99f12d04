"""Ground-truth checks: the renderer's own videos of a prompt pass with margins; noise, a constant
colour, another prompt's video, teleporting and frozen objects fail the check that should catch
them. Unmixing recovers the renderer's coverage, and tracks its physics.
"""

import dataclasses

import numpy as np
import pytest

from kvjax import video
from kvjax.world import checks
from kvjax.world import scene

T = 9


def _scenes(n, seed, h=32, w=32):
  rng = np.random.default_rng(seed)
  return [scene.sample_scene(rng, h, w) for _ in range(n)]


def _valid(background, objects):
  try:
    return scene.Scene(background, tuple(objects))
  except ValueError:
    return None


def _palette_video(color, shape=(T, 32, 32)):
  rgb = np.array(scene.COLORS[color], np.float32) / np.float32(127.5) - 1
  return np.broadcast_to(rgb, shape + (3,)).copy()


def _teleport(s, rng, h=32, w=32):
  """The scene's objects at a fresh random place every frame."""
  frames = []
  for _ in range(T):
    objs = []
    for o in s.objects:
      r = scene.SIZES[o.size] * min(h, w)
      objs.append(dataclasses.replace(o, x=rng.uniform(r, w - r), y=rng.uniform(r, h - r)))
    frames.append(scene.render(scene.Scene(s.background, tuple(objs)), 1, h, w)[0][0])
  return np.stack(frames)


# ------------------------------------------------------------------------------------------------
# Building blocks


def test_classify_maps_the_palette_to_itself():
  rgb = np.array(list(scene.COLORS.values()), np.uint8)                  # [7, 3]
  frames = np.broadcast_to(rgb[None, :, None, :], (2, 7, 3, 3)).copy()   # [T, H=7, W, 3]
  want = np.broadcast_to(np.arange(7)[None, :, None], (2, 7, 3))
  np.testing.assert_array_equal(checks.classify(frames), want)
  np.testing.assert_array_equal(checks.classify(frames.astype(np.float32) / 127.5 - 1), want)
  jitter = np.random.default_rng(0).integers(-40, 41, frames.shape)       # |.| < 139 / 2 / sqrt(3)
  noisy = np.clip(frames.astype(np.int32) + jitter, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(checks.classify(noisy), want)


def test_frames_of_the_wrong_form_are_refused():
  with pytest.raises(ValueError, match=r'\[T, H, W, 3\]'):
    checks.classify(np.zeros((32, 32, 3), np.float32))
  with pytest.raises(TypeError, match='uint8 or float'):
    checks.classify(np.zeros((2, 4, 4, 3), np.int32))
  p = scene.parse('a red circle bouncing on a gray background')
  with pytest.raises(ValueError, match='at least 3 frames'):
    checks.evaluate(_palette_video('gray', (2, 32, 32)), p)


@pytest.mark.parametrize('h, w', [(32, 32), (24, 40)])
def test_unmix_recovers_the_renderers_coverage(h, w):
  for s in _scenes(25, 1, h, w):
    frames, cov = scene.render(s, 4, h, w)
    p = scene.to_prompt(s)
    np.testing.assert_allclose(checks.unmix(frames, p), cov, atol=1e-4)
    u8 = checks.unmix(video.to_uint8(frames), p)                          # rounding: 0.5 / 255
    np.testing.assert_allclose(u8, cov, atol=0.02)


def test_tracks_follow_the_physics():
  """A fully visible object's track is its trajectory (sub-pixel: only the pixel-centre weighting
  of edge pixels differs)."""
  for s in _scenes(30, 2):
    s = scene.Scene(s.background, s.objects[:1])
    got = checks.tracks(scene.render(s, 12)[0], scene.to_prompt(s))
    np.testing.assert_allclose(got, scene.trajectory(s, 12), atol=0.03)


@pytest.mark.parametrize('background, color', [('yellow', 'blue'), ('white', 'black')])
def test_an_edge_ring_is_not_an_object(background, color, monkeypatch):
  """Blue on yellow (and black on white) blends to nearly gray: the anti-aliased ring of a square
  whose top edge crosses the middle of a pixel row must not count as a gray square. Without the
  fill criterion it would."""
  s = scene.Scene(background, (scene.Obj(color, 'square', 'big', 16.0, 20.484, 0.0, 0.0),))
  p = scene.Prompt(objects=((None, 'gray', 'square'),), background=background)
  frames, _ = scene.render(s, 3)
  assert checks.object_scores(frames, p) == [0.0]
  assert np.isnan(checks.tracks(frames, p)).all()
  monkeypatch.setattr(checks, 'FILL_MIN', 0.0)
  assert checks.object_scores(frames, p) == [1.0]


def test_a_smeared_colour_is_not_an_object(monkeypatch):
  """The prompted colour over half the frame (besides the object) is no compact object: the
  concentration rejects it (a filled disc around the centroid passes the fill criterion)."""
  s = scene.Scene('gray', (scene.Obj('red', 'circle', 'small', 24.0, 16.0, 1.0, 0.5),))
  frames, _ = scene.render(s, T)
  frames[:, :, :14] = np.array(scene.COLORS['red'], np.float32) / np.float32(127.5) - 1
  p = scene.to_prompt(s)
  assert checks.object_scores(frames, p) == [0.0]
  monkeypatch.setattr(checks, 'CONCENTRATION_MIN', 0.0)
  assert checks.object_scores(frames, p) == [1.0]


# ------------------------------------------------------------------------------------------------
# Positive control


def test_renders_of_a_prompt_pass_with_margins():
  worst = dict(background_margin=np.inf, presence_margin=np.inf, jerk_margin=np.inf,
               step_margin=np.inf)
  for i, s in enumerate(_scenes(40, 3)):
    frames, _ = scene.render(s, T)
    frames = frames if i % 2 else video.to_uint8(frames)
    e = checks.evaluate(frames, scene.to_prompt(s, bool(i % 3)))
    assert e['passed'], (scene.caption(s), e)
    for k in worst:
      worst[k] = min(worst[k], e[k])
  assert worst['background_margin'] > 0.15          # renders: >= 0.69 against 0.5
  assert worst['jerk_margin'] > 1.0                 # renders: <= 1.6 against 3.0
  assert worst['step_margin'] > 0.3                 # renders: >= 0.6 against 0.25
  assert worst['presence_margin'] >= 0.05


@pytest.mark.parametrize('text', [
    'a green triangle bouncing on a black background',
    'a big red circle and a small blue square bouncing on a gray background',
    'a yellow square and a white triangle bouncing on a blue background',
    'a small black circle bouncing on a white background',
])
def test_held_out_prompts_render_and_pass(text):
  p = scene.parse(text)
  rng = np.random.default_rng(4)
  for h, w in ((32, 32), (64, 64)):
    s = scene.sample_scene(rng, h, w, p)
    e = checks.evaluate(scene.render(s, 12, h, w)[0], p)
    assert e['passed'], e
    assert checks.motion_score(scene.render(s, 12, h, w)[0], p)['coherent']


# ------------------------------------------------------------------------------------------------
# Negative controls


def test_uniform_noise_fails():
  rng = np.random.default_rng(5)
  for s in _scenes(15, 5):
    p = scene.to_prompt(s)
    e = checks.evaluate(rng.uniform(-1, 1, (T, 32, 32, 3)).astype(np.float32), p)
    assert not e['passed']
    assert e['background'] < 0.4                    # measured <= 0.35; renders >= 0.69
    assert max(e['presence']) == 0                  # no compact blob of any colour
    assert e['jerk'] == np.inf and not e['coherent']


def test_smooth_noise_fails():
  """Random 4x4 colour blocks per frame: blobs exist, but not on the prompted background and
  not moving coherently."""
  rng = np.random.default_rng(6)
  for s in _scenes(15, 6):
    low = rng.uniform(-1, 1, (T, 4, 4, 3)).astype(np.float32)
    e = checks.evaluate(np.repeat(np.repeat(low, 8, 1), 8, 2), scene.to_prompt(s))
    assert not e['passed'] and e['background'] < 0.5


def test_a_constant_wrong_colour_fails():
  for s in _scenes(10, 7):
    used = {s.background} | {o.color for o in s.objects}
    other = next(c for c in scene.COLORS if c not in used)
    e = checks.evaluate(_palette_video(other), scene.to_prompt(s))
    assert not e['passed'] and e['background'] == 0 and max(e['presence']) == 0


def test_another_background_fails_the_background_check():
  rng = np.random.default_rng(8)
  for s in _scenes(15, 8):
    others = [x for x in (_valid(c, s.objects) for c in scene.COLORS if c != s.background) if x]
    other = others[rng.integers(len(others))]
    e = checks.evaluate(scene.render(other, T)[0], scene.to_prompt(s))
    assert not e['passed'] and e['background'] < 0.05 and e['background_margin'] < -0.4
  # the same video against its own prompt passes: the background is what failed
  assert checks.evaluate(scene.render(other, T)[0], scene.to_prompt(other))['passed']


def test_an_object_of_another_colour_fails_presence():
  rng = np.random.default_rng(9)
  for s in _scenes(20, 9):
    recolored = [x for x in (_valid(s.background, (dataclasses.replace(s.objects[0], color=c),)
                                    + s.objects[1:]) for c in scene.COLORS) if x]
    recolored = [x for x in recolored if x.objects[0].color != s.objects[0].color]
    other = recolored[rng.integers(len(recolored))]
    e = checks.evaluate(scene.render(other, T)[0], scene.to_prompt(s))
    assert not e['passed'], (scene.caption(s), scene.caption(other))
    assert e['presence'][0] < checks.PRESENCE_MIN and e['background_margin'] > 0
    assert not e['objects'][0]['coherent']


def test_teleporting_objects_fail_the_jerk():
  rng = np.random.default_rng(10)
  for s in _scenes(20, 10):
    e = checks.evaluate(_teleport(s, rng), scene.to_prompt(s))
    assert not e['passed']
    assert e['background_margin'] > 0                # the frames themselves look right
    assert e['jerk'] > 1.3 * checks.JERK_MAX         # measured >= 3.9 (0.1% quantile 5.3)
    assert not e['coherent']


def test_frozen_objects_fail_the_motion_check():
  for s in _scenes(10, 11):
    frozen = scene.Scene(s.background, tuple(dataclasses.replace(o, vx=0.0, vy=0.0)
                                             for o in s.objects))
    e = checks.evaluate(scene.render(frozen, T)[0], scene.to_prompt(s))
    assert not e['passed'] and e['mean_step'] < 0.05 and e['step_margin'] < 0
    assert all(not o['moving'] for o in e['objects'])


def test_thresholds_scale_with_the_frame():
  """The same scene at 64x64 (twice the speeds and sizes) passes, and its teleporting version
  fails, with the thresholds scaled."""
  rng = np.random.default_rng(12)
  for s in _scenes(5, 12, 64, 64):
    assert checks.evaluate(scene.render(s, T, 64, 64)[0], scene.to_prompt(s))['passed']
    e = checks.evaluate(_teleport(s, rng, 64, 64), scene.to_prompt(s))
    assert e['jerk'] > 2 * checks.JERK_MAX and not e['passed']
