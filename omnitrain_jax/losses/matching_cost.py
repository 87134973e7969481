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
  alignment), which is exactly the grd token loss of that pair; with the
  ``"focal"`` grd token loss (``grd_form``) the det focal class cost instead,
  which is that loss's matching cost. The ``"per_positive"`` loss keeps the
  cross-entropy cost: both are low when the phrase's tokens beat the other
  candidates, and the exact per-positive cost needs a ``[B, N, M, Q]``
  tensor (a box's negatives differ per box).

img examples have no box targets (``num_cols`` 0 in `compute_cost`). With
caption phrase matching on (``LossConfig.img_phrase_weight`` > 0) their
columns hold the caption's phrase instances instead: `phrase_instances` lays
each phrase out as many times as its count, `phrase_cost` is the cost of each
(prediction, instance) pair (see `omni_loss.py`, "img phrase matching"). The
cost is not differentiated: its inputs are `stop_gradient`-ed here.

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
                 focal_alpha: float, focal_gamma: float,
                 grd_form: str = "softmax"
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
    grd_form: the grd token loss (`terms.GRD_TOKEN_LOSSES`): ``"focal"``
      gives grd the det focal class cost, the others the cross-entropy.

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
  if grd_form == "focal":
    grd_cost = det_cost
  else:
    grd_cost = grd_class_cost(logits, tgt_dist, grd_softmax_mask)  # [B,N,M]
  class_cost = jnp.where(is_det[:, None, None], cost_class * det_cost,
                         grd_cost_class * grd_cost)
  cost = jnp.where(tgt_mask[:, None, :], class_cost + boxes_cost, 0.0)
  # img examples have no columns to match; real targets come first (schema).
  num_cols = jnp.where(is_det | is_grd, tgt_mask.sum(-1), 0).astype(jnp.int32)
  return cost, num_cols


def phrase_instances(phrase_ok: jnp.ndarray, counts: jnp.ndarray,
                     max_instances: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Each phrase repeated by its count, as the columns of a matching.

  Instances are laid out phrase by phrase ("two red hexagons, a blue circle":
  hexagon, hexagon, circle), truncated at `max_instances`.

  Args:
    phrase_ok: bool ``[B, P]``, the phrases that take part (a real phrase
      with at least one trusted token); the others get no instance.
    counts: int ``[B, P]`` objects per phrase (0 for padding).
    max_instances: K, the columns.

  Returns:
    (phrase_index, num_instances): int32 ``[B, K]``, the phrase of each
    instance (clamped to ``P - 1`` beyond the real instances, so always a
    valid index); int32 ``[B]``, the real instances (first, as the solver
    expects).
  """
  p = phrase_ok.shape[-1]
  eff = jnp.where(phrase_ok, jnp.maximum(counts, 0), 0).astype(jnp.int32)
  cum = jnp.cumsum(eff, axis=-1)  # [B, P]
  slot = jnp.arange(max_instances, dtype=jnp.int32)  # [K]
  index = (cum[:, None, :] <= slot[None, :, None]).sum(-1)  # [B, K]
  num = jnp.minimum(cum[:, -1], max_instances).astype(jnp.int32)
  return jnp.minimum(index, p - 1).astype(jnp.int32), num


# The forms of `phrase_cost` (`LossConfig.img_phrase_cost` is one of them).
PHRASE_COSTS = ("sum", "product")


def phrase_cost(logits: jnp.ndarray, inst_trusted: jnp.ndarray,
                inst_conflict: jnp.ndarray, *, conflict_weight: float,
                form: str = "sum") -> tuple[jnp.ndarray, jnp.ndarray]:
  """The img phrase-matching cost on trusted tokens only.

  With ``p = sigmoid(logit)`` of the prediction, T the phrase's trusted
  tokens, C its conflict tokens, gmean the geometric mean (inference's soft
  AND of a query's tokens) and w = `conflict_weight`:

    "sum":      cost = -gmean_{t in T} p_t + w * max_{t in C} p_t
    "product":  cost = -gmean_{t in T} p_t * (1 - max_{t in C} p_t) ** w

  The trusted part asks for the phrase's box-supervised tokens ("red" of
  "two red hexagons"); the conflict part makes a prediction that a
  box-supervised token *outside* the phrase explains ("red circle" for "a
  red hexagon": `circle`) expensive, so known objects are left to their own
  phrases and the unknown word goes to the object nothing else explains.
  Untrusted tokens (never box-supervised, like `hexagon`) take no part: an
  untrained token cannot steer its own match.

  The two forms differ on an object the detector half-explains by another
  token (a pink circle taken for red): the sum can make it cost more than
  background (both terms ~0 there), the product never does. Measured on a
  2000-step demo run's val caption images (matched instance on an object
  carrying the phrase): `pink` phrases 0.00 (sum) vs 0.14 (product),
  `hexagon` 0.77 vs 0.80, base 0.79 vs 0.80; but trained with each (one seed,
  2000 steps) img-novel AP50 was 0.135 (sum) vs 0.105 (product), so "sum"
  stays the default until more seeds say otherwise.

  Args:
    logits: float ``[B, N, Q]`` token logits (pad candidates zeroed).
    inst_trusted: bool ``[B, K, Q]``, the trusted tokens of each instance's
      phrase.
    inst_conflict: bool ``[B, K, Q]``, the conflict tokens of each instance.
    conflict_weight: w, the weight (sum) or exponent (product) of the
      conflict part (0: none).
    form: ``"sum"`` or ``"product"``.

  Returns:
    (cost, trusted_prob): float ``[B, N, K]`` each; ``trusted_prob`` is the
    geometric mean trusted-token probability (the gate of `omni_loss`; 1 for
    an instance without trusted tokens, which `omni_loss` never makes).
  """
  if form not in PHRASE_COSTS:
    raise ValueError(f"form={form!r}; use one of {PHRASE_COSTS}.")
  logits = jax.lax.stop_gradient(logits)
  p = jax.nn.sigmoid(logits)  # [B, N, Q]
  # Geometric mean, as inference scores a query (a soft AND): "red circle"
  # on a blue circle is improbable, not half probable.
  trusted_prob = jnp.exp(jnp.einsum("bnq,bkq->bnk", jax.nn.log_sigmoid(logits),
                                    token_ops.uniform_over(inst_trusted)))
  conflict = jnp.max(jnp.where(inst_conflict[:, None, :, :],
                               p[:, :, None, :], 0.0), axis=-1)  # [B, N, K]
  if form == "product":
    return -trusted_prob * (1.0 - conflict)**conflict_weight, trusted_prob
  return -trusted_prob + conflict_weight * conflict, trusted_prob
