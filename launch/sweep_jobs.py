"""How a sweep's jobs run: the job function, the executors (submitit local, Slurm, inline),
the folder lock, the progress line and the interrupt cleanup (``launch.sweep`` is the CLI)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import submitit

from kvjax import interrupts
from kvjax import run as kvrun
from launch import sweep_plan
from launch.sweep_plan import Run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = '.sweep.lock'
SLURM_JOBS = 'slurm_jobs.json'
CPU_SLOT = 'cpu'    # local_gpus on a machine without GPUs: one job at a time, no GPU


def jobs_of(runs: list[Run], runs_per_job: int) -> list[list[Run]]:
  """Groups the runs: one job per method (0) or chunks of ``runs_per_job`` in plan order."""
  if runs_per_job < 0:
    raise ValueError(f'--config.executor.runs_per_job must be >= 0 (got {runs_per_job})')
  if runs_per_job == 0:
    by_method: dict[str, list[Run]] = {}
    for r in runs:
      by_method.setdefault(r.method, []).append(r)
    return list(by_method.values())
  return [runs[i:i + runs_per_job] for i in range(0, len(runs), runs_per_job)]


def run_job(sweep_dir: str, sweep_dict: dict, runs: list[dict]) -> list[str]:
  """One job: each of ``runs`` not yet complete, in order (a job process, or inline). Returns
  the folders it wrote. Ctrl-C / SIGINT (submitit's cancel) removes the run being written."""
  if not STATE.get('main'):           # a job process of its own (submitit)
    interrupts.watch(_job_interrupted, 'kvjax-sweep-job')
  _init_distributed()
  print(f'sweep job: CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")}, '
        f'{len(runs)} run(s)', flush=True)
  sweep = ml_collections.ConfigDict(sweep_dict)
  wrote = []
  for d in runs:
    r = Run(d['method'], d['prompt_index'], d['prompt'], d['seed'])
    if sweep_plan.is_complete(sweep_dir, r):
      continue
    out = os.path.join(sweep_dir, r.dir)
    sweep_plan.remove(out)               # a corrupt folder (prepare removed those it saw)
    s = kvrun.resolve(sweep_plan.run_config(sweep, r, sweep_dir), outdir=out)
    kvrun.generate(s, progress=False)
    wrote.append(r.dir)
  return wrote


def _job_interrupted() -> None:
  kvrun.discard_partial()
  interrupts.exit_interrupted('job interrupted; its partial run removed')


def _init_distributed() -> None:
  """Multi-host jobs (Slurm with several tasks): ``jax.distributed`` reads the Slurm
  environment. A single task needs nothing."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()


class Lock:
  """``DIR/.sweep.lock``: one sweep process per folder (a second one would remove the first's
  staging folders). A lock whose process is gone is taken over."""

  def __init__(self, sweep_dir: str):
    self.path = os.path.join(sweep_dir, LOCK)

  def acquire(self) -> None:
    me = f'{socket.gethostname()} {os.getpid()}'
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        host, _, pid = open(self.path).read().partition(' ')
        if host == socket.gethostname() and pid.isdigit() and _alive(int(pid)):
          raise FileExistsError(f'another sweep (pid {pid}) is running in '
                                f'{os.path.dirname(self.path)}') from None
        os.remove(self.path)              # its process is gone
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(me)
      return
    raise FileExistsError(f'cannot take the lock {self.path}')

  def release(self) -> None:
    if os.path.exists(self.path):
      os.remove(self.path)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def slurm_pending(sweep_dir: str) -> list[str]:
  """Job ids of this folder's earlier Slurm submission still queued or running."""
  path = os.path.join(sweep_dir, SLURM_JOBS)
  if not os.path.isfile(path):
    return []
  ids = json.load(open(path))['job_ids']
  try:
    out = subprocess.run(['squeue', '-h', '-o', '%i', '-j', ','.join(ids)], capture_output=True,
                         text=True, timeout=60).stdout
  except (OSError, subprocess.TimeoutExpired):
    return []                             # no squeue here: nothing can be running here
  base = {i.split('_')[0] for i in ids}
  return sorted({x.split('_')[0] for x in out.split()} & base)


class Progress:
  """One line per change on stderr: runs done, jobs running, runs left, elapsed and ETA."""

  def __init__(self, sweep_dir: str, runs: list[Run]):
    self.sweep_dir, self.left = sweep_dir, list(runs)
    self.total, self.t0, self.last = len(runs), time.monotonic(), None
    self.done_at_start = self.poll()

  def poll(self) -> int:
    self.left = [r for r in self.left if not sweep_plan.is_complete(self.sweep_dir, r)]
    return self.total - len(self.left)

  def show(self, running: int) -> None:
    done = self.poll()
    new = done - self.done_at_start
    elapsed = time.monotonic() - self.t0
    eta = '-' if new == 0 else _hms(elapsed / new * len(self.left))
    line = (f'sweep: {done}/{self.total} runs done, {running} job(s) running, {len(self.left)} '
            f'left; {_hms(elapsed)} elapsed, ETA {eta}')
    if line.split(';')[0] != (self.last or '').split(';')[0]:
      print(line, file=sys.stderr, flush=True)
    self.last = line


def _hms(s: float) -> str:
  s = int(s)
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def visible_gpus() -> list[str]:
  """This machine's GPU ids without starting JAX here (the sweep process must not take GPU
  memory): CUDA_VISIBLE_DEVICES when set, else ``nvidia-smi -L``'s count; [] without GPUs."""
  env = os.environ.get('CUDA_VISIBLE_DEVICES')
  if env is not None:
    return [g.strip() for g in env.split(',') if g.strip()]
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.TimeoutExpired):
    return []
  count = sum(line.startswith('GPU ') for line in out.stdout.splitlines())
  return [str(i) for i in range(count)] if out.returncode == 0 else []


def local_gpus(sweep) -> list[str]:
  """``config.executor.local_gpus`` as ids ('auto': every visible GPU, or ['cpu'], one job at a
  time with no GPU, on a machine without); raises on a malformed list."""
  spec = str(sweep.executor.local_gpus).strip()
  if spec == 'auto':
    return visible_gpus() or [CPU_SLOT]
  ids = [g.strip() for g in spec.split(',') if g.strip()]
  if not ids or not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
    raise ValueError(f'--config.executor.local_gpus={sweep.executor.local_gpus!r}: give distinct '
                     "GPU ids, e.g. '0' or '0,1,2,3', or auto")
  return ids


def _executor(kind: str, sweep, sweep_dir: str):
  folder = os.path.join(sweep_dir, '.submitit', '%j')
  if kind == 'local':
    ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(timeout_min=int(sweep.executor.slurm.timeout_min))
    return ex
  sl = sweep.executor.slurm
  ex = submitit.SlurmExecutor(folder=folder)
  params = dict(time=int(sl.timeout_min), gpus_per_node=int(sl.gpus_per_task),
                cpus_per_task=int(sl.cpus_per_task), mem=f'{int(sl.mem_gb)}G',
                nodes=int(sl.nodes), ntasks_per_node=1, array_parallelism=int(sl.array_parallelism),
                job_name=str(sweep.name))
  for key in ('partition', 'account', 'qos'):
    if str(sl[key]):
      params[key] = str(sl[key])
  ex.update_parameters(**params)
  return ex


def execute(kind: str, sweep, sweep_dir: str, jobs: list[list[Run]],
            progress: Progress) -> int:
  """Runs (or, on Slurm, submits) the jobs; returns the exit status."""
  sweep_dict = sweep.to_dict()
  payload = [[r.to_dict() for r in job] for job in jobs]
  if kind == 'inline':
    for job in payload:
      run_job(sweep_dir, sweep_dict, job)
      progress.show(running=0)
    return 0
  os.environ['PYTHONPATH'] = os.pathsep.join(     # the jobs import launch.sweep from the repo
      [REPO] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])
  ex = _executor(kind, sweep, sweep_dir)
  if kind == 'slurm':
    submitted = ex.map_array(run_job, [sweep_dir] * len(payload), [sweep_dict] * len(payload),
                             payload)
    ids = [j.job_id for j in submitted]
    sweep_plan.write_json_atomic(os.path.join(sweep_dir, SLURM_JOBS), dict(job_ids=ids))
    print(f'submitted {len(ids)} Slurm job(s) ({ids[0].split("_")[0]}, an array); rerun this '
          'command to resume what fails, then python -m launch.aggregate '
          f'--sweep_dir={sweep_dir}', flush=True)
    return 0
  # One job per GPU id at a time; submitit sets the job's CUDA_VISIBLE_DEVICES to its id.
  free = local_gpus(sweep)
  pending, running, failed, gpu_of = list(payload), [], [], {}
  _RUNNING[:] = []
  while pending or running:
    while pending and free:
      gpu = free.pop(0)
      ex.update_parameters(**(dict(gpus_per_node=0) if gpu == CPU_SLOT else
                              dict(gpus_per_node=1, visible_gpus=[int(gpu)])))
      job = ex.submit(run_job, sweep_dir, sweep_dict, pending.pop(0))
      running.append(job)
      gpu_of[job.job_id] = gpu
      _RUNNING[:] = running
    time.sleep(0.5)
    for j in [j for j in running if j.done()]:
      running.remove(j)
      free.append(gpu_of.pop(j.job_id))
      try:
        j.result()
      except Exception as e:              # one job's failure does not stop the others
        failed.append(j)
        tail = str(e).strip().splitlines()[-1:] or ['?']
        print(f'sweep: job {j.job_id} failed: {tail[0][:300]} (log: {j.paths.stderr})',
              file=sys.stderr, flush=True)
    _RUNNING[:] = running
    progress.show(running=len(running))
  return 1 if failed else 0


_RUNNING: list = []     # local jobs in flight (the interrupt handler cancels them)
STATE: dict = {}


def interrupted() -> None:
  """Stops the local jobs (they remove their partial runs), removes any staging folder left,
  releases the lock and exits 130."""
  for j in list(_RUNNING):
    j.cancel(check=False)
  deadline = time.monotonic() + 20
  while any(not j.done() for j in _RUNNING) and time.monotonic() < deadline:
    time.sleep(0.2)
  for j in _RUNNING:
    if not j.done() and j._process is not None:   # noqa: SLF001  (submitit has no kill API)
      j._process.kill()
  kvrun.discard_partial()
  sweep_dir = STATE.get('sweep_dir')
  if sweep_dir:
    sweep_plan.remove_partials(sweep_dir)
    Lock(sweep_dir).release()
  interrupts.exit_interrupted('interrupted; finished runs are kept; rerun the same command to '
                              'resume')
