"""Video output: decoded frames in [-1, 1] -> uint8 RGB -> mp4 (H.264, 16 fps).

Uses imageio-ffmpeg, whose wheel ships its own ffmpeg binary (no system ffmpeg needed).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

FPS = 16


def to_uint8(video) -> np.ndarray:
  """[..., H, W, 3] float in [-1, 1] -> uint8 (x * 0.5 + 0.5, clipped, rounded)."""
  v = np.asarray(video, np.float32)
  return np.clip(np.round((v * 0.5 + 0.5) * 255.0), 0, 255).astype(np.uint8)


def write_mp4(path: str, frames, fps: int = FPS) -> str:
  """Writes frames [T, H, W, 3] (uint8, or float in [-1, 1]) as an H.264 mp4; returns path.

  H and W must be even (yuv420p); Wan's 480x832 and the tiny configs' 64x64 are.
  """
  import imageio_ffmpeg
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    frames = to_uint8(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f'frames must be [T, H, W, 3], got {frames.shape}')
  t, h, w, _ = frames.shape
  if t == 0:
    raise ValueError('no frames to write')
  if h % 2 or w % 2:
    raise ValueError(f'mp4 (yuv420p) needs an even frame size, got {h}x{w}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = imageio_ffmpeg.write_frames(path, (w, h), fps=fps, codec='libx264', quality=8,
                                       macro_block_size=1, pix_fmt_out='yuv420p')
  writer.send(None)                                  # start the generator
  try:
    for f in frames:
      writer.send(np.ascontiguousarray(f))
  finally:
    writer.close()
  return path


def read_mp4(path: str) -> tuple[np.ndarray, float]:
  """Reads an mp4 back: (frames [T, H, W, 3] uint8, fps) (for tests and inspection)."""
  import imageio_ffmpeg
  gen = imageio_ffmpeg.read_frames(path)
  meta = next(gen)
  w, h = meta['size']
  frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen]
  return np.stack(frames), float(meta['fps'])


def write_strip(path: str, rows, scale: int = 4, gap: int = 2) -> str:
  """Writes a PNG with one row per video [T, H, W, 3] uint8, its frames left to right, each pixel
  drawn as ``scale`` x ``scale`` and ``gap`` white pixels between frames and rows; returns path."""
  rows = [np.asarray(r) for r in rows]
  if not rows or any(r.ndim != 4 or r.dtype != np.uint8 or r.shape != rows[0].shape for r in rows):
    raise ValueError('rows must be equal [T, H, W, 3] uint8 videos')
  t, h, w, _ = rows[0].shape
  hs, ws = h * scale, w * scale
  out = np.full((len(rows) * (hs + gap) - gap, t * (ws + gap) - gap, 3), 255, np.uint8)
  for i, r in enumerate(rows):
    big = r.repeat(scale, axis=1).repeat(scale, axis=2)
    for j in range(t):
      out[i * (hs + gap):i * (hs + gap) + hs, j * (ws + gap):j * (ws + gap) + ws] = big[j]
  tmp = path + '.tmp.png'
  Image.fromarray(out).save(tmp)
  os.replace(tmp, path)
  return path


def write_videos(folder: str, video, fps: int = FPS) -> list[str]:
  """video [B, T, H, W, 3] -> folder/video.mp4 (B = 1) or video_{i}.mp4; returns the names."""
  video = np.asarray(video)
  names = ['video.mp4'] if video.shape[0] == 1 else [f'video_{i}.mp4' for i in range(video.shape[0])]
  for name, v in zip(names, video):
    write_mp4(os.path.join(folder, name), v, fps)
  return names
