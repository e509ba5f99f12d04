"""Training the world's tiny causal DiT and its caption encoder as a few-step causal generator.

Teacher forcing, with the sampler's own structure. A clip of F latent frames (``block_frames``
per block) is run as 2F frames side by side: the clean clip at timestep ``context_noise`` (what
the context pass writes into the KV cache) and a noisy copy whose every block is noised to one of
the sampler's own denoising timesteps (drawn per block). Both copies sit at the clip's RoPE frame
positions, and the frame mask (``teacher_mask``) gives every query exactly the keys it attends to
at inference: a clean block sees the clean blocks up to itself (the context pass), a noisy block
sees the clean blocks before it (the cache) and its own noisy frames, with the same window and
sink rule as ``kvjax.sampler.frame_mask``. The loss is flow matching's: the DiT predicts
v = eps - x0 at the noisy frames (mean squared error, float32; the first block's frames weigh
``FIRST_BLOCK_WEIGHT``, and that block is drawn at sigma = 1 half the time: see below; every
latent cell weighs 1 + ``OBJECT_WEIGHT`` x the objects' coverage of it, ``cell_weights``).

The first block's noise decides its motion (``training_batch``). A few-step sampler trained by
plain flow matching predicts at sigma = 1 the mean of everything the caption allows; with the
objects' start and direction unknown that mean is the background, the renoised chain never
commits to an object, and (measured) the videos stay empty. Self-Forcing escapes this by
distillation; kvjax, on its own world, by the coupling of noise and data (the choice flow
matching leaves free): in training clips every object starts at a fixed place (the frame's
centre; two objects side by side) and its velocity is a function of the first block's initial
noise at the object's own token (``noise_velocity``): its direction and speed are uniform over
the world's ranges when the noise is N(0, 1), so the data distribution is the world's (up to
the fixed start) and inference noise is still plain N(0, 1), but the model can read the motion
off the noise it starts from. The other blocks' motion follows from their clean context.

Shapes: latents [B, F, C, h, w]; ids / mask [B, L]; text states [B, L, E].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kvjax import checkpoint as ckpt
from kvjax.model import WanConfig, WanDiT
from kvjax.sampler import SamplerConfig, frame_mask, schedule
from kvjax.world import codec, scene
from kvjax.world import text as text_lib

f32 = jnp.float32


def teacher_mask(num_frames: int, block_frames: int, window_frames: int,
                 sink_frames: int = 0) -> np.ndarray:
  """[2F, 2F] bool frame mask of [clean clip || noisy clip] (rows query, columns key).

  clean i -> clean j: ``frame_mask`` (the context pass); noisy i -> clean j: the same, for the
  blocks before i's only (the cache it reads); noisy i -> noisy j: i and j in the same block.
  """
  m = frame_mask(num_frames, block_frames, window_frames, sink_frames)
  blk = np.arange(num_frames) // block_frames
  before = blk[None, :] < blk[:, None]
  same = blk[None, :] == blk[:, None]
  out = np.zeros((2 * num_frames, 2 * num_frames), bool)
  out[:num_frames, :num_frames] = m
  out[num_frames:, :num_frames] = m & before
  out[num_frames:, num_frames:] = same
  return out


FIRST_BLOCK_WEIGHT = 2.0
OBJECT_WEIGHT = 4.0
"""Extra loss weight of a latent cell in proportion to how much of it the objects cover
(``cell_weights``). At 16x16 px the objects cover 2-15% of a frame, so under a uniform loss
the background dominates the gradient: the uniformly weighted model learns backgrounds and
draws objects as faint ghosts that its later denoising steps erase (measured; BUILD.md)."""
START_SPREAD = 0.22      # two objects start this fraction of the width left / right of centre


def start_positions(count: int, height: int, width: int) -> list[tuple[float, float]]:
  """Where a training clip's objects start: the centre, or two side by side on the middle row."""
  if count == 1:
    return [(width / 2, height / 2)]
  d = START_SPREAD * width
  return [(width / 2 - d, height / 2), (width / 2 + d, height / 2)]


def noise_velocity(eps0: np.ndarray, k: int, x: float, y: float, height: int,
                   width: int) -> tuple[float, float]:
  """Object k's velocity (px/frame) from the first block's noise eps0 [bf, C, h, w].

  u, v: the means of channels 6k..6k+5 of latent frames 0 and 1 over the 2x2 latent cells of
  the object's start token (24 values each: N(0, 1/24) for N(0, 1) noise); the direction is
  atan2(v, u) (uniform) and the speed SPEED_RANGE[0] + (1 - exp(-12 (u^2 + v^2))) * (range)
  (uniform: 12 (u^2 + v^2) is Exp(1)), times the world's speed scale.
  """
  ty, tx = int(y // codec.FACTOR) // 2 * 2, int(x // codec.FACTOR) // 2 * 2
  ch = slice(6 * k, 6 * k + 6)
  u = float(np.mean(eps0[0, ch, ty:ty + 2, tx:tx + 2], dtype=np.float64))
  v = float(np.mean(eps0[1, ch, ty:ty + 2, tx:tx + 2], dtype=np.float64))
  lo, hi = scene.SPEED_RANGE
  speed = (lo + (1.0 - np.exp(-12.0 * (u * u + v * v))) * (hi - lo)) * scene.speed_scale(
      height, width)
  angle = np.arctan2(v, u)
  return float(speed * np.cos(angle)), float(speed * np.sin(angle))


def cell_weights(coverage: np.ndarray) -> np.ndarray:
  """Loss weights [B, F, h, w] of the latent cells from the renderer's coverage [B, F, K, H, W]:
  1 + OBJECT_WEIGHT * (the largest object coverage of a pixel in the cell)."""
  b, f, _, hh, ww = coverage.shape
  cov = np.clip(coverage.sum(2), 0.0, 1.0).reshape(b, f, hh // codec.FACTOR, codec.FACTOR,
                                                    ww // codec.FACTOR, codec.FACTOR)
  return (1.0 + OBJECT_WEIGHT * cov.max(axis=(3, 5))).astype(np.float32)


def training_batch(seed: int, index: int, batch: int, num_frames: int, height: int, width: int,
                   block_frames: int
                   ) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
  """Batch ``index`` of stream ``seed``: latents [B, F, 12, h, w] (the codec's), captions, the
  first block's initial noise eps0 [B, bf, 12, h, w] that set the objects' velocities, and the
  cells' loss weights [B, F, h, w] (``cell_weights``)."""
  rng = np.random.default_rng([seed, index])
  c, hh, ww = codec.latent_shape(height, width)
  eps0 = rng.standard_normal((batch, block_frames, c, hh, ww)).astype(np.float32)
  scenes, captions = [], []
  for b in range(batch):
    sc = scene.sample_scene(rng, height, width)
    objs = []
    for k, (o, (x, y)) in enumerate(zip(sc.objects, start_positions(len(sc.objects), height,
                                                                      width))):
      vx, vy = noise_velocity(eps0[b], k, x, y, height, width)
      objs.append(dataclasses.replace(o, x=x, y=y, vx=vx, vy=vy))
    sc = dataclasses.replace(sc, objects=tuple(objs))
    scenes.append(sc)
    captions.append(scene.caption(sc, with_sizes=bool(rng.random() < 0.5)))
  frames, coverage = scene.render_batch(scenes, num_frames, height, width)
  return codec.encode(frames), captions, eps0, cell_weights(coverage)


@dataclasses.dataclass(frozen=True)
class Models:
  """The static halves (graph definitions and configs) of the two trained modules."""
  dit_cfg: WanConfig
  text_cfg: text_lib.CaptionEncoderConfig
  sampler_cfg: SamplerConfig

  @property
  def dit_graph(self):
    return ckpt.graphdef(self.dit_cfg)

  @property
  def text_graph(self):
    return text_lib.graphdef(self.text_cfg)


def init_params(models: Models, seed: int) -> dict:
  """{'dit': nnx.State, 'text': nnx.State}, random from ``seed``; the DiT starts adaLN-Zero.

  adaLN-Zero (as DiT trains): the time projection that modulates every block, the blocks' own
  modulation tables and the output head start at zero, so every block starts as the identity
  (its gated residuals are zero) and the first prediction is v = 0. Wan's own initialisation
  gates every block with random modulation from the first step, and the model then needs
  hundreds of steps to learn what adaLN-Zero starts with: at sigma = 1, x0 = x_t - v must
  pass the input noise through. Measured on the world (held-out loss after 100 steps): see
  BUILD.md. The random-weight configs (``tiny``) keep Wan's initialisation.
  """
  kd, kt = jax.random.split(jax.random.key(seed))
  dit = nnx.state(WanDiT(models.dit_cfg, rngs=nnx.Rngs(kd)))
  for leaf in (dit['time_proj']['kernel'], dit['time_proj']['bias'], dit['blocks']['modulation'],
               dit['head']['head']['kernel'], dit['head']['head']['bias']):
    leaf.value = jnp.zeros_like(leaf.value)
  return dict(dit=dit,
              text=nnx.state(text_lib.CaptionEncoder(models.text_cfg, rngs=nnx.Rngs(kt))))


def loss_fn(params: dict, latents, ids, mask, eps0, cells, key, *, models: Models, dit_graph,
            text_graph):
  """Teacher-forced flow-matching loss of a batch: the weighted mean over [B, F, C, h, w] of
  (v - target)^2, weights = the cells' (``cell_weights``) x FIRST_BLOCK_WEIGHT on block 0.

  Args:
    latents: [B, F, C, h, w] float32 clean clips; ids, mask: [B, L] int32 captions.
    eps0: [B, bf, C, h, w] the first block's initial noise (``training_batch``): its noise
      wherever that block is drawn at the first denoising step (sigma = 1), as at inference.
    key: PRNG key of the batch's timesteps and the other noise.
  """
  b, nf = latents.shape[:2]
  bf = models.sampler_cfg.block_frames
  ts, sigmas = schedule(models.sampler_cfg)
  k_t, k_first, k_eps = jax.random.split(key, 3)
  step = jax.random.randint(k_t, (b, nf // bf), 0, len(ts))
  # The first block is where objects are created (at sigma = 1, from its noise): it is drawn at
  # the first step half the time and its frames weigh FIRST_BLOCK_WEIGHT in the loss.
  step = step.at[:, 0].set(jnp.where(jax.random.bernoulli(k_first, 0.5, (b,)), 0, step[:, 0]))
  t = jnp.repeat(jnp.asarray(ts)[step], bf, axis=1)                       # [B, F]
  s = jnp.repeat(jnp.asarray(sigmas)[step], bf, axis=1)[..., None, None, None]
  eps = jax.random.normal(k_eps, latents.shape, f32)
  first = (step[:, 0] == 0)[:, None, None, None, None]
  eps = eps.at[:, :bf].set(jnp.where(first, eps0, eps[:, :bf]))
  noisy = (1.0 - s) * latents + s * eps
  states = nnx.merge(text_graph, params['text'])(ids, mask)
  dit = nnx.merge(dit_graph, params['dit'])
  cross = dit.cross_kv(states.astype(models.dit_cfg.cdtype))
  xs = jnp.concatenate([latents, noisy], axis=1)
  tt = jnp.concatenate([jnp.full((b, nf), models.sampler_cfg.context_noise, f32), t], axis=1)
  m = teacher_mask(nf, bf, nf)
  pos = np.concatenate([np.arange(nf), np.arange(nf)])
  v = dit.forward_full(xs, tt, cross, m, frame_pos=pos)[:, nf:]
  w = jnp.ones((nf,), f32).at[:bf].set(FIRST_BLOCK_WEIGHT)[None, :, None, None]
  w = (w * cells)[:, :, None]                                             # [B, F, 1, h, w]
  err = jnp.sum(jnp.square(v - (eps - latents)), axis=2, keepdims=True)
  return jnp.sum(w * err) / (jnp.sum(w) * latents.shape[2])


@functools.lru_cache(maxsize=4)
def optimizer(lr: float, steps: int, warmup: int, weight_decay: float,
              clip: float = 1.0) -> optax.GradientTransformation:
  """AdamW on a warmup + cosine schedule, gradients clipped by global norm."""
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
  return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(sched, weight_decay=weight_decay))


@functools.lru_cache(maxsize=4)
def make_step(models: Models, opt: optax.GradientTransformation):
  """(params, opt_state, latents, ids, mask, eps0, cells, key) -> (params, opt_state, loss),
  jitted (one
  compiled step per (models, optimiser) in a process)."""
  dit_graph, text_graph = models.dit_graph, models.text_graph

  def step(params, opt_state, latents, ids, mask, eps0, cells, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, latents, ids, mask, eps0, cells, key,
                                              models=models, dit_graph=dit_graph,
                                              text_graph=text_graph)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=4)
def make_eval(models: Models):
  """(params, latents, ids, mask, eps0, cells, key) -> loss, jitted."""
  dit_graph, text_graph = models.dit_graph, models.text_graph
  return jax.jit(lambda p, lat, ids, mask, eps0, cells, key: loss_fn(
      p, lat, ids, mask, eps0, cells, key, models=models, dit_graph=dit_graph, text_graph=text_graph))
