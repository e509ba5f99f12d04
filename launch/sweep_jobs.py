"""How a sweep's jobs run: the job function, the executors (submitit local, Slurm, inline),
the folder lock, the progress line and the interrupt cleanup (``launch.sweep`` is the CLI)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import submitit

from kvjax import files
from kvjax import interrupts
from kvjax import run as kvrun
from launch import sweep_plan
from launch.sweep_plan import Run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  the folders it wrote. A run that fails is reported and the job goes on to the next; the job
  then fails naming them (a resume redoes them). Ctrl-C / SIGINT (submitit's cancel) removes the
  run being written."""
  if not STATE.get('main'):           # a job process of its own (submitit)
    interrupts.watch(_job_interrupted, 'kvjax-sweep-job')
  runs = runs[_init_distributed()]
  print(f'sweep job: CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")}, '
        f'{len(runs)} run(s)', flush=True)
  sweep = ml_collections.ConfigDict(sweep_dict)
  wrote, failed = [], []
  for d in runs:
    r = Run(d['method'], d['prompt_index'], d['prompt'], d['seed'])
    if sweep_plan.is_complete(sweep_dir, r):
      continue
    out = os.path.join(sweep_dir, r.dir)
    sweep_plan.remove(out)               # a corrupt folder (prepare removed those it saw)
    try:
      s = kvrun.resolve(sweep_plan.run_config(sweep, r, sweep_dir), outdir=out)
      kvrun.generate(s, progress=False)
    except Exception as e:               # noqa: BLE001  (the next run is independent)
      failed.append(f'{r.dir}: {type(e).__name__}: {str(e).strip()[:200]}')
      print(f'sweep job: {failed[-1]}', file=sys.stderr, flush=True)
      continue
    wrote.append(r.dir)
  if failed:
    raise RuntimeError(f'{len(failed)} run(s) failed: ' + ' | '.join(failed))
  return wrote


def _job_interrupted() -> None:
  kvrun.discard_partial()
  interrupts.exit_interrupted('job interrupted; its partial run removed')


def _init_distributed() -> slice:
  """Multi-host jobs (Slurm with several tasks, ``executor.slurm.nodes`` > 1): ``jax.distributed``
  reads the Slurm environment, and each process takes every ``process_count``-th run of the job
  on its own devices (a run fits one host; the batch mesh is local). One task: every run."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()
    return slice(jax.process_index(), None, jax.process_count())
  return slice(None)


class Lock:
  """``DIR/.sweep.lock``: one sweep process per folder (a second one would remove the first's
  staging folders). An exclusive ``flock`` on the open file: the kernel releases it when the
  process dies, however it dies (on NFS, Linux maps it to a byte-range lock the server keeps),
  so there is no stale lock to judge. The file stays; it names the last holder."""

  def __init__(self, sweep_dir: str):
    self.path = os.path.join(sweep_dir, sweep_plan.LOCK)
    self._fd = None

  def acquire(self) -> None:
    fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode(errors='replace').strip() or 'another process'
      os.close(fd)
      raise FileExistsError(f'another sweep ({holder}) is running in '
                            f'{os.path.dirname(self.path)}') from None
    os.ftruncate(fd, 0)
    os.write(fd, f'{socket.gethostname()} pid {os.getpid()}'.encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def slurm_pending(sweep_dir: str) -> list[str]:
  """Job ids of this folder's earlier Slurm submission still queued or running."""
  path = os.path.join(sweep_dir, SLURM_JOBS)
  if not os.path.isfile(path):
    return []
  try:
    with open(path) as f:
      ids = [str(i) for i in json.load(f)['job_ids']]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path} is unreadable ({type(e).__name__}); if its jobs are done, remove '
                     'it and rerun') from None
  try:
    out = subprocess.run(['squeue', '-h', '-o', '%i', '-j', ','.join(ids)], capture_output=True,
                         text=True, timeout=60).stdout
  except (OSError, subprocess.TimeoutExpired):
    raise FileExistsError(f'{sweep_dir} was submitted to Slurm ({SLURM_JOBS}) and squeue cannot '
                          'be asked here whether its jobs still run; resume on the cluster, or '
                          f'remove {SLURM_JOBS} once they are done') from None
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
    ids = visible_gpus() or [CPU_SLOT]
    if ids != [CPU_SLOT] and not all(g.isdigit() for g in ids):
      raise ValueError(f'CUDA_VISIBLE_DEVICES={",".join(ids)} names GPUs by UUID or MIG id; give '
                       "their indices with --config.executor.local_gpus, e.g. '0,1'")
    return ids
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
    ids = []
    if payload[0][0]['method'] == 'BF16' and len(payload) > 1:
      # BF16 first; the array waits for it (afterany: its failure does not block the others),
      # so every method reads the stored references instead of rolling BF16 out again.
      ids.append(ex.submit(run_job, sweep_dir, sweep_dict, payload.pop(0)).job_id)
      ex.update_parameters(additional_parameters=dict(dependency=f'afterany:{ids[0]}'))
    submitted = ex.map_array(run_job, [sweep_dir] * len(payload), [sweep_dict] * len(payload),
                             payload)
    ids += [j.job_id for j in submitted]
    files.write_json(os.path.join(sweep_dir, SLURM_JOBS), dict(job_ids=ids))
    print(f'submitted {len(ids)} Slurm job(s) ({", ".join(sorted({i.split("_")[0] for i in ids}))}'
          '); rerun this '
          'command to resume what fails, then python -m launch.aggregate '
          f'--sweep_dir={sweep_dir}', flush=True)
    return 0
  # One job per GPU id at a time; submitit sets the job's CUDA_VISIBLE_DEVICES to its id.
  free = local_gpus(sweep)
  pending, running, failed, gpu_of = list(payload), [], [], {}
  # The BF16 job runs alone first: its rollouts become the stored references the other jobs read
  # (started beside it, each would roll its own BF16 reference out).
  bf16_first = bool(pending) and pending[0][0]['method'] == 'BF16'
  bf16_job = None
  _RUNNING[:] = []
  while pending or running:
    while pending and free and (bf16_job is None or bf16_job.done()):
      gpu = free.pop(0)
      ex.update_parameters(**(dict(gpus_per_node=0) if gpu == CPU_SLOT else
                              dict(gpus_per_node=1, visible_gpus=[int(gpu)])))
      job = ex.submit(run_job, sweep_dir, sweep_dict, pending.pop(0))
      if bf16_first and bf16_job is None:
        bf16_job = job
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
    sweep_plan.remove_partials(sweep_dir)      # the lock goes with this process
  interrupts.exit_interrupted('interrupted; finished runs are kept; rerun the same command to '
                              'resume')
