"""The launcher's short flags, as overrides of the run's config fields (one table).

A run is described by one config (``configs/self_forcing.py``): model, sampler, video, cache
window, method, reference and inputs. ``--method=kivi_int2`` is the same as
``--config.method=kivi_int2``; ``--num_latent_frames=12`` the same as
``--config.video.num_latent_frames=12``. The defaults live in the config file only: every flag
here defaults to "not given" and then leaves the config's field as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Field:
  """A launcher flag: the config field it sets, its absl kind, enum values and help."""
  path: str
  kind: str                       # 'string' | 'integer' | 'bool' | 'enum'
  help: str
  values: tuple[str, ...] = ()    # for 'enum'


FLAG_FIELDS: dict[str, Field] = {
    'method': Field('method', 'string', 'Cache method name or alias (see --list_methods).'),
    'method_args': Field('method_args', 'string', "Method parameter overrides 'key=value,...' "
                         '(e.g. clamp_zero_point=false); see --list_methods.'),
    'checkpoint': Field('checkpoint', 'string',
                        'Converted DiT checkpoint directory (ports.convert).'),
    'seed': Field('seed', 'integer', 'Noise seed (and of random text states).'),
    'num_latent_frames': Field('video.num_latent_frames', 'integer',
                               'Latent frames to generate (a multiple of the 3-frame block).'),
    'impl': Field('impl', 'enum', 'Attention implementation.', ('auto', 'xla', 'pallas')),
    'reference': Field('reference', 'enum', 'Reference rollout for the fidelity metrics (same '
                       'noise): kvjax BF16, the PyTorch pipeline with a KV cache, or none.',
                       ('bf16', 'torch', 'none')),
    'reference_dir': Field('reference_dir', 'string', 'Where BF16 references are stored and '
                           'reused across runs (keyed by every input of the rollout); empty: '
                           'always roll the reference out.'),
    'noise_file': Field('noise_file', 'string', '.npz with initial [B,F,C,h,w] and renoise '
                        '[blocks, steps-1, B, block_frames, C, h, w]; fixes the latent shape.'),
    'text_states': Field('text_states', 'string', '.npy [B, L, text_dim] replacing the text '
                         'encoder.'),
    'compute_dtype': Field('model.compute_dtype', 'enum', 'Dtype of activations and of the '
                           'unquantized cache.', ('float32', 'bfloat16')),
    'window_frames': Field('cache.window_frames', 'integer', 'Frames of K/V visible to a block, '
                           'its own included (-1 = all).'),
    'sink_frames': Field('cache.sink_frames', 'integer', 'First frames never evicted.'),
    'wan_dir': Field('wan_dir', 'string', 'Wan2.1 folder (original, diffusers or converted): the '
                     'umT5 text encoder, its tokenizer and the VAE; writes video.mp4.'),
    'prompt': Field('prompt', 'string', "Text prompt (the world model's caption grammar, or a "
                    'Wan prompt with --wan_dir).'),
    'prompts_file': Field('prompts_file', 'string', 'File with one prompt per line, run as a '
                          'batch.'),
    'free_text_encoder': Field('free_text_encoder', 'bool', 'Delete the text encoder from device '
                               'memory before the DiT runs.'),
}

FROM_NOISE_FILE = -1
"""``video.num_latent_frames`` meaning "the noise file's" (set when --noise_file comes alone)."""


def _set(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  *parents, leaf = path.split('.')
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise ValueError(f'config has no field {path!r} (configs/self_forcing.py defines every '
                     'run field)')
  try:
    node[leaf] = value
  except TypeError as e:    # ConfigDict keeps a field's type: e.g. a string for an integer
    raise ValueError(f'config.{path}: {e}') from None


def override(config: ml_collections.ConfigDict, **values: Any) -> ml_collections.ConfigDict:
  """A copy of ``config`` with each value not None set at its flag's field (``FLAG_FIELDS``).

  ``noise_file`` without ``num_latent_frames`` takes the frame count from the noise file
  (``FROM_NOISE_FILE``), as the --noise_file flag documents.
  """
  unknown = sorted(set(values) - set(FLAG_FIELDS))
  if unknown:
    raise ValueError(f'unknown run field(s) {unknown}; valid: {sorted(FLAG_FIELDS)}')
  c = ml_collections.ConfigDict(config.to_dict())
  if values.get('noise_file') and values.get('num_latent_frames') is None:
    values = dict(values, num_latent_frames=FROM_NOISE_FILE)
  for name, value in values.items():
    if value is not None:
      _set(c, FLAG_FIELDS[name].path, value)
  return c
