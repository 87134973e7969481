"""One loss for the three data streams (detection, grounding, captions).

`omni_loss(outputs, batch, config)` is a single jittable function. Every term is
computed with static shapes for *every* example and then masked by the example's
stream id (`batch["stream"]`: det 0, grd 1, img 2), so one compiled step serves
any mix of streams, including batches where a stream is absent (its terms are
then exactly 0).

Targets live in candidate space. Each example scores Q candidate token ids
(`batch["candidates"]`, 0 = pad); a box's or caption's token ids are mapped onto
the candidates in-graph (`token_ops.candidate_targets`), so the model never
sees the full vocabulary.

This module composes; the pieces are functions of arrays, each tested on its
own: the Hungarian cost in `matching_cost.py` (`compute_cost`), the solver and
the one-to-many repetition in `omnitrain_jax.matching` (`assignment_matrix`),
the terms of each stream and the box loss in `terms.py`, the token-set
operations they share in `token_ops.py`.

The rules (see DESIGN.md section 4):

det (COCO / LVIS / Objects365)
  Hungarian matching over cost = cost_class * focal class cost (mean over the
  box's positive tokens of the sigmoid-focal positive-minus-negative cost, as in
  Deformable DETR / OWL-ViT) + cost_l1 * L1(cxcywh) + cost_giou * (-GIoU).
  Token loss: sigmoid focal over the candidates. A matched prediction is positive
  on its box's tokens and negative on ``cand_known & ~positive``; an unmatched
  prediction is negative on ``cand_bg`` only. The pipeline builds ``cand_known``
  and ``cand_bg`` (LVIS federated labels: only the image's known negatives;
  not-exhaustive categories are already absent from ``cand_bg``); the loss
  trusts them and never adds negatives of its own.

grd (RefCOCOg / Flickr30k Entities)
  Token alignment uses a **softmax** over tokens, as MDETR's soft token alignment
  does: a phrase is a set of tokens that should share the prediction's token
  distribution, and a softmax makes the tokens of different phrases of one image
  compete, which is exactly the disambiguation signal ("the man on the *left*" vs
  "the man on the *right*": for the first box `right` is a negative, `man` is
  not). A sigmoid would let a box be both `left` and `right`.
  Matching cost = grd_cost_class * cross-entropy of the prediction's softmax
  against the uniform distribution over the box's tokens + the same box costs.
  Token loss, matched predictions only: that same cross-entropy. The softmax
  runs over (``config.grd_softmax``):

  * ``"candidates"`` (default): every valid candidate of the example. These are
    this phrase's tokens (targets), the tokens of the image's other phrases that
    are not in this phrase (the disambiguation negatives), and the pipeline's
    known / sampled negatives. Default because a single-phrase example (RefCOCOg
    has one expression per example) otherwise has nothing to compete against, so a
    grounding-only token (`star`) would never be pushed above anything.
  * ``"phrases"``: only the union of all the example's box tokens, i.e. this
    phrase's tokens plus exactly the other phrases' tokens. (Boxes of one phrase
    share tokens, so the union over boxes equals this phrase's tokens plus the
    other phrases' tokens; `phrase_ids` is therefore not needed.)

  ``config.grd_token_loss`` picks the form of that token loss
  (`terms.grd_token_loss`): ``"softmax"`` is MDETR's, above; its uniform
  target makes the phrase's own tokens compete, so on a grounded box a word
  the det stream scores high (`red`) is pushed down towards the phrase's
  weakest word (`left`). ``"per_positive"`` scores each of the phrase's
  tokens against the softmax's *other* candidates only (the multi-positive
  contrastive form: still shift-invariant, still disambiguating, a positive
  only ever pushed up; matched on the same cross-entropy cost), and
  ``"focal"`` is GLIP's / Grounding DINO's per-token sigmoid focal loss,
  positive on the phrase's tokens and negative on the other candidates,
  matched on det's focal cost. ``LossConfig`` keeps ``"softmax"``; the
  configs/ files use ``"focal"`` (demo config, 5000 steps, 2 seeds: with
  grd at weight 0.1 base AP50 0.753 vs 0.680 for the softmax at 0.2 and
  0.741 det-only, at the same grd-novel AP; README, "What mixing cost base
  AP").

  Unmatched grounding predictions get no token loss at all: grounding data is
  not exhaustive, an unmatched patch may well show an unmentioned object.
  The softmax is shift-invariant, so it does not calibrate the absolute sigmoid
  probability used at inference; the det stream's focal loss sets that level and
  shares the per-box scale/shift with the grd stream.

img (captions)
  No matching. (a) Image-level softmax cross-entropy of ``image_logits`` over the
  valid candidates against the uniform distribution over the caption's tokens.
  (b) A region term that reaches the patches, because the image-level term alone
  teaches no localization: per candidate token, the per-patch logits are pooled
  over the N patches (``config.img_region_pool``) and a sigmoid BCE makes the
  pooled logit positive for caption tokens and (weight
  ``img_region_neg_weight``) negative for the caption-absent candidates:

  * ``"logsumexp"`` (default): ``tau * logsumexp_n(s_n / tau)``. Without the
    ``-log N`` of a mean, this is (for small probabilities) the log-odds of a
    noisy-OR, ``P(token somewhere) = 1 - prod_n (1 - p_n)``: a positive is
    satisfied once *one* patch is confident (like max), while a negative asks
    every patch to be low, which is the per-patch sigmoid semantics the det
    stream also trains. The gradient is spread over the high-scoring patches
    (softmax weights), not dropped on one arbitrary argmax patch early in
    training. ``tau -> 0`` is the max.
  * ``"max"``: the best-scoring patch only (classic multiple-instance learning).
  * ``"none"``: no region term.

  Captions are not exhaustive on web data, so the negative half can be turned
  down with ``img_region_neg_weight``.

img phrase matching (``img_phrase_weight`` > 0; 0 in `LossConfig`, on in configs/)
  VLDet's region-word alignment as set matching, at the phrase level, in the
  token-only setting. The two terms above tie a caption word to no patch: the
  image term scores the image embedding, and the region term's pooling
  follows objectness, so a new word's push spreads over every object of the
  image (README, "Why captions do not teach yet"). Here each caption phrase
  (``phrase_tokens`` / ``phrase_counts``, `vocab.phrases.chunk`: "two red
  hexagons and a blue circle" -> ({red, hexagon}, 2), ({blue, circle}, 1)) is
  repeated by its count (at most ``img_phrase_max_instances`` instances, and
  at most M) and the instances are matched one-to-one to the N predictions by
  the same Hungarian solve as det/grd (the img examples' M box columns are
  free, so they hold the instances; `matching_cost.phrase_instances`).

  *Trusted tokens.* The cost uses only tokens with box supervision, so an
  untrained word cannot steer its own match (one trial that matched on a
  phrase's own focal cost sent `pink` off-object 90% of the time and the
  positives reinforced it; issue 12). A candidate is trusted when it is a box
  token of a det or grd example *of the same global batch*
  (`token_ops.batch_token_set`). That needs no vocabulary statistics or
  train-state, and follows the data mix: a token that only captions carry is
  never trusted; on ShapesWorld every base colour and shape is boxed in
  nearly every batch of 12 det examples. (On real data with a long tail a
  per-token flag kept over the run -- or one computed from the vocabulary's
  per-stream counts -- would trust rare boxed tokens that a batch misses;
  the cost function takes the mask, so that is a change of this one line.)

  *Cost* (`matching_cost.phrase_cost`): minus the geometric mean sigmoid
  probability of the phrase's trusted tokens (inference's soft AND), plus
  ``img_phrase_conflict_weight`` x the largest probability of a *conflict*
  token: a det box token of the batch that is not in the phrase
  (``img_phrase_cost="product"``: times ``(1 - that) ** weight`` instead;
  both measured in `phrase_cost`'s docstring). A patch confidently explained
  by a known token the phrase does not have ("circle" for "a red hexagon")
  is expensive, so known objects are left to their own phrases and the
  unknown word goes to the object nothing else explains. Conflicts are det tokens only: det's
  sigmoid focal loss against exhaustive category negatives calibrates their
  probabilities; grd-only tokens (`large`, `left`, `star`) are trained by a
  shift-invariant softmax and would penalize true but unmentioned attributes.

  *Gates.* Phrases with no trusted token ("a pink hexagon") get no instance;
  a match whose trusted-token probability is below
  ``img_phrase_min_trusted_prob`` is dropped (the object may be cropped away,
  or the detector not yet trained); nothing is matched before
  ``img_phrase_warmup_steps`` (the step comes from `train_step`; without a
  step the term is on).

  *Loss* (`terms.img_phrase_loss`): sigmoid focal like det's, on matched
  predictions only: positive on all the phrase's tokens (`hexagon` too),
  negative on the caption's other tokens; divided by the kept matches over
  the global batch. ``img_phrase_negatives="caption+det"`` makes the batch's
  det box tokens that are not in the phrase negatives too -- the conflict
  set of the cost, as det makes every other category a negative of its
  boxes: a "hexagon" match then teaches `circle` to stay low on hexagons,
  which no det image can (no det image has one). It assumes that a det
  token the phrase lacks does not describe the object (true of category
  names; a synonym or hypernym in the caption -- "a puppy" for a `dog` --
  would be pushed down; grd-only tokens are left alone, as in the cost).
  No box loss (captions have no boxes). The image and region terms stay as
  they are (their weights are separate).

  Measured (demo config, 2000 steps, seed 0, ``img_phrase_weight=2``,
  ``img_phrase_warmup_steps=500``, the other phrase fields at their
  defaults): img-novel AP50 0.022 -> 0.135, bare `hexagon` 0.005 -> 0.208,
  bare `pink` 0.002 -> 0.014, base 0.282 -> 0.289, grd-novel 0.130 -> 0.159;
  with half the objects left out of each caption
  (ShapesWorld ``caption_drop_fraction=0.5``) img-novel 0.047 -> 0.104,
  bare `hexagon` 0.005 -> 0.129 (base 0.270 -> 0.261). At the demo's 5000
  steps, 2 seeds, it is the demo's default (README, "Phrase-region
  matching"). `pink` stays weak, and not for want of a word: the detector's
  boxes miss pink objects (box recall at IoU 0.5: 0.46 vs >= 0.88 for every
  other colour and shape, `experiments/diagnose_captions.py`), since no det
  or grd box ever trained the box head on that colour and this term has no
  box loss; its matches then land off-object.

img self-training (``img_phrase_unmatched_weight`` > 0; off by default and in
  configs/). OWL-ST (Minderer et al., 2023) trains on a teacher's confident,
  caption-filtered pseudo-boxes with the detection loss, so every other
  prediction is a negative of the pseudo-label vocabulary. Here the
  pseudo-boxes are this step's kept phrase matches (no teacher copy, so no
  box targets: in-step pseudo-boxes are the student's own boxes), and the
  missing half is the negatives: in an img example whose caption the
  matches fully explain -- every instance it names has a kept match -- each
  unmatched prediction is negative on the caption's tokens
  (`terms.img_unmatched_loss`), as det's unmatched predictions are on the
  image's labels. That gives caption-only words the background negatives no
  other stream gives them. It assumes what det assumes of its labels: an
  object the caption does not name is not one of its words (wrong for a
  second, unnamed dog; ShapesWorld's ``caption_drop_fraction`` measures
  it). Divided by the kept matches over the global batch, like the phrase
  term, and weighted relative to it. Measured (demo config, 5000 steps,
  seeds 0 / 1, weight 1): bare `hexagon` +0.033 on the mean, base AP50
  -0.034, so it stays off (README, "Caption-only shapes"); the offline
  teacher's pseudo-boxes (`experiments/self_train.py`) are what helped.

img max-size (``img_maxsize_weight`` > 0; off by default and in configs/)
  Detic's max-size image-label loss, the cheaper baseline of phrase
  matching: each caption image gives *all* its caption tokens to one
  prediction, the largest box among its proposals (predictions whose best
  trusted-token probability, the objectness proxy, reaches
  ``img_maxsize_min_objectness``), as a sigmoid focal loss: positive on the
  caption tokens, negative on the other candidates (`terms.img_maxsize_*`).
  Divided by the img examples that have a proposal; nothing before
  ``img_maxsize_warmup_steps``. Detic trains on ImageNet-21k's
  object-centric images, where the largest box usually is the label;
  a caption that lists several objects hands every word to one of them.

Box loss (det and grd): L1 on cxcywh plus 1 - GIoU, on matched pairs.

Normalization: every term is divided by the number of its targets over the
**global batch** (det: det boxes; grd: grd boxes; img image term: img examples
with at least one caption token among the candidates; img region term: the
caption tokens and the caption-absent tokens respectively), each clamped to >= 1
so an absent stream gives 0, not 0/0. Under `jax.jit` on a batch sharded over
the mesh's data axis, `jnp.sum` over the batch axis is already the global sum
(XLA inserts the all-reduce), so no `psum` is needed; inside `shard_map` /
`pmap` the counts would have to be `psum`-ed explicitly. (``matcher="scipy"``
wraps only the per-example solve in a `shard_map`, so this holds for it too.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from omnitrain_jax import matching
from omnitrain_jax.data import schema
from omnitrain_jax.losses import matching_cost
from omnitrain_jax.losses import terms
from omnitrain_jax.losses import token_ops

_MATCHERS = ("jax", "scipy")
PHRASE_NEGATIVES = ("caption", "caption+det")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights and options of `omni_loss` (frozen, hashable: a static jit arg).

  Defaults follow the DETR family with a focal class loss (Deformable DETR:
  focal alpha 0.25, gamma 2; class / L1 / GIoU weights 2 / 5 / 2 for both the
  matching cost and the loss). OWL-ViT (scenic `clip_b32.py`) trains with alpha
  0.3 and all three weights 1.0. The grounding class cost and token-loss weight
  are MDETR's (soft token alignment cross-entropy, weight 1).

  Attributes:
    focal_alpha: weight of positives in the sigmoid focal loss (negatives get
      1 - alpha).
    focal_gamma: focusing exponent of the focal loss and cost.
    cost_class: det matching weight of the focal class cost.
    grd_cost_class: grd matching weight of the token cross-entropy cost.
    cost_l1: matching weight of the L1 box distance (det and grd).
    cost_giou: matching weight of -GIoU (det and grd).
    det_token_weight: weight of the det sigmoid focal token loss.
    grd_token_weight: weight of the grd token cross-entropy.
    l1_weight: weight of the L1 box loss (det and grd).
    giou_weight: weight of the 1 - GIoU box loss (det and grd).
    det_weight: overall weight of the det stream's terms.
    grd_weight: overall weight of the grd stream's terms.
    img_weight: overall weight of the img stream's terms.
    img_image_weight: weight of the image-level caption softmax.
    img_region_weight: weight of the region (patch-pooled) caption term.
    img_region_pool: "logsumexp" | "max" | "none" (see the module docstring).
    img_region_temperature: tau of the logsumexp pooling (> 0).
    img_region_neg_weight: relative weight of the caption-absent negatives in
      the region term (0 turns them off).
    grd_softmax: candidates in the grounding softmax: "candidates" | "phrases".
    grd_token_loss: the grd token loss, "softmax" (MDETR) | "per_positive" |
      "focal" (GLIP); `terms.grd_token_loss` and the module docstring. With
      "focal" the matching uses the det focal cost times ``grd_cost_class``
      (set it to ``cost_class`` to match like det).
    matcher: Hungarian solver: "jax" (in-graph, default on accelerators) or
      "scipy" (host callback; traced under a mesh whose "data" axis has more
      than one device, each device's callback solves only its own examples).
    matches_per_target: predictions matched to each det/grd target (1: DETR's
      one-to-one matching). With k > 1 every target is repeated k times in the
      Hungarian cost (H-DETR's one-to-many "hybrid" matching, Jia et al. 2023,
      here on the same predictions): k patches learn each object -- meant to
      speed up learning from scratch, which it did not on ShapesWorld (README,
      "What the demo reaches here") -- and duplicates must then be removed
      at inference (``eval.nms_iou``). The det/grd terms are divided by
      ``k x targets`` so their scale does not grow with k. When
      ``k x targets > N`` every target is still matched once and the spare
      predictions go to extra copies of the first targets. Applies to
      img phrase instances too.
    img_phrase_weight: weight of the img phrase-matching term (0: off, the
      default here; the configs/ files turn it on; see the module
      docstring).
    img_phrase_warmup_steps: no phrase matching before this step.
    img_phrase_min_trusted_prob: matches whose trusted-token probability
      (geometric mean) is below this are dropped.
    img_phrase_conflict_weight: weight ("sum") or exponent ("product") of
      the conflict part of the phrase matching cost (0: none).
    img_phrase_cost: ``"sum"`` or ``"product"`` (`matching_cost.phrase_cost`).
    img_phrase_max_instances: phrase instances per caption (capped at M).
    img_phrase_negatives: the negatives of a phrase-matched prediction:
      ``"caption"`` (the caption's other tokens) or ``"caption+det"`` (also
      the batch's det box tokens not in the phrase; module docstring).
    img_phrase_unmatched_weight: weight (relative to the phrase term) of
      the negatives of unmatched predictions in images whose caption the
      matches fully explain (0: off; module docstring, "img
      self-training").
    img_maxsize_weight: weight of Detic's max-size image-label term (0: off;
      see the module docstring).
    img_maxsize_warmup_steps: no max-size term before this step.
    img_maxsize_min_objectness: the proposals of the max-size choice:
      predictions whose best trusted-token probability reaches this.
  """
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  cost_class: float = 2.0
  grd_cost_class: float = 1.0
  cost_l1: float = 5.0
  cost_giou: float = 2.0
  det_token_weight: float = 2.0
  grd_token_weight: float = 1.0
  l1_weight: float = 5.0
  giou_weight: float = 2.0
  det_weight: float = 1.0
  grd_weight: float = 1.0
  img_weight: float = 1.0
  img_image_weight: float = 1.0
  img_region_weight: float = 1.0
  img_region_pool: str = "logsumexp"
  img_region_temperature: float = 1.0
  img_region_neg_weight: float = 1.0
  grd_softmax: str = "candidates"
  grd_token_loss: str = "softmax"
  matcher: str = "jax"
  matches_per_target: int = 1
  img_phrase_weight: float = 0.0
  img_phrase_warmup_steps: int = 0
  img_phrase_min_trusted_prob: float = 0.2
  img_phrase_conflict_weight: float = 1.0
  img_phrase_max_instances: int = 8
  img_phrase_cost: str = "sum"
  img_phrase_negatives: str = "caption"
  img_phrase_unmatched_weight: float = 0.0
  img_maxsize_weight: float = 0.0
  img_maxsize_warmup_steps: int = 0
  img_maxsize_min_objectness: float = 0.2

  def __post_init__(self):
    if self.matcher not in _MATCHERS:
      raise ValueError(
          f"LossConfig.matcher={self.matcher!r}; use one of {_MATCHERS}.")
    if self.grd_softmax not in terms.GRD_SOFTMAX:
      raise ValueError(f"LossConfig.grd_softmax={self.grd_softmax!r}; use one "
                       f"of {terms.GRD_SOFTMAX}.")
    if self.grd_token_loss not in terms.GRD_TOKEN_LOSSES:
      raise ValueError(f"LossConfig.grd_token_loss={self.grd_token_loss!r}; "
                       f"use one of {terms.GRD_TOKEN_LOSSES}.")
    if self.img_region_pool not in terms.REGION_POOLS:
      raise ValueError(f"LossConfig.img_region_pool={self.img_region_pool!r}; "
                       f"use one of {terms.REGION_POOLS}.")
    if not self.img_region_temperature > 0:
      raise ValueError(
          "LossConfig.img_region_temperature must be > 0, got "
          f"{self.img_region_temperature}; use e.g. 1.0 (smaller is closer to "
          "max pooling).")
    if not 0.0 <= self.focal_alpha <= 1.0:
      raise ValueError(
          f"LossConfig.focal_alpha={self.focal_alpha} must be in [0, 1].")
    if self.matches_per_target < 1:
      raise ValueError(f"LossConfig.matches_per_target="
                       f"{self.matches_per_target} must be >= 1 (1: one-to-one "
                       "matching).")
    if self.focal_gamma < 0:
      raise ValueError(
          f"LossConfig.focal_gamma={self.focal_gamma} must be >= 0.")
    if self.img_phrase_weight < 0 or self.img_phrase_conflict_weight < 0:
      raise ValueError(
          f"LossConfig.img_phrase_weight={self.img_phrase_weight} and "
          f"img_phrase_conflict_weight={self.img_phrase_conflict_weight} "
          "must be >= 0 (img_phrase_weight 0: no phrase matching).")
    if not 0.0 <= self.img_phrase_min_trusted_prob <= 1.0:
      raise ValueError(f"LossConfig.img_phrase_min_trusted_prob="
                       f"{self.img_phrase_min_trusted_prob} must be in [0, 1].")
    if self.img_phrase_cost not in matching_cost.PHRASE_COSTS:
      raise ValueError(f"LossConfig.img_phrase_cost={self.img_phrase_cost!r};"
                       f" use one of {matching_cost.PHRASE_COSTS}.")
    if self.img_phrase_negatives not in PHRASE_NEGATIVES:
      raise ValueError(f"LossConfig.img_phrase_negatives="
                       f"{self.img_phrase_negatives!r}; expected one of "
                       f"{PHRASE_NEGATIVES}.")
    if self.img_phrase_unmatched_weight < 0:
      raise ValueError(f"LossConfig.img_phrase_unmatched_weight="
                       f"{self.img_phrase_unmatched_weight} must be >= 0 "
                       "(0: off).")
    if self.img_maxsize_weight < 0:
      raise ValueError(f"LossConfig.img_maxsize_weight="
                       f"{self.img_maxsize_weight} must be >= 0 (0: off).")
    if not 0.0 <= self.img_maxsize_min_objectness <= 1.0:
      raise ValueError(f"LossConfig.img_maxsize_min_objectness="
                       f"{self.img_maxsize_min_objectness} must be in [0, 1].")
    if self.img_phrase_max_instances < 1:
      raise ValueError(f"LossConfig.img_phrase_max_instances="
                       f"{self.img_phrase_max_instances} must be >= 1.")

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | None) -> "LossConfig":
    """Builds a LossConfig from an `ml_collections.ConfigDict` (or a dict).

    Missing fields keep their defaults; an unknown field raises (a typo in
    `--config.loss.x` should fail, not be ignored).

    Args:
      config: the loss section of the experiment config, or None.

    Returns:
      The LossConfig.
    """
    if config is None:
      return cls()
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"Unknown loss config field(s) {unknown}; valid fields "
                       f"are {sorted(names)}.")
    return cls(**values)


def _check_shapes(outputs, batch):
  b, n, q = outputs["pred_logits"].shape
  m = batch["boxes"].shape[1]
  expected = {
      "outputs['pred_boxes']": (outputs["pred_boxes"].shape, (b, n, 4)),
      "outputs['image_logits']": (outputs["image_logits"].shape, (b, q)),
      "batch['candidates']": (batch["candidates"].shape, (b, q)),
      "batch['cand_known']": (batch["cand_known"].shape, (b, q)),
      "batch['cand_bg']": (batch["cand_bg"].shape, (b, q)),
      "batch['box_mask']": (batch["box_mask"].shape, (b, m)),
      "batch['stream']": (batch["stream"].shape, (b,)),
  }
  for name, (got, want) in expected.items():
    if tuple(got) != want:
      raise ValueError(
          f"{name} has shape {tuple(got)}, expected {want} from "
          f"outputs['pred_logits'] {(b, n, q)} and batch['boxes'] "
          f"{tuple(batch['boxes'].shape)}. The model must score exactly the "
          "batch's Q candidates for each of its N predictions.")


def omni_loss(outputs: Mapping[str, jnp.ndarray],
              batch: Mapping[str, jnp.ndarray],
              config: LossConfig = LossConfig(),
              step: jnp.ndarray | int | None = None,
              ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The OmniTrain loss for a batch mixing det, grd and img examples.

  Args:
    outputs: model outputs with ``pred_boxes`` [B, N, 4] (cxcywh in [0, 1]),
      ``pred_logits`` [B, N, Q] (token logits of the example's candidates) and
      ``image_logits`` [B, Q]. Other keys are ignored.
    batch: a batch following `omnitrain_jax.data.schema` (candidate fields
      included). Only the fields the loss needs are read: ``stream``,
      ``boxes``, ``box_mask``, ``box_tokens``, ``caption_tokens``,
      ``candidates``, ``cand_known``, ``cand_bg``; with phrase matching on
      also ``phrase_tokens`` and ``phrase_counts``.
    config: a `LossConfig` (static under jit).
    step: the optimizer step (int32 [], may be traced), for
      ``img_phrase_warmup_steps``; None: past the warm-up.

  Returns:
    (loss, metrics): the scalar total loss and a dict of scalars: ``loss``,
    the unweighted terms ``det/token``, ``det/l1``, ``det/giou``,
    ``grd/token``, ``grd/l1``, ``grd/giou``, ``img/image``, ``img/region``, and
    the global target counts ``det/num_targets`` (det boxes),
    ``grd/num_targets`` (grd boxes), ``img/num_targets`` (img examples with
    caption tokens among their candidates). With phrase matching on also
    ``img/phrase`` (the unweighted term), ``img/phrase_instances`` (phrase
    instances with a trusted token), ``img/phrase_matches`` (kept matches)
    and ``img/phrase_trusted_prob`` (their mean trusted-token probability,
    the geometric mean over each phrase's trusted tokens); with
    ``img_phrase_unmatched_weight`` > 0 also ``img/phrase_unmatched``
    (unweighted) and ``img/phrase_explained`` (img examples whose caption
    the matches fully explain). With max-size
    on also ``img/maxsize`` (unweighted) and ``img/maxsize_chosen`` (img
    examples with a chosen proposal).
  """
  _check_shapes(outputs, batch)
  f32 = jnp.float32
  # Losses in float32 whatever the model's compute dtype.
  pred_boxes = outputs["pred_boxes"].astype(f32)  # [B, N, 4]
  pred_logits = outputs["pred_logits"].astype(f32)  # [B, N, Q]
  image_logits = outputs["image_logits"].astype(f32)  # [B, Q]

  stream = batch["stream"]  # [B]
  is_det = stream == schema.STREAM_IDS["det"]
  is_grd = stream == schema.STREAM_IDS["grd"]
  is_img = stream == schema.STREAM_IDS["img"]
  candidates = batch["candidates"]  # [B, Q]
  cand_valid = candidates > 0  # [B, Q]
  box_mask = batch["box_mask"].astype(bool)  # [B, M]
  tgt_boxes = batch["boxes"].astype(f32)  # [B, M, 4]

  # Pad candidates: the model already masks them, but zero them here as well
  # so a huge or non-finite pad logit can never leak into a value or gradient.
  logits = jnp.where(cand_valid[:, None, :], pred_logits, 0.0)  # [B, N, Q]

  box_targets = token_ops.candidate_targets(batch["box_tokens"], candidates)
  box_targets &= box_mask[..., None]  # [B, M, Q]
  box_dist = token_ops.uniform_over(box_targets)  # [B, M, Q]
  grd_mask = terms.grd_softmax_mask(box_targets, cand_valid,
                                    config.grd_softmax)  # [B, Q]

  # ---- Matching (det and grd). ----
  cost, num_cols = matching_cost.compute_cost(
      box_dist, logits, tgt_boxes, pred_boxes, box_mask, stream, grd_mask,
      cost_class=config.cost_class, grd_cost_class=config.grd_cost_class,
      cost_l1=config.cost_l1, cost_giou=config.cost_giou,
      focal_alpha=config.focal_alpha, focal_gamma=config.focal_gamma,
      grd_form=config.grd_token_loss)
  cap_targets = token_ops.candidate_targets(batch["caption_tokens"],
                                            candidates)  # [B, Q]
  use_phrase = config.img_phrase_weight > 0
  if use_phrase or config.img_maxsize_weight > 0:
    # The batch's box tokens: trusted by phrase matching and max-size.
    det_tokens, grd_tokens = _box_token_sets(batch, box_mask, is_det, is_grd,
                                             candidates)  # [B, Q] each
  if use_phrase:  # img examples' columns: their phrase instances.
    phrase = _phrase_matching_inputs(logits, batch, candidates, box_mask,
                                     det_tokens, grd_tokens, is_img, step,
                                     config)
    cost = jnp.where(is_img[:, None, None], phrase["cost"], cost)
    num_cols = jnp.where(is_img, phrase["num_instances"], num_cols)
  k = config.matches_per_target
  raw_assign = matching.assignment_matrix(
      cost, num_cols, matches_per_target=k, method=config.matcher)
  assign = jax.lax.stop_gradient(raw_assign * box_mask[:, None, :])  # [B,N,M]

  # ---- Per-example terms, each computed for every example. ----
  l1, giou = terms.box_losses(pred_boxes, assign, tgt_boxes)  # [B], [B]
  det_token = terms.det_token_loss(
      logits, assign, box_targets, batch["cand_known"], batch["cand_bg"],
      cand_valid, focal_alpha=config.focal_alpha,
      focal_gamma=config.focal_gamma)  # [B]
  grd_token = terms.grd_token_loss(
      logits, assign, box_targets, grd_mask, form=config.grd_token_loss,
      focal_alpha=config.focal_alpha, focal_gamma=config.focal_gamma)  # [B]
  has_cap = is_img & (cap_targets.sum(-1) > 0)  # [B]
  img_image = terms.img_image_loss(image_logits, cap_targets, cand_valid)
  img_region = terms.img_region_loss(
      logits, cap_targets, has_cap, cand_valid, pool=config.img_region_pool,
      temperature=config.img_region_temperature,
      neg_weight=config.img_region_neg_weight)  # [], already normalized

  # ---- Normalization over the global batch (see the module docstring). ----
  num_boxes = box_mask.sum(-1).astype(f32)  # [B]
  num_det = jnp.sum(jnp.where(is_det, num_boxes, 0.0))
  num_grd = jnp.sum(jnp.where(is_grd, num_boxes, 0.0))
  num_img = jnp.sum(has_cap).astype(f32)
  # k matched predictions per target (see matches_per_target).
  det_norm, grd_norm = num_det * k, num_grd * k

  def stream_mean(per_example, mask, count):
    return jnp.sum(jnp.where(mask, per_example, 0.0)) / jnp.maximum(count, 1.0)

  metrics = {
      "det/token": stream_mean(det_token, is_det, det_norm),
      "det/l1": stream_mean(l1, is_det, det_norm),
      "det/giou": stream_mean(giou, is_det, det_norm),
      "grd/token": stream_mean(grd_token, is_grd, grd_norm),
      "grd/l1": stream_mean(l1, is_grd, grd_norm),
      "grd/giou": stream_mean(giou, is_grd, grd_norm),
      "img/image": stream_mean(img_image, has_cap, num_img),
      "img/region": img_region,
  }
  loss = (
      config.det_weight * (config.det_token_weight * metrics["det/token"] +
                           config.l1_weight * metrics["det/l1"] +
                           config.giou_weight * metrics["det/giou"]) +
      config.grd_weight * (config.grd_token_weight * metrics["grd/token"] +
                           config.l1_weight * metrics["grd/l1"] +
                           config.giou_weight * metrics["grd/giou"]) +
      config.img_weight * (config.img_image_weight * metrics["img/image"] +
                           config.img_region_weight * metrics["img/region"]))
  if use_phrase:
    kk = phrase["targets"].shape[1]
    # Matches of real instances of img examples whose trusted tokens are
    # probable enough (the gate); the rest of the row is det/grd's.
    p_assign = raw_assign[..., :kk] * phrase["valid"][:, None, :]
    p_assign *= is_img[:, None, None] & (
        phrase["trusted_prob"] >= config.img_phrase_min_trusted_prob)
    p_assign = jax.lax.stop_gradient(p_assign)  # [B, N, K]
    phrase_negatives = cap_targets
    if config.img_phrase_negatives == "caption+det":
      phrase_negatives = cap_targets | det_tokens  # phrase tokens stay pos.
    img_phrase = terms.img_phrase_loss(
        logits, p_assign, phrase["targets"], phrase_negatives, cand_valid,
        focal_alpha=config.focal_alpha, focal_gamma=config.focal_gamma)
    num_matches = p_assign.sum()
    metrics["img/phrase"] = stream_mean(img_phrase, is_img, num_matches)
    metrics["img/phrase_instances"] = jnp.sum(
        jnp.where(is_img, phrase["num_instances"], 0)).astype(f32)
    metrics["img/phrase_matches"] = num_matches
    metrics["img/phrase_trusted_prob"] = jnp.sum(
        p_assign * phrase["trusted_prob"]) / jnp.maximum(num_matches, 1.0)
    loss = loss + (config.img_weight * config.img_phrase_weight *
                   metrics["img/phrase"])
    if config.img_phrase_unmatched_weight > 0:
      # Explained: every instance the caption names has a kept match (a
      # phrase without a trusted token, a count over the instance cap or a
      # gated match leaves an object unaccounted for, so no negatives).
      named = jnp.sum(jnp.maximum(batch["phrase_counts"], 0), -1)  # [B]
      kept = p_assign.sum((1, 2))  # [B]
      explained = is_img & (named > 0) & (kept == named)
      unmatched = terms.img_unmatched_loss(
          logits, p_assign, cap_targets, explained, cand_valid,
          focal_alpha=config.focal_alpha, focal_gamma=config.focal_gamma)
      metrics["img/phrase_unmatched"] = stream_mean(unmatched, explained,
                                                    num_matches)
      metrics["img/phrase_explained"] = jnp.sum(explained).astype(f32)
      loss = loss + (config.img_weight * config.img_phrase_weight *
                     config.img_phrase_unmatched_weight *
                     metrics["img/phrase_unmatched"])
  if config.img_maxsize_weight > 0:
    trusted = det_tokens | grd_tokens  # [B, Q]
    probs = jax.nn.sigmoid(jax.lax.stop_gradient(logits))
    objectness = jnp.max(jnp.where(trusted[:, None, :], probs, 0.0), -1)
    choice, found = terms.img_maxsize_choice(
        jax.lax.stop_gradient(pred_boxes), objectness,
        config.img_maxsize_min_objectness)  # [B, N], [B]
    active = has_cap & found
    if step is not None:
      active &= jnp.asarray(step) >= config.img_maxsize_warmup_steps
    choice = choice * active[:, None]
    img_maxsize = terms.img_maxsize_loss(
        logits, choice, cap_targets, cand_valid,
        focal_alpha=config.focal_alpha, focal_gamma=config.focal_gamma)
    num_chosen = jnp.sum(active).astype(f32)
    metrics["img/maxsize"] = stream_mean(img_maxsize, active, num_chosen)
    metrics["img/maxsize_chosen"] = num_chosen
    loss = loss + (config.img_weight * config.img_maxsize_weight *
                   metrics["img/maxsize"])
  metrics["loss"] = loss
  metrics["det/num_targets"] = num_det
  metrics["grd/num_targets"] = num_grd
  metrics["img/num_targets"] = num_img
  return loss, metrics


def _phrase_matching_inputs(logits, batch, candidates, box_mask, det_tokens,
                            grd_tokens, is_img, step, config):
  """The img phrase instances and their matching cost (module docstring).

  Returns:
    A dict: ``cost`` float [B, N, M] (instances in the first K columns, 0
    elsewhere), ``num_instances`` int32 [B], ``valid`` bool [B, K] (real
    instances), ``targets`` bool [B, K, Q] (each instance's phrase tokens),
    ``trusted_prob`` float [B, N, K].
  """
  b = logits.shape[0]
  m = box_mask.shape[1]
  pshape = batch["phrase_tokens"].shape
  if pshape[0] != b or batch["phrase_counts"].shape != pshape[:2]:
    raise ValueError(
        f"batch['phrase_tokens'] {tuple(pshape)} and batch['phrase_counts'] "
        f"{tuple(batch['phrase_counts'].shape)} must be [B, P, L] and [B, P] "
        f"with B = {b} (schema.Spec max_phrases / max_phrase_tokens).")
  kk = min(config.img_phrase_max_instances, m)
  phrase_targets = token_ops.candidate_targets(batch["phrase_tokens"],
                                               candidates)  # [B, P, Q]
  trusted = det_tokens | grd_tokens  # [B, Q]
  phrase_trusted = phrase_targets & trusted[:, None, :]  # [B, P, Q]
  active = is_img
  if step is not None:
    active &= jnp.asarray(step) >= config.img_phrase_warmup_steps
  counts = batch["phrase_counts"]
  phrase_ok = (active[:, None] & (counts > 0)
               & phrase_trusted.any(-1))  # [B, P]
  index, num = matching_cost.phrase_instances(phrase_ok, counts, kk)
  gather = lambda x: jnp.take_along_axis(x, index[..., None], axis=1)
  inst_targets = gather(phrase_targets)  # [B, K, Q]
  inst_trusted = gather(phrase_trusted)  # [B, K, Q]
  inst_conflict = det_tokens[:, None, :] & ~inst_targets  # [B, K, Q]
  cost, trusted_prob = matching_cost.phrase_cost(
      logits, inst_trusted, inst_conflict,
      conflict_weight=config.img_phrase_conflict_weight,
      form=config.img_phrase_cost)  # [B, N, K]
  valid = jnp.arange(kk)[None, :] < num[:, None]  # [B, K]
  cost = jnp.where(valid[:, None, :], cost, 0.0)
  cost = jnp.pad(cost, ((0, 0), (0, 0), (0, m - kk)))
  return {"cost": cost, "num_instances": num, "valid": valid,
          "targets": inst_targets & valid[..., None],
          "trusted_prob": trusted_prob}


def _box_token_sets(batch, box_mask, is_det, is_grd, candidates):
  """bool [B, Q] each: candidates that are a det resp. grd box token of the
  batch (the trusted tokens of phrase matching and max-size)."""
  det_tokens = token_ops.batch_token_set(
      batch["box_tokens"], box_mask & is_det[:, None], candidates)
  grd_tokens = token_ops.batch_token_set(
      batch["box_tokens"], box_mask & is_grd[:, None], candidates)
  return det_tokens, grd_tokens
