"""The shipped world model: it loads, is what the config says, and what it has learned so far.

Measured with the world's own ground truth (``kvjax.world.checks``) on videos the launcher writes
(the user's path: ``run.resolve`` + ``run.generate``, BF16 cache, 9 frames, seed 0) for captions
of one and two objects, against the same architecture with random weights. What the shipped
weights have learned is the prompted background: its share of the pixels is >= 0.80 on every
caption below (measured 0.82-1.00 at seeds 0 and 1), where random weights reach <= 0.55 (measured
0.04-0.52; a random model's output sits near 0, the gray of the palette, hence 0.5 on the gray
caption). The objects are not learned yet (their presence is 0-0.44 of the frames): that part of
issue 10 is open, and no test here claims it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from configs.self_forcing import get_config
from kvjax import run
from kvjax.world import bundle, codec
from kvjax.world import train as world_train

# These exact scenes were never rendered for training (training draws random scenes, so every
# word combination is in distribution).
PROMPTS = ['a green triangle bouncing on a black background',
           'a big blue circle bouncing on a yellow background',
           'a red square bouncing on a white background',
           'a red circle and a blue square bouncing on a gray background']


def _videos(tmp_path, weights: str, seed: int = 0):
  c = get_config('world')
  c.world.weights = weights
  prompts = tmp_path / f'prompts_{os.path.basename(weights)}.txt'
  prompts.write_text('\n'.join(PROMPTS) + '\n')
  s = run.resolve(c, method='bf16', seed=seed, reference='none', prompts_file=str(prompts),
                  outdir=str(tmp_path / f'run_{os.path.basename(weights)}'))
  return run.generate(s, progress=False)


def test_shipped_bundle_is_the_configs_model():
  w = bundle.check(bundle.DEFAULT_DIR)
  c = get_config('world')
  for k, v in c.model.items():
    if k not in ('param_dtype', 'compute_dtype'):
      assert w.dit_cfg.to_dict()[k] == (list(v) if isinstance(v, tuple) else v), k
  assert w.text_cfg.num_layers == c.world.text.num_layers
  counts = bundle.param_count(w)
  assert 200_000 < counts['dit'] < 600_000 and counts['text'] < 50_000, counts
  size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(w.path) for f in fs)
  assert size <= 5 * 2**20, size
  info = w.meta['training']
  assert info['command'].startswith('python -m launch.train_tiny') and info['seed'] == 0
  assert info['steps'] == c.train.steps and np.isfinite(info['final_loss_50'])
  assert info['sampler'] == run.SamplerConfig.from_dict(c.sampler).to_dict()


@pytest.fixture(scope='module')
def trained_and_random(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('learned')
  w = bundle.check(bundle.DEFAULT_DIR)
  rand_dir = str(tmp / 'random')
  models = world_train.Models(w.dit_cfg, w.text_cfg, run.SamplerConfig())
  bundle.save(rand_dir, w.dit_cfg, w.text_cfg, world_train.init_params(models, 1), dict(seed=1))
  return _videos(tmp, bundle.DEFAULT_DIR), _videos(tmp, rand_dir)


def test_trained_videos_show_the_prompted_background(trained_and_random):
  trained, random_ = trained_and_random
  got = [c['background'] for c in trained['world_checks']]
  bad = [c['background'] for c in random_['world_checks']]
  assert min(got) >= 0.80, got
  # Negative control: the same architecture with random weights, the same inputs.
  assert max(bad) <= 0.55, bad
  assert min(got) - max(bad) >= 0.25


def test_trained_videos_are_the_codecs_frames(trained_and_random):
  trained, _ = trained_and_random
  lat = np.load(os.path.join(trained['outdir'], 'latents.npy'))
  frames = codec.decode(lat)
  assert frames.shape == (len(PROMPTS), 9, 16, 16, 3)
  assert trained['videos'] == [f'video_{i}.mp4' for i in range(len(PROMPTS))]
  assert os.path.isfile(os.path.join(trained['outdir'], 'frames.png'))
