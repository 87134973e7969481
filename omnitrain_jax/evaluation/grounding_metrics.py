"""Grounding metrics: RefCOCO/+/g Acc@0.5 and Flickr30k Entities Recall@k.

Both score a *phrase* (a referring expression, or one entity phrase of a
Flickr caption) by the boxes its query ranks highest in its image:

* **RefCOCO/+/g Acc@0.5** (MDETR, Grounding DINO): the top-1 box has IoU >=
  0.5 with the ground-truth box.
* **Flickr30k Entities Recall@k, any-box protocol** (MDETR's
  ``flickr_eval.py`` with ``merge_boxes=False``): the phrase counts at k if
  any of its top-k boxes has IoU >= 0.5 with *any* of its ground-truth boxes
  (a phrase such as "two dogs" has several). Phrases without boxes are not
  in the annotations, so they are not counted.

Acc@0.5 is Recall@1 of a single-box phrase; one function, `phrase_hits`,
serves both. IoU is of continuous boxes (no +1 pixel), as in COCO.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IOU_THRESHOLD = 0.5


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of every pair of ``x0, y0, x1, y1`` boxes: [n, 4] x [m, 4] -> [n, m].

  Empty boxes have IoU 0 with everything.
  """
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
  area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
  union = area_a[:, None] + area_b[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def phrase_hits(ranked_boxes: np.ndarray, gt_boxes: np.ndarray,
                ks: Sequence[int], iou_threshold: float = IOU_THRESHOLD
                ) -> dict[int, bool]:
  """Whether any of the top-k boxes matches any ground-truth box, per k.

  Args:
    ranked_boxes: ``[K, 4]`` xyxy predictions, best first (K may be smaller
      than a k: then all K count).
    gt_boxes: ``[G, 4]`` xyxy ground truth (G >= 1).
    ks: the k values.
    iou_threshold: a match needs IoU >= this.

  Returns:
    {k: hit}.
  """
  ok = (box_iou(ranked_boxes, gt_boxes) >= iou_threshold).any(axis=1)  # [K]
  # First rank that matches; a hit at k iff it is < k.
  first = int(np.argmax(ok)) if ok.any() else len(ok) + max(ks, default=0)
  return {int(k): first < k for k in ks}


class GroundingAccumulator:
  """Collects per-phrase hits; `metrics` gives Acc@0.5 or Recall@k."""

  def __init__(self, ks: Sequence[int]):
    if not ks or min(ks) < 1:
      raise ValueError(f"ks={tuple(ks)} must be k values >= 1.")
    self.ks = tuple(sorted({int(k) for k in ks}))
    self.hits = {k: 0 for k in self.ks}
    self.num_phrases = 0

  def add(self, ranked_boxes: np.ndarray, gt_boxes: np.ndarray
          ) -> dict[int, bool]:
    """Adds one phrase; returns its hits."""
    hits = phrase_hits(ranked_boxes, gt_boxes, self.ks)
    self.num_phrases += 1
    for k, h in hits.items():
      self.hits[k] += int(h)
    return hits

  def add_miss(self) -> None:
    """A phrase that got no prediction (its image could not be read)."""
    self.num_phrases += 1

  def recall(self) -> dict[int, float]:
    """{k: fraction of phrases hit at k} (0 when there are no phrases)."""
    n = max(self.num_phrases, 1)
    return {k: self.hits[k] / n for k in self.ks}


def refexp_metrics(acc: GroundingAccumulator) -> dict[str, float]:
  """``acc@0.5`` (needs k=1) and the phrase count."""
  if 1 not in acc.ks:
    raise ValueError("Acc@0.5 needs k=1 in the accumulator's ks.")
  return {"acc@0.5": acc.recall()[1], "num_phrases": float(acc.num_phrases)}


def flickr_metrics(acc: GroundingAccumulator) -> dict[str, float]:
  """``R@k`` for every k and the phrase count."""
  out = {f"R@{k}": v for k, v in acc.recall().items()}
  out["num_phrases"] = float(acc.num_phrases)
  return out
