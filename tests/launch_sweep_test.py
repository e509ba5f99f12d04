"""launch.sweep: the plan, the folder checks, bad input, a sweep killed twice and resumed, and the
Slurm submission (through stand-in sbatch/squeue commands)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from configs.sweeps import study
from kvjax import cache as kvcache
from launch import sweep_jobs, sweep_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = 'BF16,RTN_INT4,KIVI_INT2'
SHORT = ['--config.run.video.num_latent_frames=9', '--config.run.cache.window_frames=-1',
         '--config.run.cache.sink_frames=0']       # the world's 9-frame clip: faster runs


def _cfg(**kw):
  c = study.get_config('world')
  c.run.video.num_latent_frames, c.run.cache.window_frames, c.run.cache.sink_frames = 9, -1, 0
  for k, v in kw.items():
    c[k] = v
  return c


def _cli(*args, env=None, timeout=600):
  return subprocess.run([sys.executable, '-m', 'launch.sweep', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env)


def _partials(d):
  return [os.path.join(r, x) for r, dirs, _ in os.walk(d) for x in dirs if '.partial-' in x]


class TestPlan:

  def test_methods(self):
    names = sweep_plan.methods_of('all')
    assert names == list(kvcache.PAPER_NAMES) and len(names) == 33 and names[0] == 'BF16'
    # Aliases resolve; BF16 moves first (its rollout becomes the stored reference).
    assert sweep_plan.methods_of('rtn_int4, baseline') == ['BF16', 'RTN_INT4']
    with pytest.raises(ValueError, match="unknown cache method 'RTN_INT5'"):
      sweep_plan.methods_of('BF16,RTN_INT5')
    with pytest.raises(ValueError, match='twice'):
      sweep_plan.methods_of('RTN_INT4,rtn_int4')
    with pytest.raises(ValueError, match='empty'):
      sweep_plan.methods_of(' , ')

  def test_prompts(self, tmp_path):
    f = tmp_path / 'p.txt'
    f.write_text('\n  first  \n\nsecond\nthird\n')
    assert sweep_plan.read_prompts(str(f), 2) == ['first', 'second']
    with pytest.raises(ValueError, match='fewer than'):
      sweep_plan.read_prompts(str(f), 4)
    (tmp_path / 'e.txt').write_text('\n \n')
    with pytest.raises(ValueError, match='holds no prompt'):
      sweep_plan.read_prompts(str(tmp_path / 'e.txt'), 1)
    with pytest.raises(FileNotFoundError, match='not found'):
      sweep_plan.read_prompts(str(tmp_path / 'none.txt'), 1)
    with pytest.raises(ValueError, match='not set'):
      sweep_plan.read_prompts('', 1)
    (tmp_path / 'b.txt').write_bytes(b'\xff\xfe\x00bad')
    with pytest.raises(ValueError, match='UTF-8'):
      sweep_plan.read_prompts(str(tmp_path / 'b.txt'), 1)

  def test_runs_and_seeds(self):
    runs = sweep_plan.plan(_cfg(methods='KIVI_INT2,BF16', num_prompts=3, seed_offset=5))
    assert [(r.method, r.prompt_index, r.seed) for r in runs] == [
        ('BF16', 0, 5), ('BF16', 1, 6), ('BF16', 2, 7),
        ('KIVI_INT2', 0, 5), ('KIVI_INT2', 1, 6), ('KIVI_INT2', 2, 7)]
    assert runs[4].dir == os.path.join('runs', 'KIVI_INT2', 'p001_s6')

  def test_fingerprint(self):
    base = sweep_plan.fingerprint(_cfg())
    # The method list and the prompt count may grow in the same folder ...
    assert sweep_plan.fingerprint(_cfg(methods='BF16', num_prompts=5)) == base
    # ... what changes a run's numbers may not.
    other = _cfg()
    other.run.cache.window_frames = 6
    assert sweep_plan.fingerprint(other) != base
    assert sweep_plan.fingerprint(_cfg(seed_offset=1)) != base

  def test_run_config(self, tmp_path):
    c = _cfg()
    r = sweep_plan.plan(c)[1]
    rc = sweep_plan.run_config(c, r, str(tmp_path))
    assert (rc.method, rc.prompt, rc.seed, rc.prompts_file) == ('BF16', r.prompt, 1, '')
    assert rc.reference_dir == os.path.join(str(tmp_path), 'references')
    assert c.run.method == 'bf16' and c.run.prompt == ''     # the sweep's config is untouched
    c.reference_dir = str(tmp_path / 'shared')                # a store shared between sweeps
    assert sweep_plan.run_config(c, r, str(tmp_path)).reference_dir == str(tmp_path / 'shared')
    assert sweep_plan.fingerprint(c) == sweep_plan.fingerprint(_cfg())


class TestBadInput:
  """One error line, exit status 2, before any work: nothing is created."""

  @pytest.mark.parametrize('name,args,phrase', [
      ('unknown_method', ['--config.methods=BF16,RTN_INT5'], "unknown cache method 'RTN_INT5'"),
      ('missing_prompts', ['--config.prompts_file={tmp}/none.txt'], 'prompts file not found'),
      ('empty_prompts', ['--config.prompts_file={tmp}/empty.txt'], 'holds no prompt'),
      ('bad_caption', ['--config.prompts_file={tmp}/moviegen.txt'], 'prompt 0: unknown word'),
      ('not_a_sweep', ['--outdir={tmp}/foreign'], 'not a sweep folder'),
      ('unwritable', ['--outdir={tmp}/afile/sweep'], 'cannot write'),
      ('bad_executor', ['--executor=cloud'], 'executor'),
      ('bad_gpus', ['--config.executor.local_gpus=0,a'], 'local_gpus'),
      ('no_outdir', ['--outdir='], '--outdir is required'),
  ])
  def test_cli(self, tmp_path, name, args, phrase):
    (tmp_path / 'empty.txt').write_text('\n\n')
    (tmp_path / 'moviegen.txt').write_text('A stylish woman strolls down a Tokyo street.\n')
    (tmp_path / 'foreign').mkdir()
    (tmp_path / 'foreign' / 'notes.txt').write_text('mine')
    (tmp_path / 'afile').write_text('a file')
    args = [a.format(tmp=tmp_path) for a in args]
    if not any(a.startswith('--outdir') for a in args):
      args.append(f'--outdir={tmp_path}/sweep')
    p = _cli(*args, '--config.num_prompts=1', timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith('error: ') and phrase in lines[0], lines
    assert not (tmp_path / 'sweep').exists()
    assert os.listdir(tmp_path / 'foreign') == ['notes.txt']

  def test_folder_of_another_sweep(self, tmp_path):
    c = _cfg(methods='BF16', num_prompts=1)
    runs = sweep_plan.plan(c)
    sweep_plan.prepare(str(tmp_path), c, runs)
    other = _cfg(methods='BF16', num_prompts=1)
    other.run.video.num_latent_frames = 6
    with pytest.raises(ValueError, match='another sweep config'):
      sweep_plan.check_folder(str(tmp_path), other, sweep_plan.plan(other))
    f = tmp_path / 'p.txt'
    f.write_text('a red square bouncing on a white background\n')
    moved = _cfg(methods='BF16', num_prompts=1, prompts_file=str(f))
    with pytest.raises(ValueError, match='another prompts file'):
      sweep_plan.check_folder(str(tmp_path), moved, sweep_plan.plan(moved))
    (tmp_path / 'sweep.json').write_text('{"trunc')
    with pytest.raises(ValueError, match='unreadable'):
      sweep_plan.check_folder(str(tmp_path), c, runs)
    # The same config resumes.
    sweep_plan.prepare(str(tmp_path), c, runs)
    sweep_plan.check_folder(str(tmp_path), c, runs)


def _wait_for(pred, proc, timeout=400):
  t0 = time.monotonic()
  while not pred():
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
    assert time.monotonic() - t0 < timeout, 'timed out'
    time.sleep(0.2)


def test_killed_twice_resumed_and_aggregated(tmp_path):
  """3 methods x 2 prompts through submitit's local executor: Ctrl-C after the first run, a hard
  kill (SIGKILL to the process group) after the third, a corrupt run folder, then a resume that
  skips the finished runs and redoes the corrupt one; the aggregate has one row per method."""
  out = tmp_path / 'sweep'
  args = [sys.executable, '-m', 'launch.sweep', f'--outdir={out}', f'--config.methods={METHODS}',
          *SHORT]
  c = _cfg(methods=METHODS)
  runs = sweep_plan.plan(c)
  done = lambda: [r for r in runs if sweep_plan.is_complete(str(out), r)]

  p = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
  _wait_for(lambda: len(done()) >= 1, p)
  os.killpg(p.pid, signal.SIGINT)
  err = p.communicate(timeout=120)[1]
  assert p.returncode == 130, err[-2000:]
  assert err.strip().splitlines()[-1].startswith('interrupted; finished runs are kept')
  assert _partials(out) == []
  lock = sweep_jobs.Lock(str(out))           # released: the next sweep can take it
  lock.acquire()
  lock.release()
  first = {r.dir for r in done()}
  assert first and len(first) < len(runs)

  p = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
  _wait_for(lambda: len(done()) >= len(first) + 2, p)
  os.killpg(p.pid, signal.SIGKILL)
  p.communicate(timeout=60)
  second = {r.dir for r in done()}
  assert first < second and len(second) < len(runs)
  # A finished run's result.json truncated (a disk full, a bad copy): redone, never counted.
  victim = sorted(second)[0]
  with open(out / victim / 'result.json', 'r+') as f:
    f.truncate(40)

  # Resumed with two jobs at once, one per "GPU" id (CUDA_VISIBLE_DEVICES set per job).
  p = subprocess.run([*args, '--config.executor.local_gpus=0,1'], cwd=ROOT, capture_output=True,
                     text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  logs = ''.join(f.read_text() for f in (out / '.submitit').rglob('*_log.out'))
  assert 'CUDA_VISIBLE_DEVICES=0,' in logs and 'CUDA_VISIBLE_DEVICES=1,' in logs
  assert f'{victim} was corrupt or partial: removed, it is redone' in p.stderr
  assert f'{len(runs)} runs ({len(second) - 1} done)' in p.stderr
  assert len(done()) == len(runs) and _partials(out) == []
  meta = json.loads((out / 'sweep.json').read_text())
  assert [r['dir'] for r in meta['runs']] == [r.dir for r in runs]
  # Each BF16 reference was rolled out once and shared: one entry per prompt.
  refs = [e for e in os.listdir(out / 'references') if not e.startswith('.')]
  assert len(refs) == 2
  for r in runs:
    res = json.loads((out / r.dir / 'result.json').read_text())
    assert res['prompts'] == [r.prompt] and res['seed'] == r.seed and res['method'] == r.method
    if r.method != 'BF16':
      assert res['reference']['key'] in refs and res['video_ssim'] < 1
  # A finished sweep reruns as a no-op.
  again = _cli(f'--outdir={out}', f'--config.methods={METHODS}', *SHORT, '--executor=inline')
  assert again.returncode == 0 and f'{len(runs)} runs ({len(runs)} done), 0 job(s)' in again.stderr

  agg = subprocess.run([sys.executable, '-m', 'launch.aggregate', f'--sweep_dir={out}'], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert agg.returncode == 0, agg.stderr[-3000:]
  import pandas as pd
  table = pd.read_csv(out / 'table.csv')
  assert list(table['method']) == ['BF16', 'RTN_INT4', 'KIVI_INT2']
  assert (out / 'report.html').is_file() and list(out.glob('*.png'))


def _stand_in(path, text):
  path.write_text('#!/bin/sh\n' + text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_local_jobs_spread_over_the_visible_gpus(tmp_path, monkeypatch):
  """local_gpus=auto: every GPU nvidia-smi lists (or CUDA_VISIBLE_DEVICES names), one CPU slot on
  a machine without GPUs; an explicit list wins."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _stand_in(bin_dir / 'nvidia-smi', 'echo "GPU 0: NVIDIA H100 (UUID: a)"\n'
                                    'echo "GPU 1: NVIDIA H100 (UUID: b)"\n')
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  c = _cfg()
  assert sweep_jobs.local_gpus(c) == ['0', '1']
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '3,5')
  assert sweep_jobs.local_gpus(c) == ['3', '5']
  monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES')
  assert sweep_jobs.local_gpus(c) == ['cpu']             # no GPU: one job at a time
  c.executor.local_gpus = '2,7'
  assert sweep_jobs.local_gpus(c) == ['2', '7']
  dry = _cli(f'--outdir={tmp_path}/s', '--dry_run', '--config.executor.local_gpus=2,7')
  assert dry.returncode == 0 and 'each GPU id of 2,7' in dry.stdout


def test_slurm_submission_through_stand_in_commands(tmp_path):
  """--executor=slurm writes one job array (GPUs, time, partition from the config) through
  sbatch, records the job ids, and a rerun refuses while squeue still lists them."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  log = tmp_path / 'sbatch.log'
  _stand_in(bin_dir / 'sbatch', f'cat "$@" >> {log}\necho "Submitted batch job 4242"\n')
  _stand_in(bin_dir / 'squeue', 'echo 4242_1\n')
  _stand_in(bin_dir / 'srun', 'exit 0\n')
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  out = tmp_path / 'sweep'
  flags = [f'--outdir={out}', f'--config.methods={METHODS}', *SHORT, '--executor=slurm',
           '--config.executor.slurm.partition=gpu', '--config.executor.slurm.timeout_min=90']
  bare = _cli(*flags)                     # no Slurm on this machine: one line, no folder
  assert bare.returncode == 2 and 'needs Slurm' in bare.stderr and not out.exists()
  dry = _cli(*flags, '--dry_run', env=env)
  assert dry.returncode == 0 and 'slurm: the BF16 job, then an array of 2' in dry.stdout
  assert not out.exists()
  p = _cli(*flags, env=env)
  assert p.returncode == 0, p.stderr[-2000:]
  script = log.read_text()
  # The BF16 job first, then the array of the other methods after it.
  assert script.count('#SBATCH --gpus-per-node=1') == 2
  for line in ('#SBATCH --array=0-1%2', '#SBATCH --dependency=afterany:4242', '#SBATCH --time=90',
               '#SBATCH --partition=gpu', '#SBATCH --cpus-per-task=8'):
    assert line in script, line
  assert script.index('--dependency') > script.index('#!/bin/bash', 1)   # on the array only
  assert json.loads((out / 'slurm_jobs.json').read_text())['job_ids'][0].startswith('4242')
  again = _cli(*flags, env=env)
  assert again.returncode == 2 and 'still queued or running' in again.stderr
  # Without squeue, or with a damaged job record, a rerun is one error line, not a traceback.
  (bin_dir / 'squeue').unlink()
  (out / 'slurm_jobs.json').write_text(json.dumps({'job_ids': ['4242']}))
  blind = _cli(*flags, env=env)
  lines = blind.stderr.strip().splitlines()
  assert blind.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: ') and \
      'squeue cannot be asked' in lines[0], blind.stderr[-2000:]
  (out / 'slurm_jobs.json').write_text('{"job_')
  torn = _cli(*flags, env=env)
  assert torn.returncode == 2 and len(torn.stderr.strip().splitlines()) == 1 and \
      'slurm_jobs.json is unreadable' in torn.stderr, torn.stderr[-2000:]


def test_lock_prompts_memory_and_failed_runs(tmp_path, monkeypatch):
  """The folder lock excludes a second holder and frees on release; a narrower plan does not
  make the folder forget its earlier prompts; a failed run does not stop its job's next one."""
  held = sweep_jobs.Lock(str(tmp_path))
  held.acquire()
  with pytest.raises(FileExistsError, match=r'another sweep \(.* pid \d+\) is running'):
    sweep_jobs.Lock(str(tmp_path)).acquire()
  held.release()
  sweep_jobs.Lock(str(tmp_path)).acquire()

  f = tmp_path / 'p.txt'
  f.write_text('a red square bouncing on a white background\n'
               'a blue triangle bouncing on a red background\n')
  wide = _cfg(methods='BF16', num_prompts=2, prompts_file=str(f))
  sweep_plan.prepare(str(tmp_path / 's'), wide, sweep_plan.plan(wide))
  narrow = _cfg(methods='BF16', num_prompts=1, prompts_file=str(f))
  sweep_plan.prepare(str(tmp_path / 's'), narrow, sweep_plan.plan(narrow))
  g = tmp_path / 'q.txt'
  g.write_text('a red square bouncing on a white background\n'
               'a green circle bouncing on a black background\n')
  other = _cfg(methods='BF16', num_prompts=2, prompts_file=str(g))
  with pytest.raises(ValueError, match='has prompt 1 = .*another prompts file'):
    sweep_plan.check_folder(str(tmp_path / 's'), other, sweep_plan.plan(other))
  # A sweep.json with runs but no "prompts" (written before it existed): its runs' prompts are
  # remembered all the same through a narrower plan.
  sweep_plan.prepare(str(tmp_path / 'old'), wide, sweep_plan.plan(wide))
  meta = tmp_path / 'old' / 'sweep.json'
  meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                              if k != 'prompts'}))
  sweep_plan.prepare(str(tmp_path / 'old'), narrow, sweep_plan.plan(narrow))
  with pytest.raises(ValueError, match='has prompt 1 = .*another prompts file'):
    sweep_plan.check_folder(str(tmp_path / 'old'), other, sweep_plan.plan(other))

  tried = []

  def generate(s, progress):
    tried.append(os.path.basename(s))
    if s.endswith('p000_s0'):
      raise FloatingPointError('NaN latents')

  monkeypatch.setattr(sweep_jobs.kvrun, 'resolve', lambda config, outdir: outdir)
  monkeypatch.setattr(sweep_jobs.kvrun, 'generate', generate)
  monkeypatch.setitem(sweep_jobs.STATE, 'main', True)
  with pytest.raises(RuntimeError, match=r'1 run\(s\) failed: runs/BF16/p000_s0: '
                                         r'FloatingPointError: NaN latents'):
    sweep_jobs.run_job(str(tmp_path / 's'), wide.to_dict(),
                       [r.to_dict() for r in sweep_plan.plan(wide)])
  assert tried == ['p000_s0', 'p001_s1']
