r"""VBench scores of a sweep folder's videos (optional: it needs the ``vbench`` package and a GPU).

  python -m launch.vbench_eval --sweep_dir=runs/study
  python -m launch.vbench_eval --sweep_dir=runs/s2 --dimensions=imaging_quality,aesthetic_quality
  python -m launch.vbench_eval --sweep_dir=runs/storyeval --drift_frames=150
  python -m launch.aggregate --sweep_dir=runs/study     # table.csv/md, report: + VBench means

Install: ``pip install vbench`` (after a CUDA build of torch and torchvision, which VBench's setup
asks for) pulls torch, decord, CLIP, pyiqa and more, and VBench downloads its model weights into
``~/.cache/vbench`` on first use (MUSIQ, LAION aesthetic + CLIP ViT-L/14, DINO ViT-B/16, CLIP
ViT-B/32). It is therefore never part of kvjax's install; without it this program prints one line
``error: VBench is not installed ...`` and exits with status 2 before any work.

What it does (the study's protocol: its scripts/03_eval_vbench.sh and drift scripts): every
complete run of the sweep (``sweep_plan.is_complete``) with videos (result.json's ``videos``:
video.mp4, or video_0.mp4, ... for a batch) is scored by VBench in ``custom_input`` mode on
``--dimensions`` (default the study's four: background_consistency, imaging_quality,
subject_consistency, aesthetic_quality; imaging quality with ``longer`` preprocessing). A video's
value is VBench's per-video value, imaging quality divided by 100 so that all four lie in [0, 1] as
the study reports them; a run's value is the mean over its videos (VBench's own aggregate of the
consistency dimensions weights videos by frames: the same for equal-length videos, as a sweep's
are). ``drift_imaging_quality`` is the imaging quality of each video's first ``--drift_frames``
frames, cut by writing a re-encoded prefix copy (kvjax.video) into a temporary folder, as the
study's ``ffmpeg -frames:v N`` did. The study's "drift_last" caps: MovieGen Gen A/C rows 165 =
all frames of its 165-frame videos (the default here: the whole video, re-encoded; it differs from
imaging_quality only by the re-encoding), Gen B rows 50..700 step 50 (every cap >= 165 is the whole
video), StoryEval 150 (``--drift_frames=150``). A cap above a video's length takes all its
frames; the ``drift_frames`` column says what was used.

Output: ``DIR/vbench.csv`` (written atomically; a rerun recomputes and overwrites it), one row per
scored run: method, prompt_index, seed, dir, videos, one column per dimension,
drift_imaging_quality, drift_frames. Runs that are incomplete or have no videos are skipped and
named on stderr. ``launch.aggregate`` averages the rows per method into its table (its notes say
how). Bad input (no sweep folder, an unknown dimension, a cap < 1) is one ``error:`` line and exit
status 2 before any work.

The scoring goes through ``Scorer`` (paths, dimension) -> per-video scores; ``VBenchScorer`` is the
real one, tests pass a stub. Cost: VBench's models on a GPU, seconds per 165-frame 480x832 video
and dimension, plus one more imaging-quality pass for the drift prefixes.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pandas as pd
from absl import app, flags

from kvjax import cli
from kvjax import files
from kvjax import video as video_io
from launch import sweep_plan

DIMENSIONS = ('background_consistency', 'imaging_quality', 'subject_consistency',
              'aesthetic_quality')
"""The study's VBench dimensions (none is text-conditioned), in its order; the ones allowed."""
DRIFT = 'drift_imaging_quality'
CSV = 'vbench.csv'
KEYS = ('method', 'prompt_index', 'seed', 'dir', 'videos')
"""The identifying columns of vbench.csv, before the scores."""
NOT_INSTALLED = ('VBench is not installed (pip install vbench; it needs a CUDA GPU and downloads '
                 'its weights)')


class UsageError(Exception):
  """Bad input: reported as one ``error:`` line with exit status 2."""


class Scorer(Protocol):
  """Scores videos on one VBench dimension."""

  def __call__(self, videos: Sequence[str], dimension: str) -> list[float]:
    """``videos``: mp4 paths -> one score per video, in their order, on the study's scale (VBench's
    per-video value; imaging quality / 100), so in [0, 1]."""


class VBenchScorer:
  """The real VBench (``custom_input`` mode), imported here only: an optional dependency.

  Raises UsageError (``NOT_INSTALLED``) when the package cannot be imported."""

  def __init__(self, device: str = 'cuda', preprocessing: str = 'longer'):
    try:
      import vbench            # optional: pip install vbench (CUDA torch, weights on first use)
    except ImportError as e:
      raise UsageError(f'{NOT_INSTALLED}: {e}') from None
    self._vbench = vbench
    self.device = device
    self.preprocessing = preprocessing

  def __call__(self, videos: Sequence[str], dimension: str) -> list[float]:
    with tempfile.TemporaryDirectory(prefix='kvjax-vbench-') as tmp:
      folder, out = os.path.join(tmp, 'videos'), os.path.join(tmp, 'results')
      os.makedirs(folder)
      names = [f'{i:06d}.mp4' for i in range(len(videos))]     # unique; VBench keys by path
      for name, path in zip(names, videos):
        os.symlink(os.path.abspath(path), os.path.join(folder, name))
      bench = self._vbench.VBench(self.device, '', out)  # full-info json: unused in custom_input
      bench.evaluate(videos_path=folder, name='kvjax', dimension_list=[dimension],
                     mode='custom_input', imaging_quality_preprocessing_mode=self.preprocessing)
      with open(os.path.join(out, 'kvjax_eval_results.json')) as f:
        _, per_video = json.load(f)[dimension]       # [aggregate, [{video_path, video_results}]]
    got = {os.path.basename(v['video_path']): float(v['video_results']) for v in per_video}
    scale = 100.0 if dimension == 'imaging_quality' else 1.0
    return [got[n] / scale for n in names]


def parse_dimensions(text: str) -> list[str]:
  """--dimensions -> names of ``DIMENSIONS`` (in the given order); raises UsageError."""
  dims = list(dict.fromkeys(x.strip() for x in text.split(',') if x.strip()))
  if not dims:
    raise UsageError('--dimensions is empty')
  unknown = [d for d in dims if d not in DIMENSIONS]
  if unknown:
    raise UsageError(f'--dimensions: {", ".join(unknown)} not supported (the study\'s: '
                     f'{", ".join(DIMENSIONS)})')
  return dims


def read_runs(sweep_dir: str | None) -> list[sweep_plan.Run]:
  """The planned runs of ``sweep_dir``'s sweep.json; raises UsageError."""
  if not sweep_dir:
    raise UsageError('--sweep_dir is required')
  path = os.path.join(sweep_dir, sweep_plan.SWEEP_JSON)
  if not os.path.isfile(path):
    raise UsageError(f'{sweep_dir} has no {sweep_plan.SWEEP_JSON} (not a sweep folder)')
  try:
    with open(path) as f:
      entries = json.load(f)['runs']
    runs = [sweep_plan.Run(e['method'], int(e['prompt_index']), e['prompt'], int(e['seed']))
            for e in entries]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UsageError(f'{path} is not a sweep file ({type(e).__name__}: {e})') from None
  try:
    files.writable_root(sweep_dir)
  except OSError as e:
    raise UsageError(f'cannot write into {sweep_dir} ({e.strerror})') from None
  return runs


def run_videos(sweep_dir: str, run: sweep_plan.Run) -> tuple[list[str], str]:
  """(paths of the run's videos, '') or ([], why it has none usable)."""
  why = sweep_plan.run_problem(sweep_dir, run)
  if why:
    return [], f'incomplete ({why})'
  with open(os.path.join(sweep_dir, run.dir, 'result.json')) as f:
    names = json.load(f).get('videos') or []
  if not names:
    return [], 'no videos (result.json lists none; Wan runs need --wan_dir)'
  paths = [os.path.join(sweep_dir, run.dir, n) for n in names]
  absent = [n for n, p in zip(names, paths) if not os.path.isfile(p)]
  if absent:
    return [], f'video file(s) missing: {", ".join(absent)}'
  return paths, ''


def write_prefix(src: str, dst: str, frames: int | None) -> int:
  """Writes the first ``frames`` frames (None: all) of mp4 ``src`` to ``dst``, re-encoded at its
  frame rate; returns the frame count written (the cap clipped to the video's length)."""
  video, fps = video_io.read_mp4(src)                # [T, H, W, 3] uint8
  prefix = video[:frames] if frames else video
  video_io.write_mp4(dst, prefix, fps=int(round(fps)))
  return len(prefix)


def evaluate(sweep_dir: str, runs: list[sweep_plan.Run], dimensions: Sequence[str],
             drift_frames: int | None, scorer: Scorer) -> tuple[pd.DataFrame, list[str]]:
  """(vbench.csv's rows, 'dir: why' of each skipped run). Each dimension is one ``scorer`` call
  over every video of the sweep, the drift one more (imaging quality of the prefixes)."""
  scored, skipped = [], []
  for r in runs:
    paths, why = run_videos(sweep_dir, r)
    if why:
      skipped.append(f'{r.dir}: {why}')
    else:
      scored.append((r, paths))
  videos = [p for _, paths in scored for p in paths]
  owner = np.array([i for i, (_, paths) in enumerate(scored) for _ in paths])   # [videos]
  per_run = {}                                        # column -> [runs] run means
  for dim in dimensions:
    per_run[dim] = _run_means(scorer(videos, dim) if videos else [], owner, len(scored), dim)
  with tempfile.TemporaryDirectory(prefix='kvjax-drift-') as tmp:
    prefixes = [os.path.join(tmp, f'{i:06d}.mp4') for i in range(len(videos))]
    lengths = np.array([write_prefix(v, p, drift_frames) for v, p in zip(videos, prefixes)])
    scores = scorer(prefixes, 'imaging_quality') if videos else []
    per_run[DRIFT] = _run_means(scores, owner, len(scored), DRIFT)
  rows = []
  for i, (r, paths) in enumerate(scored):
    rows.append(dict(method=r.method, prompt_index=r.prompt_index, seed=r.seed, dir=r.dir,
                     videos=len(paths), **{c: float(v[i]) for c, v in per_run.items()},
                     drift_frames=int(lengths[owner == i].min())))
  return pd.DataFrame(rows, columns=[*KEYS, *dimensions, DRIFT, 'drift_frames']), skipped


def _run_means(scores: Sequence[float], owner: np.ndarray, n: int, what: str) -> np.ndarray:
  """Per-video ``scores`` [videos] -> the mean of each run's videos [n]."""
  scores = np.asarray(scores, np.float64)
  if scores.shape != owner.shape:
    raise ValueError(f'the scorer returned {scores.size} {what} scores for {owner.size} videos')
  return np.array([scores[owner == i].mean() for i in range(n)])


def write_csv(path: str, table: pd.DataFrame) -> None:
  """Writes ``table`` to ``path`` atomically."""
  with files.atomic_path(path) as tmp:
    table.to_csv(tmp, index=False)


def run(sweep_dir: str | None, dimensions: str = ','.join(DIMENSIONS),
        drift_frames: int | None = None, scorer: Scorer | None = None,
        device: str = 'cuda') -> int:
  """Scores ``sweep_dir`` into vbench.csv (module docstring); ``scorer`` None: VBench on
  ``device``. Returns the exit status."""
  try:
    runs = read_runs(sweep_dir)
    dims = parse_dimensions(dimensions)
    if drift_frames is not None and drift_frames < 1:
      raise UsageError(f'--drift_frames must be >= 1 (got {drift_frames}; leave it out for all '
                       'frames)')
    if scorer is None:
      scorer = VBenchScorer(device)
  except UsageError as e:
    return cli.error(e)
  table, skipped = evaluate(sweep_dir, runs, dims, drift_frames, scorer)
  for s in skipped:
    print(f'vbench_eval: skipped {s}', file=sys.stderr, flush=True)
  write_csv(os.path.join(sweep_dir, CSV), table)
  print(f'wrote {os.path.join(sweep_dir, CSV)}: {len(table)} of {len(runs)} planned runs scored, '
        f'{len(skipped)} skipped')
  return 0


def define_flags() -> None:
  """The flags, defined only when this runs as a program: launch.aggregate, which tests import
  beside this module, owns --sweep_dir in absl's global registry."""
  flags.DEFINE_string('sweep_dir', None, 'The sweep folder (sweep.json, runs/).')
  flags.DEFINE_string('dimensions', ','.join(DIMENSIONS), 'Comma list of VBench dimensions (of '
                      f'{", ".join(DIMENSIONS)}).')
  flags.DEFINE_integer('drift_frames', None, 'Frames of the drift prefix (default: all; the '
                       'study: 165 MovieGen = all, 150 StoryEval).')
  flags.DEFINE_string('device', 'cuda', 'torch device VBench runs on.')


def main(argv):
  if len(argv) > 1:
    return cli.error(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  return run(f.sweep_dir, f.dimensions, f.drift_frames, device=f.device)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
