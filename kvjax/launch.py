r"""kvjax launcher: one Self-Forcing rollout with a KV-cache method, or its plan.

  python -m kvjax.launch --method=softprune_int4       # the built-in world model, CPU, < 1 min
  python -m kvjax.launch --method=kivi_int2 --prompt="a green triangle bouncing on a black background"
  python -m kvjax.launch --method=bf16 --config=configs/self_forcing.py:tiny   # random weights
  python -m kvjax.launch --method=bf16 --config=configs/self_forcing.py:wan2.1_t2v_1.3b --plan
  python -m kvjax.launch --list_methods

The default config (configs/self_forcing.py:world) runs a tiny DiT trained on a procedural world
of coloured shapes (kvjax/world; retrain with python -m launch.train_tiny): prompts follow its
caption grammar, and the run writes video.mp4 through its exact codec and checks the video
against the prompt. Writes result.json, latents.npy and curves.csv under --outdir (default
runs/<stamp>_...); with the Wan configs, video.mp4 needs --wan_dir:
  python -m kvjax.launch --method=bf16 --checkpoint=CKPT --wan_dir=Wan2.1-T2V-1.3B \
      --config=configs/self_forcing.py:wan2.1_t2v_1.3b --prompt="a cat surfing at sunset"

A mistake in the flags or inputs ends with one line "error: ..." and exit status 2 before any
work; Ctrl-C ends with "interrupted; nothing written" and status 130, leaving no partial result
folder (even during XLA compilation). The result fields are documented in docs/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

import configs
from kvjax import cli
from kvjax import interrupts
from kvjax import runconfig

# No variant: get_config() picks the default (configs.self_forcing.DEFAULT_VARIANT, the world).
_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), 'self_forcing.py')
_error = cli.error
cli.define_config(_DEFAULT_CONFIG, 'Config file and variant (path:variant).')

# The run's short flags: each sets one config field (kvjax.runconfig.FLAG_FIELDS) and defaults to
# "not given", so the config file holds every default.
_DEFINE = {'string': flags.DEFINE_string, 'integer': flags.DEFINE_integer,
           'bool': flags.DEFINE_bool}
for _name, _field in runconfig.FLAG_FIELDS.items():
  _help = f'{_field.help} Sets config.{_field.path}.'
  if _field.kind == 'enum':
    flags.DEFINE_enum(_name, None, list(_field.values), _help)
  else:
    _DEFINE[_field.kind](_name, None, _help)
flags.DEFINE_string('outdir', None, 'Result directory (must not exist or be empty).')
flags.DEFINE_bool('list_methods', False, 'List the cache methods and exit.')
flags.DEFINE_bool('plan', False, 'Print sizes and compiled memory (abstract shapes only) and exit.')
flags.DEFINE_bool('progress', True, 'Show a progress bar.')
flags.DEFINE_bool('save_inputs', False, 'Also write noise.npz and text_states.npy (the inputs, in '
                  'the formats --noise_file / --text_states read) into the result folder.')

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


INPUT_ERRORS = cli.INPUT_ERRORS
parse_flags = cli.parse_flags


def _interrupted() -> None:
  """Removes partial result folders and exits 130 (``kvjax.interrupts``)."""
  from kvjax import run   # loaded by then unless interrupted during start-up
  run.discard_partial()
  if run.WRITTEN:
    interrupts.exit_interrupted(f'interrupted; {run.WRITTEN[-1]} was complete and is kept')
  interrupts.exit_interrupted()


def main(argv):
  if len(argv) > 1:
    return _error(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  if FLAGS.list_methods:
    print(list_methods())
    return 0
  from kvjax import run
  config, problem = cli.load_config(FLAGS.config)   # loaded (and overridden) on first use
  if problem:
    return _error(problem)
  try:
    config = runconfig.override(config, **{k: FLAGS[k].value for k in runconfig.FLAG_FIELDS})
    if FLAGS.plan:            # abstract shapes only: no reference is rolled out or stored
      config.reference_dir = ''
    settings = run.resolve(config, outdir=None if FLAGS.plan else FLAGS.outdir)
  except INPUT_ERRORS as e:
    return _error(e)
  if FLAGS.plan:
    print(json.dumps(run.plan(settings), indent=2))
    return 0
  print(f'{settings.method.name} on {settings.config_name} ({_weights(settings)}): '
        'compiling, then rolling out ...', file=sys.stderr, flush=True)
  try:
    result = run.generate(settings, progress=FLAGS.progress, save_inputs=FLAGS.save_inputs)
  except INPUT_ERRORS as e:   # e.g. a checkpoint whose parameter files are truncated
    return _error(e)
  keys = ('method', 'config', 'frames', 'kv_cache_bytes', 'bf16_kv_cache_bytes',
          'compression_ratio', 'compile_s', 'runtime_s', 'latent_psnr', 'latent_rel_l2')
  print(json.dumps({k: result[k] for k in keys if k in result}, indent=2))
  print(summary(result, _weights(settings)))
  if not settings.checkpoint and settings.world is None:
    print('note: the model has random weights (a fixed seed); the numbers measure the cache '
          'method, not video quality. Next: --list_methods, --method=<name>, --plan with '
          '--config=configs/self_forcing.py:wan2.1_t2v_1.3b, real weights: README.md.')
  return 0


def _weights(s) -> str:
  if s.world is not None:
    return 'the trained world model'
  return f'weights {s.checkpoint}' if s.checkpoint else 'random weights'


def _bytes(n) -> str:
  for unit, k in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
    if n >= k:
      return f'{n / k:.1f} {unit}'
  return f'{n} B'


def summary(r: dict, weights: str) -> str:
  """One screen: what the method did to the cache, its time and fidelity against the
  reference, and where the outputs are."""
  ref = r.get('reference') or {}
  lines = [f"== {r['method']} on {r['config']} ({weights}), {r['frames']} latent frames, "
           f"seed {r['seed']}"]
  if r.get('prompts'):
    lines.append('  prompt      ' + ' | '.join(r['prompts']))
  study = r.get('study_compression_ratio')
  lines.append(f"  KV cache    {_bytes(r['kv_cache_bytes'])} vs {_bytes(r['bf16_kv_cache_bytes'])}"
               f" BF16: {r['compression_ratio']:.2f}x smaller"
               + (f" (study's accounting {study:.2f}x)" if study is not None else ''))
  timing = f"  time        rollout {r['runtime_s']:.2f} s"
  if ref.get('runtime_s'):
    peer = 'BF16' if ref.get('kind') == 'bf16' else 'PyTorch ' + ref.get('dtype', '')
    timing += f" vs {peer} {ref['runtime_s']:.2f} s: {r['runtime_s'] / ref['runtime_s']:.2f}x"
  lines.append(timing + f" (compile {r['compile_s']:.1f} s, not counted)")
  if 'latent_psnr' in r:
    kind = ref.get('kind', '?') + (' (stored, reused)' if ref.get('stored') else '')
    fid = (f"  fidelity    vs the {kind} reference: latent PSNR "
           f"{r['latent_psnr']:.1f} dB, rel. L2 {r['latent_rel_l2']:.4f}")
    lines.append(fid)
  if 'video_psnr' in r:
    vid = f"  video       all frames PSNR {r['video_psnr']:.1f} dB"
    if 'video_ssim' in r:
      vid += f", SSIM {r['video_ssim']:.4f}, LPIPS {r['video_lpips']:.4f}"
    vid += f"; first block PSNR {r['video_psnr_onset']:.1f} dB"
    d = (r.get('video_drift') or {}).get('psnr')
    if d:
      vid += f"; last window {d['last_window']:.1f} dB"
    lines.append(vid)
  for prompt, c in zip(r.get('prompts') or [], r.get('world_checks') or []):
    objs = ', '.join(f'{x:.2f}' for x in c['presence'])
    lines.append(f"  world check {'passed' if c['passed'] else 'FAILED'}: background "
                 f"{c['background']:.2f}, objects present {objs}, motion "
                 f"{'coherent' if c['coherent'] else 'incoherent'}")
  outs = ['result.json', *r.get('videos', []), *(['frames.png'] if r.get('world') else [])]
  lines.append(f"  wrote       {r['outdir']}/ ({', '.join(outs)})")
  return '\n'.join(lines)


def run_main():
  interrupts.watch(_interrupted, 'kvjax-interrupts')
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run_main()
