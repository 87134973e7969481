"""Per-stream example transforms: a reader record -> one padded example.

Every transform is a typed grain transform (a class, picklable, so it also runs
in `mp_prefetch` worker processes) working on one element. The chain, built by
`example_transforms`, is

  Decode -> Tokenize -> [RandomCropFlip (train)] -> ResizePad -> PadToSpec

(RandomCropFlip also does the optional colour jitter of det examples; see
`AugmentConfig.color_jitter_prob`.)

and turns a record (see `schema.py`, part 1) into an example (part 2): a uint8
[S, S, 3] canvas (normalisation happens on the device: float32 on the host cuts
decode throughput about 4x, see FACTS.md), boxes as normalised ``cx, cy, w, h``
and token ids padded to the static maxima of `schema.Spec`.

Order of operations and why:
  * Tokenize comes *before* the geometry so that a horizontal flip can swap
    ``left``/``right`` at the token level (via the vocabulary's mirror map)
    instead of re-tokenizing edited strings, and so that the tokens of a box
    dropped by a crop are dropped with it.
  * The crop works in original pixels (a slice, no copy); the single resize of
    ResizePad then scales the crop to the canvas, which is the "scale" part of
    the scale-crop: a crop of side fraction f is magnified 1/f.
  * Images are resized with the longest side to S and padded bottom/right with
    0, as in OWL-ViT; ``scale`` (original -> canvas pixels) and ``orig_size``
    let evaluation map boxes back (eval has no crop, so the scale alone does).

Crops and referents. A grounding example is a set of referring expressions
with their boxes; cutting one referent away would leave a phrase whose target
box is missing, and "the circle on the left" could even name another object
inside the crop. So the crop window of a ``grd`` example is sampled among the
windows that contain *every* box (it always exists: the full image). A ``det``
crop must contain one randomly chosen box (so a crop never empties an image of
positives); other boxes are clipped and dropped when smaller than
``min_box_size`` canvas pixels. ``img`` examples crop freely (their caption
may then name an object cut away; captions are weak labels anyway).

Bad input. A transform that meets a bad record raises `DataError` in strict
mode; in lenient mode it returns a *skip marker* (the element with
``_meta["skip"]`` set), passed through by the later transforms and removed --
and counted -- by `pipeline.py` before batching, in the main process (the
transforms may run in worker processes, where a counter would be invisible).
Counts of everything truncated or dropped (boxes beyond M, tokens beyond T, C,
K, boxes without tokens, degenerate boxes) travel the same way, in
``_meta["counts"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any, Protocol

import cv2
import grain
import numpy as np

from omnitrain_jax.data import errors
from omnitrain_jax.data import images
from omnitrain_jax.data import schema
from omnitrain_jax.vocab import phrases as phrases_lib
from omnitrain_jax.vocab import text as text_lib

META = "_meta"

# Words a colour jitter makes wrong (the default of data.augment.color_words):
# English basic colour terms and common variants, as the vocabulary
# normalizes them.
COLOR_WORDS = ("red", "green", "blue", "yellow", "orange", "purple", "pink",
               "brown", "black", "white", "gray", "grey", "cyan", "magenta",
               "violet", "beige", "maroon", "navy", "teal", "turquoise",
               "lavender", "indigo", "golden", "silver", "blond", "blonde")

# The fields a working (unpadded) example carries between transforms, besides
# the record's own fields:
#   image        uint8 [h, w, 3]   current pixels (cropped/flipped as we go)
#   boxes        float32 [n, 4]    x0, y0, x1, y1 in current pixels
#   box_tokens   list of int32 [t_i]  one array per box
#   caption_tokens, neg_tokens, no_bg_tokens  int32 [*]
#   phrase_tokens list of int32 [l_i]  img: one array per caption phrase
#   phrase_counts int32 [p]            img: objects each phrase names


class TextEncoder(Protocol):
  """What the transforms need from the tokenizer (see omnitrain_jax/vocab)."""

  def encode(self, text: str) -> Any:
    """Returns token ids, their [start, end) character spans and unknowns."""


def ids_and_spans(encoded: Any) -> tuple[np.ndarray, np.ndarray]:
  """Reads `TextEncoder.encode`'s result as (int32 [n], int32 [n, 2])."""
  if hasattr(encoded, "ids"):
    ids, spans = encoded.ids, encoded.spans
  else:
    ids, spans = encoded[0], encoded[1]
  ids = np.asarray(ids, np.int32).reshape(-1)
  spans = np.asarray(spans, np.int32).reshape(-1, 2)
  return ids, spans


def _unique(ids: np.ndarray) -> np.ndarray:
  """Unique non-pad ids in order of first occurrence."""
  ids = np.asarray(ids, np.int32).reshape(-1)
  ids = ids[ids > schema.UNK_ID]
  if ids.size <= 1:
    return ids
  _, first = np.unique(ids, return_index=True)
  return ids[np.sort(first)]


def _empty_ids() -> np.ndarray:
  return np.zeros((0,), np.int32)


# ----------------------------------------------------------------------------
# Metadata and skip markers.


def new_meta(source: str, stream: str, epoch: int, index: int) -> dict:
  return {"source": source, "stream": stream, "epoch": epoch,
          "index": index, "skip": None, "counts": {}}


def is_skipped(element: Mapping[str, Any]) -> bool:
  """Whether `element` is the marker of a bad record (lenient mode)."""
  meta = element.get(META)
  return meta is not None and meta["skip"] is not None


def is_padding(element: Mapping[str, Any]) -> bool:
  """Whether `element` stands for a padding example (eval's last batch)."""
  meta = element.get(META)
  return meta is not None and meta.get("pad", False)


def padding_record(source: str, stream: str, index: int) -> dict:
  """A placeholder record that the transforms pass through untouched."""
  meta = new_meta(source, stream, 0, index)
  meta["pad"] = True
  return {META: meta, "stream": stream, "source": source, "image_id": -1}


def _passthrough(element: Mapping[str, Any]) -> bool:
  return is_skipped(element) or is_padding(element)


def skip_error(element: Mapping[str, Any]) -> errors.DataError:
  """Rebuilds the `DataError` of a skip marker (it crossed a process)."""
  return errors.DataError(*element[META]["skip"])


def _mark_skipped(element: Mapping[str, Any], error: errors.DataError) -> dict:
  meta = dict(element.get(META) or new_meta("?", "?", 0, -1))
  # DataError does not pickle (custom __init__), so carry its fields.
  meta["skip"] = (error.file, error.record, error.problem, error.fix)
  # Only the marker travels on: the decoded image would be wasted transfer.
  return {META: meta, "source": element.get("source"),
          "image_id": element.get("image_id")}


def _count(ex: dict, key: str, n: int = 1) -> None:
  if n and META in ex:
    counts = ex[META]["counts"]
    counts[key] = counts.get(key, 0) + int(n)


def _record_name(ex: Mapping[str, Any]) -> str:
  return f"image_id {ex.get('image_id')}"


def _record_file(ex: Mapping[str, Any]) -> str:
  return str(ex.get("image_path") or ex.get("source") or "<record>")


class AttachMeta(grain.transforms.MapWithIndex):
  """Copies a record and attaches ``_meta`` (source, epoch from the index).

  Applied right after ``shuffle().repeat()``, so that ``index // num_records``
  is the epoch of the source: the pipeline uses it to report skips at the end
  of every epoch.
  """

  def __init__(self, source: str, stream: str, num_records: int):
    if num_records <= 0:
      raise ValueError(f"Source {source!r} ({stream}) has no records; check "
                       "its annotation file and the reader's skip report.")
    self.source, self.stream, self.num_records = source, stream, num_records

  def map_with_index(self, index: int, record: Mapping[str, Any]) -> dict:
    out = dict(record)
    out[META] = new_meta(self.source, self.stream, index // self.num_records,
                         index)
    return out


class _ExampleMap(grain.transforms.Map):
  """A Map that passes skip markers through and turns DataError into one."""

  strict: bool = True

  def map(self, element):
    if _passthrough(element):
      return element
    try:
      return self.apply(element)
    except errors.DataError as e:
      if self.strict:
        raise
      return _mark_skipped(element, e)

  def apply(self, ex: dict) -> dict:
    raise NotImplementedError


class _ExampleRandomMap(grain.transforms.RandomMap):
  """A RandomMap that passes skip markers through (see `_ExampleMap`)."""

  strict: bool = True

  def random_map(self, element, rng: np.random.Generator):
    if _passthrough(element):
      return element
    try:
      return self.apply(element, rng)
    except errors.DataError as e:
      if self.strict:
        raise
      return _mark_skipped(element, e)

  def apply(self, ex: dict, rng: np.random.Generator) -> dict:
    raise NotImplementedError


# ----------------------------------------------------------------------------
# Decode.


class Decode(_ExampleMap):
  """Decodes the record's image to uint8 [H, W, 3] (`images.decode_record`).

  ``orig_size`` is the annotation's (height, width) -- the frame evaluation
  maps boxes back to --; when a lenient decode accepted a uniformly rescaled
  image file (see `images`), ``_pixel_scale`` (annotation -> decoded pixels)
  carries the factor into ``scale``.

  Args:
    decode: ``(record, *, strict) -> record with "image"``, raising
      `DataError` on missing or corrupt files; a module-level function so that
      the transform pickles into worker processes.
    strict: raise on a bad image (True) or emit a skip marker (False).
  """

  def __init__(self, decode: Callable[..., dict] | None = None, *,
               strict: bool = True):
    self.decode = decode or images.decode_record
    self.strict = strict

  def apply(self, ex: dict) -> dict:
    want_h, want_w = int(ex.get("height") or 0), int(ex.get("width") or 0)
    out = self.decode(ex, strict=self.strict)
    image = out["image"]
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise errors.DataError(
          _record_file(ex), _record_name(ex),
          f"decoded image has shape {image.shape} and dtype {image.dtype}, "
          "expected uint8 [H, W, 3]", "re-encode the image as RGB")
    h, w = image.shape[:2]
    if want_h and want_w:
      out["orig_size"] = np.array([want_h, want_w], np.int32)
      out["_pixel_scale"] = w / want_w
    else:
      out["orig_size"] = np.array([h, w], np.int32)
      out["_pixel_scale"] = 1.0
    out["boxes"] = np.asarray(out.get("boxes", np.zeros((0, 4))),
                              np.float32).reshape(-1, 4)
    return out


# ----------------------------------------------------------------------------
# Tokenize.


class Tokenize(_ExampleMap):
  """Turns a record's texts into token ids (ragged, unpadded).

  * det: each box's category name (``box_texts``), cleaned as the vocabulary
    builder cleans names (LVIS ``bow_(weapon)`` -> ``bow``; ``Monitor/TV``
    -> both alternatives' tokens), cached per name since a dataset has few
    names; ``neg_texts`` -> ``neg_tokens`` (minus the
    image's positive tokens: ``red`` is no negative when a red circle is
    present); ``not_exhaustive_texts`` -> ``no_bg_tokens``.
  * grd: the caption is tokenized once; a box's tokens are those whose spans
    lie inside one of the box's ``box_spans`` (MDETR ``tokens_positive``). A
    multi-word token that straddles a span edge (greedy longest match can
    produce one) does not lie inside; when no token does, the tokens that
    overlap the spans are taken instead. Without spans (RefCOCOg pickles) the
    box's own ``box_texts`` is tokenized.
  * img (and grd): ``caption_tokens`` = the caption's unique tokens.
  * img: ``phrase_tokens`` / ``phrase_counts``: the caption's phrases
    (`vocab.phrases.chunk`: "two red circles, a blue star" -> ("two red
    circles", 2), ("a blue star", 1)), each with the unique tokens whose
    spans lie inside the phrase; phrases without a token are dropped
    (counted as ``phrases_without_tokens``). det and grd examples have none
    (their boxes carry the tokens).

  Boxes left without any token cannot be classified and are dropped (counted
  as ``boxes_without_tokens``).

  Args:
    encoder: a `TextEncoder` (the vocabulary's tokenizer).
    strict: raise `DataError` on an inconsistent record (spans outside the
      caption), or skip it.
    cache_size: texts cached per process (category names, negatives).
  """

  def __init__(self, encoder: TextEncoder, *, strict: bool = True,
               cache_size: int = 100_000):
    self.encoder = encoder
    self.strict = strict
    self.cache_size = cache_size
    self._cache: dict[str, np.ndarray] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = {}  # Rebuilt in each worker; no need to ship it.
    return state

  def _text_ids(self, text: str) -> np.ndarray:
    ids = self._cache.get(text)
    if ids is None:
      ids = _unique(ids_and_spans(self.encoder.encode(text))[0])
      if len(self._cache) < self.cache_size:
        self._cache[text] = ids
    return ids

  def _name_ids(self, name: str) -> np.ndarray:
    """Tokens of a category name (all its "/" alternatives), cached."""
    key = "\0name:" + name
    ids = self._cache.get(key)
    if ids is None:
      variants = text_lib.category_name_variants(name) or [name]
      ids = _unique(np.concatenate([self._text_ids(v) for v in variants]))
      if len(self._cache) < self.cache_size:
        self._cache[key] = ids
    return ids

  def _names_ids(self, names: Sequence[str]) -> np.ndarray:
    if not names:
      return _empty_ids()
    return _unique(np.concatenate([self._name_ids(t) for t in names]))

  def _caption_ids(self, ex: dict) -> np.ndarray:
    return self._caption_ids_and_phrases(ex, phrases=False)[0]

  def _caption_ids_and_phrases(
      self, ex: dict, phrases: bool = True
  ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The caption's unique tokens, and its phrases' tokens and counts."""
    caption = ex.get("caption") or ""
    encoded = self.encoder.encode(caption)
    _count(ex, "unknown_caption_words", len(getattr(encoded, "unknown", ())))
    ids, spans = ids_and_spans(encoded)
    phrase_tokens, counts = [], []
    if phrases:
      for ph in phrases_lib.chunk(caption):
        inside = (spans[:, 0] >= ph.start) & (spans[:, 1] <= ph.end)
        tokens = _unique(ids[inside])
        if tokens.size:
          phrase_tokens.append(tokens)
          counts.append(ph.count)
        else:
          _count(ex, "phrases_without_tokens", 1)
    return _unique(ids), phrase_tokens, np.asarray(counts, np.int32)

  def _grounding_box_tokens(self, ex: dict) -> list[np.ndarray]:
    caption = ex.get("caption") or ""
    box_spans = ex.get("box_spans")
    texts = list(ex.get("box_texts") or [])
    n = len(ex["boxes"])
    if box_spans is None:
      if len(texts) != n:
        raise errors.DataError(
            _record_file(ex), _record_name(ex),
            f"grounding record has {n} boxes but {len(texts)} box_texts and no "
            "box_spans", "give each box its phrase (box_texts) or its spans")
      # Free-text phrases: not cached (they rarely repeat).
      return [_unique(ids_and_spans(self.encoder.encode(t))[0])
              for t in texts]
    if len(box_spans) != n:
      raise errors.DataError(
          _record_file(ex), _record_name(ex),
          f"grounding record has {n} boxes but {len(box_spans)} box_spans",
          "give every box its list of [start, end) caption spans")
    ids, spans = ids_and_spans(self.encoder.encode(caption))
    out = []
    for j, box_sp in enumerate(box_spans):
      sp = np.asarray(box_sp, np.int64).reshape(-1, 2)
      if sp.size and (sp.min() < 0 or sp.max() > len(caption)
                      or np.any(sp[:, 1] <= sp[:, 0])):
        raise errors.DataError(
            _record_file(ex), _record_name(ex),
            f"box {j} has spans {sp.tolist()} outside the caption of "
            f"{len(caption)} characters ({caption!r})",
            "fix tokens_positive in the annotation file")
      if not sp.size or not ids.size:
        out.append(_empty_ids())
        continue
      # [n_tokens, n_spans]: does token t lie in / overlap span s?
      t0, t1 = spans[:, 0:1], spans[:, 1:2]
      s0, s1 = sp[None, :, 0], sp[None, :, 1]
      inside = ((t0 >= s0) & (t1 <= s1)).any(axis=1)
      if not inside.any():
        inside = ((t0 < s1) & (t1 > s0)).any(axis=1)
      out.append(_unique(ids[inside]))
    return out

  def apply(self, ex: dict) -> dict:
    stream = ex["stream"]
    out = dict(ex)
    n = len(ex["boxes"])
    if stream == "det":
      texts = list(ex.get("box_texts") or [])
      if len(texts) != n:
        raise errors.DataError(
            _record_file(ex), _record_name(ex),
            f"detection record has {n} boxes but {len(texts)} box_texts",
            "give each box its category name")
      box_tokens = [self._name_ids(t) for t in texts]
      caption_tokens = _empty_ids()
      phrase_tokens, phrase_counts = [], _empty_ids()
    elif stream == "grd":
      box_tokens = self._grounding_box_tokens(ex)
      caption_tokens = self._caption_ids(out)
      phrase_tokens, phrase_counts = [], _empty_ids()
    elif stream == "img":
      box_tokens = [_empty_ids() for _ in range(n)]
      caption_tokens, phrase_tokens, phrase_counts = (
          self._caption_ids_and_phrases(out))
    else:
      raise ValueError(f"Unknown stream {stream!r}; expected one of "
                       f"{schema.STREAMS}.")
    phrase_ids = np.asarray(ex.get("phrase_ids", np.arange(n)),
                            np.int32).reshape(-1)
    if len(phrase_ids) != n:
      phrase_ids = np.arange(n, dtype=np.int32)
    if stream != "img" and n:
      keep = np.array([t.size > 0 for t in box_tokens], bool)
      _count(out, "boxes_without_tokens", int((~keep).sum()))
      out["boxes"] = ex["boxes"][keep]
      phrase_ids = phrase_ids[keep]
      box_tokens = [t for t, k in zip(box_tokens, keep) if k]
    positives = (np.concatenate(box_tokens) if box_tokens else _empty_ids())
    neg = self._names_ids(ex.get("neg_texts") or [])
    neg = neg[~np.isin(neg, positives)]
    out["box_tokens"] = box_tokens
    out["phrase_ids"] = phrase_ids
    out["caption_tokens"] = caption_tokens
    out["phrase_tokens"] = phrase_tokens
    out["phrase_counts"] = phrase_counts
    out["neg_tokens"] = neg
    out["no_bg_tokens"] = self._names_ids(ex.get("not_exhaustive_texts") or [])
    return out


# ----------------------------------------------------------------------------
# Geometry.


def _sample_window(rng: np.random.Generator, size: int, frac: float,
                   keep: tuple[float, float] | None) -> tuple[int, int]:
  """A [start, end) pixel window of about ``frac * size`` containing `keep`."""
  length = max(1, int(round(frac * size)))
  lo, hi = 0, size - length
  if keep is not None:
    k0 = int(np.clip(np.floor(keep[0]), 0, size))
    k1 = int(np.clip(np.ceil(keep[1]), 0, size))
    length = min(size, max(length, k1 - k0))
    lo, hi = max(0, k1 - length), min(k0, size - length)
  start = int(rng.integers(lo, hi + 1)) if hi > lo else lo
  return start, start + length


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Random scale-crop, flip and colour jitter (train only).

  Attributes:
    crop_prob: probability of cropping an example.
    crop_min_scale: smallest side of the crop as a fraction of the image's
      side (each side drawn independently in [crop_min_scale, 1], so the
      aspect ratio varies too).
    flip_prob: probability of a horizontal flip.
    grd_crop_prob: crop probability of grounding examples (None: crop_prob).
      Crops keep every referent whole, but a phrase with an *absolute*
      position word ("the circle on the left" meaning the left third of the
      image, as in ShapesWorld) can become false when the crop shifts the
      frame; set 0 for such data. Flips are always safe (the mirror map swaps
      the words).
    color_jitter_prob: probability of a random colour change of a *det*
      example (after the crop and flip): the hue turned by up to
      ``color_jitter_hue`` of the colour circle (0.5: any hue), saturation
      and value (brightness) scaled by factors drawn in
      ``color_jitter_saturation`` / ``color_jitter_value``. Colour words are
      labels in open-vocabulary data ("red car"), and a new hue makes them
      wrong, so a jittered example loses its colour tokens (the transform's
      ``color_ids``) from its boxes and known negatives: its boxes still
      train the box head and its other tokens ("car"), the colour words get
      neither positives nor negatives from it. A box left with no token
      trains the box head only. What it is for: the box head stops
      depending on the colours detection boxed (a colour met only in
      captions then gets boxes; README "Colour-jittered boxes").
    color_jitter_hue: largest hue turn, a fraction of the circle in [0, 0.5].
    color_jitter_saturation: (low, high) saturation factor.
    color_jitter_value: (low, high) value factor.
  """
  crop_prob: float = 0.5
  crop_min_scale: float = 0.5
  flip_prob: float = 0.5
  grd_crop_prob: float | None = None
  color_jitter_prob: float = 0.0
  color_jitter_hue: float = 0.5
  color_jitter_saturation: tuple[float, float] = (0.4, 1.2)
  color_jitter_value: tuple[float, float] = (0.7, 1.3)

  def __post_init__(self):
    for name in ("crop_prob", "flip_prob", "grd_crop_prob",
                 "color_jitter_prob"):
      if getattr(self, name) is None:
        continue
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1].")
    if not 0.0 < self.crop_min_scale <= 1.0:
      raise ValueError(f"crop_min_scale={self.crop_min_scale} must be in "
                       "(0, 1].")
    if not 0.0 <= self.color_jitter_hue <= 0.5:
      raise ValueError(f"color_jitter_hue={self.color_jitter_hue} must be in "
                       "[0, 0.5] (a fraction of the colour circle).")
    for name in ("color_jitter_saturation", "color_jitter_value"):
      lo, hi = getattr(self, name)
      if not 0.0 <= lo <= hi:
        raise ValueError(f"{name}={(lo, hi)} must be (low, high) with "
                         "0 <= low <= high.")


class RandomCropFlip(_ExampleRandomMap):
  """Random scale-crop and horizontal flip that keep boxes and tokens right.

  The crop window is constrained per stream (see the module docstring): grd
  keeps every box, det keeps one random box whole, img is free. A flip mirrors
  the boxes and maps every token array through the vocabulary's mirror map, so
  "the circle on the left" becomes "the circle on the right" with its box.
  With ``config.color_jitter_prob`` a det example may then get new colours
  and lose its `color_ids` labels (`AugmentConfig`); its draws come after
  the crop's and flip's, so those stay the same with or without it.

  Args:
    config: `AugmentConfig`.
    mirror: int32 [V] mapping each token id to its mirror image (``left`` <->
      ``right``, identity elsewhere); None: identity.
    color_ids: token ids of the colour words a jitter makes unknown.
    strict: raise on bad records (True) or emit skip markers.
  """

  def __init__(self, config: AugmentConfig, mirror: np.ndarray | None = None,
               *, color_ids: np.ndarray | None = None, strict: bool = True):
    self.config = config
    self.mirror = None if mirror is None else np.asarray(mirror, np.int32)
    self.color_ids = np.asarray([] if color_ids is None else color_ids,
                                np.int32)
    self.strict = strict

  def _mirror(self, ids: np.ndarray) -> np.ndarray:
    if self.mirror is None or not ids.size:
      return ids
    return self.mirror[ids]

  def apply(self, ex: dict, rng: np.random.Generator) -> dict:
    out = dict(ex)
    cfg = self.config
    image, boxes = ex["image"], ex["boxes"]
    h, w = image.shape[:2]
    crop_prob = cfg.crop_prob
    if ex["stream"] == "grd" and cfg.grd_crop_prob is not None:
      crop_prob = cfg.grd_crop_prob
    if rng.random() < crop_prob:
      keep = None
      if len(boxes) and ex["stream"] == "grd":
        keep = np.concatenate([boxes[:, :2].min(0), boxes[:, 2:].max(0)])
      elif len(boxes) and ex["stream"] == "det":
        keep = boxes[rng.integers(len(boxes))]
      fx, fy = rng.uniform(cfg.crop_min_scale, 1.0, size=2)
      x0, x1 = _sample_window(rng, w, fx, None if keep is None
                              else (keep[0], keep[2]))
      y0, y1 = _sample_window(rng, h, fy, None if keep is None
                              else (keep[1], keep[3]))
      image = image[y0:y1, x0:x1]  # A view; ResizePad copies once.
      boxes = boxes - np.array([x0, y0, x0, y0], np.float32)
      boxes = np.clip(boxes, 0, [x1 - x0, y1 - y0, x1 - x0, y1 - y0]
                      ).astype(np.float32)
      h, w = y1 - y0, x1 - x0
    if rng.random() < cfg.flip_prob:
      image = cv2.flip(np.ascontiguousarray(image), 1)
      boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0],
                        boxes[:, 3]], axis=1).astype(np.float32)
      out["box_tokens"] = [self._mirror(t) for t in ex["box_tokens"]]
      if "phrase_tokens" in ex:
        out["phrase_tokens"] = [self._mirror(t) for t in ex["phrase_tokens"]]
      for key in ("caption_tokens", "neg_tokens", "no_bg_tokens"):
        out[key] = self._mirror(ex[key])
    if (cfg.color_jitter_prob and ex["stream"] == "det"
        and rng.random() < cfg.color_jitter_prob):
      image = jitter_colors(image, rng, hue=cfg.color_jitter_hue,
                            saturation=cfg.color_jitter_saturation,
                            value=cfg.color_jitter_value)
      keep = lambda ids: ids[~np.isin(ids, self.color_ids)]
      out["box_tokens"] = [keep(t) for t in out["box_tokens"]]
      out["neg_tokens"] = keep(out["neg_tokens"])
      # Unknown on this image: never negatives of its unmatched predictions,
      # nor (det_batch_negatives_known) sampled negatives of its boxes.
      # First, so a truncation to max_neg_tokens never drops them.
      out["no_bg_tokens"] = np.concatenate([
          self.color_ids, keep(np.asarray(out["no_bg_tokens"], np.int32))
      ]).astype(np.int32)
      _count(out, "color_jittered", 1)
    out["image"], out["boxes"] = image, boxes
    return out


def jitter_colors(image: np.ndarray, rng: np.random.Generator, *,
                  hue: float, saturation: tuple[float, float],
                  value: tuple[float, float]) -> np.ndarray:
  """A random hue turn and saturation / value scaling of a uint8 RGB image.

  Draws, in order: the hue turn in [-hue, hue] (a fraction of the circle),
  the saturation factor, the value factor. Grey pixels (black, white, the
  padding) keep their hue-less grey under the turn.

  Args:
    image: uint8 [H, W, 3] RGB.
    rng: the example's generator.
    hue: largest turn, in [0, 0.5].
    saturation: (low, high) factor range.
    value: (low, high) factor range.

  Returns:
    uint8 [H, W, 3], a new array.
  """
  turn = rng.uniform(-hue, hue)
  s_factor = rng.uniform(*saturation)
  v_factor = rng.uniform(*value)
  # OpenCV's *_FULL conversions use the whole byte for hue (256 steps).
  hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV_FULL)
  h = (hsv[..., 0].astype(np.int32) + int(round(turn * 256))) % 256
  hsv[..., 0] = h.astype(np.uint8)
  for c, factor in ((1, s_factor), (2, v_factor)):
    hsv[..., c] = np.clip(hsv[..., c].astype(np.float32) * factor + 0.5, 0,
                          255).astype(np.uint8)
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


class ResizePad(_ExampleMap):
  """Longest side to S, pad bottom/right with 0; boxes follow, clipped, filtered.

  Boxes smaller than ``min_box_size`` canvas pixels in width or height after
  clipping (e.g. cut by a crop) are dropped with their tokens (counted as
  ``boxes_degenerate``). Sets ``scale`` (original -> canvas pixels).
  """

  def __init__(self, image_size: int, *, min_box_size: float = 1.0):
    if image_size <= 0:
      raise ValueError(f"image_size={image_size} must be positive.")
    self.image_size = image_size
    self.min_box_size = min_box_size
    self.strict = True

  def apply(self, ex: dict) -> dict:
    s = self.image_size
    image = ex["image"]
    h, w = image.shape[:2]
    scale = s / max(h, w)
    nh, nw = min(s, max(1, round(h * scale))), min(s, max(1, round(w * scale)))
    # INTER_AREA averages when shrinking (no aliasing); linear when growing.
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    canvas = np.zeros((s, s, 3), np.uint8)
    # Resize straight into the canvas (no temporary image and copy).
    content = canvas[:nh, :nw]
    resized = cv2.resize(image, (nw, nh), dst=content, interpolation=interp)
    if resized is not content and not np.shares_memory(resized, canvas):
      content[:] = resized  # cv2 allocated anyway (unusual layouts).
    out = dict(ex)
    out["image"] = canvas
    out["scale"] = np.float32(scale * ex.get("_pixel_scale", 1.0))
    # cv2 maps w pixels onto nw (rounded): scale boxes per axis by the same
    # factors so they stay on their pixels (`scale` differs by < 0.5 px).
    boxes = ex["boxes"] * np.array([nw / w, nh / h, nw / w, nh / h],
                                   np.float32)
    boxes = np.clip(boxes, 0, [nw, nh, nw, nh]).astype(np.float32)
    if len(boxes) and ex["stream"] != "img":
      keep = ((boxes[:, 2] - boxes[:, 0] >= self.min_box_size)
              & (boxes[:, 3] - boxes[:, 1] >= self.min_box_size))
      if not keep.all():
        _count(out, "boxes_degenerate", int((~keep).sum()))
        boxes = boxes[keep]
        out["box_tokens"] = [t for t, k in zip(ex["box_tokens"], keep) if k]
        out["phrase_ids"] = ex["phrase_ids"][keep]
    out["boxes"] = boxes
    return out


def _empty_labels(spec: schema.Spec, stream: str) -> dict[str, np.ndarray]:
  """`schema.empty_example` without the image (saves an S*S*3 allocation)."""
  shapes = schema.example_shapes(spec)
  out = {k: np.zeros(shp, dt) for k, (shp, dt) in shapes.items()
         if k != "image"}
  out["stream"] = np.int32(schema.STREAM_IDS[stream])
  out["image_id"] = np.int32(-1)
  out["phrase_ids"][:] = -1
  out["scale"] = np.float32(1.0)
  return out


def _pad_ids(ids: np.ndarray, size: int) -> tuple[np.ndarray, int]:
  out = np.zeros((size,), np.int32)
  n = min(size, ids.size)
  out[:n] = ids[:n]
  return out, ids.size - n


class PadToSpec(_ExampleMap):
  """Pads/truncates a working example to the static shapes of `schema.Spec`.

  Keeps the first M boxes (readers' order), the first P phrases and the first
  T/C/K/L tokens; what is cut is counted (``boxes_truncated``,
  ``box_tokens_truncated``, ``caption_tokens_truncated``,
  ``neg_tokens_truncated``, ``phrases_truncated``,
  ``phrase_tokens_truncated``) so that a Spec too
  small for the data shows up in the logs instead of silently weakening the
  labels. The output has exactly the keys of `schema.example_shapes` (plus
  ``_meta``, removed by the pipeline before batching).
  """

  def __init__(self, spec: schema.Spec):
    self.spec = spec
    self.strict = True

  def apply(self, ex: dict) -> dict:
    spec = self.spec
    m, t = spec.max_boxes, spec.max_box_tokens
    s = spec.image_size
    if ex["image"].shape != (s, s, 3):
      raise ValueError(f"PadToSpec got an image of shape {ex['image'].shape}, "
                       f"expected {(s, s, 3)}: run ResizePad first.")
    out = _empty_labels(spec, ex["stream"])
    out["image"] = ex["image"]
    out["image_id"] = np.int32(ex.get("image_id", -1))
    out["orig_size"] = np.asarray(ex["orig_size"], np.int32)
    out["scale"] = np.float32(ex["scale"])
    if META in ex:
      out[META] = ex[META]
    boxes = ex["boxes"]
    n = len(boxes)
    k = min(n, m)
    _count(out, "boxes_truncated", n - k)
    if k:
      b = boxes[:k] / np.float32(s)
      out["boxes"][:k] = np.stack([(b[:, 0] + b[:, 2]) / 2,
                                   (b[:, 1] + b[:, 3]) / 2,
                                   b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
      out["box_mask"][:k] = True
      out["phrase_ids"][:k] = ex["phrase_ids"][:k]
      cut = 0
      for i in range(k):
        out["box_tokens"][i], c = _pad_ids(ex["box_tokens"][i], t)
        cut += c
      _count(out, "box_tokens_truncated", cut)
    phrases = list(ex.get("phrase_tokens") or [])
    counts = np.asarray(ex.get("phrase_counts", _empty_ids()), np.int32)
    p = min(len(phrases), spec.max_phrases)
    _count(out, "phrases_truncated", len(phrases) - p)
    cut = 0
    for i in range(p):
      out["phrase_tokens"][i], c = _pad_ids(phrases[i],
                                            spec.max_phrase_tokens)
      out["phrase_counts"][i] = max(1, int(counts[i]))
      cut += c
    _count(out, "phrase_tokens_truncated", cut)
    for key, size, counter in (
        ("caption_tokens", spec.max_caption_tokens, "caption_tokens_truncated"),
        ("neg_tokens", spec.max_neg_tokens, "neg_tokens_truncated"),
        ("no_bg_tokens", spec.max_neg_tokens, "no_bg_tokens_truncated")):
      out[key], c = _pad_ids(ex[key], size)
      _count(out, counter, c)
    return out


def example_transforms(
    spec: schema.Spec, *, encoder: TextEncoder,
    decode: Callable[..., dict] | None = None,
    augment: AugmentConfig | None = None, mirror: np.ndarray | None = None,
    color_ids: np.ndarray | None = None, strict: bool = True,
    min_box_size: float = 1.0) -> list[Any]:
  """The record -> example chain of one stream, as grain transforms.

  Args:
    spec: static shapes.
    encoder: the tokenizer.
    decode: see `Decode` (default `images.decode_record`).
    augment: random crop/flip for training; None for evaluation.
    mirror: the vocabulary's left/right mirror map (int32 [V]).
    color_ids: the colour-word token ids a colour jitter makes unknown
      (`AugmentConfig.color_jitter_prob`).
    strict: raise on bad records (True) or emit skip markers.
    min_box_size: boxes below this many canvas pixels are dropped.

  Returns:
    A list of `grain.transforms.Map` / `RandomMap` instances, in order.
  """
  chain = [Decode(decode, strict=strict), Tokenize(encoder, strict=strict)]
  if augment is not None:
    chain.append(RandomCropFlip(augment, mirror, color_ids=color_ids,
                                strict=strict))
  chain += [ResizePad(spec.image_size, min_box_size=min_box_size),
            PadToSpec(spec)]
  return chain


def apply_chain(chain: Sequence[Any], element: Any,
                rng: np.random.Generator | None = None) -> Any:
  """Applies transforms eagerly to one element (tests, inspection, debugging)."""
  for t in chain:
    if isinstance(t, grain.transforms.RandomMap):
      element = t.random_map(element, rng if rng is not None
                             else np.random.default_rng(0))
    elif isinstance(t, grain.transforms.MapWithIndex):
      element = t.map_with_index(0, element)
    else:
      element = t.map(element)
  return element
