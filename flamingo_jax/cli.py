"""Shared command-line plumbing: config-override errors that name the key."""

import re
import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with unknown `--config.a.b` keys named plainly.

  ml_collections reports an unknown override as a bare AttributeError
  deep in a traceback; this exits with one line naming the override.
  """
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    key = re.sub(r"^[\"']+|[\"']+$", '', str(e))
    overrides = [a.split('=')[0] for a in argv if a.startswith('--config.')]
    culprit = [o for o in overrides if o.split('.')[-1] == key]
    sys.exit(f'FATAL Flags parsing error: unknown config key '
             f'{(culprit or overrides or [key])[0]!r}: no field {key!r} in '
             'the config (check the spelling, or see the config file).')
  except flags.Error as e:
    sys.exit(f'FATAL Flags parsing error: {e}\nPass --helpshort or '
             '--helpfull to see help on flags.')
