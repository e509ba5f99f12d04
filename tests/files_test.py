"""kvjax.files: a file appears complete with the user's umask, or not at all."""

from __future__ import annotations

import json
import os
import stat

import pytest

from kvjax import files


def test_written_with_the_umask_and_no_leftovers(tmp_path):
  old = os.umask(0o022)
  try:
    files.write_json(str(tmp_path / 'sub' / 'a.json'), {'x': (1, 2)})
  finally:
    os.umask(old)
  path = tmp_path / 'sub' / 'a.json'
  assert json.loads(path.read_text()) == {'x': [1, 2]}
  assert stat.S_IMODE(path.stat().st_mode) == 0o644      # not mkstemp's 0600
  assert os.listdir(tmp_path / 'sub') == ['a.json']


def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / 'table.csv'
  path.write_text('old')
  with pytest.raises(RuntimeError):
    with files.atomic_path(str(path)) as tmp:
      assert tmp.endswith('.csv') and os.path.dirname(tmp) == str(tmp_path)
      with open(tmp, 'w') as f:
        f.write('half')
      raise RuntimeError('killed')
  assert path.read_text() == 'old' and os.listdir(tmp_path) == ['table.csv']
