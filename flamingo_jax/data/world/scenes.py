"""Scenes of the embedded world: sampling objects on a grid and rendering them.

A scene is a few flat objects on a 3x3 grid over a neutral background. Each
object has a *kind* -- (shape, colour, size, texture) -- and sits in one grid
cell, jittered inside it, so objects never overlap and each has exactly one
named region. Objects of the same kind form a group ("two red squares").

Everything is a pure function of a `np.random.Generator`; `example_rng` derives
the generator of example `index` of a split from names, never from the order
of generation, so examples are independent and a builder can shard them.
Given the same numpy and Pillow versions, the same seed gives byte-identical
pixels.

Rendering draws at `supersample_factor` times the output size and
box-filters down (anti-aliasing). There is no pixel noise: it would make the
PNGs six times larger for little gain. Textures are phase-locked to
the object's `anchor` point, which is always on the object's body and in its
base colour: the pixel at `anchor_pixel(obj, size)` has the object's named
colour up to jitter (what the rendering tests check).

Glossary of shapes:
  H, W: image height and width (equal: `size`).
  S: the supersampled canvas size, `size * supersample`.
"""

from collections.abc import Sequence
import dataclasses
import math
import zlib

import numpy as np
from PIL import Image
from PIL import ImageDraw

# The default seed of the whole world; every example's seed derives from it.
WORLD_SEED = 20220429

SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'ring', 'diamond',
          'hexagon')
# Named colours, chosen far apart in RGB and away from the grey backgrounds.
COLOURS = {
    'red': (220, 38, 38),
    'orange': (245, 135, 20),
    'yellow': (235, 215, 30),
    'green': (40, 165, 65),
    'blue': (40, 90, 225),
    'purple': (140, 60, 195),
    'pink': (245, 125, 190),
    'brown': (125, 78, 40),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ('small', 'large')
TEXTURES = ('plain', 'striped', 'dotted')
ATTRIBUTES = ('shape', 'colour', 'size', 'texture')
VALUES = {'shape': SHAPES, 'colour': COLOUR_NAMES, 'size': SIZES,
          'texture': TEXTURES}

GRID = 3  # The scene is a GRID x GRID grid of cells, one object per cell.
# Region names of the cells, indexed [row][col]; row 0 is the top.
REGIONS = (('top left', 'top', 'top right'),
           ('left', 'centre', 'right'),
           ('bottom left', 'bottom', 'bottom right'))
REGION_NAMES = tuple(name for row in REGIONS for name in row)
# Radius of an object's circumscribed circle, as a fraction of the image side;
# a large object (diameter 0.29) still fits in a cell (side 1/3).
RADIUS = {'small': 0.085, 'large': 0.145}
MAX_JITTER = 0.06  # Max centre offset from the cell centre (image fraction).
MAX_ROTATION = 12.0  # Degrees; more would turn squares into diamonds.
COLOUR_JITTER = 12  # Max per-channel offset of an object's RGB.
PATTERN_DARKEN = 0.5  # Stripes and dots are the base colour times this.
STRIPE_BASE_FRACTION = 2 / 3  # Share of each stripe period in base colour.
DOT_RADIUS = 0.22  # Dot radius, as a fraction of the dot spacing.
MIN_PATTERN_PIXELS = 5.0  # Pattern period floor, in output pixels.
BACKGROUND_LEVELS = {'light': (165, 235), 'dark': (25, 75)}
BACKGROUND_TINT = 8  # Max per-channel tint of the grey background.
MAX_GRADIENT = 30.0  # Max background brightness change across the image.
DEFAULT_IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Obj:
  """One object: its kind, where it is and how it is drawn."""
  shape: str
  colour: str
  size: str  # 'small' or 'large'.
  texture: str
  x: float  # Centre, as a fraction of the image width (0 = left).
  y: float  # Centre, as a fraction of the image height (0 = top).
  rotation: float = 0.0  # Degrees, counter-clockwise.
  rgb: tuple[int, int, int] | None = None  # Jittered colour; None = named.
  pattern_angle: float = 0.0  # Direction of the stripes, degrees.

  @property
  def kind(self) -> tuple[str, str, str, str]:
    return (self.shape, self.colour, self.size, self.texture)

  @property
  def cell(self) -> tuple[int, int]:
    """(row, col) of the grid cell that holds the centre."""
    return (_to_cell_index(self.y), _to_cell_index(self.x))

  @property
  def region(self) -> str:
    row, col = self.cell
    return REGIONS[row][col]

  @property
  def radius(self) -> float:
    return RADIUS[self.size]

  @property
  def fill_rgb(self) -> tuple[int, int, int]:
    return self.rgb if self.rgb is not None else COLOURS[self.colour]

  @property
  def anchor(self) -> tuple[float, float]:
    """A point on the body of the object, in base colour (image fractions).

    The centre, except for rings (whose centre is a hole): the middle of the
    band, along the stripes so that the stripe phase there is unchanged.
    """
    if self.shape != 'ring':
      return (self.x, self.y)
    angle = math.radians(self.pattern_angle)
    offset = 0.775 * self.radius  # Middle of the band [0.55 r, r].
    return (self.x - offset * math.sin(angle),
            self.y + offset * math.cos(angle))

  def replace(self, **changes) -> 'Obj':
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Background:
  """A grey (slightly tinted) background with a linear brightness gradient."""
  tone: str  # 'light' or 'dark'.
  rgb: tuple[int, int, int]
  gradient_angle: float  # Degrees.
  gradient: float  # Brightness difference across the image, 8-bit levels.


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects over a background."""
  objects: tuple[Obj, ...]
  background: Background

  def groups(self) -> list[tuple[tuple[str, str, str, str], list[Obj]]]:
    """Objects grouped by kind, in order of first appearance."""
    groups: dict[tuple[str, str, str, str], list[Obj]] = {}
    for obj in self.objects:
      groups.setdefault(obj.kind, []).append(obj)
    return list(groups.items())


def example_rng(dataset: str, split: str, index: int, *parts: int,
                seed: int = WORLD_SEED) -> np.random.Generator:
  """The generator of example `index` of `dataset`/`split`.

  Derived from the names (by CRC32, stable across processes, unlike
  `hash`) and the index, so it does not depend on generation order.

  Args:
    dataset: dataset name, e.g. 'world_pairs'.
    split: split name, e.g. 'train'.
    index: example index within the split, >= 0.
    *parts: further non-negative integers (e.g. a question number).
    seed: the world seed.

  Returns:
    A fresh `np.random.Generator`.
  """
  if index < 0 or any(p < 0 for p in parts):
    raise ValueError(f'index and parts must be >= 0; got {index}, {parts}.')
  entropy = [seed, zlib.crc32(dataset.encode()), zlib.crc32(split.encode()),
             index, *parts]
  return np.random.default_rng(np.random.SeedSequence(entropy))


def _to_cell_index(fraction: float) -> int:
  return min(GRID - 1, max(0, int(fraction * GRID)))


def cell_centre(cell: tuple[int, int]) -> tuple[float, float]:
  """(x, y) of the centre of grid cell (row, col), as image fractions."""
  row, col = cell
  return ((col + 0.5) / GRID, (row + 0.5) / GRID)


def nearest_colour(rgb: Sequence[float]) -> str:
  """The named colour nearest to `rgb` (Euclidean in RGB)."""
  names = list(COLOURS)
  table = np.array([COLOURS[n] for n in names], dtype=np.float64)  # [8, 3]
  distances = np.sum((table - np.asarray(rgb, np.float64)) ** 2, axis=1)
  return names[int(np.argmin(distances))]


# ---------------------------------------------------------------- sampling --


def _choice(rng: np.random.Generator, options: Sequence, p=None):
  return options[int(rng.choice(len(options), p=p))]


def sample_kind(rng: np.random.Generator,
                fixed: dict[str, str] | None = None) -> tuple[str, ...]:
  """A random (shape, colour, size, texture); `fixed` pins some attributes."""
  fixed = fixed or {}
  return tuple(fixed[a] if a in fixed else _choice(rng, VALUES[a])
               for a in ATTRIBUTES)


def place_object(rng: np.random.Generator, kind: Sequence[str],
                 cell: tuple[int, int]) -> Obj:
  """An object of `kind` jittered inside `cell`, its colour jittered too."""
  shape, colour, size, texture = kind
  x, y = cell_centre(cell)
  # Keep the whole object (plus a margin) inside its cell.
  room = min(MAX_JITTER, 0.5 / GRID - RADIUS[size] - 0.005)
  dx, dy = rng.uniform(-room, room, size=2)
  jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
  rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter,
                                      0, 255))
  return Obj(shape=shape, colour=colour, size=size, texture=texture,
             x=float(x + dx), y=float(y + dy),
             rotation=float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)),
             rgb=rgb, pattern_angle=float(_choice(rng, (0., 45., 90., 135.))))


def sample_background(rng: np.random.Generator) -> Background:
  tone = 'light' if rng.random() < 0.7 else 'dark'
  low, high = BACKGROUND_LEVELS[tone]
  level = rng.integers(low, high + 1)
  tint = rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=3)
  rgb = tuple(int(v) for v in np.clip(level + tint, 0, 255))
  return Background(tone=tone, rgb=rgb,
                    gradient_angle=float(rng.uniform(0, 360)),
                    gradient=float(rng.uniform(0, MAX_GRADIENT)))


def sample_counts(rng: np.random.Generator, num_kinds: int,
                  max_objects: int) -> list[int]:
  """How many objects of each kind: mostly 1, sometimes up to 4."""
  counts = list(rng.choice([1, 2, 3, 4], size=num_kinds,
                           p=[0.5, 0.25, 0.15, 0.1]))
  while sum(counts) > max_objects:
    counts[int(np.argmax(counts))] -= 1
  return [int(c) for c in counts]


def sample_kinds(rng: np.random.Generator, num_kinds: int,
                 require: dict[str, str] | None = None) -> list[tuple]:
  """Distinct kinds; half of them differ from an earlier one by a single
  attribute, so that a caption has to name that attribute."""
  kinds = [sample_kind(rng, require)]
  while len(kinds) < num_kinds:
    if rng.random() < 0.5:
      base = list(kinds[int(rng.integers(len(kinds)))])
      attr = int(rng.integers(len(ATTRIBUTES)))
      base[attr] = _choice(rng, VALUES[ATTRIBUTES[attr]])
      kind = tuple(base)
    else:
      kind = sample_kind(rng)
    if kind not in kinds:
      kinds.append(kind)
  return kinds


def sample_scene(rng: np.random.Generator, *, max_objects: int = 6,
                 max_kinds: int = 3,
                 require: dict[str, str] | None = None) -> Scene:
  """A random scene of 1..max_objects objects of 1..max_kinds kinds.

  Args:
    rng: the example's generator.
    max_objects: at most this many objects (<= GRID * GRID).
    max_kinds: at most this many distinct kinds.
    require: attributes the first kind must have, e.g. {'colour': 'red'}.

  Returns:
    The scene.
  """
  if not 1 <= max_objects <= GRID * GRID:
    raise ValueError(f'max_objects must be in [1, {GRID * GRID}]; got '
                     f'{max_objects}.')
  if not 1 <= max_kinds <= max_objects:
    raise ValueError(f'max_kinds must be in [1, max_objects={max_objects}]; '
                     f'got {max_kinds}.')
  num_kinds = int(rng.integers(1, max_kinds + 1))
  kinds = sample_kinds(rng, num_kinds, require)
  counts = sample_counts(rng, num_kinds, max_objects)
  cells = [divmod(int(c), GRID) for c in rng.permutation(GRID * GRID)]
  objects = []
  for kind, count in zip(kinds, counts):
    for _ in range(count):
      objects.append(place_object(rng, kind, cells.pop()))
  return Scene(objects=tuple(objects), background=sample_background(rng))


def sample_focus_scene(rng: np.random.Generator, *,
                       max_distractors: int = 3) -> Scene:
  """One large object (the first) among 0..max_distractors small ones.

  The distractors never share both the large object's shape and colour, so
  '{colour} {shape}' of the first object names it unambiguously (the
  classification task's label).
  """
  shape, colour, _, texture = sample_kind(rng)
  cells = [divmod(int(c), GRID) for c in rng.permutation(GRID**2)]
  objects = [place_object(rng, (shape, colour, 'large', texture),
                          cells.pop())]
  for _ in range(int(rng.integers(0, max_distractors + 1))):
    kind = sample_kind(rng, {'size': 'small'})
    while kind[:2] == (shape, colour):
      kind = sample_kind(rng, {'size': 'small'})
    objects.append(place_object(rng, kind, cells.pop()))
  return Scene(tuple(objects), sample_background(rng))


# --------------------------------------------------------------- rendering --


def supersample_factor(size: int) -> int:
  """Anti-aliasing factor: 2x up to 128 px output, none above."""
  return 2 if size <= 128 else 1


def _polygon(shape: str, rotation: float) -> np.ndarray:  # [P, 2]
  """Vertices of a unit-radius polygon shape (image axes: y down)."""
  def ring_of(n, radius, phase):
    angles = np.radians(phase + rotation + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(angles), -radius * np.sin(angles)], -1)

  if shape == 'square':
    return ring_of(4, 0.95, 45)
  if shape == 'diamond':  # A rhombus, taller than wide.
    return ring_of(4, 1.0, 90) * np.array([0.7, 1.0])
  if shape == 'triangle':
    return ring_of(3, 1.0, 90) + np.array([0., 0.15])  # Centred visually.
  if shape == 'hexagon':
    return ring_of(6, 1.0, 0)
  if shape == 'star':
    outer, inner = ring_of(5, 1.0, 90), ring_of(5, 0.45, 126)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)
  if shape == 'cross':
    a, b = 0.32, 0.95  # Arm half-width, arm length.
    points = np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
                       (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)])
    theta = np.radians(rotation)
    rot = np.array([[np.cos(theta), np.sin(theta)],
                    [-np.sin(theta), np.cos(theta)]])
    return points @ rot
  raise ValueError(f'Unknown shape {shape!r}; expected one of {SHAPES}.')


def _shape_mask(obj: Obj, scale: float, origin: np.ndarray,
                box: int) -> Image.Image:
  """The object's silhouette in a `box` x `box` 'L' mask at `origin`."""
  mask = Image.new('L', (box, box), 0)
  draw = ImageDraw.Draw(mask)
  centre = np.array([obj.x, obj.y]) * scale - origin
  r = obj.radius * scale
  if obj.shape in ('circle', 'ring'):
    draw.ellipse([*(centre - r), *(centre + r)], fill=255)
    if obj.shape == 'ring':
      hole = 0.55 * r
      draw.ellipse([*(centre - hole), *(centre + hole)], fill=0)
  else:
    points = _polygon(obj.shape, obj.rotation) * r + centre
    draw.polygon([tuple(p) for p in points], fill=255)
  return mask


def _fill(obj: Obj, scale: float, origin: np.ndarray, box: int,
          output_size: int) -> np.ndarray:  # [box, box, 3] uint8
  """Base colour plus the texture, phase-locked to the anchor."""
  base = np.array(obj.fill_rgb, np.float64)
  fill = np.empty((box, box, 3), np.uint8)
  fill[...] = base.astype(np.uint8)
  if obj.texture == 'plain':
    return fill
  # Pattern period: proportional to the object, but never under a few output
  # pixels, so the texture survives down-sampling.
  period = max(0.6 * obj.radius, MIN_PATTERN_PIXELS / output_size) * scale
  ax, ay = np.array(obj.anchor) * scale - origin
  coords = np.arange(box) + 0.5
  xx, yy = coords[None, :] - ax, coords[:, None] - ay  # [1, box], [box, 1]
  if obj.texture == 'striped':
    angle = math.radians(obj.pattern_angle)
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period  # [box, box]
    pattern = np.mod(phase + STRIPE_BASE_FRACTION / 2, 1.0) >= (
        STRIPE_BASE_FRACTION)
  elif obj.texture == 'dotted':
    # Dot centres sit half a period off the anchor, so the anchor is in a gap.
    dx = np.mod(xx / period, 1.0) - 0.5
    dy = np.mod(yy / period, 1.0) - 0.5
    pattern = dx**2 + dy**2 < DOT_RADIUS**2  # [box, box]
  else:
    raise ValueError(f'Unknown texture {obj.texture!r}; expected one of '
                     f'{TEXTURES}.')
  fill[pattern] = (base * PATTERN_DARKEN).astype(np.uint8)
  return fill


def _background(background: Background, size: int) -> np.ndarray:
  """[H, W, 3] uint8: the tinted grey with its gradient."""
  coords = (np.arange(size) + 0.5) / size - 0.5
  angle = math.radians(background.gradient_angle)
  ramp = (coords[None, :] * math.cos(angle) +
          coords[:, None] * math.sin(angle))  # [H, W], in [-0.71, 0.71]
  image = (np.array(background.rgb, np.float64)[None, None, :] +
           background.gradient * ramp[..., None])  # [H, W, 3]
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render(objects: Sequence[Obj], background: Background,
           size: int) -> np.ndarray:  # [H, W, 3] uint8
  """Draws `objects` in order over `background` at `size` x `size` pixels."""
  if size < MIN_IMAGE_SIZE:
    raise ValueError(f'Image size must be >= {MIN_IMAGE_SIZE}; got {size}.')
  scale = size * supersample_factor(size)
  # The gradient is smooth: compute it at the output size, then upsample.
  canvas = Image.fromarray(_background(background, size))
  if scale != size:
    canvas = canvas.resize((scale, scale), Image.Resampling.BILINEAR)
  for obj in objects:
    # A square box around the object, with a pixel of margin.
    half = obj.radius * scale + 2
    origin = np.floor(np.array([obj.x, obj.y]) * scale - half)
    box = int(math.ceil(2 * half)) + 1
    mask = _shape_mask(obj, scale, origin, box)
    fill = Image.fromarray(_fill(obj, scale, origin, box, size))
    canvas.paste(fill, (int(origin[0]), int(origin[1])), mask)
  if canvas.size[0] != size:
    canvas = canvas.resize((size, size), Image.Resampling.BOX)
  return np.asarray(canvas, np.uint8).copy()  # [H, W, 3]


def render_scene(scene: Scene,
                 size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:  # [H, W, 3]
  """The scene as uint8 RGB pixels."""
  return render(scene.objects, scene.background, size)


def anchor_pixel(obj: Obj, size: int) -> tuple[int, int]:
  """(row, col) of the output pixel that holds the object's anchor."""
  ax, ay = obj.anchor
  return (min(size - 1, int(ay * size)), min(size - 1, int(ax * size)))
