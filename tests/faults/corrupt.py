"""Ways a checkpoint step gets damaged on disk (for the tests).

Each takes a step's directory (`W/checkpoints/<step>`) and damages it the
way a full disk, a bad copy or a stray `rm` would.
"""

import os
import pathlib


def data_files(step_dir: os.PathLike) -> list[pathlib.Path]:
  """The files that hold the state's arrays, largest first (orbax's OCDBT
  layout: state/ocdbt.process_<i>/d/<hash>, which a save may merge into
  state/d/<hash>; the largest file holds the largest array)."""
  state = pathlib.Path(step_dir, 'state')
  files = list(state.glob('d/*')) + list(state.glob('ocdbt.process_*/d/*'))
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def truncate(step_dir: os.PathLike) -> None:
  """Cuts every data file to half its length (a copy cut short)."""
  for path in data_files(step_dir):
    with open(path, 'r+b') as f:
      f.truncate(path.stat().st_size // 2)


def flip_byte(path: os.PathLike, offset: int) -> None:
  """Flips one bit of the byte at `offset` of the file `path`."""
  path = pathlib.Path(path)
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x10
  path.write_bytes(bytes(data))


def delete_metadata(step_dir: os.PathLike) -> None:
  """Deletes the state's metadata file (the arrays' tree and shapes)."""
  pathlib.Path(step_dir, 'state', '_METADATA').unlink()
