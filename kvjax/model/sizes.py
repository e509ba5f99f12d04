"""The one table of DiT sizes: the configs, ``WanConfig``'s defaults and the checkpoint ports read it.

Each entry is the shape of one model: width ``dim``, feed-forward width ``ffn_dim``, attention
heads, blocks, the text encoder's sequence length and width, and the latent channels. Fields not
listed (frequency width, patch, eps, RoPE) are ``WanConfig``'s defaults for every size.
``RELEASED`` names the sizes that exist as public Wan2.1 text-to-video checkpoints.
"""

from __future__ import annotations

SIZES: dict[str, dict[str, int]] = {
    # The trained world model shipped in kvjax/world/weights (12-channel space-to-depth latents).
    'world': dict(dim=96, ffn_dim=384, num_heads=3, num_layers=4, text_len=16, text_dim=32,
                  in_dim=12, out_dim=12),
    # Random-weight test and benchmark sizes (Wan's 16 latent channels).
    'tiny': dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=16, text_dim=32,
                 in_dim=16, out_dim=16),
    'mid': dict(dim=256, ffn_dim=1024, num_heads=4, num_layers=4, text_len=64, text_dim=256,
                in_dim=16, out_dim=16),
    # Public checkpoints: Self-Forcing's generator is the 1.3B; the 14B only converts.
    'wan2.1_t2v_1.3b': dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_len=512,
                            text_dim=4096, in_dim=16, out_dim=16),
    'wan2.1_t2v_14b': dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_len=512,
                           text_dim=4096, in_dim=16, out_dim=16),
}

RELEASED: dict[str, str] = {'wan2.1_t2v_1.3b': 'Wan2.1-T2V-1.3B',
                            'wan2.1_t2v_14b': 'Wan2.1-T2V-14B'}
"""Size key -> the public model's name."""

DEFAULT = 'wan2.1_t2v_1.3b'
"""The size ``WanConfig()`` describes: the Self-Forcing generator."""


def get(name: str) -> dict[str, int]:
  """A copy of size ``name``; raises naming the valid sizes."""
  if name not in SIZES:
    raise ValueError(f'unknown model size {name!r}; valid: {sorted(SIZES)}')
  return dict(SIZES[name])
