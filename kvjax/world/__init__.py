"""A procedural video world for the tiny default model.

Modules:
  scene:  the world itself: shapes, colours, sizes, the caption grammar (``parse``, ``caption``),
          deterministic bouncing physics (``trajectory``), the anti-aliased renderer (``render``)
          and on-the-fly training batches (``sample_batch``).
  checks: ground-truth checks of a generated video against a prompt, with the world's palette
          (background colour, object presence, coherent motion; ``evaluate``).
  codec:  latents <-> RGB frames (in place of the VAE at tiny size).
  text:   the caption encoder (text states for the DiT).

Import the modules directly (``from kvjax.world import scene``); this package imports nothing, and
scene and checks are numpy only (no jax).
"""
