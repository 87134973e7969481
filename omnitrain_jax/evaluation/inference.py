"""Inference: the model's encoded images -> query scores -> top-k boxes.

Pure, jittable functions shared by evaluation, prediction and the trainer's
periodic evaluation. They take `OmniDet.encode` outputs (``pred_boxes``
``[B, N, 4]``, ``class_embeddings`` ``[B, N, D]``, ``logit_scale`` /
``logit_shift`` ``[B, N]``) and a way to look up normalised token rows
(``embed_tokens``: ids ``[...]`` -> ``[..., D]``, i.e.
`OmniDet.token_embeddings`), and never build ``[B, N, V]`` logits.

A query ("purple star") is a set of vocabulary tokens. Its score for a box is
the **geometric mean of the box's token probabilities** over the query's
tokens, ``exp(mean_t log sigmoid(s_t))``: a soft AND, so `purple star` needs
both `purple` and `star` (a box that is a confident `star` but not `purple`
scores about sqrt(p_purple)). A product would also be an AND but would
penalise long queries; the mean in log space keeps scores of queries of
different lengths comparable. A query without tokens scores 0 everywhere.
The logit is the model's `omnidet.token_logits` (``scale * <z, e> +
shift``), shared with training.

Queries and scores:

* `build_query_tokens` (host): token-id lists -> padded ``[P, L]`` ids.
* `query_logits` / `query_scores` / `score_queries`: a shared query set
  ``[P, L]`` -> ``[B, N, P]``; `per_image_query_scores`: per-image queries
  ``[B, P, L]`` (grounding phrases).
* `union_query_scores`: a large shared query set (a dataset's category
  names): logits only for the union of the queries' tokens, a `lax.scan`
  over chunks of it; each chunk's log-probabilities are folded into every
  query's mean by one matmul with a fixed ``[chunk, R]`` weight matrix, so
  memory is ``[B, N, chunk + R]`` whatever the number of queries (LVIS: 1203
  names, ~1300 tokens). Same scores as `score_queries`.
* `embedding_scores`: scores against arbitrary query embeddings
  (image-guided queries: a box's class embedding from another image).
* `top_k_vocab`: the k best vocabulary tokens per box, a running top-k over
  vocabulary chunks (memory ``[B, N, k + chunk]`` whatever V is).

Boxes, with static shapes (post-processing stays on the accelerator):

* `top_k_boxes` / `top_k_detections`: the k best boxes per query, optional
  greedy NMS per query or across queries (prediction).
* `detect_top_k`: the k best (box, query) pairs per image over all N * P
  pairs, optional per-query NMS (COCO/LVIS results: a box may appear under
  several categories, as in DETR-style sigmoid detectors).
* `chunked_detect_top_k`: `detect_top_k` of a huge shared query set
  (100k+ names, `queries.QueryChunks`) without ``[B, N, P]``: a scan over
  query chunks with a running top-k of (box, query) pairs, same pairs.
* `ground_top_k`: top-k boxes per phrase of per-image queries.
* `nms_keep`: greedy NMS, optionally within groups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omnitrain_jax.data import schema
from omnitrain_jax.losses import box_ops
from omnitrain_jax.models.omnidet import token_logits

EmbedFn = Callable[[jax.Array], jax.Array]

_RESERVED_IDS = (schema.PAD_ID, schema.UNK_ID)


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


def query_logits(encoded: Mapping[str, jax.Array], embed_tokens: EmbedFn,
                 query_tokens: jax.Array) -> jax.Array:
  """Per-box logits of each query's tokens (shared queries).

  Only the ``P * L`` query rows of the token table are looked up.

  Args:
    encoded: `OmniDet.encode` outputs.
    embed_tokens: ids ``[C]`` -> normalised rows ``[C, D]``.
    query_tokens: int ``[P, L]`` query token ids (0 = pad).

  Returns:
    float32 ``[B, N, P, L]`` logits (meaningless at padding; mask them).
  """
  p, l = query_tokens.shape
  rows = embed_tokens(query_tokens.reshape(-1))  # [P*L, D]
  logits = token_logits(encoded["class_embeddings"], encoded["logit_scale"],
                        encoded["logit_shift"], rows)  # [B, N, P*L]
  return logits.reshape(logits.shape[:2] + (p, l))


def query_scores(logits: jax.Array, query_mask: jax.Array) -> jax.Array:
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


def score_queries(encoded: Mapping[str, jax.Array], embed_tokens: EmbedFn,
                  query_tokens: jax.Array,
                  query_mask: jax.Array | None = None) -> jax.Array:
  """`query_logits` then `query_scores`: ``[B, N, P]`` box-query scores.

  Args:
    encoded: `OmniDet.encode` outputs.
    embed_tokens: ids ``[C]`` -> normalised rows ``[C, D]``.
    query_tokens: int ``[P, L]`` from `build_query_tokens`.
    query_mask: bool ``[P, L]``; default ``query_tokens > 0``.

  Returns:
    float32 ``[B, N, P]``.
  """
  if query_mask is None:
    query_mask = query_tokens != schema.PAD_ID
  return query_scores(query_logits(encoded, embed_tokens, query_tokens),
                      query_mask)


def top_k_vocab(encoded: Mapping[str, jax.Array], embed_tokens: EmbedFn,
                vocab_size: int, k: int, chunk_size: int = 4096,
                token_mask: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """The k highest-logit vocabulary tokens per box, in vocabulary chunks.

  Scans the vocabulary in chunks of `chunk_size` ids, merging each chunk's
  logits ``[B, N, chunk]`` into a running top-k ``[B, N, k]``; the
  ``[B, N, V]`` logits never exist at once. Ties resolve to the lower token
  id, as a dense `lax.top_k` over the whole vocabulary does. Reserved ids
  (pad, unk) never appear. For the image-level embedding pass ``[B, 1, D]``
  embeddings and ``[B, 1]`` scales and shifts.

  Args:
    encoded: ``class_embeddings`` ``[B, N, D]`` (normalised),
      ``logit_scale`` and ``logit_shift`` ``[B, N]``.
    embed_tokens: ids ``[C]`` -> normalised rows ``[C, D]``.
    vocab_size: V, the rows of the token table.
    k: tokens to keep, ``1 <= k <= V - 2``.
    chunk_size: ids per scan step; memory is ``O(B N (k + chunk_size))``.
    token_mask: optional bool ``[V]``; False excludes a token (e.g. stop
      words or a restricted label set).

  Returns:
    (logits float32 ``[B, N, k]`` descending, token ids int32 ``[B, N, k]``);
    if `token_mask` leaves fewer than k tokens, the rest are -inf with id -1.
  """
  v = int(vocab_size)
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
  xs = (ids.reshape(num_chunks, chunk_size),
        valid.reshape(num_chunks, chunk_size))
  z, scale, shift = (encoded["class_embeddings"], encoded["logit_scale"],
                     encoded["logit_shift"])
  b, n, _ = z.shape

  def step(carry, chunk):
    best, best_ids = carry  # [B, N, k] each
    chunk_ids, chunk_valid = chunk
    # The last chunk's padding ids look up a real row; they are masked below.
    rows = embed_tokens(jnp.minimum(chunk_ids, v - 1))  # [C, D]
    logits = token_logits(z, scale, shift, rows)  # [B, N, C]
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


def top_k_boxes(scores: jax.Array, boxes: jax.Array, k: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
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


def nms_keep(boxes_xyxy: jax.Array, scores: jax.Array,
             iou_threshold: float,
             groups: jax.Array | None = None) -> jax.Array:
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


def top_k_detections(scores: jax.Array, boxes: jax.Array, k: int,
                     nms_iou_threshold: float | None = None,
                     class_agnostic: bool = False
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
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
  return _suppressed_last(keep, 0.0, top, top_boxes, idx)


def _suppressed_last(keep: jax.Array, fill: float, scores: jax.Array,
                     boxes: jax.Array, index: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Scores of suppressed entries set to `fill`, kept entries first.

  Args:
    keep: bool ``[..., K]`` (`nms_keep`).
    fill: the score of a suppressed entry (consumers skip it).
    scores: ``[..., K]`` descending.
    boxes: ``[..., K, 4]``.
    index: ``[..., K]`` (labels or box indices).

  Returns:
    (scores, boxes, index), reordered alike; the sort is stable, so the kept
    entries stay in descending order.
  """
  scores = jnp.where(keep, scores, fill)
  order = jnp.argsort(~keep, axis=-1, stable=True)
  return (jnp.take_along_axis(scores, order, axis=-1),
          jnp.take_along_axis(boxes, order[..., None], axis=-2),
          jnp.take_along_axis(index, order, axis=-1))


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
  # On ties lax.top_k keeps the lower flat index n * P + p first.
  top, flat = jax.lax.top_k(scores.reshape(b, n * p), k)  # [B, k]
  return _pairs_with_nms(top, flat // p, flat % p, boxes, nms_iou_threshold)


def _pairs_with_nms(top: jax.Array, box_index: jax.Array, labels: jax.Array,
                    boxes: jax.Array, nms_iou_threshold: float | None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`detect_top_k`'s tail: gathers the pairs' boxes, per-query NMS.

  Args:
    top: ``[B, k]`` descending pair scores.
    box_index: int ``[B, k]`` into N.
    labels: int ``[B, k]`` query indices.
    boxes: ``[B, N, 4]`` (cx, cy, w, h).
    nms_iou_threshold: None for no NMS.

  Returns:
    (scores ``[B, k]``, labels int32 ``[B, k]``, boxes ``[B, k, 4]``).
  """
  top_boxes = jnp.take_along_axis(boxes, box_index[..., None], axis=1)
  if nms_iou_threshold is not None:
    xyxy = box_ops.cxcywh_to_xyxy(top_boxes.astype(jnp.float32))
    keep = nms_keep(xyxy, top, nms_iou_threshold, groups=labels)  # [B, k]
    top, top_boxes, labels = _suppressed_last(keep, -1.0, top, top_boxes,
                                              labels)
  return top, labels.astype(jnp.int32), top_boxes


def chunk_query_scores(encoded: Mapping[str, jax.Array],
                       embed_tokens: EmbedFn, tokens: jax.Array,
                       query_valid: jax.Array | None = None) -> jax.Array:
  """Scores of queries given as padded variants (one `QueryChunks` chunk).

  A query's score is its best variant's geometric mean of token
  probabilities (`query_scores`), 0 for a query without tokens: the scores
  of `union_query_scores` for the same queries, computed from the
  ``Pc * G * L`` rows of this chunk only.

  Args:
    encoded: `OmniDet.encode` outputs.
    embed_tokens: ids ``[C]`` -> normalised rows ``[C, D]``.
    tokens: int32 ``[Pc, G, L]``, 0 = pad.
    query_valid: optional bool ``[Pc]``; False (padding) scores -inf, below
      every real pair.

  Returns:
    float32 ``[B, N, Pc]``.
  """
  pc, g, l = tokens.shape
  logits = query_logits(encoded, embed_tokens,
                        tokens.reshape(pc * g, l))  # [B, N, Pc*G, L]
  variant = query_scores(logits, tokens.reshape(pc * g, l) != schema.PAD_ID)
  # All variant scores are >= 0 (0: an all-padding variant), so the max over
  # G is the best real variant's, or 0 for a query without any.
  scores = variant.reshape(variant.shape[:2] + (pc, g)).max(-1)
  if query_valid is not None:
    scores = jnp.where(query_valid, scores, -jnp.inf)
  return scores


def chunked_detect_top_k(encoded: Mapping[str, jax.Array],
                         embed_tokens: EmbedFn, tokens: jax.Array,
                         query_valid: jax.Array, k: int, *,
                         num_queries: int,
                         nms_iou_threshold: float | None = None,
                         fixed_k: int | None = None
                         ) -> dict[str, jax.Array]:
  """`detect_top_k` of a huge shared query set, one query chunk at a time.

  ``detect_top_k(union_query_scores(...))`` without ``[B, N, P]`` or
  `TokenUnion`'s ``[U', R]`` weights: a `lax.scan` over the chunks of a
  `queries.QueryChunks` scores each chunk (`chunk_query_scores`, ``[B, N,
  Pc]``), takes its k best (box, query) pairs and merges them into a
  running top-k ``[B, k]``. The merge sorts by (score descending, box index,
  query index), the order `lax.top_k` gives the flat ``[B, N * P]`` array
  (equal scores: lower flat index ``n * P + p`` first), so the pairs and
  their order are `detect_top_k`'s, ties included. Per-query NMS then runs
  on the k pairs as there. Memory per step: ``B * N * Pc * G * L`` logits
  and a top-k over ``[B, N * Pc]``.

  Args:
    encoded: `OmniDet.encode` outputs (``pred_boxes`` ``[B, N, 4]`` cxcywh).
    embed_tokens: ids ``[C]`` -> normalised rows ``[C, D]``.
    tokens: int32 ``[C, Pc, G, L]`` (`QueryChunks.tokens`).
    query_valid: bool ``[C, Pc]`` (`QueryChunks.query_valid`).
    k: pairs per image (static), ``1 <= k <= N * num_queries``.
    num_queries: P, the real queries (static).
    nms_iou_threshold: None for no NMS, else per-query NMS above this IoU.
    fixed_k: also each query's `fixed_k` best boxes per image, with the
      same NMS (`top_k_detections`; fixed AP's candidates), as the scan's
      per-chunk outputs: ``[B, P, fixed_k]`` grows with P (the caller
      decides whether that fits).

  Returns:
    ``scores`` ``[B, k]`` descending (-1 for pairs dropped by NMS, sorted
    last), ``labels`` int32 ``[B, k]`` query indices, ``boxes`` ``[B, k,
    4]``; with `fixed_k` also ``fixed_scores`` ``[B, P, fixed_k]`` and
    ``fixed_boxes`` ``[B, P, fixed_k, 4]``.
  """
  c, pc = tokens.shape[:2]
  boxes = encoded["pred_boxes"]
  b, n, _ = boxes.shape
  if not 1 <= num_queries <= c * pc:
    raise ValueError(f"num_queries={num_queries} must be in [1, {c * pc}] "
                     f"({c} chunks of {pc}).")
  if not 1 <= k <= n * num_queries:
    raise ValueError(f"k={k} must be in [1, {n * num_queries}] (boxes x "
                     "queries).")
  if fixed_k is not None and not 1 <= fixed_k <= n:
    raise ValueError(f"fixed_k={fixed_k} must be in [1, {n}] (the number "
                     "of boxes).")
  kc = min(k, n * pc)  # A chunk's candidates.
  offsets = jnp.arange(c, dtype=jnp.int32) * pc

  def step(carry, chunk):
    ids, valid, offset = chunk
    scores = chunk_query_scores(encoded, embed_tokens, ids, valid)  # [B,N,Pc]
    # The chunk's best; ties in the order (n, p), as the flat array's.
    top, flat = jax.lax.top_k(scores.reshape(b, n * pc), kc)  # [B, kc]
    cand = (jnp.concatenate([carry[0], -top], axis=-1),
            jnp.concatenate([carry[1], flat // pc], axis=-1),
            jnp.concatenate([carry[2], flat % pc + offset], axis=-1))
    # Three keys: (-score, box, query) ascending is the flat top-k's order.
    merged = jax.lax.sort(cand, dimension=1, num_keys=3)
    carry = tuple(x[:, :k] for x in merged)
    if fixed_k is None:
      return carry, None
    fixed_scores, fixed_boxes, _ = top_k_detections(
        scores, boxes, fixed_k, nms_iou_threshold=nms_iou_threshold)
    return carry, (fixed_scores, fixed_boxes)

  # The carry holds negated scores (the sort is ascending); empty slots are
  # +inf, after every real pair (real scores >= 0 and k <= N * P).
  init = (jnp.full((b, k), jnp.inf, jnp.float32),
          jnp.full((b, k), n, jnp.int32),
          jnp.full((b, k), c * pc, jnp.int32))
  (neg, box_index, labels), fixed = jax.lax.scan(
      step, init, (tokens, query_valid, offsets))
  top, labels, top_boxes = _pairs_with_nms(
      -neg, box_index, labels, boxes, nms_iou_threshold)
  out = {"scores": top, "labels": labels, "boxes": top_boxes}
  if fixed_k is not None:
    # [C, B, Pc, ...] -> [B, C * Pc, ...] -> the real queries.
    fs, fb = (jnp.moveaxis(x, 0, 1) for x in fixed)
    out["fixed_scores"] = fs.reshape(b, c * pc, fixed_k)[:, :num_queries]
    out["fixed_boxes"] = fb.reshape(b, c * pc, fixed_k, 4)[:, :num_queries]
  return out


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
  return query_scores(logits, query_tokens != schema.PAD_ID)


def ground_top_k(encoded: Mapping[str, jax.Array], embed_tokens: EmbedFn,
                 query_tokens: jax.Array, k: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Top-k boxes per phrase of per-image queries.

  Returns:
    (scores ``[B, P, k]`` descending, boxes ``[B, P, k, 4]`` as predicted).
  """
  scores = per_image_query_scores(encoded, embed_tokens, query_tokens)
  top, top_boxes, _ = top_k_boxes(scores, encoded["pred_boxes"], k)
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
