"""What the Flamingo-level parity tests share: a fixture folder converted
to a workdir and loaded, and our logits on one encoded prompt."""

import jax.numpy as jnp
import numpy as np

import flamingo_jax
from flamingo_jax.inference import prompts
from flamingo_jax.models import flamingo
from flamingo_jax.weights import convert


def convert_and_load(tmp_path_factory, name: str, args) -> flamingo_jax.Model:
  """`convert.main(args(workdir))` into a fresh workdir, then `load`."""
  workdir = tmp_path_factory.mktemp(name) / 'workdir'
  assert convert.main(args(workdir)) == 0
  return flamingo_jax.load(workdir, placement='device')


def prompt_logits(model: flamingo_jax.Model, prompt: str, images: np.ndarray
                  ) -> tuple[np.ndarray, prompts.EncodedPrompt]:
  """Our fp32 logits [L, V'] on `prompt` with `images` [N, H, W, 3], and
  the prompt as the notebook API encodes it."""
  encoded = prompts.encode(model.tokenizer, prompt, list(images),
                           model.image_size)
  logits = flamingo.transform(model.model_config).apply(
      model.params, None, jnp.asarray(encoded.tokens)[None],
      jnp.asarray(encoded.media)[None], jnp.ones([1, len(images)], bool),
      jnp.asarray(encoded.media_index)[None])  # [1, L, V']
  return np.asarray(logits[0]), encoded
