"""flamingo_jax: the Flamingo visual language model in JAX and Haiku.

`flamingo_jax.load(workdir)` returns a trained `Model` (see
`flamingo_jax.api`); it is imported on first use, so `import flamingo_jax`
stays light.
"""

from typing import Any

__version__ = '0.1.0'
__all__ = ['load', 'Model']

_API = ('load', 'Model')


def __getattr__(name: str) -> Any:
  if name in _API:
    from flamingo_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(list(globals()) + list(_API))
