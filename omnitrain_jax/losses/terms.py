"""The loss terms of each stream (det, grd, img) and the box loss.

Each function is one term of `omni_loss` (the rules and their reasons are in
the docstring of `omni_loss.py`), computed for *every* example of the batch
with static shapes; `omni_loss` masks the results by stream and normalizes
them over the global batch. The matched terms take the matching as a 0/1
``assign`` matrix ``[B, N, M]`` (`omnitrain_jax.matching.assignment_matrix`).

Shapes: B examples, N predictions, M targets (boxes), Q candidates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from omnitrain_jax.losses import box_ops
from omnitrain_jax.losses import token_ops

# The options of `grd_softmax_mask` and `img_region_loss` (`LossConfig`
# validates its fields against these).
GRD_SOFTMAX = ("candidates", "phrases")
GRD_TOKEN_LOSSES = ("softmax", "per_positive", "focal")
REGION_POOLS = ("logsumexp", "max", "none")


def grd_softmax_mask(box_targets: jnp.ndarray, cand_valid: jnp.ndarray,
                     softmax: str) -> jnp.ndarray:
  """The candidates that compete in the grounding softmax.

  Args:
    box_targets: bool ``[B, M, Q]``, the candidate tokens of each box.
    cand_valid: bool ``[B, Q]``, the non-padding candidates.
    softmax: ``"candidates"`` (every valid candidate) or ``"phrases"`` (the
      union of the example's box tokens).

  Returns:
    bool ``[B, Q]``.
  """
  if softmax not in GRD_SOFTMAX:
    raise ValueError(f"softmax={softmax!r}; use one of {GRD_SOFTMAX}.")
  if softmax == "phrases":
    return jnp.any(box_targets, axis=1)
  return cand_valid


def _matched(assign):
  """[B, N, M] assignment -> bool [B, N], predictions matched to a target."""
  return assign.sum(-1) > 0


def _matched_positives(assign, targets):
  """bool ``[B, N, Q]``: the tokens of the target each prediction is matched
  to (``assign`` ``[B, N, M]``, ``targets`` bool ``[B, M, Q]``)."""
  return jnp.einsum("bnm,bmq->bnq", assign,
                    targets.astype(jnp.float32)) > 0


def box_losses(pred_boxes: jnp.ndarray, assign: jnp.ndarray,
               tgt_boxes: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """L1 (cxcywh) and 1 - GIoU of the matched pairs (det and grd).

  Args:
    pred_boxes: float ``[B, N, 4]`` predicted cxcywh boxes.
    assign: float ``[B, N, M]`` 0/1 matching.
    tgt_boxes: float ``[B, M, 4]`` target cxcywh boxes.

  Returns:
    (l1, giou): float ``[B]`` each, summed over the matched predictions.
  """
  matched = _matched(assign)  # [B, N]
  matched_box = jnp.einsum("bnm,bmc->bnc", assign, tgt_boxes)  # [B, N, 4]
  l1 = jnp.abs(pred_boxes - matched_box).sum(-1)  # [B, N]
  giou = box_ops.elementwise_generalized_box_iou(
      box_ops.cxcywh_to_xyxy(pred_boxes), box_ops.cxcywh_to_xyxy(matched_box))
  l1 = jnp.where(matched, l1, 0.0).sum(-1)  # [B]
  giou_loss = jnp.where(matched, 1.0 - giou, 0.0).sum(-1)  # [B]
  return l1, giou_loss


def det_token_loss(logits: jnp.ndarray, assign: jnp.ndarray,
                   box_targets: jnp.ndarray, cand_known: jnp.ndarray,
                   cand_bg: jnp.ndarray, cand_valid: jnp.ndarray, *,
                   focal_alpha: float, focal_gamma: float) -> jnp.ndarray:
  """Sigmoid focal loss over the candidates (det).

  A matched prediction is positive on its box's tokens and negative on
  ``cand_known & ~positive``; an unmatched one is negative on ``cand_bg``
  only. The pipeline builds both sets (LVIS federated labels); the loss adds
  no negatives of its own.

  Args:
    logits: float ``[B, N, Q]`` token logits (pad candidates zeroed).
    assign: float ``[B, N, M]`` 0/1 matching.
    box_targets: bool ``[B, M, Q]``, the candidate tokens of each box.
    cand_known: bool ``[B, Q]``, labels known to a matched prediction.
    cand_bg: bool ``[B, Q]``, known negatives of an unmatched prediction.
    cand_valid: bool ``[B, Q]``, the non-padding candidates.
    focal_alpha: focal alpha.
    focal_gamma: focal gamma.

  Returns:
    float ``[B]``, summed over predictions and candidates.
  """
  matched = _matched(assign)  # [B, N]
  positive = _matched_positives(assign, box_targets)  # [B, N, Q]
  weight = jnp.where(matched[..., None],
                     positive | cand_known.astype(bool)[:, None],
                     cand_bg.astype(bool)[:, None])
  weight &= cand_valid[:, None, :]  # [B, N, Q]
  focal = token_ops.sigmoid_focal(logits, positive.astype(jnp.float32),
                                  focal_alpha, focal_gamma)
  return jnp.where(weight, focal, 0.0).sum((1, 2))


def grd_token_loss(logits: jnp.ndarray, assign: jnp.ndarray,
                   box_targets: jnp.ndarray, softmax_mask: jnp.ndarray, *,
                   form: str = "softmax", focal_alpha: float = 0.25,
                   focal_gamma: float = 2.0) -> jnp.ndarray:
  """Token loss of the matched grounding predictions (grd), in one of 3 forms.

  Unmatched predictions get no token loss (grounding data is not exhaustive).
  For a prediction matched to a box with tokens P, over the candidates S of
  ``softmax_mask`` (`grd_softmax_mask`), with logits s:

  * ``"softmax"`` (MDETR's soft token alignment): the cross-entropy of the
    softmax over S against the uniform distribution over P,
    ``-mean_{t in P} log softmax_S(s)_t``. The phrase's tokens compete with
    each other too: its gradient on a positive is ``p_t - 1/|P|``, so a
    token the detector already scores high (``red``) is pushed *down* until
    every token of the phrase has the same logit as its weakest one.
  * ``"per_positive"``: each positive against the negatives only,
    ``mean_{t in P} -log(e^{s_t} / (e^{s_t} + sum_{n in S \ P} e^{s_n}))``
    (the multi-positive contrastive form). Still shift-invariant and still
    disambiguating (``right`` is a negative of "the man on the left"), but a
    positive is only ever pushed up.
  * ``"focal"`` (GLIP / Grounding DINO: alignment as per-token binary
    classification): the det stream's sigmoid focal loss, positive on P and
    negative on ``S \ P``. Sets absolute probabilities, as det does.

  Args:
    logits: float ``[B, N, Q]`` token logits (pad candidates zeroed).
    assign: float ``[B, N, M]`` 0/1 matching.
    box_targets: bool ``[B, M, Q]``, the candidate tokens of each box.
    softmax_mask: bool ``[B, Q]``, the candidates S (`grd_softmax_mask`).
    form: ``"softmax"``, ``"per_positive"`` or ``"focal"``.
    focal_alpha: focal alpha (``"focal"`` only).
    focal_gamma: focal gamma (``"focal"`` only).

  Returns:
    float ``[B]``, summed over the matched predictions.
  """
  if form not in GRD_TOKEN_LOSSES:
    raise ValueError(f"form={form!r}; use one of {GRD_TOKEN_LOSSES}.")
  matched = _matched(assign)  # [B, N]
  mask = softmax_mask[:, None, :]  # [B, 1, Q]
  positive = _matched_positives(assign, box_targets) & mask  # [B, N, Q]
  if form == "focal":
    weight = matched[..., None] & mask
    focal = token_ops.sigmoid_focal(logits, positive.astype(jnp.float32),
                                    focal_alpha, focal_gamma)
    return jnp.where(weight, focal, 0.0).sum((1, 2))
  dist = token_ops.uniform_over(positive)  # [B, N, Q]; 0 rows if unmatched
  if form == "softmax":
    logp = token_ops.masked_log_softmax(logits, mask)  # [B, N, Q]
    return -(dist * logp).sum((1, 2))
  # per_positive: log(e^{s_t} + sum_neg e^{s_n}) - s_t for each positive t.
  negative = mask & ~positive
  neg_lse = jax.nn.logsumexp(
      jnp.where(negative, logits, token_ops.NEG_LOGIT), axis=-1,
      keepdims=True)  # [B, N, 1]; ~NEG_LOGIT if no negatives
  per_token = jnp.logaddexp(logits, neg_lse) - logits  # [B, N, Q]
  return jnp.where(positive, dist * per_token, 0.0).sum((1, 2))


def img_image_loss(image_logits: jnp.ndarray, cap_targets: jnp.ndarray,
                   cand_valid: jnp.ndarray) -> jnp.ndarray:
  """Image-level softmax cross-entropy against the caption's tokens (img).

  Args:
    image_logits: float ``[B, Q]``.
    cap_targets: bool ``[B, Q]``, the candidates among the caption's tokens.
    cand_valid: bool ``[B, Q]``, the non-padding candidates (the softmax).

  Returns:
    float ``[B]``; 0 for an example without caption tokens.
  """
  logp = token_ops.masked_log_softmax(image_logits, cand_valid)  # [B, Q]
  return -(token_ops.uniform_over(cap_targets) * logp).sum(-1)


def img_region_loss(logits: jnp.ndarray, cap_targets: jnp.ndarray,
                    has_cap: jnp.ndarray, cand_valid: jnp.ndarray, *,
                    pool: str, temperature: float,
                    neg_weight: float) -> jnp.ndarray:
  """Patch-pooled sigmoid BCE on the caption's tokens (img), normalized.

  Per candidate, the per-patch logits are pooled over the N patches and the
  pooled logit is pushed up for caption tokens and (weight `neg_weight`) down
  for the caption-absent candidates. Each half is divided by its own number of
  tokens over the batch, so this term is already a global mean.

  Args:
    logits: float ``[B, N, Q]`` token logits (pad candidates zeroed).
    cap_targets: bool ``[B, Q]``, the candidates among the caption's tokens.
    has_cap: bool ``[B]``, the examples the term applies to (img examples with
      caption tokens among their candidates).
    cand_valid: bool ``[B, Q]``, the non-padding candidates.
    pool: ``"logsumexp"`` (``tau * logsumexp(s / tau)``), ``"max"`` or
      ``"none"`` (the term is 0).
    temperature: tau of the logsumexp pooling.
    neg_weight: weight of the caption-absent half.

  Returns:
    float ``[]``.
  """
  if pool not in REGION_POOLS:
    raise ValueError(f"pool={pool!r}; use one of {REGION_POOLS}.")
  if pool == "none":
    return jnp.zeros((), jnp.float32)
  if pool == "max":
    pooled = logits.max(axis=1)  # [B, Q]
  else:
    pooled = temperature * jax.nn.logsumexp(logits / temperature,
                                            axis=1)  # [B, Q]
  pos = has_cap[:, None] & cap_targets  # [B, Q]
  neg = has_cap[:, None] & cand_valid & ~cap_targets  # [B, Q]
  pos_loss = jnp.where(pos, jax.nn.softplus(-pooled), 0.0).sum()
  neg_loss = jnp.where(neg, jax.nn.softplus(pooled), 0.0).sum()
  return (pos_loss / jnp.maximum(pos.sum(), 1.0) +
          neg_weight * neg_loss / jnp.maximum(neg.sum(), 1.0))


def img_phrase_loss(logits: jnp.ndarray, assign: jnp.ndarray,
                    inst_targets: jnp.ndarray, negatives: jnp.ndarray,
                    cand_valid: jnp.ndarray, *, focal_alpha: float,
                    focal_gamma: float) -> jnp.ndarray:
  """Sigmoid focal loss of the predictions matched to caption phrases (img).

  A prediction matched to a phrase instance is positive on all the phrase's
  tokens (the untrusted ones too: that is what teaches `hexagon`) and
  negative on the other tokens of ``negatives`` (`omni_loss`: the caption's
  tokens, optionally the batch's det tokens); unmatched predictions get
  nothing (captions name no background and, on real data, not every
  object).

  Args:
    logits: float ``[B, N, Q]`` token logits (pad candidates zeroed).
    assign: float ``[B, N, K]`` 0/1 matching of predictions to instances
      (gated: dropped matches are 0).
    inst_targets: bool ``[B, K, Q]``, the candidate tokens of each instance's
      phrase.
    negatives: bool ``[B, Q]``, the tokens a matched prediction is scored
      on besides its phrase's (those in the phrase stay positives): the
      caption's candidate tokens, optionally more.
    cand_valid: bool ``[B, Q]``, the non-padding candidates.
    focal_alpha: focal alpha.
    focal_gamma: focal gamma.

  Returns:
    float ``[B]``, summed over predictions and candidates.
  """
  matched = _matched(assign)  # [B, N]
  positive = _matched_positives(assign, inst_targets)  # [B, N, Q]
  weight = matched[..., None] & (positive | negatives[:, None, :])
  weight &= cand_valid[:, None, :]
  focal = token_ops.sigmoid_focal(logits, positive.astype(jnp.float32),
                                  focal_alpha, focal_gamma)
  return jnp.where(weight, focal, 0.0).sum((1, 2))


def img_unmatched_loss(logits: jnp.ndarray, assign: jnp.ndarray,
                       negatives: jnp.ndarray, explained: jnp.ndarray,
                       cand_valid: jnp.ndarray, *, focal_alpha: float,
                       focal_gamma: float) -> jnp.ndarray:
  """Sigmoid focal loss of the predictions *not* matched to a phrase (img).

  OWL-ST's detection loss on pseudo-boxes, with this step's phrase matches
  as the pseudo-boxes: in an image whose caption is fully explained (every
  instance it names has a kept match, `omni_loss`), every other prediction
  is negative on the caption's tokens, as det makes an unmatched prediction
  negative on the image's labels. Matched predictions and images that are
  not explained get nothing here.

  Args:
    logits: float ``[B, N, Q]`` token logits (pad candidates zeroed).
    assign: float ``[B, N, K]`` 0/1 kept matching of predictions to
      instances.
    negatives: bool ``[B, Q]``, the tokens an unmatched prediction is
      negative on (the caption's candidate tokens).
    explained: bool ``[B]``, the examples the term applies to.
    cand_valid: bool ``[B, Q]``, the non-padding candidates.
    focal_alpha: focal alpha.
    focal_gamma: focal gamma.

  Returns:
    float ``[B]``, summed over predictions and candidates.
  """
  unmatched = ~_matched(assign) & explained[:, None]  # [B, N]
  weight = unmatched[..., None] & (negatives & cand_valid)[:, None, :]
  focal = token_ops.sigmoid_focal(logits, jnp.zeros_like(logits),
                                  focal_alpha, focal_gamma)
  return jnp.where(weight, focal, 0.0).sum((1, 2))


def img_maxsize_choice(pred_boxes: jnp.ndarray, objectness: jnp.ndarray,
                       min_objectness: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Detic's max-size proposal of each image: its largest confident box.

  Detic (Zhou et al., 2022) gives an image-labelled image's labels to the
  largest of its detector's proposals. This head has no separate proposal
  stage, so the proposals are the predictions whose objectness (here the
  best probability of a box-supervised token, `omni_loss`) reaches
  ``min_objectness``; ties go to the lowest index.

  Args:
    pred_boxes: float ``[B, N, 4]`` cxcywh.
    objectness: float ``[B, N]`` in [0, 1].
    min_objectness: the proposal threshold.

  Returns:
    (assign, found): float ``[B, N]`` one-hot on the chosen prediction (0
    rows where there is none), bool ``[B]``.
  """
  area = pred_boxes[..., 2] * pred_boxes[..., 3]  # [B, N]
  ok = objectness >= min_objectness
  score = jnp.where(ok, area, -1.0)
  best = jnp.argmax(score, axis=-1)  # [B]
  found = ok.any(-1)
  onehot = jax.nn.one_hot(best, pred_boxes.shape[1], dtype=jnp.float32)
  return onehot * found[:, None], found


def img_maxsize_loss(logits: jnp.ndarray, choice: jnp.ndarray,
                     cap_targets: jnp.ndarray, cand_valid: jnp.ndarray, *,
                     focal_alpha: float, focal_gamma: float) -> jnp.ndarray:
  """Sigmoid focal loss of the max-size prediction against the caption (img).

  The chosen prediction (`img_maxsize_choice`) is positive on every caption
  token and negative on the example's other valid candidates (Detic's
  image-label BCE over the label vocabulary; focal here, as the det and
  phrase terms, so their scales compare). Nothing else gets a loss.

  Args:
    logits: float ``[B, N, Q]`` token logits (pad candidates zeroed).
    choice: float ``[B, N]`` one-hot (or 0) chosen prediction.
    cap_targets: bool ``[B, Q]``, the caption's candidate tokens.
    cand_valid: bool ``[B, Q]``, the non-padding candidates.
    focal_alpha: focal alpha.
    focal_gamma: focal gamma.

  Returns:
    float ``[B]``.
  """
  targets = jnp.broadcast_to(cap_targets[:, None, :], logits.shape)
  focal = token_ops.sigmoid_focal(logits, targets.astype(jnp.float32),
                                  focal_alpha, focal_gamma)
  weight = (choice > 0)[..., None] & cand_valid[:, None, :]
  return jnp.where(weight, focal, 0.0).sum((1, 2))
