"""Atomic file writes: a file appears complete or not at all (a reader, a killed writer).

``writable_root`` probes that folders can be created where output will go; ``atomic_path`` yields a temporary name beside the target; when the block succeeds the file gets
the user's umask (``mkstemp`` creates it 0600) and is renamed over the target, on any error or
interrupt it is removed. ``umask()`` reads the process umask without changing it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


def umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path in ``path``'s folder (created if needed; same suffix, so writers
  that go by the extension work); renamed to ``path`` when the block ends without error."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  name = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix=os.path.splitext(name)[1], dir=folder)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def writable_root(path: str) -> str:
  """The nearest existing folder at or above ``path`` after checking that folders can be
  created in it (a real probe: permission bits say nothing for root or read-only mounts).
  Raises OSError (its ``strerror`` says why); NotADirectoryError when that ancestor is a file."""
  root = os.path.abspath(path)
  while not os.path.exists(root):
    root = os.path.dirname(root)
  if not os.path.isdir(root):
    raise NotADirectoryError(20, 'not a folder', root)
  os.rmdir(tempfile.mkdtemp(prefix='.kvjax-probe-', dir=root))
  return root


def write_text(path: str, text: str) -> None:
  """``text`` written to ``path`` atomically."""
  with atomic_path(path) as tmp, open(tmp, 'w') as f:
    f.write(text)


def write_json(path: str, obj: Any) -> None:
  """``obj`` as indented JSON at ``path``, atomically (non-JSON values through ``str``)."""
  write_text(path, json.dumps(obj, indent=2, default=str))
