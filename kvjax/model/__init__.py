"""The causal Wan2.1 DiT."""

from kvjax.model.config import WanConfig, as_dtype
from kvjax.model.dit import Block, WanDiT, count_params
