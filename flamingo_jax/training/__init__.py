"""Training: freezing and the optimizer, sharding, the loop.

Which parameters train (`optim`) and where they live (`sharding`); the dtypes
they are stored and computed in are `flamingo_jax.models.precision`'s, shared
with inference. Freezing, weight decay and sharding are all declared as
ordered `[(regex, value)]` rules over parameter path strings such as
'lm/blocks/block/ffw/hidden/w' (Haiku's 'module/param', see
`flamingo_jax/models/flamingo.py`). The two helpers here are the one place
that turns a tree path into that string and picks a rule, so every rule list
in a config reads the same way:

  * a pattern must match the WHOLE path (`re.fullmatch`): 'lm/.*' does not
    catch 'vision_encoder/lm/...', and 'gated_xattn' alone matches nothing;
  * the first matching rule wins, so specific rules go before general ones.
"""

from collections.abc import Sequence
import functools
import re
from typing import Any, Optional

import jax

Rules = Sequence[tuple[str, Any]]  # [(regex, value)], first match wins.


def path_str(path: jax.tree_util.KeyPath) -> str:
  """'lm/blocks/block/w' for the tree path of a leaf of a Haiku param dict."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
  return re.compile(pattern)


def match_rule(path: str, rules: Rules) -> Optional[int]:
  """Index of the first rule whose regex matches all of `path`, else None."""
  for index, (pattern, _) in enumerate(rules):
    if _compile(pattern).fullmatch(path):
      return index
  return None
