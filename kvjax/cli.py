"""The command-line contract shared by kvjax's tools (``kvjax.launch``, ``launch.sweep``,
``launch.aggregate``): a mistake is one ``error:`` line on stderr and exit status 2, before any
work; --help prints the usage and exits 0. Defines no flags (each tool defines its own)."""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

EXIT_USAGE = 2
HELP_FLAGS = ('-h', '--help', '-help', '-?', '--helpshort', '--helpfull')
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
                NotImplementedError)
"""What bad input raises (``resolve``-style checks): reported as one line, not a traceback."""


def error(msg) -> int:
  """One line on stderr (``msg`` with its lines joined, at most 400 characters), exit status 2.
  A message that embeds a traceback (ml_collections' config errors) keeps its head and the
  exception's own last line."""
  lines = [x.strip() for x in str(msg).splitlines() if x.strip()]
  if any(x.startswith('Traceback (most recent call last)') for x in lines):
    lines = [lines[0].split('Traceback')[0], lines[-1]]
  text = ' '.join(' '.join(lines).split()) or type(msg).__name__
  print(f'error: {text[:400]}', file=sys.stderr, flush=True)
  return EXIT_USAGE


def define_config(default: str, help_text: str) -> None:
  """``--config`` (a Python config file, ``path:variant``); ml_collections applies sys.argv's
  ``--config.*`` overrides when the flag is defined, so a bad one is reported here."""
  try:
    config_flags.DEFINE_config_file('config', default, help_text, lock_config=True)
  except Exception as e:
    overrides = [a.split('=')[0] for a in sys.argv[1:] if a.startswith('--config.')]
    sys.exit(error(f"--config: cannot apply {', '.join(overrides) or 'the overrides'} "
                   f'({type(e).__name__}: {e})'))


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing with the contract: --help prints the usage and exits 0; a bad flag, config
  file, config variant or override is one ``error:`` line and exit status 2."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(error(e))
  except Exception as e:   # whatever loading the --config file raises
    sys.exit(error(f'--config: {type(e).__name__}: {e}'))


def load_config(flag_value):
  """The --config value, loaded (ml_collections loads lazily): (config, None) or (None, message)."""
  try:
    flag_value.to_dict()
    return flag_value, None
  except Exception as e:
    return None, f'--config: {type(e).__name__}: {e}'
