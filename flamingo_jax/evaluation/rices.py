"""RICES: retrieval-based in-context example selection (paper §3, App. B.1.5).

Instead of random shots, each query gets the support examples whose frozen
vision features are most similar to its own (Yang et al., 2021, as the paper
uses it for its 32-shot and ablation results):

  feature(medium) = mean over frames and tokens of the model's own vision
                    encoder output (`vision_encoder(...)['tokens']`), L2
                    normalised; one jitted function of the params.
  similarity      = cosine (a dot product of normalised features).
  order           = the k most similar, least similar first: the most
                    similar shot sits last, right before the query.

Features of a support or query set are cached on disk as
`<cache_dir>/<dataset>_<split>_<key>.npy` (tasks on one dataset share it),
the key hashing the dataset, the examples read, the media shape and the
vision parameters (their step and a checksum), so re-runs skip the encoding
and a new checkpoint never reads stale features.

Glossary of shapes:
  B: media per call; T: frames; H = W: image size; S: vision tokens;
  C: feature width; Q: queries; N: support examples; K: shots.
"""

from collections.abc import Callable, Mapping, Sequence
import hashlib
import io
import json
import os
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax import fs
from flamingo_jax.models import flamingo
from flamingo_jax.models import precision


def feature_fn(model_config: Mapping[str, Any], *,
               compute_dtype: Any = jnp.float32
               ) -> Callable[[hk.Params, jax.Array], jax.Array]:
  """A jitted fn(params, media [B, T, H, W, 3] uint8) -> features [B, C]."""

  def forward(media):
    model = flamingo.Flamingo(model_config)
    batch, frames = media.shape[:2]
    flat = media.reshape(-1, *media.shape[2:])  # [B*T, H, W, 3]
    pixels = model._normalise(flat)  # pylint: disable=protected-access  # [B*T, H, W, 3]
    tokens = model.vision_encoder(pixels, is_training=False)['tokens']  # [B*T, S, C]
    tokens = tokens.astype(jnp.float32).reshape(
        batch, frames * tokens.shape[1], tokens.shape[2])  # [B, T*S, C]
    pooled = jnp.mean(tokens, axis=1)  # [B, C]
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)  # [B, 1]
    return pooled / jnp.maximum(norm, 1e-12)  # [B, C]

  model = precision.with_compute_dtype(hk.transform(forward), compute_dtype)
  return jax.jit(lambda params, media: model.apply(params, None, media))


def compute_features(fn: Callable[[hk.Params, jax.Array], jax.Array],
                     params: hk.Params,
                     media: Sequence[np.ndarray],  # each [T, H, W, 3]
                     batch_size: int = 32) -> np.ndarray:  # [N, C] float32
  """Features of every medium, in fixed-size batches (one compilation)."""
  if not media:
    raise ValueError('compute_features needs at least one medium.')
  out = []
  for start in range(0, len(media), batch_size):
    chunk = np.stack(media[start:start + batch_size])  # [b, T, H, W, 3]
    rows = len(chunk)
    if rows < batch_size:  # Pad with copies: the shape stays the same.
      chunk = np.concatenate(
          [chunk, np.repeat(chunk[-1:], batch_size - rows, axis=0)])
    out.append(np.asarray(fn(params, chunk))[:rows])  # [b, C]
  return np.concatenate(out).astype(np.float32)  # [N, C]


def params_fingerprint(params: hk.Params, prefix: str = 'vision_encoder'
                       ) -> str:
  """16 hex digits of the names, shapes and sums of the `prefix` params."""
  digest = hashlib.sha256()
  for module in sorted(params):
    if not module.startswith(prefix):
      continue
    for name in sorted(params[module]):
      value = np.asarray(params[module][name], np.float64)
      total, absolute = float(value.sum()), float(np.abs(value).sum())
      digest.update(f'{module}/{name}{tuple(value.shape)}{total!r}'
                    f'{absolute!r}'.encode())
  return digest.hexdigest()[:16]


def cache_key(**fields: Any) -> str:
  """16 hex digits of the fields (JSON-serialisable values)."""
  text = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached(path: str | None, compute: Callable[[], np.ndarray]) -> np.ndarray:
  """np.load(path) if it exists, else compute() (saved to path if given)."""
  if path and fs.exists(path):
    return (np.load(io.BytesIO(fs.read_bytes(path))) if fs.is_url(path)
            else np.load(path))
  value = compute()
  if path and fs.is_url(path):  # One upload: whole or absent.
    buffer = io.BytesIO()
    np.save(buffer, value)
    fs.write_bytes(path, buffer.getvalue())
  elif path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp.{os.getpid()}.npy'
    np.save(tmp, value)
    os.replace(tmp, path)
  return value


def nearest(query: np.ndarray,  # [Q, C], L2-normalised
            support: np.ndarray,  # [N, C], L2-normalised
            k: int) -> np.ndarray:  # [Q, K] int: least similar first
  """The k most similar support rows per query, the most similar LAST.

  Ties go to the lower index (which then comes later in the prompt).
  """
  if query.ndim != 2 or support.ndim != 2 or query.shape[1] != support.shape[1]:
    raise ValueError(f'Expected features [Q, C] and [N, C]; got '
                     f'{query.shape} and {support.shape}.')
  if not 0 <= k <= len(support):
    raise ValueError(f'Cannot retrieve {k} shots from {len(support)} support '
                     'examples.')
  similarity = query @ support.T  # [Q, N]
  order = np.argsort(-similarity, axis=1, kind='stable')[:, :k]  # [Q, K]
  return order[:, ::-1].copy()  # [Q, K]
