r"""Prediction: images + text (or image) queries -> boxes as JSON and PNG.

    python -m omnitrain_jax.predict --workdir=runs/demo --image=photo.jpg \
        --queries="red circle,blue star" [--out=DIR] [--threshold=0.1]
    python -m omnitrain_jax.predict --workdir=runs/demo --image=photos/ \
        --query_image=example.jpg --query_box=40,30,80,60
    python -m omnitrain_jax.predict --workdir=runs/demo --image=a.png \
        --queries="star" --describe=5     # + the 5 best tokens of each box

Model and vocabulary. The params of the latest finished checkpoint (or
``--checkpoint_step``) are restored onto the config's mesh; the config is
``--config`` or else the run's own ``WORKDIR/config.json``. The vocabulary
is, in order: ``--vocab``, ``WORKDIR/vocab.txt``, ``config.data.vocab.path``,
and else the one `pipeline.prepare_data` builds from the config's training
annotations (cached; this needs the training data or its cache).

Images. Any size and format that `data/images.py` decodes (JPEG with EXIF
rotation, PNG incl. grayscale and RGBA, BMP, TIFF, WebP, GIF); the longest
side is resized to the model's image size and padded, exactly as in
evaluation (`data.transforms.ResizePad`), and boxes are mapped back to the
pixels of the (EXIF-rotated) image.

Queries.

* Text (``--queries``, comma-separated): tokenized with the run's
  vocabulary; a box's score is the geometric mean of its token
  probabilities (soft AND: "purple star" needs both). Unknown words are
  reported (log and JSON) and left out; a query with no known token scores 0
  and yields no box.
* Image-guided (``--query_image`` + ``--query_box=x,y,w,h`` in that image's
  pixels; OWL-ViT's one-shot detection): the query image's predicted box
  with the best IoU with the given box lends its class embedding as the
  query; other boxes are scored against it with their own logit scale and
  shift (``sigmoid(scale * <z, q> + shift)``), like a one-token text query.

Output, per image, in ``--out`` (default ``WORKDIR/predict``):

* ``<stem>.json``: ``{"image", "width", "height", "step", "queries": [...],
  "detections": [{"query", "query_index", "score", "box_xyxy": [x0, y0, x1,
  y1], "box_xywh": [x, y, w, h]}, ...]}``, boxes in pixels of the image as
  displayed, best first; with ``--describe=K`` each detection also has
  ``top_tokens`` (``[[token, probability], ...]``, chunked full-vocabulary
  top-k);
* ``<stem>.png``: the image with the boxes and "query score" labels (an
  image under 512 px is drawn enlarged by an integer factor, so the labels
  do not hide the objects; the JSON stays in original pixels).

Per query the ``--max_boxes`` best boxes above ``--threshold`` are kept,
after greedy NMS per query at IoU ``--nms_iou`` (0 disables it; one-to-one
trained models rarely need it, but it keeps pictures of weak models legible).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from omnitrain_jax import evaluate
from omnitrain_jax import runtime
from omnitrain_jax import sharding
from omnitrain_jax.data import images as images_lib
from omnitrain_jax.data import pipeline
from omnitrain_jax.data import schema
from omnitrain_jax.data import transforms
from omnitrain_jax.evaluation import detections as detections_lib
from omnitrain_jax.evaluation import draw
from omnitrain_jax.evaluation import grounding
from omnitrain_jax.evaluation import inference
from omnitrain_jax.evaluation import queries as queries_lib
from omnitrain_jax.losses import scoring
from omnitrain_jax.models import omnidet
from omnitrain_jax.models import partitioning
from omnitrain_jax.vocab import tokenizer as tokenizer_lib
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                    ".tiff")
VOCAB_FILE = "vocab.txt"
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


def resolve_vocab(workdir: str, config: Any, vocab: str | None = None
                  ) -> str:
  """The vocabulary file of a run (see the module doc for the order)."""
  candidates = [vocab, os.path.join(workdir, VOCAB_FILE),
                config.data.vocab.get("path") or None]
  for path in candidates:
    if path and epath.Path(path).exists():
      return str(path)
  if vocab:
    raise FileNotFoundError(f"--vocab={vocab} does not exist.")
  logging.info("No %s in %s and no data.vocab.path: building the vocabulary "
               "from the config's data (cached).", VOCAB_FILE, workdir)
  return pipeline.prepare_data(config.data).vocab_path


def list_images(path: str) -> list[str]:
  """`path` itself, or the image files directly in folder `path`, sorted."""
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}"
                              f") in {path}.")
    return files
  if not os.path.exists(path):
    raise FileNotFoundError(f"--image={path} does not exist.")
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
    self._rules = tuple(map(tuple, rules))
    rep = sharding.replicated(mesh)

    def encode(params, canvas):
      return model.apply({"params": params}, canvas, train=False,
                         method=omnidet.OmniDet.encode)

    self._encode = self._in_mesh(jax.jit(
        encode, in_shardings=(param_shardings, rep), out_shardings=rep))
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
      vocab: vocabulary file (default: see `resolve_vocab`).
    """
    from omnitrain_jax import train  # pylint: disable=g-import-not-at-top
    config = config or evaluate.config_from_workdir(workdir)
    vocab_path = resolve_vocab(workdir, config, vocab)
    vocabulary = vocabulary_lib.Vocabulary.load(vocab_path)
    # Only what the model needs: no dataset is opened.
    info = pipeline.DataInfo(
        root="", sources={s: {} for s in schema.STREAMS},
        vocab_path=vocab_path, vocab=vocabulary,
        tokenizer=tokenizer_lib.Tokenizer(vocabulary),
        spec=pipeline.spec_from_config(config.data))
    s = train.setup(config, info=info)
    params, step = evaluate.restore_params(workdir, s.abstract_state, step)
    return cls(model=s.model, params=params, mesh=s.mesh,
               param_shardings=s.state_shardings.params,
               rules=partitioning.get_rules(config.logical_rules),
               tokenizer=info.tokenizer, step=step)

  def _in_mesh(self, jitted):
    mesh, rules = self.mesh, self._rules

    def call(*args):
      with partitioning.activation_sharding(mesh, rules):
        return jitted(*args)

    return call

  # ------------------------------------------------------------- images

  def load_image(self, path: str) -> LoadedImage:
    """Decodes (EXIF-rotated RGB) and resizes/pads like evaluation."""
    record = {"image_path": os.path.abspath(path), "width": 0, "height": 0,
              "source": "predict", "image_id": 0}
    pixels = images_lib.load_image(record)
    resized = transforms.ResizePad(self.model.image_size).apply(
        {"image": pixels, "boxes": np.zeros((0, 4), np.float32),
         "stream": "img"})
    return LoadedImage(path=path, pixels=pixels, canvas=resized["image"],
                       scale=float(resized["scale"]))

  def encode(self, image: LoadedImage) -> dict[str, jax.Array]:
    """`OmniDet.encode` of one image (batch of 1, on the devices)."""
    return self._encode(self.params, image.canvas[None])

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
    out = []
    for text in texts:
      q = queries_lib.text_query(self.tokenizer, text)
      if q.empty:
        logging.warning("Query %r has no word in the vocabulary (unknown: "
                        "%s): it scores 0 and finds nothing.", text,
                        list(q.unknown) or "only stop words")
      elif q.unknown:
        logging.warning("Query %r: words not in the vocabulary are left out: "
                        "%s (scored on %s).", text, list(q.unknown),
                        list(q.tokens[0]))
      out.append(q)
    return out

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
    ious = grounding.box_iou(given[None], predicted)[0]
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
          parts.append(scoring.score_queries(
              enc["class_embeddings"], enc["logit_scale"],
              enc["logit_shift"], params[omnidet.TOKEN_TABLE], tokens))
        if num_image:
          parts.append(inference.embedding_scores(enc, embeddings))
        scores = jnp.concatenate(parts, axis=-1)  # [1, N, Q]
        top, boxes, index = scoring.top_k_detections(
            scores, enc["pred_boxes"], k, nms_iou_threshold=nms)
        return top[0], boxes[0], index[0]  # [Q, k], [Q, k, 4], [Q, k]
      rep = sharding.replicated(self.mesh)
      self._detect_cache[key] = self._in_mesh(jax.jit(
          detect, in_shardings=(self._param_shardings, rep, rep, rep),
          out_shardings=rep))
    return self._detect_cache[key]

  def _describe(self, enc, box_index: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k vocabulary tokens (probabilities, ids) of boxes [M]."""
    if k not in self._describe_cache:
      def describe(params, enc, index):
        take = lambda x: jnp.take(x, index, axis=1)
        logits, ids = scoring.top_k_vocab(
            take(enc["class_embeddings"]), take(enc["logit_scale"]),
            take(enc["logit_shift"]), params[omnidet.TOKEN_TABLE], k)
        return jax.nn.sigmoid(logits[0]), ids[0]
      rep = sharding.replicated(self.mesh)
      self._describe_cache[k] = self._in_mesh(jax.jit(
          describe, in_shardings=(self._param_shardings, rep, rep),
          out_shardings=rep))
    probs, ids = self._describe_cache[k](self.params, enc,
                                         np.asarray(box_index, np.int32))
    return np.asarray(probs), np.asarray(ids)

  def predict(self, image: str | LoadedImage,
              text_queries: Sequence[queries_lib.Query] = (),
              image_queries: Sequence[ImageQuery] = (), *,
              max_boxes: int = 20, threshold: float = 0.1,
              nms_iou: float | None = 0.5, describe: int = 0
              ) -> dict[str, Any]:
    """Boxes of one image for the queries (the JSON of the module doc).

    Args:
      image: a path or a `LoadedImage`.
      text_queries: from `text_queries`.
      image_queries: from `image_query`.
      max_boxes: boxes kept per query (before the threshold).
      threshold: minimum score.
      nms_iou: per-query NMS IoU, None or 0 for none.
      describe: if > 0, the top tokens of each kept box.

    Returns:
      The prediction as a JSON-able dict.
    """
    if not text_queries and not image_queries:
      raise ValueError("No queries: pass --queries and/or --query_image with "
                       "--query_box.")
    if isinstance(image, str):
      image = self.load_image(image)
    h, w = image.pixels.shape[:2]
    enc = self.encode(image)
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
    xyxy = self._to_pixels(image, boxes)  # [Q, k, 4]
    labels = ([q.text for q in text_queries] +
              [q.label for q in image_queries])
    empty = [q.empty for q in text_queries] + [False] * len(image_queries)
    dets = []
    for qi, label in enumerate(labels):
      if empty[qi]:
        continue
      for j in range(k):
        if scores[qi, j] < threshold or scores[qi, j] <= 0:
          continue
        dets.append({
            "query": label, "query_index": qi,
            "score": round(float(scores[qi, j]), 5),
            "box_xyxy": np.round(xyxy[qi, j].astype(np.float64), 2).tolist(),
            "box_xywh": np.round(detections_lib.xyxy_to_xywh(
                xyxy[qi, j]).astype(np.float64), 2).tolist(),
            "_box_index": int(index[qi, j])})
    dets.sort(key=lambda x: -x["score"])
    if describe and dets:
      k_vocab = min(describe, len(self.tokenizer.vocab) - 2)
      probs, ids = self._describe(enc, np.array([x["_box_index"]
                                                 for x in dets]), k_vocab)
      vocab = self.tokenizer.vocab
      for x, p, t in zip(dets, probs, ids):
        x["top_tokens"] = [[vocab.token(int(i)), round(float(v), 5)]
                           for v, i in zip(p, t) if i >= 0]
    for x in dets:
      del x["_box_index"]
    query_info = [{"query": q.text, "tokens": list(q.tokens[0]) if q.tokens
                   else [], "unknown_words": list(q.unknown)}
                  for q in text_queries]
    query_info += [{"query": q.label, **q.info} for q in image_queries]
    return {"image": os.path.abspath(image.path), "width": w, "height": h,
            "step": self.step, "box_format": "pixels of the image as "
            "displayed (EXIF applied); box_xyxy = [x0, y0, x1, y1], box_xywh "
            "= [x, y, w, h]", "queries": query_info, "detections": dets}


def _output_stems(paths: Sequence[str]) -> list[str]:
  """File stems, made unique ("a.jpg", "a.png" -> "a_jpg", "a_png")."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  dupes = {s for s in stems if stems.count(s) > 1}
  return [os.path.basename(p).replace(".", "_") if s in dupes else s
          for p, s in zip(paths, stems)]


def predict_files(predictor: Predictor, paths: Sequence[str], out_dir: str,
                  texts: Sequence[str] = (),
                  image_queries: Sequence[ImageQuery] = (), **kwargs
                  ) -> list[dict[str, Any]]:
  """Predicts every image; writes ``<stem>.json`` and ``<stem>.png``."""
  os.makedirs(out_dir, exist_ok=True)
  text_queries = predictor.text_queries(texts)
  results = []
  for path, stem in zip(paths, _output_stems(paths)):
    image = predictor.load_image(path)
    result = predictor.predict(image, text_queries, image_queries, **kwargs)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
      json.dump(result, f, indent=1)
    draw.draw_detections(image.pixels, result["detections"]).save(
        os.path.join(out_dir, f"{stem}.png"))
    logging.info("%s: %d boxes -> %s.{json,png}", path,
                 len(result["detections"]), os.path.join(out_dir, stem))
    results.append(result)
  return results


# ----------------------------------------------------------------------------
# The binary.


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Config file (default: WORKDIR/config.json).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  flags.DEFINE_integer("checkpoint_step", None,
                       "Checkpoint step (default: the latest finished).")
  flags.DEFINE_string("image", None, "An image file or a folder of images.")
  flags.DEFINE_list("queries", [], "Comma-separated text queries.")
  flags.DEFINE_string("query_image", None, "Image of an example object.")
  flags.DEFINE_string("query_box", None,
                      "x,y,w,h of the example object in --query_image.")
  flags.DEFINE_string("out", None, "Output folder (default WORKDIR/predict).")
  flags.DEFINE_float("threshold", 0.1, "Minimum score of a kept box.")
  flags.DEFINE_integer("max_boxes", 20, "Boxes kept per query.")
  flags.DEFINE_float("nms_iou", 0.5, "Per-query NMS IoU; 0 disables.")
  flags.DEFINE_integer("describe", 0,
                       "List the K most likely tokens of every kept box.")
  flags.DEFINE_string("vocab", None, "Vocabulary file (default: see doc).")
  flags.mark_flags_as_required(["workdir", "image"])


def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  runtime.quiet_library_logs()
  if bool(f.query_image) != bool(f.query_box):
    raise app.UsageError("--query_image and --query_box go together.")
  if not f.queries and not f.query_image:
    raise app.UsageError("Pass --queries and/or --query_image/--query_box.")
  paths = list_images(f.image)
  predictor = Predictor.from_workdir(f.workdir, config=f.config,
                                     step=f.checkpoint_step, vocab=f.vocab)
  image_queries = []
  if f.query_image:
    image_queries.append(predictor.image_query(f.query_image,
                                               parse_box(f.query_box)))
  predict_files(predictor, paths,
                f.out or os.path.join(f.workdir, "predict"),
                [q.strip() for q in f.queries if q.strip()], image_queries,
                max_boxes=f.max_boxes, threshold=f.threshold,
                nms_iou=f.nms_iou, describe=f.describe)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
