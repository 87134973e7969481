"""The Hungarian matching cost of the det and grd streams, a function of arrays.

`compute_cost(...) -> (cost, num_cols)` is the cost matrix that
`omnitrain_jax.matching` solves, in the shape of scenic owl_vit's
`compute_cost`: predictions are rows, targets (boxes) are columns, the real
targets come first and `num_cols` says how many there are.

  cost = class cost + cost_l1 * L1(cxcywh) + cost_giou * (-GIoU)

with a class cost per stream (see `omni_loss.py` for why the streams differ):

* det: ``cost_class`` x the mean over the box's tokens of the focal cost
  (focal loss as a positive minus as a negative; Deformable DETR / OWL-ViT).
* grd: ``grd_cost_class`` x the cross-entropy of the prediction's token softmax
  against the uniform distribution over the box's tokens (MDETR's soft token
  alignment), which is exactly the grd token loss of that pair.

img examples have no targets (``num_cols`` 0). The cost is not differentiated:
its inputs are `stop_gradient`-ed here.

Shapes: B examples, N predictions, M targets (boxes), Q candidates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from omnitrain_jax.data import schema
from omnitrain_jax.losses import box_ops
from omnitrain_jax.losses import token_ops


def box_cost(pred_boxes: jnp.ndarray, tgt_boxes: jnp.ndarray, *,
             cost_l1: float, cost_giou: float) -> jnp.ndarray:
  """Weighted L1 + (-GIoU) cost of every prediction-target pair.

  Args:
    pred_boxes: float ``[B, N, 4]`` predicted cxcywh boxes.
    tgt_boxes: float ``[B, M, 4]`` target cxcywh boxes.
    cost_l1: weight of the L1 distance of the cxcywh coordinates.
    cost_giou: weight of -GIoU.

  Returns:
    float ``[B, N, M]``.
  """
  l1 = jnp.abs(pred_boxes[:, :, None, :] - tgt_boxes[:, None, :, :]).sum(-1)
  giou = -box_ops.pairwise_generalized_box_iou(
      box_ops.cxcywh_to_xyxy(pred_boxes), box_ops.cxcywh_to_xyxy(tgt_boxes))
  return cost_l1 * l1 + cost_giou * giou


def det_class_cost(logits: jnp.ndarray, tgt_dist: jnp.ndarray, *,
                   focal_alpha: float, focal_gamma: float) -> jnp.ndarray:
  """The det class cost: mean focal cost over each target's tokens.

  Args:
    logits: float ``[B, N, Q]`` token logits of the predictions.
    tgt_dist: float ``[B, M, Q]``, per target the uniform distribution over its
      candidate tokens (`token_ops.uniform_over`).
    focal_alpha: focal alpha.
    focal_gamma: focal gamma.

  Returns:
    float ``[B, N, M]`` (unweighted).
  """
  per_token = token_ops.focal_cost(logits, focal_alpha, focal_gamma)
  return jnp.einsum("bnq,bmq->bnm", per_token, tgt_dist)


def grd_class_cost(logits: jnp.ndarray, tgt_dist: jnp.ndarray,
                   softmax_mask: jnp.ndarray) -> jnp.ndarray:
  """The grd class cost: token cross-entropy of each prediction-target pair.

  Args:
    logits: float ``[B, N, Q]`` token logits of the predictions.
    tgt_dist: float ``[B, M, Q]``, as in `det_class_cost`.
    softmax_mask: bool ``[B, Q]``, the candidates in the grounding softmax
      (`terms.grd_softmax_mask`).

  Returns:
    float ``[B, N, M]`` (unweighted).
  """
  logp = token_ops.masked_log_softmax(logits, softmax_mask[:, None, :])
  return -jnp.einsum("bnq,bmq->bnm", logp, tgt_dist)


def compute_cost(tgt_dist: jnp.ndarray, pred_logits: jnp.ndarray,
                 tgt_boxes: jnp.ndarray, pred_boxes: jnp.ndarray,
                 tgt_mask: jnp.ndarray, stream: jnp.ndarray,
                 grd_softmax_mask: jnp.ndarray, *, cost_class: float,
                 grd_cost_class: float, cost_l1: float, cost_giou: float,
                 focal_alpha: float, focal_gamma: float
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The matching cost of a batch mixing det, grd and img examples.

  Every example gets both class costs (static shapes); `stream` picks one per
  example, so one compiled step serves any mix of streams.

  Args:
    tgt_dist: float ``[B, M, Q]``, per target the uniform distribution over its
      candidate tokens (0 rows for padding targets).
    pred_logits: float ``[B, N, Q]`` token logits of the predictions (pad
      candidates already zeroed).
    tgt_boxes: float ``[B, M, 4]`` target cxcywh boxes.
    pred_boxes: float ``[B, N, 4]`` predicted cxcywh boxes.
    tgt_mask: bool ``[B, M]``, real targets first, padding after (schema).
    stream: int ``[B]`` `schema.STREAM_IDS`.
    grd_softmax_mask: bool ``[B, Q]``, candidates of the grounding softmax.
    cost_class: weight of the det class cost.
    grd_cost_class: weight of the grd class cost.
    cost_l1: weight of the L1 box distance.
    cost_giou: weight of -GIoU.
    focal_alpha: focal alpha of the det class cost.
    focal_gamma: focal gamma of the det class cost.

  Returns:
    (cost, num_cols): float ``[B, N, M]``, 0 in padding columns; int32 ``[B]``,
    the real targets of each example (0 for img examples).
  """
  logits = jax.lax.stop_gradient(pred_logits)
  boxes = jax.lax.stop_gradient(pred_boxes)
  is_det = stream == schema.STREAM_IDS["det"]
  is_grd = stream == schema.STREAM_IDS["grd"]
  boxes_cost = box_cost(boxes, tgt_boxes, cost_l1=cost_l1,
                        cost_giou=cost_giou)  # [B, N, M]
  det_cost = det_class_cost(logits, tgt_dist, focal_alpha=focal_alpha,
                            focal_gamma=focal_gamma)  # [B, N, M]
  grd_cost = grd_class_cost(logits, tgt_dist, grd_softmax_mask)  # [B, N, M]
  class_cost = jnp.where(is_det[:, None, None], cost_class * det_cost,
                         grd_cost_class * grd_cost)
  cost = jnp.where(tgt_mask[:, None, :], class_cost + boxes_cost, 0.0)
  # img examples have no columns to match; real targets come first (schema).
  num_cols = jnp.where(is_det | is_grd, tgt_mask.sum(-1), 0).astype(jnp.int32)
  return cost, num_cols
