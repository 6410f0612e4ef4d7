"""Image classification from ImageNet-style class folders: `image_folder`.

  source/train/n01440764/n01440764_10026.JPEG
  source/val/n01440764/ILSVRC2012_val_00000293.JPEG
  ...

`splits` maps our splits to subdirectories of `source` (default: support =
train, query = val; '.' is `source` itself). Each subdirectory of a split
is a class. The labels (a `tfds.features.ClassLabel` over the folder names)
are those of every split together, sorted, so a label means the same class
in every split (ImageNet's usual order for synset folders). `label_name` is
the class's name for prompts, from `class_names`, a file of either kind:
- one name per class, in label order: a text file of one name a line, or a
  JSON list. For ImageNet, a clean list of 1000 names ('tench', 'goldfish',
  'great white shark', ...; e.g. the one CLIP's and OpenFlamingo's ImageNet
  evaluations use), which is what the model should be asked to say;
- a mapping: a JSON {folder: name} object, or a text file of 'FOLDER NAME'
  lines (ImageNet's LOC_synset_mapping.txt: 'n01440764 tench, Tinca tinca'
  -> 'tench, Tinca tinca': WordNet synonym strings, logged as such).
A text file is a mapping when a line starts with a class folder's name.
Without `class_names`, the folder name with '_' read as ' '. The names in
label order are also stored in the metadata ('label_names'). Classes that
share a name are logged: a prompt cannot tell them apart.

Features as the world's classification: image, label, label_name.

Bad input: on_error='raise' (the default) stops at a corrupt image, naming
it; 'skip' counts it. A class missing from `class_names`, or a split
directory that does not exist, is always an error.
"""

import collections
import dataclasses
import json
import os

from absl import logging

import tensorflow as tf
import tensorflow_datasets as tfds

from flamingo_jax.data.formats import common
from flamingo_jax.data.formats import files


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(common.FormatConfig):
  """Class-folder options.

  Attributes:
    splits: {our split: subdirectory of source}.
    class_names: a file of class names: one a line (or a JSON list), in
      label order, or a JSON {folder: name} / 'FOLDER NAME' text file.
  """
  on_error: str = 'raise'
  splits: dict[str, str] = dataclasses.field(default_factory=lambda: {
      'support': 'train', 'query': 'val'})
  class_names: str | None = None


def read_class_names(path: str) -> dict[str, str]:
  """{folder: name} from a JSON object or 'FOLDER NAME...' lines."""
  text = files.read_bytes(path).decode('utf-8')
  if path.endswith('.json'):
    names = json.loads(text)
    if not isinstance(names, dict):
      raise ValueError(f'{path}: expected a JSON object {{folder: name}}.')
    return {str(k): str(v) for k, v in names.items()}
  names = {}
  for line_number, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      parts = line.strip().split(maxsplit=1)
      if len(parts) != 2:
        raise ValueError(f'{path}:{line_number}: expected "FOLDER NAME"; got '
                         f'{line!r}.')
      names[parts[0]] = parts[1].strip()
  return names


def class_names_in_order(path: str, folders: list[str]) -> list[str]:
  """The names of `folders` (in label order) from a `class_names` file.

  Args:
    path: a text file of one name a line or 'FOLDER NAME' lines, or a JSON
      list of names or {folder: name} object.
    folders: the class folders, sorted (label order).

  Returns:
    One name per folder.

  Raises:
    ValueError: a mapping without some folders, or a list of another length
      than the classes; both name the file.
  """
  text = files.read_bytes(path).decode('utf-8')
  if path.endswith('.json'):
    names = json.loads(text)
    mapping = None if isinstance(names, list) else read_class_names(path)
  else:
    names = [line.strip() for line in text.splitlines() if line.strip()]
    known = set(folders)
    mapping = (read_class_names(path) if names and all(
        len(name.split()) > 1 for name in names) and any(
            name.split()[0] in known for name in names) else None)
  if mapping is not None:
    missing = [f for f in folders if f not in mapping]
    if missing:
      more = ' ...' if len(missing) > 10 else ''
      raise ValueError(f'{path} has no name for the classes '
                       f'{missing[:10]}{more}.')
    names = [mapping[f] for f in folders]
    synonyms = sum(', ' in name for name in names)
    if synonyms:
      logging.warning('%s: %d of %d class names are lists of synonyms (e.g. '
                      '%r); a prompt names one class: give a clean list of '
                      'one name per class.', path, synonyms, len(names),
                      next(n for n in names if ', ' in n))
  elif len(names) != len(folders):
    raise ValueError(f'{path} lists {len(names)} class names (one a line, in '
                     f'label order) but there are {len(folders)} class '
                     f'folders; or write "FOLDER NAME" lines.')
  names = [str(name) for name in names]
  shared = sorted(n for n, c in collections.Counter(names).items() if c > 1)
  if shared:
    logging.warning('%s: classes share the names %s.', path, shared[:10])
  return names


class ImageFolder(common.FormatBuilder):
  """Classification images in one folder per class (ImageNet-like)."""

  name = 'image_folder'
  CONFIG_CLASS = ImageFolderConfig
  DESCRIPTION = 'Image classification from class folders (ImageNet-like).'

  def _split_dirs(self) -> dict[str, str]:
    config = self.builder_config
    source = str(config.source)
    dirs = {split: source if sub in ('', '.') else os.path.join(source, sub)
            for split, sub in config.splits.items()}
    for split, directory in dirs.items():
      if not files.isdir(directory):
        raise FileNotFoundError(f'The directory of split {split!r}, '
                                f'{directory}, does not exist.')
    return dirs

  def _classes(self, directory: str) -> list[str]:
    return sorted(n.rstrip('/') for n in tf.io.gfile.listdir(directory)
                  if files.isdir(os.path.join(directory, n.rstrip('/'))))

  def classes(self) -> tuple[list[str], list[str]]:
    """(folder names, label names), in label order."""
    if not hasattr(self, '_class_cache'):
      folders = sorted({c for d in self._split_dirs().values()
                        for c in self._classes(d)})
      if not folders:
        raise FileNotFoundError(f'No class folders under '
                                f'{self.builder_config.source}.')
      names_path = self.builder_config.class_names
      if names_path:
        names = class_names_in_order(names_path, folders)
      else:
        names = [f.replace('_', ' ') for f in folders]
      self._class_cache = (folders, names)
    return self._class_cache

  def features(self):
    return {'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=self.classes()[0]),
            'label_name': tfds.features.Text()}

  def metadata(self):
    return {'label_names': self.classes()[1]}

  def split_records(self):
    return {split: self._records(directory)
            for split, directory in self._split_dirs().items()}

  def _records(self, directory):
    folders, names = self.classes()
    label_of = {folder: label for label, folder in enumerate(folders)}
    for folder in self._classes(directory):
      class_dir = os.path.join(directory, folder)
      for name in sorted(tf.io.gfile.listdir(class_dir)):
        if name.lower().endswith(common.IMAGE_EXTENSIONS):
          label = label_of[folder]
          yield os.path.join(class_dir, name), label, names[label]

  def make_example(self, record):
    path, label, label_name = record
    image = common.load_image_file(path, self.builder_config.max_image_size)
    return path, {'image': image, 'label': label, 'label_name': label_name}
