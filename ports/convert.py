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
(``--model`` insists on one). Output is written into a temporary folder beside ``--dst`` and
renamed at the end; on any error nothing is left at ``--dst``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from ports import dit as dit_port
from ports import sources
from ports import umt5 as umt5_port
from ports import vae as vae_port
from ports.sources import PortError

MODELS = ('auto', 'dit', 'umt5', 'vae', 'wan_dir')
DEFAULT_DTYPE = dict(dit='bfloat16', umt5='bfloat16', vae='float32')
DESCRIBE = dict(dit='a Wan DiT', umt5='a umT5 text encoder', vae='a Wan VAE')


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


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


def convert_model(kind: str, source, side: str | None, dtype: str | None, args) -> tuple[dict, dict]:
  """Converts one model; returns (config.json meta, nested params as host jax arrays).

  Leaves are converted one at a time and moved into jax arrays as they are done, so memory holds
  the converted weights plus one leaf in flight (and the memory-mapped source pages).
  """
  from kvjax import checkpoint as ckpt
  from kvjax import text, vae
  dtype = dtype or DEFAULT_DTYPE[kind]
  fin = dict(finalize=to_host_array, log=_log)
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
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise PortError(f'--dst {dst} exists and is not an empty folder; refusing to overwrite')


def _write_one(kind, source, side, dtype, args, out_dir):
  from kvjax import checkpoint as ckpt
  meta, params = convert_model(kind, source, side, dtype, args)
  t0 = time.perf_counter()
  ckpt.write_tree(out_dir, meta, params)
  _log(f'wrote {kind} params in {time.perf_counter() - t0:.1f}s')


def _wan_dir(args, stage_out: str) -> None:
  """--model=wan_dir: umT5 encoder + tokenizer + VAE of a Wan2.1 (or diffusers) folder."""
  import json
  from kvjax import wan_dir
  wd = wan_dir.inspect(args.src)
  if wd.layout == 'kvjax':
    raise PortError(f'{args.src}: already converted (kvjax layout)')
  os.makedirs(stage_out)
  for kind, path, names in (('umt5', wd.text_encoder, ('model', 'pytorch_model')),
                            ('vae', wd.vae, ('diffusion_pytorch_model',))):
    source = sources.open_checkpoint(path, names) if os.path.isdir(path) else sources.open_file(path)
    side = os.path.join(path, 'config.json') if os.path.isdir(path) else None
    got = identify(source)
    if got != kind:
      raise PortError(f'{source.path}: expected {DESCRIBE[kind]}, found '
                      f'{DESCRIBE.get(got, "an unrecognised checkpoint")}')
    _write_one(kind, source, side, args.dtype, args,
               os.path.join(stage_out, wan_dir.LAYOUTS['kvjax']['text_encoder' if kind == 'umt5' else 'vae']))
  tok_dst = os.path.join(stage_out, wan_dir.LAYOUTS['kvjax']['tokenizer'])
  shutil.copytree(wd.tokenizer, tok_dst)
  from kvjax.text import tokenizer as tokenizer_lib
  tokenizer_lib.load(tok_dst)                   # the copied tokenizer must load
  with open(os.path.join(stage_out, wan_dir.MARKER), 'w') as f:
    json.dump(dict(format=wan_dir.MARKER_FORMAT, source=os.path.abspath(args.src),
                   layout=wd.layout), f, indent=2)


def run(args) -> str:
  """Converts ``args.src`` into ``args.dst`` atomically; returns the kind written."""
  dst = os.path.abspath(args.dst)
  _check_dst(dst)
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.partial-', dir=parent)
  out = os.path.join(stage, 'out')
  try:
    if args.model == 'wan_dir':
      if args.ema is not None or args.num_heads is not None or args.allow_any_size:
        raise PortError('--ema/--no_ema/--num_heads/--allow_any_size do not apply to --model=wan_dir')
      _wan_dir(args, out)
      kind = 'wan_dir'
    else:
      source, side = open_source(args.src, args.ema)
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
      _write_one(kind, source, side, args.dtype, args, out)
    if os.path.isdir(dst):
      os.rmdir(dst)                             # empty (checked above)
    os.rename(out, dst)
    os.rmdir(stage)
  except BaseException:
    shutil.rmtree(stage, ignore_errors=True)
    raise
  return kind


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m ports.convert', description=__doc__.split('\n')[0],
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
  p.add_argument('--num_heads', type=int, default=None,
                 help='DiT attention heads, when neither a config.json nor a known size tells')
  p.add_argument('--allow_any_size', action='store_true',
                 help='convert released DiT sizes other than the 1.3B (e.g. 14B)')
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  t0 = time.perf_counter()
  try:
    kind = run(args)
  except (PortError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  _log(f'converted {kind}: {args.src} -> {args.dst} in {time.perf_counter() - t0:.1f}s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
