"""Serving an exported detector without the training code.

    from omnitrain_jax import serving
    detector = serving.load("exported/demo")  # python -m omnitrain_jax.export
    results = detector.detect(["photo.jpg", pixels], ["red circle", "star"],
                              top_k=20, threshold=0.1)
    results[0]["detections"]  # [{"query", "query_index", "score",
                              #   "box_xyxy", "box_xywh"}, ...]

`load(DIR)` reads a directory written by `omnitrain_jax.export`: the
`jax.export` artifact, its params and the vocabulary. `Detector.detect`
returns per image the dict `predict` writes as JSON (``width``, ``height``,
``step``, ``queries``, ``detections`` with boxes in the pixels of the image
as displayed), and the same boxes and scores as `Predictor.predict` with the
same options (``tests/export_test.py`` checks it).

Only jax, numpy and leaf modules of this package are imported: image
decoding (`data.images`: simplejpeg, cv2, PIL), the tokenizer (`vocab`), the
query and box helpers of `evaluation.queries` / `evaluation.detections`
(numpy). No flax, optax, orbax or grain: a test checks `sys.modules`.

Images are paths (decoded like prediction: EXIF rotation, grayscale, RGBA
and palette to RGB) or uint8 numpy arrays ``[H, W]``, ``[H, W, 1]``,
``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA; alpha dropped as decoding does).
They are resized and padded exactly as `data.transforms.ResizePad` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import cv2
import jax
import numpy as np

from omnitrain_jax.data import images as images_lib
from omnitrain_jax.evaluation import detections as detections_lib
from omnitrain_jax.evaluation import queries as queries_lib
from omnitrain_jax.vocab import tokenizer as tokenizer_lib
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

SIGNATURE_FILE = "signature.json"  # = export.SIGNATURE_FILE
FORMAT = "omnitrain_jax.export/1"  # = export.FORMAT
# NMS threshold meaning "no NMS": an IoU is never above 1.
NO_NMS = 1.0


@dataclasses.dataclass(frozen=True)
class Image:
  """A decoded image and its canvas.

  Attributes:
    pixels: uint8 [H, W, 3] RGB as displayed.
    canvas: uint8 [S, S, 3], longest side resized to S, padded.
    scale: original -> canvas pixels.
    path: the file, if the image came from one.
  """
  pixels: np.ndarray
  canvas: np.ndarray
  scale: float
  path: str | None = None


def resize_pad(pixels: np.ndarray, size: int) -> tuple[np.ndarray, float]:
  """`data.transforms.ResizePad` for one image: (canvas [S, S, 3], scale)."""
  h, w = pixels.shape[:2]
  scale = size / max(h, w)
  nh = min(size, max(1, round(h * scale)))
  nw = min(size, max(1, round(w * scale)))
  # INTER_AREA averages when shrinking (no aliasing); linear when growing.
  interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
  canvas = np.zeros((size, size, 3), np.uint8)
  canvas[:nh, :nw] = cv2.resize(np.ascontiguousarray(pixels), (nw, nh),
                                interpolation=interp)
  return canvas, float(np.float32(scale))


def to_rgb(array: np.ndarray) -> np.ndarray:
  """A uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> [H, W, 3]."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"Images must be uint8 pixels; got dtype {array.dtype}. "
                     "Convert with np.clip(x, 0, 255).astype(np.uint8).")
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
    raise ValueError(f"Images must be [H, W], [H, W, 1], [H, W, 3] (RGB) or "
                     f"[H, W, 4] (RGBA); got shape {array.shape}.")
  if array.shape[-1] == 1:
    return np.ascontiguousarray(np.repeat(array, 3, axis=-1))
  return np.ascontiguousarray(array[..., :3])


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}`` (``params.npz``)."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


class Detector:
  """An exported detector: images and text queries -> boxes."""

  def __init__(self, directory: str):
    """Loads ``DIR`` (see `load`)."""
    self.directory = directory
    path = os.path.join(directory, SIGNATURE_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{path} does not exist: point load() at a directory written by "
          "`python -m omnitrain_jax.export --workdir=W --out=DIR`.")
    with open(path) as f:
      self.signature = json.load(f)
    if self.signature.get("format") != FORMAT:
      raise ValueError(f"{path}: format {self.signature.get('format')!r}, "
                       f"this code reads {FORMAT!r}; re-export the run.")
    files = self.signature["files"]
    with open(os.path.join(directory, files["exported"]), "rb") as f:
      try:
        self.exported = jax.export.deserialize(bytearray(f.read()))
      except ImportError as e:  # jax does not depend on flatbuffers.
        raise ImportError(f"{e}: pip install flatbuffers (setup.py pins the "
                          "version).") from None
    platform = jax.export.default_export_platform()  # 'gpu' -> 'cuda'.
    if platform not in self.exported.platforms:
      raise ValueError(
          f"{directory} was exported for {list(self.exported.platforms)}, "
          f"not for this machine's {platform!r}; re-export with "
          f"--platforms={','.join(self.exported.platforms + (platform,))}.")
    with np.load(os.path.join(directory, files["params"])) as flat:
      self.params = jax.device_put(_unflatten(dict(flat)))
    self.tokenizer = tokenizer_lib.Tokenizer(vocabulary_lib.Vocabulary.load(
        os.path.join(directory, files["vocab"])))
    self.image_size = int(self.signature["image_size"])
    self.max_queries = int(self.signature["max_queries"])
    self.max_tokens = int(self.signature["max_tokens"])
    self.max_boxes = int(self.signature["max_boxes"])
    self.num_patches = int(self.signature["num_patches"])
    batch = self.signature["batch"]
    self.fixed_batch = batch if isinstance(batch, int) else None
    self.step = self.signature.get("checkpoint_step")
    self._call = jax.jit(self.exported.call)

  # ------------------------------------------------------------- inputs

  def load_image(self, image: str | os.PathLike | np.ndarray) -> Image:
    """A path (decoded like prediction) or a uint8 array -> `Image`."""
    path = None
    if isinstance(image, (str, os.PathLike)):
      path = os.path.abspath(os.fspath(image))
      pixels = images_lib.load_image({
          "image_path": path, "width": 0, "height": 0, "source": "serving",
          "image_id": 0})
    else:
      pixels = to_rgb(image)
    canvas, scale = resize_pad(pixels, self.image_size)
    return Image(pixels=pixels, canvas=canvas, scale=scale, path=path)

  def text_queries(self, texts: Sequence[str]) -> list[queries_lib.Query]:
    """Tokenizes as prediction does; warns about unknown words."""
    out = []
    for text in texts:
      q = queries_lib.user_query(self.tokenizer, text)
      if len(q.token_ids) > self.max_tokens:
        raise ValueError(
            f"Query {text!r} has {len(q.token_ids)} known tokens "
            f"{list(q.tokens[0])} but the export takes {self.max_tokens}; "
            "shorten it or re-export with a larger --max_tokens.")
      out.append(q)
    return out

  # ------------------------------------------------------------- detect

  def _run(self, canvases: np.ndarray, tokens: np.ndarray, nms_iou: float,
           batch_size: int) -> dict[str, np.ndarray]:
    """The exported function over batches (padded to one shape)."""
    size = self.fixed_batch or max(1, min(batch_size, len(canvases)))
    parts = []
    for start in range(0, len(canvases), size):
      chunk = canvases[start:start + size]
      pad = size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:],
                                                chunk.dtype)])
      out = self._call(self.params, chunk, tokens, np.float32(nms_iou))
      parts.append({k: np.asarray(v)[:size - pad] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def detect(self, images: Sequence[str | os.PathLike | np.ndarray],
             queries: Sequence[str], *, top_k: int | None = None,
             threshold: float = 0.1, nms_iou: float | None = 0.5,
             batch_size: int = 8) -> list[dict[str, Any]]:
    """Boxes of the images for text queries (`predict`'s options).

    Args:
      images: paths or uint8 arrays (see the module doc); one image alone
        is accepted too.
      queries: text queries; more than the export's P run in several calls.
      top_k: boxes kept per query before the threshold (default and
        most: the export's ``max_boxes``, 20 unless exported otherwise).
      threshold: minimum score.
      nms_iou: per-query greedy NMS IoU; None or 0 for none.
      batch_size: images per call when the export's batch is symbolic
        (a fixed batch is used as exported).

    Returns:
      One dict per image: ``width``, ``height`` (as displayed), ``step``,
      ``queries`` (tokens and unknown words of each), ``detections``
      (``query``, ``query_index``, ``score``, ``box_xyxy``, ``box_xywh`` in
      pixels, descending score), and ``image`` for paths.
    """
    if isinstance(images, (str, os.PathLike, np.ndarray)) and not (
        isinstance(images, np.ndarray) and images.dtype == object):
      images = [images]
    if isinstance(queries, str):
      queries = [queries]
    if not queries:
      raise ValueError("No queries: pass one or more query strings.")
    top_k = self.max_boxes if top_k is None else top_k
    if top_k < 1:
      raise ValueError(f"top_k={top_k} must be >= 1.")
    k = min(top_k, self.num_patches)
    if k > self.max_boxes:
      raise ValueError(f"top_k={top_k} but the export keeps {self.max_boxes}"
                       " boxes per query; re-export with --max_boxes="
                       f"{top_k}.")
    loaded = [im if isinstance(im, Image) else self.load_image(im)
              for im in images]
    if not loaded:
      return []
    text_queries = self.text_queries(queries)
    canvases = np.stack([im.canvas for im in loaded])  # [B, S, S, 3]
    nms = float(nms_iou) if nms_iou else NO_NMS
    p = self.max_queries
    outs = []  # Per chunk of P queries: [B, P, K] ...
    for start in range(0, len(text_queries), p):
      tokens = queries_lib.pad_queries(text_queries[start:start + p], p,
                                       self.max_tokens)
      outs.append(self._run(canvases, tokens, nms, batch_size))
    num = len(text_queries)
    scores, boxes, keep = (np.concatenate([o[key] for o in outs], axis=1)
                           [:, :num, :k] for key in ("scores", "boxes",
                                                     "keep"))
    query_info = [{"query": q.text, "tokens": list(q.tokens[0]) if q.tokens
                   else [], "unknown_words": list(q.unknown)}
                  for q in text_queries]
    results = []
    for b, image in enumerate(loaded):
      h, w = image.pixels.shape[:2]
      xyxy = detections_lib.canvas_to_original_xyxy(
          boxes[b][None], self.image_size, np.array([image.scale]),
          np.array([[h, w]]))[0]  # [Q, k, 4]
      dets = []
      for qi, q in enumerate(text_queries):
        if q.empty:
          continue
        for j in range(k):
          score = scores[b, qi, j]
          if not keep[b, qi, j] or score < threshold or score <= 0:
            continue
          dets.append({
              "query": q.text, "query_index": qi,
              "score": round(float(score), 5),
              "box_xyxy": np.round(xyxy[qi, j].astype(np.float64),
                                   2).tolist(),
              "box_xywh": np.round(detections_lib.xyxy_to_xywh(
                  xyxy[qi, j]).astype(np.float64), 2).tolist()})
      dets.sort(key=lambda x: -x["score"])
      result = {"width": w, "height": h, "step": self.step,
                "queries": query_info, "detections": dets}
      if image.path:
        result["image"] = image.path
      results.append(result)
    return results


def load(directory: str) -> Detector:
  """The detector of an export directory (`omnitrain_jax.export`)."""
  return Detector(directory)
