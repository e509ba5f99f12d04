"""A procedural video world: coloured shapes bouncing on a plain background, with captions.

What the world is. A video shows one or two objects over a plain background colour. Each object
has a colour, a shape and a size; it moves at constant velocity and bounces off the frame
borders. Everything is drawn from a seed (numpy only, no jax), so training batches are made on
the fly and any video can be rebuilt from ``(seed, index)``.

Caption grammar (lower case; parsing is case-insensitive, collapses whitespace and allows one
trailing '.')::

  caption := object ["and" object] "bouncing" "on" "a" COLOR "background"
  object  := "a" [SIZE] COLOR SHAPE

for example "a big red circle and a blue square bouncing on a gray background". ``VOCAB`` holds
every word the grammar uses, in this fixed order: the grammar words ``a and bouncing on
background``, then the sizes, colours and shapes in the order of ``SIZES``, ``COLORS`` and
``SHAPES`` (17 words). Semantic constraints (``CaptionError`` otherwise): at most
``MAX_OBJECTS`` = 2 objects, the objects' colours differ from each other and from the
background, and black, gray and white do not all three appear in one caption. They keep the
ground-truth checks (``kvjax.world.checks``) well defined: those find each object by its colour,
so a colour must name exactly one thing in the frame, and gray is the 50% blend of black and
white, so the anti-aliased edge of a black object on white would read as a gray object (3 of
the 105 two-object colour sets are excluded).

Colours (uint8 RGB; frames store c / 127.5 - 1): red (230, 30, 30), green (30, 200, 60), blue
(40, 70, 230), yellow (240, 220, 40), white (245, 245, 245), black (15, 15, 15), gray (128, 128,
128); every pair is at least 139 apart in RGB Euclidean distance (green-gray is the closest;
red-yellow 190).

Sizes: the object's radius as a fraction of the frame's shorter side, small 0.14 and big 0.22
(4.48 px and 7.04 px at 32x32). Shapes, all inside the circle of that radius around the centre:
circle (radius r), square (axis-aligned, half-side 0.85 r), triangle (upright equilateral
inscribed in the circle: apex at (x, y - r), base at y + r / 2; its centroid is the centre).

Frame geometry: pixel (row j, column i) covers [i, i + 1) x [j, j + 1); positions are in pixels
with x to the right and y downwards, so the frame is [0, W] x [0, H] and pixel centres sit at
half-integers.

Physics (deterministic): each object starts at a centre drawn uniformly in [r, W - r] x
[r, H - r], with a speed drawn uniformly in [0.8, 2.0] px/frame at 32 px (scaled by
min(H, W) / 32) in a uniform direction. Two objects do not overlap at frame 0: the first of 64
candidate placements that keeps them apart is taken (a candidate succeeds with probability 0.16
for two big objects, so all fail for about 1 in 90,000 such pairs; then they start overlapping).
Each frame an object moves by its velocity; when its extent (the radius) would cross a border
the velocity component is reflected and the position is reflected back inside (an elastic
bounce), so the centre follows a triangle wave between r and W - r (resp. H - r). Objects do not
interact. Depth: a smaller object is drawn in front of a bigger one, and of two objects of the
same size the later one is in front (deviation from "later on top": a big object would otherwise
hide a small one completely for frames at a time, which the presence check would count as the
object missing).

Rendering: anti-aliased coverage, exact along x and supersampled along y. Every shape is convex
and symmetric about its vertical axis, so a horizontal line cuts it in one interval
[x - w(y), x + w(y)]. Each pixel row has ``SUBROWS`` = 4 sub-rows; the part of a sub-row inside
the shape's vertical extent (its fraction f) is cut at its middle, and the pixel's coverage is
the mean over its sub-rows of f times that interval's overlap with [i, i + 1). Squares come out
exact, triangles within 0.01 of a 64x64 point sampling per pixel, circles within 0.06 near their
top and bottom (the midpoint rule on the curve; area within 0.13% at radius 4.5 px, 0.4% at
2.2 px). Deviation from a 4x4 point supersampling: more accurate (that one is off by up to 1/8
per pixel at horizontal edges) and about 4x less work. With two objects, the one behind loses,
per sub-row, the intersection of the two intervals over the rows both cover. The frame is
background + sum_k coverage_k (colour_k - background) on the uint8 scale.
Textured backgrounds are not part of this world: the grammar names one background colour.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    'red': (230, 30, 30),
    'green': (30, 200, 60),
    'blue': (40, 70, 230),
    'yellow': (240, 220, 40),
    'white': (245, 245, 245),
    'black': (15, 15, 15),
    'gray': (128, 128, 128),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], np.float32)  # [7, 3] uint8 scale
SHAPES = ('circle', 'square', 'triangle')
SIZES: dict[str, float] = {'small': 0.14, 'big': 0.22}
SQUARE_HALF = 0.85          # square half-side / radius
MAX_OBJECTS = 2
REF_SIDE = 32               # speeds are stated at this frame side and scale with min(H, W)
SPEED_RANGE = (0.8, 2.0)    # px/frame at REF_SIDE
SUBROWS = 4                 # sub-rows per pixel row (vertical supersampling)
PLACEMENT_TRIES = 64        # candidate placements drawn to put two objects apart at frame 0
GRAMMAR_WORDS = ('a', 'and', 'bouncing', 'on', 'background')
VOCAB: tuple[str, ...] = GRAMMAR_WORDS + tuple(SIZES) + COLOR_NAMES + SHAPES
_VOCAB_SET = frozenset(VOCAB)
_SQRT3 = math.sqrt(3.0)
_BLENDED = ('black', 'gray', 'white')   # gray = (black + white) / 2 within 3 RGB units


class CaptionError(ValueError):
  """A caption outside the world's grammar, vocabulary or constraints (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Obj:
  """One object: centre (x, y) in pixels at frame 0, velocity (vx, vy) in pixels per frame."""
  color: str
  shape: str
  size: str
  x: float
  y: float
  vx: float
  vy: float

  def __post_init__(self):
    _check_names(self.size, self.color, self.shape, ValueError)
    if not all(math.isfinite(v) for v in (self.x, self.y, self.vx, self.vy)):
      raise ValueError(f'object position and velocity must be finite, got {self}')


@dataclasses.dataclass(frozen=True)
class Scene:
  """A background colour and 1 to MAX_OBJECTS objects (smaller in front; equal sizes: later)."""
  background: str
  objects: tuple[Obj, ...]

  def __post_init__(self):
    try:
      _check_colors(self.background, [o.color for o in self.objects])
    except CaptionError as e:
      raise ValueError(f'invalid scene: {e}') from None


@dataclasses.dataclass(frozen=True)
class Prompt:
  """What a caption asks for: objects as (size or None when unnamed, color, shape)."""
  objects: tuple[tuple[str | None, str, str], ...]
  background: str

  def __post_init__(self):
    for size, color, shape in self.objects:
      if size is not None:
        _check_names(size, color, shape, CaptionError)
      else:
        _check_names('small', color, shape, CaptionError)
    _check_colors(self.background, [c for _, c, _ in self.objects])


def _check_names(size, color, shape, err):
  if size not in SIZES:
    raise err(f'unknown size {size!r}; sizes: {", ".join(SIZES)}')
  if color not in COLORS:
    raise err(f'unknown color {color!r}; colors: {", ".join(COLOR_NAMES)}')
  if shape not in SHAPES:
    raise err(f'unknown shape {shape!r}; shapes: {", ".join(SHAPES)}')


def _check_colors(background: str, colors: Sequence[str]):
  """The world's semantic constraints (CaptionError)."""
  if background not in COLORS:
    raise CaptionError(f'unknown background color {background!r}; colors: {", ".join(COLOR_NAMES)}')
  if not 1 <= len(colors) <= MAX_OBJECTS:
    raise CaptionError(f'a caption names 1 to {MAX_OBJECTS} objects, got {len(colors)}')
  if background in colors:
    raise CaptionError(f'an object has the background color {background!r} (it would be invisible)')
  if len(set(colors)) != len(colors):
    raise CaptionError(f'two objects share a color ({", ".join(colors)}); '
                       'each object needs its own color')
  if set(_BLENDED) <= {background, *colors}:
    raise CaptionError('black, gray and white cannot all appear in one caption (gray is their '
                       'blend: a black edge on white would look like a gray object)')


# ------------------------------------------------------------------------------------------------
# Grammar


def format_prompt(prompt: Prompt) -> str:
  """The canonical caption of a prompt (sizes named where the prompt has them)."""
  objs = [' '.join(['a'] + ([size] if size else []) + [color, shape])
          for size, color, shape in prompt.objects]
  return f'{" and ".join(objs)} bouncing on a {prompt.background} background'


def to_prompt(scene: Scene, with_sizes: bool = True) -> Prompt:
  """The prompt a scene answers; sizes None unless ``with_sizes``."""
  return Prompt(objects=tuple((o.size if with_sizes else None, o.color, o.shape)
                              for o in scene.objects), background=scene.background)


def caption(scene: Scene, with_sizes: bool = True) -> str:
  """The canonical caption of a scene; ``parse(caption(s, w)) == to_prompt(s, w)``."""
  return format_prompt(to_prompt(scene, with_sizes))


class _Words:
  """A cursor over a caption's words for the recursive-descent parser."""

  def __init__(self, text: str, words: list[str]):
    self.text, self.words, self.pos = text, words, 0

  def peek(self) -> str | None:
    return self.words[self.pos] if self.pos < len(self.words) else None

  def take(self, allowed: Sequence[str], what: str) -> str:
    word = self.peek()
    if word not in allowed:
      got = f'{word!r}' if word is not None else 'the end of the caption'
      raise CaptionError(f'caption {self.text!r}: expected {what} at word {self.pos + 1}, '
                         f'got {got}')
    self.pos += 1
    return word


_COLOR_WHAT = f'a color ({", ".join(COLOR_NAMES)})'
_SHAPE_WHAT = f'a shape ({", ".join(SHAPES)})'
_SIZE_OR_COLOR_WHAT = f'a size ({", ".join(SIZES)}) or {_COLOR_WHAT}'


def parse(text: str) -> Prompt:
  """Caption -> Prompt. Raises CaptionError naming the unknown word, the position and what the
  grammar expected there, or the broken semantic constraint."""
  words = ' '.join(text.split()).lower()
  if words.endswith('.'):
    words = words[:-1]
  words = words.split()
  for i, w in enumerate(words):
    if w not in _VOCAB_SET:
      raise CaptionError(f'unknown word {w!r} (word {i + 1}) in caption {text!r}; '
                         f'vocabulary: {" ".join(VOCAB)}')
  cur = _Words(text, words)
  objects = []
  while True:
    cur.take(('a',), "'a'")
    size = None
    if cur.peek() in SIZES:
      size = cur.take(tuple(SIZES), 'a size')
    color = cur.take(COLOR_NAMES, _SIZE_OR_COLOR_WHAT if size is None else _COLOR_WHAT)
    shape = cur.take(SHAPES, _SHAPE_WHAT)
    objects.append((size, color, shape))
    if cur.peek() != 'and':
      break
    cur.take(('and',), "'and'")
  cur.take(('bouncing',), "'and' or 'bouncing'")
  cur.take(('on',), "'on'")
  cur.take(('a',), "'a'")
  background = cur.take(COLOR_NAMES, _COLOR_WHAT)
  cur.take(('background',), "'background'")
  if cur.peek() is not None:
    cur.take((), 'the end of the caption')
  try:
    return Prompt(objects=tuple(objects), background=background)
  except CaptionError as e:
    raise CaptionError(f'caption {text!r}: {e}') from None


# ------------------------------------------------------------------------------------------------
# Geometry and physics


def radius_px(size: str, height: int, width: int) -> float:
  """Object radius in pixels: SIZES[size] * min(height, width)."""
  return SIZES[size] * min(height, width)


def speed_scale(height: int, width: int) -> float:
  """Pixels-per-frame scale of the world at this frame size: min(height, width) / REF_SIDE."""
  return min(height, width) / REF_SIDE


def shape_area(shape: str, radius: float) -> float:
  """Area in px^2 of a shape of this radius: circle pi r^2, square (1.7 r)^2, triangle
  3 sqrt(3) / 4 r^2."""
  if shape == 'circle':
    return math.pi * radius ** 2
  if shape == 'square':
    return (2 * SQUARE_HALF * radius) ** 2
  if shape == 'triangle':
    return 3 * _SQRT3 / 4 * radius ** 2
  raise ValueError(f'unknown shape {shape!r}; shapes: {", ".join(SHAPES)}')


def _simulate(p0: np.ndarray, v0: np.ndarray, lo: np.ndarray, hi: np.ndarray,
              num_frames: int) -> np.ndarray:
  """Step-by-step elastic bounces. p0, v0, lo, hi: [N, 2] float64 -> positions [T, N, 2].

  Requires lo <= p0 <= hi and |v0| <= hi - lo (one reflection per step then suffices).
  """
  if np.any(p0 < lo - 1e-9) or np.any(p0 > hi + 1e-9):
    raise ValueError('an object centre lies outside [r, side - r]: its extent crosses the frame')
  if np.any(np.abs(v0) > hi - lo):
    raise ValueError('an object moves farther than its free range in one frame')
  out = np.empty((num_frames,) + p0.shape, np.float64)
  p, v = p0.astype(np.float64), v0.astype(np.float64)
  for t in range(num_frames):
    out[t] = p
    p = p + v
    over, under = p > hi, p < lo
    p = np.where(over, 2 * hi - p, np.where(under, 2 * lo - p, p))
    v = np.where(over | under, -v, v)
  return out


def _bounds(scene: Scene, height: int, width: int):
  r = np.array([radius_px(o.size, height, width) for o in scene.objects], np.float64)
  lo = np.stack([r, r], -1)
  hi = np.stack([width - r, height - r], -1)
  return lo, hi


def trajectory(scene: Scene, num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
  """Object centres (x, y) per frame: [T, K, 2] float64 (the physics; render uses it)."""
  lo, hi = _bounds(scene, height, width)
  p0 = np.array([[o.x, o.y] for o in scene.objects], np.float64)
  v0 = np.array([[o.vx, o.vy] for o in scene.objects], np.float64)
  return _simulate(p0, v0, lo, hi, num_frames)


def sample_scene(rng: np.random.Generator, height: int, width: int,
                 prompt: Prompt | None = None) -> Scene:
  """A random scene; with a prompt, one that matches it (unnamed sizes drawn at random).

  Without a prompt: a uniform background colour, 1 or 2 objects (probability 1/2 each) with
  distinct colours other than the background (uniform over the allowed sets), uniform shapes and
  sizes. Positions and velocities as in the module docstring.
  """
  if prompt is None:
    background = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    k = 1 + int(rng.integers(MAX_OBJECTS))
    others = [c for c in COLOR_NAMES if c != background]
    while True:                                 # redraw the one excluded set (black gray white)
      colors = [others[i] for i in rng.permutation(len(others))[:k]]
      if not set(_BLENDED) <= {background, *colors}:
        break
    specs = [(list(SIZES)[rng.integers(len(SIZES))], c, SHAPES[rng.integers(len(SHAPES))])
             for c in colors]
  else:
    background = prompt.background
    specs = [(size if size is not None else list(SIZES)[rng.integers(len(SIZES))], color, shape)
             for size, color, shape in prompt.objects]
  radii = np.array([radius_px(s, height, width) for s, _, _ in specs])
  u = rng.random((PLACEMENT_TRIES, len(specs), 2))                # candidate placements
  cand = np.stack([radii + u[..., 0] * (width - 2 * radii),
                   radii + u[..., 1] * (height - 2 * radii)], -1)  # [tries, K, 2]
  ok = np.ones(PLACEMENT_TRIES, bool)
  if len(specs) == 2:
    ok = np.linalg.norm(cand[:, 0] - cand[:, 1], axis=-1) >= radii.sum()
  centres = cand[int(np.argmax(ok))]                              # the first apart, else the first
  scale = speed_scale(height, width)
  objects = []
  for (size, color, shape), (x, y) in zip(specs, centres):
    speed = rng.uniform(*SPEED_RANGE) * scale
    angle = rng.uniform(0.0, 2 * math.pi)
    objects.append(Obj(color=color, shape=shape, size=size, x=float(x), y=float(y),
                       vx=float(speed * math.cos(angle)), vy=float(speed * math.sin(angle))))
  return Scene(background=background, objects=tuple(objects))


# ------------------------------------------------------------------------------------------------
# Rendering


def _interval_overlap(lo: np.ndarray, hi: np.ndarray, width: int) -> np.ndarray:
  """Length of [lo, hi] within each pixel column [i, i + 1): [...] -> [..., W] in [0, 1]."""
  i = np.arange(width, dtype=np.float32)
  return np.clip(np.minimum(i + 1, hi[..., None]) - np.maximum(i, lo[..., None]), 0.0, 1.0)


def _render_arrays(centres: np.ndarray, radius: np.ndarray, shape_id: np.ndarray,
                   rgb: np.ndarray, bg: np.ndarray, height: int, width: int):
  """centres [B, T, K, 2], radius [B, K] (0 = no object), shape_id [B, K], rgb [B, K, 3],
  bg [B, 3] (uint8 scale) -> frames [B, T, H, W, 3] in [-1, 1], coverage [B, T, K, H, W].

  With K = 2, object 1 is in front unless it is bigger than object 0."""
  b, t, k, _ = centres.shape
  if k > MAX_OBJECTS:
    raise ValueError(f'render draws at most {MAX_OBJECTS} objects, got {k}')
  cx = centres[..., 0].astype(np.float32)                                  # [B, T, K]
  cy = centres[..., 1].astype(np.float32)
  r = radius.astype(np.float32)[:, None, :, None]                          # [B, 1, K, 1]
  shp = shape_id[:, None, :, None]
  y0 = np.arange(height * SUBROWS, dtype=np.float32) / SUBROWS            # sub-row tops [HS]
  h = SQUARE_HALF * r
  top = cy[..., None] - np.where(shp == 1, h, r)                           # [B, T, K, 1]
  bottom = cy[..., None] + np.where(shp == 0, r, np.where(shp == 1, h, r / 2))
  a = np.maximum(y0, top)                                # the part of each sub-row inside the
  z = np.minimum(y0 + np.float32(1 / SUBROWS), bottom)   # shape's rows: [a, z], [B, T, K, HS]
  frac_rows = np.clip((z - a) * SUBROWS, 0.0, 1.0)
  frac_rows = np.where(r > 0, frac_rows, 0.0).astype(np.float32)
  dy = (a + z) / 2 - cy[..., None]                                         # its middle
  circle = np.sqrt(np.maximum(r * r - dy * dy, 0.0))
  square = np.broadcast_to(h, dy.shape)
  triangle = np.clip((dy + r) / (1.5 * np.maximum(r, 1e-6)), 0.0, 1.0) * (r * (_SQRT3 / 2))
  half = np.where(shp == 0, circle, np.where(shp == 1, square, triangle)).astype(np.float32)
  lo, hi = cx[..., None] - half, cx[..., None] + half
  cov = _interval_overlap(lo, hi, width) * frac_rows[..., None]            # [B, T, K, HS, W]
  if k == 2:                                  # the object behind loses what the front one covers
    both_rows = np.clip((np.minimum(z[:, :, 0], z[:, :, 1]) - np.maximum(a[:, :, 0], a[:, :, 1]))
                        * SUBROWS, 0.0, 1.0)                               # [B, T, HS]
    both = _interval_overlap(np.maximum(lo[:, :, 0], lo[:, :, 1]),
                             np.minimum(hi[:, :, 0], hi[:, :, 1]), width)   # [B, T, HS, W]
    both *= (both_rows * (frac_rows[:, :, 0] > 0) * (frac_rows[:, :, 1] > 0))[..., None]
    behind = (radius[:, 1] > radius[:, 0]).astype(np.float32)[:, None, None, None]  # [B,1,1,1]
    cov[:, :, 0] -= both * (1 - behind)
    cov[:, :, 1] -= both * behind
  cov = cov.reshape(b, t, k, height, SUBROWS, width).mean(4)               # [B, T, K, H, W]
  delta = rgb.astype(np.float32) - bg.astype(np.float32)[:, None, :]       # [B, K, 3]
  u8 = bg.astype(np.float32)[:, None, None, None, :] + np.einsum('btkhw,bkc->bthwc', cov, delta)
  return u8 / np.float32(127.5) - np.float32(1.0), np.clip(cov, 0.0, 1.0)


def render_batch(scenes: Sequence[Scene], num_frames: int, height: int = 32, width: int = 32):
  """Renders scenes together: frames [B, T, H, W, 3] float32 in [-1, 1] and coverage
  [B, T, K, H, W] float32 (K = the most objects in a scene; absent objects cover nothing)."""
  k = max(len(s.objects) for s in scenes)
  b = len(scenes)
  centres = np.zeros((b, num_frames, k, 2), np.float64)
  radius = np.zeros((b, k), np.float32)
  shape_id = np.zeros((b, k), np.int32)
  rgb = np.zeros((b, k, 3), np.float32)
  bg = np.array([COLORS[s.background] for s in scenes], np.float32)
  for i, s in enumerate(scenes):
    n = len(s.objects)
    centres[i, :, :n] = trajectory(s, num_frames, height, width)
    radius[i, :n] = [radius_px(o.size, height, width) for o in s.objects]
    shape_id[i, :n] = [SHAPES.index(o.shape) for o in s.objects]
    rgb[i, :n] = [COLORS[o.color] for o in s.objects]
  return _render_arrays(centres, radius, shape_id, rgb, bg, height, width)


def render(scene: Scene, num_frames: int, height: int = 32,
           width: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """frames [T, H, W, 3] float32 in [-1, 1] (uint8 colour c -> c / 127.5 - 1) and coverage
  [T, K, H, W] float32 in [0, 1]: the fraction of each pixel covered by object k and visible
  (the smaller object in front; equal sizes: the later one)."""
  frames, cov = render_batch([scene], num_frames, height, width)
  return frames[0], cov[0]


def sample_batch(seed: int, index: int, batch: int, num_frames: int, height: int = 32,
                 width: int = 32, with_sizes_p: float = 0.5) -> tuple[np.ndarray, list[str]]:
  """Training batch ``index`` of stream ``seed``: frames [B, T, H, W, 3] float32 in [-1, 1] and
  their captions (each names sizes with probability ``with_sizes_p``). Deterministic from
  (seed, index) only (np.random.default_rng([seed, index])). 16 x 9 frames at 32x32 take about
  13 ms on one CPU core (numpy; 27 ms for 21 frames; tests/world/scene_test.py asserts < 50 ms)."""
  rng = np.random.default_rng([seed, index])
  scenes, captions = [], []
  for _ in range(batch):
    scene = sample_scene(rng, height, width)
    scenes.append(scene)
    captions.append(caption(scene, with_sizes=bool(rng.random() < with_sizes_p)))
  frames, _ = render_batch(scenes, num_frames, height, width)
  return frames, captions
