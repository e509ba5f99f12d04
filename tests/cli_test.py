"""The launcher's contract with a user who makes mistakes: one ``error:`` line naming the flag,
file or key, exit status 2, nothing written; Ctrl-C: "interrupted; nothing written", status 130,
no partial result folder.

``CASES`` is the table (extend it with a row): arguments, a phrase the message must contain. They
run in-process through ``launch.parse_flags`` + ``launch.main`` (the CLI's entry functions), so a
row costs milliseconds; what only a real process shows (``--config.*`` overrides, applied when
the flag module is imported; ``--help``'s exit status; signals) runs in a subprocess. The
converter's table is ``tests/ports/convert_cli_test.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs.self_forcing import get_config
from kvjax import checkpoint as ckpt
from kvjax import launch, run, runconfig
from kvjax.model import WanConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Inputs the table refers to as {name}: good and damaged checkpoints, bad arrays."""
  d = tmp_path_factory.mktemp('cli')
  cfg = WanConfig.from_dict(get_config('tiny').model)
  good = str(d / 'ckpt')
  ckpt.save(good, cfg, ckpt.init_params(cfg, 0))
  no_params = str(d / 'no_params')
  os.makedirs(no_params)
  with open(os.path.join(good, 'config.json')) as f:
    meta = json.load(f)
  with open(os.path.join(no_params, 'config.json'), 'w') as f:
    json.dump(meta, f)
  wrong = str(d / 'wrong_config')            # the weights of tiny, a config of another width
  ckpt.save(wrong, cfg, ckpt.init_params(cfg, 0))
  meta_w = dict(meta, model=dict(meta['model'], dim=128, num_heads=4))
  with open(os.path.join(wrong, 'config.json'), 'w') as f:
    json.dump(meta_w, f)
  np.save(d / 'text_2d.npy', np.zeros((2, 3), np.float32))
  np.save(d / 'text_nan.npy', np.full((1, 4, cfg.text_dim), np.nan, np.float32))
  np.savez(d / 'noise_missing.npz', initial=np.zeros((1, 9, 16, 8, 8), np.float32))
  shapes = run.noise_shapes(1, 9, 16, 8, 8, run.SamplerConfig.from_dict(get_config('tiny').sampler))
  good_noise = {k: np.zeros(v, np.float32) for k, v in zip(('initial', 'renoise'), shapes)}
  np.savez(d / 'noise_nan.npz', **dict(good_noise, initial=np.full(shapes[0], np.nan, np.float32)))
  np.savez(d / 'noise_shape.npz', **dict(good_noise, renoise=np.zeros((2, 3), np.float32)))
  with open(d / 'random.pt', 'wb') as f:
    f.write(os.urandom(4096))
  (d / 'bad_prompts.txt').write_text('a red circle bouncing on a gray background\n'
                                     'a cat surfing at sunset\n')
  os.makedirs(d / 'full_outdir')
  (d / 'full_outdir' / 'x').write_text('keep me')
  return dict(dir=str(d), ckpt=good, no_params=no_params, wrong=wrong, readme=README,
              text_2d=str(d / 'text_2d.npy'), text_nan=str(d / 'text_nan.npy'),
              noise_missing=str(d / 'noise_missing.npz'), random_pt=str(d / 'random.pt'),
              noise_nan=str(d / 'noise_nan.npz'), noise_shape=str(d / 'noise_shape.npz'),
              full_outdir=str(d / 'full_outdir'), bad_prompts=str(d / 'bad_prompts.txt'))


TINY = '--config=configs/self_forcing.py:tiny'   # the default, random weights
WORLD = '--config=configs/self_forcing.py:world'  # the world model: its caption grammar

# (id, arguments, phrase of the one-line message). {name} refers to ``files``.
CASES = [
    ('unknown_method', ['--method=nope'], "unknown cache method 'nope'"),
    ('unknown_method_param', ['--method=rtn_int4', '--method_args=bogus=1'], "no parameter 'bogus'"),
    ('method_arg_not_int', ['--method=kivi_int4', '--method_args=group_size=abc'],
     'KIVI_INT4: group_size expects an integer'),
    ('method_arg_not_bool', ['--method=kivi_int4', '--method_args=clamp_zero_point=maybe'],
     'clamp_zero_point expects true or false'),
    ('method_arg_not_key_value', ['--method=rtn_int4', '--method_args=group_size'], 'not key=value'),
    ('seed_negative', ['--seed=-1'], '--seed must be in [0,'),
    ('seed_too_large', [f'--seed={2**32}'], '--seed must be in [0,'),
    ('frames_not_block_multiple', ['--num_latent_frames=10'], 'multiple'),
    ('window_below_block', ['--window_frames=2'], 'smaller than a block'),
    ('window_zero', ['--window_frames=0'], 'window_frames'),
    ('sink_fills_cache', ['--num_latent_frames=12', '--window_frames=6', '--sink_frames=3'],
     'sink_frames=3'),
    ('qvg_span_does_not_fit', ['--method=qvg_int2', '--method_args=span_frames=24'], 'does not fit'),
    ('qvg_span_not_block', ['--method=qvg_int2', '--method_args=span_frames=2'],
     'multiple of the block'),
    ('qvg_bad_centroids', ['--method=qvg_int2', '--method_args=centroids=300'], 'centroids=300'),
    ('checkpoint_is_a_file', [TINY, '--checkpoint={random_pt}'], 'python -m ports.convert'),
    ('checkpoint_missing', [TINY, '--checkpoint={dir}/nowhere'], 'not found'),
    ('checkpoint_without_params', [TINY, '--checkpoint={no_params}'], 'missing params/'),
    ('checkpoint_config_mismatch', [TINY, '--checkpoint={wrong}'], 'config.json'),
    ('checkpoint_not_a_checkpoint', [TINY, '--checkpoint={dir}'], 'no config.json'),
    ('noise_missing', ['--noise_file={dir}/none.npz'], 'noise file not found'),
    ('noise_is_text', ['--noise_file={readme}'], 'not a numpy .npz archive'),
    ('noise_missing_array', [TINY, '--noise_file={noise_missing}'], "missing array(s) ['renoise']"),
    ('noise_nan', [TINY, '--noise_file={noise_nan}'], 'NaN'),
    ('noise_mis_shaped', [TINY, '--noise_file={noise_shape}'], 'renoise'),
    ('text_missing', ['--text_states={dir}/none.npy'], 'text states file not found'),
    ('text_is_text', ['--text_states={readme}'], 'not a numpy .npy array'),
    ('text_wrong_rank', ['--text_states={text_2d}'], 'expected [B, L,'),
    ('text_nan', ['--text_states={text_nan}'], 'NaN'),
    ('outdir_not_empty', ['--outdir={full_outdir}'], 'exists and is not empty'),
    ('outdir_under_a_file', ['--outdir={random_pt}/run'], 'is a file, not a folder'),
    ('outdir_not_creatable', ['--outdir=/proc/kvjax_run'], 'cannot create folders in /proc'),
    ('unknown_impl', ['--impl=cuda'], 'flag --impl'),
    ('unknown_reference', ['--reference=gpt'], 'flag --reference'),
    ('unknown_compute_dtype', ['--compute_dtype=int8'], 'flag --compute_dtype'),
    ('unknown_flag', ['--bogus=1'], "Unknown command line flag 'bogus'"),
    ('positional_argument', ['extra'], 'unexpected arguments: extra'),
    ('prompt_without_wan_dir', [TINY, '--prompt=a cat'], '--wan_dir'),
    ('world_unknown_word', [WORLD, '--prompt=a purple circle bouncing on a gray background'],
     "unknown word 'purple'"),
    ('world_not_the_grammar', [WORLD, '--prompt=a red circle on a gray background'], 'expected'),
    ('world_background_like_object', [WORLD, '--prompt=a red circle bouncing on a red background'],
     'red'),
    ('world_prompts_file_bad_line', [WORLD, '--prompts_file={bad_prompts}'], "unknown word 'cat'"),
    ('world_with_checkpoint', [WORLD, '--checkpoint={ckpt}'], 'belong to the Wan configs'),
    ('world_with_wan_dir', [WORLD, '--wan_dir={dir}'], 'belong to the Wan configs'),
    ('reference_dir_unusable', ['--method=rtn_int4', '--reference_dir={random_pt}/refs'],
     'cannot store references'),
]


def _fill(args, files):
  return [a.format(**files) for a in args]


def run_cli(args, capsys):
  """(status, stderr) of the launcher's entry functions on ``args``, in-process."""
  launch.FLAGS.unparse_flags()
  try:
    status = launch.main(launch.parse_flags(['kvjax.launch', *args]))
  except SystemExit as e:
    status = e.code
  finally:
    launch.FLAGS.unparse_flags()
  return status, capsys.readouterr().err


def _assert_one_line(err: str, phrase: str):
  lines = [x for x in err.splitlines() if x.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  assert phrase in lines[0], (phrase, lines[0])


@pytest.mark.parametrize('args,phrase', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_work(args, phrase, files, capsys, tmp_path):
  out = tmp_path / 'run'
  args = _fill(args, files)
  if not any(a.startswith('--outdir') for a in args):
    args.append(f'--outdir={out}')
  status, err = run_cli(args, capsys)
  assert status == 2
  _assert_one_line(err, phrase)
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if '.partial-' in p]
  assert os.listdir(files['full_outdir']) == ['x']


def test_good_input_passes_the_same_entry(files, capsys, tmp_path):
  """Control: the same path with valid arguments writes a result (and --save_inputs)."""
  status, _ = run_cli([f'--outdir={tmp_path / "run"}', '--noprogress', '--save_inputs',
                       '--reference=none', '--method=rtn_int4'], capsys)
  assert status == 0
  assert {'result.json', 'noise.npz', 'text_states.npy'} <= set(os.listdir(tmp_path / 'run'))


def _subprocess(args, **kw):
  return subprocess.run([sys.executable, '-m', 'kvjax.launch', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, **kw)


# Checked in a real process: config overrides are applied when the flag module is imported.
PROCESS_CASES = [
    ('config_missing', ['--config=/nowhere/cfg.py'], '--config'),
    ('config_unknown_variant', ['--config=configs/self_forcing.py:nope'],
     "unknown config variant 'nope'"),
    ('config_is_text', [f'--config={README}'], '--config: SyntaxError'),
    ('config_unknown_override', ['--config.video.fps=8'], 'cannot apply --config.video.fps'),
    ('config_bad_override_value', ['--config.model.dim=abc'], '--config.model.dim'),
    ('config_block_zero', ['--config.sampler.block_frames=0'], 'block_frames must be >= 1'),
]


@pytest.mark.parametrize('args,phrase', [c[1:] for c in PROCESS_CASES],
                         ids=[c[0] for c in PROCESS_CASES])
def test_config_mistakes_in_a_process(args, phrase, tmp_path):
  p = _subprocess([*args, f'--outdir={tmp_path / "run"}'])
  assert p.returncode == 2, p.stderr
  _assert_one_line(p.stderr, phrase)
  assert not os.listdir(tmp_path)


def test_help_exits_zero_with_the_examples_intact():
  p = _subprocess(['--help'])
  assert p.returncode == 0, p.stderr
  assert '--wan_dir=Wan2.1-T2V-1.3B \\\n' in p.stdout          # the continuation survived
  assert '--method_args' in p.stdout


@pytest.mark.parametrize('delay', [0.3, 4.0])   # after the "compiling" line: compiling / rolling out
def test_interrupt_is_clean(delay, tmp_path):
  """Ctrl-C: one line, status 130, no result or staging folder (also while XLA compiles: the
  signal is sent ``delay`` s after the launcher says it is compiling)."""
  out = tmp_path / 'run'
  proc = subprocess.Popen([sys.executable, '-m', 'kvjax.launch', '--method=kivi_int4',
                           '--num_latent_frames=18', '--window_frames=9', '--sink_frames=3',
                           f'--outdir={out}', '--noprogress'], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  first = proc.stderr.readline()                    # '<method> on <config> ...: compiling, ...'
  assert 'compiling' in first, first
  time.sleep(delay)
  if proc.poll() is not None:
    pytest.skip(f'the run ended within {delay} s on this machine')
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  err = first + err
  assert proc.returncode == 130, err
  lines = [x for x in err.splitlines() if x.strip()]
  assert lines[-1] == 'interrupted; nothing written', err
  assert 'Traceback' not in err and 'Fatal Python error' not in err
  assert os.listdir(tmp_path) == []


def test_result_folder_follows_the_umask(tmp_path, capsys):
  old = os.umask(0o027)
  try:
    status, _ = run_cli([f'--outdir={tmp_path / "run"}', '--noprogress', '--reference=none'],
                        capsys)
  finally:
    os.umask(old)
  assert status == 0
  assert oct(os.stat(tmp_path / 'run').st_mode & 0o777) == oct(0o750)


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.integers(0, 5), extra=st.sampled_from([0, 0, 0, 1]),
       window=st.integers(-1, 12), sink=st.integers(0, 4), block=st.integers(0, 4))
def test_geometry_either_runs_or_is_one_line(blocks, extra, window, sink, block,
                                             tmp_path_factory):
  """Random frames / window / sink / block sizes: the launcher's resolve either accepts them (and
  the abstract cache and the sampler's shapes build) or raises one line; never another error."""
  cfg = get_config('tiny')
  cfg.sampler.block_frames = block
  frames = blocks * max(block, 1) + extra     # mostly whole blocks, so most examples get far
  try:
    s = run.resolve(runconfig.override(cfg, method='rtn_int4', num_latent_frames=frames,
                                       window_frames=window, sink_frames=sink),
                    outdir=str(tmp_path_factory.mktemp('g') / 'run'))
  except (ValueError, FileNotFoundError) as e:
    assert '\n' not in str(e) and str(e)
    return
  assert s.frames % s.sampler_cfg.block_frames == 0 and s.frames >= 1
  assert 0 <= s.spec.sink_frames < max(s.spec.capacity_frames, 1)
  res = run.generate(s, progress=False)
  assert res['frames'] == s.frames and np.isfinite(res['latent_rel_l2'])
  lat = np.load(os.path.join(res['outdir'], 'latents.npy'))
  assert lat.shape[1] == s.frames and np.all(np.isfinite(lat))


def test_summary_screen_for_every_kind_of_result():
  """The launcher's one-screen summary: a method without the study's accounting (QVG: None) and a
  run without a reference print without error; a world run shows its fidelity and checks."""
  base = dict(method='QVG_INT2', config='tiny', frames=9, seed=0, kv_cache_bytes=1000,
              bf16_kv_cache_bytes=4000, compression_ratio=4.0, study_compression_ratio=None,
              runtime_s=0.5, compile_s=3.0, reference=None, outdir='/tmp/x')
  text = launch.summary(base, 'random weights')
  assert '4.00x smaller' in text and "study's accounting" not in text
  world = dict(base, study_compression_ratio=4.5, reference=dict(kind='bf16', runtime_s=0.25),
               latent_psnr=30.0, latent_rel_l2=0.1, video_psnr=40.0, video_psnr_onset=100.0,
               prompts=['a red circle bouncing on a gray background'], videos=['video.mp4'],
               world_checks=[dict(passed=False, background=0.9, presence=[0.2], coherent=False)])
  text = launch.summary(world, 'the trained world model')
  assert "study's accounting 4.50x" in text and '2.00x' in text          # time ratio to BF16
  assert 'all frames PSNR 40.0 dB' in text and 'world check FAILED: background 0.90' in text
  assert len(text.splitlines()) <= 12
