"""A sweep's plan: its runs (method x prompt x seed), its folder, and checks before any work.

The sweep folder (the contract ``launch.aggregate`` reads):

  DIR/sweep.json                     the sweep config, its fingerprint, the methods (canonical
                                     names, in order) and the planned runs
  DIR/references/                    the BF16 references, one per (prompt, seed), shared
  DIR/runs/<METHOD>/p<III>_s<SEED>/  one launcher result folder per run, written atomically:
                                     it exists only when complete (result.json, latents.npy, ...)

A run folder whose result.json is missing, unreadable or not this run's is *corrupt*: it is
removed and redone, never counted. The fingerprint covers everything that changes a run's
numbers except the method list and the prompt count (the run config, the seed rule), so a sweep
can grow by methods or prompts in the same folder; a folder made by another config is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import ml_collections

from kvjax import cache as kvcache
from kvjax import files
from kvjax import references
from kvjax import wan_dir

FORMAT = 1
SWEEP_JSON = 'sweep.json'
LOCK = '.sweep.lock'
RESULT_FIELDS = ('method', 'config', 'params', 'seed', 'frames', 'batch', 'latent_shape',
                 'kv_cache_bytes', 'bf16_kv_cache_bytes', 'compression_ratio', 'runtime_s',
                 'peak_memory_bytes', 'reference', 'window_frames', 'sink_frames', 'prompts')
"""result.json fields every complete run has (docs/RESULTS.md); a folder lacking one is corrupt."""
NUMBERS = ('params', 'seed', 'frames', 'batch', 'kv_cache_bytes', 'bf16_kv_cache_bytes',
           'compression_ratio', 'runtime_s', 'window_frames', 'sink_frames')
"""The fields of ``RESULT_FIELDS`` that must be numbers."""

# Run-config fields the sweep sets per run; they are not part of the fingerprint.
_PER_RUN = ('method', 'seed', 'prompt', 'prompts_file', 'reference_dir')


@dataclasses.dataclass(frozen=True)
class Run:
  """One (method, prompt, seed) of a sweep."""
  method: str         # canonical name (aliases resolved)
  prompt_index: int
  prompt: str
  seed: int

  @property
  def dir(self) -> str:
    """Folder relative to the sweep folder."""
    return os.path.join('runs', self.method, f'p{self.prompt_index:03d}_s{self.seed}')

  def to_dict(self) -> dict[str, Any]:
    return dict(method=self.method, prompt_index=self.prompt_index, prompt=self.prompt,
                seed=self.seed, dir=self.dir)


def methods_of(spec: str) -> list[str]:
  """'all' (the study's 33 in table order) or a comma list of names/aliases -> canonical names,
  BF16 first when present (its rollout becomes the stored reference of the others)."""
  spec = str(spec).strip()
  if spec == 'all':
    names = list(kvcache.PAPER_NAMES)
  else:
    asked = [x.strip() for x in spec.split(',') if x.strip()]
    if not asked:
      raise ValueError('--config.methods is empty; give "all" or names (--list_methods)')
    names = []
    for a in asked:
      try:
        names.append(kvcache.get(a).name)
      except ValueError as e:
        raise ValueError(f'--config.methods: {e}') from None
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise ValueError(f'--config.methods names {dup} twice')
  return sorted(names, key=lambda n: n != 'BF16')


def read_prompts(path: str, count: int) -> list[str]:
  """The first ``count`` non-empty lines of ``path`` (stripped)."""
  if not path:
    raise ValueError('--config.prompts_file is not set: give a file with one prompt per line '
                     '(README.md says where the study\'s suites come from)')
  if count < 1:
    raise ValueError(f'--config.num_prompts must be >= 1 (got {count})')
  prompts = wan_dir.read_prompts(None, path)     # the launcher's reader: missing, empty, UTF-8
  if len(prompts) < count:
    raise ValueError(f'prompts file {path} has {len(prompts)} prompt(s), fewer than '
                     f'--config.num_prompts={count}')
  return prompts[:count]


def plan(sweep: ml_collections.ConfigDict) -> list[Run]:
  """Every run of the sweep, method-major (a method's runs together), BF16 first."""
  methods = methods_of(sweep.methods)
  prompts = read_prompts(str(sweep.prompts_file), int(sweep.num_prompts))
  offset = int(sweep.seed_offset)
  if offset < 0:
    raise ValueError(f'--config.seed_offset must be >= 0 (got {offset})')
  return [Run(m, i, p, offset + i) for m in methods for i, p in enumerate(prompts)]


def fingerprint(sweep: ml_collections.ConfigDict) -> str:
  """SHA-256 of what fixes a run's numbers besides its method and prompt (run config without
  the per-run fields, the seed rule)."""
  run = sweep.run.to_dict()
  for k in _PER_RUN:
    run.pop(k, None)
  blob = json.dumps(dict(format=FORMAT, run=run, seed_offset=int(sweep.seed_offset)),
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()


def run_config(sweep: ml_collections.ConfigDict, run: Run,
               sweep_dir: str) -> ml_collections.ConfigDict:
  """The launcher config of one run: the sweep's run config with its method, prompt and seed,
  and the sweep's reference store (``sweep.reference_dir``, else the folder's references/)."""
  c = ml_collections.ConfigDict(sweep.run.to_dict())
  c.method, c.prompt, c.prompts_file, c.seed = run.method, run.prompt, '', run.seed
  c.reference_dir = str(sweep.reference_dir) or os.path.join(sweep_dir, 'references')
  return c


def _malformed(result: dict) -> list[str]:
  bad = [k for k in NUMBERS
         if isinstance(result[k], bool) or not isinstance(result[k], (int, float))]
  shape = result['latent_shape']
  if not isinstance(shape, list) or len(shape) != 5 or not all(isinstance(x, int) for x in shape):
    bad.append('latent_shape')
  if 'batch' not in bad and result['batch'] < 1:
    bad.append('batch')
  return bad


def run_problem(sweep_dir: str, run: Run, rel_dir: str | None = None) -> str:
  """Why ``run``'s folder (``rel_dir``, default ``run.dir``) does not hold its complete result
  ('' when it does; 'missing' without a folder): the one definition the sweep (skip or redo),
  the aggregate and the VBench evaluator (count) share."""
  folder = os.path.join(sweep_dir, rel_dir or run.dir)
  if not os.path.isdir(folder):
    return 'missing'
  try:
    with open(os.path.join(folder, 'result.json')) as f:
      r = json.load(f)
  except FileNotFoundError:
    return 'no result.json'
  except (OSError, ValueError) as e:
    return f'result.json is not JSON ({str(e)[:80]})'
  lacking = [k for k in RESULT_FIELDS if k not in r] if isinstance(r, dict) else ['all']
  if lacking:
    return f'result.json lacks {", ".join(lacking)}'
  malformed = _malformed(r)
  if malformed:
    return f'result.json has malformed {", ".join(malformed)}'
  if (r['method'], r['seed'], r['prompts']) != (run.method, run.seed, [run.prompt]):
    return (f'result.json is {r["method"]} seed {r["seed"]} prompt {str(r["prompts"])[:60]}, '
            f'planned {run.method} seed {run.seed} prompt {run.prompt[:60]!r}')
  try:
    with open(os.path.join(folder, 'curves.csv'), newline='') as f:
      rows = list(csv.reader(f))
  except (OSError, ValueError, csv.Error) as e:
    return f'curves.csv unreadable ({type(e).__name__})'
  if len(rows) < 2:
    return 'curves.csv has no rows'
  return ''


def is_complete(sweep_dir: str, run: Run) -> bool:
  """The run's folder holds this run's complete result (``run_problem``)."""
  return not run_problem(sweep_dir, run)


def sweep_json(sweep: ml_collections.ConfigDict, runs: list[Run],
               earlier: dict | None = None) -> dict[str, Any]:
  """The content of sweep.json: the current plan's runs, and every prompt index any plan of the
  folder used (``earlier``: the previous sweep.json), so a later plan cannot reuse an index for
  another prompt after a narrower one."""
  prompts = known_prompts(earlier or {})
  prompts.update({r.prompt_index: r.prompt for r in runs})
  return dict(format=FORMAT, config=sweep.to_dict(), fingerprint=fingerprint(sweep),
              methods=list(dict.fromkeys(r.method for r in runs)),
              prompts={str(k): prompts[k] for k in sorted(prompts)},
              runs=[r.to_dict() for r in runs])


def known_prompts(old: dict) -> dict[int, str]:
  """prompt index -> prompt of every plan a sweep.json (``old``) records: its ``prompts`` and its
  runs' (a sweep.json written before ``prompts`` existed has only the runs)."""
  prompts = {int(k): v for k, v in old.get('prompts', {}).items()}
  prompts.update({int(r['prompt_index']): r['prompt'] for r in old.get('runs', [])})
  return prompts


def check_folder(sweep_dir: str, sweep: ml_collections.ConfigDict, runs: list[Run]) -> None:
  """Refuses a folder made by another sweep config, or a file in the sweep folder's place, or
  one that cannot be written: before any work."""
  if os.path.exists(sweep_dir) and not os.path.isdir(sweep_dir):
    raise FileExistsError(f'--outdir {sweep_dir} exists and is not a folder')
  meta = os.path.join(sweep_dir, SWEEP_JSON)
  # A sweep killed before its first sweep.json leaves only the lock and an empty runs/.
  leftovers = [e for e in os.listdir(sweep_dir) if e != LOCK and not (
      e == 'runs' and not os.listdir(os.path.join(sweep_dir, e)))] if os.path.isdir(
          sweep_dir) else []
  if leftovers and not os.path.isfile(meta):
    raise FileExistsError(f'--outdir {sweep_dir} is not empty and has no {SWEEP_JSON}: not a '
                          'sweep folder (choose a new or empty folder)')
  if os.path.isfile(meta):
    try:
      with open(meta) as f:
        old = json.load(f)
      old_fp, prompts = old['fingerprint'], known_prompts(old)
      if not isinstance(old['runs'], list):
        raise TypeError('runs')
    except (OSError, ValueError, KeyError, TypeError):
      raise ValueError(f'{meta} is unreadable: not a kvjax sweep folder') from None
    if old_fp != fingerprint(sweep):
      raise ValueError(f'{sweep_dir} was made by another sweep config (run config or seed rule '
                       'differ); use a new --outdir or the config it was made with '
                       f'({SWEEP_JSON} holds it)')
    for r in runs:
      if prompts.get(r.prompt_index, r.prompt) != r.prompt:
        raise ValueError(f'{sweep_dir} has prompt {r.prompt_index} = '
                         f'{prompts[r.prompt_index][:60]!r}, the prompts file gives '
                         f'{r.prompt[:60]!r}: another prompts file; use a new --outdir')
  if str(sweep.reference_dir):         # a store shared between sweeps: usable before any work
    references.check_dir(str(sweep.reference_dir))
  try:
    files.writable_root(sweep_dir)
  except OSError as e:
    raise PermissionError(f'--outdir {sweep_dir}: cannot write in {e.filename or sweep_dir} '
                          f'({e.strerror})') from None


def remove(path: str) -> None:
  """Removes a run folder (or a file in its place) if it exists."""
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def remove_partials(sweep_dir: str) -> None:
  """Removes the staging folders (``.<name>.partial-*``) of killed run writers under runs/ (the
  sweep's lock is held, so none is alive). A reference store, which other sweeps may share, is
  left alone: its staging folders are hidden and never read."""
  for root, dirs, _ in os.walk(os.path.join(sweep_dir, 'runs')):
    for d in list(dirs):
      if '.partial-' in d:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        dirs.remove(d)


def prepare(sweep_dir: str, sweep: ml_collections.ConfigDict, runs: list[Run]) -> list[str]:
  """Writes sweep.json, removes staging folders of killed writers and corrupt run folders;
  returns the removed corrupt folders (relative). Call with the sweep's lock held."""
  os.makedirs(os.path.join(sweep_dir, 'runs'), exist_ok=True)
  meta = os.path.join(sweep_dir, SWEEP_JSON)
  earlier = None
  try:                                # check_folder refused an unreadable one before
    with open(meta) as f:
      earlier = json.load(f)
  except (OSError, ValueError):
    pass
  files.write_json(meta, sweep_json(sweep, runs, earlier))
  remove_partials(sweep_dir)
  corrupt = []
  for r in runs:
    path = os.path.join(sweep_dir, r.dir)
    if os.path.lexists(path) and not is_complete(sweep_dir, r):
      remove(path)
      corrupt.append(r.dir)
  return corrupt
