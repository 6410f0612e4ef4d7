"""The small reference configurations shared by make_fixtures.py and tests.

Each fixture directory under testdata/ holds a tiny random model of one
published family, saved in that family's own file format by the reference
implementation (make_fixtures.py), and `expected.npz`: the input images
(`images_sum`, a checksum of the seeded input images `images()`) and the
reference's
fp32 outputs on them. The weights are rounded to the stored dtype before
the reference runs, so the outputs are exactly those of the stored file.
"""

import os

import numpy as np

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
BATCH = 2

# Hugging Face CLIPVisionModelWithProjection (transformers), stored as
# BF16 safetensors with its config.json.
HF_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=2, image_size=16, patch_size=4,
               projection_dim=8, hidden_act='quick_gelu')

# open_clip CLIP (exact GELU, as LAION's towers), stored as an fp16 state
# dict: zip (open_clip_pytorch_model.bin) and legacy (legacy.pt) formats.
OPEN_CLIP_VISION = dict(layers=3, width=16, head_width=8, patch_size=4,
                        image_size=16, mlp_ratio=2.0)
OPEN_CLIP_TEXT = dict(context_length=4, vocab_size=16, width=8, heads=2,
                      layers=1)
OPEN_CLIP_EMBED_DIM = 8

# NFNet structures (models/nfnet.py:NFNET_PARAMS entries) for the two NFNet
# references: DeepMind's code fixes the stem at (16, 32, 64, widths[0] / 2),
# timm's deep_quad stem is (c/8, c/4, c/2, c).
NFNET_VARIANTS = {
    'parity_dm': dict(widths=(16, 32, 32, 32), depths=(1, 1, 2, 1),
                      stem_widths=(16, 32, 64, 8), group_width=8,
                      train_imsize=64, test_imsize=64, drop_rate=0.0),
    'parity_timm': dict(widths=(16, 32, 32, 32), depths=(1, 1, 2, 1),
                        stem_widths=(2, 4, 8, 16), group_width=8,
                        train_imsize=64, test_imsize=64, drop_rate=0.0),
}
NFNET_IMAGE_SIZE = 64


def images(size: int, seed: int) -> np.ndarray:
  """[BATCH, size, size, 3] float32 normalised images, made from `seed`
  (not stored: `expected.npz` keeps their sum to catch a changed stream)."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)
  return ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.25).astype(np.float32)


def path(*parts: str) -> str:
  return os.path.join(TESTDATA, *parts)


def expected(name: str, size: int, seed: int
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The images of `seed` and the reference outputs on them."""
  with np.load(path(name, 'expected.npz'), allow_pickle=False) as data:
    outputs = dict(data)
  inputs = images(size, seed)
  stored_sum = outputs.pop('images_sum')
  if not np.isclose(inputs.sum(dtype=np.float64), stored_sum):
    raise AssertionError(f'{name}: the seeded images differ from the ones '
                         'the fixture was made with (numpy changed its '
                         'random stream?); rerun make_fixtures.py.')
  return inputs, outputs
