"""The world model's training loop: batches, steps, orbax checkpoints, the log, the export.

``launch/train_tiny.py`` is its command line. ``prepare`` validates a config and a work folder
before any work; ``fit`` trains (or resumes) to ``config.train.steps``; ``export`` writes the
last checkpoint as the shipped bundle. Everything is a function of the seed: batch ``i`` and
its noise come from (seed, i), so an interrupted run resumed from its last checkpoint ends with
the same weights as one that was not.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import orbax.checkpoint as ocp
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from kvjax.model import WanConfig
from kvjax.sampler import SamplerConfig
from kvjax.world import bundle, codec, train
from kvjax.world import text as text_lib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

EVAL_SEED_OFFSET = 10**6   # held-out batches come from stream seed + this


def models_of(config) -> train.Models:
  """The training configs: float32 compute (CPU), the inference config's shapes."""
  dit = WanConfig.from_dict(config.model).replace(param_dtype='float32', compute_dtype='float32')
  text = text_lib.CaptionEncoderConfig(text_len=dit.text_len, dim=dit.text_dim,
                                       **config.world.text)
  return train.Models(dit, text, SamplerConfig.from_dict(config.sampler))


def batch_of(config, seed: int, index: int, size: int):
  """Batch ``index`` of stream ``seed``: latents [B, F, C, h, w], ids, mask [B, L], eps0 and the
  cells' loss weights (``train.training_batch``)."""
  h = config.video.latent_height * codec.FACTOR
  w = config.video.latent_width * codec.FACTOR
  latents, captions, eps0, cells = train.training_batch(
      seed, index, size, config.train.frames, h, w, config.sampler.block_frames)
  ids, mask = text_lib.tokenize(captions, config.model.text_len)
  return (jnp.asarray(latents), jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(eps0),
          jnp.asarray(cells))


def _check_workdir(workdir: str, fingerprint: dict) -> None:
  meta = os.path.join(workdir, 'config.json')
  if os.path.exists(meta):
    with open(meta) as f:
      old = json.load(f)
    if old != fingerprint:
      raise ValueError(f'--workdir {workdir} holds a run of another config; choose a new folder '
                       'or remove it')
  else:
    os.makedirs(workdir, exist_ok=True)
    _write_json(meta, fingerprint)


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def plot_loss(log: dict, path: str) -> None:
  """Training loss (and its 50-step running mean) and held-out loss against step -> PNG."""
  steps = np.arange(1, len(log['loss']) + 1)
  loss = np.asarray(log['loss'])
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
  ax.plot(steps, loss, lw=0.5, alpha=0.4, label='train (batch)')
  k = min(50, len(loss))
  if k > 1:
    ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, 'valid'), lw=1.5,
            label=f'train ({k}-step mean)')
  if log['eval']:
    es, el = zip(*log['eval'])
    ax.plot(es, el, 'o-', ms=3, label='held-out')
  ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.set_ylabel('flow-matching loss')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)


def prepare(config, workdir: str) -> train.Models:
  """Validates the config and the work folder (before any work); returns the models."""
  tc = config.train
  if 'world' not in config or 'train' not in config:
    raise ValueError('--config must be a world variant (e.g. configs/self_forcing.py:world)')
  if tc.steps < 1 or tc.batch_size < 1 or tc.ckpt_every < 1 or tc.eval_every < 1:
    raise ValueError('train.steps, batch_size, ckpt_every and eval_every must be >= 1')
  if tc.frames < 1 or tc.frames % config.sampler.block_frames:
    raise ValueError(f'train.frames={tc.frames} is not a positive multiple of the block '
                     f'({config.sampler.block_frames} frames)')
  models = models_of(config)
  fingerprint = dict(model=models.dit_cfg.to_dict(), text=models.text_cfg.to_dict(),
                     sampler=models.sampler_cfg.to_dict(), train=tc.to_dict(),
                     video=[config.video.latent_height, config.video.latent_width])
  _check_workdir(workdir, fingerprint)
  return models


def export(config, models: train.Models, workdir: str, directory: str, info: dict) -> None:
  """Writes the last checkpoint of ``workdir`` as the world bundle ``directory``."""
  state = _restore(models, config, workdir)
  info = dict(info, jax_version=jax.__version__, backend=jax.default_backend(),
              cpu_count=os.cpu_count(), sampler=models.sampler_cfg.to_dict(),
              frame_size=[config.video.latent_height * codec.FACTOR,
                          config.video.latent_width * codec.FACTOR])
  bundle.save(directory, models.dit_cfg.replace(compute_dtype=config.model.compute_dtype,
                                                param_dtype=config.model.param_dtype),
              models.text_cfg, state['params'], info)


def _manager(workdir: str) -> ocp.CheckpointManager:
  """The work folder's checkpoint manager; use it in ``with`` (closing waits for pending writes
  and releases orbax's handlers, also when the block raises)."""
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'ckpt'),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2))


def _fresh(models: train.Models, config) -> dict:
  tc = config.train
  opt = train.optimizer(tc.lr, tc.steps, tc.warmup, tc.weight_decay, tc.clip)
  params = train.init_params(models, tc.seed)
  return dict(params=params, opt=opt.init(params))


def _restore(models: train.Models, config, workdir: str, step: int | None = None) -> dict:
  with _manager(workdir) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{workdir}: no checkpoint to restore')
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _fresh(models, config))
    return mngr.restore(step, args=ocp.args.StandardRestore(target))


def fit(config, models: train.Models, workdir: str, progress: bool = False) -> dict:
  """Trains (or resumes) to ``config.train.steps``; returns the summary (steps, seed, wall_s,
  final_loss_50: the mean loss of the last 50 steps, held_out_loss)."""
  tc = config.train

  opt = train.optimizer(tc.lr, tc.steps, tc.warmup, tc.weight_decay, tc.clip)
  step_fn = train.make_step(models, opt)
  eval_fn = train.make_eval(models)
  state = _fresh(models, config)
  log = dict(loss=[], eval=[], wall_s=0.0)
  workdir = os.path.abspath(workdir)
  with _manager(workdir) as mngr:
    start = mngr.latest_step() or 0
  if start:
    state = _restore(models, config, workdir, start)
    with open(os.path.join(workdir, 'log.json')) as f:
      log = json.load(f)
    log['loss'] = log['loss'][:start]
    log['eval'] = [e for e in log['eval'] if e[0] <= start]
    print(f'resuming from step {start} ({workdir})', file=sys.stderr)

  base = jax.random.key(tc.seed)
  held = [batch_of(config, tc.seed + EVAL_SEED_OFFSET, i, tc.batch_size)
          for i in range(tc.eval_batches)]

  def held_out_loss(p):
    return float(np.mean([eval_fn(p, *b, jax.random.fold_in(jax.random.key(tc.seed + 1), i))
                          for i, b in enumerate(held)]))

  def checkpoint(step):
    with _manager(workdir) as mngr:             # closing waits for the write
      mngr.save(step, args=ocp.args.StandardSave(state))
    _write_json(os.path.join(workdir, 'log.json'), log)
    plot_loss(log, os.path.join(workdir, 'loss.png'))

  t0 = time.perf_counter() - log['wall_s']
  with Progress(TextColumn('train'), BarColumn(), MofNCompleteColumn(),
                TextColumn('loss {task.fields[loss]:.4f}'), TimeElapsedColumn(),
                TimeRemainingColumn(), disable=not progress) as bar:
    task = bar.add_task('train', total=tc.steps, completed=start, loss=float('nan'))
    for step in range(start, tc.steps):
      p, o, loss = step_fn(state['params'], state['opt'],
                           *batch_of(config, tc.seed, step, tc.batch_size),
                           jax.random.fold_in(base, step))
      state = dict(params=p, opt=o)
      log['loss'].append(float(loss))
      done = step + 1
      bar.update(task, completed=done, loss=float(np.mean(log['loss'][-20:])))
      if done % tc.eval_every == 0 or done == tc.steps:
        log['eval'].append((done, held_out_loss(state['params'])))
      if done % tc.ckpt_every == 0 or done == tc.steps:
        log['wall_s'] = time.perf_counter() - t0
        checkpoint(done)
  return dict(steps=tc.steps, seed=tc.seed, wall_s=round(log['wall_s'], 1),
              final_loss_50=round(float(np.mean(log['loss'][-50:])), 5),
              held_out_loss=round(log['eval'][-1][1], 5) if log['eval'] else None)

