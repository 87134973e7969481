r"""What a query's top detections land on: its objects, other objects, nothing.

    python -m omnitrain_jax.evaluate --workdir=W --dataset_json=bare_hexagon.json \
        --image_dir=DATA/images --dataset_name=bare_hexagon
    python experiments/false_positives.py --gt=DATA/det_val.json \
        --detections=W/eval/STEP/detections_bare_hexagon.json --token=hexagon

A bare-token AP (`experiments/ablation.py --per_token`) says how well one
token ranks its objects; this says what outranks them. The detections of a
one-token query (every box of the query's category) are taken best first,
``--top`` times the number of objects that carry the token (1: as many
detections as there are objects; their precision is the AP's R-precision),
and each is assigned to the ground-truth object of its image it overlaps
most (COCO boxes, IoU >= ``--iou``) in the *full* annotation file, which
names every object (``det_val.json``). Each detection is then counted as

  * ``hit``: an object whose category name has the token;
  * ``other:<word>``: another object, by the last word of its category name
    (ShapesWorld: the shape; "red circle" -> ``other:circle``);
  * ``miss``: no object at that IoU (background, or a poor box).

Prints one JSON object: per ``--top`` factor the counts and their shares.
On ShapesWorld's caption-only `hexagon` (session 10) most of what outranks
the hexagons are circles (README, "Caption-only shapes need negatives on
det boxes").
"""

from __future__ import annotations

import collections
import json
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np


def _define_flags() -> None:
  flags.DEFINE_string("gt", None, "COCO instances file naming every object "
                      "(e.g. ShapesWorld det_val.json).", required=True)
  flags.DEFINE_string("detections", None, "COCO detections (results) file of "
                      "the one-token query.", required=True)
  flags.DEFINE_string("token", None, "The query token (a word of the "
                      "category names).", required=True)
  flags.DEFINE_list("top", ["1", "2"], "Detections kept: these factors x the "
                    "number of objects carrying the token.")
  flags.DEFINE_float("iou", 0.5, "IoU for a detection to land on an object.")


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU [len(a), len(b)] of COCO xywh boxes."""
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  a2, b2 = a[:, None, :2] + a[:, None, 2:], b[None, :, :2] + b[None, :, 2:]
  wh = np.clip(np.minimum(a2, b2) - np.maximum(a[:, None, :2],
                                               b[None, :, :2]), 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = (a[:, None, 2] * a[:, None, 3] + b[None, :, 2] * b[None, :, 3]
           - inter)
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def landing(gt: dict[str, Any], detections: list[dict[str, Any]], token: str,
            *, top: Sequence[float] = (1, 2), iou: float = 0.5
            ) -> dict[str, Any]:
  """The counts described in the module docstring.

  Args:
    gt: a COCO instances dict naming every object.
    detections: COCO result entries (``image_id``, ``bbox``, ``score``).
    token: the query's word.
    top: factors of the number of token objects to keep.
    iou: the landing threshold.

  Returns:
    ``{"token", "objects", "detections", "top": {factor: {"kept",
    "counts", "shares"}}}``.
  """
  names = {c["id"]: c["name"].split() for c in gt["categories"]}
  missing = {a["category_id"] for a in gt["annotations"]} - set(names)
  if missing:
    raise ValueError(f"--gt: annotations use category ids {sorted(missing)} "
                     "that its 'categories' list lacks; is it a COCO "
                     "instances file?")
  known_images = {im["id"] for im in gt["images"]}
  stray = {d["image_id"] for d in detections} - known_images
  if stray:
    raise ValueError(
        f"--detections: {len(stray)} image id(s) (e.g. {sorted(stray)[:3]}) "
        "are not in --gt's images: were both written for the same split?")
  by_image = collections.defaultdict(list)
  for ann in gt["annotations"]:
    by_image[ann["image_id"]].append(ann)
  num_objects = sum(token in names[a["category_id"]]
                    for a in gt["annotations"])
  if num_objects == 0:
    raise ValueError(f"--token={token!r}: no category name in --gt has this "
                     "word, so there is nothing to land on.")
  ranked = sorted(detections, key=lambda d: -float(d["score"]))
  out = {"token": token, "objects": num_objects,
         "detections": len(ranked), "top": {}}
  for factor in top:
    kept = ranked[:int(round(float(factor) * num_objects))]
    counts = collections.Counter()
    for det in kept:
      anns = by_image[det["image_id"]]
      if not anns:
        counts["miss"] += 1
        continue
      ious = iou_matrix(det["bbox"], [a["bbox"] for a in anns])[0]
      best = int(np.argmax(ious))
      if ious[best] < iou:
        counts["miss"] += 1
        continue
      words = names[anns[best]["category_id"]]
      counts["hit" if token in words else f"other:{words[-1]}"] += 1
    total = max(len(kept), 1)
    out["top"][str(factor)] = {
        "kept": len(kept),
        "counts": dict(counts.most_common()),
        "shares": {k: v / total for k, v in counts.most_common()}}
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  with open(f.gt) as fh:
    gt = json.load(fh)
  with open(f.detections) as fh:
    detections = json.load(fh)
  print(json.dumps(landing(gt, detections, f.token, top=f.top, iou=f.iou),
                   indent=1))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
