"""Readers for the real annotation formats; each returns a `RecordSource`.

Every reader yields the *record* schema of `schema.py`, so the transforms never
branch on the file format:

======================  ======  =============================================
reader                  stream  one record per
======================  ======  =============================================
`load_coco_instances`   det     image (``instances_*.json``; also Objects365
                                in COCO format)
`load_lvis`             det     image (LVIS v1 ``lvis_v1_*.json``)
`load_refcoco`          grd     referring sentence (``refs(umd).p`` +
                                ``instances.json`` of the refer release)
`load_mdetr_grounding`  grd     image entry of an MDETR ``final_*.json``
                                (RefCOCO/+/g, Flickr30k Entities, ...)
`load_coco_captions`    img     caption annotation (``captions_*.json``)
`load_caption_jsonl`    img     line ``{"image": path, "caption": text}``
`load_caption_csv`      img     row of a CSV with a header (``path,caption``)
======================  ======  =============================================

Records carry one key beyond the schema table: ``box_spans``, per box a list of
``[start, end)`` character spans into ``caption`` (MDETR's ``tokens_positive``),
so the pipeline can tokenize the caption once and take the tokens inside the
spans. RefCOCO sentences get the span of the whole sentence; det boxes get an
empty list (their text is ``box_texts``, not part of a caption).

Files are opened and decoded by `formats.py` (JSON, refs pickles, text lines),
the same parsers the vocabulary's inputs and the format sniffer use; this
module turns the parsed documents into records.

Annotation files are parsed once at construction into compact per-image numpy
structures (CSR layout: one [num_boxes, 4] array plus per-image offsets, strings
packed in one UTF-8 buffer), and record dicts are built lazily in
``__getitem__``; a source pickles quickly for grain's worker processes.

Validation happens here for annotations (images are checked when decoded, see
`images.py`). Strict mode (default) raises `DataError` naming the file, the
record and the fix at the first problem; lenient mode (``strict=False``) skips
and counts in a `SkipCounter`. Two exceptions, input the official releases
hold, are dropped and counted in both modes, with one warning per file naming
the count and the first annotation id: a COCO/LVIS instances box with zero or
negative width or height (degenerate geometry, e.g. COCO train2017 annotation
918; detectron2 and MDETR drop such boxes too), and an MDETR/GoldG box whose
``tokens_positive`` is an empty list (no caption words describe it, so it has
no token to learn). Structural errors (missing keys, wrong types, unknown
image/category ids, NaN, malformed spans) stay fatal in strict mode.

* a bad box (missing key, NaN/inf, zero or negative size, outside the image,
  unknown category or image id, bad text span) -> only that box is dropped;
* a bad image entry (missing key, bad size, bad path, bad caption, unknown
  category in its negative lists) or a bad caption line -> the whole record;
* a file that is missing, not valid JSON, or lacks a top-level key always
  raises: there is nothing to skip to.

Boxes may overflow the image by up to ``BOX_TOLERANCE_PX + BOX_TOLERANCE_FRAC *
side`` (1 px + 1%; real COCO/LVIS/Flickr boxes overflow by about a pixel from
rounding and inclusive pixel coordinates); those are clipped to the image.
Beyond that a box is "outside the image".

When a box is dropped in lenient mode (or is a COCO crowd region), its category
is still present in the image, so it is kept out of ``neg_texts``.
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import csv
import itertools
import json
import math
import operator
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np

from omnitrain_jax.data import errors
from omnitrain_jax.data import formats
from omnitrain_jax.data.errors import DataError, SkipCounter

BOX_TOLERANCE_PX = 1.0
BOX_TOLERANCE_FRAC = 0.01

_LENIENT_FIX = "or set strict=False (config data.strict) to skip it"

# A COCO image file name: "000000391895.jpg" (2017), "COCO_train2014_
# 000000391895.jpg" (2014, the refexp releases), "train2017/000000391895.jpg"
# (LVIS's coco_url); the 12 digits are the COCO image id in every release.
_COCO_FILE_RE = re.compile(r"(?:^|[/_])(\d{12})\.jpg$")

# Box check outcome codes (`check_boxes`).
BOX_OK, BOX_NONFINITE, BOX_EMPTY, BOX_OUTSIDE = 0, 1, 2, 3


# ----------------------------------------------------------------------------
# Shared building blocks.
# ----------------------------------------------------------------------------


class RecordSource(collections.abc.Sequence):
  """Random-access records of one source; usable as ``grain.MapDataset.source``.

  Attributes:
    name: the source name (``record["source"]``, skip-counter key).
    stream: ``"det"``, ``"grd"`` or ``"img"``.
    skipped: the `SkipCounter` that load-time skips were counted in (shared
      between sources when the caller passes one).
    num_skipped: how many records/boxes this source dropped at load.
    category_names: det sources: {category id: name (spaces, not
      underscores)}; None otherwise.
    category_frequency: LVIS: {category id: "r" | "c" | "f"}; None otherwise.
    num_held_out: train images that are another source's evaluation images
      (dropped or only reported, see `sources.hold_out`).
  """

  num_held_out: int = 0

  def __init__(self, *, name: str, stream: str, skipped: SkipCounter,
               num_skipped: int,
               category_names: dict[int, str] | None = None,
               category_frequency: dict[int, str] | None = None):
    self.name = name
    self.stream = stream
    self.skipped = skipped
    self.num_skipped = num_skipped
    self.category_names = category_names
    self.category_frequency = category_frequency

  def __len__(self) -> int:
    raise NotImplementedError

  def _record(self, index: int) -> dict[str, Any]:
    raise NotImplementedError

  def __getitem__(self, index) -> dict[str, Any]:
    i = operator.index(index)
    n = len(self)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"{self.name}: record {index} out of range [0, {n})")
    return self._record(i)

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, stream={self.stream!r},"
            f" records={len(self)}, skipped={self.num_skipped})")

  # The SkipCounter holds a lock and cannot be pickled; grain pickles sources
  # for its worker processes, where load-time counts are not needed (they stay
  # readable on the original object).
  def __getstate__(self):
    state = self.__dict__.copy()
    state["skipped"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.skipped = SkipCounter()


class StringTable(collections.abc.Sequence):
  """Strings packed in one UTF-8 buffer: about 3x smaller than a list of str
  and pickled as one bytes object."""

  def __init__(self, strings: Iterable[str]):
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
    self._offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
    self._data = b"".join(encoded)

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, i) -> str:
    s, e = self._offsets[i], self._offsets[i + 1]
    return self._data[s:e].decode("utf-8", "surrogatepass")


class _Problems:
  """Reports bad input: raises when strict, counts a skip otherwise."""

  def __init__(self, file: str, source: str, strict: bool,
               counter: SkipCounter):
    self.file, self.source, self.strict = file, source, strict
    self.counter = counter
    self.count = 0

  def __call__(self, record: str, problem: str, fix: str) -> None:
    errors.handle(DataError(self.file, record, problem, fix),
                  strict=self.strict, counter=self.counter, source=self.source)
    self.count += 1

  def drop(self, record: str, problem: str, fix: str) -> None:
    """Counts a skip in both modes (input an official release is known to
    hold, e.g. COCO's zero-area boxes): never raises."""
    self.counter.add(self.source, DataError(self.file, record, problem, fix))
    self.count += 1


def _counter(counter: SkipCounter | None) -> SkipCounter:
  return SkipCounter() if counter is None else counter


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _image_side(x) -> int | None:
  """An image width/height: an integer, or a numeric string as in MDETR's
  Flickr30k files ("500"); None otherwise."""
  if _is_int(x):
    return int(x)
  if isinstance(x, str) and x.strip().isascii() and x.strip().isdigit():
    return int(x.strip())
  return None


def _is_text(x) -> bool:
  return isinstance(x, str) and bool(x.strip())


def _short(x, limit: int = 80) -> str:
  s = repr(x)
  return s if len(s) <= limit else s[:limit - 3] + "..."


def coco_image_id(file_name: str) -> int | None:
  """The COCO image id a COCO file name carries, else None.

  ``"000000391895.jpg"``, ``"COCO_train2014_000000391895.jpg"`` and
  ``"http://images.cocodataset.org/train2017/000000391895.jpg"`` all give
  391895: COCO 2014 and 2017 number the same images alike, so this matches
  images across releases (RefCOCO's train2014 files, COCO/LVIS train2017).
  Any other name (a custom dataset's) gives None, so its ids never match by
  accident.
  """
  m = _COCO_FILE_RE.search(file_name) if isinstance(file_name, str) else None
  return int(m.group(1)) if m else None


def check_boxes(xyxy: np.ndarray, width: np.ndarray, height: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """Validates and clips boxes against their images' sizes.

  Args:
    xyxy: float [n, 4] boxes ``x0, y0, x1, y1`` in pixels.
    width: [n] or scalar, the width of each box's image.
    height: [n] or scalar, the height of each box's image.

  Returns:
    (clipped float32 [n, 4], int8 [n] codes: `BOX_OK`, `BOX_NONFINITE`,
    `BOX_EMPTY` (zero or negative size), `BOX_OUTSIDE` (beyond the tolerance,
    or nothing left after clipping)).
  """
  xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
  n = len(xyxy)
  w = np.broadcast_to(np.asarray(width, np.float64), (n,))
  h = np.broadcast_to(np.asarray(height, np.float64), (n,))
  codes = np.zeros(n, np.int8)
  finite = np.isfinite(xyxy).all(axis=1)
  codes[~finite] = BOX_NONFINITE
  with np.errstate(invalid="ignore"):
    empty = finite & ((xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1]))
    codes[empty] = BOX_EMPTY
    tol_x = BOX_TOLERANCE_PX + BOX_TOLERANCE_FRAC * w
    tol_y = BOX_TOLERANCE_PX + BOX_TOLERANCE_FRAC * h
    outside = ((xyxy[:, 0] < -tol_x) | (xyxy[:, 1] < -tol_y) |
               (xyxy[:, 2] > w + tol_x) | (xyxy[:, 3] > h + tol_y))
    clipped = np.stack([np.clip(xyxy[:, 0], 0, w), np.clip(xyxy[:, 1], 0, h),
                        np.clip(xyxy[:, 2], 0, w), np.clip(xyxy[:, 3], 0, h)],
                       axis=1)
    nothing_left = ((clipped[:, 2] <= clipped[:, 0]) |
                    (clipped[:, 3] <= clipped[:, 1]))
  codes[(codes == BOX_OK) & (outside | nothing_left)] = BOX_OUTSIDE
  return clipped.astype(np.float32), codes


def box_problem(code: int, xyxy: Sequence[float], width: float,
                height: float) -> str:
  """The `DataError` problem text for a `check_boxes` code."""
  box = "[" + ", ".join(f"{v:g}" for v in xyxy) + "]"
  if code == BOX_NONFINITE:
    return f"non-finite box: x0, y0, x1, y1 = {box} contains NaN or infinity"
  if code == BOX_EMPTY:
    return (f"empty box: x0, y0, x1, y1 = {box} has zero or negative width or"
            " height")
  assert code == BOX_OUTSIDE, code
  tx = BOX_TOLERANCE_PX + BOX_TOLERANCE_FRAC * width
  ty = BOX_TOLERANCE_PX + BOX_TOLERANCE_FRAC * height
  return (f"box outside image: x0, y0, x1, y1 = {box} leaves the {width:g}x"
          f"{height:g} image by more than the tolerance ({tx:.1f}, {ty:.1f} "
          "px)")


def _xywh_ok(bbox) -> bool:
  return (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and
          all(_is_number(v) for v in bbox))


def _xyxy_from_json(bboxes: list) -> tuple[np.ndarray, np.ndarray]:
  """JSON [x, y, w, h] lists -> (float64 [n, 4] x0, y0, x1, y1, bool [n]
  malformed); malformed rows are NaN, so `check_boxes` rejects them too."""
  n = len(bboxes)
  # Type checks in C (set(map(...))): a Python check per box costs seconds
  # on LVIS-sized files.
  if (set(map(type, bboxes)) <= {list} and set(map(len, bboxes)) <= {4} and
      set(map(type, itertools.chain.from_iterable(bboxes))) <= {int, float}):
    xywh = np.array(bboxes, np.float64).reshape(n, 4)
    malformed = np.zeros(n, bool)
  else:
    malformed = np.array([not _xywh_ok(b) for b in bboxes], bool).reshape(n)
    xywh = np.array([[math.nan] * 4 if bad else b
                     for b, bad in zip(bboxes, malformed)],
                    np.float64).reshape(n, 4)
  return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), malformed


def _annotation_problem(a, k: int, images: _Images, categories: Mapping,
                        problems: _Problems, required=("image_id",
                                                       "category_id", "bbox")
                        ) -> None:
  """Reports why annotation `a` (index `k`) failed the fast path."""
  if not isinstance(a, dict):
    problems(f"annotations[{k}]", f"malformed annotation: expected a JSON "
             f"object, got {_short(a)}", f"fix it, {_LENIENT_FIX}")
    return
  rec = f"annotation id {a.get('id', f'#{k}')} (image id {a.get('image_id')})"
  missing = [key for key in required if key not in a]
  if missing:
    problems(rec, f"missing required key: {missing[0]!r} in annotation",
             f"fix the annotation, {_LENIENT_FIX}")
    return
  iid = a["image_id"]
  if not _is_int(iid) or iid not in images.index_of:
    if not (_is_int(iid) and iid in images.dropped):  # Else already reported.
      problems(rec, f"unknown image id: {_short(iid)} is not in 'images'",
               f"fix the annotation, {_LENIENT_FIX}")
    return
  cid = a.get("category_id")
  problems(rec, f"unknown category id: {_short(cid)} is not in 'categories'",
           f"fix the annotation, {_LENIENT_FIX}")


def _csr_offsets(rows: np.ndarray, num_rows: int) -> np.ndarray:
  """Offsets [num_rows + 1] of row-sorted items with row ids `rows`."""
  offsets = np.zeros(num_rows + 1, np.int64)
  np.cumsum(np.bincount(rows, minlength=num_rows), out=offsets[1:])
  return offsets


class _Images:
  """The ``images`` list of a COCO-style file: ids, sizes and paths."""

  def __init__(self, entries: list, problems: _Problems,
               path_of: Callable[[dict], str | None], path_fix: str,
               extra: Callable[[int, dict, str], bool] | None = None,
               string_sizes: bool = False):
    """Parses the entries; bad ones are reported to `problems`.

    Args:
      entries: the JSON ``images`` list.
      problems: where bad entries go.
      path_of: entry -> relative image path, None when missing/malformed.
      path_fix: the fix to print for a bad path.
      extra: optional (kept index, entry, record name) -> ok; extra per-image
        parsing by the caller; False drops the entry (already reported).
      string_sizes: also accept ``width``/``height`` given as numeric strings
        (MDETR's Flickr30k files carry ``"500"``).
    """
    ids, widths, heights, paths = [], [], [], []
    self.index_of: dict[int, int] = {}
    self.dropped: set = set()  # ids of dropped entries (their boxes go too).
    for k, im in enumerate(entries):
      if not isinstance(im, dict):
        problems(f"images[{k}]", "malformed image entry: expected a JSON "
                 f"object, got {_short(im)}", f"fix the entry, {_LENIENT_FIX}")
        continue
      iid = im.get("id")
      rec = f"image id {iid}" if _is_int(iid) else f"images[{k}]"
      if not _is_int(iid):
        problems(rec, "missing required key: 'id' (an integer) in image entry",
                 f"fix the entry, {_LENIENT_FIX}")
        continue
      iid = int(iid)
      if iid in self.index_of:
        problems(rec, "duplicate image id: listed twice in 'images'",
                 f"remove the duplicate, {_LENIENT_FIX}")
        continue
      w, h = im.get("width"), im.get("height")
      if string_sizes:
        w = _image_side(w) if _image_side(w) is not None else w
        h = _image_side(h) if _image_side(h) is not None else h
      if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
        key = "width" if "width" not in im else "height"
        expected = ("positive integers or numeric strings" if string_sizes
                    else "positive integers")
        problem = (f"missing required key: {key!r}" if key not in im else
                   f"bad image size: width={_short(w)}, height={_short(h)}; "
                   f"expected {expected}")
        problems(rec, problem, f"fix the entry, {_LENIENT_FIX}")
        self.dropped.add(iid)
        continue
      rel = path_of(im)
      if rel is None:
        given = {key: im.get(key) for key in ("file_name", "coco_url")}
        problems(rec, "missing required key: no usable image path in "
                 f"{_short(given)}", f"{path_fix}, {_LENIENT_FIX}")
        self.dropped.add(iid)
        continue
      if extra is not None and not extra(len(ids), im, rec):
        self.dropped.add(iid)
        continue
      self.index_of[iid] = len(ids)
      ids.append(iid)
      widths.append(w)
      heights.append(h)
      paths.append(rel)
    self.ids = np.asarray(ids, np.int64)
    self.widths = np.asarray(widths, np.int32)
    self.heights = np.asarray(heights, np.int32)
    self.paths = StringTable(paths)

  def __len__(self) -> int:
    return len(self.ids)


def _file_name(im: dict) -> str | None:
  name = im.get("file_name")
  return name if _is_text(name) else None


def _image_dir(image_dir) -> str:
  return os.path.abspath(os.fspath(image_dir))


def _box_fields(n: int) -> dict[str, Any]:
  """Empty per-box fields of a record with no boxes."""
  return {"boxes": np.zeros((n, 4), np.float32), "box_texts": [],
          "category_ids": np.zeros((n,), np.int32),
          "phrase_ids": np.zeros((n,), np.int32), "box_spans": []}


def _log_loaded(source: RecordSource, path: str, extra: str = "") -> None:
  logging.info("%s: loaded %d %s records from %s%s; skipped %d bad entries",
               source.name, len(source), source.stream, path, extra,
               source.num_skipped)


# ----------------------------------------------------------------------------
# Detection: COCO and LVIS instances.
# ----------------------------------------------------------------------------


class DetectionSource(RecordSource):
  """Records of a COCO/LVIS-style instances file, one per image."""

  def __init__(self, *, name, image_dir, images: _Images, order, box_offsets,
               boxes, box_cats, categories: dict[int, str], exhaustive: bool,
               present_unboxed: dict[int, tuple[int, ...]],
               neg_offsets=None, neg_ids=None, nex_offsets=None, nex_ids=None,
               category_frequency=None, skipped, num_skipped):
    super().__init__(name=name, stream="det", skipped=skipped,
                     num_skipped=num_skipped, category_names=categories,
                     category_frequency=category_frequency)
    self._image_dir = image_dir
    self._images = images
    self._order = order              # record -> image index, int64 [R]
    self._box_offsets = box_offsets  # int64 [I + 1]
    self._boxes = boxes              # float32 [total, 4] x0, y0, x1, y1
    self._box_cats = box_cats        # int32 [total]
    self._exhaustive = exhaustive
    self._present_unboxed = present_unboxed
    self._neg = (neg_offsets, neg_ids)
    self._nex = (nex_offsets, nex_ids)
    self._cat_items = sorted(categories.items())

  def __len__(self) -> int:
    return len(self._order)

  @property
  def num_boxes(self) -> int:
    return int(np.diff(self._box_offsets)[self._order].sum())

  def coco_image_ids(self) -> np.ndarray:
    """int64 [R]: each record's COCO image id from its file name (-1 where
    the name is no COCO file name; see `coco_image_id`)."""
    paths = self._images.paths
    return np.fromiter(
        ((-1 if (c := coco_image_id(paths[j])) is None else c)
         for j in self._order.tolist()), np.int64, len(self._order))

  def without_records(self, drop: np.ndarray) -> DetectionSource:
    """A copy without the records where `drop` (bool [R]) is True."""
    # Not copy.copy: `__getstate__` leaves the shared skip counter behind.
    out = object.__new__(type(self))
    out.__dict__.update(self.__dict__)
    out._order = self._order[~np.asarray(drop, bool)]
    return out

  def _record(self, index: int) -> dict[str, Any]:
    j = int(self._order[index])
    im = self._images
    s, e = self._box_offsets[j], self._box_offsets[j + 1]
    cats = self._box_cats[s:e].tolist()
    names = self.category_names
    if self._exhaustive:
      present = set(cats).union(self._present_unboxed.get(j, ()))
      neg_texts = [n for c, n in self._cat_items if c not in present]
      nex_texts = []
    else:
      neg_texts = [names[c] for c in _csr_row(self._neg, j)]
      nex_texts = [names[c] for c in _csr_row(self._nex, j)]
    n = e - s
    return {
        "stream": "det",
        "source": self.name,
        "image_id": int(im.ids[j]),
        "image_path": os.path.join(self._image_dir, im.paths[j]),
        "image_bytes": None,
        "width": int(im.widths[j]),
        "height": int(im.heights[j]),
        "boxes": self._boxes[s:e].copy(),
        "box_texts": [names[c] for c in cats],
        "category_ids": np.asarray(cats, np.int32).reshape(n),
        "phrase_ids": np.arange(n, dtype=np.int32),
        "caption": "",
        "neg_texts": neg_texts,
        "not_exhaustive_texts": nex_texts,
        "box_spans": [[] for _ in range(n)],
    }


def _csr_row(csr, j: int) -> list[int]:
  offsets, values = csr
  return values[offsets[j]:offsets[j + 1]].tolist()


def _parse_categories(cats: list, problems: _Problems, lvis: bool
                      ) -> tuple[dict[int, str], dict[int, str]]:
  names, freq = {}, {}
  for k, c in enumerate(cats):
    cid = c.get("id") if isinstance(c, dict) else None
    rec = f"category id {cid}" if _is_int(cid) else f"categories[{k}]"
    if not _is_int(cid) or not isinstance(c, dict):
      problems(rec, "missing required key: 'id' (an integer) in category",
               f"fix the category, {_LENIENT_FIX}")
      continue
    name = c.get("name")
    if not _is_text(name):
      problems(rec, f"bad category name: {_short(name)}; expected non-empty "
               "text", f"fix the category, {_LENIENT_FIX}")
      continue
    if int(cid) in names:
      problems(rec, "duplicate category id", f"remove the duplicate, "
               f"{_LENIENT_FIX}")
      continue
    # LVIS names use underscores ("hot_dog"); the token vocabulary wants words.
    names[int(cid)] = name.replace("_", " ").strip() if lvis else name.strip()
    if lvis and c.get("frequency") in ("r", "c", "f"):
      freq[int(cid)] = c["frequency"]
  return names, freq


@formats.gc_paused
def _checked_boxes(bboxes, rows, ann_ids, images, problems,
                   drop_empty: bool = False):
  """Validates JSON ``[x, y, w, h]`` boxes; reports each bad one.

  With `drop_empty`, zero or negative width/height (`BOX_EMPTY`: degenerate
  geometry, which official releases hold, e.g. COCO train2017 annotation 918)
  is dropped and counted in both modes, with one warning per file; every other
  problem goes to `problems` (raises when strict).

  Returns:
    (clipped xyxy boxes [n, 4], their `check_boxes` codes [n]).
  """
  xyxy, malformed = _xyxy_from_json(bboxes)
  w, h = images.widths[rows], images.heights[rows]
  boxes, codes = check_boxes(xyxy, w, h)
  dropped = []
  for b in np.flatnonzero(codes):
    rec = f"annotation id {ann_ids[b]} (image id {images.ids[rows[b]]})"
    if malformed[b]:
      problem = (f"malformed box: bbox {_short(bboxes[b])} is not 4 numbers "
                 "[x, y, width, height]")
    else:
      problem = box_problem(codes[b], xyxy[b], w[b], h[b])
    if drop_empty and codes[b] == BOX_EMPTY and not malformed[b]:
      problems.drop(rec, problem, "none needed: the box is dropped and "
                    "counted in both modes")
      dropped.append(ann_ids[b])
      continue
    problems(rec, problem, f"fix or remove the annotation, {_LENIENT_FIX}")
  if dropped:
    logging.warning(
        "%s: %s: dropped %d box(es) with zero or negative width or height "
        "(degenerate geometry, counted as skips; first: annotation id %s)",
        problems.source, problems.file, len(dropped), dropped[0])
  return boxes, codes


def _parse_instances(path: str, image_dir, *, name: str, strict: bool,
                     counter: SkipCounter | None, skip_empty: bool,
                     lvis: bool) -> DetectionSource:
  """Shared COCO/LVIS parser."""
  counter = _counter(counter)
  problems = _Problems(path, name, strict, counter)
  data = formats.load_json(path)
  what = "an LVIS instances file" if lvis else "a COCO instances file"
  formats.check_top_level(data, path, ("images", "annotations", "categories"),
                          what)
  categories, frequency = _parse_categories(data["categories"], problems, lvis)

  neg_rows, nex_rows = [], []

  def lvis_lists(index: int, im: dict, rec: str) -> bool:
    """Parses one image's LVIS negative / not-exhaustive category lists."""
    lists = []
    for key in ("neg_category_ids", "not_exhaustive_category_ids"):
      ids = im.get(key)
      if not isinstance(ids, list) or not all(_is_int(c) for c in ids):
        problems(rec, f"missing required key: {key!r} (a list of category ids"
                 f"), got {_short(ids)}",
                 "load LVIS files with load_lvis and COCO files with "
                 f"load_coco_instances; fix the entry, {_LENIENT_FIX}")
        return False
      unknown = [c for c in ids if c not in categories]
      if unknown:
        problems(rec, f"unknown category id: {key} lists {unknown[:5]} not in "
                 "'categories'", f"fix the entry, {_LENIENT_FIX}")
        return False
      lists.append(ids)
    del index  # Rows are appended in kept order.
    neg_rows.append(lists[0])
    nex_rows.append(lists[1])
    return True

  if lvis:
    def path_of(im):
      # An explicit file_name wins; LVIS v1 only has coco_url, whose last two
      # components ("train2017/000000391895.jpg") sit under a COCO root.
      if _is_text(im.get("file_name")):
        return im["file_name"]
      url = im.get("coco_url")
      if _is_text(url) and url.count("/") >= 1:
        return "/".join(url.rstrip("/").split("/")[-2:])
      return None
    path_fix = ("give the image a 'coco_url' or 'file_name'")
  else:
    path_of = _file_name
    path_fix = "give the image a 'file_name'"
  images = _Images(data["images"], problems, path_of, path_fix,
                   lvis_lists if lvis else None)
  num_images = len(images)

  rows, cats, ann_ids, bboxes = [], [], [], []
  unboxed: dict[int, set[int]] = collections.defaultdict(set)
  index_of = images.index_of
  for k, a in enumerate(data["annotations"]):
    # Fast path for well-formed annotations (LVIS train has 1.3M); anything
    # odd is diagnosed by _annotation_problem.
    try:
      j = index_of[a["image_id"]]
      cid = a["category_id"]
      bbox = a["bbox"]
      known = cid in categories
    except (KeyError, TypeError):
      j, known = None, False
    if not known:
      _annotation_problem(a, k, images, categories, problems)
      continue
    if a.get("iscrowd", 0):
      # Crowd regions are no targets, but their category is present.
      unboxed[j].add(cid)
      continue
    rows.append(j)
    cats.append(cid)
    ann_ids.append(a.get("id", f"#{k}"))
    bboxes.append(bbox)

  rows = np.asarray(rows, np.int64)
  boxes, codes = _checked_boxes(bboxes, rows, ann_ids, images, problems,
                                drop_empty=True)
  for b in np.flatnonzero(codes):
    # A dropped box's object is still in the image: not a negative.
    unboxed[int(rows[b])].add(cats[b])
  keep = codes == BOX_OK
  rows, boxes = rows[keep], boxes[keep]
  box_cats = np.asarray(cats, np.int32).reshape(-1)[keep]
  sort = np.argsort(rows, kind="stable")  # Keeps file order within an image.
  rows, boxes, box_cats = rows[sort], boxes[sort], box_cats[sort]
  offsets = _csr_offsets(rows, num_images)

  order = np.arange(num_images, dtype=np.int64)
  if skip_empty:
    order = order[np.diff(offsets) > 0]
  extra = {}
  if lvis:
    extra = dict(neg_offsets=_csr_offsets_of(neg_rows),
                 neg_ids=_flat_int32(neg_rows),
                 nex_offsets=_csr_offsets_of(nex_rows),
                 nex_ids=_flat_int32(nex_rows),
                 category_frequency=frequency)
  source = DetectionSource(
      name=name, image_dir=_image_dir(image_dir), images=images, order=order,
      box_offsets=offsets, boxes=boxes, box_cats=box_cats,
      categories=categories, exhaustive=not lvis,
      present_unboxed={j: tuple(sorted(c)) for j, c in unboxed.items()},
      skipped=counter, num_skipped=problems.count, **extra)
  _log_loaded(source, path, f" ({num_images - len(order)} empty images "
              "dropped)" if skip_empty else "")
  return source


def _flat_int32(rows: list[list[int]]) -> np.ndarray:
  return np.fromiter(itertools.chain.from_iterable(rows), np.int32)


def _csr_offsets_of(rows: list[list[int]]) -> np.ndarray:
  offsets = np.zeros(len(rows) + 1, np.int64)
  np.cumsum([len(r) for r in rows], out=offsets[1:])
  return offsets


def load_coco_instances(json_path: str | os.PathLike, image_dir: str |
                        os.PathLike, *, name: str = "coco", strict: bool = True,
                        counter: SkipCounter | None = None,
                        skip_empty: bool = False) -> DetectionSource:
  """COCO-format instances (``instances_train2017.json``), one record per image.

  ``iscrowd`` boxes are not targets (their category is not a negative either).
  COCO is exhaustive: ``neg_texts`` lists every category of the file absent
  from the image.

  Args:
    json_path: the instances JSON.
    image_dir: folder the images' ``file_name`` is relative to.
    name: source name for records, messages and skip counts.
    strict: raise on the first bad entry (True) or skip and count it.
    counter: where skips are counted (a new one when None).
    skip_empty: drop images without any (valid, non-crowd) box.

  Returns:
    A det `RecordSource`.
  """
  return _parse_instances(os.fspath(json_path), image_dir, name=name,
                          strict=strict, counter=counter,
                          skip_empty=skip_empty, lvis=False)


def load_lvis(json_path: str | os.PathLike, image_dir: str | os.PathLike, *,
              name: str = "lvis", strict: bool = True,
              counter: SkipCounter | None = None,
              skip_empty: bool = False) -> DetectionSource:
  """LVIS v1 instances (``lvis_v1_train.json``), one record per image.

  Image paths come from ``file_name`` when present, else from the last two
  components of ``coco_url`` (``train2017/000000391895.jpg``), relative to
  `image_dir` (the COCO root holding ``train2017/`` and ``val2017/``).
  Category names turn underscores into spaces (``hot_dog`` -> ``hot dog``);
  ``neg_category_ids`` become ``neg_texts`` and ``not_exhaustive_category_ids``
  ``not_exhaustive_texts``. ``source.category_frequency`` maps category ids to
  ``"r"``/``"c"``/``"f"`` for APr/APc/APf.

  Args:
    json_path: the LVIS JSON.
    image_dir: the COCO image root.
    name: source name.
    strict: raise on the first bad entry (True) or skip and count it.
    counter: where skips are counted (a new one when None).
    skip_empty: drop images without any valid box.

  Returns:
    A det `RecordSource`.
  """
  return _parse_instances(os.fspath(json_path), image_dir, name=name,
                          strict=strict, counter=counter,
                          skip_empty=skip_empty, lvis=True)


# ----------------------------------------------------------------------------
# Grounding: RefCOCO(g) refer release and MDETR-style JSON.
# ----------------------------------------------------------------------------


class GroundingSource(RecordSource):
  """Grounding records: an image, a caption, boxes with text spans."""

  def __init__(self, *, name, image_dir, images: _Images, rec_image,
               captions: StringTable, box_offsets, boxes, phrase_ids,
               span_offsets, spans, skipped, num_skipped):
    super().__init__(name=name, stream="grd", skipped=skipped,
                     num_skipped=num_skipped)
    self._image_dir = image_dir
    self._images = images
    self._rec_image = rec_image        # int64 [R] record -> image index
    self._captions = captions          # R strings
    self._box_offsets = box_offsets    # int64 [R + 1]
    self._boxes = boxes                # float32 [total, 4]
    self._phrase_ids = phrase_ids      # int32 [total]
    self._span_offsets = span_offsets  # int64 [total + 1]
    self._spans = spans                # int32 [num_spans, 2]

  def __len__(self) -> int:
    return len(self._rec_image)

  def _record(self, index: int) -> dict[str, Any]:
    j = int(self._rec_image[index])
    im = self._images
    caption = self._captions[index]
    s, e = self._box_offsets[index], self._box_offsets[index + 1]
    box_spans = [self._spans[self._span_offsets[b]:self._span_offsets[b + 1]]
                 .tolist() for b in range(s, e)]
    return {
        "stream": "grd",
        "source": self.name,
        "image_id": int(im.ids[j]),
        "image_path": os.path.join(self._image_dir, im.paths[j]),
        "image_bytes": None,
        "width": int(im.widths[j]),
        "height": int(im.heights[j]),
        "boxes": self._boxes[s:e].copy(),
        "box_texts": [" ".join(caption[a:b] for a, b in sp)
                      for sp in box_spans],
        "category_ids": np.full((e - s,), -1, np.int32),
        "phrase_ids": self._phrase_ids[s:e].copy(),
        "caption": caption,
        "neg_texts": [],
        "not_exhaustive_texts": [],
        "box_spans": box_spans,
    }


def _spans_ok(spans, n: int) -> bool:
  return (isinstance(spans, list) and len(spans) > 0 and
          all(isinstance(sp, (list, tuple)) and len(sp) == 2 and
              _is_int(sp[0]) and _is_int(sp[1]) and 0 <= sp[0] < sp[1] <= n
              for sp in spans))


@formats.gc_paused
def load_mdetr_grounding(json_path: str | os.PathLike,
                         image_dir: str | os.PathLike, *, name: str = "mdetr",
                         strict: bool = True,
                         counter: SkipCounter | None = None,
                         skip_empty: bool = False) -> GroundingSource:
  """MDETR-style grounding JSON (``final_refcocog_train.json``,
  ``final_flickr_separateGT_train.json``, ...), one record per image entry.

  Each image entry holds a ``caption``; each annotation a ``bbox`` [x, y, w, h]
  and ``tokens_positive``, the ``[start, end)`` character spans of the caption
  that describe it. ``box_texts[i]`` joins box i's span texts with a space and
  ``box_spans[i]`` keeps the spans. ``phrase_ids`` number the phrases densely
  per record: by the annotation's ``phrase_ids`` when present (Flickr30k
  entities), else boxes with identical ``tokens_positive`` share a phrase.

  The files as MDETR released them are accepted: image ``width``/``height``
  given as numeric strings (``"500"`` in ``final_flickr_separateGT_*.json``),
  extra keys (``iscrowd``, ``area``, ``tokens_positive_eval``, ...; ``iscrowd``
  is not used), and boxes overflowing the image within the tolerance (clipped,
  as MDETR clamps). A box whose ``tokens_positive`` is an empty list (no
  caption words describe it; MDETR's releases hold such boxes) is dropped and
  counted in both modes, with one warning per file; a malformed span (not
  ``[start, end)`` integer pairs inside the caption) is a bad text span.

  Args:
    json_path: the MDETR JSON.
    image_dir: folder the entries' ``file_name`` is relative to.
    name: source name.
    strict: raise on the first bad entry (True) or skip and count it.
    counter: where skips are counted (a new one when None).
    skip_empty: drop entries without any valid box.

  Returns:
    A grd `RecordSource`.
  """
  path = os.fspath(json_path)
  counter = _counter(counter)
  problems = _Problems(path, name, strict, counter)
  data = formats.load_json(path)
  formats.check_top_level(data, path, ("images", "annotations"),
                          "an MDETR grounding file")
  captions = []

  def caption_of(index: int, im: dict, rec: str) -> bool:
    caption = im.get("caption")
    if not _is_text(caption):
      problems(rec, "bad caption: expected non-empty text, got "
               f"{_short(caption)}", f"fix the entry, {_LENIENT_FIX}")
      return False
    assert index == len(captions)
    captions.append(caption)
    return True

  images = _Images(data["images"], problems, _file_name,
                   "give the entry a 'file_name'", caption_of,
                   string_sizes=True)
  rows, bboxes, keys, spans_list, ann_ids, no_text = [], [], [], [], [], []
  index_of = images.index_of
  for k, a in enumerate(data["annotations"]):
    try:
      j = index_of[a["image_id"]]
      bbox, spans = a["bbox"], a["tokens_positive"]
    except (KeyError, TypeError):
      _annotation_problem(a, k, images, {}, problems,
                          ("image_id", "bbox", "tokens_positive"))
      continue
    if isinstance(spans, list) and not spans and isinstance(bbox, list):
      # A box no caption words describe: MDETR's releases hold such boxes
      # and training has no token to give them. Dropped in both modes.
      problems.drop(f"annotation id {a.get('id', f'#{k}')} (image id "
                    f"{a['image_id']})", "empty text span: tokens_positive "
                    "is [] (no caption words describe the box)",
                    "none needed: the box is dropped and counted in both "
                    "modes")
      no_text.append(a.get("id", f"#{k}"))
      continue
    if not _spans_ok(spans, len(captions[j])):
      problems(f"annotation id {a.get('id', f'#{k}')} (image id "
               f"{a['image_id']})", f"bad text span: tokens_positive "
               f"{_short(spans)} must be a non-empty list of [start, end) "
               f"with 0 <= start < end <= {len(captions[j])} (the caption's "
               f"length)", f"fix the annotation, {_LENIENT_FIX}")
      continue
    spans = [(int(s), int(e)) for s, e in spans]
    pid = a.get("phrase_ids")
    # A hashable phrase key; dense ids are assigned per record below.
    if pid is None:
      key = ("s", tuple(spans))
    else:
      key = ("p", pid if isinstance(pid, (int, str)) else repr(pid))
    rows.append(j)
    bboxes.append(bbox)
    keys.append(key)
    spans_list.append(spans)
    ann_ids.append(a.get("id", f"#{k}"))

  if no_text:
    logging.warning(
        "%s: %s: dropped %d box(es) with an empty tokens_positive (no "
        "caption words describe them; counted as skips; first: annotation "
        "id %s)", name, path, len(no_text), no_text[0])
  rows = np.asarray(rows, np.int64)
  boxes, codes = _checked_boxes(bboxes, rows, ann_ids, images, problems)
  keep = np.flatnonzero(codes == BOX_OK)
  keep = keep[np.argsort(rows[keep], kind="stable")]
  rows, boxes = rows[keep], boxes[keep]
  keys = [keys[b] for b in keep]
  spans_list = [spans_list[b] for b in keep]
  offsets = _csr_offsets(rows, len(images))
  phrase_ids = np.zeros(len(rows), np.int32)
  for j in range(len(images)):
    dense: dict = {}
    for b in range(offsets[j], offsets[j + 1]):
      phrase_ids[b] = dense.setdefault(keys[b], len(dense))

  order = np.arange(len(images), dtype=np.int64)
  if skip_empty:
    order = order[np.diff(offsets) > 0]
  source = _grounding_source(
      name=name, image_dir=image_dir, images=images, order=order,
      captions=captions, offsets=offsets, boxes=boxes, phrase_ids=phrase_ids,
      spans_list=spans_list, skipped=counter, num_skipped=problems.count)
  _log_loaded(source, path)
  return source


def _grounding_source(*, name, image_dir, images, order, captions, offsets,
                      boxes, phrase_ids, spans_list, skipped, num_skipped
                      ) -> GroundingSource:
  """Builds a `GroundingSource` whose records are the images in `order`.

  Args:
    order: int64 [R], the image index of each record.
    captions: list, caption of each image (indexed like `images`).
    offsets: int64 [I + 1], each image's boxes in `boxes`.
    (the rest: per box, sorted by image).
  """
  counts = np.diff(offsets)[order]
  rec_offsets = np.zeros(len(order) + 1, np.int64)
  np.cumsum(counts, out=rec_offsets[1:])
  take = (np.concatenate([np.arange(offsets[j], offsets[j + 1])
                          for j in order]).astype(np.int64)
          if len(order) else np.zeros(0, np.int64))
  spans_of = [spans_list[b] for b in take]
  span_offsets = np.zeros(len(take) + 1, np.int64)
  np.cumsum([len(sp) for sp in spans_of], out=span_offsets[1:])
  spans = np.asarray([sp for s in spans_of for sp in s],
                     np.int32).reshape(-1, 2)
  return GroundingSource(
      name=name, image_dir=_image_dir(image_dir), images=images,
      rec_image=order, captions=StringTable(captions[j] for j in order),
      box_offsets=rec_offsets, boxes=boxes[take].reshape(-1, 4),
      phrase_ids=phrase_ids[take], span_offsets=span_offsets, spans=spans,
      skipped=skipped, num_skipped=num_skipped)


@formats.gc_paused
def load_refcoco(refs_path: str | os.PathLike,
                 instances_path: str | os.PathLike,
                 image_dir: str | os.PathLike, *, split: str,
                 name: str = "refcocog", text_key: str = "raw",
                 strict: bool = True,
                 counter: SkipCounter | None = None) -> GroundingSource:
  """RefCOCO/RefCOCO+/RefCOCOg of the refer release, one record per sentence.

  The record's single box is the referred annotation's ``bbox`` (from
  ``instances.json``); ``box_texts`` is ``[sentence]``, ``caption`` the
  sentence (stripped), ``box_spans`` the whole sentence.

  Args:
    refs_path: ``refs(umd).p`` (a Python 2 pickle of plain data; it is loaded
      with an unpickler that refuses any class).
    instances_path: the release's ``instances.json`` (COCO train2014 images
      and annotations).
    image_dir: the COCO ``train2014`` folder.
    split: the refs' ``split`` value: ``train``, ``val``, ``test`` (umd;
      ``testA``/``testB`` for unc).
    name: source name.
    text_key: sentence field: ``raw`` (as typed) or ``sent`` (lower-cased,
      tokenized by the release).
    strict: raise on the first bad entry (True) or skip and count it.
    counter: where skips are counted (a new one when None).

  Returns:
    A grd `RecordSource`.
  """
  refs_path, instances_path = os.fspath(refs_path), os.fspath(instances_path)
  counter = _counter(counter)
  instance_problems = _Problems(instances_path, name, strict, counter)
  data = formats.load_json(instances_path)
  formats.check_top_level(data, instances_path, ("images", "annotations"),
                          "the refer release's instances.json")
  images = _Images(data["images"], instance_problems, _file_name,
                   "give the image a 'file_name'")
  anns = {}
  for a in data["annotations"]:
    if isinstance(a, dict) and _is_int(a.get("id")):
      anns[int(a["id"])] = a  # Checked when a ref uses it.
  refs = formats.load_refs(refs_path)
  splits = sorted({r.get("split") for r in refs if isinstance(r, dict)},
                  key=str)
  if split not in splits:
    raise ValueError(f"split {split!r} is not in {refs_path}; it has splits "
                     f"{splits}. Pass one of them.")

  problems = _Problems(refs_path, name, strict, counter)
  rec_image, captions, boxes = [], [], []
  for k, r in enumerate(refs):
    if not isinstance(r, dict) or r.get("split") != split:
      continue
    rec = f"ref_id {r.get('ref_id', f'#{k}')}"
    missing = [key for key in ("ann_id", "image_id", "sentences")
               if key not in r]
    if missing:
      problems(rec, f"missing required key: {missing[0]!r} in ref",
               f"fix the ref, {_LENIENT_FIX}")
      continue
    a = anns.get(r["ann_id"]) if _is_int(r["ann_id"]) else None
    if a is None:
      problems(rec, f"unknown annotation id: ann_id {_short(r['ann_id'])} is "
               f"not in {os.path.basename(instances_path)}",
               f"use the instances.json of the same release, {_LENIENT_FIX}")
      continue
    j = images.index_of.get(a.get("image_id"))
    if j is None:
      problems(rec, f"unknown image id: {_short(a.get('image_id'))} of ann_id"
               f" {r['ann_id']} is not a valid image of the instances file",
               f"use the instances.json of the same release, {_LENIENT_FIX}")
      continue
    bbox = a.get("bbox")
    if not _xywh_ok(bbox):
      problems(rec, f"malformed box: bbox {_short(bbox)} of ann_id "
               f"{r['ann_id']} is not 4 numbers", f"fix it, {_LENIENT_FIX}")
      continue
    x, y, bw, bh = (float(v) for v in bbox)
    xyxy = [x, y, x + bw, y + bh]
    box, code = check_boxes(xyxy, images.widths[j], images.heights[j])
    if code[0]:
      problems(rec, box_problem(code[0], xyxy, images.widths[j],
                                images.heights[j]),
               f"fix annotation {r['ann_id']}, {_LENIENT_FIX}")
      continue
    sentences = r["sentences"] if isinstance(r["sentences"], list) else [None]
    for m, s in enumerate(sentences):
      text = s.get(text_key) if isinstance(s, dict) else None
      if not _is_text(text):
        sid = s.get("sent_id", m) if isinstance(s, dict) else m
        problems(f"{rec} sent_id {sid}", f"bad caption: sentence "
                 f"{text_key!r} is {_short(text)}; expected non-empty text",
                 f"fix the sentence, {_LENIENT_FIX}")
        continue
      rec_image.append(j)
      captions.append(text.strip())
      boxes.append(box[0])

  n = len(rec_image)
  order = np.asarray(rec_image, np.int64)
  source = GroundingSource(
      name=name, image_dir=_image_dir(image_dir), images=images,
      rec_image=order, captions=StringTable(captions),
      box_offsets=np.arange(n + 1, dtype=np.int64),
      boxes=np.asarray(boxes, np.float32).reshape(n, 4),
      phrase_ids=np.zeros(n, np.int32),
      span_offsets=np.arange(n + 1, dtype=np.int64),
      spans=np.stack([np.zeros(n, np.int32),
                      np.asarray([len(c) for c in captions], np.int32)],
                     axis=1).reshape(n, 2),
      skipped=counter,
      num_skipped=problems.count + instance_problems.count)
  _log_loaded(source, refs_path, f" (split {split})")
  return source


# ----------------------------------------------------------------------------
# Captions: COCO captions JSON, JSONL, CSV.
# ----------------------------------------------------------------------------


class CaptionSource(RecordSource):
  """Image-caption records (stream ``img``, no boxes)."""

  def __init__(self, *, name, image_dir, paths: StringTable,
               captions: StringTable, image_ids, widths, heights, skipped,
               num_skipped):
    super().__init__(name=name, stream="img", skipped=skipped,
                     num_skipped=num_skipped)
    self._image_dir = image_dir
    self._paths = paths
    self._captions = captions
    self._image_ids = image_ids  # int64 [R]
    self._widths = widths        # int32 [R], 0 = unknown
    self._heights = heights      # int32 [R], 0 = unknown

  def __len__(self) -> int:
    return len(self._image_ids)

  def _record(self, index: int) -> dict[str, Any]:
    return {
        "stream": "img",
        "source": self.name,
        "image_id": int(self._image_ids[index]),
        "image_path": os.path.join(self._image_dir, self._paths[index]),
        "image_bytes": None,
        "width": int(self._widths[index]),
        "height": int(self._heights[index]),
        **_box_fields(0),
        "caption": self._captions[index],
        "neg_texts": [],
        "not_exhaustive_texts": [],
    }


@formats.gc_paused
def load_coco_captions(json_path: str | os.PathLike,
                       image_dir: str | os.PathLike, *,
                       name: str = "coco_captions", strict: bool = True,
                       counter: SkipCounter | None = None) -> CaptionSource:
  """COCO captions JSON (``captions_train2017.json``), one record per caption.

  Args:
    json_path: the captions JSON (``images`` and ``annotations`` with
      ``image_id`` and ``caption``).
    image_dir: folder the images' ``file_name`` is relative to.
    name: source name.
    strict: raise on the first bad entry (True) or skip and count it.
    counter: where skips are counted (a new one when None).

  Returns:
    An img `RecordSource`.
  """
  path = os.fspath(json_path)
  counter = _counter(counter)
  problems = _Problems(path, name, strict, counter)
  data = formats.load_json(path)
  formats.check_top_level(data, path, ("images", "annotations"),
                          "a COCO captions file")
  images = _Images(data["images"], problems, _file_name,
                   "give the image a 'file_name'")
  idx, captions = [], []
  for k, a in enumerate(data["annotations"]):
    aid = a.get("id", f"#{k}") if isinstance(a, dict) else f"#{k}"
    rec = f"annotation id {aid}"
    if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
      key = "caption" if isinstance(a, dict) and "image_id" in a else "image_id"
      problems(rec, f"missing required key: {key!r} in caption annotation",
               f"fix the annotation, {_LENIENT_FIX}")
      continue
    j = images.index_of.get(a["image_id"]) if _is_int(a["image_id"]) else None
    if j is None:
      if a["image_id"] not in images.dropped:
        problems(rec, f"unknown image id: {_short(a['image_id'])} is not in "
                 "'images'", f"fix the annotation, {_LENIENT_FIX}")
      continue
    if not _is_text(a["caption"]):
      problems(rec, f"bad caption: expected non-empty text, got "
               f"{_short(a['caption'])}", f"fix the caption, {_LENIENT_FIX}")
      continue
    idx.append(j)
    captions.append(a["caption"].strip())
  idx = np.asarray(idx, np.int64)
  source = CaptionSource(
      name=name, image_dir=_image_dir(image_dir),
      paths=StringTable(images.paths[j] for j in idx),
      captions=StringTable(captions), image_ids=images.ids[idx],
      widths=images.widths[idx], heights=images.heights[idx],
      skipped=counter, num_skipped=problems.count)
  _log_loaded(source, path)
  return source


def _caption_row(fields: Mapping[str, Any], image_key: str, caption_key: str,
                 rec: str, problems: _Problems) -> tuple[str, str] | None:
  """(image path, caption) of one JSONL/CSV row, or None when bad."""
  for key in (image_key, caption_key):
    if key not in fields:
      problems(rec, f"missing required key: {key!r}",
               f"give every row {image_key!r} and {caption_key!r}, "
               f"{_LENIENT_FIX}")
      return None
  image, caption = fields[image_key], fields[caption_key]
  if not _is_text(image):
    problems(rec, f"bad image path: {_short(image)}; expected non-empty text",
             f"fix the row, {_LENIENT_FIX}")
    return None
  if not _is_text(caption):
    problems(rec, f"bad caption: expected non-empty text, got "
             f"{_short(caption)}", f"fix the row, {_LENIENT_FIX}")
    return None
  return image.strip(), caption.strip()


def _caption_table(path: str, rows: list, ids: list, sizes: list, *, name,
                   image_dir, counter, problems) -> CaptionSource:
  # No folder (None or ""): paths are relative to the annotation file.
  root = _image_dir(image_dir) if image_dir else os.path.dirname(
      os.path.abspath(path))
  sizes = np.asarray(sizes, np.int32).reshape(-1, 2)
  source = CaptionSource(
      name=name, image_dir=root, paths=StringTable(r[0] for r in rows),
      captions=StringTable(r[1] for r in rows),
      image_ids=np.asarray(ids, np.int64), widths=sizes[:, 0],
      heights=sizes[:, 1], skipped=counter, num_skipped=problems.count)
  _log_loaded(source, path)
  return source


def _size_of(fields: Mapping[str, Any]) -> tuple[int, int]:
  w, h = fields.get("width"), fields.get("height")
  if _is_int(w) and _is_int(h) and w > 0 and h > 0:
    return int(w), int(h)
  return 0, 0  # Unknown: taken from the decoded image.


@formats.gc_paused
def load_caption_jsonl(jsonl_path: str | os.PathLike, *,
                       image_dir: str | os.PathLike | None = None,
                       name: str = "captions", image_key: str = "image",
                       caption_key: str = "caption", strict: bool = True,
                       counter: SkipCounter | None = None) -> CaptionSource:
  """JSON lines ``{"image": path, "caption": text}``, one record per line.

  Relative image paths are relative to `image_dir`, else to the JSONL file's
  folder. ``image_id`` is the line's integer ``image_id`` if it has one, else
  its 1-based line number. ``width``/``height`` are taken from the line when
  present, else 0 (unknown; `images.decode_record` fills them in). Blank lines
  are ignored.

  Args:
    jsonl_path: the JSONL file.
    image_dir: folder relative paths are resolved against (None or "": the
      file's folder).
    name: source name.
    image_key: the key holding the image path.
    caption_key: the key holding the caption.
    strict: raise on the first bad line (True) or skip and count it.
    counter: where skips are counted (a new one when None).

  Returns:
    An img `RecordSource`.
  """
  path = os.fspath(jsonl_path)
  counter = _counter(counter)
  problems = _Problems(path, name, strict, counter)
  rows, ids, sizes = [], [], []
  try:
    f = open(path, "r", encoding="utf-8")
  except FileNotFoundError:
    raise DataError(path, "file", "missing caption file: it does not exist",
                    "check the path in the config") from None
  with f:
    for line_no, fields in formats.jsonl_values(formats.text_lines(f, path)):
      rec = f"line {line_no}"
      if isinstance(fields, json.JSONDecodeError):
        problems(f"line {line_no} column {fields.colno}",
                 f"not valid JSON: {fields.msg}",
                 f"fix the line, {_LENIENT_FIX}")
        continue
      if not isinstance(fields, dict):
        problems(rec, f"malformed line: expected a JSON object, got "
                 f"{_short(fields)}", f"fix the line, {_LENIENT_FIX}")
        continue
      row = _caption_row(fields, image_key, caption_key, rec, problems)
      if row is None:
        continue
      rows.append(row)
      iid = fields.get("image_id")
      ids.append(int(iid) if _is_int(iid) else line_no)
      sizes.append(_size_of(fields))
  return _caption_table(path, rows, ids, sizes, name=name,
                        image_dir=image_dir, counter=counter,
                        problems=problems)


@formats.gc_paused
def load_caption_csv(csv_path: str | os.PathLike, *,
                     image_dir: str | os.PathLike | None = None,
                     name: str = "captions", image_column: str = "path",
                     caption_column: str = "caption", strict: bool = True,
                     counter: SkipCounter | None = None) -> CaptionSource:
  """A CSV with a header row (``path,caption``), one record per data row.

  Relative paths are resolved against `image_dir`, else the CSV's folder.
  ``image_id`` is the row's line number (1-based, the header is line 1);
  ``width``/``height`` come from ``width``/``height`` columns when present,
  else 0 (unknown).

  Args:
    csv_path: the CSV file (UTF-8, standard quoting).
    image_dir: folder relative paths are resolved against (None or "": the
      file's folder).
    name: source name.
    image_column: header name of the image path column.
    caption_column: header name of the caption column.
    strict: raise on the first bad row (True) or skip and count it.
    counter: where skips are counted (a new one when None).

  Returns:
    An img `RecordSource`.
  """
  path = os.fspath(csv_path)
  counter = _counter(counter)
  problems = _Problems(path, name, strict, counter)
  rows, ids, sizes = [], [], []
  try:
    f = open(path, "r", encoding="utf-8", newline="")
  except FileNotFoundError:
    raise DataError(path, "file", "missing caption file: it does not exist",
                    "check the path in the config") from None
  with f:
    reader = csv.DictReader(formats.text_lines(f, path))
    try:
      header = reader.fieldnames or []
      for key in (image_column, caption_column):
        if key not in header:
          raise DataError(
              path, "line 1 (header)", f"missing required key: column {key!r}"
              f" not in header {header}",
              f"add a header row naming the columns, e.g. "
              f"'{image_column},{caption_column}', or pass image_column=/"
              "caption_column=")
      for fields in reader:
        line_no = reader.line_num
        if None in fields:  # More cells than header names.
          problems(f"line {line_no}", f"malformed row: {len(header)} columns "
                   f"in the header, more in this row",
                   f"quote captions that contain commas, {_LENIENT_FIX}")
          continue
        fields = {k: v for k, v in fields.items() if v is not None}
        for key in ("width", "height"):
          if key in fields and fields[key].strip().isdigit():
            fields[key] = int(fields[key])
        row = _caption_row(fields, image_column, caption_column,
                           f"line {line_no}", problems)
        if row is None:
          continue
        rows.append(row)
        ids.append(line_no)
        sizes.append(_size_of(fields))
    except csv.Error as e:
      raise DataError(path, f"line {reader.line_num}", f"not valid CSV: {e}",
                      "fix the file's quoting") from None
  return _caption_table(path, rows, ids, sizes, name=name,
                        image_dir=image_dir, counter=counter,
                        problems=problems)




# ----------------------------------------------------------------------------
# Captions at web scale: WebDataset tar shards (img2dataset).
# ----------------------------------------------------------------------------


class WebDatasetSource(RecordSource):
  """Image-caption records of WebDataset tar shards, one per sample.

  The images stay in the shards: a record reads its image member's bytes
  (``image_bytes``) by offset, so a source of millions of samples holds only
  per-sample offsets, keys and captions.
  """

  def __init__(self, *, name, shards: Sequence[str], shard_of, offsets,
               sizes, members: StringTable, captions: StringTable, image_ids,
               widths, heights, skipped, num_skipped):
    super().__init__(name=name, stream="img", skipped=skipped,
                     num_skipped=num_skipped)
    self.shards = tuple(shards)
    self._shard_of = shard_of  # int32 [R]
    self._offsets = offsets    # int64 [R] image member data offset
    self._sizes = sizes        # int64 [R] image member size
    self._members = members    # image member name ("000000123.jpg")
    self._captions = captions
    self._image_ids = image_ids
    self._widths = widths      # int32 [R], 0 = unknown
    self._heights = heights

  def __len__(self) -> int:
    return len(self._image_ids)

  def _record(self, index: int) -> dict[str, Any]:
    shard = self.shards[int(self._shard_of[index])]
    member = self._members[index]
    # "SHARD.tar/KEY.jpg" names the shard and the key in decode errors; the
    # bytes are read here, so nothing opens that path.
    path = f"{shard}/{member}"
    try:
      with open(shard, "rb") as f:
        f.seek(int(self._offsets[index]))
        data = f.read(int(self._sizes[index]))
    except OSError as e:
      raise DataError(path, f"{self.name} image_id "
                      f"{int(self._image_ids[index])}",
                      f"unreadable image member: {e}",
                      "check the shard's storage") from None
    return {
        "stream": "img",
        "source": self.name,
        "image_id": int(self._image_ids[index]),
        "image_path": path,
        "image_bytes": data,
        "width": int(self._widths[index]),
        "height": int(self._heights[index]),
        **_box_fields(0),
        "caption": self._captions[index],
        "neg_texts": [],
        "not_exhaustive_texts": [],
    }


def _sample_size(sample: formats.ShardSample) -> tuple[int, int]:
  """(width, height) from img2dataset's KEY.json, else (0, 0): unknown."""
  try:
    meta = json.loads(sample.texts["json"]) if "json" in sample.texts else {}
  except (json.JSONDecodeError, UnicodeDecodeError):
    meta = {}
  return _size_of(meta) if isinstance(meta, dict) else (0, 0)


def load_webdataset(pattern: str | os.PathLike, *, name: str = "webdataset",
                    strict: bool = True, counter: SkipCounter | None = None,
                    num_threads: int = 16) -> WebDatasetSource:
  """WebDataset tar shards as img2dataset writes them, one record per sample.

  A shard ``00000.tar`` holds per sample ``KEY.jpg`` (or ``.png``,
  ``.webp``), ``KEY.txt`` (the caption) and optionally ``KEY.json``
  (img2dataset's metadata: ``caption``, ``width``, ``height``, ``url``, ...).
  The caption is the ``.txt``, else the ``.json``'s ``caption``; the size
  comes from the ``.json`` when it has one (else from the decoded image);
  ``image_id`` is the key when it is a number (img2dataset's keys are), else
  the record's index.

  Bad samples -- no image member, no caption, an empty or non-UTF-8 caption
  -- raise a `DataError` naming the shard and the key (strict), or are
  skipped and counted (lenient); so are a missing shard and a truncated or
  corrupt one (lenient: the samples before the damage are kept). An image
  that does not decode is reported when it is decoded (the error names
  ``SHARD.tar/KEY.jpg``), by the same rules.

  Args:
    pattern: the shards: a glob (``"cc12m/*.tar"``), a brace pattern
      (``"laion/{00000..00099}.tar"``), or several joined by ``::``
      (`formats.expand_shards`).
    name: source name.
    strict: raise on the first bad sample (True) or skip and count it.
    counter: where skips are counted (a new one when None).
    num_threads: shards indexed at a time (reading tar headers is I/O).

  Returns:
    An img `RecordSource`.

  Raises:
    DataError: no shard matches the pattern.
  """
  pattern = os.fspath(pattern)
  counter = _counter(counter)
  paths = formats.expand_shards(pattern)
  if not paths:
    raise DataError(pattern, "shards", "no shard matches the pattern",
                    "check the pattern (a glob like 'dir/*.tar' or a brace "
                    "range like 'dir/{00000..00099}.tar') and data.root")

  def index(path):
    try:
      return formats.read_shard(path), None
    except DataError as e:
      return None, e

  with concurrent.futures.ThreadPoolExecutor(
      max(1, min(num_threads, len(paths)))) as pool:
    indexed = list(pool.map(index, paths))

  shards, shard_of, offsets, sizes, members = [], [], [], [], []
  captions, ids, wh = [], [], []
  num_skipped = 0
  for path, (shard, error) in zip(paths, indexed):
    problems = _Problems(path, name, strict, counter)
    if shard is None:
      problems(error.record, error.problem, f"{error.fix}, or set "
               "strict=False (config data.strict) to skip the shard")
      num_skipped += problems.count
      continue
    s = len(shards)
    shards.append(os.path.abspath(path))
    for sample in shard.samples:
      rec = f"key {sample.key!r}"
      ext = next((e for e in formats.IMAGE_EXTENSIONS
                  if e in sample.members), None)
      if ext is None:
        problems(rec, "missing image: no ."
                 f"{'/.'.join(formats.IMAGE_EXTENSIONS)} member (has "
                 f"{sorted(sample.members)})",
                 f"rewrite the shard, {_LENIENT_FIX}")
        continue
      caption, problem = formats.sample_caption(sample)
      if caption is None:
        problems(rec, problem, f"fix the sample, {_LENIENT_FIX}")
        continue
      offset, size = sample.members[ext]
      shard_of.append(s)
      offsets.append(offset)
      sizes.append(size)
      members.append(f"{sample.key}.{ext}")
      captions.append(caption)
      base = sample.key.rsplit("/", 1)[-1]
      ids.append(int(base) if base.isdigit() else -1)
      wh.append(_sample_size(sample))
    if shard.error:
      problems("file", shard.error, "re-download or rewrite the shard, or "
               "set strict=False (config data.strict) to keep the samples "
               "before the damage")
    num_skipped += problems.count
  image_ids = np.asarray(ids, np.int64)
  unnumbered = image_ids < 0
  image_ids[unnumbered] = np.flatnonzero(unnumbered)
  wh = np.asarray(wh, np.int32).reshape(-1, 2)
  source = WebDatasetSource(
      name=name, shards=shards, shard_of=np.asarray(shard_of, np.int32),
      offsets=np.asarray(offsets, np.int64),
      sizes=np.asarray(sizes, np.int64), members=StringTable(members),
      captions=StringTable(captions), image_ids=image_ids,
      widths=wh[:, 0], heights=wh[:, 1], skipped=counter,
      num_skipped=num_skipped)
  _log_loaded(source, pattern, f" ({len(shards)} shards)")
  return source
