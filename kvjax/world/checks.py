"""Ground-truth checks of a generated video against a prompt, with the world's own palette.

A video [T, H, W, 3] (uint8, or float in [-1, 1] as the renderer and the codec produce) is read
against a ``scene.Prompt``:

- background (``background_score``): the fraction of pixels, over all frames, whose nearest
  palette colour (``classify``) is the prompted background;
- objects (``unmix``): each pixel is fitted as a mixture of the prompt's background and object
  colours, which is how the renderer composites, so an anti-aliased edge counts as a fraction of
  its object and is not taken for a third palette colour (an edge half blue, half yellow is
  nearly gray);
- presence (``object_scores``): per object, the fraction of frames in which its colour forms an
  object: a compact blob (CONCENTRATION_MIN of its weight near its centroid) with enough solid
  pixels (AREA_FRAC of a small object's area);
- motion (``motion_score``, ``tracks``): the blob centroid per frame, its mean step and its
  jerk (per-axis median |second difference|, so bounce frames do not dominate); an object moves
  coherently when present often enough, with small jerk, and moving.

``evaluate`` combines them into one ``passed`` with margins. Thresholds are stated at 32x32
(lengths scale with min(H, W) / 32, areas with its square) and set from measurements on seeded
``scene.sample_scene`` scenes: 2,000 videos of 9 frames and 600 of 21 frames at 32x32, 150 of 9
frames at 64x64 and 200 at 32x48. Positive control, the renderer's videos of the prompt: 99.85%
pass (the 4 failures of 2,600 at 32x32: an object hidden behind a same-sized one moving
alongside it for more than 40% of the frames; 100% at 64x64 and 32x48). Negative controls, 0%
pass each (600 of 9 and 300 of 21 frames at 32x32, and the other sizes): uniform RGB noise,
smooth noise (independent random 4x4 blocks per frame), a constant video of another colour, the
same scene on another background, the same scene with one object recoloured, the prompt's
objects teleported to random places every frame, and the objects standing still. Each
threshold's docstring gives the measured ranges. Fewer frames make the motion numbers noisier:
use T >= 7 (at most one bounce per axis in 7 frames, so the median of 5 second differences
ignores it).
"""

from __future__ import annotations

import numpy as np

from kvjax.world import scene

BACKGROUND_MIN = 0.5
"""Background fraction to pass. Renders: min 0.686, median 0.88 (two big objects cover up to
2 pi 7.04^2 = 311 of 1024 px); uniform noise median 0.107, max 0.352 (gray's palette cell is the
largest); smooth noise max 0.438; the scene on another background max 0.033 (only anti-aliased
edges); a constant other colour 0."""

AREA_FRAC = 0.3
"""A present object has at least this fraction of the area of a *small* object of its shape in
solid pixels (8 px for a triangle, 17 for a square, 19 for a circle at 32x32). Renders: solid
pixels >= 0.65 of the object's area when it is fully visible. Sizes are not checked, so a model
that draws an object somewhat too small still passes; uniform noise has up to 30 solid pixels
near its centroid, which the concentration rejects."""

SOLID_MIN = 0.75
"""A pixel is solidly the object's colour when ``unmix`` gives it at least this weight. Rejects
half-tone explanations (a gray object on white unmixes as black at 0.5, so a prompt's black
object is not present in a video of a gray one)."""

CONCENTRATION_MIN = 0.6
"""Fraction of an object's ``unmix`` weight within the disc around its centroid for it to be
present. Renders: >= 0.997 in every frame where the object is fully visible; uniform noise at
most 0.43 (median 0.29: the disc covers a fifth of the frame); the colour smeared over half the
frame besides the object: 0.39 (FILL_MIN alone would pass that filled disc)."""

FILL_MIN = 0.35
"""Solid pixels / (2 pi mean squared distance to the centroid + 1): about 1 for a filled disc,
0.83 for a triangle, 0.95 for a square, 0.2 for a one-pixel ring of radius 5. Rejects the
anti-aliased ring of an object whose blend with the background looks like the prompted colour
(blue on yellow, or black on white, reads as gray). Renders: >= 0.71 when fully visible (a
partly hidden object's crescent may fall below); such rings: <= 0.25."""

CONCENTRATION_PAD = 1.5
"""The disc's radius is the big radius (7.04 px at 32x32) plus this pad (px at 32x32): every
pixel touched by any shape lies within the big radius + 0.71 px of its centre."""

PRESENCE_MIN = 0.6
"""Fraction of frames in which each object must be present. Renders: median 1, below 0.6 in 4
of 2,600 (min 0.43: hidden behind a same-sized object moving alongside it); uniform noise,
a constant colour, the scene with the object recoloured: 0."""

JERK_MAX = 3.0
"""Per-axis median |second difference| of the centroid track (their Euclidean norm), in
px/frame^2 at 32x32. Renders: median 0.02, max 1.61 (9 frames) and 0.59 (21 frames), non-zero
only from occlusion by the other object and pixel-centre weighting; teleporting objects: min
3.94, 0.1% quantile 5.3, 1% quantile 7.2 (9 frames), min 5.9 (21 frames)."""

STEP_MIN = 0.25
"""Mean centroid step (px/frame at 32x32) for an object to count as moving. Renders: >= 0.62
(speeds are >= 0.8, shortened by bounces and occlusion); objects standing still: 0."""

UNMIX_RESIDUAL_MAX = 60.0
"""A pixel farther than this (uint8 RGB) from every mixture of the prompt's colours is explained
by none of them: about half the palette's smallest distance (139, green-gray)."""


def _u8(frames) -> np.ndarray:
  """[T, H, W, 3] uint8, or float in [-1, 1] -> float32 on the uint8 scale."""
  x = np.asarray(frames)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'frames must be [T, H, W, 3], got {x.shape}')
  if x.dtype == np.uint8:
    return x.astype(np.float32)
  if not np.issubdtype(x.dtype, np.floating):
    raise TypeError(f'frames must be uint8 or float in [-1, 1], got {x.dtype}')
  return (x.astype(np.float32) + 1.0) * np.float32(127.5)


def classify(frames) -> np.ndarray:
  """Nearest palette colour per pixel (fp32 Euclidean RGB): [T, H, W] int index into COLORS."""
  x = _u8(frames)
  d = ((x[..., None, :] - scene.PALETTE) ** 2).sum(-1)                    # [T, H, W, 7]
  return np.argmin(d, axis=-1)


def background_score(frames, prompt: scene.Prompt) -> float:
  """Fraction of pixels over all frames whose nearest palette colour is the background."""
  labels = classify(frames)
  return float(np.mean(labels == scene.COLOR_NAMES.index(prompt.background)))


def unmix(frames, prompt: scene.Prompt) -> np.ndarray:
  """Per-pixel fraction of each prompted object's colour: [T, K, H, W] float32 in [0, 1].

  Each pixel x (uint8 scale) is fitted as bg + sum_k a_k (c_k - bg) with the prompt's
  background bg and object colours c_k, a_k >= 0 and sum_k a_k <= 1 (coverage fractions), by
  least squares over the faces of that simplex (background only, each object with the
  background, the two objects without it, all three): exact for K <= 2. The renderer composites
  exactly this way, so on its videos ``unmix`` returns the coverage ``scene.render`` reports
  (the prompt's colour differences are linearly independent: the world excludes black, gray and
  white together, the one collinear set). Pixels whose residual exceeds UNMIX_RESIDUAL_MAX are
  explained by no prompted colour and get 0. Unlike nearest-palette labels, an edge pixel half
  blue and half yellow is not taken for gray, and the centroid keeps the edges' sub-pixel
  information.
  """
  x = _u8(frames)                                                          # [T, H, W, 3]
  bg = np.asarray(scene.COLORS[prompt.background], np.float32)
  a = np.stack([np.asarray(scene.COLORS[c], np.float32) - bg for _, c, _ in prompt.objects])
  k = a.shape[0]                                                           # a: [K, 3]
  d = x - bg                                                               # [T, H, W, 3]
  cands = [np.zeros(d.shape[:-1] + (k,), np.float32)]
  for j in range(k):                                                       # object j alone
    alpha = np.zeros(d.shape[:-1] + (k,), np.float32)
    alpha[..., j] = np.clip(d @ a[j] / (a[j] @ a[j]), 0.0, 1.0)
    cands.append(alpha)
  if k == 2:
    e = a[0] - a[1]                                    # no background: a c_0 + (1 - a) c_1
    alpha = np.clip((d - a[1]) @ e / (e @ e), 0.0, 1.0)
    cands.append(np.stack([alpha, 1 - alpha], -1))
    g = a @ a.T                                                            # [2, 2]
    det = g[0, 0] * g[1, 1] - g[0, 1] * g[1, 0]
    if det > 1e-6 * g[0, 0] * g[1, 1]:                 # all three: interior of the simplex
      alpha = (d @ a.T) @ np.linalg.inv(g).T.astype(np.float32)           # [T, H, W, 2]
      inside = np.all(alpha >= 0, -1, keepdims=True) & (alpha.sum(-1, keepdims=True) <= 1)
      cands.append(np.where(inside, alpha, 0.0))
  cands = np.stack(cands)                                                  # [C, T, H, W, K]
  res = np.linalg.norm(d - cands @ a, axis=-1)                             # [C, T, H, W]
  best = np.take_along_axis(cands, np.argmin(res, 0)[None, ..., None], 0)[0]
  best = np.where((res.min(0) <= UNMIX_RESIDUAL_MAX)[..., None], best, 0.0)
  return np.moveaxis(best, -1, 1).astype(np.float32)                       # [T, K, H, W]


def _blobs(frames, prompt: scene.Prompt):
  """Per prompted object and frame: present [T, K] bool and centroid [T, K, 2] (x, y; NaN where
  absent), from the ``unmix`` weights w. The centroid of w is refined twice within the
  concentration disc (the big radius + CONCENTRATION_PAD) around the previous one. The object is
  present when that disc holds at least CONCENTRATION_MIN of the frame's total w and at least
  AREA_FRAC of a small object's area in solid pixels (w >= SOLID_MIN)."""
  w = unmix(frames, prompt)                                                # [T, K, H, W]
  h, wd = w.shape[2:]
  s = min(h, wd) / scene.REF_SIDE
  ys, xs = np.mgrid[0:h, 0:wd].astype(np.float32) + np.float32(0.5)       # pixel centres
  radius = scene.SIZES['big'] * min(h, wd) + CONCENTRATION_PAD * s
  total = w.sum((2, 3))                                                    # [T, K]
  safe = np.maximum(total, 1e-6)
  cx, cy = (w * xs).sum((2, 3)) / safe, (w * ys).sum((2, 3)) / safe        # [T, K]
  for _ in range(2):
    disc = (xs - cx[..., None, None]) ** 2 + (ys - cy[..., None, None]) ** 2 <= radius ** 2
    near = w * disc                                                        # [T, K, H, W]
    mass = near.sum((2, 3))
    safe = np.maximum(mass, 1e-6)
    cx, cy = (near * xs).sum((2, 3)) / safe, (near * ys).sum((2, 3)) / safe
  solid_px = (w >= SOLID_MIN) & disc                                       # [T, K, H, W]
  solid = solid_px.sum((2, 3))                                             # [T, K]
  spread = (solid_px * ((xs - cx[..., None, None]) ** 2 + (ys - cy[..., None, None]) ** 2)).sum(
      (2, 3)) / np.maximum(solid, 1)                                       # mean squared radius
  fill = solid / (2 * np.pi * spread + 1.0)              # ~1 for a filled disc, << 1 for a ring
  min_area = np.array([AREA_FRAC * scene.shape_area(shape, scene.radius_px('small', h, wd))
                       for _, _, shape in prompt.objects], np.float32)
  present = (solid >= min_area) & (mass >= CONCENTRATION_MIN * total) & (fill >= FILL_MIN)
  centroid = np.where(present[..., None], np.stack([cx, cy], -1), np.nan).astype(np.float32)
  return present, centroid


def object_scores(frames, prompt: scene.Prompt) -> list[float]:
  """Per prompted object, the fraction of frames in which it is present (see ``_blobs``)."""
  present, _ = _blobs(frames, prompt)
  return [float(p) for p in present.mean(0)]


def tracks(frames, prompt: scene.Prompt) -> np.ndarray:
  """Centroid (x, y) in pixels of each prompted object's colour blob per frame: [T, K, 2]
  float32, NaN where the object is absent."""
  return _blobs(frames, prompt)[1]


def _motion(present: np.ndarray, track: np.ndarray, scale: float) -> dict:
  """One object's present [T] and track [T, 2] -> its motion numbers (see motion_score)."""
  step = np.linalg.norm(track[1:] - track[:-1], axis=-1)                   # [T-1], NaN if absent
  d2 = np.abs(track[2:] - 2 * track[1:-1] + track[:-2])                    # [T-2, 2]
  step, d2 = step[np.isfinite(step)], d2[np.all(np.isfinite(d2), -1)]
  out = dict(presence=float(present.mean()),
             mean_step=float(step.mean()) if step.size else float('nan'),
             jerk=float(np.linalg.norm(np.median(d2, 0))) if d2.size else float('inf'))
  out['moving'] = bool(out['mean_step'] >= STEP_MIN * scale)
  out['coherent'] = bool(out['presence'] >= PRESENCE_MIN and out['jerk'] <= JERK_MAX * scale
                         and out['moving'])
  return out


def motion_score(frames, prompt: scene.Prompt) -> dict:
  """Motion of the prompted objects (T >= 3 frames; T >= 7 advised, see the module docstring).

  Returns ``mean_step`` (px/frame, mean over objects; NaN when an object is never present twice
  in a row), ``jerk`` (px/frame^2, the worst object's per-axis median |second difference|; inf
  when no three consecutive frames hold it), ``coherent`` (every object present in
  >= PRESENCE_MIN of frames, jerk <= JERK_MAX and mean step >= STEP_MIN, lengths scaled to the
  frame size) and ``objects``: per object a dict with color, shape, presence, mean_step, jerk,
  moving, coherent.
  """
  x = _u8(frames)
  if x.shape[0] < 3:
    raise ValueError(f'motion needs at least 3 frames, got {x.shape[0]}')
  present, centroid = _blobs(frames, prompt)
  s = min(x.shape[1:3]) / scene.REF_SIDE
  objs = []
  for k, (_, color, shape) in enumerate(prompt.objects):
    objs.append(dict(color=color, shape=shape, **_motion(present[:, k], centroid[:, k], s)))
  return dict(mean_step=float(np.mean([o['mean_step'] for o in objs])),
              jerk=float(max(o['jerk'] for o in objs)),
              coherent=all(o['coherent'] for o in objs), objects=objs)


def evaluate(frames, prompt: scene.Prompt) -> dict:
  """All checks: ``passed`` = background >= BACKGROUND_MIN and every object coherent (present in
  >= PRESENCE_MIN of frames, jerk <= JERK_MAX, mean step >= STEP_MIN).

  Returns motion_score's keys plus ``background``, ``presence`` (per object) and margins, each
  positive when that part passes (lengths in px at this frame size): ``background_margin``,
  ``presence_margin`` (worst object), ``jerk_margin`` (scaled JERK_MAX minus the worst jerk),
  ``step_margin`` (slowest object's mean step minus scaled STEP_MIN; -inf when unmeasurable).
  """
  motion = motion_score(frames, prompt)
  s = min(np.shape(frames)[1:3]) / scene.REF_SIDE
  bg = background_score(frames, prompt)
  objs = motion['objects']
  steps = np.array([o['mean_step'] for o in objs])
  out = dict(
      motion,
      background=bg,
      background_margin=bg - BACKGROUND_MIN,
      presence=[o['presence'] for o in objs],
      presence_margin=min(o['presence'] for o in objs) - PRESENCE_MIN,
      jerk_margin=JERK_MAX * s - motion['jerk'],
      step_margin=(float(steps.min() - STEP_MIN * s) if np.all(np.isfinite(steps))
                   else float('-inf')),
  )
  out['passed'] = bool(bg >= BACKGROUND_MIN and motion['coherent'])
  return out
