"""``python -m ports.convert`` as a command: bad inputs and Ctrl-C.

Bad inputs (one table, run in-process through ``convert.main``): status 2 and exactly one stderr
line ``error: <file or flag>: <problem>`` that names the file or flag, no traceback, and nothing
written: no --dst, no ``.partial-*`` folder, not even the missing parent folder of --dst.

Ctrl-C (real ``python -m ports.convert`` processes, SIGINT): once while orbax's writer threads
store the arrays of a ~180 MB float32 DiT (sent when its data files appear in the staging folder,
a second SIGINT right after), once while the tensors are being converted (before any output):
status 130, the one line ``interrupted; nothing written``, no traceback, nothing left beside
--dst. The source is a sparse safetensors file (zeros), so it costs no time to make or read.
"""

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from kvjax import checkpoint as ckpt
from kvjax.model import WanConfig
from ports import convert
from ports import dit as dp
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INTERRUPTED = 'interrupted; nothing written'


def _original_shapes(cfg: WanConfig) -> dict:
  """Original Wan key -> shape of a DiT of ``cfg`` (zero-stride arrays: no memory)."""
  nested = {}
  for p, s in dp.flat_paths(nnx.to_pure_dict(ckpt.abstract_params(cfg))).items():
    dp._set(nested, p, np.broadcast_to(np.float32(0), s))
  return {k: v.shape for k, v in dp.params_to_original(nested).items()}


def _header(shapes: dict) -> tuple[bytes, int]:
  entries, offset = {}, 0
  for key, shape in shapes.items():
    n = int(np.prod(shape)) * 4
    entries[key] = dict(dtype='F32', shape=list(shape), data_offsets=[offset, offset + n])
    offset += n
  raw = json.dumps(entries).encode()
  raw += b' ' * (-len(raw) % 8)
  return struct.pack('<Q', len(raw)) + raw, offset


def _sparse_safetensors(path, shapes: dict) -> None:
  """A safetensors file of zeros whose data are a hole (no disk space, no time)."""
  head, size = _header(shapes)
  with open(path, 'wb') as f:
    f.write(head)
    f.truncate(len(head) + size)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """A tiny DiT as original Wan2.1 files (wan/: safetensors + config.json) and, with torch, as a
  Self-Forcing .pt (random values: a CRC check must see changed bytes)."""
  from safetensors.numpy import save_file

  from tests.wan_fixtures import dit_config_json
  root = tmp_path_factory.mktemp('cli_sources')
  cfg = tiny_config()
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in _original_shapes(cfg).items()}
  (root / 'wan').mkdir()
  save_file(sd, str(root / 'wan' / 'diffusion_pytorch_model.safetensors'))
  (root / 'wan' / 'config.json').write_text(json.dumps(dit_config_json(cfg)))
  out = dict(root=root, wan=root / 'wan', config=dit_config_json(cfg),
             st=(root / 'wan' / 'diffusion_pytorch_model.safetensors').read_bytes())
  try:
    import torch
  except ImportError:
    return out
  torch.save({'generator_ema': {f'model.{k}': torch.from_numpy(v) for k, v in sd.items()}},
             str(root / 'sf.pt'))
  out['pt'] = (root / 'sf.pt').read_bytes()
  return out


# ---------------------------------------------------------------------------- bad inputs
def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)
  return str(path)


def _pt(f, t, name, edit=None):
  """A copy of the Self-Forcing .pt, edited (bytes -> bytes)."""
  if 'pt' not in f:
    pytest.skip('needs torch')
  return _write(t / name, edit(f['pt']) if edit else f['pt'])


def _crc_damaged(data: bytes) -> bytes:
  data = bytearray(data)
  mid = len(data) // 2
  data[mid:mid + 64] = bytes(64)
  return bytes(data)


def _objects_pt(f, t):
  if 'pt' not in f:
    pytest.skip('needs torch')
  import torch
  torch.save({'generator_ema': {'x': torch.zeros(2)}, 'step': slice(1, 2)}, str(t / 'obj.pt'))
  return str(t / 'obj.pt')


def _wan_copy(f, t, config=None, index=None, st=None):
  """A copy of wan/, with its config.json / safetensors replaced, or its weights as one shard
  listed by ``index`` (str or bytes)."""
  d = t / 'wan'
  d.mkdir()
  _write(d / 'config.json', json.dumps(f['config']) if config is None else config)
  if index is None:
    _write(d / 'diffusion_pytorch_model.safetensors', f['st'] if st is None else st)
  else:
    _write(d / 'diffusion_pytorch_model-00001-of-00001.safetensors', f['st'])
    _write(d / 'diffusion_pytorch_model.safetensors.index.json', index)
  return str(d)


def _negative_shape_st():
  head = json.dumps({'w': dict(dtype='F32', shape=[-2, -1], data_offsets=[0, 8])}).encode()
  return struct.pack('<Q', len(head)) + head + bytes(8)


def _st_header_damaged(st: bytes) -> bytes:
  return st[:8] + b'\xff\xfe{]' + st[12:]


# id: (argv without --dst (or with it), a phrase of the message, the file or flag it must name)
BAD = {
    'src_flag_missing': (lambda f, t: [], '--src: required', '--src'),
    'src_not_found': (lambda f, t: ['--src', str(t / 'nope.pt')], 'no such file or folder',
                      'nope.pt'),
    'src_empty': (lambda f, t: ['--src='], 'empty path', '--src'),
    'src_not_a_file': (lambda f, t: ['--src', os.devnull], 'not a regular file or a folder',
                       os.devnull),
    'dst_empty': (lambda f, t: ['--src', str(f['wan']), '--dst='], 'empty path', '--dst'),
    'dst_not_empty': (lambda f, t: ['--src', str(f['wan']), '--dst',
                                    os.path.dirname(_write(t / 'full' / 'keep.txt', 'x'))],
                      'exists and is not an empty folder; refusing to overwrite', 'full'),
    'dst_under_a_file': (lambda f, t: ['--src', str(f['wan']), '--dst',
                                       os.path.join(_write(t / 'afile', 'x'), 'dst')],
                         'is not a folder', 'afile'),
    'unknown_model': (lambda f, t: ['--src', str(f['wan']), '--model=foo'],
                      "invalid choice: 'foo'", '--model'),
    'unknown_dtype': (lambda f, t: ['--src', str(f['wan']), '--dtype=fp8'],
                      "invalid choice: 'fp8'", '--dtype'),
    'num_heads_zero': (lambda f, t: ['--src', str(f['wan']), '--num_heads=0'],
                       'must be a positive integer', '--num_heads'),
    'unknown_flag': (lambda f, t: ['--src', str(f['wan']), '--heads=2'],
                     'unrecognized argument', '--heads=2'),
    'ema_and_no_ema': (lambda f, t: ['--src', str(f['wan']), '--ema', '--no_ema'],
                       'not allowed with argument --ema', '--no_ema'),
    'pt_truncated': (lambda f, t: ['--src', _pt(f, t, 'cut.pt', lambda b: b[:len(b) // 2])],
                     'truncated or corrupt', 'cut.pt'),
    'pt_crc': (lambda f, t: ['--src', _pt(f, t, 'bad.pt', _crc_damaged)],
               'corrupt PyTorch checkpoint (CRC error', 'bad.pt'),
    'pt_not_only_tensors': (lambda f, t: ['--src', _objects_pt(f, t)],
                            'holds objects other than tensors', 'obj.pt'),
    'not_a_checkpoint': (lambda f, t: ['--src', _write(t / 'notes.pt', 'a text file')],
                         'not a PyTorch checkpoint or a safetensors file', 'notes.pt'),
    'st_header_truncated': (lambda f, t: ['--src', _wan_copy(f, t, st=f['st'][:20])],
                            'not a safetensors file', 'diffusion_pytorch_model.safetensors'),
    'st_header_corrupt': (lambda f, t: ['--src', _wan_copy(f, t, st=_st_header_damaged(f['st']))],
                          'corrupt safetensors header', 'diffusion_pytorch_model.safetensors'),
    'st_negative_shape': (lambda f, t: ['--src', _write(t / 'neg.safetensors',
                                                        _negative_shape_st())],
                          'corrupt safetensors header entry', 'neg.safetensors'),
    'st_data_truncated': (lambda f, t: ['--src', _wan_copy(f, t, st=f['st'][:-100])],
                          'truncated: the header declares', 'diffusion_pytorch_model.safetensors'),
    'config_not_utf8': (lambda f, t: ['--src', _wan_copy(f, t, config=b'\xff\xfe{}')],
                        'not valid JSON', 'config.json'),
    'config_not_a_number': (lambda f, t: ['--src', _wan_copy(
        f, t, config=json.dumps(dict(f['config'], dim='wide')))],
                            "dim='wide' is not an integer", 'config.json'),
    'config_zero_heads': (lambda f, t: ['--src', _wan_copy(
        f, t, config=json.dumps(dict(f['config'], num_heads=0)))],
                          'num_heads=0 is not a positive integer', 'config.json'),
    'index_not_a_map': (lambda f, t: ['--src', _wan_copy(
        f, t, index=json.dumps(dict(weight_map=['a.safetensors'])))],
                        'not a valid safetensors index', 'index.json'),
    'index_shard_outside': (lambda f, t: ['--src', _wan_copy(
        f, t, index=json.dumps(dict(weight_map={'patch_embedding.weight': '../x.safetensors'})))],
                            'shard names must be file names in its folder', 'index.json'),
    'heads_unknown': (lambda f, t: ['--src', _pt(f, t, 'sf.pt')],
                      'cannot tell the number of attention heads', 'sf.pt'),
    'wrong_model': (lambda f, t: ['--src', str(f['wan']), '--model=vae'],
                    'is a Wan DiT, not a Wan VAE', 'diffusion_pytorch_model.safetensors'),
    'wan_dir_of_a_file': (lambda f, t: ['--src', _pt(f, t, 'sf.pt'), '--model=wan_dir'],
                          'not a folder; --model=wan_dir takes', 'sf.pt'),
    'wan_dir_not_wan': (lambda f, t: ['--src', str(f['wan']), '--model=wan_dir'],
                        'not a Wan2.1 folder', '--src'),
    'wan_dir_num_heads': (lambda f, t: ['--src', str(f['wan']), '--model=wan_dir',
                                        '--num_heads=2'],
                          'do not apply to --model=wan_dir', '--num_heads'),
}


def _leftovers(root) -> list[str]:
  return [os.path.join(d, n) for d, dirs, names in os.walk(root) for n in dirs + names
          if '.partial-' in n]


@pytest.mark.parametrize('case', list(BAD))
def test_bad_input_is_one_error_line(files, tmp_path, capsys, case):
  make, phrase, named = BAD[case]
  argv = make(files, tmp_path)
  dst = tmp_path / 'new' / 'dst'              # its parent does not exist either
  if not any(a == '--dst' or a.startswith('--dst=') for a in argv):
    argv += ['--dst', str(dst)]
  before = {p for p in os.listdir(tmp_path)}
  assert convert.main(argv) == 2
  out, err = capsys.readouterr()
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  assert phrase in lines[0] and named in lines[0], lines[0]
  assert 'Traceback' not in err and not out
  assert set(os.listdir(tmp_path)) == before  # no --dst, no parent of it, no .partial-*
  assert not _leftovers(tmp_path)
  if case == 'dst_not_empty':
    assert (tmp_path / 'full' / 'keep.txt').read_text() == 'x'


# ---------------------------------------------------------------------------- Ctrl-C
@pytest.fixture(scope='module')
def big(tmp_path_factory):
  """A ~180 MB float32 DiT (dim 1024, 2 layers): orbax takes a fraction of a second to write it."""
  path = tmp_path_factory.mktemp('cli_big') / 'dit.safetensors'
  cfg = WanConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=2, param_dtype='float32')
  _sparse_safetensors(path, _original_shapes(cfg))
  return path


def _start(src, dst):
  return subprocess.Popen(
      [sys.executable, '-m', 'ports.convert', f'--src={src}', f'--dst={dst}', '--num_heads=8',
       '--dtype=float32'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stages(folder) -> list[str]:
  return glob.glob(os.path.join(glob.escape(str(folder)), '.*.partial-*'))


def _orbax_storing(folder) -> bool:
  """Whether orbax's writer threads are storing array data in the staging folder: a file in a
  folder three levels below its out/ (out/params.orbax-checkpoint-tmp/ocdbt.process_0/d/)."""
  for stage in _stages(folder):
    for d, _, names in os.walk(stage):
      if names and os.path.relpath(d, stage).count(os.sep) >= 3:
        return True
  return False


def _assert_interrupted(p, err, folder):
  assert p.returncode == 130, err
  assert err.splitlines()[-1] == INTERRUPTED, err
  assert err.count('interrupted') == 1 and 'Traceback' not in err, err
  assert 'wrote dit params' not in err, err
  assert not folder.exists(), sorted(glob.glob(f'{folder}/**', recursive=True))[:10]


def test_interrupt_during_the_orbax_write_leaves_nothing(big, tmp_path):
  """SIGINT while orbax's threads write (and a second one right after): they finish, then the
  staging folder and the parent folder the conversion created are removed; status 130."""
  hits = 0
  for attempt in range(4):
    folder = tmp_path / f'try{attempt}'         # created by the conversion, removed with it
    p = _start(big, folder / 'ckpt')
    deadline = time.monotonic() + 120
    while not _orbax_storing(folder) and p.poll() is None and time.monotonic() < deadline:
      time.sleep(0.001)
    mid_write = False
    if p.poll() is None:
      p.send_signal(signal.SIGINT)
      # write_tree writes config.json after orbax's save: absent, the signal came mid-write.
      mid_write = not any(os.path.exists(os.path.join(s, 'out', 'config.json'))
                          for s in _stages(folder))
      time.sleep(0.02)
      if p.poll() is None:
        p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:                       # finished before the signal: try again
      assert (folder / 'ckpt' / 'params').is_dir(), err
      continue
    _assert_interrupted(p, err, folder)
    hits += mid_write
    if hits:
      break
  assert hits, 'no SIGINT arrived while orbax was writing'


def test_interrupt_while_converting_leaves_nothing(big, tmp_path):
  """SIGINT once the tensors are being converted (the first progress line), before any output."""
  folder = tmp_path / 'out'
  p = _start(big, folder / 'ckpt')
  head = []
  for line in p.stderr:
    head.append(line)
    if 'Wan DiT dim=1024' in line:
      break
  p.send_signal(signal.SIGINT)
  err = ''.join(head) + p.stderr.read()
  p.wait(timeout=120)
  p.stdout.close()
  p.stderr.close()
  _assert_interrupted(p, err, folder)
