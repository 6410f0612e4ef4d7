"""Rule tables: a checkpoint's tensors -> our parameter tree, exactly once.

An importer describes its source as a list of `Rule`s: a regex over source
tensor names, the `module/param` path(s) each match fills, and a transform
(transposes, splits of fused projections). `map_tensors` applies them:

1. Plan, from the store's headers only (nothing read): every tensor must
   match exactly one rule or one `ignore` pattern (the parts of the file the
   model does not use, declared by the importer, e.g. CLIP's text tower);
   every output must be a parameter of the model with the transformed shape;
   every parameter (every layer row of a stacked one) must be filled exactly
   once. All problems are collected and raised together as a
   `CheckpointMismatchError` naming the tensors and both shapes, before a
   byte is read.
2. Copy, in the store's order (one shard at a time, each released when
   done): read, transform, cast, write into the preallocated output.

Stacked parameters (`hk.layer_stack`, leading [depth] axis): a rule whose
regex has a `layer` group fills row `int(layer)` of its target.

`map_tensors(..., lazy=True)` plans the same way (every problem raised
before a byte is read) but copies nothing yet: each parameter is a
`LazyArray`, filled from its tensors (across the shards, each tensor a
memory map of its own) when `materialize()` is called, together with the
parameters that share its tensors (a fused q/k/v projection), so that a
caller writing one parameter at a time (the converter) never holds the
whole model.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
import re
from typing import Any, Optional, Union

import numpy as np

from flamingo_jax.weights import tensors as tensors_lib

Params = dict[str, dict[str, np.ndarray]]
Transform = Callable[[np.ndarray], Union[np.ndarray, tuple[np.ndarray, ...]]]

_MAX_LISTED = 20  # Problems listed in one error message.


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model config (see the message)."""


def identity(x: np.ndarray) -> np.ndarray:
  return x


def transpose(x: np.ndarray) -> np.ndarray:
  """torch Linear [out, in] -> hk.Linear [in, out]."""
  return x.T


def conv_kernel(x: np.ndarray) -> np.ndarray:
  """torch conv [O, I/g, kh, kw] -> Haiku/lax HWIO [kh, kw, I/g, O]."""
  return x.transpose(2, 3, 1, 0)


def split_rows(parts: int, then: Transform = identity) -> Transform:
  """A fused [parts * n, ...] tensor -> `parts` tensors (each `then`-ed)."""
  def split(x: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(then(p) for p in np.split(x, parts, axis=0))
  return split


@dataclasses.dataclass(frozen=True)
class Rule:
  """Tensors whose name fullmatches `source` fill `targets`.

  `targets` are 'module/param' paths, formatted with the match's named
  groups; `transform` maps the tensor to one array per target.
  """
  source: str
  targets: Union[str, tuple[str, ...]]
  transform: Transform = identity

  def target_paths(self, match: re.Match) -> tuple[str, ...]:
    targets = ((self.targets,) if isinstance(self.targets, str)
               else self.targets)
    return tuple(t.format(**match.groupdict()) for t in targets)


@dataclasses.dataclass
class _Step:
  name: str
  rule: Rule
  targets: tuple[str, ...]
  layer: Optional[int]


class _Group:
  """Parameters filled by the same tensors, and those tensors' steps."""

  def __init__(self, store, steps: list[_Step],
               shapes: Mapping[str, tuple[int, ...]], dtype: Any):
    self._store, self._steps = store, steps
    self._shapes, self._dtype = shapes, dtype
    self._filled: Optional[dict[str, np.ndarray]] = None

  def take(self, path: str) -> np.ndarray:
    if self._filled is None:
      self._filled = {t: np.empty(self._shapes[t], self._dtype)
                      for t in self._shapes}
      _copy(self._store, self._steps, self._filled, release=False)
    return self._filled.pop(path)  # Each parameter is taken once.


class LazyArray:
  """A parameter that `map_tensors(lazy=True)` fills when asked."""

  def __init__(self, group: _Group, path: str, shape: tuple[int, ...],
               dtype: Any):
    self._group, self._path = group, path
    self.shape, self.dtype = shape, np.dtype(dtype)
    self.nbytes = int(np.prod(shape)) * self.dtype.itemsize

  def materialize(self) -> np.ndarray:
    """The filled array (once: the group lets go of it)."""
    return self._group.take(self._path)


def _lazy(store, steps: list[_Step], shapes: Mapping[str, tuple[int, ...]],
          dtype: Any) -> dict[str, LazyArray]:
  """One LazyArray per parameter, grouped by shared tensors."""
  owner = {path: path for path in shapes}  # Union-find over the targets.

  def find(path):
    while owner[path] != path:
      owner[path] = owner[owner[path]]
      path = owner[path]
    return path

  for step in steps:
    for target in step.targets[1:]:
      owner[find(target)] = find(step.targets[0])
  members: dict[str, list[str]] = {}
  for path in shapes:
    members.setdefault(find(path), []).append(path)
  group_steps: dict[str, list[_Step]] = {}
  for step in steps:
    group_steps.setdefault(find(step.targets[0]), []).append(step)
  lazy = {}
  for root, paths in members.items():
    group = _Group(store, group_steps.get(root, []),
                   {p: shapes[p] for p in paths}, dtype)
    lazy.update({p: LazyArray(group, p, shapes[p], dtype) for p in paths})
  return lazy


def _split_path(path: str) -> tuple[str, str]:
  module, _, name = path.rpartition('/')
  return module, name


def abstract_shapes(abstract: Mapping[str, Mapping[str, Any]]
                    ) -> dict[str, tuple[int, ...]]:
  """{'module/param': shape} of a Haiku parameter tree (arrays or structs)."""
  return {f'{m}/{n}': tuple(x.shape) for m, leaves in abstract.items()
          for n, x in leaves.items()}


def map_tensors(
    store: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    abstract: Mapping[str, Mapping[str, Any]],
    *,
    ignore: Iterable[str] = (),
    dtype: Any = np.float32,
    what: str = 'checkpoint',
    lazy: bool = False,
) -> Params:
  """Fills a parameter tree shaped like `abstract` from `store`.

  Args:
    store: the tensors (a TensorStore, or any name -> array mapping).
    rules: the importer's table.
    abstract: the model's parameters (ShapeDtypeStructs or arrays), e.g.
      `jax.eval_shape(transformed.init, ...)`.
    ignore: regexes (fullmatch) of tensors the model deliberately leaves
      unused.
    dtype: the dtype of every output array.
    what: names the checkpoint and its family in messages.
    lazy: return `LazyArray`s, filled on `materialize()` (see the module
      docstring); `store` must stay open until then.

  Returns:
    {module: {param: np.ndarray}}, every parameter of `abstract` filled
    (or a LazyArray).

  Raises:
    CheckpointMismatchError: see the module docstring.
  """
  if not isinstance(store, tensors_lib.TensorStore):
    store = tensors_lib.from_arrays(store)
  shapes = abstract_shapes(abstract)
  steps, problems = _plan(store, rules, shapes,
                          [re.compile(p) for p in ignore])
  if problems:
    raise CheckpointMismatchError(_report(what, store, problems))
  if lazy:
    outputs = _lazy(store, steps, shapes, dtype)
  else:
    outputs = {path: np.empty(shape, dtype) for path, shape in shapes.items()}
    _copy(store, steps, outputs)
  params: Params = {}
  for path, array in outputs.items():
    module, name = _split_path(path)
    params.setdefault(module, {})[name] = array
  return params


def _matching_rule(name: str, compiled: Sequence[tuple[re.Pattern, Rule]]
                   ) -> tuple[Optional[Rule], Optional[re.Match], list[Rule]]:
  found = [(r, m) for p, r in compiled if (m := p.fullmatch(name))]
  if not found:
    return None, None, []
  return found[0][0], found[0][1], [r for r, _ in found]


def _plan(store: tensors_lib.TensorStore, rules: Sequence[Rule],
          shapes: Mapping[str, tuple[int, ...]],
          ignore: Sequence[re.Pattern]) -> tuple[list[_Step], list[str]]:
  compiled = [(re.compile(r.source), r) for r in rules]
  steps, problems = [], []
  fills: dict[tuple[str, Optional[int]], list[str]] = {}
  for name in store:
    info = store.info(name)
    rule, match, all_rules = _matching_rule(name, compiled)
    if rule is None:
      if not any(p.fullmatch(name) for p in ignore):
        problems.append(f'tensor {name} {info.shape}: no parameter of the '
                        'model takes it (extra tensor, or another family).')
      continue
    if len(all_rules) > 1:
      problems.append(f'tensor {name} matches {len(all_rules)} rules '
                      f'({[r.source for r in all_rules]}): an importer bug.')
      continue
    layer = match.groupdict().get('layer')
    layer = None if layer is None else int(layer)
    targets = rule.target_paths(match)
    outs = rule.transform(np.broadcast_to(np.zeros((), info.dtype),
                                          info.shape))
    outs = outs if isinstance(outs, tuple) else (outs,)
    ok = True
    for target, out in zip(targets, outs, strict=True):
      if target not in shapes:
        problems.append(f'tensor {name} {info.shape} maps to {target}, which '
                        'this model config does not have.')
        ok = False
        continue
      want = shapes[target]
      if layer is not None:
        if not want or layer >= want[0]:
          problems.append(f'tensor {name} is layer {layer} but {target} '
                          f'{want} has {want[0] if want else 0} layers.')
          ok = False
          continue
        want = want[1:]
      if tuple(out.shape) != tuple(want):
        problems.append(f'tensor {name} has shape {info.shape} (-> '
                        f'{tuple(out.shape)}) but {target} needs '
                        f'{tuple(want)}' +
                        (' per layer' if layer is not None else '') + '.')
        ok = False
        continue
      fills.setdefault((target, layer), []).append(name)
    if ok:
      steps.append(_Step(name, rule, targets, layer))
  problems.extend(_fill_problems(shapes, fills))
  return steps, problems


def _fill_problems(shapes: Mapping[str, tuple[int, ...]],
                   fills: Mapping[tuple[str, Optional[int]], list[str]]
                   ) -> list[str]:
  problems = []
  layered = {t for t, layer in fills if layer is not None}
  for path, shape in shapes.items():
    if path in layered:
      rows = {layer: fills[(path, layer)] for t, layer in fills if t == path}
      missing = [i for i in range(shape[0]) if i not in rows]
      if missing:
        problems.append(f'parameter {path} {shape}: no tensor fills layers '
                        f'{missing}.')
      keys = [(path, i) for i in rows]
    else:
      keys = [(path, None)]
      if (path, None) not in fills:
        problems.append(f'parameter {path} {shape}: no tensor fills it '
                        '(missing tensor, or another family).')
    for key in keys:
      sources = fills.get(key, [])
      if len(sources) > 1:
        where = f' layer {key[1]}' if key[1] is not None else ''
        problems.append(f'parameter {path}{where} is filled by '
                        f'{len(sources)} tensors: {sources}.')
  return problems


def _report(what: str, store: tensors_lib.TensorStore,
            problems: list[str]) -> str:
  listed = '\n  '.join(problems[:_MAX_LISTED])
  more = (f'\n  ... and {len(problems) - _MAX_LISTED} more.'
          if len(problems) > _MAX_LISTED else '')
  return (f'{store.source} does not fit the model config as a {what} '
          f'({len(problems)} problems; nothing was written):\n  '
          f'{listed}{more}')


def _copy(store: tensors_lib.TensorStore, steps: list[_Step],
          outputs: dict[str, np.ndarray], release: bool = True) -> None:
  """Reads, transforms and writes each tensor; one group open at a time
  (`release`: each group released when done)."""
  current = None
  for step in steps:
    group = store.info(step.name).group
    if current is not None and group != current and release:
      store.release(current)
    current = group
    outs = step.rule.transform(store[step.name])
    outs = outs if isinstance(outs, tuple) else (outs,)
    for target, out in zip(step.targets, outs):
      if step.layer is None:
        outputs[target][...] = out
      else:
        outputs[target][step.layer] = out
  if current is not None and release:
    store.release(current)
