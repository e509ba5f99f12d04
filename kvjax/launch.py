"""kvjax launcher: one Self-Forcing rollout with a KV-cache method, or its plan.

  python -m kvjax.launch --method=bf16                 # built-in tiny default, CPU, < 1 min
  python -m kvjax.launch --method=bf16 --config=configs/self_forcing.py:wan2.1_t2v_1.3b --plan
  python -m kvjax.launch --list_methods

Writes result.json, latents.npy and curves.csv under --outdir (default runs/<stamp>_...), and
video.mp4 (16 fps) with --wan_dir:
  python -m kvjax.launch --method=bf16 --checkpoint=CKPT --wan_dir=Wan2.1-T2V-1.3B \
      --config=configs/self_forcing.py:wan2.1_t2v_1.3b --prompt="a cat surfing at sunset"
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs

_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), 'self_forcing.py') + ':tiny'

config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Config file and variant (path:variant).',
                                lock_config=True)
flags.DEFINE_string('method', 'bf16', 'Cache method name or alias (see --list_methods).')
flags.DEFINE_string('method_args', None, "Method parameter overrides 'key=value,...' "
                    '(e.g. clamp_zero_point=false); see --list_methods.')
flags.DEFINE_string('checkpoint', None, 'Converted DiT checkpoint directory (ports.convert).')
flags.DEFINE_integer('seed', None, 'Noise seed (default: config.seed).')
flags.DEFINE_integer('num_latent_frames', None, 'Latent frames to generate (multiple of the block).')
flags.DEFINE_string('outdir', None, 'Result directory (must not exist or be empty).')
flags.DEFINE_enum('impl', 'auto', ['auto', 'xla', 'pallas'], 'Attention implementation.')
flags.DEFINE_enum('reference', 'bf16', ['bf16', 'torch', 'none'],
                  'Reference rollout for fidelity metrics (same noise).')
flags.DEFINE_string('noise_file', None, '.npz with initial [B,F,C,h,w] and renoise '
                    '[blocks, steps-1, B, block_frames, C, h, w]; fixes the latent shape.')
flags.DEFINE_string('text_states', None, '.npy [B, L, text_dim] replacing the text encoder.')
flags.DEFINE_enum('compute_dtype', None, ['float32', 'bfloat16'], 'Override the compute dtype.')
flags.DEFINE_integer('window_frames', None, 'Frames of K/V visible to a block, its own included '
                     '(-1 = all).')
flags.DEFINE_integer('sink_frames', None, 'First frames never evicted from the cache.')
flags.DEFINE_string('wan_dir', None, 'Wan2.1 folder (original, diffusers or converted): the umT5 '
                    'text encoder, its tokenizer and the VAE; writes video.mp4 beside result.json.')
flags.DEFINE_string('prompt', None, 'Text prompt (needs --wan_dir).')
flags.DEFINE_string('prompts_file', None, 'File with one prompt per line, run as a batch '
                    '(needs --wan_dir).')
flags.DEFINE_bool('free_text_encoder', True, 'Delete the text encoder from device memory before '
                  'the DiT runs.')
flags.DEFINE_bool('list_methods', False, 'List the cache methods and exit.')
flags.DEFINE_bool('plan', False, 'Print sizes and compiled memory (abstract shapes only) and exit.')
flags.DEFINE_bool('progress', True, 'Show a progress bar.')

FLAGS = flags.FLAGS


def list_methods() -> str:
  """The study's methods (table order), then the methods beyond the study."""
  from kvjax import cache
  rows = cache.describe()
  out = []
  titles = {'study': f"The study's {len(cache.PAPER_NAMES)} methods (table order)",
            'extra': "The study's profiling pass and kvjax's fixes",
            'beyond': 'Beyond the study'}
  for group, title in titles.items():
    out.append(f'== {title} ==')
    for row in rows:
      if row['group'] != group:
        continue
      params = ', '.join(f'{k}={v}' for k, v in row['params'].items()) or '-'
      out.append(f"{row['name']:<48} aliases: {', '.join(row['aliases']) or '-'}\n"
                 f"    family {row['family']}; params: {params}\n    {row['description']}")
  return '\n'.join(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  if FLAGS.list_methods:
    print(list_methods())
    return 0
  from kvjax import run
  try:
    settings = run.resolve(
        FLAGS.config, method=FLAGS.method, checkpoint=FLAGS.checkpoint, seed=FLAGS.seed,
        num_latent_frames=FLAGS.num_latent_frames, impl=FLAGS.impl, reference=FLAGS.reference,
        noise_file=FLAGS.noise_file, text_states=FLAGS.text_states,
        compute_dtype=FLAGS.compute_dtype, window_frames=FLAGS.window_frames,
        sink_frames=FLAGS.sink_frames, outdir=None if FLAGS.plan else FLAGS.outdir,
        method_args=FLAGS.method_args, wan_dir=FLAGS.wan_dir, prompt=FLAGS.prompt,
        prompts_file=FLAGS.prompts_file, free_text_encoder=FLAGS.free_text_encoder)
  except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if FLAGS.plan:
    print(json.dumps(run.plan(settings), indent=2))
    return 0
  result = run.generate(settings, progress=FLAGS.progress)
  keys = ('method', 'config', 'frames', 'kv_cache_bytes', 'bf16_kv_cache_bytes',
          'compression_ratio', 'compile_s', 'runtime_s', 'latent_psnr', 'latent_rel_l2')
  print(json.dumps({k: result[k] for k in keys if k in result}, indent=2))
  videos = f" (+ {', '.join(result['videos'])})" if result.get('videos') else ''
  print(f"wrote {result['outdir']}{videos}")
  return 0


def run_main():
  app.run(main)


if __name__ == '__main__':
  run_main()
