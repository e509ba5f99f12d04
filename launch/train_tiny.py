r"""Trains the world model (the `world` configs) and exports it: optax + orbax, CPU-sized.

  python -m launch.train_tiny                                   # work folder runs/train_tiny
  python -m launch.train_tiny --export=kvjax/world/weights      # also replace the shipped model
  python -m launch.train_tiny --config.train.steps=20 --workdir=/tmp/t   # a smoke run

The config (``configs/self_forcing.py:world`` by default) describes the model, the caption
encoder, the sampler and the training (``config.train``); ``--config.<field>=`` overrides any
field. Teacher forcing (``kvjax.world.train``) on batches drawn on the fly from the world
(``kvjax.world.train.training_batch(seed, step)``), AdamW with warmup and cosine decay; the loop
is ``kvjax.world.trainer``. Everything
is a function of the seed: batches and noise come from (seed, step), so a run interrupted and
resumed from its last checkpoint ends with the same weights as one that was not.

The work folder holds ``ckpt/`` (orbax, the last two checkpoints of parameters, optimiser state
and step; written atomically, so an interrupt loses at most the steps since the last one),
``log.json`` (loss per step, held-out loss per evaluation, wall time) and ``loss.png``. Run the
same command again to resume; a work folder made with another config is refused. ``--export``
writes the trained model as a checked bundle (``kvjax.world.bundle``) when training ends.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from kvjax import interrupts

_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), 'self_forcing.py') + ':world'
config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'World config (path:variant).',
                                lock_config=True)
flags.DEFINE_string('workdir', 'runs/train_tiny', 'Checkpoints, log.json and loss.png.')
flags.DEFINE_string('export', None, 'Write the trained bundle here when training ends.')
flags.DEFINE_bool('progress', True, 'Show a progress bar.')
FLAGS = flags.FLAGS

# Heavy imports after the flags: --help answers at once.
from kvjax.world import trainer  # noqa: E402


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    return 2
  logging.set_verbosity(logging.WARNING)
  try:
    models = trainer.prepare(FLAGS.config, FLAGS.workdir)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  workdir = os.path.abspath(FLAGS.workdir)
  interrupts.watch(lambda: interrupts.exit_interrupted(
      f'interrupted; the last checkpoint in {workdir} is kept (run the same command to resume)'),
      'train-tiny-interrupts')
  command = ' '.join(['python -m launch.train_tiny'] + [shlex.quote(a) for a in sys.argv[1:]])
  summary = trainer.fit(FLAGS.config, models, workdir, progress=FLAGS.progress)
  print(json.dumps(summary), flush=True)
  if FLAGS.export:
    trainer.export(FLAGS.config, models, workdir, FLAGS.export, dict(summary, command=command))
    print(f'exported {FLAGS.export}', flush=True)
  return 0


if __name__ == '__main__':
  app.run(main)
