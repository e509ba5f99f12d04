"""Convert PyTorch checkpoints to kvjax checkpoints (config.json + orbax params/).

  python -m ports.convert --src=self_forcing_dmd.pt --dst=ckpt/sf_1.3b            # DiT (EMA)
  python -m ports.convert --src=Wan2.1-T2V-1.3B --dst=ckpt/wan_dit --dtype=float32  # Wan DiT
  python -m ports.convert --src=Wan2.1-T2V-1.3B-Diffusers/transformer --dst=ckpt/dit
  python -m ports.convert --src=Wan2.1-T2V-1.3B --dst=ckpt/wan --model=wan_dir     # umT5+VAE+tokenizer
  python -m ports.convert --src=Wan2.1-T2V-1.3B/Wan2.1_VAE.pth --dst=ckpt/vae

Sources: a Self-Forcing ``.pt`` (``generator_ema`` / ``generator``, keys prefixed ``model.``);
original Wan2.1 files (``diffusion_pytorch_model*.safetensors`` single or sharded with an index,
``models_t5_umt5-xxl-enc-bf16.pth``, ``Wan2.1_VAE.pth``); diffusers/transformers folders
(``transformer/``, ``vae/``, ``text_encoder/``). The model is recognised from its keys
(``--model`` insists on one). Output is written into a hidden ``.<dst>.partial-*`` folder beside
``--dst`` and renamed at the end.

Exit status: 0 converted; 2 a bad flag or input, told in one line ``error: <file or flag>:
<problem>`` on stderr before any work, nothing written; 1 a failure while writing (e.g. a full
disk; nothing left); 130 Ctrl-C at any point, one line ``interrupted; nothing written``, the
partial output removed. A Ctrl-C during the write of the parameters takes effect when orbax's
writer threads are done (they cannot be stopped midway); further Ctrl-Cs are ignored while the
partial output is removed.
"""

from __future__ import annotations

import os
import signal
import sys

if __name__ == '__main__':
  # Ctrl-C while the modules load (nothing is staged yet): the same quiet exit as later (cli).
  signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write('interrupted; nothing written\n'),
                                           sys.stderr.flush(), os._exit(130)))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from kvjax import interrupts  # noqa: E402  (standard library only)
from ports import dit as dit_port  # noqa: E402
from ports import sources  # noqa: E402
from ports import umt5 as umt5_port  # noqa: E402
from ports import vae as vae_port  # noqa: E402
from ports.sources import PortError  # noqa: E402

MODELS = ('auto', 'dit', 'umt5', 'vae', 'wan_dir')
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, interrupts.EXIT_INTERRUPTED
# Bad flags and inputs (PortError is a ValueError); OSErrors such as a --src without read
# permission are inputs too, other OSErrors (a full disk) are failures (EXIT_FAILED).
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, PermissionError)
DEFAULT_DTYPE = dict(dit='bfloat16', umt5='bfloat16', vae='float32')
DESCRIBE = dict(dit='a Wan DiT', umt5='a umT5 text encoder', vae='a Wan VAE')


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


class _Notes:
  """Progress notes held back until the inputs have passed every check (``release``, called when
  the first converted leaf is done), so a bad input prints its one ``error:`` line alone."""

  def __init__(self):
    self.held = []

  def __call__(self, msg: str) -> None:
    if self.held is None:
      _log(msg)
    else:
      self.held.append(msg)

  def release(self) -> None:
    for msg in self.held or ():
      _log(msg)
    self.held = None


# ---------------------------------------------------------------------------- recognising sources
def identify(source: sources.TensorSource) -> str | None:
  keys = source.keys()
  if dit_port.flavor(keys):
    return 'dit'
  if umt5_port.flavor(keys):
    return 'umt5'
  if vae_port.flavor(keys):
    return 'vae'
  return None


def _is_dit_config(path: str) -> bool:
  cfg = sources.read_json(path)
  return (cfg.get('_class_name') in ('WanModel', 'WanTransformer3DModel')
          or dit_port.heads_from_config(cfg, path) is not None)


def open_source(src: str, ema: bool | None, log=_log) -> tuple[sources.TensorSource, str | None]:
  """The tensors of ``src`` (a file or a model folder) and the config.json that describes them."""
  if os.path.isfile(src):
    source = sources.open_file(src, ema=ema, log=log)
    side = dit_port.side_config_path(src)
    if side is not None and not (identify(source) == 'dit' and _is_dit_config(side)):
      side = None                               # a config.json of something else in that folder
    return source, side
  if not os.path.isdir(src):
    if os.path.exists(src):
      raise PortError(f'{src}: not a regular file or a folder')
    raise PortError(f'{src}: no such file or folder')
  if ema is not None:
    raise PortError(f'{src}: --ema/--no_ema apply to Self-Forcing .pt files, not to a folder')
  cfg_path = os.path.join(src, 'config.json')
  cfg = sources.read_json(cfg_path) if os.path.isfile(cfg_path) else {}
  if os.path.isfile(os.path.join(src, 'model_index.json')):
    raise PortError(f'{src}: a diffusers pipeline folder; pass one model folder '
                    '(--src=.../transformer, .../vae, .../text_encoder) or --model=wan_dir')
  if cfg.get('model_type') == 'umt5' or 'UMT5EncoderModel' in (cfg.get('architectures') or []):
    names = ('model', 'pytorch_model')
  else:
    names = ('diffusion_pytorch_model',)
  try:
    source = sources.open_checkpoint(src, names)
  except PortError:
    wan_files = [f for f in ('Wan2.1_VAE.pth', 'models_t5_umt5-xxl-enc-bf16.pth')
                 if os.path.isfile(os.path.join(src, f))]
    if wan_files:
      raise PortError(f'{src}: a Wan2.1 folder without the DiT weights '
                      '(diffusion_pytorch_model*.safetensors); for the text encoder and VAE use '
                      f'--model=wan_dir, or pass a file ({", ".join(wan_files)})') from None
    raise
  return source, cfg_path if cfg else None


def to_host_array(a):
  """A converted leaf as a jax array on the CPU (orbax then saves it without another copy)."""
  import jax
  out = jax.device_put(a, jax.devices('cpu')[0])
  out.block_until_ready()
  return out


def convert_model(kind: str, source, side: str | None, dtype: str | None, args,
                  log=_log) -> tuple[dict, dict]:
  """Converts one model; returns (config.json meta, nested params as host jax arrays).

  Leaves are converted one at a time and moved into jax arrays as they are done, so memory holds
  the converted weights plus one leaf in flight (and the memory-mapped source pages). Every check
  of the metadata comes before the first leaf; ``log.release()``, if ``log`` has one, is called
  when that leaf is done.
  """
  from kvjax import checkpoint as ckpt
  from kvjax import text, vae
  dtype = dtype or DEFAULT_DTYPE[kind]

  def finalize(a):
    getattr(log, 'release', lambda: None)()
    return to_host_array(a)

  fin = dict(finalize=finalize, log=log)
  provenance = dict(source=os.path.abspath(source.path), converted=time.strftime('%Y-%m-%d %H:%M:%S'))
  if kind == 'dit':
    cfg, params = dit_port.convert(source, num_heads=args.num_heads, side_config=side, dtype=dtype,
                                   allow_any_size=args.allow_any_size, **fin)
    return dict(format=ckpt.FORMAT, model=cfg.to_dict(), **provenance), params
  if args.num_heads is not None or args.allow_any_size:
    raise PortError('--num_heads/--allow_any_size apply to DiT checkpoints only')
  if kind == 'umt5':
    cfg, params = umt5_port.convert(source, side_config=side, dtype=dtype, **fin)
    return dict(format=text.FORMAT, model=cfg.to_dict(), **provenance), params
  cfg, params = vae_port.convert(source, side_config=side, dtype=dtype, **fin)
  return dict(format=vae.FORMAT, model=cfg.to_dict(), **provenance), params


def _check_dst(dst: str) -> None:
  """--dst must not exist (or be an empty folder), and its nearest existing ancestor must be a
  folder we can create files in: checked before any work, so nothing is converted in vain."""
  if not os.path.lexists(dst):
    pass
  elif not os.path.isdir(dst) or os.path.islink(dst) or os.listdir(dst):
    raise PortError(f'--dst {dst}: exists and is not an empty folder; refusing to overwrite')
  parent = os.path.dirname(dst)
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise PortError(f'--dst {dst}: {parent} is not a folder')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PortError(f'--dst {dst}: cannot create files in {parent} (permission denied)')


class _Interrupts:
  """Ctrl-C (SIGINT) on the command line: removes what was staged, prints ``interrupted; nothing
  written`` and exits 130 at once (``os._exit``), never by raising KeyboardInterrupt (which
  lands in whatever runs at that moment: a gc callback swallows it, an import cut short makes
  Python's own exit re-raise SIGINT).

  ``install`` (command line only) routes SIGINT through ``signal.set_wakeup_fd`` to a watcher
  thread, which acts even while the main thread is inside C code (torch.load, a large copy).
  Every write to disk runs inside ``held()``: a Ctrl-C there is acted on when the block ends,
  because orbax writes with background threads that would go on writing into (and re-creating)
  the staging folder while it was being removed. Outside ``held()`` the main thread only reads
  and converts in memory, so the watcher removes the staging folder and exits itself; a main
  thread that reaches ``held()`` meanwhile waits for that exit. Further Ctrl-Cs are ignored (the
  clean-up is not cut short), as is one that comes after the output was renamed into place
  (``committed``: the conversion is complete and finishes normally). Never installed (``main``
  called as a function), it is bookkeeping only and Ctrl-C is Python's KeyboardInterrupt.
  """

  def __init__(self):
    self.lock = threading.Lock()
    self.hold = 0
    self.requested = self.exiting = self.committed = False
    self.staging: _Staging | None = None

  def install(self) -> None:
    interrupts.watch(self._on_sigint, 'ports-convert-interrupts')

  def _on_sigint(self) -> None:
    with self.lock:
      if self.requested or self.committed:
        return
      self.requested = True
      if self.hold:
        return                                      # the main thread finishes the block first
      self.exiting = True
    self.finish()

  @contextlib.contextmanager
  def held(self):
    with self.lock:
      exiting = self.exiting
      self.hold += not exiting
    if exiting:
      threading.Event().wait()                      # the watcher is cleaning up and exiting
    try:
      yield
    finally:
      with self.lock:
        self.hold -= 1
        finish = self.requested and not self.hold and not self.committed
      if finish:
        self.finish()

  def finish(self) -> None:
    if self.staging is not None:
      self.staging.discard()
    interrupts.exit_interrupted()


class _Staging:
  """The hidden ``.<dst>.partial-*`` folder beside --dst, created on first use (after every input
  check and the conversion of the first model) and renamed to --dst by ``commit``. ``discard``
  removes it with whatever orbax put inside, and the parent folders of --dst it created."""

  def __init__(self, dst: str, interrupts: _Interrupts):
    self.dst, self.interrupts = dst, interrupts
    self.path = None
    self.made = []                       # parent folders created here, outermost first
    self.empty_dst = os.path.isdir(dst)
    interrupts.staging = self

  def out(self) -> str:
    """The folder that becomes --dst (not created); creates the staging folder on first use."""
    if self.path is None:
      with self.interrupts.held():
        parent, missing = os.path.dirname(self.dst), []
        while not os.path.isdir(parent):
          missing.append(parent)
          parent = os.path.dirname(parent)
        for folder in reversed(missing):
          os.mkdir(folder)
          self.made.append(folder)
        self.path = tempfile.mkdtemp(prefix=f'.{os.path.basename(self.dst)}.partial-',
                                     dir=os.path.dirname(self.dst))
    return os.path.join(self.path, 'out')

  def commit(self) -> None:
    with self.interrupts.held():
      out = self.out()
      if self.empty_dst:
        os.rmdir(self.dst)                   # empty (checked before any work)
      try:
        os.rename(out, self.dst)
      except BaseException:
        if self.empty_dst and not os.path.lexists(self.dst):
          os.mkdir(self.dst)
        raise
      with self.interrupts.lock:
        self.interrupts.committed = True
      shutil.rmtree(self.path, ignore_errors=True)   # empty now
      self.path = None

  def discard(self) -> None:
    """Removes the staged output (call inside ``held()``, or from the watcher when exiting)."""
    if self.path is not None:
      shutil.rmtree(self.path, ignore_errors=True)
      self.path = None
    for folder in reversed(self.made):
      try:
        os.rmdir(folder)
      except OSError:
        break
    self.made = []


def _write(kind, meta, params, out_dir, interrupts: _Interrupts) -> None:
  from kvjax import checkpoint as ckpt
  t0 = time.perf_counter()
  with interrupts.held():                     # orbax's writer threads must finish first
    try:
      ckpt.write_tree(out_dir, meta, params)
    except ValueError as e:                   # tensorstore reports I/O errors as ValueError
      raise OSError(f'{out_dir}: writing the parameters failed ({sources.one_line(e)})') from e
  _log(f'wrote {kind} params in {time.perf_counter() - t0:.1f}s')


def _check_flags(args) -> None:
  for flag in ('src', 'dst'):
    if not getattr(args, flag):
      raise PortError(f'--{flag}: empty path')
  if args.model == 'wan_dir' and (args.ema is not None or args.num_heads is not None
                                  or args.allow_any_size):
    raise PortError('--ema/--no_ema/--num_heads/--allow_any_size do not apply to --model=wan_dir')


def _open_model(args, log) -> tuple[str, sources.TensorSource, str | None]:
  """(kind, source, config.json beside it) of a single-model --src, checked against the flags."""
  source, side = open_source(args.src, args.ema, log=log)
  kind = identify(source)
  if kind is None:
    dit_port.check_t2v(source)            # an I2V DiT gets its own message
    raise PortError(f'{source.path}: unrecognised checkpoint: neither a Wan DiT, a umT5 '
                    f'encoder nor a Wan VAE (keys like {sorted(source.keys())[:4]})')
  if args.model != 'auto' and kind != args.model:
    raise PortError(f'{source.path}: is {DESCRIBE[kind]}, not {DESCRIBE[args.model]} '
                    f'(--model={args.model})')
  if args.ema is not None and kind != 'dit':
    raise PortError(f'{source.path}: --ema/--no_ema apply to Self-Forcing DiT checkpoints')
  if kind != 'dit' and (args.num_heads is not None or args.allow_any_size):
    raise PortError(f'{source.path}: is {DESCRIBE[kind]}; --num_heads/--allow_any_size apply to '
                    'DiT checkpoints only')
  return kind, source, side


def _wan_dir_parts(args):
  """--model=wan_dir: the umT5 encoder and VAE sources and the tokenizer folder, all checked."""
  from kvjax import wan_dir
  from kvjax.text import tokenizer as tokenizer_lib
  if not os.path.isdir(args.src):
    if not os.path.exists(args.src):
      raise PortError(f'{args.src}: no such file or folder')
    raise PortError(f'{args.src}: not a folder; --model=wan_dir takes a Wan2.1 (or diffusers '
                    'pipeline) folder')
  try:
    wd = wan_dir.inspect(args.src)
  except FileNotFoundError as e:
    raise PortError(str(e).replace('--wan_dir', '--src')) from None
  if wd.layout == 'kvjax':
    raise PortError(f'{args.src}: already converted (kvjax layout)')
  parts = []
  for kind, path, names in (('umt5', wd.text_encoder, ('model', 'pytorch_model')),
                            ('vae', wd.vae, ('diffusion_pytorch_model',))):
    source = sources.open_checkpoint(path, names) if os.path.isdir(path) else sources.open_file(path)
    side = os.path.join(path, 'config.json') if os.path.isdir(path) else None
    got = identify(source)
    if got != kind:
      raise PortError(f'{source.path}: expected {DESCRIBE[kind]}, found '
                      f'{DESCRIBE.get(got, "an unrecognised checkpoint")}')
    parts.append((kind, source, side))
  tokenizer_lib.load(wd.tokenizer)            # the tokenizer must load (before any work)
  return wd, parts


def _wan_dir(args, staging: _Staging, interrupts: _Interrupts, log) -> None:
  """--model=wan_dir: umT5 encoder + tokenizer + VAE of a Wan2.1 (or diffusers) folder."""
  import json
  from kvjax import wan_dir
  wd, parts = _wan_dir_parts(args)
  for kind, source, side in parts:
    meta, params = convert_model(kind, source, side, args.dtype, args, log=log)
    sub = wan_dir.LAYOUTS['kvjax']['text_encoder' if kind == 'umt5' else 'vae']
    out = staging.out()
    with interrupts.held():
      os.makedirs(out, exist_ok=True)
    _write(kind, meta, params, os.path.join(out, sub), interrupts)
    del params
  with interrupts.held():
    out = staging.out()
    shutil.copytree(wd.tokenizer, os.path.join(out, wan_dir.LAYOUTS['kvjax']['tokenizer']))
    with open(os.path.join(out, wan_dir.MARKER), 'w') as f:
      json.dump(dict(format=wan_dir.MARKER_FORMAT, source=os.path.abspath(args.src),
                     layout=wd.layout), f, indent=2)


def run(args, interrupts: _Interrupts | None = None) -> str:
  """Converts ``args.src`` into ``args.dst`` atomically; returns the kind written.

  Every input is checked before any work (PortError naming the file or flag and the problem);
  output is staged beside --dst and renamed at the end; on any error or interrupt nothing is left.
  """
  interrupts = interrupts or _Interrupts()
  _check_flags(args)
  dst = os.path.abspath(args.dst)
  _check_dst(dst)
  staging = _Staging(dst, interrupts)
  log = _Notes()
  try:
    if args.model == 'wan_dir':
      _wan_dir(args, staging, interrupts, log)
      kind = 'wan_dir'
    else:
      kind, source, side = _open_model(args, log)
      meta, params = convert_model(kind, source, side, args.dtype, args, log=log)
      _write(kind, meta, params, staging.out(), interrupts)
    staging.commit()
  except BaseException:
    with interrupts.held():
      staging.discard()
    raise
  return kind


class _Parser(argparse.ArgumentParser):
  """argparse whose mistakes are a PortError (one ``error: --flag: problem`` line from ``main``)
  rather than the usage text and SystemExit."""

  def error(self, message):
    required = re.match(r'the following arguments are required: (.*)', message)
    unknown = re.match(r'unrecognized arguments: (.*)', message)
    if required:
      message = f'{required.group(1)}: required (see --help)'
    elif unknown:
      message = f'{unknown.group(1)}: unrecognized argument(s) (see --help)'
    raise PortError(re.sub(r'^argument (-[^:/ ]+)(/[^:]*)?: ', r'\1: ', message))


def _positive_int(text: str) -> int:
  try:
    val = int(text)
  except ValueError:
    val = 0
  if val <= 0:
    raise argparse.ArgumentTypeError(f'must be a positive integer, not {text!r}')
  return val


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog='python -m ports.convert', description=__doc__.split('\n')[0],
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--src', required=True, help='checkpoint file or model folder')
  p.add_argument('--dst', required=True, help='output folder (must not exist, or be empty)')
  p.add_argument('--model', choices=MODELS, default='auto',
                 help='what --src must be (auto: recognised from its keys)')
  ema = p.add_mutually_exclusive_group()
  ema.add_argument('--ema', dest='ema', action='store_true', default=None,
                   help='Self-Forcing .pt: take generator_ema (default when present)')
  ema.add_argument('--no_ema', dest='ema', action='store_false',
                   help='Self-Forcing .pt: take generator')
  p.add_argument('--dtype', choices=('bfloat16', 'float32'), default=None,
                 help='stored parameter dtype (default: bfloat16 for DiT/umT5, float32 for the VAE)')
  p.add_argument('--num_heads', type=_positive_int, default=None,
                 help='DiT attention heads, when neither a config.json nor a known size tells')
  p.add_argument('--allow_any_size', action='store_true',
                 help='convert released DiT sizes other than the 1.3B (e.g. 14B)')
  return p


def _error(e, status: int = EXIT_USAGE) -> int:
  if isinstance(e, OSError) and e.strerror and e.filename:
    text = f'{e.filename}: {e.strerror}'
  else:
    text = sources.one_line(e)
  print(f'error: {text}', file=sys.stderr, flush=True)
  return status


def main(argv=None, interrupts: _Interrupts | None = None) -> int:
  """The command line: 0 when converted; 2 with one ``error:`` line for a bad flag or input
  (nothing written); 130 with ``interrupted; nothing written`` after Ctrl-C (nothing left).

  ``interrupts``: an installed ``_Interrupts`` (``cli``); without one, Ctrl-C is a
  KeyboardInterrupt (what was staged is removed as it propagates, then this returns 130).
  """
  t0 = time.perf_counter()
  interrupts = interrupts or _Interrupts()
  try:
    args = parser().parse_args(argv)
    kind = run(args, interrupts)
  except INPUT_ERRORS as e:
    return _error(e)
  except OSError as e:                        # e.g. the disk filled up while writing
    return _error(e, EXIT_FAILED)
  except KeyboardInterrupt:
    sys.stderr.write('interrupted; nothing written\n')
    return EXIT_INTERRUPTED
  _log(f'converted {kind}: {args.src} -> {args.dst} in {time.perf_counter() - t0:.1f}s')
  return 0


def cli() -> None:
  """``python -m ports.convert``: ``main`` with Ctrl-C handled by an installed ``_Interrupts``."""
  interrupts = _Interrupts()
  interrupts.install()
  status = main(interrupts=interrupts)
  signal.signal(signal.SIGINT, signal.SIG_IGN)     # done: Python's exit must not die of it
  sys.exit(status)


if __name__ == '__main__':
  cli()
