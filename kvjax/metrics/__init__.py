"""Fidelity metrics against a reference rollout (latent space; video metrics arrive with the VAE)."""

from kvjax.metrics.latent import latent_fidelity, per_frame_curves, psnr, rel_l2
from kvjax.metrics import memory
from kvjax.metrics.memory import compiled_memory, full_extent_float_arrays
