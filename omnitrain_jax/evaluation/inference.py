"""Device-side scoring for evaluation and prediction: pure, jittable functions.

They take the model's `OmniDet.encode` outputs (``pred_boxes`` ``[B, N, 4]``,
``class_embeddings`` ``[B, N, D]``, ``logit_scale``/``logit_shift``
``[B, N]``) and a way to get normalised token rows (``embed_tokens``: ids
``[...]`` -> ``[..., D]``, i.e. `OmniDet.token_embeddings`), and never build
``[B, N, V]`` logits:

* `union_query_scores`: a *shared* query set (a dataset's category names):
  logits only for the union of the queries' tokens, a `lax.scan` over chunks
  of that union; each chunk's log-probabilities are folded into every
  query's mean by one matmul with a fixed ``[chunk, R]`` weight matrix, so
  memory is ``[B, N, chunk + R]`` whatever the number of queries (LVIS: 1203
  names, ~1300 tokens). Score = geometric mean of the token probabilities,
  exactly `scoring.query_scores`.
* `detect_top_k`: the K best (box, query) pairs per image over all N * P
  pairs -- the COCO/LVIS results of an image (a box may appear under several
  categories, as in DETR-style sigmoid detectors).
* `ground_top_k`: *per-image* queries (grounding phrases, ``[B, P, L]``
  tokens), top-k boxes per phrase.
* `embedding_scores`: scores against arbitrary query embeddings (image-guided
  queries: a box's class embedding from another image).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from omnitrain_jax.data import schema
from omnitrain_jax.losses import box_ops
from omnitrain_jax.losses import scoring
from omnitrain_jax.models.omnidet import token_logits

EmbedFn = Callable[[jax.Array], jax.Array]


def union_query_scores(encoded: Mapping[str, jax.Array],
                       embed_tokens: EmbedFn,
                       token_ids: jax.Array, weights: jax.Array,
                       variant_valid: jax.Array, groups: jax.Array, *,
                       chunk_size: int, trivial_groups: bool = False
                       ) -> jax.Array:
  """Scores of a shared query set, computing logits per union token only.

  Arguments come from `queries.TokenUnion` (see there for the layout).

  Args:
    encoded: `OmniDet.encode` outputs.
    embed_tokens: ids ``[C]`` -> normalised rows ``[C, D]``.
    token_ids: int32 ``[U']`` union tokens, a multiple of `chunk_size`
      (padding id 0 has zero weight).
    weights: float32 ``[U', R]`` token -> variant mean weights.
    variant_valid: bool ``[R]``.
    groups: int32 ``[P, G]`` variants of each query, -1 = none.
    chunk_size: tokens per scan step (static).
    trivial_groups: query p is variant p (static; skips the gather).

  Returns:
    float32 ``[B, N, P]`` scores in [0, 1]; 0 for a query without tokens.
  """
  z = encoded["class_embeddings"]
  scale, shift = encoded["logit_scale"], encoded["logit_shift"]
  b, n, _ = z.shape
  num_variants = weights.shape[1]
  num_chunks = token_ids.shape[0] // chunk_size
  xs = (token_ids.reshape(num_chunks, chunk_size),
        weights.reshape(num_chunks, chunk_size, num_variants))

  def step(acc, chunk):
    ids, w = chunk
    logits = token_logits(z, scale, shift, embed_tokens(ids))  # [B, N, C]
    # Sums of log-probabilities: a matmul keeps the accelerator busy and
    # memory at [B, N, R]; HIGHEST so TPUs do not round to bfloat16.
    acc = acc + jnp.einsum("bnc,cr->bnr", jax.nn.log_sigmoid(logits), w,
                           precision=jax.lax.Precision.HIGHEST)
    return acc, None

  acc0 = jnp.zeros((b, n, num_variants), jnp.float32)
  mean_log_p, _ = jax.lax.scan(step, acc0, xs)  # [B, N, R]
  scores = jnp.where(variant_valid, jnp.exp(mean_log_p), 0.0)
  if trivial_groups:
    return scores
  picked = jnp.take(scores, jnp.maximum(groups, 0), axis=-1)  # [B, N, P, G]
  return jnp.max(jnp.where(groups >= 0, picked, 0.0), axis=-1)


def detect_top_k(scores: jax.Array, boxes: jax.Array, k: int,
                 nms_iou_threshold: float | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k best (box, query) pairs of each image, optionally after NMS.

  With `nms_iou_threshold`, greedy NMS runs per query among the k pairs
  (the usual "top-k, then per-class NMS" of COCO detectors): a pair is
  dropped when a higher-scoring pair of the *same* query overlaps it with
  IoU above the threshold. Dropped pairs get score -1 and are sorted last
  (`detections.coco_results` skips them); shapes stay static.

  Args:
    scores: ``[B, N, P]``.
    boxes: ``[B, N, 4]`` (cx, cy, w, h).
    k: pairs per image (static), ``<= N * P``.
    nms_iou_threshold: None for no NMS.

  Returns:
    (scores ``[B, k]`` descending, query indices int32 ``[B, k]``, boxes
    ``[B, k, 4]``).
  """
  b, n, p = scores.shape
  if not 1 <= k <= n * p:
    raise ValueError(f"k={k} must be in [1, {n * p}] (boxes x queries).")
  top, flat = jax.lax.top_k(scores.reshape(b, n * p), k)  # [B, k]
  box_index, labels = flat // p, flat % p
  top_boxes = jnp.take_along_axis(boxes, box_index[..., None], axis=1)
  if nms_iou_threshold is not None:
    xyxy = box_ops.cxcywh_to_xyxy(top_boxes.astype(jnp.float32))
    keep = scoring.nms_keep(xyxy, top, nms_iou_threshold,
                            groups=labels)  # [B, k]
    top = jnp.where(keep, top, -1.0)
    order = jnp.argsort(-top, axis=-1, stable=True)
    top = jnp.take_along_axis(top, order, axis=-1)
    labels = jnp.take_along_axis(labels, order, axis=-1)
    top_boxes = jnp.take_along_axis(top_boxes, order[..., None], axis=1)
  return top, labels.astype(jnp.int32), top_boxes


def per_image_query_scores(encoded: Mapping[str, jax.Array],
                           embed_tokens: EmbedFn,
                           query_tokens: jax.Array) -> jax.Array:
  """Scores of per-image queries.

  Args:
    encoded: `OmniDet.encode` outputs.
    embed_tokens: ids ``[B, Q]`` -> normalised rows ``[B, Q, D]``.
    query_tokens: int32 ``[B, P, L]``, 0 = pad; an all-pad query scores 0.

  Returns:
    float32 ``[B, N, P]``.
  """
  b, p, l = query_tokens.shape
  rows = embed_tokens(query_tokens.reshape(b, p * l))  # [B, P*L, D]
  logits = token_logits(encoded["class_embeddings"], encoded["logit_scale"],
                        encoded["logit_shift"], rows)  # [B, N, P*L]
  logits = logits.reshape(logits.shape[:2] + (p, l))
  return scoring.query_scores(logits, query_tokens != schema.PAD_ID)


def ground_top_k(encoded: Mapping[str, jax.Array], embed_tokens: EmbedFn,
                 query_tokens: jax.Array, k: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Top-k boxes per phrase of per-image queries.

  Returns:
    (scores ``[B, P, k]`` descending, boxes ``[B, P, k, 4]`` as predicted).
  """
  scores = per_image_query_scores(encoded, embed_tokens, query_tokens)
  top, top_boxes, _ = scoring.top_k_boxes(scores, encoded["pred_boxes"], k)
  return top, top_boxes


def embedding_scores(encoded: Mapping[str, jax.Array],
                     query_embeddings: jax.Array) -> jax.Array:
  """Sigmoid scores of every box against query embeddings.

  The box's own per-patch scale and shift apply, as for token rows, so an
  image-guided query is scored like a one-token text query.

  Args:
    encoded: `OmniDet.encode` outputs.
    query_embeddings: ``[E, D]``, L2-normalised.

  Returns:
    float32 ``[B, N, E]``.
  """
  return jax.nn.sigmoid(token_logits(
      encoded["class_embeddings"], encoded["logit_scale"],
      encoded["logit_shift"], query_embeddings))
