r"""A sweep folder -> the study's method table, plots and a self-contained HTML report.

  python -m launch.aggregate --sweep_dir=runs/sweep
  python -m launch.aggregate --sweep_dir=runs/sweep --videos=bf16,rtn_int4,kivi_int2
  xdg-open runs/sweep/report.html        # or any browser: no server, no network

Reads the folder ``launch/sweep.py`` writes (``sweep.json`` and ``runs/<METHOD>/p<III>_s<SEED>/``
launcher result folders; docs/RESULTS.md has their fields) and writes into it, each file atomically:
``table.csv`` / ``table.md`` (one row per method: the study's 33 in table order, then the others
in sweep order), ``pareto.png``, ``memory_runtime.png``, ``drift.png``, ``frame_metrics.png``,
``drift_methods.png``, ``videos.mp4`` (chosen methods' videos side by side, when the runs wrote
videos) and ``report.html``. Nothing else is touched; rerunning rewrites them. When the folder has
``vbench.csv`` (``python -m launch.vbench_eval``, optional), the table gains the per-method means of
its VBench scores (an unreadable one is named on stderr and left out).

A planned run without a folder is missing; a folder whose result.json is absent, not JSON, lacks
a field of ``sweep_plan.RESULT_FIELDS``, names another method, seed or prompt, or has no
curves.csv rows, is corrupt (``sweep_plan.run_problem``, the sweep's own test): it is left
out, named on stderr and in the report (the sweep redoes such folders). Each method row states
its coverage (complete runs of the planned ones). Bad input (no sweep.json, not a sweep folder,
an unwritable folder, an unknown method in --videos) is one line "error: ..." and exit status 2
before any work.

Aggregation (``sweep_table.NOTES``): the study's way, means over runs (videos) of each run's
value; peak memory is the maximum over runs. The published numbers (launch/published.py) are
printed beside ours only when the sweep follows the study's protocol, otherwise listed apart.

Cost: seconds (34 methods x 2 prompts of the world model, 68 runs: 6 s on 2 CPU cores, most of
it matplotlib and importing jax for the method registry).
"""

from __future__ import annotations

import json
import os
import sys

import pandas as pd
from absl import app, flags

from kvjax import cli
from kvjax import files
from kvjax import cache as kvcache
from launch import plots, published, report
from launch import sweep_table as st
from launch.sweep_table import REFERENCE

flags.DEFINE_string('sweep_dir', None, 'The sweep folder (sweep.json, runs/).')
flags.DEFINE_string('videos', None, 'Comma list of methods (names or aliases) whose videos go side '
                    'by side in videos.mp4 and the report (default: BF16, best and worst SSIM).')
FLAGS = flags.FLAGS

MAX_LISTED = 20      # missing runs named in table.md (report.html names all)


class UsageError(Exception):
  """Bad input: reported as one ``error:`` line with exit status 2."""


def read_sweep(sweep_dir: str | None) -> dict:
  """sweep.json of ``sweep_dir``, checked to be a sweep; raises UsageError."""
  if not sweep_dir:
    raise UsageError('--sweep_dir is required')
  if not os.path.isdir(sweep_dir):
    raise UsageError(f'--sweep_dir {sweep_dir} is not a folder')
  path = os.path.join(sweep_dir, 'sweep.json')
  if not os.path.isfile(path):
    raise UsageError(f'{sweep_dir} has no sweep.json (not a sweep folder)')
  try:
    with open(path) as f:
      sweep = json.load(f)
  except (OSError, ValueError) as e:
    raise UsageError(f'{path} is not readable JSON ({e})') from None
  if not isinstance(sweep, dict) or not isinstance(sweep.get('config'), dict) \
     or not isinstance(sweep.get('runs'), list):
    raise UsageError(f'{path} is not a sweep file (needs "config" and "runs")')
  kinds = dict(method=str, prompt_index=int, prompt=str, seed=int, dir=str)
  for i, r in enumerate(sweep['runs']):
    if not isinstance(r, dict) or any(not isinstance(r.get(k), t) for k, t in kinds.items()):
      raise UsageError(f'{path}: runs[{i}] is not a run (needs {", ".join(kinds)})')
  try:
    files.writable_root(sweep_dir)
  except OSError as e:
    raise UsageError(f'cannot write into {sweep_dir} ({e.strerror})') from None
  return sweep


def sweep_methods(sweep: dict) -> list[str]:
  """The sweep's methods in table order: the study's (kvjax.cache.PAPER_NAMES), then the others
  in the sweep's order (sweep.json's canonical ``methods``, then those of its planned runs)."""
  seen = list(dict.fromkeys(list(sweep.get('methods') or []) +
                            [r['method'] for r in sweep['runs']]))
  order = {n: i for i, n in enumerate(kvcache.PAPER_NAMES)}
  return sorted(seen, key=lambda n: (n not in order, order.get(n, seen.index(n))))


def parse_videos(text: str | None, methods: list[str]) -> list[str] | None:
  """--videos -> canonical names (None: the default choice); raises UsageError."""
  if text is None:
    return None
  out = []
  for name in (x.strip() for x in text.split(',') if x.strip()):
    try:
      canon = kvcache.canonical(name)
    except ValueError:
      raise UsageError(f'--videos: unknown cache method {name!r} (see python -m kvjax.launch '
                       '--list_methods)') from None
    if canon not in methods:
      raise UsageError(f'--videos: {canon} is not a method of this sweep ({", ".join(methods)})')
    out.append(canon)
  if not out:
    raise UsageError('--videos is empty')
  return list(dict.fromkeys(out))


def published_frames(names: list[str], bench: str | None) -> list[tuple[str, pd.DataFrame]]:
  """(benchmark, its published rows of ``names``) for the sweep's benchmark, or for both when
  the prompts are neither; benchmarks without any of ``names`` left out."""
  out = []
  for b in [bench] if bench else list(published.BENCHMARKS):
    t = published.table(b)
    t = t.loc[[m for m in names if m in t.index]]
    if not t.empty:
      out.append((b, t))
  return out


def published_markdown(frames: list[tuple[str, object]]) -> list[str]:
  out = []
  for b, t in frames:
    out += ['', f'{b} (arXiv 2603.27469, launch/published.py):', '',
            '| method | ' + ' | '.join(t.columns) + ' |', '|---|' + '---:|' * len(t.columns)]
    out += ['| ' + ' | '.join([m] + [st.fmt(v, '.4f') for v in t.loc[m]]) + ' |' for m in t.index]
  return out


def summary(sweep: dict, sweep_dir: str) -> list[str]:
  """The sweep's settings, one line each."""
  c = sweep['config']
  keys = ('config', 'frames', 'window_frames', 'sink_frames', 'prompts_file', 'num_prompts',
          'seeds', 'seed_rule')
  items = [f'{k} {c[k]}' for k in keys if k in c]
  return [f'sweep {os.path.abspath(sweep_dir)}', '; '.join(items),
          f'fingerprint {sweep.get("fingerprint", "-")}']


def default_videos(table: pd.DataFrame) -> list[str]:
  """BF16, then the methods with the highest and the lowest SSIM (PSNR without SSIM)."""
  rest = table[table.method != REFERENCE]
  key = 'ssim' if rest.ssim.notna().any() else 'psnr'
  rest = rest[rest[key].notna()].sort_values(key, ascending=False)
  picked = [REFERENCE] + ([rest.method.iloc[0], rest.method.iloc[-1]] if len(rest) else [])
  return list(dict.fromkeys(m for m in picked if m in set(table.method)))


def run(sweep_dir: str | None, videos: str | None) -> int:
  """Aggregates ``sweep_dir`` (module docstring); returns the exit status."""
  try:
    sweep = read_sweep(sweep_dir)
    methods = sweep_methods(sweep)
    chosen = parse_videos(videos, methods)
  except UsageError as e:
    return cli.error(e)
  runs = [st.load_run(sweep_dir, e) for e in sweep['runs']]
  for r in runs:
    if r.status == 'corrupt':
      print(f'aggregate: corrupt run {r.dir}: {r.problem} (left out; the sweep redoes it)',
            file=sys.stderr, flush=True)
  missing = [r for r in runs if r.status == 'missing']
  if missing:
    print(f'aggregate: {len(missing)} of {len(runs)} planned runs missing', file=sys.stderr)
  diffs = published.protocol_differences(
      sweep['config'], [(dict(method=r.method, prompt_index=r.prompt_index, seed=r.seed), r.result)
                        for r in runs])
  bench = published.benchmark(sweep['config'].get('prompts_file'))
  paper = published.table(bench) if not diffs and bench else None
  vbench, problem = st.load_vbench(sweep_dir)
  if problem:
    print(f'aggregate: {problem} (left out; rerun launch.vbench_eval)', file=sys.stderr, flush=True)
  table = st.build_table(methods, runs, paper, vbench)
  files.write_text(os.path.join(sweep_dir, 'table.csv'), table.to_csv(index=False, na_rep=''))

  if diffs:
    protocol = ('The protocol differs from the study\'s (1.3B weights, 480x832, 42 latent frames, '
                'window 21, first 10 MovieGen/StoryEval prompts, seed = prompt index) in: ' +
                '; '.join(diffs) + '. The published numbers are listed apart, for reference only.')
  else:
    protocol = (f'The sweep follows the study\'s protocol ({bench}): the paper_* columns are the '
                'published numbers (launch/published.py). Our fidelity is scored on the decoded '
                'frames with PSNR capped per frame, the study\'s on re-decoded H.264 mp4s, '
                'uncapped (see the notes).')
  corrupt = [f'{r.dir}: {r.problem}' for r in runs if r.status == 'corrupt']
  lines = ['# Sweep results', '', *[f'- {x}' for x in summary(sweep, sweep_dir)], '',
           *st.markdown_table(table), '', '## Protocol', '', protocol, '', '## Coverage', '',
           f'{len(runs) - len(missing) - len(corrupt)} of {len(runs)} planned runs complete, '
           f'{len(missing)} missing, {len(corrupt)} corrupt.', *[f'- corrupt {x}' for x in corrupt],
           *[f'- missing {r.dir}' for r in missing[:MAX_LISTED]],
           *([f'- ... and {len(missing) - MAX_LISTED} more missing'] if len(missing) > MAX_LISTED
             else []),
           '', '## Notes', '', *[f'- {x}' for x in st.NOTES]]
  if diffs:
    lines += ['', '## Published numbers (reference only: the protocol differs)',
              *published_markdown(published_frames(methods, bench))]
  files.write_text(os.path.join(sweep_dir, 'table.md'), '\n'.join(lines) + '\n')

  curves = st.method_curves(runs)
  on_cpu = table.peak_memory_gib.isna().all()
  images = plots.write_all(sweep_dir, table, curves, runs, on_cpu, st.block_frames(runs))
  chosen = chosen or default_videos(table)
  grid = report.write_video_grid(sweep_dir, runs, chosen)
  page = report.render(
      title=f'Sweep {os.path.basename(os.path.abspath(sweep_dir))}',
      summary=summary(sweep, sweep_dir), table=table, columns=st.COLUMNS, protocol=protocol,
      matches=not diffs, published=published_frames(methods, bench) if diffs else [],
      images=images, grid=grid, missing=[r.dir for r in missing], corrupt=corrupt,
      notes=st.NOTES)
  files.write_text(os.path.join(sweep_dir, 'report.html'), page)
  print(f'wrote {sweep_dir}/: table.csv, table.md, {", ".join(images)}'
        f'{", " + grid["file"] if grid else ""}, report.html')
  return 0


def main(argv):
  if len(argv) > 1:
    return cli.error(f'unexpected arguments: {" ".join(argv[1:])}')
  return run(FLAGS.sweep_dir, FLAGS.videos)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
