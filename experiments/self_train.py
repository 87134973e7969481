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

The labelling is the library's (`omnitrain_jax/self_training.py`, also what
a run with ``config.self_train.steps`` does at those steps): per caption
image of ``--captions`` (a COCO captions file), each phrase's name (its
tokens in ``--name_words``; default ShapesWorld's colour and shape words)
scored by the teacher, and the image's own names kept best first, up to
each phrase's count, at ``--threshold`` and without overlaps.

Writes a COCO instances file (categories: the names; images: the caption
images with at least one pseudo-box, their ids kept, ``file_name`` the
image's absolute path) and prints a JSON summary (images, boxes, phrases
named / boxed, boxes per name; with ``--gt``, each name word's pseudo-box
precision and recall).

This is OWL-ST's offline recipe (label once with a finished teacher, train
a student); the in-run one relabels during training (README, "Self-training").
"""

from __future__ import annotations

import collections
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omnitrain_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from omnitrain_jax import self_training  # pylint: disable=g-import-not-at-top,wrong-import-position
from omnitrain_jax.data import shapes_world  # pylint: disable=g-import-not-at-top,wrong-import-position
from omnitrain_jax.evaluation import predictor as predictor_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

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

# The library's (omnitrain_jax/self_training.py), under the names the tests
# and earlier notes use.
phrase_names = self_training.phrase_names
select = self_training.select
_iou = self_training.xywh_iou


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
  by_id = {im["id"]: im for im in images}
  records = [{"image_id": a["image_id"], "caption": a.get("caption", ""),
              "image_path": os.path.join(f.image_dir,
                                         by_id[a["image_id"]]["file_name"]),
              "width": by_id[a["image_id"]].get("width", 0),
              "height": by_id[a["image_id"]].get("height", 0)}
             for a in coco.get("annotations", []) if a["image_id"] in by_id]
  predictor = predictor_lib.Predictor.from_workdir(f.teacher)
  todo = self_training.caption_images(records, predictor.tokenizer,
                                      f.name_words)
  if not any(im.names for im in todo):
    raise ValueError(f"No caption phrase of {f.captions} has a word of "
                     f"--name_words={sorted(f.name_words)}; fix --name_words.")
  result, summary = self_training.label(
      predictor, todo, threshold=f.threshold, batch_size=f.batch_size,
      description=f"pseudo-boxes of {f.captions or f.gt} by "
      f"{os.path.abspath(f.teacher)} (step {predictor.step}), threshold "
      f"{f.threshold}")
  self_training.write_json(f.out, result)
  summary = {"out": os.path.abspath(f.out), "teacher_step": predictor.step,
             **{k: v for k, v in summary.items() if k != "step"}}
  if gt is not None:
    ids = {im["id"] for im in images}
    summary["check"] = check_against(
        {**gt, "annotations": [a for a in gt["annotations"]
                               if a["image_id"] in ids]}, result)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
