"""The sweep's HTML report and its side-by-side video grid.

``render`` returns one self-contained page (inline CSS and JS, no network, no server): the method
table, sortable by clicking a header; the protocol note; the plots (img tags to the PNGs beside
it); the chosen methods' videos side by side with BF16's; the missing and corrupt runs; the notes.
Videos and images are referenced by paths relative to the sweep folder, where the page lives.
``write_video_grid`` tiles the chosen methods' videos into one labelled mp4 (kvjax.video's reader
and writer). Used by launch/aggregate.py.
"""

from __future__ import annotations

import html
import math
import os

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from kvjax import files
from kvjax import video as video_io
from launch import plots
from launch.sweep_table import fmt

GRID_FILE = 'videos.mp4'
MAX_ROWS = 4            # prompts/seeds in the grid
TILE = 256              # target tile width (px): small frames are enlarged, large ones reduced
HEADER, ROW_LABEL = 24, 48

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; white-space: nowrap; }
th { background: #eee; cursor: pointer; position: sticky; top: 0; }
th.asc::after { content: ' \\25B2'; } th.desc::after { content: ' \\25BC'; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
.dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 4px; }
.wrap { overflow-x: auto; max-height: 80vh; }
figure { margin: 12px 0; } img.plot { max-width: 100%; border: 1px solid #ddd; }
video.px { image-rendering: pixelated; image-rendering: crisp-edges; background: #000; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 6px 10px; }
.ok { background: #e9f7ea; border-left-color: #2e9d3a; }
summary { cursor: pointer; margin: 16px 0 8px; font-weight: 600; }
"""

JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, i) {
    th.addEventListener('click', function () {
      var asc = !th.classList.contains('asc');
      table.querySelectorAll('th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
      th.classList.add(asc ? 'asc' : 'desc');
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var key = function (row) {
        var cell = row.cells[i], v = cell.getAttribute('data-v');
        if (v === null) { return cell.textContent; }
        return v === '' ? null : parseFloat(v);
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === y) { return 0; }
        if (x === null) { return 1; }
        if (y === null) { return -1; }
        if (typeof x === 'number') { return asc ? (x < y ? -1 : 1) : (x < y ? 1 : -1); }
        return asc ? x.localeCompare(y) : y.localeCompare(x);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def table_html(table: pd.DataFrame, columns, sortable: bool = True) -> str:
  """``table`` as an HTML table; numeric cells carry their value in data-v for sorting."""
  spec = {c: (h, f) for c, h, f in columns}
  cols = [c for c in table.columns if c in spec]
  head = '<th>#</th>' + ''.join(f'<th>{html.escape(spec[c][0])}</th>' for c in cols)
  body = []
  for i, (_, row) in enumerate(table.iterrows()):
    cells = [f'<td class="n" data-v="{i}">{i + 1}</td>']
    for c in cols:
      v, f = row[c], spec[c][1]
      if not f:
        dot = (f'<span class="dot" style="background:{plots.FAMILY_COLORS.get(v, "#7f7f7f")}">'
               '</span>' if c == 'family' else '')
        cells.append(f'<td>{dot}{html.escape(str(v))}</td>')
      else:
        raw = '' if pd.isna(v) else repr(float(v)).replace('inf', 'Infinity')
        cells.append(f'<td class="n" data-v="{raw}">{html.escape(fmt(v, f))}</td>')
    body.append('<tr>' + ''.join(cells) + '</tr>')
  cls = ' class="sortable"' if sortable else ''
  return (f'<div class="wrap"><table{cls}><thead><tr>{head}</tr></thead><tbody>\n' +
          '\n'.join(body) + '\n</tbody></table></div>')


def _video(src: str, width: int, pixelated: bool) -> str:
  cls = ' class="px"' if pixelated else ''
  return (f'<video{cls} src="{html.escape(src)}" width="{width}" controls loop muted autoplay '
          'playsinline></video>')


def videos_html(grid: dict | None) -> str:
  """The grid mp4, then each cell's own video (the run's video.mp4) in a table."""
  if not grid:
    return '<p>No videos: the runs wrote none (Wan runs need --wan_dir) or none was chosen.</p>'
  out = [f'<p>{html.escape(GRID_FILE)}: columns {html.escape(", ".join(grid["methods"]))}; rows '
         'are the prompts below (each run\'s own mp4 follows).</p>',
         _video(GRID_FILE, grid['width'], grid['pixelated']),
         '<table><thead><tr><th>prompt</th>' +
         ''.join(f'<th>{html.escape(m)}</th>' for m in grid['methods']) + '</tr></thead><tbody>']
  size = 128 if grid['pixelated'] else 256
  for key, prompt in grid['rows']:
    cells = [f'<td>p{key[0]:03d} s{key[1]}<br>{html.escape(prompt)}</td>']
    for m in grid['methods']:
      src = grid['cells'].get((m, key))
      cells.append(f'<td>{_video(src, size, grid["pixelated"]) if src else "-"}</td>')
    out.append('<tr>' + ''.join(cells) + '</tr>')
  return '\n'.join(out + ['</tbody></table>'])


def render(*, title: str, summary: list[str], table: pd.DataFrame, columns, protocol: str,
           matches: bool, published: list[tuple[str, pd.DataFrame]], images: list[str],
           grid: dict | None, missing: list[str], corrupt: list[str], notes) -> str:
  """The report page (module docstring)."""
  e = html.escape
  parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}'
           f'</title>\n<style>{CSS}</style></head><body>', f'<h1>{e(title)}</h1>',
           '<ul>' + ''.join(f'<li>{e(s)}</li>' for s in summary) + '</ul>',
           f'<p class="note{" ok" if matches else ""}">{e(protocol)}</p>',
           '<h2>Methods</h2><p>Click a header to sort (# restores the study\'s order).</p>',
           table_html(table, columns), '<h2>Missing and corrupt runs</h2>',
           f'<p>{len(missing)} missing, {len(corrupt)} corrupt (left out of every number).</p>']
  if missing or corrupt:
    parts.append('<ul>' + ''.join(f'<li>missing {e(m)}</li>' for m in missing) +
                 ''.join(f'<li>corrupt {e(c)}</li>' for c in corrupt) + '</ul>')
  parts.append('<h2>Plots</h2>')
  parts += [f'<figure><img class="plot" src="{e(f)}" alt="{e(f)}"><figcaption>{e(f)}'
            '</figcaption></figure>' for f in images]
  parts += ['<h2>Videos, side by side</h2>', videos_html(grid)]
  for bench, frame in published:
    cols = [(c, c, '.4f') for c in frame.columns]
    parts += [f'<details><summary>Published numbers: {e(bench)} (arXiv 2603.27469; for reference '
              'only, the protocol differs)</summary>',
              table_html(frame.reset_index(names='method'), [('method', 'method', '')] + cols),
              '</details>']
  parts += ['<h2>How the numbers are made</h2>',
            '<ul>' + ''.join(f'<li>{e(n)}</li>' for n in notes) + '</ul>',
            f'<script>{JS}</script></body></html>']
  return '\n'.join(parts) + '\n'


def _label(text: str, size: tuple[int, int]) -> np.ndarray:
  """A white [h, w, 3] uint8 strip with ``text`` in black, wrapped at '_' to fit."""
  img = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(img)
  font = ImageFont.load_default()
  lines, line = [], ''
  for word in text.replace('_', '_\0').split('\0'):
    if line and draw.textlength(line + word, font=font) > size[0] - 4:
      lines.append(line)
      line = ''
    line += word
  for i, ln in enumerate(lines + [line]):
    draw.text((2, 1 + 11 * i), ln, fill='black', font=font)
  return np.asarray(img)


def _tile(frames: np.ndarray) -> np.ndarray:
  """[T, H, W, 3] -> enlarged by pixel repetition to about ``TILE`` px wide, or reduced to at
  most that (even sizes)."""
  t, h, w, _ = frames.shape
  if w <= TILE:
    k = max(1, TILE // w)
    return frames.repeat(k, axis=1).repeat(k, axis=2)
  f = math.ceil(w / TILE)
  size = (w // f // 2 * 2, h // f // 2 * 2)
  return np.stack([np.asarray(Image.fromarray(x).resize(size, Image.BILINEAR)) for x in frames])


def write_video_grid(sweep_dir: str, runs: list, methods: list[str]) -> dict | None:
  """``GRID_FILE``: one column per method of ``methods`` with a video, one row per prompt/seed
  (the first ``MAX_ROWS`` any of them has), method names above, 'p<III> s<SEED>' beside;
  a cell without a video is black. Returns what ``videos_html`` shows, None without videos."""
  cells, prompts = {}, {}
  for r in runs:
    names = (r.result or {}).get('videos') or []
    if r.status == 'ok' and r.method in methods and names:
      path = os.path.join(r.dir, names[0])
      if os.path.isfile(os.path.join(sweep_dir, path)):
        cells[(r.method, (r.prompt_index, r.seed))] = path
        prompts[(r.prompt_index, r.seed)] = r.prompt
  cols = [m for m in methods if any(k[0] == m for k in cells)]
  rows = sorted(prompts)[:MAX_ROWS]
  if not cols:
    return None
  tiles, widths = {}, []
  for key, path in cells.items():
    if key[1] in rows:
      frames = video_io.read_mp4(os.path.join(sweep_dir, path))[0]
      widths.append(frames.shape[2])
      tiles[key] = _tile(frames)
  t = min(v.shape[0] for v in tiles.values())
  th, tw = next(iter(tiles.values())).shape[1:3]
  grid = np.full((t, HEADER + len(rows) * th, ROW_LABEL + len(cols) * tw, 3), 255, np.uint8)
  for j, m in enumerate(cols):
    grid[:, :HEADER, ROW_LABEL + j * tw:ROW_LABEL + (j + 1) * tw] = _label(m, (tw, HEADER))
    for i, key in enumerate(rows):
      tile = tiles.get((m, key))
      y, x = HEADER + i * th, ROW_LABEL + j * tw
      grid[:, y:y + th, x:x + tw] = tile[:t] if tile is not None else 0
  for i, key in enumerate(rows):
    grid[:, HEADER + i * th:HEADER + (i + 1) * th, :ROW_LABEL] = _label(
        f'p{key[0]:03d} s{key[1]}', (ROW_LABEL, th))
  with files.atomic_path(os.path.join(sweep_dir, GRID_FILE)) as tmp:
    video_io.write_mp4(tmp, grid)
  return dict(file=GRID_FILE, methods=cols, rows=[(k, prompts[k]) for k in rows],
              cells={k: p for k, p in cells.items() if k[1] in rows}, width=grid.shape[2],
              pixelated=max(widths) < TILE)
