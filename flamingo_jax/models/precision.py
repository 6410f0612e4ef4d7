"""Mixed precision (paper App. B.1.2): bf16 storage and compute, fp32 training.

  stored:   frozen params bf16 (`cast_frozen`), trainable params fp32, Adam
            moments fp32 (optax keeps moments in their parameter's dtype).
  computed: every floating parameter cast to the compute dtype (bf16) by
            `compute_params`, inside the differentiated function, so the
            gradients of the fp32 trainable params come back in fp32.

Casting the parameters is not enough: the model normalises the media in fp32,
and an fp32 activation meeting a bf16 weight promotes the residual stream to
fp32 (a scanned layer stack then fails on its carry dtype). `with_compute_dtype`
therefore runs the model's apply under a Haiku method interceptor
(`compute_dtype_scope`) that casts the floating inputs of every module method
to the compute dtype, and runs normalisation layers (LayerNorm, RMSNorm) in
fp32 before casting their output back. Attention softmax is already fp32 in
the model. The logits come out in the compute dtype: take the loss in fp32
(`logits.astype(jnp.float32)`).

Initialisation stays in fp32 (`with_compute_dtype` leaves `init` alone): the
layers create their parameters in their input's dtype.
"""

from collections.abc import Callable, Iterator
import contextlib
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

DType = Any  # A jnp dtype, e.g. jnp.bfloat16.

# Layers whose statistics are computed in fp32 whatever the compute dtype.
FP32_MODULES = (hk.LayerNorm, hk.RMSNorm)


def _is_floating(x: Any) -> bool:
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)


def cast_floating(tree: Any, dtype: DType) -> Any:
  """Casts the floating leaves of `tree` to `dtype`; others are kept."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if _is_floating(x) and x.dtype != dtype else x,
      tree)


def cast_frozen(frozen: hk.Params, dtype: DType = jnp.bfloat16) -> hk.Params:
  """The frozen partition as stored in the train state (bf16)."""
  return cast_floating(frozen, dtype)


def compute_params(trainable: hk.Params, frozen: hk.Params,
                   dtype: DType = jnp.bfloat16) -> hk.Params:
  """All parameters, merged and cast to the compute dtype.

  Call it inside the function you differentiate with respect to `trainable`:
  the cast's transpose returns fp32 gradients for fp32 trainable params.
  The merge is `training.optim.merge`'s (the two must not share a name).
  """
  merged = hk.data_structures.merge(trainable, frozen, check_duplicates=True)
  return cast_floating(merged, dtype)


def _interceptor(dtype: DType) -> Callable[..., Any]:
  """Casts module inputs to `dtype`; runs FP32_MODULES in fp32."""

  def intercept(next_f, args, kwargs, context: hk.MethodContext):
    if isinstance(context.module, FP32_MODULES):
      out = next_f(*cast_floating(args, jnp.float32),
                   **cast_floating(kwargs, jnp.float32))
      return cast_floating(out, dtype)
    return next_f(*cast_floating(args, dtype), **cast_floating(kwargs, dtype))

  return intercept


@contextlib.contextmanager
def compute_dtype_scope(dtype: DType) -> Iterator[None]:
  """Haiku modules called (traced) in this scope compute in `dtype`."""
  with hk.intercept_methods(_interceptor(dtype)):
    yield


def with_compute_dtype(model: hk.Transformed,
                       dtype: DType = jnp.bfloat16) -> hk.Transformed:
  """`model` whose apply casts params and computes in `dtype`; same init.

  E.g. `precision.with_compute_dtype(flamingo.transform(config.model))`.
  The params passed to apply may be fp32 or bf16 (e.g. `optim.merge` of the
  train state's partitions): floating ones are cast to `dtype` first.
  """

  def apply(params: hk.Params, *args, **kwargs):
    with compute_dtype_scope(dtype):
      return model.apply(cast_floating(params, dtype), *args, **kwargs)

  return hk.Transformed(init=model.init, apply=apply)
