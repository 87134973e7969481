r"""Self-training (OWL-ST): a teacher's caption-filtered boxes -> pseudo-boxes.

    python experiments/self_train.py --teacher=runs/abl/det_grd_img/seed0 \
        --captions=DATA/img_train.json --image_dir=DATA/images \
        --out=runs/pseudo/img_train_pseudo.json [--threshold=0.3]
    # The teacher checked on boxed images, captioned from their boxes:
    python experiments/self_train.py --teacher=... --gt=DATA/det_val.json \
        --captions_from_gt --image_dir=DATA/images --out=/tmp/check.json

Then train a student with the file as a second det source (its boxes get
det's loss: box regression, positives on their names, and every other
prediction and name a negative, as OWL-ST trains on pseudo-annotations):

    python experiments/ablation.py \
        --config=configs/shapes_selftrain.py:runs/pseudo/img_train_pseudo.json \
        --out=runs/student --mixes=det+grd+img --per_token

Minderer et al. (2023, OWL-ST / OWLv2) label web images with a trained
OWL-ViT: queries are n-grams of each image's caption, and the teacher's
boxes above a confidence threshold become the annotations of a detection
dataset. Here, per caption image of ``--captions`` (a COCO captions file):

1. every caption is chunked into its phrases (`vocab.phrases.chunk`: "two
   red hexagons and a blue circle" -> "two red hexagons" x 2, "a blue
   circle" x 1); a phrase's *name* is its tokens (the teacher's tokenizer)
   that are in ``--name_words`` (default: ShapesWorld's colour and shape
   words; size and place words, which det does not label, are left out) --
   "red hexagon";
2. the teacher scores every name on the image (the predictor's soft AND of
   the name's tokens, per-name NMS at IoU 0.5);
3. the image's own names only (the caption filter), best first: a box is
   kept when its score reaches ``--threshold``, its phrase still has count
   left, and it overlaps no kept box at IoU >= 0.5.

Writes a COCO instances file (categories: the names; images: the caption
images with at least one pseudo-box; ``file_name`` as in ``--captions``, so
``--image_dir`` resolves it as for the captions) and prints a JSON summary
(images, boxes, phrases named / boxed, boxes per name).

What it does not do: refresh the teacher during training (OWL-ST labels
once, offline, as here), or score n-grams beyond the chunker's phrases.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omnitrain_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from omnitrain_jax.data import shapes_world  # pylint: disable=g-import-not-at-top,wrong-import-position
from omnitrain_jax.evaluation import detections as detections_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from omnitrain_jax.evaluation import grounding_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position
from omnitrain_jax.evaluation import predictor as predictor_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from omnitrain_jax.evaluation import queries as queries_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from omnitrain_jax.vocab import phrases as phrases_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_DEFAULT_NAME_WORDS = (*shapes_world.COLORS, *shapes_world.SHAPES)


def _define_flags() -> None:
  """Flags exist only when this file runs as the program (tests import it
  next to other flag-defining modules)."""
  flags.DEFINE_string("teacher", None, "The teacher's training run (workdir).")
  flags.DEFINE_string("captions", None, "COCO captions file of the images.")
  flags.DEFINE_string("gt", None, "Optional COCO instances file of the same "
                      "images: the summary adds each name word's pseudo-box "
                      "precision and recall at IoU 0.5 (a teacher check).")
  flags.DEFINE_bool("captions_from_gt", False, "Caption every --gt image by "
                    "listing its objects (\"two red circles and a blue "
                    "star\") instead of reading --captions.")
  flags.DEFINE_string("image_dir", None, "Folder the file names resolve in.")
  flags.DEFINE_string("out", None, "Output COCO instances file.")
  flags.DEFINE_float("threshold", 0.3, "Minimum teacher score of a kept box.")
  flags.DEFINE_list("name_words", list(_DEFAULT_NAME_WORDS),
                    "Tokens that make a phrase's name (others are dropped).")
  flags.DEFINE_integer("batch_size", 32, "Images per predictor batch.")
  flags.DEFINE_integer("max_images", 0, "Only the first N images (0: all).")
  flags.mark_flags_as_required(["teacher", "image_dir", "out"])


_NUMBERS = ("a", "two", "three", "four", "five", "six", "seven", "eight",
            "nine", "ten")


def phrase_names(tokenizer, caption: str, name_words: set[str]
                 ) -> list[tuple[str, int]]:
  """[(name, count)] of a caption's phrases that have a name word."""
  out = []
  for p in phrases_lib.chunk(caption):
    q = queries_lib.text_query(tokenizer, caption[p.start:p.end])
    toks = [t for t in (q.tokens[0] if q.tokens else ()) if t in name_words]
    if toks:
      out.append((" ".join(toks), p.count))
  return out


def _iou(a, b) -> float:
  """IoU of two xywh boxes."""
  xyxy = detections_lib.xywh_to_xyxy(np.asarray([a, b], np.float64))
  return float(grounding_metrics.box_iou(xyxy[:1], xyxy[1:])[0, 0])


def select(dets: list[dict], wanted: dict[str, int], threshold: float,
           iou: float = 0.5) -> list[dict]:
  """Greedy caption filter: best first, each name up to its count, no two
  kept boxes overlapping at ``iou`` or more."""
  left = dict(wanted)
  kept = []
  for d in sorted(dets, key=lambda x: -x["score"]):
    if d["score"] < threshold or left.get(d["query"], 0) <= 0:
      continue
    if any(_iou(d["box_xywh"], k["box_xywh"]) >= iou for k in kept):
      continue
    left[d["query"]] -= 1
    kept.append(d)
  return kept


def captions_from_instances(gt: dict) -> dict:
  """A COCO captions file listing each image's objects by category name."""
  names = {c["id"]: c["name"] for c in gt["categories"]}
  per_image = collections.defaultdict(collections.Counter)
  for a in gt["annotations"]:
    per_image[a["image_id"]][names[a["category_id"]]] += 1
  anns = []
  for im in gt["images"]:
    parts = [f"{_NUMBERS[min(n, 10) - 1]} {name}{'s' if n > 1 else ''}"
             for name, n in sorted(per_image[im["id"]].items())]
    anns.append({"id": len(anns) + 1, "image_id": im["id"],
                 "caption": " and ".join(parts)})
  return {"images": gt["images"], "annotations": anns}


def check_against(gt: dict, pseudo: dict, iou: float = 0.5) -> dict:
  """Per name word: pseudo-box precision (IoU >= ``iou`` with a ground-truth
  box of the same name) and recall (ground-truth objects whose name has the
  word, found so)."""
  gt_names = {c["id"]: c["name"] for c in gt["categories"]}
  ps_names = {c["id"]: c["name"] for c in pseudo["categories"]}
  boxes = collections.defaultdict(list)
  for a in gt["annotations"]:
    boxes[a["image_id"]].append((gt_names[a["category_id"]], a["bbox"]))
  hits, total, objects = (collections.Counter() for _ in range(3))
  for name, _ in (b for v in boxes.values() for b in v):
    for w in name.split():
      objects[w] += 1
  for a in pseudo["annotations"]:
    name = ps_names[a["category_id"]]
    ok = any(n == name and _iou(a["bbox"], b) >= iou
             for n, b in boxes[a["image_id"]])
    for w in name.split():
      total[w] += 1
      hits[w] += ok
  # Recall counts hits as found objects: kept pseudo-boxes never overlap at
  # IoU >= 0.5 (`select`), so two hits are two objects.
  return {w: {"boxes": total[w], "precision": round(hits[w] / total[w], 4),
              "objects": objects[w],
              "recall": round(hits[w] / max(objects[w], 1), 4)}
          for w in sorted(total)}


def main(argv):
  del argv
  f = flags.FLAGS
  runtime.quiet_library_logs()
  gt = None
  if f.gt:
    with open(f.gt) as fh:
      gt = json.load(fh)
  if f.captions_from_gt:
    if gt is None:
      raise app.UsageError("--captions_from_gt needs --gt.")
    coco = captions_from_instances(gt)
  elif f.captions:
    with open(f.captions) as fh:
      coco = json.load(fh)
  else:
    raise app.UsageError("Pass --captions (or --gt with --captions_from_gt).")
  images = sorted(coco["images"], key=lambda x: x["id"])
  if f.max_images:
    images = images[:f.max_images]
  captions = collections.defaultdict(list)
  for a in coco.get("annotations", []):
    captions[a["image_id"]].append(a.get("caption", ""))
  predictor = predictor_lib.Predictor.from_workdir(f.teacher)
  name_words = set(f.name_words)
  wanted = {}  # image id -> {name: count}
  for im in images:
    names = collections.Counter()  # Several captions of one image (COCO
    for cap in captions[im["id"]]:  # has 5) name the same objects: max.
      this = collections.Counter()
      for name, count in phrase_names(predictor.tokenizer, cap, name_words):
        this[name] += count
      names |= this
    wanted[im["id"]] = dict(names)
  all_names = sorted({n for w in wanted.values() for n in w})
  if not all_names:
    raise ValueError(f"No caption phrase of {f.captions} has a word of "
                     f"--name_words={sorted(name_words)}; fix --name_words.")
  queries = predictor.text_queries(all_names)
  cat_ids = {n: i + 1 for i, n in enumerate(all_names)}
  out_images, anns = [], []
  per_name = collections.Counter()
  named = boxed = 0
  t0 = time.time()
  for s in range(0, len(images), f.batch_size):
    chunk = images[s:s + f.batch_size]
    loaded = [predictor.load_image(os.path.join(f.image_dir, im["file_name"]))
              for im in chunk]
    preds = predictor.predict_batch(loaded, queries, max_boxes=8,
                                    threshold=min(f.threshold, 0.05),
                                    nms_iou=0.5)
    for im, pred in zip(chunk, preds):
      w = wanted[im["id"]]
      named += sum(w.values())
      kept = select([d for d in pred["detections"] if d["query"] in w], w,
                    f.threshold)
      boxed += len(kept)
      if not kept:
        continue
      out_images.append(dict(im))
      for d in kept:
        x, y, bw, bh = (float(v) for v in d["box_xywh"])
        anns.append({"id": len(anns) + 1, "image_id": im["id"],
                     "category_id": cat_ids[d["query"]],
                     "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
                     "score": d["score"]})
        per_name[d["query"]] += 1
    logging.info("%d / %d images, %.1f images/s", s + len(chunk),
                 len(images), (s + len(chunk)) / (time.time() - t0))
  result = {
      "info": {"description": f"pseudo-boxes of {f.captions or f.gt} by "
                              f"{os.path.abspath(f.teacher)} (step "
                              f"{predictor.step}), threshold {f.threshold}"},
      "licenses": [], "images": out_images, "annotations": anns,
      "categories": [{"id": i, "name": n} for n, i in cat_ids.items()]}
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  tmp = f.out + ".tmp"
  with open(tmp, "w") as fh:
    json.dump(result, fh)
  os.replace(tmp, f.out)
  summary = {
      "out": os.path.abspath(f.out), "teacher_step": predictor.step,
      "images": len(images), "images_with_boxes": len(out_images),
      "phrase_instances_named": named, "boxes": boxed,
      "boxed_share": round(boxed / max(named, 1), 4),
      "boxes_per_name": dict(sorted(per_name.items())),
      "seconds": round(time.time() - t0, 1)}
  if gt is not None:
    ids = {im["id"] for im in images}
    summary["check"] = check_against(
        {**gt, "annotations": [a for a in gt["annotations"]
                               if a["image_id"] in ids]}, result)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
