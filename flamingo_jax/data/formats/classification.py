"""Image classification from ImageNet-style class folders: `image_folder`.

  source/train/n01440764/n01440764_10026.JPEG
  source/val/n01440764/ILSVRC2012_val_00000293.JPEG
  ...

`splits` maps our splits to subdirectories of `source` (default: support =
train, query = val; '.' is `source` itself). Each subdirectory of a split
is a class. The labels (a `tfds.features.ClassLabel` over the folder names)
are those of every split together, sorted, so a label means the same class
in every split (ImageNet's usual order for synset folders). `label_name` is
the class's name for prompts: from `class_names`, a JSON {folder: name}
file or a text file of 'FOLDER NAME...' lines (ImageNet's
LOC_synset_mapping.txt: 'n01440764 tench, Tinca tinca' -> 'tench, Tinca
tinca'); without it, the folder name with '_' read as ' '. The names in
label order are also stored in the metadata ('label_names').

Features as the world's classification: image, label, label_name.

Bad input: on_error='raise' (the default) stops at a corrupt image, naming
it; 'skip' counts it. A class missing from `class_names`, or a split
directory that does not exist, is always an error.
"""

import dataclasses
import json
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from flamingo_jax.data.formats import common
from flamingo_jax.data.formats import files


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(common.FormatConfig):
  """Class-folder options.

  Attributes:
    splits: {our split: subdirectory of source}.
    class_names: a JSON or 'FOLDER NAME' text file of class names.
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
      mapping_path = self.builder_config.class_names
      if mapping_path:
        mapping = read_class_names(mapping_path)
        missing = [f for f in folders if f not in mapping]
        if missing:
          more = ' ...' if len(missing) > 10 else ''
          raise ValueError(f'{mapping_path} has no name for the classes '
                           f'{missing[:10]}{more}.')
        names = [mapping[f] for f in folders]
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
