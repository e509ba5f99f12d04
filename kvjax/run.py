"""What ``python -m kvjax.launch`` does, as plain functions: resolve + validate, plan, generate.

Every input is validated in ``resolve`` before any weights are created or anything is compiled;
``generate`` writes its outputs into a staging directory that is renamed to ``outdir`` only when
everything succeeded, so a failed or killed run never leaves a half-written result directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np

from kvjax import cache as kvcache
from kvjax import checkpoint as ckpt
from kvjax import kernels
from kvjax import metrics
from kvjax import files
from kvjax import references
from kvjax import runconfig
from kvjax import video as video_io
from kvjax import wan_dir as wan_io
from kvjax.cache import accounting
from kvjax.cache.base import CacheMethod, CacheSpec
from kvjax.model import WanConfig, count_params
from kvjax.sampler import Noise, SamplerConfig, SelfForcing, load_noise, make_noise, noise_shapes
from kvjax.sampler import sharding
from kvjax.world import bundle, checks, codec, scene
from kvjax.world import text as world_text

REFERENCES = ('bf16', 'torch', 'none')
TEXT_SEED_OFFSET = 7919  # random text states of the built-in default come from seed + this
MAX_SEED = 2**32 - 1 - TEXT_SEED_OFFSET   # both keys stay uint32 (no silent wrap)


@dataclasses.dataclass
class RunSettings:
  """A fully validated run."""
  config_name: str
  config: dict
  model_cfg: WanConfig
  sampler_cfg: SamplerConfig
  method: CacheMethod
  spec: CacheSpec
  batch: int
  frames: int
  height: int
  width: int
  seed: int
  weight_seed: int
  impl: str
  reference: str
  checkpoint: str | None
  noise: Noise | None
  text_states: np.ndarray | None
  outdir: str | None
  # Real text encoder / VAE (issue 4): a validated kvjax.wan_dir.WanDir, the prompts, and whether
  # the encoder leaves device memory before the DiT runs.
  wan_dir: Any = None
  prompts: list[str] | None = None
  free_text_encoder: bool = True
  # The trained world model (config.world): a checked kvjax.world.bundle.WorldModel, whose
  # caption encoder encodes ``prompts`` and whose codec decodes the latents into video.mp4.
  world: bundle.WorldModel | None = None
  # Where BF16 references are stored and reused (kvjax.references); None: always rolled out.
  reference_dir: str | None = None


def _load_text_states(path: str, model_cfg: WanConfig) -> np.ndarray:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'text states file not found: {path}')
  try:
    arr = np.load(path, allow_pickle=False)
  except Exception as e:  # numpy's message may advise allow_pickle: wrong and unsafe here
    raise ValueError(f'text states file {path} is not a numpy .npy array '
                     f'({type(e).__name__}); see --save_inputs for the format') from None
  if not isinstance(arr, np.ndarray) or arr.ndim != 3:
    raise ValueError(f'text states {path}: expected [B, L, {model_cfg.text_dim}], got shape '
                     f'{getattr(arr, "shape", None)}')
  if arr.shape[2] != model_cfg.text_dim:
    raise ValueError(f'text states {path}: width {arr.shape[2]} != the model text_dim '
                     f'{model_cfg.text_dim}')
  if arr.shape[1] < 1:
    raise ValueError(f'text states {path}: empty sequence')
  arr = arr.astype(np.float32)
  if not np.all(np.isfinite(arr)):
    raise ValueError(f'text states {path}: contains NaN or Inf')
  return arr


def _check_outdir(outdir: str | None) -> None:
  """--outdir must be new or empty, and creatable: checked before any work (a rollout at 1.3B
  would otherwise end in a write error)."""
  if not outdir:
    return
  if os.path.exists(outdir):
    if not os.path.isdir(outdir):
      raise FileExistsError(f'--outdir {outdir} exists and is not a directory')
    if os.listdir(outdir):
      raise FileExistsError(f'--outdir {outdir} exists and is not empty; refusing to overwrite '
                            'a previous result (choose a new directory or remove it)')
  parent = os.path.dirname(os.path.abspath(outdir))
  try:
    files.writable_root(parent)
  except NotADirectoryError as e:
    raise FileExistsError(f'--outdir {outdir}: {e.filename} is a file, not a folder') from None
  except OSError as e:
    raise PermissionError(f'--outdir {outdir}: cannot create folders in {parent} '
                          f'({e.strerror})') from None


RUN_FIELDS = ('weight_seed',
              *(f.path for f in runconfig.FLAG_FIELDS.values() if '.' not in f.path))
"""Top-level fields every run config has (configs/self_forcing.py), besides model, sampler,
video and cache: those the launcher's flags set, and the seed of random weights."""


def resolve(config: ml_collections.ConfigDict, outdir: str | None = None) -> RunSettings:
  """Validates the run ``config`` describes and returns it; raises ValueError/FileNotFoundError.

  ``config``: a run config (``configs/self_forcing.py``; the launcher's flags are overrides of
  its fields, ``kvjax.runconfig``). Empty strings mean "none" for the input paths, the prompt and
  ``reference_dir`` (then the BF16 reference is always rolled out, never stored).
  ``outdir``: the result folder ``generate`` will write (must be new or empty; None: a stamped
  folder under runs/).
  """
  missing = [f for f in RUN_FIELDS if f not in config]
  if missing:
    raise ValueError(f'config {config.get("name", "?")} lacks the run field(s) {missing} '
                     '(configs/self_forcing.py defines every run field)')
  opt = lambda name: str(config[name]) or None   # '' = none
  method, impl, reference = str(config.method), str(config.impl), str(config.reference)
  checkpoint, wan_dir, noise_file = opt('checkpoint'), opt('wan_dir'), opt('noise_file')
  text_states, reference_dir = opt('text_states'), opt('reference_dir')
  prompt, prompts_file = opt('prompt'), opt('prompts_file')
  free_text_encoder = bool(config.free_text_encoder)
  m = kvcache.get(method, **kvcache.parse_overrides(method, opt('method_args')))
  if impl not in kernels.IMPLS:
    raise ValueError(f'unknown --impl {impl!r}; valid: {list(kernels.IMPLS)}')
  if reference not in REFERENCES:
    raise ValueError(f'unknown --reference {reference!r}; valid: {list(REFERENCES)}')
  if reference == 'torch':
    try:
      import diffusers  # noqa: F401
      import torch  # noqa: F401
    except ImportError:
      raise ValueError('--reference=torch needs torch and diffusers: pip install -e ".[torch]"')

  config = ml_collections.ConfigDict(config.to_dict())
  seed = int(config.seed)
  if not 0 <= seed <= MAX_SEED:
    raise ValueError(f'--seed must be in [0, {MAX_SEED}] (got {seed})')
  config.seed = seed
  world = None
  if config.get('world') is not None:
    if checkpoint is not None or wan_dir is not None:
      raise ValueError(f'config {config.get("name")} runs the world model (config.world.weights);'
                       ' --checkpoint/--wan_dir belong to the Wan configs (e.g. '
                       'configs/self_forcing.py:wan2.1_t2v_1.3b)')
    world = bundle.check(config.world.weights)
    model_cfg = _world_model_cfg(world, config.model)
  elif checkpoint is not None:
    model_cfg = ckpt.read_config(checkpoint)
    ckpt.verify_tree(checkpoint, ckpt.abstract_params(model_cfg))
    model_cfg = model_cfg.replace(compute_dtype=config.model.compute_dtype)
  else:
    model_cfg = WanConfig.from_dict(config.model)
  if model_cfg.compute_dtype not in ('float32', 'bfloat16'):
    raise ValueError(f'--compute_dtype (config.model.compute_dtype) must be float32 or bfloat16 '
                     f'(got {model_cfg.compute_dtype!r})')
  if model_cfg.compute_dtype == 'float32' and model_cfg.param_dtype == 'bfloat16' and not checkpoint:
    model_cfg = model_cfg.replace(param_dtype='float32')
  sampler_cfg = SamplerConfig.from_dict(config.sampler)
  bf = sampler_cfg.block_frames

  batch = int(config.video.batch_size)
  frames = int(config.video.num_latent_frames)
  height, width = int(config.video.latent_height), int(config.video.latent_width)
  noise = None
  if noise_file is not None:          # the noise file fixes the latent shape
    noise = load_noise(noise_file, sampler_cfg, model_cfg.in_dim)
    asked, (batch, frames, _, height, width) = frames, noise.initial.shape
    if asked not in (runconfig.FROM_NOISE_FILE, frames):
      raise ValueError(f'--num_latent_frames={asked} contradicts the noise file ({frames} '
                       f'frames); give {frames} or {runconfig.FROM_NOISE_FILE} (the file\'s)')
  elif frames == runconfig.FROM_NOISE_FILE:
    raise ValueError(f'num_latent_frames={frames} (the noise file\'s) needs a noise file')
  if frames < bf or frames % bf:
    raise ValueError(f'num_latent_frames={frames} is not a positive multiple of the block '
                     f'({bf} latent frames)')
  if frames > model_cfg.rope_max_frames:
    raise ValueError(f'num_latent_frames={frames} exceeds the RoPE table '
                     f'({model_cfg.rope_max_frames} frames)')
  _, ph, pw = model_cfg.patch_size
  if height % ph or width % pw:
    raise ValueError(f'latent size {height}x{width} is not divisible by the patch {ph}x{pw}')

  prompts = wan_io.read_prompts(prompt, prompts_file)
  if world is not None:
    if prompts is None and text_states is None:
      prompts = [str(config.world.prompt)]
    if prompts is not None:
      world_text.tokenize(prompts, world.text_cfg.text_len)   # CaptionError: before any work
    codec.latent_shape(height * codec.FACTOR, width * codec.FACTOR)
    if model_cfg.in_dim != codec.CHANNELS:
      raise ValueError(f'the world model reads {model_cfg.in_dim}-channel latents, the codec '
                       f'writes {codec.CHANNELS}')
  if prompts is not None:
    if wan_dir is None and world is None:
      raise ValueError('--prompt/--prompts_file need --wan_dir (the text encoder and tokenizer)')
    if text_states is not None:
      raise ValueError('give --prompt/--prompts_file or --text_states, not both')
    if noise is not None and batch != len(prompts):
      raise ValueError(f'{len(prompts)} prompt(s) but the noise file has batch {batch}')
    batch = len(prompts)
  wd = None
  if wan_dir is not None:
    wd = wan_io.validate(wan_dir, prompts, dit_text_dim=model_cfg.text_dim,
                         latent_channels=model_cfg.out_dim)

  texts = None
  if text_states is not None:
    texts = _load_text_states(text_states, model_cfg)
    if texts.shape[0] != batch:
      raise ValueError(f'text states batch {texts.shape[0]} != latent batch {batch}')

  window, sink = int(config.cache.window_frames), int(config.cache.sink_frames)
  if window == -1:
    window = frames
  if window < 1:
    raise ValueError(f'window_frames must be -1 (all frames) or >= 1 (got {window})')
  if window < bf:
    raise ValueError(f'window_frames={window} is smaller than a block ({bf} frames)')
  window = min(window, frames)
  spec = CacheSpec(batch=batch, num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
                   head_dim=model_cfg.head_dim,
                   frame_tokens=(height // ph) * (width // pw), block_frames=bf,
                   window_frames=window, sink_frames=sink, dtype=model_cfg.cdtype,
                   total_frames=frames,
                   rope=model_cfg.rope_grid(height // ph, width // pw))
  jax.eval_shape(lambda: m.init(spec))   # the method's geometry errors, before any work
  config.video.num_latent_frames = frames
  config.video.batch_size = batch
  config.video.latent_height, config.video.latent_width = height, width
  config.cache.window_frames, config.cache.sink_frames = window, sink
  config.model = ml_collections.ConfigDict(model_cfg.to_dict())
  _check_outdir(outdir)
  if reference_dir and reference == 'bf16':
    references.check_dir(reference_dir)
  return RunSettings(
      config_name=str(config.get('name', '?')), config=config.to_dict(), model_cfg=model_cfg,
      sampler_cfg=sampler_cfg, method=m, spec=spec, batch=batch, frames=frames, height=height,
      width=width, seed=seed,
      weight_seed=int(config.weight_seed), impl=impl, reference=reference,
      checkpoint=checkpoint, noise=noise, text_states=texts, outdir=outdir,
      wan_dir=wd, prompts=prompts, free_text_encoder=free_text_encoder, world=world,
      reference_dir=reference_dir or None)


def _world_model_cfg(world: bundle.WorldModel, requested) -> WanConfig:
  """The world model's DiT config; ``requested`` (config.model) may change the dtypes only."""
  trained = world.dit_cfg.to_dict()
  for k, v in requested.items():
    if k not in ('param_dtype', 'compute_dtype') and k in trained and (
        list(v) if isinstance(v, tuple) else v) != trained[k]:
      raise ValueError(f'config.model.{k}={v} differs from the trained world model\'s {trained[k]} '
                       f'({world.path}); the weights fix the model\'s shape')
  return world.dit_cfg.replace(param_dtype=requested.param_dtype,
                               compute_dtype=requested.compute_dtype)


def plan(s: RunSettings) -> dict[str, Any]:
  """Sizes and compiled memory of the run from abstract shapes only (no weights allocated)."""
  abstract = ckpt.abstract_params(s.model_cfg)
  sf = SelfForcing(s.model_cfg, s.sampler_cfg, s.method, s.spec, latent_hw=(s.height, s.width),
                   impl=s.impl, graphdef=ckpt.graphdef(s.model_cfg))
  cache_abs = jax.eval_shape(lambda: s.method.init(s.spec))
  kv = s.method.nbytes(cache_abs)
  t0 = time.perf_counter()
  lowered = sf.lower(abstract, s.model_cfg.text_len, s.model_cfg.text_dim)
  den, ctx = lowered['denoise'].compile(), lowered['context'].compile()
  compile_s = time.perf_counter() - t0
  steps = {}
  for name, c in (('denoise_step', den), ('context_pass', ctx)):
    steps[name] = metrics.compiled_memory(c)
    text = c.as_text()
    steps[name]['full_extent_float_cache_arrays'] = metrics.full_extent_float_arrays(
        text, s.spec.frame_tokens, s.method.slot_counts(s.spec), s.spec.block_frames,
        s.spec.num_heads)
    if jax.default_backend() == 'cpu':
      steps[name]['cpu_weight_upcast_bytes'] = metrics.memory.cpu_weight_upcast_bytes(text, abstract)
  return dict(
      config=s.config_name, method=s.method.name, method_params=s.method.params(),
      backend=jax.default_backend(), params=count_params(abstract),
      param_bytes=kvcache.tree_nbytes(abstract), frames=s.frames,
      frame_tokens=s.spec.frame_tokens, window_frames=s.spec.window_frames,
      sink_frames=s.spec.sink_frames, cache_capacity_frames=s.spec.capacity_frames,
      bf16_kv_cache_bytes=s.spec.bf16_bytes(), kv_cache_bytes=kv,
      compression_ratio=s.spec.bf16_bytes() / kv if kv else None,
      storage=s.method.storage(cache_abs),
      **steps, compile_s=round(compile_s, 3))


def _progress(enabled: bool):
  if not enabled:
    return contextlib.nullcontext(None)
  from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
  return Progress(TextColumn('{task.description}'), BarColumn(), TextColumn('{task.completed}/{task.total} blocks'),
                  TimeElapsedColumn(), transient=False)


def _rollout(s: RunSettings, method: CacheMethod, params, noise, texts, graphdef, label, bar):
  """The rollout of ``method``; a batch is split across the local devices (``batch_mesh``)."""
  sf = SelfForcing(s.model_cfg, s.sampler_cfg, method, s.spec, latent_hw=(s.height, s.width),
                   impl=s.impl, graphdef=graphdef, mesh=sharding.batch_mesh(s.batch))
  task = None
  if bar is not None:
    task = bar.add_task(label, total=s.frames // s.sampler_cfg.block_frames)
  cb = (lambda b, n: bar.update(task, completed=b + 1)) if bar is not None else None
  return sf.rollout(params, noise, texts, on_block=cb)


def _reference_key(s: RunSettings, params, noise, texts) -> tuple[str | None, dict | None]:
  """(key, fields) of the run's BF16 reference in ``s.reference_dir``; (None, None) without one."""
  if not s.reference_dir:
    return None, None
  fields = dict(model=s.model_cfg.to_dict(), sampler=s.sampler_cfg.to_dict(), batch=s.batch,
                frames=s.frames, height=s.height, width=s.width,
                window_frames=s.spec.window_frames, sink_frames=s.spec.sink_frames,
                impl=kernels.resolve_impl(s.impl), backend=jax.default_backend(),
                device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
                jaxlib=jaxlib.__version__,
                devices=sharding.num_shards(sharding.batch_mesh(s.batch)))
  return references.key_of(fields, params, (noise.initial, noise.renoise), texts), fields


def _bf16_reference(s: RunSettings, params, noise, texts, gdef, bar):
  """(latents [B, F, C, h, w], info) of the BF16 rollout on the run's inputs: the stored one when
  ``s.reference_dir`` holds an intact entry of the same inputs, else rolled out (and stored)."""
  key, fields = _reference_key(s, params, noise, texts)
  if key is not None:
    shape = (s.batch, s.frames, s.model_cfg.out_dim, s.height, s.width)
    hit = references.load(s.reference_dir, key, shape)
    if hit is not None:
      return hit.latents, dict(kind='bf16', runtime_s=hit.info['runtime_s'],
                               compile_s=hit.info['compile_s'], stored=True, key=key)
  ref, _, st = _rollout(s, kvcache.BF16(), params, noise, texts, gdef, 'BF16 reference', bar)
  info = dict(kind='bf16', runtime_s=st.runtime_s, compile_s=st.compile_s)
  if key is not None and np.all(np.isfinite(ref)):
    references.store(s.reference_dir, key, ref, dict(info, **fields), partial=PARTIAL)
    info.update(stored=False, key=key)
  return ref, info


_BF16_PARAMS = kvcache.BF16().params()


def _torch_reference(s: RunSettings, params, noise, texts):
  """(latents, info) of the PyTorch peer: diffusers' Wan modules with a KV cache, block by block,
  in the run's compute dtype (``kvjax.reference_torch_cache``)."""
  # The torch extra is optional: imported only when asked for (resolve checked it is installed).
  from kvjax import reference_torch, reference_torch_cache
  t0 = time.perf_counter()
  model = reference_torch.build_diffusers(s.model_cfg, ckpt.to_nested(params),
                                          dtype=s.model_cfg.compute_dtype)
  build_s = time.perf_counter() - t0
  ref, info = reference_torch_cache.cached_rollout(model, noise, texts, s.sampler_cfg,
                                                   s.spec.window_frames, s.spec.sink_frames)
  return ref, dict(kind='torch', runtime_s=info['runtime_s'], build_s=build_s,
                   dtype=s.model_cfg.compute_dtype, dit_calls=info['dit_calls'],
                   note='diffusers WanTransformer3DModel driven block by block with a KV cache')


def _peak_memory() -> int | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    return None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def default_outdir(s: RunSettings) -> str:
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{stamp}_{s.config_name}_{s.method.name.lower()}_seed{s.seed}')


def generate(s: RunSettings, *, progress: bool = True, save_inputs: bool = False) -> dict[str, Any]:
  """Runs the rollout (and its reference) and writes the result directory atomically.

  ``save_inputs``: also write the run's inputs as ``noise.npz`` (arrays ``initial``,
  ``renoise``) and ``text_states.npy`` ([B, L, text_dim] float32), the formats that
  ``--noise_file`` / ``--text_states`` read, so the run can be repeated exactly.
  """
  outdir = s.outdir or default_outdir(s)
  _check_outdir(outdir)
  gdef = ckpt.graphdef(s.model_cfg)
  text_info = None
  texts = s.text_states
  if s.world is not None:
    params, text_params = bundle.load(s.world, s.model_cfg)
    if texts is None:
      texts = world_text.encode(s.world.text_cfg, text_params, s.prompts)
      text_info = dict(text_encoder='world caption encoder')
  elif s.checkpoint:
    params = ckpt.restore_tree(s.checkpoint, ckpt.abstract_params(s.model_cfg))  # config read in resolve
  else:
    params = ckpt.init_params(s.model_cfg, s.weight_seed)
  noise = s.noise if s.noise is not None else make_noise(
      s.seed, s.batch, s.frames, s.model_cfg.in_dim, s.height, s.width, s.sampler_cfg)
  if s.prompts and s.world is None:          # encoded once, shared by the method and the reference
    texts, text_info = wan_io.encode_prompts(s.wan_dir, s.prompts, text_len=s.model_cfg.text_len,
                                             dtype=s.model_cfg.compute_dtype,
                                             free=s.free_text_encoder)
  if texts is None:
    key = jax.random.key(s.seed + TEXT_SEED_OFFSET)
    texts = np.asarray(jax.random.normal(key, (s.batch, s.model_cfg.text_len, s.model_cfg.text_dim)))

  with _progress(progress) as bar:
    latents, cache, stats = _rollout(s, s.method, params, noise, texts, gdef, s.method.name, bar)
    if not np.all(np.isfinite(latents)):
      raise FloatingPointError(f'{s.method.name}: the rollout produced NaN/Inf latents')
    peak = _peak_memory()
    own_key = None
    if s.method.is_reference and s.method.params() == _BF16_PARAMS and s.reference == 'bf16':
      # The BF16 method's rollout is the reference itself: stored for the other methods.
      own_key, fields = _reference_key(s, params, noise, texts)
      key = own_key
      if key is not None and references.load(s.reference_dir, key, latents.shape) is None:
        references.store(s.reference_dir, key, latents,
                         dict(kind='bf16', runtime_s=stats.runtime_s, compile_s=stats.compile_s,
                              **fields), partial=PARTIAL)
    ref, ref_info = None, None
    if s.reference == 'bf16' and not s.method.is_reference:
      ref, ref_info = _bf16_reference(s, params, noise, texts, gdef, bar)
    elif s.reference == 'torch':
      ref, ref_info = _torch_reference(s, params, noise, texts)

  kv = s.method.nbytes(cache)
  impl, cdtype = kernels.resolve_impl(s.impl), jnp.dtype(s.model_cfg.compute_dtype)
  bf16 = s.spec.bf16_bytes()
  result: dict[str, Any] = dict(
      method=s.method.name, method_params=s.method.params(), config=s.config_name,
      checkpoint=s.checkpoint, seed=s.seed, frames=s.frames, batch=s.batch,
      latent_shape=list(latents.shape), params=count_params(params),
      kv_cache_bytes=kv, bf16_kv_cache_bytes=bf16,
      compression_ratio=(bf16 / kv) if kv else None,
      study_compression_ratio=accounting.study_ratio(s.method, s.spec, cache),
      method_counters=s.method.counters(cache),
      runtime_s=stats.runtime_s, compile_s=stats.compile_s, dit_calls=stats.dit_calls,
      reused_steps=stats.reused_steps,
      reuse_mean_rel_l1=(float(np.mean(stats.reuse_rel_l1)) if stats.reuse_rel_l1 else None),
      peak_memory_bytes=peak, impl=s.impl, impl_resolved=impl,
      kernel_fallbacks=_kernel_fallbacks(s, cache, impl, cdtype),
      backend=jax.default_backend(),
      device=str(jax.devices()[0]), devices=sharding.num_shards(sharding.batch_mesh(s.batch)), jax_version=jax.__version__, reference=ref_info,
      window_frames=s.spec.window_frames, sink_frames=s.spec.sink_frames,
      compute_dtype=s.model_cfg.compute_dtype, config_full=s.config)
  if own_key is not None:
    result['stored_reference'] = own_key
  if ref is not None:
    result.update(metrics.latent_fidelity(latents, ref))
  if s.prompts:
    result.update(prompts=s.prompts, **(text_info or {}))
  # Decoded videos [B, T, H, W, 3] of the method and the reference: the world's exact codec (one
  # frame per latent frame) or the Wan VAE (one stream each; 4 frames per later latent frame).
  video = ref_video = strip = None
  bf, per_latent, onset = s.sampler_cfg.block_frames, 1, s.sampler_cfg.block_frames
  if s.world is not None:
    video = codec.decode(latents)
    ref_video = codec.decode(ref) if ref is not None else None
    result.update(world=s.world.path, codec=f'space-to-depth x{codec.FACTOR} (exact)')
  if s.wan_dir is not None:
    video, ref_video, video_info = wan_io.decode_latents(s.wan_dir, latents, block_frames=bf,
                                                         reference=ref)
    result.update(wan_dir=s.wan_dir.path, **video_info)
    per_latent, onset = video_info['frames_per_latent'], video_info['first_block_frames']
  frame_curves = {}
  if video is not None:
    frames = video_io.to_uint8(video)
    ref_frames = video_io.to_uint8(ref_video) if ref_video is not None else None
    if ref_frames is not None:
      win = s.spec.window_frames
      scores, per_frame = metrics.video_fidelity(
          frames, ref_frames, onset_frames=onset, window=win * per_latent if win > 0 else -1)
      result.update(scores)
      if per_latent == 1:                    # curves.csv rows are latent frames
        frame_curves = per_frame
    if s.world is not None:                  # frames.png: each video, the reference's under it
      strip = list(frames) if ref_frames is None else [
          r for pair in zip(frames, ref_frames) for r in pair]
      if s.prompts:                          # the world's ground truth: does the video match?
        result['world_checks'] = [checks.evaluate(f, scene.parse(p))
                                  for f, p in zip(frames, s.prompts)]
  curves = {**metrics.per_frame_curves(latents, ref), **frame_curves}
  artifacts = s.method.artifacts(cache)
  inputs = None
  if save_inputs:
    inputs = {'noise.npz': dict(initial=np.asarray(noise.initial, np.float32),
                                renoise=np.asarray(noise.renoise, np.float32)),
              'text_states.npy': np.asarray(texts, np.float32)}
  _write_atomic(outdir, result, latents, curves, artifacts, video=video, inputs=inputs,
                strip=strip)
  result['outdir'] = outdir
  return result


def _kernel_fallbacks(s: RunSettings, cache, impl: str, cdtype) -> list[str]:
  """Why the Pallas kernel did not read some attention sources (the block's own K/V and the
  cache's, layer 0: every layer has the same formats); empty unless impl resolved to pallas."""
  if impl != 'pallas':
    return []
  sp = s.spec
  own = jnp.zeros((sp.batch, sp.block_tokens, sp.num_heads, sp.head_dim), cdtype)
  srcs = [kernels.dense_source(own, own, sp.frame_tokens), *s.method.sources(cache, 0)]
  return sorted(set(kernels.fallbacks(srcs)))


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, (tuple, set)):
    return list(o)
  return str(o)


# Result folders being written (``_write_atomic``'s staging folders) and the last one completed:
# the launcher's interrupt handler removes the former and names the latter.
PARTIAL: set[str] = set()
WRITTEN: list[str] = []


def discard_partial() -> None:
  """Removes every staging folder still being written (interrupt cleanup)."""
  for stage in list(PARTIAL):
    for _ in range(3):                     # a writer thread may still be adding a file
      shutil.rmtree(stage, ignore_errors=True)
      if not os.path.exists(stage):
        break
    PARTIAL.discard(stage)


def _write_atomic(outdir: str, result: dict, latents: np.ndarray, curves: dict,
                  artifacts: dict | None = None, video: np.ndarray | None = None,
                  inputs: dict | None = None, strip: list | None = None) -> None:
  """Writes the result folder under a hidden staging name, then renames it (a reader never sees a
  half-written folder; an error or interrupt removes the staging folder). The folder gets the
  user's umask (``mkdtemp`` creates it 0700)."""
  import pandas as pd
  outdir = os.path.abspath(outdir)
  parent = os.path.dirname(outdir)
  os.makedirs(parent, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=f'.{os.path.basename(outdir)}.partial-', dir=parent)
  PARTIAL.add(stage)
  try:
    os.chmod(stage, 0o777 & ~files.umask())
    np.save(os.path.join(stage, 'latents.npy'), latents)
    pd.DataFrame(curves).to_csv(os.path.join(stage, 'curves.csv'), index=False)
    for name, obj in (artifacts or {}).items():
      with open(os.path.join(stage, name), 'w') as f:
        json.dump(obj, f, indent=2, default=_json_default)
    for name, obj in (inputs or {}).items():
      if name.endswith('.npz'):
        np.savez(os.path.join(stage, name), **obj)
      else:
        np.save(os.path.join(stage, name), obj)
    if video is not None:
      result['videos'] = video_io.write_videos(stage, video)
      result['fps'] = video_io.FPS
    if strip is not None:
      video_io.write_strip(os.path.join(stage, 'frames.png'), strip)
    with open(os.path.join(stage, 'result.json'), 'w') as f:
      json.dump(result, f, indent=2, default=_json_default)
    if os.path.isdir(outdir):
      os.rmdir(outdir)  # empty (checked before the run); fails loudly if something appeared
    os.rename(stage, outdir)
    WRITTEN.append(outdir)
  except BaseException:
    shutil.rmtree(stage, ignore_errors=True)
    raise
  finally:
    PARTIAL.discard(stage)
