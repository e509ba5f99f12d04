r"""Runs a sweep of the study: cache methods x prompts x seeds, resumable, here or on Slurm.

  python -m launch.sweep --config=configs/sweeps/study.py --outdir=runs/study [--dry_run]
  python -m launch.sweep --config=configs/sweeps/study.py --outdir=runs/s2 \
      --config.methods=BF16,RTN_INT4,KIVI_INT4 --config.num_prompts=2
  python -m launch.sweep --config=configs/sweeps/study.py:wan --outdir=/scratch/study \
      --config.prompts_file=MovieGenVideoBench_extended.txt --config.run.checkpoint=CKPT \
      --config.run.wan_dir=Wan2.1-T2V-1.3B --executor=slurm --config.executor.slurm.partition=gpu
  python -m launch.aggregate --sweep_dir=runs/study

Each (method, prompt, seed) is one launcher run written atomically into
``DIR/runs/<METHOD>/p<III>_s<SEED>/`` (the layout: ``launch/sweep_plan.py``); the BF16 rollout
of each (prompt, seed) is computed once (the BF16 method's own run, else the first method's) and
stored in ``DIR/references/`` for every other method. Rerunning the same command resumes: finished
runs are skipped, a corrupt run folder is redone. Runs are grouped into jobs (one per method by
default, so a method compiles once) and submitted through submitit: ``local`` runs them as
subprocesses of this machine (one on each GPU of ``--config.executor.local_gpus`` at once),
``slurm`` as a job array (GPUs, time limit, partition from ``config.executor.slurm``),
``inline`` in this process.

Bad input (an unknown method, a missing or empty prompts file, a prompt the model cannot read,
a folder of another sweep, an unwritable folder) is one ``error:`` line and exit status 2 before
any work. Ctrl-C stops the jobs, removes what they were writing and exits 130; finished runs stay.
"""

from __future__ import annotations

import os
import shutil
import sys

import jax
from absl import app, flags, logging

from kvjax import cli
from kvjax import interrupts
from kvjax import run as kvrun
from kvjax.world import scene
from launch import sweep_jobs as jobs_lib
from launch import sweep_plan
from launch.sweep_plan import Run

_DEFAULT_CONFIG = os.path.join(jobs_lib.REPO, 'configs', 'sweeps', 'study.py')
EXECUTORS = ('local', 'slurm', 'inline')

cli.define_config(_DEFAULT_CONFIG, 'Sweep config (path:variant).')
flags.DEFINE_string('outdir', None, 'The sweep folder (new, empty, or this sweep\'s: resumed).')
flags.DEFINE_enum('executor', None, list(EXECUTORS), 'Where the jobs run; sets '
                  'config.executor.kind.')
flags.DEFINE_bool('dry_run', False, 'Print the plan (runs, jobs, what is done) and exit.')
FLAGS = flags.FLAGS


def validate(sweep, runs: list[Run], sweep_dir: str) -> None:
  """Resolves one run per method and one per prompt: every method, argument, prompt and input
  error before any work (run.resolve checks without computing)."""
  seen_methods, seen_prompts = set(), set()
  for r in runs:
    if r.method in seen_methods and r.prompt_index in seen_prompts:
      continue
    seen_methods.add(r.method)
    seen_prompts.add(r.prompt_index)
    config = sweep_plan.run_config(sweep, r, sweep_dir)
    config.reference_dir = ''             # checked by check_folder; nothing is created here
    try:
      s = kvrun.resolve(config)
    except Exception as e:
      if isinstance(e, scene.CaptionError):
        raise ValueError(f'prompt {r.prompt_index}: {e} (the world model reads its caption '
                         'grammar only; prompt suites such as MovieGen need a Wan config: '
                         'configs/sweeps/study.py:wan)') from None
      if isinstance(e, cli.INPUT_ERRORS):
        raise type(e)(f'{r.method}, prompt {r.prompt_index}: {e}') from None
      raise
    if s.method.name != r.method:       # e.g. run.method_args turning a method into another
      raise ValueError(f'{r.method} with --config.run.method_args={sweep.run.method_args!r} is '
                       f'{s.method.name}: its runs would never match the plan; list '
                       f'{s.method.name} in --config.methods instead')


def dry_run(kind, sweep, sweep_dir, runs, jobs) -> str:
  done = sum(sweep_plan.is_complete(sweep_dir, r) for r in runs) if os.path.isdir(sweep_dir) else 0
  methods = list(dict.fromkeys(r.method for r in runs))
  prompts = sorted({r.prompt_index for r in runs})
  lines = [f'sweep {sweep.name} -> {sweep_dir} ({kind})',
           f'  {len(runs)} runs = {len(methods)} methods x {len(prompts)} prompts '
           f'(seed = {int(sweep.seed_offset)} + prompt index), {done} already done',
           f'  run config {sweep.run.name}: {sweep.run.video.num_latent_frames} latent frames, '
           f'window {sweep.run.cache.window_frames}, sink {sweep.run.cache.sink_frames}, '
           f'impl {sweep.run.impl}',
           f'  {len(jobs)} job(s) of {min(len(j) for j in jobs)}-{max(len(j) for j in jobs)} runs',
           f'  methods: {", ".join(methods)}']
  if kind == 'local':
    gpus = ','.join(jobs_lib.local_gpus(sweep))
    lines.append(f'  local: one job at a time on each GPU id of {gpus}')
  if kind == 'slurm':
    sl = sweep.executor.slurm
    head = 'the BF16 job, then ' if jobs[0][0].method == 'BF16' and len(jobs) > 1 else ''
    n = len(jobs) - (1 if head else 0)
    lines.append(f'  slurm: {head}an array of {n} (at most {sl.array_parallelism} at once), '
                 f'{sl.gpus_per_task} GPU(s), {sl.cpus_per_task} CPUs, {sl.mem_gb} GB, '
                 f'{sl.timeout_min} min each, partition {sl.partition or "(default)"}')
  for r in runs[:len(prompts)]:
    lines.append(f'  prompt {r.prompt_index} (seed {r.seed}): {r.prompt[:90]}')
  return '\n'.join(lines)


def main(argv) -> int:
  if len(argv) > 1:
    return cli.error(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  if not FLAGS.outdir:
    return cli.error('--outdir is required (the sweep folder; an existing one resumes)')
  sweep_dir = os.path.abspath(FLAGS.outdir)
  try:
    sweep = FLAGS.config
    sweep.to_dict()
  except Exception as e:
    return cli.error(f'--config: {type(e).__name__}: {e}')
  kind = FLAGS.executor or str(sweep.executor.kind)
  if kind != 'inline':     # this process only plans and checks: no GPU memory of its own
    jax.config.update('jax_platforms', 'cpu')
  try:
    if kind not in EXECUTORS:
      raise ValueError(f'unknown executor {kind!r}; valid: {list(EXECUTORS)}')
    runs = sweep_plan.plan(sweep)
    jobs = jobs_lib.jobs_of(runs, int(sweep.executor.runs_per_job))
    jobs_lib.local_gpus(sweep)
    sweep_plan.check_folder(sweep_dir, sweep, runs)
    validate(sweep, runs, sweep_dir)
  except cli.INPUT_ERRORS as e:
    return cli.error(e)
  if FLAGS.dry_run:
    print(dry_run(kind, sweep, sweep_dir, runs, jobs))
    return 0
  if kind == 'slurm' and not all(shutil.which(c) for c in ('sbatch', 'srun')):
    return cli.error('--executor=slurm needs Slurm (sbatch and srun on PATH); run on the '
                     "cluster's login node, or use --executor=local here")
  try:
    pending = jobs_lib.slurm_pending(sweep_dir)
  except cli.INPUT_ERRORS as e:
    return cli.error(e)
  if pending:
    return cli.error(f'{sweep_dir}: Slurm job(s) {", ".join(pending)} of this sweep are '
                           'still queued or running; wait for them or scancel them first')
  os.makedirs(sweep_dir, exist_ok=True)
  lock = jobs_lib.Lock(sweep_dir)
  try:
    lock.acquire()
  except FileExistsError as e:
    return cli.error(e)
  jobs_lib.STATE['sweep_dir'] = sweep_dir
  try:
    corrupt = sweep_plan.prepare(sweep_dir, sweep, runs)
    for d in corrupt:
      print(f'sweep: {d} was corrupt or partial: removed, it is redone', file=sys.stderr)
    progress = jobs_lib.Progress(sweep_dir, runs)
    todo = [[r for r in job if r in set(progress.left)] for job in jobs]
    todo = [j for j in todo if j]
    print(f'sweep: {len(runs)} runs ({progress.done_at_start} done), {len(todo)} job(s) to run '
          f'({kind}) -> {sweep_dir}', file=sys.stderr, flush=True)
    status = jobs_lib.execute(kind, sweep, sweep_dir, todo, progress) if todo else 0
  finally:
    lock.release()
  if kind != 'slurm':
    done = progress.poll()
    print(f'sweep: {done}/{len(runs)} runs done in {sweep_dir}'
          + ('' if done == len(runs) else ' (rerun the same command to redo the failed ones)')
          + f'; next: python -m launch.aggregate --sweep_dir={FLAGS.outdir}', flush=True)
  return status


def run_main():
  jobs_lib.STATE['main'] = True
  interrupts.watch(jobs_lib.interrupted, 'kvjax-sweep-interrupts')
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run_main()
