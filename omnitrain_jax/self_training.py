"""Self-training (OWL-ST): the model's caption-filtered boxes as det boxes.

Minderer et al. (2023, OWL-ST / OWLv2) label web images with a trained
detector: the queries are the image caption's n-grams, and the detector's
boxes above a confidence threshold become the annotations of a detection
dataset that the next model trains on. Here, per caption image:

1. every caption is chunked into its phrases (`vocab.phrases.chunk`: "two
   red hexagons and a blue circle" -> "two red hexagons" x 2, "a blue
   circle" x 1); a phrase's *name* is its tokens (the model's tokenizer),
   restricted to ``name_words`` when given (ShapesWorld's configs keep its
   colour and shape words: size and place words are not det labels) --
   "red hexagon". Several captions of one image (COCO has 5) name the same
   objects: each name's count is its largest count over the captions;
2. the model scores every name on the image (the predictor's soft AND of the
   name's tokens, per-name NMS at IoU 0.5);
3. the image's own names only (the caption filter), best first: a box is
   kept when its score reaches ``threshold``, its phrase still has count
   left, and it overlaps no kept box at IoU >= 0.5 (`select`).

The result is a COCO instances file (categories: the names; ``file_name``:
the image's absolute path; each box's ``score`` kept), read back by the det
stream's own reader as one more det source (`pseudo_source`): its boxes get
det's loss -- box regression, positives on their names, every other
prediction and name a negative -- as OWL-ST trains on its pseudo-annotations.

Two ways to use it:

* **In the run** (``config.self_train.steps``, `train.py`): at each listed
  step the trainer labels the caption stream's training images with the
  current parameters, writes ``WORKDIR/pseudo/STEP.json`` and from then on
  mixes the file into the det stream (weight ``config.self_train.weight``
  against the det sources' weights); a later step relabels with the better
  model (OWL-ST's "refresh every K steps"). One process only (the labelling
  runs the predictor on the host's devices); on pods, label offline.
* **Offline** (`experiments/self_train.py`): a finished run labels the
  images once; a second run trains with the file as a det source
  (``configs/shapes_selftrain.py``), OWL-ST's teacher -> student recipe.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
from etils import epath
import numpy as np

from omnitrain_jax.data import sources as sources_lib
from omnitrain_jax.evaluation import context as context_lib
from omnitrain_jax.evaluation import detections as detections_lib
from omnitrain_jax.evaluation import grounding_metrics
from omnitrain_jax.evaluation import predictor as predictor_lib
from omnitrain_jax.evaluation import queries as queries_lib
from omnitrain_jax.vocab import phrases as phrases_lib

SOURCE_NAME = "pseudo"


def phrase_names(tokenizer, caption: str,
                 name_words: Iterable[str] | None = None
                 ) -> list[tuple[str, int]]:
  """[(name, count)] of a caption's phrases that have a (name) token.

  Args:
    tokenizer: the model's tokenizer.
    caption: one caption.
    name_words: the tokens a name keeps (None or empty: all known tokens of
      the phrase; count words and stop words are never tokens).
  """
  keep = set(name_words or ())
  out = []
  for p in phrases_lib.chunk(caption):
    q = queries_lib.text_query(tokenizer, caption[p.start:p.end])
    toks = [t for t in (q.tokens[0] if q.tokens else ())
            if not keep or t in keep]
    if toks:
      out.append((" ".join(toks), p.count))
  return out


def image_names(tokenizer, captions: Sequence[str],
                name_words: Iterable[str] | None = None) -> dict[str, int]:
  """{name: count} of one image: the largest count over its captions."""
  names: collections.Counter = collections.Counter()
  for cap in captions:
    this: collections.Counter = collections.Counter()
    for name, count in phrase_names(tokenizer, cap, name_words):
      this[name] += count
    names |= this
  return dict(names)


def xywh_iou(a: Sequence[float], b: Sequence[float]) -> float:
  """IoU of two [x, y, w, h] boxes."""
  xyxy = detections_lib.xywh_to_xyxy(np.asarray([a, b], np.float64))
  return float(grounding_metrics.box_iou(xyxy[:1], xyxy[1:])[0, 0])


def select(dets: Sequence[Mapping[str, Any]], wanted: Mapping[str, int],
           threshold: float, iou: float = 0.5) -> list[Mapping[str, Any]]:
  """The caption filter: best first, each name up to its count, a score of
  at least `threshold`, no two kept boxes overlapping at `iou` or more.

  Args:
    dets: detections with ``query`` (a name), ``score`` and ``box_xywh``.
    wanted: {name: count} of the image (`image_names`).
    threshold: minimum score.
    iou: overlap at which a box counts as a kept box's duplicate.
  """
  left = dict(wanted)
  kept: list[Mapping[str, Any]] = []
  for d in sorted(dets, key=lambda x: -x["score"]):
    if d["score"] < threshold or left.get(d["query"], 0) <= 0:
      continue
    if any(xywh_iou(d["box_xywh"], k["box_xywh"]) >= iou for k in kept):
      continue
    left[d["query"]] -= 1
    kept.append(d)
  return kept


@dataclasses.dataclass(frozen=True)
class CaptionImage:
  """One image to label: its file, size and caption names."""
  image_id: int
  path: str
  width: int
  height: int
  names: dict[str, int]


def caption_images(records: Iterable[Mapping[str, Any]], tokenizer,
                   name_words: Iterable[str] | None = None, *,
                   max_images: int = 0, seed: int = 0
                   ) -> list[CaptionImage]:
  """The caption records' images (one per image file), with their names.

  Args:
    records: caption records (the img stream's readers: one per caption,
      ``image_path``, ``caption``, ``width``, ``height``).
    tokenizer: the model's tokenizer.
    name_words: see `phrase_names`.
    max_images: if > 0, a fixed random subset of this many images (a web
      caption set is far larger than a labelling pass should be).
    seed: the subset's seed.

  Raises:
    ValueError: a record without an image file (images inside shards or
      TFDS records cannot be named by a COCO file); the message names it.
  """
  captions: dict[str, list[str]] = collections.defaultdict(list)
  sizes: dict[str, tuple[int, int]] = {}
  ids: dict[str, set] = collections.defaultdict(set)
  for r in records:
    path = r.get("image_path")
    if not path:
      raise ValueError(
          f"Self-training needs caption images as files, but record "
          f"{r.get('image_id')!r} of source {r.get('source')!r} has none (its "
          "image is inside a shard or a TFDS record). Label a file-based "
          "caption source (config.self_train.source) or convert the shards "
          "to files.")
    captions[path].append(str(r.get("caption", "")))
    sizes[path] = (int(r.get("width") or 0), int(r.get("height") or 0))
    ids[path].add(r.get("image_id"))
  paths = sorted(captions)
  if max_images and len(paths) > max_images:
    rng = np.random.default_rng(seed)
    paths = sorted(rng.choice(paths, max_images, replace=False).tolist())
  # The records' image ids when they name the files one to one (a COCO
  # file); else (several sources, missing ids) 1..N in path order.
  own = [next(iter(ids[p])) if len(ids[p]) == 1 else None for p in paths]
  if None in own or len(set(own)) != len(own) or not all(
      isinstance(i, (int, np.integer)) for i in own):
    own = list(range(1, len(paths) + 1))
  return [CaptionImage(image_id=int(i), path=p, width=sizes[p][0],
                       height=sizes[p][1],
                       names=image_names(tokenizer, captions[p], name_words))
          for i, p in zip(own, paths)]


def load_image(predictor: predictor_lib.Predictor, image: CaptionImage
               ) -> predictor_lib.LoadedImage:
  """`Predictor.load_record` of one caption image."""
  return predictor.load_record({
      "image_path": image.path, "width": image.width, "height": image.height,
      "source": SOURCE_NAME, "image_id": image.image_id})


def label(predictor: predictor_lib.Predictor, images: Sequence[CaptionImage],
          *, threshold: float = 0.3, batch_size: int = 32,
          description: str = "") -> tuple[dict, dict]:
  """Pseudo-boxes of `images` by `predictor`.

  Returns:
    (coco, summary): a COCO instances dict (images with at least one box;
    ``file_name`` the absolute path) and a JSON-able summary (images, boxes,
    phrase instances named and boxed, boxes per name, seconds).
  """
  all_names = sorted({n for im in images for n in im.names})
  cat_ids = {n: i + 1 for i, n in enumerate(all_names)}
  out_images, anns = [], []
  per_name: collections.Counter = collections.Counter()
  t0 = time.time()
  queries = predictor.text_queries(all_names) if all_names else []
  batch_size = max(batch_size - batch_size % predictor.data_parallel,
                   predictor.data_parallel)
  todo = [im for im in images if im.names]
  named = sum(sum(im.names.values()) for im in images)
  for s in range(0, len(todo), batch_size):
    chunk = todo[s:s + batch_size]
    loaded = [load_image(predictor, im) for im in chunk]
    preds = predictor.predict_batch(loaded, queries, max_boxes=8,
                                    threshold=min(threshold, 0.05),
                                    nms_iou=0.5)
    for im, pred in zip(chunk, preds):
      kept = select([d for d in pred["detections"] if d["query"] in im.names],
                    im.names, threshold)
      if not kept:
        continue
      h, w = pred["height"], pred["width"]
      out_images.append({"id": im.image_id, "file_name": im.path,
                         "width": w, "height": h})
      for d in kept:
        x, y, bw, bh = (float(v) for v in d["box_xywh"])
        anns.append({"id": len(anns) + 1, "image_id": im.image_id,
                     "category_id": cat_ids[d["query"]],
                     "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
                     "score": d["score"]})
        per_name[d["query"]] += 1
  coco = {"info": {"description": description or
                   f"pseudo-boxes by the model of step {predictor.step}, "
                   f"threshold {threshold}"},
          "licenses": [], "images": out_images, "annotations": anns,
          "categories": [{"id": i, "name": n} for n, i in cat_ids.items()]}
  summary = {"step": predictor.step, "images": len(images),
             "images_with_boxes": len(out_images),
             "phrase_instances_named": named, "boxes": len(anns),
             "boxed_share": round(len(anns) / max(named, 1), 4),
             "boxes_per_name": dict(sorted(per_name.items())),
             "seconds": round(time.time() - t0, 1)}
  return coco, summary


def write_json(path: str, value: Any) -> None:
  """`evaluation.context.write_json` (atomic), its folder made first."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  context_lib.write_json(target, value)


def pseudo_source(path: str, weight: float) -> sources_lib.SourceSpec:
  """The det source of a pseudo-box file (`label`'s COCO file)."""
  return sources_lib.SourceSpec(name=SOURCE_NAME, stream="det",
                                reader="coco_instances", train=str(path),
                                image_dir="/", weight=float(weight))


def resolve_steps(values: Sequence[float], total_steps: int) -> list[int]:
  """``config.self_train.steps`` -> sorted steps: a value below 1 is a
  fraction of `total_steps` (0.6 of 5000 -> 3000), others are steps.

  Raises:
    ValueError: a step outside 1 .. total_steps - 1, or a non-integer
      value above 1; the message names it.
  """
  out = set()
  for v in values:
    if 0 < float(v) < 1:
      step = int(round(float(v) * total_steps))
    elif float(v) >= 1 and float(v).is_integer():
      step = int(v)
    else:
      raise ValueError(
          f"config.self_train.steps={tuple(values)}: {v!r} is neither a "
          "fraction of config.total_steps (0 < f < 1) nor a step (an "
          "integer >= 1).")
    if not 0 < step < total_steps:
      raise ValueError(
          f"config.self_train.steps={tuple(values)}: {v!r} is step {step}, "
          f"not between 1 and config.total_steps - 1 = {total_steps - 1}. "
          "Use fractions of the run (e.g. (0.6, 0.8)) or earlier steps.")
    out.add(step)
  return sorted(out)


def pseudo_path(workdir: str, step: int) -> str:
  """Where the run's labels of `step` go."""
  return os.path.join(workdir, "pseudo", f"{step}.json")


def label_run(predictor: predictor_lib.Predictor, records, *, config: Any,
              seed: int, workdir: str) -> str:
  """Labels a caption source's images, writes the step's file, returns it.

  Args:
    predictor: the model of this step.
    records: caption records (`sources.open_source` of the img sources).
    config: ``config.self_train``.
    seed: the run's seed (the image subset's).
    workdir: the run's directory.
  """
  images = caption_images(records, predictor.tokenizer,
                          config.get("name_words") or None,
                          max_images=int(config.get("max_images", 0)),
                          seed=seed)
  coco, summary = label(predictor, images,
                        threshold=float(config.get("threshold", 0.3)),
                        batch_size=int(config.get("batch_size", 32)))
  if not coco["annotations"]:
    logging.warning(
        "Self-training at step %d: no caption phrase got a box scoring >= "
        "%s (%d images, %d phrase instances named); the det stream goes on "
        "without pseudo-boxes.", predictor.step, config.get("threshold", 0.3),
        len(images), summary["phrase_instances_named"])
  path = pseudo_path(workdir, int(predictor.step))
  write_json(path, coco)
  write_json(path[:-len(".json")] + ".summary.json", summary)
  logging.info("Self-training at step %d: %s (%s).", predictor.step, path,
               json.dumps(summary))
  return path


def with_pseudo(info, path: str | None, weight: float):
  """`info` (`preparation.DataInfo`) with the pseudo-box file as a det
  source; unchanged for None or a file without boxes."""
  if not path:
    return info
  with open(path) as f:
    if not json.load(f).get("annotations"):
      return info
  det = {**info.sources["det"], SOURCE_NAME: pseudo_source(path, weight)}
  return dataclasses.replace(info, sources={**info.sources, "det": det})


class PhasedData:
  """The trainer's training iterator: the pipeline of the last self-training
  labelling step (None before the first, and in runs without it), which its
  saved state names.

  A grain checkpoint item (``get_state`` -> bytes, ``set_state``,
  ``start_prefetch``): the state is ``{"label_step": K, "inner": ...}``, K
  the step whose pseudo-box file the det stream mixes in (None before the
  first), so a resumed run rebuilds that pipeline and sets it to the saved
  position. A state saved by a run without self-training (a plain grain
  iterator's) restores as ``label_step`` None.

  Args:
    build: ``build(label_step)`` -> a fresh grain iterator of the pipeline
      with that step's pseudo-boxes (None: without).
  """

  def __init__(self, build):
    self._build = build
    self.label_step: int | None = None
    self._it = build(None)

  def switch(self, label_step: int | None) -> None:
    """From now on: the pipeline of `label_step`'s labels, from its start."""
    self.label_step = label_step
    self._it = self._build(label_step)

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)

  def get_state(self) -> bytes:
    return json.dumps({"label_step": self.label_step,
                       "inner": self._it.get_state()}).encode()

  def set_state(self, state: bytes) -> None:
    value = json.loads(state)
    if isinstance(value, dict) and "inner" in value and "label_step" in value:
      label_step, inner = value["label_step"], value["inner"]
    else:  # A plain iterator's state (a run saved without self-training).
      label_step, inner = None, value
    if label_step != self.label_step:
      self.switch(label_step)
    self._it.set_state(inner)

  def start_prefetch(self) -> None:
    start = getattr(self._it, "start_prefetch", None)
    if start is not None:
      start()
