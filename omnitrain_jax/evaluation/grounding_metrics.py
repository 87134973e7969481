"""Grounding metrics: RefCOCO/+/g Acc@0.5 and Flickr30k Entities Recall@k.

Both score a *phrase* (a referring expression, or one entity phrase of a
Flickr caption) by the boxes its query ranks highest in its image:

* **RefCOCO/+/g Acc@0.5** (MDETR, Grounding DINO): the top-1 box has IoU >=
  0.5 with the ground-truth box.
* **Flickr30k Entities Recall@k** as MDETR's ``datasets/flickr_eval.py``
  defines it. The unit is a *phrase mention*: every bracketed phrase of a
  sentence whose entity has boxes (MDETR's ``tokens_positive_eval``, one entry
  per mention, in sentence order; "a man ... he" are two mentions of one
  entity, both scored). Each mention is queried on its own and scored
  against *all* ground-truth boxes of its entity (`mention_boxes`), in two
  variants, reported side by side:

  - ``anybox`` (``merge_boxes=False``, the "ANY-BOX" protocol): a hit at k
    if any of the top-k boxes has IoU >= 0.5 with *any* box of the entity
    ("two dogs" has two);
  - ``mergedbox`` (``merge_boxes=True``, Plummer et al.'s "MERGED-BOXES"
    protocol): the entity's boxes are replaced by their enclosing box
    (`merge_boxes`) and a hit needs IoU >= 0.5 with it. The *predictions are
    not merged* (MDETR compares each ranked box as predicted; a model meant
    for this protocol is trained on the ``mergedGT`` files, whose boxes are
    already the enclosing ones).

  Mentions without boxes are not in ``tokens_positive_eval``, so they are
  not counted (MDETR filters them the same way).

Acc@0.5 is Recall@1 of a single-box phrase; one function, `phrase_hits`,
serves both. IoU is of continuous boxes (no +1 pixel), as in COCO.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IOU_THRESHOLD = 0.5
# Flickr30k Recall@k variants, in the order of the metric keys.
FLICKR_VARIANTS = ("anybox", "mergedbox")


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


def merge_boxes(boxes: np.ndarray) -> np.ndarray:
  """The smallest box enclosing all `boxes` (MDETR ``_merge_boxes``).

  Args:
    boxes: ``[G, 4]`` xyxy, G >= 1.

  Returns:
    ``[1, 4]`` xyxy.
  """
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  if not len(b):
    raise ValueError("merge_boxes needs at least one box.")
  return np.concatenate([b[:, :2].min(0), b[:, 2:].max(0)])[None]


def mention_boxes(mention_spans: Sequence[Sequence[int]],
                  box_spans: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
  """The boxes of a phrase mention's entity, from an MDETR-style record.

  MDETR's Flickr files give each box the spans of *every* mention of its
  entity in the sentence (``tokens_positive``), and each mention its own
  spans (``tokens_positive_eval``); so a box belongs to the mention's entity
  iff its spans include all of the mention's spans. (For files whose
  mentions carry several spans, e.g. ShapesWorld's one span per descriptive
  word, that is the box whose spans are those.)

  Args:
    mention_spans: the mention's ``[start, end)`` spans.
    box_spans: per box of the record, its spans.

  Returns:
    int64 ``[G]`` indices of the entity's boxes (empty: none survived).
  """
  want = {tuple(int(v) for v in sp) for sp in mention_spans}
  if not want:
    return np.zeros((0,), np.int64)
  return np.asarray([i for i, spans in enumerate(box_spans)
                     if want <= {tuple(int(v) for v in sp) for sp in spans}],
                    np.int64)


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


class FlickrAccumulator:
  """Per-mention hits of both Flickr30k variants (`FLICKR_VARIANTS`)."""

  def __init__(self, ks: Sequence[int]):
    self.variants = {v: GroundingAccumulator(ks) for v in FLICKR_VARIANTS}
    self.ks = self.variants["anybox"].ks

  @property
  def num_phrases(self) -> int:
    return self.variants["anybox"].num_phrases

  def add(self, ranked_boxes: np.ndarray, gt_boxes: np.ndarray
          ) -> dict[str, dict[int, bool]]:
    """Adds one mention: its ranked boxes and *all* its entity's boxes.

    Returns:
      {variant: {k: hit}}.
    """
    return {"anybox": self.variants["anybox"].add(ranked_boxes, gt_boxes),
            "mergedbox": self.variants["mergedbox"].add(
                ranked_boxes, merge_boxes(gt_boxes))}

  def add_miss(self) -> None:
    for acc in self.variants.values():
      acc.add_miss()


def flickr_metrics(acc: FlickrAccumulator) -> dict[str, float]:
  """``R@<k>_<variant>`` for every k and variant, and the mention count.

  E.g. ``R@1_anybox``, ``R@5_mergedbox``: MDETR's ``flickr_eval`` with
  ``merge_boxes=False`` / ``True``.
  """
  out = {}
  for variant in FLICKR_VARIANTS:
    out.update({f"R@{k}_{variant}": v
                for k, v in acc.variants[variant].recall().items()})
  out["num_phrases"] = float(acc.num_phrases)
  return out
