"""Self-Forcing (Wan2.1-T2V causal DiT) model, sampler and cache configs.

Variants (the part after ``:``):
  world                   the default: the world model shipped in kvjax/world/weights (4 layers,
                          dim 96, 3x32 heads), 9 frames of 16x16 RGB (8x8x12 latents through the
                          exact space-to-depth codec, 16 tokens a frame), prompts through its
                          caption encoder, video.mp4 written. CPU, seconds.
  world_long              world with 36 frames rolled through a 12-frame window, 3 sink frames
                          (4x the training length: the drift setting; 12, not 9, so that the
                          RECENT2 rows keep a rolling quantized slot beside the sinks).
  tiny                    random weights: 2 layers, dim 64, 2x32 heads, 8x8 latents, 9 frames.
  tiny_long               tiny with 18 frames rolled through a 9-frame window, 3 sink frames.
  mid                     4 layers, dim 256, 4x64 heads, 24x40 latents, 21 frames (benchmarks).
  wan2.1_t2v_1.3b         the real 1.3B model at 480x832: 21 latent frames of 60x104 (1560 tokens each).
  wan2.1_t2v_1.3b_long    1.3B, 42 latent frames through a 21-frame attention window (the study's setting).

Run:
  python -m kvjax.launch --method=softprune_int4          # the world (the default)
  python -m kvjax.launch --method=bf16 --config=configs/self_forcing.py:tiny
  python -m launch.train_tiny                            # retrains the world model (<= 20 min)
  python -m kvjax.launch --method=bf16 --config=configs/self_forcing.py:wan2.1_t2v_1.3b --plan
The config describes the whole run: model, sampler, video, cache window, method, reference and
inputs. Any field can be overridden on the command line, e.g. ``--config.method=kivi_int2``,
``--config.cache.window_frames=6``; the launcher's short flags (``--method``, ``--seed``,
``--num_latent_frames``, ...) set the same fields (``kvjax.runconfig.FLAG_FIELDS``).
"""

import ml_collections

from kvjax import references
from kvjax.model import WanConfig, sizes
from kvjax.world import bundle

# (num_latent_frames, latent_height, latent_width, window_frames, sink_frames)
_VIDEOS = {
    'world': (9, 8, 8, -1, 0),
    'world_long': (36, 8, 8, 12, 3),
    'tiny': (9, 8, 8, -1, 0),
    'tiny_long': (18, 8, 8, 9, 3),
    'mid': (21, 24, 40, -1, 0),
    'wan2.1_t2v_1.3b': (21, 60, 104, -1, 0),
    'wan2.1_t2v_1.3b_long': (42, 60, 104, 21, 0),
}


DEFAULT_VARIANT = 'world'
"""The variant of ``get_config()`` and so of ``python -m kvjax.launch`` without --config."""


def get_config(arg: str = DEFAULT_VARIANT) -> ml_collections.ConfigDict:
  """Returns the config of variant ``arg`` (see the module docstring)."""
  arg = arg or DEFAULT_VARIANT
  if arg not in _VIDEOS:
    raise ValueError(f'unknown config variant {arg!r}; valid: {sorted(_VIDEOS)}')
  model_name = arg.removesuffix('_long')
  full = model_name == 'wan2.1_t2v_1.3b'
  c = ml_collections.ConfigDict()
  c.name = arg
  c.seed = 0           # the noise seed (and of random text states)
  c.weight_seed = 0    # random weights (no checkpoint, no world model)

  # What to run and against what (the launcher's --method, --impl, ... set these fields).
  c.method = 'bf16'               # a cache method or alias (python -m kvjax.launch --list_methods)
  c.method_args = ''              # method parameter overrides 'key=value,...'
  c.impl = 'auto'                 # attention: auto (pallas on GPU, xla elsewhere) | xla | pallas
  c.reference = 'bf16'            # fidelity reference: bf16 | torch | none
  c.reference_dir = references.DEFAULT_DIR   # BF16 references stored and reused; '' = never
  # Inputs ('' = none): a converted DiT checkpoint, the Wan folder (umT5 + VAE), prompts, or
  # the exact inputs of an earlier run (--save_inputs).
  c.checkpoint = ''
  c.wan_dir = ''
  c.prompt = ''
  c.prompts_file = ''
  c.noise_file = ''
  c.text_states = ''
  c.free_text_encoder = True      # drop the text encoder from device memory before the DiT runs

  # Every model field: the size table's, the rest WanConfig's defaults (written once, there).
  c.model = ml_collections.ConfigDict(WanConfig(
      **sizes.get(model_name), param_dtype='bfloat16' if full else 'float32',
      compute_dtype='bfloat16').to_dict())

  c.sampler = ml_collections.ConfigDict(dict(
      denoising_steps=(1000, 750, 500, 250),
      warp_denoising_step=True,
      timestep_shift=5.0,
      num_train_timesteps=1000,
      block_frames=3,
      context_noise=0.0,
  ))

  frames, height, width, window, sink = _VIDEOS[arg]
  # num_latent_frames -1: the noise file's (noise_file fixes the latent shape).
  c.video = ml_collections.ConfigDict(dict(
      batch_size=1, num_latent_frames=frames, latent_height=height, latent_width=width))
  # window_frames: latent frames of K/V visible to a block, its own included (Self-Forcing's
  # local_attn_size); -1 = every frame of the rollout. sink_frames: first frames never evicted.
  c.cache = ml_collections.ConfigDict(dict(window_frames=window, sink_frames=sink))
  if model_name == 'world':
    # Four denoising steps at sigma 1, .75, .5, .25 (unwarped), not Self-Forcing's warped
    # (1, .9375, .833, .625): the world model is trained by flow matching without Self-Forcing's
    # distillation, and its last x0 prediction from sigma .625 is still noise. The block
    # structure, the step count and the clean context pass are the same.
    c.sampler.warp_denoising_step = False
    c.world = ml_collections.ConfigDict(dict(
        weights=bundle.DEFAULT_DIR,
        prompt='a red circle and a blue square bouncing on a gray background',
        # The caption encoder (trained jointly; its width is model.text_dim).
        text=dict(num_layers=2, num_heads=2, ffn_dim=64),
    ))
    # launch/train_tiny.py: teacher-forced training on clips of ``frames`` latent frames.
    c.train = ml_collections.ConfigDict(dict(
        seed=0, steps=4000, batch_size=8, frames=9, lr=1e-3, warmup=100, weight_decay=0.01,
        clip=1.0, ckpt_every=500, eval_every=250, eval_batches=2))
  return c
