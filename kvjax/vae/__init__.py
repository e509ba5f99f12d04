"""The Wan2.1 VAE decoder (causal 3-D convolutions, streamed frame by frame)."""

from kvjax.vae.config import LATENTS_MEAN, LATENTS_STD, VAEConfig
from kvjax.vae.decoder import (DecodeStream, VAEDecoder, WanVAEDecoder, abstract_params, graphdef,
                               init_params)

FORMAT = 'kvjax.wan_vae.v1'

__all__ = ['FORMAT', 'LATENTS_MEAN', 'LATENTS_STD', 'VAEConfig', 'DecodeStream', 'VAEDecoder',
           'WanVAEDecoder', 'abstract_params', 'graphdef', 'init_params']
