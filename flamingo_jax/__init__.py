"""flamingo_jax: the Flamingo visual language model in JAX and Haiku."""

__version__ = '0.1.0'
