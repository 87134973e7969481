r"""ShapesWorld: procedural data for the three streams, in real file formats.

No real dataset can be downloaded here, so this generator writes detection,
grounding and caption data for shapes on textured backgrounds, in exactly the
formats the real readers take (COCO instances JSON, MDETR-style grounding JSON,
COCO-captions JSON, JPEG/PNG images). It is the data of the demo, of the tests
and of the headline experiment: does det+grd+img training teach concepts that
detection never boxed?

Usage::

  python -m omnitrain_jax.data.shapes_world --out /tmp/shapes --num_images 2000

  from omnitrain_jax.data import shapes_world
  info = shapes_world.ensure_generated("/tmp/shapes", num_images=2000)
  info["det_train"]  # "/tmp/shapes/det_train.json"

Layout written into ``DIR``::

  DIR/images/{split}/{index:06d}.jpg   one folder per split; the image root
                                       is DIR/images: ``file_name`` in the
                                       JSON files is relative to it
                                       ("det_train/000000.jpg")
  DIR/det_train.json, det_val.json     COCO instances
  DIR/grd_train.json, grd_val.json     MDETR-style grounding
  DIR/img_train.json, img_val.json     COCO captions
  DIR/splits.json                      the open-vocabulary split
  DIR/shapes_world.json                parameters, fingerprint, summary; written
                                       last, so a complete dataset has one

with ``split`` one of det_train, det_val, grd_train, grd_val, img_train,
img_val. ``num_images`` is the number of *train images per stream* and
``num_val_images`` the number of *val images per stream*, so a dataset has
``3 * (num_images + num_val_images)`` images. Image ids are
``(split number + 1) * 1_000_000 + index`` (unique across all six files, and
the split can be read off an id); annotation ids count from 1 in each file.

**World.** A category is a color-shape pair ("red circle"), with a stable id in
the order of the `COLORS` x `SHAPES` registries (color-major, from 1; the
registries are append-only). Every object also has a size class, small /
medium / large: the larger side of its (rotated) outline's box, as a fraction
of the image side, is drawn from the class's range in `SIZES`; the ranges
leave gaps, so a size word is never borderline. Objects lie fully inside the image; overlap is
bounded (box intersection at most ``max_overlap`` of the smaller box) and each
object keeps at least ``min_visible`` of its pixels, so later objects occlude
earlier ones without making boxes meaningless. Boxes are *modal* (the visible
pixels, as in COCO), measured on a 4x supersampled mask, and ``area`` is the
visible pixel area. Backgrounds are low-saturation textures (value noise,
gradients, stripes, checkers) kept between gray levels that contrast with
every object color, white and black included.

**Open-vocabulary split, by token.** ``grd_novel_tokens`` (default ``star``,
``purple``) and ``img_novel_tokens`` (default ``hexagon``, ``pink``) are color
or shape words. A category is img-novel if its name holds an img-novel token,
else grd-novel if it holds a grd-novel token, else base. With the defaults:
48 base, 15 grd-novel and 17 img-novel categories. Which categories an image
may show depends on its split:

  ===========  ==================================  =============================
  split        objects in the images               text
  ===========  ==================================  =============================
  det_train    base only                           category list: base only
  grd_train    base + grd-novel                    phrases about those objects
  img_train    all categories                      captions list every object
  *_val        all categories                      det_val boxes every object;
                                                   grd_val refers to all kinds
  ===========  ==================================  =============================

So no novel token occurs anywhere in ``det_train.json`` (its category list is
the set of known negatives, a novel name there would leak), grd-novel tokens
are learnt only from grounding phrases with boxes, and img-novel tokens occur
only in captions (and in val files) -- their pixels are seen only in img train
images, so whatever the model learns about ``hexagon`` comes from captions.

**Grounding.** One caption per image with 1-3 referring phrases joined by
"and" ("the small red circle on the left and the blue star at the top"). Every
grounding image holds several objects of one category, and at least one phrase
refers to one of them, so phrases need disambiguation. Phrases name the
referent's color and shape, plus, as needed, its size and *absolute* position:

  * ``left`` / ``right``: box center in the left / right third of the image,
    ``top`` / ``bottom`` likewise vertically, ``middle`` in the center cell.
    A word is used only when it is true of the referent by at least
    ``position_margin`` (fraction of the image side) and false of every object
    it must exclude by the same margin, so no phrase hinges on a borderline
    position. The thirds are symmetric, so the pipeline's swap of ``left`` and
    ``right`` on a horizontal flip keeps every phrase true.
  * Each phrase identifies its referent uniquely among *all* objects of the
    image, with the fewest attribute words that do (sometimes one redundant
    true word, for variety).
  * Tokens of one phrase that are not in another phrase are true *negatives*
    for the other phrase's referent (the grounding loss pushes them down), so
    a caption never pairs "the small red circle" with a referent that is
    small but not described as small.

Annotations follow MDETR: one per phrase, with ``bbox``, ``category_id``
(the referent's true category), ``tokens_positive`` (character spans
``[start, end)`` of each descriptive word: size, color, shape, position words;
never "the", "on", "at") and ``phrase_ids`` (the phrase's index in the
caption); image entries carry ``caption``, ``tokens_positive_eval``,
``tokens_negative``, ``dataset_name``, ``sentence_id`` and ``original_img_id``
as MDETR's do.

Known limits (by design):
  * No relations to other objects ("the circle left of the green star"): a
    text-free model scores each box on its own, so tokens of a relation would
    train onto the wrong box.
  * Positions are absolute: a random crop that moves an object across a third
    makes its position word false. Keep crops mild on grd, or drop position
    tokens after aggressive crops.
  * Category names are compositions ("purple star" = ``purple`` + ``star``):
    the vocabulary for ShapesWorld should keep colors and shapes as separate
    tokens, otherwise ``purple star`` is one unseen token and the split means
    nothing.

Determinism: every image is drawn from its own ``numpy`` generator seeded by
``(seed, split, index)``, so the same parameters give byte-identical images
and JSON files whatever the number of worker processes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import sys
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw

# Bump when the output for fixed parameters changes (invalidates caches).
GENERATOR_VERSION = 1

# Registries: append only, category ids depend on the order.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 70, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 45, 180),
    "orange": (245, 135, 25),
    "cyan": (40, 215, 225),
    "pink": (250, 135, 195),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon",
                           "cross", "ring", "diamond")
PLURALS = {"cross": "crosses"}  # Others take an "s".

# Size classes: the larger side of the object's outline box as a fraction of
# the image side. The gaps (0.14-0.18, 0.24-0.30) keep size words unambiguous.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.10, 0.14),
    "medium": (0.18, 0.24),
    "large": (0.30, 0.38),
}
POSITION_WORDS = ("left", "right", "top", "bottom", "middle")
ATTRIBUTE_TOKENS = tuple(SIZES) + POSITION_WORDS

SPLITS = ("det_train", "det_val", "grd_train", "grd_val", "img_train",
          "img_val")
_SPLIT_NO = {name: i for i, name in enumerate(SPLITS)}
_IMAGE_ID_STRIDE = 1_000_000
_MAX_IMAGES = _IMAGE_ID_STRIDE - 1

_SUPERSAMPLE = 4  # Masks are drawn at 4x for antialiasing and 0.25 px boxes.
_COLOR_JITTER = 12  # So colors are learnt as ranges, not exact values.
_BG_RANGE = (60.0, 195.0)  # Background gray levels: away from white/black.
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                "eight", "nine", "ten")


@dataclasses.dataclass(frozen=True)
class Config:
  """Every parameter that changes the generated files.

  Attributes:
    num_images: train images per stream (det, grd, img).
    num_val_images: val images per stream.
    image_size: side of the square images in pixels.
    seed: the seed everything is derived from.
    image_format: "jpg" or "png".
    jpeg_quality: JPEG quality (ignored for PNG).
    colors: color words in use (a subset of `COLORS`).
    shapes: shape words in use (a subset of `SHAPES`).
    grd_novel_tokens: color/shape words seen only in grounding phrases.
    img_novel_tokens: color/shape words seen only in captions.
    min_objects: fewest objects placed per image (before rare drops).
    max_objects: most objects per image.
    max_overlap: largest box intersection as a fraction of the smaller box.
    min_visible: smallest visible fraction of an object's pixels.
    position_margin: how far (fraction of the image side) from a third's
      border an object must be for a position word to be used for it, or
      ruled out for it.
    redundant_attribute_prob: chance that a referring phrase gets one true
      attribute word beyond the fewest that make it unique.
    caption_drop_fraction: img captions leave out each object with this
      probability (at least one object stays named), as real captions
      mention only some objects; the listed phrases are in random order
      either way. 0 (default): every object is listed, and the files are
      byte-identical to those of before the option existed (same
      fingerprint, see `_fingerprint`).
    paint: ``"COLOR:OTHER"`` pairs: COLOR's objects are drawn in OTHER's RGB
      (names, captions and boxes unchanged; the random draws do not depend
      on RGB values, so the scenes are those of the unpainted dataset). A
      diagnostic (experiments/diagnose_captions.py ``--recolor``): does a
      token fail on its objects' colour or on their scenes? () (default):
      no repainting, same files and fingerprint as before the option.
  """
  num_images: int = 1000
  num_val_images: int = 200
  image_size: int = 128
  seed: int = 0
  image_format: str = "jpg"
  jpeg_quality: int = 90
  colors: tuple[str, ...] = tuple(COLORS)
  shapes: tuple[str, ...] = SHAPES
  grd_novel_tokens: tuple[str, ...] = ("star", "purple")
  img_novel_tokens: tuple[str, ...] = ("hexagon", "pink")
  min_objects: int = 2
  max_objects: int = 6
  max_overlap: float = 0.25
  min_visible: float = 0.6
  position_margin: float = 0.04
  redundant_attribute_prob: float = 0.2
  caption_drop_fraction: float = 0.0
  paint: tuple[str, ...] = ()

  def __post_init__(self):
    # Lists from callers become tuples so the config hashes and pickles.
    for name in ("colors", "shapes", "grd_novel_tokens", "img_novel_tokens",
                 "paint"):
      value = getattr(self, name)
      if isinstance(value, str):
        raise ValueError(f"{name}={value!r} must be a sequence of words, "
                         f"not one string. Fix: pass e.g. ({value!r},).")
      object.__setattr__(self, name, tuple(value))
    for name in ("num_images", "num_val_images"):
      n = getattr(self, name)
      if not 0 <= n <= _MAX_IMAGES:
        raise ValueError(f"{name}={n} is out of range. Fix: use 0.."
                         f"{_MAX_IMAGES} images per stream.")
    if self.image_size < 32:
      raise ValueError(f"image_size={self.image_size} is too small for "
                       "recognizable shapes. Fix: use image_size >= 32.")
    if self.image_format not in ("jpg", "png"):
      raise ValueError(f"image_format={self.image_format!r} is not supported."
                       " Fix: use 'jpg' or 'png'.")
    if not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f"jpeg_quality={self.jpeg_quality}: use 1..100.")
    for name, registry in (("colors", COLORS), ("shapes", SHAPES)):
      words = getattr(self, name)
      unknown = [w for w in words if w not in registry]
      if unknown or not words or len(set(words)) != len(words):
        raise ValueError(f"{name}={words} must be distinct words from "
                         f"{tuple(registry)}; bad: {unknown}.")
    words = set(self.colors) | set(self.shapes)
    for name in ("grd_novel_tokens", "img_novel_tokens"):
      unknown = [t for t in getattr(self, name) if t not in words]
      if unknown:
        raise ValueError(f"{name} {unknown} are not colors or shapes in use "
                         f"({sorted(words)}). Fix: pick novel tokens among "
                         "them.")
    both = set(self.grd_novel_tokens) & set(self.img_novel_tokens)
    if both:
      raise ValueError(f"Tokens {sorted(both)} are both grd-novel and "
                       "img-novel. Fix: put each novel token in one list.")
    if not 1 <= self.min_objects <= self.max_objects:
      raise ValueError(f"min_objects={self.min_objects}, max_objects="
                       f"{self.max_objects}: need 1 <= min <= max.")
    if self.max_objects < 2:
      raise ValueError("max_objects must be >= 2: grounding images need two "
                       "objects of one category.")
    if not 0.0 <= self.max_overlap < 1.0 or not 0.0 < self.min_visible <= 1.0:
      raise ValueError(f"max_overlap={self.max_overlap} must be in [0, 1) and "
                       f"min_visible={self.min_visible} in (0, 1].")
    if not 0.0 <= self.position_margin < 1 / 6:
      raise ValueError(f"position_margin={self.position_margin} must be in "
                       "[0, 1/6).")
    if not 0.0 <= self.redundant_attribute_prob <= 1.0:
      raise ValueError("redundant_attribute_prob must be in [0, 1].")
    if not 0.0 <= self.caption_drop_fraction < 1.0:
      raise ValueError(f"caption_drop_fraction={self.caption_drop_fraction} "
                       "must be in [0, 1).")
    for pair in self.paint:
      name, sep, other = pair.partition(":")
      if not sep or name not in COLORS or other not in COLORS:
        raise ValueError(f"paint={self.paint}: {pair!r} must be COLOR:OTHER "
                         f"with both in {tuple(COLORS)}, e.g. 'pink:red'.")
    if not any(c.split == "base" for c in categories(self)):
      raise ValueError("Every category holds a novel token, so det train "
                       "would be empty. Fix: fewer novel tokens.")


@dataclasses.dataclass(frozen=True)
class Category:
  """A color-shape pair."""
  id: int
  name: str
  color: str
  shape: str
  split: str  # "base", "grd_novel" or "img_novel".


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One drawn object. ``bbox`` is modal ``[x, y, w, h]`` in pixels."""
  category_id: int
  color: str
  shape: str
  size: str
  bbox: tuple[float, float, float, float]
  area: float


@dataclasses.dataclass(frozen=True)
class Phrase:
  """A referring phrase: its referent and its descriptive words' spans.

  ``spans`` are ``[start, end)`` character offsets into the scene caption,
  one per descriptive word, in text order.
  """
  object_index: int
  start: int
  end: int
  spans: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
  """One generated image and its annotations."""
  split: str
  index: int
  image_id: int
  file_name: str
  image: np.ndarray  # uint8 [S, S, 3]
  objects: tuple[SceneObject, ...]
  caption: str  # grd: the phrases; img: the object list; det: "".
  phrases: tuple[Phrase, ...]  # grd only.


@functools.lru_cache(maxsize=16)
def categories(config: Config) -> tuple[Category, ...]:
  """All categories of `config`, with their stable ids and splits."""
  grd, img = set(config.grd_novel_tokens), set(config.img_novel_tokens)
  out = []
  for color in config.colors:
    for shape in config.shapes:
      cid = (list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape) + 1)
      words = {color, shape}
      split = ("img_novel" if words & img else
               "grd_novel" if words & grd else "base")
      out.append(Category(cid, f"{color} {shape}", color, shape, split))
  return tuple(out)


def make_config(**kwargs) -> Config:
  """A `Config` from keyword arguments, with a clear error for typos."""
  names = {f.name for f in dataclasses.fields(Config)}
  unknown = sorted(set(kwargs) - names)
  if unknown:
    raise ValueError(f"Unknown ShapesWorld parameters {unknown}. Known: "
                     f"{sorted(names)}.")
  return Config(**kwargs)


def params_fingerprint(**kwargs) -> str:
  """Hex fingerprint of the generator version and all parameters.

  Args:
    **kwargs: `Config` fields (defaults fill the rest), as given to
      `generate`, without ``out_dir`` and ``num_workers``, which don't change
      the output.

  Returns:
    16 hex digits; equal fingerprints mean identical files.
  """
  return _fingerprint(make_config(**kwargs))


# Parameters added after datasets were cached: at their default value they
# are left out of the fingerprint, so existing caches keep their keys (their
# defaults generate the files of before the parameter existed).
_LATER_PARAMS = {"caption_drop_fraction": 0.0, "paint": ()}


def _params(config: Config) -> dict[str, Any]:
  """The parameters that name a dataset (fingerprint and meta file)."""
  params = dataclasses.asdict(config)
  for name, default in _LATER_PARAMS.items():
    if params[name] == default:
      del params[name]
  return params


def _fingerprint(config: Config) -> str:
  blob = json.dumps({"version": GENERATOR_VERSION,
                     "params": _params(config)}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------
# Geometry and layout.


@dataclasses.dataclass
class _Placed:
  category: Category
  size: str
  rgb: np.ndarray  # float32 [3]
  kind: str  # "poly", "disk" or "ring".
  verts: np.ndarray | None  # float64 [V, 2], centered on the outline box.
  radius: float  # disk / ring outer radius.
  inner: float  # ring inner radius.
  half: tuple[float, float]  # Half extents (x, y) of the outline box.
  center: tuple[float, float] = (0.0, 0.0)


def _regular(n: int, radius_fn, rot: float) -> np.ndarray:
  k = np.arange(n)
  ang = rot + 2 * np.pi * k / n - np.pi / 2
  r = radius_fn(k)
  return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)


def _outline(shape: str, rng: np.random.Generator) -> tuple[str, Any]:
  """A unit outline (before scaling) of `shape`, randomly rotated a little."""
  deg = np.pi / 180
  if shape == "circle":
    return "disk", None
  if shape == "ring":
    return "ring", rng.uniform(0.5, 0.62)
  if shape == "square":
    v = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    rot = rng.uniform(-10, 10) * deg
  elif shape == "diamond":
    a = rng.uniform(0.58, 0.7)  # Narrow, so it never passes for a square.
    v = np.array([[0, -1], [a, 0], [0, 1], [-a, 0]], np.float64)
    rot = rng.uniform(-8, 8) * deg
  elif shape == "cross":
    a = 0.32
    v = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a],
                  [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]],
                 np.float64)
    rot = rng.uniform(-10, 10) * deg  # Not 45: that would be an "x".
  elif shape == "triangle":
    v = _regular(3, lambda k: np.ones_like(k, np.float64), 0.0)
    rot = rng.uniform(-15, 15) * deg
  elif shape == "star":
    v = _regular(10, lambda k: np.where(k % 2 == 0, 1.0, 0.45), 0.0)
    rot = rng.uniform(0, 72) * deg
  elif shape == "hexagon":
    v = _regular(6, lambda k: np.ones_like(k, np.float64), 0.0)
    rot = rng.uniform(0, 60) * deg
  else:
    raise AssertionError(shape)
  c, s = np.cos(rot), np.sin(rot)
  v = v @ np.array([[c, s], [-s, c]])
  return "poly", v


def _make_object(cat: Category, size: str, image_size: int,
                 rng: np.random.Generator,
                 paint: Mapping[str, str] | None = None) -> _Placed:
  lo, hi = SIZES[size]
  extent = rng.uniform(lo, hi) * image_size  # Larger side of the outline box.
  # Mostly brightness jitter: per-channel jitter would tint white and black.
  jitter = (rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1) +
            rng.integers(-_COLOR_JITTER // 2, _COLOR_JITTER // 2 + 1, 3))
  color = (paint or {}).get(cat.color, cat.color)  # Config.paint.
  rgb = np.clip(np.array(COLORS[color], np.float32) + jitter, 0, 255)
  kind, geom = _outline(cat.shape, rng)
  if kind == "poly":
    v = geom
    lo_xy, hi_xy = v.min(0), v.max(0)
    v = (v - (lo_xy + hi_xy) / 2) * (extent / (hi_xy - lo_xy).max())
    half = tuple(float(h) for h in v.max(0))
    return _Placed(cat, size, rgb, kind, v, 0.0, 0.0, half)
  r = extent / 2
  inner = r * geom if kind == "ring" else 0.0
  return _Placed(cat, size, rgb, kind, None, r, inner, (r, r))


def _sample_layout(config: Config, pool: Sequence[Category],
                   need_duplicate: bool,
                   rng: np.random.Generator) -> list[_Placed]:
  """Samples objects (grouped by category) and non-overlapping positions."""
  s = config.image_size
  target = int(rng.integers(config.min_objects, config.max_objects + 1))
  if need_duplicate:
    target = max(target, 2)
  groups: list[tuple[Category, int]] = []
  used: set[int] = set()
  total = 0
  while total < target and len(used) < len(pool):
    cat = pool[int(rng.integers(len(pool)))]
    if cat.id in used:
      continue
    used.add(cat.id)
    count = int(rng.integers(1, min(3, target - total) + 1))
    groups.append((cat, count))
    total += count
  if need_duplicate and all(n < 2 for _, n in groups):
    # Turn the first single into a pair, dropping a later object if needed.
    groups[0] = (groups[0][0], 2)
    if total + 1 > config.max_objects:
      groups.pop()

  sizes = tuple(SIZES)
  paint = dict(p.split(":") for p in config.paint)
  objs = [_make_object(cat, sizes[int(rng.integers(3))], s, rng, paint)
          for cat, n in groups for _ in range(n)]
  # Big objects first: they are the hardest to fit.
  objs.sort(key=lambda o: -max(o.half))
  placed: list[_Placed] = []
  boxes: list[tuple[float, float, float, float]] = []
  for o in objs:
    hx, hy = o.half
    for _ in range(40):
      cx = rng.uniform(hx + 1, s - hx - 1)
      cy = rng.uniform(hy + 1, s - hy - 1)
      box = (cx - hx, cy - hy, cx + hx, cy + hy)
      if all(_overlap_fraction(box, b) <= config.max_overlap for b in boxes):
        o.center = (cx, cy)
        placed.append(o)
        boxes.append(box)
        break
  # Random drawing order decides who occludes whom.
  return [placed[i] for i in rng.permutation(len(placed))]


def _overlap_fraction(a, b) -> float:
  """Intersection of two xyxy boxes over the smaller one's area."""
  iw = min(a[2], b[2]) - max(a[0], b[0])
  ih = min(a[3], b[3]) - max(a[1], b[1])
  if iw <= 0 or ih <= 0:
    return 0.0
  area = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
  return iw * ih / area


# --------------------------------------------------------------------------
# Rendering.


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] linear interpolation weights (align corners)."""
  pos = np.linspace(0, n_in - 1, n_out)
  lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
  frac = pos - lo
  m = np.zeros((n_out, n_in), np.float32)
  m[np.arange(n_out), lo] = 1 - frac
  m[np.arange(n_out), lo + 1] = frac
  return m


@functools.lru_cache(maxsize=4)
def _noise_bank(seed: int, s: int) -> np.ndarray:
  """float32 [2S, 2S, 3] unit Gaussian noise; images crop it at random.

  Drawing fresh per-pixel noise cost more than the rest of an image, and
  grain needs no independence between images.
  """
  rng = np.random.default_rng([seed, len(SPLITS), s])
  bank = rng.standard_normal((2 * s, 2 * s, 3), dtype=np.float32)
  bank.setflags(write=False)
  return bank


def _background(s: int, rng: np.random.Generator) -> np.ndarray:
  """A low-saturation texture, float32 [S, S, 3] within `_BG_RANGE`."""
  def muted():
    return (rng.uniform(90, 165) + rng.uniform(-20, 20, 3)).astype(np.float32)

  c1, c2 = muted(), muted()
  x = (np.arange(s, dtype=np.float32) + 0.5) / s  # Pixel centers in [0, 1].
  kind = int(rng.integers(4))
  if kind == 0:
    # Value noise: coarse random grids, smoothly upsampled; mostly
    # luminance, so the texture never turns into a colored blob that could
    # pass for an object's color.
    k = int(rng.integers(3, 9))
    m = _interp_matrix(s, k)
    grid = (rng.normal(0, 1, (1, k, k)) * rng.uniform(10, 25) +
            rng.normal(0, 5, (3, k, k))).astype(np.float32)
    bg = c1 + (m @ grid @ m.T).transpose(1, 2, 0)  # [S, S, 3]
  else:
    ang = rng.uniform(0, 2 * np.pi)
    t = np.cos(ang) * x[None, :] + np.sin(ang) * x[:, None]  # [S, S]
    if kind == 1:  # Linear gradient between two muted colors.
      t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 2:  # Soft stripes.
      t = 0.5 + 0.5 * np.sin(2 * np.pi * t / rng.uniform(0.05, 0.2))
    else:  # Checkerboard.
      cell = rng.uniform(0.06, 0.2)
      t = (np.floor(x[None, :] / cell) + np.floor(x[:, None] / cell)) % 2
    bg = c1 + (c2 - c1) * t[..., None].astype(np.float32)
  return np.clip(bg, *_BG_RANGE)


def _box_mean(mask: np.ndarray, ss: int) -> np.ndarray:
  """Mean of each ss x ss block of a bool mask: float32 [h, w]."""
  v = mask.view(np.uint8).reshape(mask.shape[0] // ss, ss,
                                  mask.shape[1] // ss, ss)
  # Explicit slice sums: about 10x faster than .mean((1, 3)) here.
  rows = v[:, 0].astype(np.uint16)
  for i in range(1, ss):
    rows += v[:, i]
  total = rows[..., 0].copy()
  for i in range(1, ss):
    total += rows[..., i]
  return total.astype(np.float32) / (ss * ss)


def _render(config: Config, objs: Sequence[_Placed], rng: np.random.Generator
            ) -> tuple[np.ndarray, list[SceneObject]] | None:
  """Draws `objs` in order; None if an object ends up too hidden."""
  s, ss = config.image_size, _SUPERSAMPLE
  owner = np.full((s * ss, s * ss), -1, np.int8)  # Topmost object per subpixel.
  windows, full = [], []
  for k, o in enumerate(objs):
    cx, cy = o.center
    hx, hy = o.half
    x0, y0 = max(int(cx - hx) - 1, 0), max(int(cy - hy) - 1, 0)
    x1, y1 = min(int(cx + hx) + 2, s), min(int(cy + hy) + 2, s)
    windows.append((x0, y0, x1, y1))
    w, h = (x1 - x0) * ss, (y1 - y0) * ss
    # Subpixel centers sit at +0.5: shift the outline into window subpixels.
    ox, oy = (cx - x0) * ss - 0.5, (cy - y0) * ss - 0.5
    if o.kind == "poly":
      canvas = Image.new("L", (w, h), 0)
      pts = [(float(px), float(py)) for px, py in o.verts * ss + (ox, oy)]
      ImageDraw.Draw(canvas).polygon(pts, fill=1)
      mask = np.asarray(canvas, dtype=bool)
    else:
      py, px = np.ogrid[0:h, 0:w]
      d2 = (px - ox) ** 2 + (py - oy) ** 2
      mask = d2 <= (o.radius * ss) ** 2
      if o.kind == "ring":
        mask &= d2 > (o.inner * ss) ** 2
    owner[y0 * ss:y1 * ss, x0 * ss:x1 * ss][mask] = k
    full.append(int(mask.sum()))

  bg = _background(s, rng)
  image = bg.copy()
  out = []
  for k, (o, (x0, y0, x1, y1)) in enumerate(zip(objs, windows)):
    vis = owner[y0 * ss:y1 * ss, x0 * ss:x1 * ss] == k
    n = int(vis.sum())
    if n == 0 or n < config.min_visible * full[k]:
      return None
    rows, cols = np.flatnonzero(vis.any(1)), np.flatnonzero(vis.any(0))
    bx0, by0 = x0 + cols[0] / ss, y0 + rows[0] / ss
    bx1, by1 = x0 + (cols[-1] + 1) / ss, y0 + (rows[-1] + 1) / ss
    # Exact antialiased compositing: the owner map partitions each pixel,
    # so image = bg + sum_k alpha_k * (color_k - bg).
    alpha = _box_mean(vis, ss)
    win_bg = bg[y0:y1, x0:x1]
    image[y0:y1, x0:x1] += alpha[..., None] * (o.rgb - win_bg)
    out.append(SceneObject(
        category_id=o.category.id, color=o.category.color,
        shape=o.category.shape, size=o.size,
        bbox=(float(bx0), float(by0), float(bx1 - bx0), float(by1 - by0)),
        area=n / ss ** 2))
  oy, ox = rng.integers(0, s, 2)
  image += 4 * _noise_bank(config.seed, s)[oy:oy + s, ox:ox + s]  # Grain.
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), out


# --------------------------------------------------------------------------
# Language.


def word_state(obj: SceneObject, word: str, width: int, height: int,
               margin: float) -> bool | None:
  """Whether `word` describes `obj`: True, False, or None when borderline.

  Position words use the modal box center against the image thirds; they are
  True / False only at least `margin` (fraction of the side) away from the
  thirds' borders.
  """
  if word in COLORS:
    return obj.color == word
  if word in SHAPES:
    return obj.shape == word
  if word in SIZES:
    return obj.size == word
  x = (obj.bbox[0] + obj.bbox[2] / 2) / width
  y = (obj.bbox[1] + obj.bbox[3] / 2) / height

  def low(v):  # In the first third.
    if v <= 1 / 3 - margin:
      return True
    return False if v >= 1 / 3 + margin else None

  def high(v):  # In the last third.
    if v >= 2 / 3 + margin:
      return True
    return False if v <= 2 / 3 - margin else None

  def mid(v):
    lo, hi = low(v), high(v)
    if lo is False and hi is False:
      return True
    if lo is True or hi is True:
      return False
    return None

  if word == "left":
    return low(x)
  if word == "right":
    return high(x)
  if word == "top":
    return low(y)
  if word == "bottom":
    return high(y)
  if word == "middle":
    mx, my = mid(x), mid(y)
    if mx is False or my is False:
      return False
    return True if mx and my else None
  raise ValueError(f"Unknown word {word!r}.")


def _attribute_sets(obj: SceneObject, state) -> list[frozenset[str]]:
  """Sets of attribute words true of `obj`: size and/or a position."""
  h = [w for w in ("left", "right") if state(obj, w) is True]
  v = [w for w in ("top", "bottom") if state(obj, w) is True]
  positions: list[tuple[str, ...]] = [()]
  positions += [(w,) for w in h + v]
  positions += [(a, b) for a in h for b in v]
  if state(obj, "middle") is True:
    positions.append(("middle",))
  return [frozenset(p) | frozenset(extra)
          for extra in ((), (obj.size,)) for p in positions]


def _phrase_text(obj: SceneObject,
                 attrs: frozenset[str]) -> list[tuple[str, bool]]:
  """The phrase as (word, descriptive?) pairs, e.g. the small red circle."""
  parts = [("the", False)]
  if obj.size in attrs:
    parts.append((obj.size, True))
  parts += [(obj.color, True), (obj.shape, True)]
  h = next((w for w in ("left", "right") if w in attrs), None)
  v = next((w for w in ("top", "bottom") if w in attrs), None)
  if "middle" in attrs:
    parts += [("in", False), ("the", False), ("middle", True)]
  elif h and v:
    parts += [("at", False), ("the", False), (v, True), (h, True)]
  elif h:
    parts += [("on", False), ("the", False), (h, True)]
  elif v:
    parts += [("at", False), ("the", False), (v, True)]
  return parts


def _referring_phrases(config: Config, objs: Sequence[SceneObject],
                       rng: np.random.Generator
                       ) -> tuple[str, tuple[Phrase, ...]] | None:
  """A grounding caption of 1-3 phrases, or None if none disambiguates."""
  s = config.image_size

  def state(o, w):
    return word_state(o, w, s, s, config.position_margin)

  def words(k, attrs):
    return attrs | {objs[k].color, objs[k].shape}

  def unique(k, ws):
    # Every other object must be *definitely* excluded by some word.
    return all(any(state(o, w) is False for w in ws)
               for j, o in enumerate(objs) if j != k)

  counts: dict[int, int] = {}
  for o in objs:
    counts[o.category_id] = counts.get(o.category_id, 0) + 1
  dup = [k for k, o in enumerate(objs) if counts[o.category_id] > 1]
  if not dup:
    return None
  first = dup[int(rng.integers(len(dup)))]
  rest = [k for k in rng.permutation(len(objs)) if k != first]
  n_phrases = int(rng.integers(1, 4))

  chosen: list[tuple[int, frozenset[str]]] = []
  for k in [first] + [int(k) for k in rest]:
    if len(chosen) == n_phrases:
      break
    valid = []
    for attrs in _attribute_sets(objs[k], state):
      ws = words(k, attrs)
      if not unique(k, ws):
        continue
      # Another phrase's words that this one lacks are negatives for this
      # referent, and vice versa: they must be definitely false.
      if all(all(state(objs[k], w) is False for w in words(j, a) - ws) and
             all(state(objs[j], w) is False for w in ws - words(j, a))
             for j, a in chosen):
        valid.append(attrs)
    if not valid:
      if k == first:
        return None
      continue
    fewest = min(len(a) for a in valid)
    pool = [a for a in valid if len(a) == fewest]
    if rng.random() < config.redundant_attribute_prob:
      pool += [a for a in valid if len(a) == fewest + 1]
    chosen.append((k, pool[int(rng.integers(len(pool)))]))

  order = rng.permutation(len(chosen))
  caption, phrases = "", []
  for i, c in enumerate(order):
    k, attrs = chosen[c]
    if i:
      caption += " and " if i == len(order) - 1 else ", "
    start, spans = len(caption), []
    for j, (word, descriptive) in enumerate(_phrase_text(objs[k], attrs)):
      if j:
        caption += " "
      if descriptive:
        spans.append((len(caption), len(caption) + len(word)))
      caption += word
    phrases.append(Phrase(k, start, len(caption), tuple(spans)))
  return caption, tuple(phrases)


def _plural(shape: str) -> str:
  return PLURALS.get(shape, shape + "s")


def _object_caption(objs: Sequence[SceneObject],
                    rng: np.random.Generator,
                    drop_fraction: float = 0.0) -> str:
  """Lists every object: "two red circles and a large blue star".

  With `drop_fraction` > 0 each object is left out with that probability
  (one random object stays when all would go); counts follow the objects
  still named. At 0 no extra random draw is made (same captions as before
  the option).
  """
  if drop_fraction > 0 and objs:
    keep = rng.random(len(objs)) >= drop_fraction
    if not keep.any():
      keep[rng.integers(len(objs))] = True
    objs = [o for o, k in zip(objs, keep) if k]
  groups: dict[int, list[SceneObject]] = {}
  for o in objs:
    groups.setdefault(o.category_id, []).append(o)
  items = []
  for cid in sorted(groups):
    members = groups[cid]
    o = members[0]
    same_size = all(m.size == o.size for m in members)
    size = f"{o.size} " if same_size and rng.random() < 0.5 else ""
    if len(members) == 1:
      first = (size or o.color)[0]
      article = "an" if first in "aeiou" else "a"
      items.append(f"{article} {size}{o.color} {o.shape}")
    else:
      items.append(f"{_COUNT_WORDS[len(members)]} {size}{o.color} "
                   f"{_plural(o.shape)}")
  items = [items[i] for i in rng.permutation(len(items))]
  if len(items) == 1:
    return items[0]
  return ", ".join(items[:-1]) + " and " + items[-1]


# --------------------------------------------------------------------------
# Scenes.


@functools.lru_cache(maxsize=64)
def _pool(config: Config, split: str) -> tuple[Category, ...]:
  """The categories whose objects may appear in `split`'s images."""
  cats = categories(config)
  if split == "det_train":
    allowed = {"base"}
  elif split == "grd_train":
    allowed = {"base", "grd_novel"}
  else:
    allowed = {"base", "grd_novel", "img_novel"}
  return tuple(c for c in cats if c.split in allowed)


def image_id(split: str, index: int) -> int:
  """The image id of image `index` of `split` (unique across splits)."""
  return (_SPLIT_NO[split] + 1) * _IMAGE_ID_STRIDE + index


def render_scene(config: Config, split: str, index: int) -> Scene:
  """Generates image `index` of `split`, deterministically.

  Args:
    config: the parameters.
    split: one of `SPLITS`.
    index: the image's index in its split, 0 <= index < its image count.

  Returns:
    The scene: pixels, objects with modal boxes, caption and phrases.
  """
  if split not in _SPLIT_NO:
    raise ValueError(f"Unknown split {split!r}. Known: {SPLITS}.")
  stream = split.split("_")[0]
  rng = np.random.default_rng([config.seed, _SPLIT_NO[split], index])
  pool = _pool(config, split)
  for _ in range(200):
    layout = _sample_layout(config, pool, stream == "grd", rng)
    if not layout:
      continue
    rendered = _render(config, layout, rng)
    if rendered is None:
      continue
    pixels, objs = rendered
    caption, phrases = "", ()
    if stream == "grd":
      grounded = _referring_phrases(config, objs, rng)
      if grounded is None:
        continue
      caption, phrases = grounded
    elif stream == "img":
      caption = _object_caption(objs, rng, config.caption_drop_fraction)
    return Scene(split, index, image_id(split, index),
                 f"{split}/{index:06d}.{config.image_format}", pixels,
                 tuple(objs), caption, phrases)
  raise RuntimeError(f"No valid scene for {split} image {index} in 200 tries"
                     f" with {config}. Fix: fewer/smaller objects or a lower "
                     "position_margin.")


def _encode(pixels: np.ndarray, config: Config) -> bytes:
  buf = io.BytesIO()
  if config.image_format == "jpg":
    Image.fromarray(pixels).save(buf, format="JPEG",
                                 quality=config.jpeg_quality)
  else:
    Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _render_chunk(args: tuple[Config, str, str, int, int]) -> list[dict]:
  """Worker: renders and writes images [start, stop) of a split."""
  config, image_root, split, start, stop = args
  out = []
  for index in range(start, stop):
    scene = render_scene(config, split, index)
    with open(os.path.join(image_root, scene.file_name), "wb") as f:
      f.write(_encode(scene.image, config))
    out.append({"image_id": scene.image_id, "file_name": scene.file_name,
                "objects": scene.objects, "caption": scene.caption,
                "phrases": scene.phrases})
  return out


# --------------------------------------------------------------------------
# Files.


def _r(v: float) -> float:
  return round(float(v), 2)


def _image_entry(rec: dict, s: int) -> dict:
  return {"id": rec["image_id"], "file_name": rec["file_name"], "width": s,
          "height": s}


def _category_entries(cats: Sequence[Category]) -> list[dict]:
  return [{"id": c.id, "name": c.name, "supercategory": c.shape} for c in cats]


def _info(config: Config, what: str) -> dict:
  return {"description": f"ShapesWorld {what}",
          "version": str(GENERATOR_VERSION),
          "fingerprint": _fingerprint(config)}


def _det_json(config, split, recs, cats) -> dict:
  images, anns = [], []
  for rec in recs:
    images.append(_image_entry(rec, config.image_size))
    for o in rec["objects"]:
      anns.append({"id": len(anns) + 1, "image_id": rec["image_id"],
                   "category_id": o.category_id,
                   "bbox": [_r(v) for v in o.bbox], "area": _r(o.area),
                   "iscrowd": 0})
  return {"info": _info(config, split), "licenses": [], "images": images,
          "annotations": anns, "categories": _category_entries(cats)}


def _grd_json(config, split, recs, cats) -> dict:
  images, anns = [], []
  for rec in recs:
    entry = _image_entry(rec, config.image_size)
    caption = rec["caption"]
    entry.update({
        "caption": caption,
        "dataset_name": "shapes_world",
        "tokens_negative": [[0, len(caption)]],
        "sentence_id": 0,
        "original_img_id": rec["image_id"],
        "tokens_positive_eval": [[list(sp) for sp in p.spans]
                                 for p in rec["phrases"]],
    })
    images.append(entry)
    for pid, p in enumerate(rec["phrases"]):
      o = rec["objects"][p.object_index]
      anns.append({"id": len(anns) + 1, "image_id": rec["image_id"],
                   "category_id": o.category_id,
                   "bbox": [_r(v) for v in o.bbox], "area": _r(o.area),
                   "iscrowd": 0,
                   "tokens_positive": [list(sp) for sp in p.spans],
                   "phrase_ids": pid})
  return {"info": _info(config, split), "licenses": [], "images": images,
          "annotations": anns, "categories": _category_entries(cats)}


def _img_json(config, split, recs) -> dict:
  images, anns = [], []
  for rec in recs:
    images.append(_image_entry(rec, config.image_size))
    anns.append({"id": len(anns) + 1, "image_id": rec["image_id"],
                 "caption": rec["caption"]})
  return {"info": _info(config, split), "licenses": [], "images": images,
          "annotations": anns}


def _write_json(path: str, obj: Any) -> None:
  # Atomic, so a crash never leaves a truncated file that parses later.
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, separators=(",", ":"))
    f.write("\n")
  os.replace(tmp, path)


def _splits_json(config: Config) -> dict:
  cats = categories(config)
  novel = set(config.grd_novel_tokens) | set(config.img_novel_tokens)
  base_tokens = [w for w in (*config.colors, *config.shapes) if w not in novel]
  return {
      "base_tokens": base_tokens,
      "grd_novel_tokens": list(config.grd_novel_tokens),
      "img_novel_tokens": list(config.img_novel_tokens),
      "attribute_tokens": list(ATTRIBUTE_TOKENS),
      "base_categories": [c.id for c in cats if c.split == "base"],
      "grd_novel_categories": [c.id for c in cats if c.split == "grd_novel"],
      "img_novel_categories": [c.id for c in cats if c.split == "img_novel"],
      "categories": [dataclasses.asdict(c) for c in cats],
  }


def output_paths(out_dir: str) -> dict[str, str]:
  """The paths `generate` writes, by key (split names, splits, meta, ...)."""
  out_dir = os.path.abspath(out_dir)
  paths = {split: os.path.join(out_dir, f"{split}.json") for split in SPLITS}
  paths["splits"] = os.path.join(out_dir, "splits.json")
  paths["meta"] = os.path.join(out_dir, "shapes_world.json")
  paths["image_root"] = os.path.join(out_dir, "images")
  return paths


def _mp_context() -> multiprocessing.context.BaseContext | None:
  """The safest quick way to start workers here, or None for in-process.

  fork starts workers in milliseconds and needs no importable __main__, but
  is unsafe once a library has started threads (JAX does at import), so it is
  used only on Linux in a single-threaded process without JAX; otherwise
  spawn, unless __main__ cannot be re-imported by a spawned worker (code
  piped to stdin), where the pool would respawn failing workers forever.
  """
  if (sys.platform.startswith("linux") and "jax" not in sys.modules
      and threading.active_count() == 1):
    return multiprocessing.get_context("fork")
  main = sys.modules.get("__main__")
  path = getattr(main, "__file__", None)
  if (getattr(main, "__spec__", None) is None and path is not None
      and not os.path.exists(path)):
    return None
  return multiprocessing.get_context("spawn")


def _default_workers(total_images: int) -> int:
  if total_images < 300:  # Not worth starting processes for.
    return 0
  return min(os.cpu_count() or 1, 8)


def generate(out_dir: str, *, num_workers: int | None = None,
             **params) -> dict[str, Any]:
  """Writes a ShapesWorld dataset into `out_dir` (see the module docstring).

  Args:
    out_dir: the dataset folder (created if missing; files are overwritten).
    num_workers: processes rendering images; 0 renders in this process; None
      picks 0 for small datasets, else up to 8. The output does not depend
      on it.
    **params: `Config` fields: num_images (train images per stream),
      num_val_images (val images per stream), image_size, seed, image_format,
      colors, shapes, grd_novel_tokens, img_novel_tokens, ...

  Returns:
    ``output_paths(out_dir)`` plus ``fingerprint``, ``summary`` (per split:
    images, objects per category split and, for grd, referred objects per
    category split) and ``seconds``.
  """
  config = make_config(**params)
  t0 = time.perf_counter()
  paths = output_paths(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  if os.path.exists(paths["meta"]):
    # Remove the completion marker first: a crash midway leaves no dataset
    # that looks complete.
    os.remove(paths["meta"])
  counts = {s: config.num_images if s.endswith("train")
            else config.num_val_images for s in SPLITS}
  for split in SPLITS:
    os.makedirs(os.path.join(paths["image_root"], split), exist_ok=True)
  chunk = 64
  tasks = [(config, paths["image_root"], split, a, min(a + chunk, n))
           for split, n in counts.items() for a in range(0, n, chunk)]
  if num_workers is None:
    num_workers = _default_workers(sum(counts.values()))
  ctx = _mp_context() if num_workers > 0 and len(tasks) > 1 else None
  if ctx is not None:
    with ctx.Pool(min(num_workers, len(tasks))) as pool:
      results = pool.map(_render_chunk, tasks, chunksize=1)
  else:
    results = [_render_chunk(t) for t in tasks]
  recs: dict[str, list[dict]] = {s: [] for s in SPLITS}
  for task, res in zip(tasks, results):
    recs[task[2]].extend(res)

  cats = categories(config)
  by_id = {c.id: c for c in cats}
  for split in SPLITS:
    pool_cats = _pool(config, split)  # The file's category list.
    stream = split.split("_")[0]
    if stream == "det":
      obj = _det_json(config, split, recs[split], pool_cats)
    elif stream == "grd":
      obj = _grd_json(config, split, recs[split], pool_cats)
    else:
      obj = _img_json(config, split, recs[split])
    _write_json(paths[split], obj)
  _write_json(paths["splits"], _splits_json(config))

  summary = {}
  for split in SPLITS:
    objects = {"base": 0, "grd_novel": 0, "img_novel": 0}
    referred = dict(objects)
    for rec in recs[split]:
      for o in rec["objects"]:
        objects[by_id[o.category_id].split] += 1
      for p in rec["phrases"]:
        referred[by_id[rec["objects"][p.object_index].category_id].split] += 1
    summary[split] = {"images": len(recs[split]), "objects": objects}
    if split.startswith("grd"):
      summary[split]["phrases"] = referred
  fingerprint = _fingerprint(config)
  meta = {
      "generator": "omnitrain_jax.data.shapes_world",
      "version": GENERATOR_VERSION,
      "fingerprint": fingerprint,
      "params": _params(config),
      "image_root": "images",
      "files": {s: f"{s}.json" for s in SPLITS} | {"splits": "splits.json"},
      "summary": summary,
  }
  _write_json(paths["meta"], meta)
  return {**paths, "fingerprint": fingerprint, "summary": summary,
          "seconds": time.perf_counter() - t0}


def ensure_generated(out_dir: str, *, num_workers: int | None = None,
                     **params) -> dict[str, Any]:
  """Returns the dataset in `out_dir`, generating it first if stale.

  A dataset is current when ``shapes_world.json`` exists (it is written last)
  with the fingerprint of `params` and every JSON file is present. Call it
  from one process only (the lead host); others wait and read.

  Args:
    out_dir: the dataset folder.
    num_workers: as in `generate`.
    **params: `Config` fields, as in `generate`.

  Returns:
    As `generate`; ``seconds`` is 0.0 when nothing was generated.
  """
  config = make_config(**params)
  paths = output_paths(out_dir)
  try:
    with open(paths["meta"]) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    meta = None
  if (meta is not None and meta.get("fingerprint") == _fingerprint(config)
      and all(os.path.exists(paths[k]) for k in (*SPLITS, "splits"))):
    return {**paths, "fingerprint": meta["fingerprint"],
            "summary": meta["summary"], "seconds": 0.0}
  return generate(out_dir, num_workers=num_workers, **params)


if __name__ == "__main__":
  from absl import app
  from absl import flags

  # Import by package name so worker processes unpickle the same classes.
  from omnitrain_jax.data import shapes_world as _lib

  _OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
  _NUM_IMAGES = flags.DEFINE_integer(
      "num_images", Config.num_images, "Train images per stream.")
  _NUM_VAL = flags.DEFINE_integer(
      "num_val_images", Config.num_val_images, "Val images per stream.")
  _IMAGE_SIZE = flags.DEFINE_integer(
      "image_size", Config.image_size, "Image side in pixels.")
  _SEED = flags.DEFINE_integer("seed", Config.seed, "Random seed.")
  _FORMAT = flags.DEFINE_enum("image_format", Config.image_format,
                              ["jpg", "png"], "Image file format.")
  _WORKERS = flags.DEFINE_integer(
      "num_workers", None, "Worker processes (default: automatic).")
  _IF_STALE = flags.DEFINE_bool(
      "only_if_stale", False,
      "Skip generation when DIR already holds these parameters' dataset.")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    fn = _lib.ensure_generated if _IF_STALE.value else _lib.generate
    info = fn(_OUT.value, num_workers=_WORKERS.value,
              num_images=_NUM_IMAGES.value,
              num_val_images=_NUM_VAL.value, image_size=_IMAGE_SIZE.value,
              seed=_SEED.value, image_format=_FORMAT.value)
    print(json.dumps(info, indent=1))

  app.run(_main)
