"""The world's codec (exact space-to-depth) and caption encoder's tokenizer and masking."""

from __future__ import annotations

import numpy as np
import pytest

from kvjax.world import codec, scene
from kvjax.world import text as text_lib


def test_codec_is_exact_and_laid_out_as_documented():
  rng = np.random.default_rng(0)
  frames = rng.uniform(-1, 1, (2, 3, 6, 10, 3)).astype(np.float32)
  lat = codec.encode(frames)
  assert lat.shape == (2, 3, 12, 3, 5) and lat.dtype == np.float32
  np.testing.assert_array_equal(codec.decode(lat), frames)           # bit for bit
  # The documented channel order, by an explicit loop (independent of the reshapes).
  want = np.zeros_like(lat)
  for y in range(3):
    for x in range(5):
      for i in range(2):
        for j in range(2):
          for c in range(3):
            want[..., (i * 2 + j) * 3 + c, y, x] = frames[..., 2 * y + i, 2 * x + j, c]
  np.testing.assert_array_equal(lat, want)
  # Negative control: swapping the two pixel axes is not the codec.
  swapped = frames.swapaxes(-2, -3)[..., :10, :6, :]
  assert not np.array_equal(codec.encode(np.ascontiguousarray(swapped)).reshape(-1),
                            lat.reshape(-1))


def test_codec_rejects_odd_sizes_and_wrong_channels():
  with pytest.raises(ValueError, match='not divisible by the codec factor'):
    codec.encode(np.zeros((1, 5, 4, 3), np.float32))
  with pytest.raises(ValueError, match=r'\[\.\.\., T, H, W, 3\]'):
    codec.encode(np.zeros((1, 4, 4, 4), np.float32))
  with pytest.raises(ValueError, match='12'):
    codec.decode(np.zeros((1, 16, 4, 4), np.float32))


def test_codec_on_a_rendered_video_keeps_the_palette():
  s = scene.sample_scene(np.random.default_rng(3), 32, 32)
  frames, _ = scene.render(s, 3)
  lat = codec.encode(frames)
  assert lat.shape == (3, 12, 16, 16)
  corner = codec.decode(lat)[0, 0, 0]                       # a background pixel (0, 0)
  np.testing.assert_allclose((corner + 1) * 127.5, scene.COLORS[s.background], atol=1e-4)


def test_tokenize_ids_and_errors():
  cap = 'A big red circle and a blue square bouncing on a gray background.'
  ids, mask = text_lib.tokenize([cap], 16)
  words = cap.lower().rstrip('.').split()
  assert list(ids[0, :len(words)]) == [scene.VOCAB.index(w) + 1 for w in words]
  assert list(mask[0]) == [1] * len(words) + [0] * (16 - len(words))
  with pytest.raises(scene.CaptionError, match="unknown word 'purple'") as e:
    text_lib.tokenize(['a purple circle bouncing on a gray background'], 16)
  assert all(w in str(e.value) for w in scene.VOCAB) and '\n' not in str(e.value)
  with pytest.raises(scene.CaptionError, match='at most 8'):
    text_lib.tokenize(['a big red circle bouncing on a gray background'], 8)


def test_encoder_masks_padding():
  """Padded rows are zero, and a caption's states do not depend on the batch's other captions
  (the padding keys are masked out of attention)."""
  cfg = text_lib.CaptionEncoderConfig()
  params = text_lib.init_params(cfg, 0)
  short = 'a red circle bouncing on a gray background'
  long = 'a small red circle and a big blue square bouncing on a gray background'
  alone = text_lib.encode(cfg, params, [short])
  both = text_lib.encode(cfg, params, [short, long])
  assert alone.shape == (1, 16, 32)
  np.testing.assert_allclose(both[0], alone[0], atol=1e-6)
  assert np.all(alone[0, 8:] == 0) and np.all(np.abs(alone[0, :8]).sum(-1) > 0)
  # Negative control: the same captions differ where their words differ.
  assert np.abs(both[1, :3] - both[0, :3]).max() > 1e-3
