"""Checkpoint conversion: PyTorch (Self-Forcing, Wan2.1, diffusers, transformers) -> kvjax.

One module per source model, each a declarative key table with named transforms:
``dit`` (Wan DiT), ``umt5`` (text encoder), ``vae`` (Wan VAE decoder); ``sources`` reads files
lazily, ``engine`` checks and fills; CLI: ``python -m ports.convert --src=PATH --dst=DIR``.
"""
