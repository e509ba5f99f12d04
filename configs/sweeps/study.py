"""The study's sweep: every cache method x the first prompts of a suite x seed = prompt index.

Variants (the part after ``:``):
  world   the default: the trained world model on CPU, its drift setting (world_long: 36 latent
          frames through a 12-frame window with 3 sink frames), 10 captions of its own grammar
          (configs/sweeps/world_prompts.txt; the world's caption encoder cannot read MovieGen
          text), the first 2 of them. All 33 methods x 2 prompts: BUILD.md gives the time.
  wan     the study's protocol: Wan2.1-T2V-1.3B (Self-Forcing), 42 latent frames at 480x832
          through a 21-frame window, the first 10 prompts of a suite, seed = prompt index. Needs
          a converted checkpoint, the Wan folder and the suite (MovieGen: Self-Forcing's
          prompts/MovieGenVideoBench_extended.txt; StoryEval: ypwang61/StoryEval's prompts).

Run:
  python -m launch.sweep --config=configs/sweeps/study.py --outdir=runs/study
  python -m launch.sweep --config=configs/sweeps/study.py --outdir=runs/s2 \\
      --config.methods=BF16,RTN_INT4,KIVI_INT4 --config.num_prompts=2
  python -m launch.sweep --config=configs/sweeps/study.py:wan --outdir=/scratch/study \\
      --config.prompts_file=MovieGenVideoBench_extended.txt \\
      --config.run.checkpoint=ckpt/self_forcing --config.run.wan_dir=Wan2.1-T2V-1.3B \\
      --executor=slurm --config.executor.slurm.partition=gpu
  python -m launch.aggregate --sweep_dir=runs/study
Every field below can be overridden the same way; ``run`` is a whole run config
(configs/self_forcing.py), so ``--config.run.cache.window_frames=12`` or
``--config.run.impl=pallas`` change every run of the sweep.
"""

import os

import ml_collections

from configs import self_forcing

WORLD_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'world_prompts.txt')


def get_config(arg: str = 'world') -> ml_collections.ConfigDict:
  arg = arg or 'world'
  variants = {'world': 'world_long', 'wan': 'wan2.1_t2v_1.3b_long'}
  if arg not in variants:
    raise ValueError(f'unknown sweep variant {arg!r}; valid: {sorted(variants)}')
  c = ml_collections.ConfigDict()
  c.name = f'study_{arg}'
  # The run every (method, prompt, seed) starts from; the sweep sets its method, prompt, seed
  # and reference store (the sweep folder's references/).
  c.run = self_forcing.get_config(variants[arg])
  c.methods = 'all'            # 'all' = the study's 33 in table order, or 'BF16,RTN_INT4,...'
  c.prompts_file = WORLD_PROMPTS if arg == 'world' else ''   # one prompt per line
  c.num_prompts = 2 if arg == 'world' else 10                # the first N non-empty lines
  c.seed_offset = 0            # seed = seed_offset + prompt index (the study's rule)
  c.reference_dir = ''         # BF16 references: '' = the sweep folder's references/; a path
                               # shares one store between sweeps (keyed by every input)
  c.executor = ml_collections.ConfigDict(dict(
      kind='local',            # local (submitit, this machine) | slurm | inline (this process)
      local_gpus='auto',       # local: GPU ids, one job on each at a time ('0,1,2,3': 4 at
                               # once); auto = every visible GPU (one slot without GPUs)
      runs_per_job=0,          # 0: one job per method (its compiled steps reused); N: N runs
      slurm=dict(partition='', account='', qos='', gpus_per_task=1, cpus_per_task=8,
                 mem_gb=64, timeout_min=240, array_parallelism=32, nodes=1),
  ))
  return c
