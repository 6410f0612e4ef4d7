"""Every import inside flamingo_jax points down the layer order.

The rooms, lowest first (README "Layout", DESIGN "Layers"):

  base           fs, cli, checkpoint, checkpoint_integrity, checkpoint_parts:
                 files, flags, orbax; nothing of ours
  data           tokenizer, builders, formatting, pipeline, phi
  models         Haiku modules and the compute-dtype policy
  weights | training | inference
                 three siblings on models and data, none importing another
  evaluation     tasks, metrics, the few-shot runner (on inference)
  orchestration  the recipe, the ablation sweep, the report and plots, and
                 the entry points (the package root, api.py, the CLIs); the
                 only room that reads the configs in experiments/

A module may import its own room and any room below it, never a sibling or
a room above (imports inside functions count too). Run this file as a
script to print the graph's cross-room arrows, upward ones marked.
"""

import ast
import collections
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'flamingo_jax'

# The room of each name under flamingo_jax; top-level modules not named here
# (the CLIs, api.py) and the package root are orchestration.
ROOMS = {
    'fs': 'base',
    'cli': 'base',
    'checkpoint': 'base',
    'checkpoint_integrity': 'base',
    'checkpoint_parts': 'base',
    'data': 'data',
    'models': 'models',
    'weights': 'weights',
    'training': 'training',
    'inference': 'inference',
    'evaluation': 'evaluation',
    'orchestration': 'orchestration',
}
TOP = 'orchestration'
# The rooms each room may import besides itself: the order above.
BELOW = {
    'base': set(),
    'data': {'base'},
    'models': {'data', 'base'},
    'weights': {'models', 'data', 'base'},
    'training': {'models', 'data', 'base'},
    'inference': {'models', 'data', 'base'},
    'evaluation': {'inference', 'models', 'data', 'base'},
    'orchestration': {'evaluation', 'weights', 'training', 'inference',
                      'models', 'data', 'base', 'experiments'},
}

# Upward arrows kept on purpose, each with its reason. Keep it empty.
ALLOWED = set()


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def room(module: str) -> str:
  parts = module.split('.')
  if parts[0] == 'experiments':
    return 'experiments'
  return ROOMS.get(parts[1], TOP) if len(parts) > 1 else TOP


def imports(path: pathlib.Path) -> set[str]:
  """The flamingo_jax (and experiments) modules `path` imports, at any depth
  in the file."""
  module = module_name(path)
  package = module if path.name == '__init__.py' else module.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split('.')[:len(package.split('.')) - node.level + 1]
        target = '.'.join(base + ([node.module] if node.module else []))
      else:
        target = node.module
      for alias in node.names:  # `from a import b`: b may be a module.
        child = PACKAGE.parent.joinpath(*f'{target}.{alias.name}'.split('.'))
        is_module = child.with_suffix('.py').exists() or child.is_dir()
        found.add(f'{target}.{alias.name}' if is_module else target)
  ours = ('flamingo_jax', 'experiments')
  return {m for m in found if m.split('.')[0] in ours}


def graph() -> dict[str, set[str]]:
  return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob('*.py'))}


def is_upward(source: str, target: str) -> bool:
  """Whether `source` importing `target` points up (or sideways)."""
  return room(target) not in BELOW[room(source)] | {room(source)}


def upward_arrows() -> list[tuple[str, str]]:
  return sorted((source, target)
                for source, targets in graph().items()
                for target in targets if is_upward(source, target))


def test_every_room_is_named():
  top_level = {p.stem if p.is_file() else p.name
               for p in PACKAGE.iterdir()
               if p.suffix == '.py' or (p / '__init__.py').exists()}
  packages = {p.name for p in PACKAGE.iterdir() if (p / '__init__.py').exists()}
  # A new subpackage must be placed in ROOMS, not fall to the top.
  assert packages <= set(ROOMS), sorted(packages - set(ROOMS))
  assert set(ROOMS) <= top_level, sorted(set(ROOMS) - top_level)


def test_the_graph_is_read():
  edges = graph()
  assert len(edges) > 100
  assert 'flamingo_jax.models.flamingo' in edges['flamingo_jax.training.loop']


def test_no_import_points_up():
  upward = set(upward_arrows())
  unexpected = sorted(upward - ALLOWED)
  assert not unexpected, 'Imports that point up the layers (see ' + (
      'tests/test_layering.py):\n' + '\n'.join(
          f'  {s} ({room(s)}) -> {t} ({room(t)})' for s, t in unexpected))
  stale = sorted(ALLOWED - upward)
  assert not stale, f'Gone: remove them from ALLOWED: {stale}'


def main() -> None:
  arrows = collections.Counter()
  for source, targets in graph().items():
    for target in targets:
      if room(source) != room(target):
        arrows[room(source), room(target), is_upward(source, target)] += 1
  for (source, target, up), count in sorted(arrows.items()):
    print(f'{source:>13} -> {target:<13} {count:3d}{"  UP" if up else ""}')
  print('Upward imports:')
  for source, target in upward_arrows():
    print(f'  {source} -> {target}' +
          ('  (allowed)' if (source, target) in ALLOWED else ''))


if __name__ == '__main__':
  sys.exit(main())
