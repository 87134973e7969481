"""Inference-time scoring: text queries, full-vocabulary top-k, top-k boxes, NMS.

A query ("purple star") is a set of vocabulary tokens. Its score for a box is
the **geometric mean of the box's token probabilities** over the query's
tokens, ``exp(mean_t log sigmoid(s_t))``: a soft AND, so `purple star` needs
both `purple` and `star` (a box that is a confident `star` but not `purple`
scores about sqrt(p_purple)). A product would also be an AND but would penalise
long queries; the mean in log space keeps scores of queries of different
lengths comparable. A query without tokens scores 0 everywhere.

Everything here is a pure, jittable function of arrays (except
`build_query_tokens`, which runs on the host on Python lists):

* `build_query_tokens`: token-id lists -> padded ``[P, L]`` ids and mask.
* `query_logits` / `query_scores` / `score_queries`: per-box query scores
  ``[B, N, P]``, computed from the model's class embeddings and only the
  query tokens' rows of the token table.
* `top_k_vocab`: the k best vocabulary tokens per box without ever building
  ``[B, N, V]``: a `lax.scan` over chunks of the table keeps a running top-k,
  so memory is ``[B, N, k + chunk]`` whatever V is.
* `top_k_boxes`, `nms_keep`, `top_k_detections`: the k best boxes per image per
  query, with optional greedy NMS per query or across queries
  (class-agnostic), in JAX with static shapes (suppressed detections get score
  0 and are sorted last), so post-processing can stay on the accelerator.

The logit is the model's `omnitrain_jax.models.omnidet.token_logits`
(``scale * <z, e> + shift``), shared with training.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omnitrain_jax.data import schema
from omnitrain_jax.losses import box_ops
from omnitrain_jax.models.omnidet import token_logits

_RESERVED_IDS = (schema.PAD_ID, schema.UNK_ID)


def _l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def build_query_tokens(queries: Sequence[Sequence[int]],
                       max_tokens: int | None = None,
                       num_queries: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Pads token-id lists (one per query) to a static ``[P, L]`` matrix.

  Duplicate ids within a query are dropped (a query is a set of tokens; a
  repeated token would weigh twice in the geometric mean). Padding to fixed
  `max_tokens` / `num_queries` lets one compiled scoring function serve any
  query set up to that size.

  Args:
    queries: one sequence of token ids per query, as the tokenizer returns
      them (unknown words already reported and removed by the caller).
    max_tokens: L, tokens per query (default: the longest query).
    num_queries: P, rows (default: len(queries)); extra rows are padding and
      score 0.

  Returns:
    (tokens int32 ``[P, L]`` with 0 = pad, mask bool ``[P, L]``).

  Raises:
    ValueError: a query is empty, holds a reserved id (pad/unk), or does not
      fit in `max_tokens`; or there are more queries than `num_queries`.
  """
  deduped = [list(dict.fromkeys(int(t) for t in q)) for q in queries]
  for i, q in enumerate(deduped):
    if not q:
      raise ValueError(
          f"Query {i} has no tokens; every word was unknown or a stop word. "
          "Report the unknown words to the user and drop the query.")
    bad = [t for t in q if t in _RESERVED_IDS or t < 0]
    if bad:
      raise ValueError(
          f"Query {i} = {q} holds reserved/invalid ids {bad} (pad "
          f"{schema.PAD_ID}, unk {schema.UNK_ID}); drop unknown words before "
          "building queries.")
  longest = max((len(q) for q in deduped), default=0)
  max_tokens = longest if max_tokens is None else max_tokens
  num_queries = len(deduped) if num_queries is None else num_queries
  if longest > max_tokens:
    raise ValueError(f"A query has {longest} tokens but max_tokens="
                     f"{max_tokens}; raise max_tokens to at least {longest}.")
  if len(deduped) > num_queries:
    raise ValueError(f"{len(deduped)} queries but num_queries={num_queries}; "
                     f"raise num_queries to at least {len(deduped)}.")
  tokens = np.zeros((num_queries, max(max_tokens, 1)), np.int32)
  for i, q in enumerate(deduped):
    tokens[i, :len(q)] = q
  return tokens, tokens != schema.PAD_ID


def query_logits(class_embeddings: jnp.ndarray, scale: jnp.ndarray,
                 shift: jnp.ndarray, token_table: jnp.ndarray,
                 query_tokens: jnp.ndarray) -> jnp.ndarray:
  """Per-box logits of each query's tokens.

  Only the ``P * L`` query rows of the table are gathered (and L2-normalised,
  which is idempotent on rows that already are).

  Args:
    class_embeddings: ``[B, N, D]`` normalised class embeddings.
    scale: ``[B, N]`` logit scales.
    shift: ``[B, N]`` logit shifts.
    token_table: ``[V, D]`` token embedding table (raw or normalised rows).
    query_tokens: int ``[P, L]`` query token ids (0 = pad).

  Returns:
    float32 ``[B, N, P, L]`` logits (meaningless at padding; mask them).
  """
  p, l = query_tokens.shape
  rows = _l2_normalize(jnp.take(token_table, query_tokens.reshape(-1), axis=0))
  logits = token_logits(class_embeddings, scale, shift, rows)  # [B, N, P*L]
  return logits.reshape(logits.shape[:2] + (p, l))


def query_scores(logits: jnp.ndarray, query_mask: jnp.ndarray) -> jnp.ndarray:
  """Geometric mean of the token probabilities over each query's tokens.

  ``score[b, n, p] = exp(mean_{l: mask[p, l]} log sigmoid(logits[b, n, p, l]))``
  (computed in log space: no underflow from a product of small
  probabilities). A query without tokens scores 0.

  Args:
    logits: ``[B, N, P, L]`` token logits of each query's tokens.
    query_mask: bool ``[P, L]`` (shared queries) or ``[B, P, L]`` (per image).

  Returns:
    float32 ``[B, N, P]`` scores in [0, 1].
  """
  if query_mask.ndim == 3:
    query_mask = query_mask[:, None]  # [B, 1, P, L]
  mask = jnp.broadcast_to(query_mask, logits.shape)
  log_p = jnp.where(mask, jax.nn.log_sigmoid(logits.astype(jnp.float32)), 0.0)
  count = mask.sum(-1)  # [B, N, P]
  mean = log_p.sum(-1) / jnp.maximum(count, 1)
  return jnp.where(count > 0, jnp.exp(mean), 0.0)


def score_queries(class_embeddings: jnp.ndarray, scale: jnp.ndarray,
                  shift: jnp.ndarray, token_table: jnp.ndarray,
                  query_tokens: jnp.ndarray,
                  query_mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """`query_logits` then `query_scores`: ``[B, N, P]`` box-query scores.

  Args:
    class_embeddings: ``[B, N, D]`` (the model's `encode` output).
    scale: ``[B, N]`` (``logit_scale``).
    shift: ``[B, N]`` (``logit_shift``).
    token_table: ``[V, D]`` token table.
    query_tokens: int ``[P, L]`` from `build_query_tokens`.
    query_mask: bool ``[P, L]``; default ``query_tokens > 0``.

  Returns:
    float32 ``[B, N, P]``.
  """
  if query_mask is None:
    query_mask = query_tokens != schema.PAD_ID
  logits = query_logits(class_embeddings, scale, shift, token_table,
                        query_tokens)
  return query_scores(logits, query_mask)


def top_k_vocab(class_embeddings: jnp.ndarray, scale: jnp.ndarray,
                shift: jnp.ndarray, token_table: jnp.ndarray, k: int,
                chunk_size: int = 4096,
                token_mask: jnp.ndarray | None = None
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The k highest-logit vocabulary tokens per box, in vocabulary chunks.

  Scans the table in chunks of `chunk_size` rows, merging each chunk's logits
  ``[B, N, chunk]`` into a running top-k ``[B, N, k]``; the ``[B, N, V]``
  logits never exist at once. Ties resolve to the lower token id, as a dense
  `lax.top_k` over the whole vocabulary does. Reserved ids (pad, unk) never
  appear. For the image-level embedding pass ``[B, 1, D]`` and ``[B, 1]``.

  Args:
    class_embeddings: ``[B, N, D]`` normalised class embeddings.
    scale: ``[B, N]`` logit scales.
    shift: ``[B, N]`` logit shifts.
    token_table: ``[V, D]`` token table (rows are L2-normalised per chunk).
    k: tokens to keep, ``1 <= k <= V - 2``.
    chunk_size: rows per scan step; memory is ``O(B N (k + chunk_size))``.
    token_mask: optional bool ``[V]``; False excludes a token (e.g. stop
      words or a restricted label set).

  Returns:
    (logits float32 ``[B, N, k]`` descending, token ids int32 ``[B, N, k]``);
    if `token_mask` leaves fewer than k tokens, the rest are -inf with id -1.
  """
  v, d = token_table.shape
  if not 1 <= k <= v - len(_RESERVED_IDS):
    raise ValueError(f"k={k} must be in [1, {v - len(_RESERVED_IDS)}] for a "
                     f"vocabulary of {v} tokens ({len(_RESERVED_IDS)} "
                     "reserved).")
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
  chunk_size = min(chunk_size, v)
  num_chunks = -(-v // chunk_size)
  pad = num_chunks * chunk_size - v
  ids = jnp.arange(num_chunks * chunk_size, dtype=jnp.int32)
  valid = ids < v
  for r in _RESERVED_IDS:
    valid &= ids != r
  if token_mask is not None:
    valid &= jnp.pad(token_mask.astype(bool), (0, pad))
  table = jnp.pad(token_table, ((0, pad), (0, 0)))
  xs = (table.reshape(num_chunks, chunk_size, d),
        ids.reshape(num_chunks, chunk_size),
        valid.reshape(num_chunks, chunk_size))
  b, n, _ = class_embeddings.shape

  def step(carry, chunk):
    best, best_ids = carry  # [B, N, k] each
    rows, chunk_ids, chunk_valid = chunk
    logits = token_logits(class_embeddings, scale, shift,
                          _l2_normalize(rows))  # [B, N, C]
    logits = jnp.where(chunk_valid, logits, -jnp.inf)
    # Running entries first: on ties top_k keeps the earlier (lower) id.
    cat = jnp.concatenate([best, logits], axis=-1)  # [B, N, k + C]
    cat_ids = jnp.concatenate(
        [best_ids, jnp.broadcast_to(chunk_ids, (b, n, chunk_size))], axis=-1)
    best, pos = jax.lax.top_k(cat, k)
    return (best, jnp.take_along_axis(cat_ids, pos, axis=-1)), None

  init = (jnp.full((b, n, k), -jnp.inf, jnp.float32),
          jnp.full((b, n, k), -1, jnp.int32))
  (best, best_ids), _ = jax.lax.scan(step, init, xs)
  return best, jnp.where(best > -jnp.inf, best_ids, -1)


def top_k_boxes(scores: jnp.ndarray, boxes: jnp.ndarray, k: int
                ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """The k best boxes per image per query.

  Args:
    scores: ``[B, N, P]`` box-query scores.
    boxes: ``[B, N, 4]`` boxes (any format; gathered as is).
    k: boxes per query, ``k <= N``.

  Returns:
    (scores ``[B, P, k]`` descending, boxes ``[B, P, k, 4]``, box indices
    int32 ``[B, P, k]`` into N).
  """
  n = scores.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, {n}] (the number of boxes).")
  top, idx = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), k)  # [B, P, k]
  top_boxes = jnp.take_along_axis(boxes[:, None], idx[..., None], axis=2)
  return top, top_boxes, idx


def nms_keep(boxes_xyxy: jnp.ndarray, scores: jnp.ndarray,
             iou_threshold: float,
             groups: jnp.ndarray | None = None) -> jnp.ndarray:
  """Greedy non-maximum suppression with static shapes.

  In descending score order a box is kept unless it overlaps a kept,
  higher-scoring box with IoU > `iou_threshold`. A `fori_loop` over the K
  candidates with an O(K) step: meant for post-top-k sets (K of a few
  hundred), batched over all leading axes.

  Args:
    boxes_xyxy: ``[..., K, 4]`` boxes ``x0, y0, x1, y1``.
    scores: ``[..., K]`` scores.
    iou_threshold: suppress at IoU above this.
    groups: optional int ``[..., K]``: a box only suppresses boxes of its
      own group (per-class NMS over a mixed list).

  Returns:
    bool ``[..., K]`` keep mask, in the input order.
  """
  kk = scores.shape[-1]
  order = jnp.argsort(-scores, axis=-1, stable=True)  # [..., K]
  sorted_boxes = jnp.take_along_axis(boxes_xyxy, order[..., None], axis=-2)
  overlap = box_ops.pairwise_box_iou(sorted_boxes,
                                     sorted_boxes) > iou_threshold  # [...,K,K]
  if groups is not None:
    g = jnp.take_along_axis(groups, order, axis=-1)
    overlap &= g[..., :, None] == g[..., None, :]
  pos = jnp.arange(kk)

  def body(i, keep):
    earlier_kept = keep & (pos < i)  # [..., K]
    suppressed = jnp.any(earlier_kept & overlap[..., :, i], axis=-1)
    return jnp.where(pos == i, ~suppressed[..., None], keep)

  keep_sorted = jax.lax.fori_loop(0, kk, body,
                                  jnp.ones(scores.shape, bool))
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(keep_sorted, inverse, axis=-1)


def top_k_detections(scores: jnp.ndarray, boxes: jnp.ndarray, k: int,
                     nms_iou_threshold: float | None = None,
                     class_agnostic: bool = False
                     ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Top-k boxes per image per query, with optional NMS.

  OWL-ViT-style one-to-one training makes duplicates rare, so NMS is off by
  default. With `nms_iou_threshold`, greedy NMS runs per query (each query's
  k boxes among themselves) or, with `class_agnostic`, over all P * k
  detections of an image, so a box keeps only its best query (one label per
  object). Suppressed detections get score 0 and are sorted after the kept
  ones; shapes stay static.

  Args:
    scores: ``[B, N, P]`` box-query scores in [0, 1].
    boxes: ``[B, N, 4]`` boxes ``cx, cy, w, h``.
    k: detections per query.
    nms_iou_threshold: None for no NMS, else suppress above this IoU.
    class_agnostic: NMS across queries instead of per query.

  Returns:
    (scores ``[B, P, k]`` descending, boxes ``[B, P, k, 4]`` cxcywh, box
    indices int32 ``[B, P, k]`` into N).
  """
  top, top_boxes, idx = top_k_boxes(scores, boxes, k)
  if nms_iou_threshold is None:
    return top, top_boxes, idx
  b, p, _ = top.shape
  xyxy = box_ops.cxcywh_to_xyxy(top_boxes)
  if class_agnostic:
    keep = nms_keep(xyxy.reshape(b, 1, p * k, 4), top.reshape(b, 1, p * k),
                    nms_iou_threshold).reshape(b, p, k)
  else:
    keep = nms_keep(xyxy, top, nms_iou_threshold)  # [B, P, k]
  top = jnp.where(keep, top, 0.0)
  # Kept first, then suppressed; stable, so kept stay in descending order.
  order = jnp.argsort(~keep, axis=-1, stable=True)
  top = jnp.take_along_axis(top, order, axis=-1)
  top_boxes = jnp.take_along_axis(top_boxes, order[..., None], axis=-2)
  idx = jnp.take_along_axis(idx, order, axis=-1)
  return top, top_boxes, idx
