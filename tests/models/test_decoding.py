"""Cached decoding (prefill + decode_step) equals the uncached forward pass."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import flamingo

B, L, N, SIZE = 2, 10, 2, 64


def _config(**xattn):
  config = flamingo.model_config('tiny')
  config['xattn'].update(xattn)
  return config


def _inputs():
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 500, size=(B, L)).astype(np.int32)
  media = rng.integers(0, 255, size=(B, N, 1, SIZE, SIZE, 3)).astype(np.uint8)
  media_mask = np.array([[True, True], [True, False]])
  media_index = np.zeros((B, L), np.int32)
  media_index[:, 2:6] = 1
  media_index[0, 6:] = 2
  media_index[1, 6:] = 1
  return tokens, media, media_mask, media_index


def _open_gates(params):
  """Gates at 0 would hide the media: give them a value."""
  return {module: {name: (value + 0.5 if name.endswith('_gate') else value)
                   for name, value in leaves.items()}
          for module, leaves in params.items()}


def _visual(config):
  """Random visual tokens [B, N, R, D]: the encoder is tested elsewhere."""
  resampler = config['resampler']
  shape = (B, N, resampler['num_latents'], resampler['width'])
  return np.random.default_rng(1).normal(size=shape).astype(np.float32)


def _decode(config):
  def fn(tokens, visual, media_mask, media_index):
    return flamingo.Flamingo(config).decode(tokens, visual, media_mask,
                                            media_index)
  return hk.transform(fn)


def _params(config):
  """The decoder's parameters (no vision encoder: `visual` is given)."""
  tokens, _, media_mask, media_index = _inputs()
  init = jax.jit(_decode(config).init)
  return _open_gates(init(jax.random.PRNGKey(0), tokens, _visual(config),
                          media_mask, media_index))


def _cached(config, pad, split, capacity=24):
  """Logits of the left-padded sequence, computed as two chunks."""

  def fn(tokens, valid, media_index, visual, media_mask):
    model = flamingo.Flamingo(config)
    first, state = model.prefill(tokens[:, :split], valid[:, :split],
                                 media_index[:, :split], visual, media_mask,
                                 capacity)
    second, _ = model.decode_step(tokens[:, split:], valid[:, split:],
                                  media_index[:, split:], state)
    return jnp.concatenate([first, second], axis=1)

  tokens, _, media_mask, media_index = _inputs()
  width = L + pad
  padded = np.zeros((B, width), np.int32)
  padded[:, pad:] = tokens
  valid = np.zeros((B, width), bool)
  valid[:, pad:] = True
  phi = np.zeros((B, width), np.int32)
  phi[:, pad:] = media_index
  return jax.jit(hk.transform(fn).apply), (padded, valid, phi,
                                           _visual(config), media_mask)


# (pad, split): a prompt chunk then the rest; left padding of `pad` tokens.
@pytest.mark.parametrize('xattn,chunks', [
    ({}, [(0, 1), (5, 14)]),
    ({'xattn_type': 'grafting'}, [(3, 6)]),
    ({'placement': 'single_in_middle'}, [(3, 6)]),
    ({'attend': 'all_previous_images'}, [(3, 6)]),
    ({'xattn_type': 'vanilla_xattn'}, [(3, 6)])],
    ids=['default', 'grafting', 'single_in_middle', 'all_previous',
         'vanilla'])
def test_cached_chunks_equal_full_forward(xattn, chunks):
  config = _config(**xattn)
  params = _params(config)
  tokens, _, media_mask, media_index = _inputs()
  full = jax.jit(_decode(config).apply)(params, None, tokens, _visual(config), media_mask,
                       media_index)  # [B, L, V]
  for pad, split in chunks:
    cached, args = _cached(config, pad, split)
    logits = cached(params, None, *args)  # [B, pad + L, V]
    np.testing.assert_allclose(logits[:, pad:], full, atol=2e-5, rtol=1e-5,
                               err_msg=f'pad={pad}, split={split}')


def test_media_reach_the_cached_tokens():
  """Guards the test above against passing because media are ignored."""
  config = _config()
  params = _params(config)
  cached, args = _cached(config, 2, 6)
  logits = cached(params, None, *args)
  changed = cached(params, None, *args[:3], args[3][:, ::-1], args[4])
  assert np.abs(logits[:, 2 + 2:] - changed[:, 2 + 2:]).max() > 1e-3


def test_prompt_longer_than_capacity_is_an_error():
  config = _config()
  cached, args = _cached(config, 0, 8, capacity=6)
  params = _params(config)
  with pytest.raises(ValueError, match='capacity'):
    cached(params, None, *args)


def test_per_image_cross_attention_equals_dense_and_decodes(monkeypatch):
  """The full forward, and cached chunks, with the xattn's per-image form
  (forced with 2-slot groups) equal the dense form's full forward."""
  from flamingo_jax.models import xattn  # pylint: disable=g-import-not-at-top
  config = _config()
  params = _params(config)
  tokens, _, media_mask, media_index = _inputs()
  args = (tokens, _visual(config), media_mask, media_index)
  dense = jax.jit(_decode(config).apply)(params, None, *args)  # [B, L, V]
  monkeypatch.setattr(xattn, 'GROUP_SIZE', 2)
  assert isinstance(xattn.attention_plan(jnp.asarray(media_index), media_mask,
                                         4), xattn.ImageRouting)
  routed = jax.jit(_decode(config).apply)(params, None, *args)
  np.testing.assert_allclose(routed, dense, atol=2e-5, rtol=1e-5)
  cached, cached_args = _cached(config, 3, 6)
  logits = cached(params, None, *cached_args)  # [B, 3 + L, V]
  np.testing.assert_allclose(logits[:, 3:], dense, atol=2e-5, rtol=1e-5)
