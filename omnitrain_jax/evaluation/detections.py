"""Model boxes -> original-image pixels -> COCO results.

The model predicts ``cx, cy, w, h`` in [0, 1] of the S x S canvas; the
image was resized by ``scale`` (original -> canvas pixels; longest side to S)
and padded bottom/right (`data.transforms.ResizePad`), so a canvas pixel
maps back by dividing by ``scale``, with no offset. Boxes are then clipped to
the original image (a prediction reaching into the padding is cut at the
image's edge).

COCO results format (what pycocotools' ``loadRes`` and the COCO/LVIS
servers read): a list of ``{"image_id", "category_id", "bbox": [x, y, w,
h], "score"}`` in original pixels, x/y the top-left corner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Decimals written to the results JSON: boxes to 1/100 px, scores to 1e-5
# (about 100 bytes per detection; LVIS val with 300 per image is ~600 MB
# unrounded). Metrics are computed on the rounded values that are written.
BOX_DECIMALS = 2
SCORE_DECIMALS = 5


def canvas_to_original_xyxy(boxes: np.ndarray, canvas_size: int,
                            scale: np.ndarray, orig_size: np.ndarray
                            ) -> np.ndarray:
  """Canvas ``cx, cy, w, h`` in [0, 1] -> original ``x0, y0, x1, y1`` px.

  Args:
    boxes: ``[B, ..., 4]`` normalised canvas boxes.
    canvas_size: S.
    scale: ``[B]`` original -> canvas pixels.
    orig_size: ``[B, 2]`` original (height, width).

  Returns:
    float32 ``[B, ..., 4]`` boxes clipped to each original image.
  """
  boxes = np.asarray(boxes, np.float32)
  b = boxes.shape[0]
  extra = (1,) * (boxes.ndim - 2)
  scale = np.asarray(scale, np.float32).reshape((b,) + extra + (1,))
  cx, cy, w, h = np.moveaxis(boxes * canvas_size, -1, 0)
  xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
  xyxy = xyxy / np.maximum(scale, 1e-12)
  hw = np.asarray(orig_size, np.float32).reshape((b,) + extra + (2,))
  limit = np.concatenate([hw[..., ::-1], hw[..., ::-1]], -1)  # w, h, w, h
  return np.clip(xyxy, 0.0, limit).astype(np.float32)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
  """``x0, y0, x1, y1`` -> ``x, y, w, h`` (COCO), shape kept."""
  boxes = np.asarray(boxes, np.float32)
  return np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], -1)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
  """``x, y, w, h`` -> ``x0, y0, x1, y1``, shape kept."""
  boxes = np.asarray(boxes, np.float32)
  return np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], -1)


def coco_results(image_ids: np.ndarray, scores: np.ndarray,
                 labels: np.ndarray, boxes_xyxy: np.ndarray,
                 category_ids: Sequence[int], *, min_score: float = 0.0
                 ) -> list[dict[str, Any]]:
  """Top-k detections of a batch -> COCO result dicts.

  Images with ``image_id < 0`` (evaluation padding) are skipped, as are
  detections scoring below `min_score`.

  Args:
    image_ids: int ``[B]``.
    scores: ``[B, K]``.
    labels: int ``[B, K]`` query indices into `category_ids`.
    boxes_xyxy: ``[B, K, 4]`` original pixels.
    category_ids: the dataset's category id of each query index.
    min_score: drop detections below it.

  Returns:
    One dict per detection, in image then descending-score order.
  """
  cats = np.asarray(category_ids, np.int64)
  xywh = np.round(xyxy_to_xywh(boxes_xyxy).astype(np.float64), BOX_DECIMALS)
  rounded = np.round(np.asarray(scores, np.float64), SCORE_DECIMALS)
  out = []
  for i, image_id in enumerate(np.asarray(image_ids).tolist()):
    if image_id < 0:
      continue
    keep = rounded[i] >= min_score
    for s, c, box in zip(rounded[i][keep].tolist(),
                         cats[np.asarray(labels[i])[keep]].tolist(),
                         xywh[i][keep].tolist()):
      out.append({"image_id": int(image_id), "category_id": int(c),
                  "bbox": box, "score": s})
  return out
