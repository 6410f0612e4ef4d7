"""Shared command-line plumbing: config-override errors that name the key."""

from collections.abc import Callable
import dataclasses
import re
import sys
from typing import Any

from absl import flags
from ml_collections.config_flags import config_path


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with unknown `--config.a.b` keys named plainly.

  ml_collections reports an unknown override as a bare AttributeError
  deep in a traceback; this exits with one line naming each override whose
  path is not in the config, and where along that path it goes wrong.

  Args:
    argv: the command line, program name first.

  Returns:
    The arguments left over after flag parsing.
  """
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, IndexError) as e:
    problems = _unknown_overrides(argv)
    if not problems:
      sys.exit(f'FATAL Flags parsing error: {type(e).__name__}: {e}')
    sys.exit('FATAL Flags parsing error: ' + '; '.join(
        f'unknown config key {arg!r}: {why}' for arg, why in problems) +
             ' (check the spelling, or see the config file).')
  except flags.Error as e:
    sys.exit(f'FATAL Flags parsing error: {e}\nPass --helpshort or '
             '--helpfull to see help on flags.')


def parse_flags_with_default_config(
    default: str) -> Callable[[list[str]], list[str]]:
  """`parse_flags` for a CLI whose `--config` has a default file.

  The default goes onto the command line (when it names no `--config`)
  instead of into `DEFINE_config_file`: ml_collections applies a default's
  overrides while the flag is defined, at import, where an unknown
  `--config.x` would end in a bare traceback before `parse_flags` runs.

  Args:
    default: the config file used when the command line names none.

  Returns:
    A `flags_parser` for `absl.app.run`.
  """

  def parse(argv: list[str]) -> list[str]:
    named = any(re.match(r'^--?config(=|$)', arg) for arg in argv[1:])
    return parse_flags(argv if named else [argv[0], f'--config={default}',
                                           *argv[1:]])

  return parse


def _unknown_overrides(argv: list[str]) -> list[tuple[str, str]]:
  """Each `--<config flag>.path` override whose path the config lacks.

  Args:
    argv: the command line, program name first.

  Returns:
    (override as written, what is missing) pairs, in command-line order.
  """
  argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
  problems = []
  for name in _config_flag_names():
    config = _load_config(name, argv)
    if config is None:
      continue
    pattern = re.compile(rf'^--?(?:no)?{re.escape(name)}\.([^=]+)')
    for arg in argv[1:]:
      match = pattern.match(arg)
      if match:
        why = _missing_part(config, name, match.group(1))
        if why:
          problems.append((arg.split('=', 1)[0], why))
  return problems


def _config_flag_names() -> list[str]:
  """Names of the defined ml_collections config flags (e.g. 'config')."""
  return [name for name in flags.FLAGS
          if flags.FLAGS[name].flag_type() == 'config object']


def _load_config(name: str, argv: list[str]) -> Any:
  """The config that flag `name` holds for `argv`, loaded again; or None."""
  flag = flags.FLAGS[name]
  source = None
  for i, arg in enumerate(argv[1:], 1):
    match = re.match(rf'^--?{re.escape(name)}(=(.*))?$', arg)
    if match:
      source = (match.group(2) if match.group(1)
                else argv[i + 1] if i + 1 < len(argv) else None)
  if source is None:
    return flag.default if hasattr(flag.default, 'keys') else None
  try:
    return flag.parser.parse(source)
  except Exception:  # pylint: disable=broad-except
    return None  # Its own error is reported instead.


def _missing_part(config: Any, name: str, path: str) -> str | None:
  """Why `path` is not a field of `config`, or None when it is one."""
  try:
    parts = config_path.split(path)
  except ValueError:
    return f'{path!r} is not a config path'
  node, walked = config, name
  for part in parts:
    if hasattr(node, 'keys'):  # A ConfigDict or dict: its keys, not methods.
      if part not in node:
        return f'{walked} has no field {part!r}'
      node = node[part]
    elif isinstance(part, int) and isinstance(node, (list, tuple)):
      if not -len(node) <= part < len(node):
        return f'{walked} has {len(node)} entries, no [{part}]'
      node = node[part]
    elif isinstance(part, str) and dataclasses.is_dataclass(node):
      if not hasattr(node, part):
        return f'{walked} has no field {part!r}'
      node = getattr(node, part)
    else:
      return (f'{walked} is a value ({type(node).__name__}), not a section '
              f'with a field {part!r}')
    walked += f'.{part}' if isinstance(part, str) else f'[{part!r}]'
  return None


def format_duration(seconds: float) -> str:
  """`1h05m` or `4m07s`: durations in progress and ETA lines."""
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'
