"""Fidelity metrics against a reference rollout: latent space, decoded frames, memory."""

from kvjax.metrics.latent import latent_fidelity, per_frame_curves, psnr, rel_l2
from kvjax.metrics import memory
from kvjax.metrics import drift
from kvjax.metrics.frames import PSNR_CAP, frame_psnr, frame_ssim
from kvjax.metrics.perceptual import frame_lpips
from kvjax.metrics.video import video_fidelity
from kvjax.metrics.memory import compiled_memory, full_extent_float_arrays
