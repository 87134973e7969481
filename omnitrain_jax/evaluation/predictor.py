"""The `Predictor`: a trained run's model, ready for images and queries.

`Predictor.from_workdir(workdir)` restores the params of a run (latest or
given checkpoint) onto the config's mesh through `model_setup` and the run's
vocabulary; `predict(image, text_queries, image_queries)` returns the boxes
of one image as a JSON-able dict, and `predict_files` writes ``<stem>.json``
and ``<stem>.png`` per image. The ``predict`` binary (`omnitrain_jax.predict`,
whose docstring describes queries, images and outputs) is a thin wrapper.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from omnitrain_jax import checkpointing
from omnitrain_jax import config_lib
from omnitrain_jax import model_setup
from omnitrain_jax import progress
from omnitrain_jax import sharding
from omnitrain_jax import vocab_transfer
from omnitrain_jax.data import errors
from omnitrain_jax.data import images as images_lib
from omnitrain_jax.data import preparation
from omnitrain_jax.data import transforms
from omnitrain_jax.evaluation import context as context_lib
from omnitrain_jax.evaluation import detections as detections_lib
from omnitrain_jax.evaluation import draw
from omnitrain_jax.evaluation import grounding_metrics
from omnitrain_jax.evaluation import inference
from omnitrain_jax.evaluation import queries as queries_lib
from omnitrain_jax.models import omnidet
from omnitrain_jax.vocab import tokenizer as tokenizer_lib
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                    ".tiff")
VOCAB_FILE = vocab_transfer.VOCAB_FILE
# A warning when the image-guided query's box matches no prediction well.
MIN_QUERY_BOX_IOU = 0.3


@dataclasses.dataclass(frozen=True)
class ImageQuery:
  """An image-guided query: a box's class embedding from another image.

  Attributes:
    label: the name used in outputs.
    embedding: float32 [D], L2-normalised.
    info: where it came from (query image, given box, matched box, IoU).
  """
  label: str
  embedding: np.ndarray
  info: dict


@dataclasses.dataclass(frozen=True)
class LoadedImage:
  """A decoded image and its canvas.

  Attributes:
    path: the file.
    pixels: uint8 [H, W, 3] RGB, EXIF orientation applied.
    canvas: uint8 [S, S, 3], longest side resized to S, padded.
    scale: original -> canvas pixels.
  """
  path: str
  pixels: np.ndarray
  canvas: np.ndarray
  scale: float


# The vocabulary of a run (`predict`'s order: --vocab, WORKDIR/vocab.txt,
# data.vocab.path, built); shared with evaluate and export.
resolve_vocab = context_lib.resolve_vocab


def list_images(path: str) -> list[str]:
  """The images of `path`: the file itself, the image files directly in a
  folder (sorted), or the lines of a ``.txt`` list (relative to its folder)."""
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}"
                              f") in {path}.")
    return files
  if not os.path.exists(path):
    raise FileNotFoundError(f"--image={path} does not exist.")
  if path.lower().endswith(".txt"):
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
      files = [os.path.join(base, line.strip()) for line in f
               if line.strip() and not line.startswith("#")]
    if not files:
      raise FileNotFoundError(f"--image={path} lists no image files.")
    return files
  return [path]


def parse_box(text: str) -> tuple[float, float, float, float]:
  """"x,y,w,h" -> floats (pixels of the query image)."""
  try:
    x, y, w, h = (float(v) for v in text.split(","))
  except ValueError:
    raise ValueError(f"--query_box={text!r} must be four numbers x,y,w,h "
                     "(top-left corner, width, height in pixels).") from None
  if w <= 0 or h <= 0:
    raise ValueError(f"--query_box={text!r}: width and height must be > 0.")
  return x, y, w, h


class Predictor:
  """A trained model ready to find boxes for text and image queries."""

  def __init__(self, *, model: omnidet.OmniDet, params: Any,
               mesh: jax.sharding.Mesh, param_shardings: Any, rules: Any,
               tokenizer: tokenizer_lib.Tokenizer, step: int | None = None):
    """Wraps a model and its params (see `from_workdir`).

    Args:
      model: the OmniDet.
      params: its params, placed with `param_shardings`.
      mesh: the device mesh.
      param_shardings: the params' shardings.
      rules: logical axis rules (activation constraints).
      tokenizer: over the run's vocabulary.
      step: the checkpoint step (recorded in the JSON).
    """
    self.model, self.params, self.mesh = model, params, mesh
    self.tokenizer, self.step = tokenizer, step
    self._rules = rules
    rep, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    def encode(params, canvas):
      return model.apply({"params": params}, canvas, train=False,
                         method=omnidet.OmniDet.encode)

    self._encode = self._jit(encode, in_shardings=(param_shardings, rep),
                             out_shardings=rep)
    # Batches of images: split over the mesh's data axis.
    self._encode_batch = self._jit(encode,
                                   in_shardings=(param_shardings, batch),
                                   out_shardings=batch)
    self._param_shardings = param_shardings
    self._detect_cache: dict[tuple, Any] = {}
    self._describe_cache: dict[int, Any] = {}

  @classmethod
  def from_workdir(cls, workdir: str, *, config: Any = None,
                   step: int | None = None, vocab: str | None = None
                   ) -> Predictor:
    """Restores the params of a training run.

    Args:
      workdir: the run's directory.
      config: its config (default ``WORKDIR/config.json``).
      step: checkpoint step (default: the latest finished).
      vocab: vocabulary file (default: see `resolve_vocab`). One other than
        the run's ``WORKDIR/vocab.txt`` gets the trained rows of the tokens
        the two share; its new tokens start from their word pieces
        (`vocab_transfer`, reported in the log).
    """
    config = config or config_lib.config_from_workdir(workdir)
    vocabulary = vocabulary_lib.Vocabulary.load(
        resolve_vocab(workdir, config, vocab))
    # Only what the model needs: no dataset is opened.
    setup = model_setup.create(config, vocab_size=len(vocabulary),
                               spec=preparation.spec_from_config(config.data))
    params, step = checkpointing.restore_params(
        workdir, setup.abstract_state, step, vocab=vocabulary)
    return cls(model=setup.model, params=params, mesh=setup.mesh,
               param_shardings=setup.param_shardings, rules=setup.rules,
               tokenizer=tokenizer_lib.Tokenizer(vocabulary), step=step)

  def _jit(self, fn, **jit_kwargs):
    return sharding.jit_in_mesh(fn, self.mesh, self._rules, **jit_kwargs)

  def _embed_fn(self, params):
    """ids -> normalised token rows (`OmniDet.token_embeddings`)."""
    return lambda ids: self.model.apply(
        {"params": params}, ids, method=omnidet.OmniDet.token_embeddings)

  # ------------------------------------------------------------- images

  def load_image(self, path: str) -> LoadedImage:
    """Decodes (EXIF-rotated RGB) and resizes/pads like evaluation."""
    return self.load_record({"image_path": os.path.abspath(path), "width": 0,
                             "height": 0, "source": "predict", "image_id": 0},
                            path=path)

  def load_record(self, record: dict[str, Any], path: str | None = None
                  ) -> LoadedImage:
    """`load_image` of a reader record (its size checked as in training);
    `path`: the `LoadedImage.path` (default the record's)."""
    path = record["image_path"] if path is None else path
    pixels = images_lib.load_image(record)
    resized = transforms.ResizePad(self.model.image_size).apply(
        {"image": pixels, "boxes": np.zeros((0, 4), np.float32),
         "stream": "img"})
    return LoadedImage(path=path, pixels=pixels, canvas=resized["image"],
                       scale=float(resized["scale"]))

  def encode(self, image: LoadedImage) -> dict[str, jax.Array]:
    """`OmniDet.encode` of one image (batch of 1, on the devices)."""
    return self._encode(self.params, image.canvas[None])

  @property
  def data_parallel(self) -> int:
    """Images per batch must be a multiple of this (the mesh's data axis)."""
    return self.mesh.shape[sharding.DATA]

  def _encode_images(self, images: Sequence[LoadedImage]
                     ) -> dict[str, jax.Array]:
    """`OmniDet.encode` of a batch, padded to a multiple of `data_parallel`."""
    canvases = np.stack([im.canvas for im in images])
    pad = -len(images) % self.data_parallel
    if len(images) == 1 and pad == 0:
      return self.encode(images[0])  # The single-image program, as before.
    if pad:
      canvases = np.concatenate(
          [canvases, np.zeros((pad,) + canvases.shape[1:], canvases.dtype)])
    return self._encode_batch(self.params, canvases)

  def _to_pixels(self, image: LoadedImage, boxes: np.ndarray) -> np.ndarray:
    """Canvas cxcywh [..., 4] -> xyxy pixels of `image`."""
    boxes = np.asarray(boxes)[None]
    h, w = image.pixels.shape[:2]
    return detections_lib.canvas_to_original_xyxy(
        boxes, self.model.image_size, np.array([image.scale]),
        np.array([[h, w]]))[0]

  # ------------------------------------------------------------ queries

  def text_queries(self, texts: Sequence[str]) -> list[queries_lib.Query]:
    """Tokenizes; logs unknown words and queries without any known token."""
    return [queries_lib.user_query(self.tokenizer, text) for text in texts]

  def image_query(self, path: str, box_xywh: Sequence[float],
                  label: str | None = None) -> ImageQuery:
    """The class embedding of the predicted box that best overlaps a box.

    Args:
      path: the query image.
      box_xywh: ``x, y, w, h`` of the example object, in the query image's
        pixels (as displayed, after EXIF rotation).
      label: name for outputs (default ``image:<file name>``).

    Returns:
      The `ImageQuery`.
    """
    image = self.load_image(path)
    enc = jax.device_get(self.encode(image))
    predicted = self._to_pixels(image, enc["pred_boxes"][0])  # [N, 4]
    given = detections_lib.xywh_to_xyxy(np.asarray(box_xywh, np.float32))
    ious = grounding_metrics.box_iou(given[None], predicted)[0]
    best = int(np.argmax(ious))
    if ious[best] < MIN_QUERY_BOX_IOU:
      logging.warning(
          "Query box %s in %s overlaps no predicted box well (best IoU "
          "%.2f): the query embedding may describe something else. Draw the "
          "box tightly around one object.", list(box_xywh), path, ious[best])
    info = {"query_image": path, "query_box_xywh": [float(v) for v in
                                                    box_xywh],
            "matched_box_xywh": np.round(detections_lib.xyxy_to_xywh(
                predicted[best]).astype(np.float64), 2).tolist(),
            "matched_iou": round(float(ious[best]), 4)}
    return ImageQuery(label=label or f"image:{os.path.basename(path)}",
                      embedding=np.asarray(enc["class_embeddings"][0, best],
                                           np.float32), info=info)

  # ------------------------------------------------------------ scoring

  def _detect_fn(self, num_text: int, max_tokens: int, num_image: int,
                 k: int, nms: float | None):
    key = (num_text, max_tokens, num_image, k, nms)
    if key not in self._detect_cache:
      def detect(params, enc, tokens, embeddings):
        parts = []
        if num_text:
          parts.append(inference.score_queries(enc, self._embed_fn(params),
                                               tokens))
        if num_image:
          parts.append(inference.embedding_scores(enc, embeddings))
        scores = jnp.concatenate(parts, axis=-1)  # [B, N, Q]
        # [B, Q, k], [B, Q, k, 4], [B, Q, k]
        return inference.top_k_detections(scores, enc["pred_boxes"], k,
                                          nms_iou_threshold=nms)
      rep = sharding.replicated(self.mesh)
      self._detect_cache[key] = self._jit(
          detect, in_shardings=(self._param_shardings, rep, rep, rep),
          out_shardings=rep)
    return self._detect_cache[key]

  def _describe(self, enc, box_index: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k vocabulary tokens (probabilities, ids) of boxes [M]."""
    if k not in self._describe_cache:
      def describe(params, enc, index):
        boxes = {key: jnp.take(enc[key], index, axis=1) for key in
                 ("class_embeddings", "logit_scale", "logit_shift")}
        logits, ids = inference.top_k_vocab(
            boxes, self._embed_fn(params), self.model.vocab_size, k)
        return jax.nn.sigmoid(logits[0]), ids[0]
      rep = sharding.replicated(self.mesh)
      self._describe_cache[k] = self._jit(
          describe, in_shardings=(self._param_shardings, rep, rep),
          out_shardings=rep)
    probs, ids = self._describe_cache[k](self.params, enc,
                                         np.asarray(box_index, np.int32))
    return np.asarray(probs), np.asarray(ids)

  def predict(self, image: str | LoadedImage,
              text_queries: Sequence[queries_lib.Query] = (),
              image_queries: Sequence[ImageQuery] = (), **kwargs
              ) -> dict[str, Any]:
    """Boxes of one image for the queries (the JSON of the module doc).

    Args:
      image: a path or a `LoadedImage`.
      text_queries: from `text_queries`.
      image_queries: from `image_query`.
      **kwargs: see `predict_batch`.

    Returns:
      The prediction as a JSON-able dict.
    """
    if isinstance(image, str):
      image = self.load_image(image)
    return self.predict_batch([image], text_queries, image_queries,
                              **kwargs)[0]

  def predict_batch(self, images: Sequence[LoadedImage],
                    text_queries: Sequence[queries_lib.Query] = (),
                    image_queries: Sequence[ImageQuery] = (), *,
                    max_boxes: int = 20, threshold: float = 0.1,
                    nms_iou: float | None = 0.5, describe: int = 0
                    ) -> list[dict[str, Any]]:
    """Boxes of several images for the same queries, in one device batch.

    Args:
      images: decoded images (`load_image`); padded on the device side to a
        multiple of the mesh's data axis.
      text_queries: from `text_queries`.
      image_queries: from `image_query`.
      max_boxes: boxes kept per query (before the threshold).
      threshold: minimum score.
      nms_iou: per-query NMS IoU, None or 0 for none.
      describe: if > 0, the top tokens of each kept box.

    Returns:
      One JSON-able dict per image (the module doc of `predict`).
    """
    if not text_queries and not image_queries:
      raise ValueError("No queries: pass --queries and/or --query_image with "
                       "--query_box.")
    enc = self._encode_images(images)
    n = self.model.num_patches
    k = max(1, min(max_boxes, n))
    max_tokens = max([len(q.token_ids) for q in text_queries] + [1])
    tokens = queries_lib.pad_queries(text_queries, len(text_queries),
                                     max_tokens)
    d = enc["class_embeddings"].shape[-1]
    embeddings = np.stack([q.embedding for q in image_queries]) if (
        image_queries) else np.zeros((0, d), np.float32)
    fn = self._detect_fn(len(text_queries), max_tokens, len(image_queries), k,
                         nms_iou or None)
    scores, boxes, index = map(np.asarray, fn(self.params, enc, tokens,
                                              embeddings))
    labels = ([q.text for q in text_queries] +
              [q.label for q in image_queries])
    empty = [q.empty for q in text_queries] + [False] * len(image_queries)
    query_info = [{"query": q.text, "tokens": list(q.tokens[0]) if q.tokens
                   else [], "unknown_words": list(q.unknown)}
                  for q in text_queries]
    query_info += [{"query": q.label, **q.info} for q in image_queries]
    results = []
    for b, image in enumerate(images):
      h, w = image.pixels.shape[:2]
      xyxy = self._to_pixels(image, boxes[b])  # [Q, k, 4]
      dets = []
      for qi, label in enumerate(labels):
        if empty[qi]:
          continue
        for j in range(k):
          score = scores[b, qi, j]
          if score < threshold or score <= 0:
            continue
          dets.append({
              "query": label, "query_index": qi,
              "score": round(float(score), 5),
              "box_xyxy": np.round(xyxy[qi, j].astype(np.float64),
                                   2).tolist(),
              "box_xywh": np.round(detections_lib.xyxy_to_xywh(
                  xyxy[qi, j]).astype(np.float64), 2).tolist(),
              "_box_index": int(index[b, qi, j])})
      dets.sort(key=lambda x: -x["score"])
      if describe and dets:
        k_vocab = min(describe, len(self.tokenizer.vocab) - 2)
        one = {key: np.asarray(enc[key][b:b + 1]) for key in
               ("class_embeddings", "logit_scale", "logit_shift")}
        probs, ids = self._describe(one, np.array([x["_box_index"]
                                                   for x in dets]), k_vocab)
        vocab = self.tokenizer.vocab
        for x, p, t in zip(dets, probs, ids):
          x["top_tokens"] = [[vocab.token(int(i)), round(float(v), 5)]
                             for v, i in zip(p, t) if i >= 0]
      for x in dets:
        del x["_box_index"]
      results.append({
          "image": os.path.abspath(image.path), "width": w, "height": h,
          "step": self.step, "box_format": "pixels of the image as "
          "displayed (EXIF applied); box_xyxy = [x0, y0, x1, y1], box_xywh "
          "= [x, y, w, h]", "queries": query_info, "detections": dets})
    return results


def _output_stems(paths: Sequence[str]) -> list[str]:
  """File stems, made unique ("a.jpg", "a.png" -> "a_jpg", "a_png")."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  dupes = {s for s in stems if stems.count(s) > 1}
  return [os.path.basename(p).replace(".", "_") if s in dupes else s
          for p, s in zip(paths, stems)]


def coco_categories(json_path: str) -> tuple[dict[str, int], dict[str, int]]:
  """A COCO/LVIS file's categories and images, for COCO-format predictions.

  Returns:
    (category name -> id, image file base name -> image id).
  """
  with open(json_path) as f:
    data = json.load(f)
  if not isinstance(data, dict) or not data.get("categories"):
    raise ValueError(f"--categories_from={json_path} has no 'categories' "
                     "list; pass a COCO or LVIS instances file.")
  names = {c["name"]: int(c["id"]) for c in data["categories"]}
  images = {os.path.basename(im.get("file_name") or im.get("coco_url", "")):
            int(im["id"]) for im in data.get("images", [])}
  return names, images


def predict_files(predictor: Predictor, paths: Sequence[str], out_dir: str,
                  texts: Sequence[str] = (),
                  image_queries: Sequence[ImageQuery] = (), *,
                  batch_size: int = 8,
                  categories: tuple[dict[str, int], dict[str, int]] | None
                  = None, draw_png: bool = True,
                  progress_every_secs: float = 10.0, **kwargs
                  ) -> list[dict[str, Any]]:
  """Predicts every image in batches; writes ``<stem>.json`` and ``.png``.

  Unreadable images are reported, counted and skipped. With `categories`
  (`coco_categories`: the queries are a dataset's category names), also
  writes ``detections.json``, every kept box as a COCO result (``image_id``
  from the file's images by file name, else the image's position in
  `paths`; ``category_id``; ``bbox`` ``[x, y, w, h]``; ``score``).

  Args:
    predictor: the model.
    paths: image files.
    out_dir: where the files go.
    texts: text queries.
    image_queries: image-guided queries.
    batch_size: images per device batch (rounded up to a multiple of the
      mesh's data axis).
    categories: see above.
    draw_png: also write ``<stem>.png`` (drawing dominates the host's time
      for small models: `benchmarks/batch_predict.py`).
    progress_every_secs: console progress period.
    **kwargs: `Predictor.predict_batch` options.

  Returns:
    The predictions of the readable images, in order.
  """
  os.makedirs(out_dir, exist_ok=True)
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size} must be >= 1.")
  text_queries = predictor.text_queries(texts)
  dp = predictor.data_parallel
  batch_size = -(-min(batch_size, max(len(paths), 1)) // dp) * dp
  report = progress.ReportProgress(len(paths), every_secs=progress_every_secs,
                                   name="predict", unit="images")
  report(0)
  stems = dict(zip(paths, _output_stems(paths)))
  position = {p: i for i, p in enumerate(paths)}
  results, coco, skipped = [], [], []
  for start in range(0, len(paths), batch_size):
    chunk = paths[start:start + batch_size]
    images = []
    for path in chunk:
      try:
        images.append(predictor.load_image(path))
      except (errors.DataError, OSError) as e:
        logging.warning("Skipping %s: %s", path, e)
        skipped.append({"image": path, "error": str(e)})
    if images:
      batch = predictor.predict_batch(images, text_queries, image_queries,
                                      **kwargs)
    else:
      batch = []
    for image, result in zip(images, batch):
      stem = os.path.join(out_dir, stems[image.path])
      with open(f"{stem}.json", "w") as f:
        json.dump(result, f, indent=1)
      if draw_png:
        draw.draw_detections(image.pixels, result["detections"]).save(
            f"{stem}.png")
      logging.info("%s: %d boxes -> %s.json", image.path,
                   len(result["detections"]), stem)
      if categories is not None:
        names, image_ids = categories
        image_id = image_ids.get(os.path.basename(image.path),
                                 position[image.path])
        coco += [{"image_id": image_id, "category_id": names[d["query"]],
                  "bbox": d["box_xywh"], "score": d["score"]}
                 for d in result["detections"] if d["query"] in names]
      results.append(result)
    report(start + len(chunk))
  if categories is not None:
    with open(os.path.join(out_dir, "detections.json"), "w") as f:
      json.dump(coco, f)
  if skipped:
    with open(os.path.join(out_dir, "skipped.json"), "w") as f:
      json.dump(skipped, f, indent=1)
    logging.warning("%d of %d images could not be read and were skipped "
                    "(listed in %s).", len(skipped), len(paths),
                    os.path.join(out_dir, "skipped.json"))
  return results
