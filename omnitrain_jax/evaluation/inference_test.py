"""Tests for inference.py: query scoring, top-k, NMS."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnitrain_jax.evaluation import inference
from omnitrain_jax.evaluation import queries
from omnitrain_jax.losses import box_ops
from omnitrain_jax.models import omnidet


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _encoded(b=2, n=6, d=8, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "class_embeddings": _normalize(rng.normal(size=(b, n, d))).astype(
          np.float32),
      "logit_scale": rng.uniform(5, 15, (b, n)).astype(np.float32),
      "logit_shift": rng.uniform(-3, 1, (b, n)).astype(np.float32),
      "pred_boxes": rng.uniform(0.1, 0.9, (b, n, 4)).astype(np.float32),
  }


def _union_scores(enc, table, qs, chunk):
  union = queries.TokenUnion.build(qs, chunk_size=chunk)
  fn = jax.jit(functools.partial(
      inference.union_query_scores, embed_tokens=_embed_jnp(table),
      chunk_size=union.chunk_size, trivial_groups=union.trivial_groups))
  return np.asarray(fn(enc, token_ids=union.token_ids, weights=union.weights,
                       variant_valid=union.variant_valid,
                       groups=union.groups))


def _embed_jnp(table):
  table = jnp.asarray(table)

  def embed(ids):
    rows = jnp.take(table, ids, axis=0)
    return rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)

  return embed


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_union_scores_equal_per_query_scoring(chunk):
  enc = _encoded()
  table = np.random.default_rng(1).normal(size=(20, 8)).astype(np.float32)
  token_lists = [[2, 5], [5], [7, 9, 11], [3, 2, 19]]
  qs = [queries.Query(text=str(t), variants=(tuple(t),))
        for t in token_lists]
  got = _union_scores(enc, table, qs, chunk)
  tokens, _ = inference.build_query_tokens(token_lists)
  want = inference.score_queries(enc, _embed_jnp(table), tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_union_scores_take_the_best_variant_and_zero_for_empty():
  enc = _encoded()
  table = np.random.default_rng(2).normal(size=(12, 8)).astype(np.float32)
  qs = [queries.Query("a/b", variants=((2, 3), (4,))),
        queries.Query("unknown", variants=()),
        queries.Query("c", variants=((5,),))]
  got = _union_scores(enc, table, qs, 2)
  single = _union_scores(enc, table, [
      queries.Query("a", ((2, 3),)), queries.Query("b", ((4,),)),
      queries.Query("c", ((5,),))], 2)
  np.testing.assert_allclose(got[..., 0], single[..., :2].max(-1), rtol=1e-6)
  assert np.all(got[..., 1] == 0)
  np.testing.assert_allclose(got[..., 2], single[..., 2], rtol=1e-6)


def test_detect_top_k_matches_a_flat_sort():
  rng = np.random.default_rng(3)
  scores = rng.random((2, 5, 4)).astype(np.float32)
  boxes = rng.random((2, 5, 4)).astype(np.float32)
  top, labels, top_boxes = map(np.asarray,
                               inference.detect_top_k(scores, boxes, 7))
  for b in range(2):
    order = np.argsort(-scores[b].ravel(), kind="stable")[:7]
    np.testing.assert_allclose(top[b], scores[b].ravel()[order])
    np.testing.assert_array_equal(labels[b], order % 4)
    np.testing.assert_allclose(top_boxes[b], boxes[b][order // 4])
  with pytest.raises(ValueError, match="boxes x queries"):
    inference.detect_top_k(scores, boxes, 21)


def test_detect_top_k_nms_is_per_query():
  # One image, N = 4 boxes, P = 2 queries. Boxes 0 and 1 overlap (IoU 0.9),
  # box 2 is elsewhere, box 3 overlaps box 0 a little (IoU ~0.2).
  boxes = np.array([[[0.3, 0.3, 0.2, 0.2], [0.3, 0.305, 0.2, 0.2],
                     [0.8, 0.8, 0.1, 0.1], [0.4, 0.3, 0.2, 0.2]]], np.float32)
  scores = np.array([[[0.9, 0.1], [0.8, 0.7], [0.5, 0.05], [0.4, 0.02]]],
                    np.float32)
  top, labels, top_boxes = map(np.asarray, inference.detect_top_k(
      scores, boxes, 8, nms_iou_threshold=0.5))
  kept = [(round(float(s), 2), int(l)) for s, l in zip(top[0], labels[0])
          if s >= 0]
  # Query 0: box 1 (0.8) is suppressed by box 0 (0.9); box 3 (IoU < 0.5)
  # stays. Query 1: box 1 (0.7) is its best, so box 0 (0.1) is suppressed --
  # a box of the other query never suppresses.
  assert kept == [(0.9, 0), (0.7, 1), (0.5, 0), (0.4, 0), (0.05, 1),
                  (0.02, 1)]
  assert np.all(top[0, len(kept):] == -1)
  np.testing.assert_allclose(top_boxes[0, 1], boxes[0, 1])
  # Without NMS: the plain top-k.
  plain, _, _ = inference.detect_top_k(scores, boxes, 8)
  np.testing.assert_allclose(plain[0], np.sort(scores[0].ravel())[::-1])


def test_per_image_queries_and_grounding_top_k():
  enc = _encoded(b=2, n=6)
  table = np.random.default_rng(4).normal(size=(15, 8)).astype(np.float32)
  # Image 0 asks [2, 3] and [4]; image 1 asks [5] and nothing.
  qt = np.array([[[2, 3], [4, 0]], [[5, 0], [0, 0]]], np.int32)
  got = np.asarray(inference.per_image_query_scores(enc, _embed_jnp(table),
                                                    qt))  # [B, N, P]
  for b in range(2):
    tokens, mask = qt[b], qt[b] > 0
    one = {k: v[b:b + 1] for k, v in enc.items()}
    want = inference.score_queries(one, _embed_jnp(table), tokens, mask)[0]
    np.testing.assert_allclose(got[b], want, rtol=1e-5)
  assert np.all(got[1, :, 1] == 0)
  top, boxes = map(np.asarray,
                   inference.ground_top_k(enc, _embed_jnp(table), qt, 3))
  assert top.shape == (2, 2, 3) and boxes.shape == (2, 2, 3, 4)
  best = np.argmax(got[0, :, 0])
  np.testing.assert_allclose(boxes[0, 0, 0], enc["pred_boxes"][0, best])


def test_embedding_scores_equal_a_one_token_query():
  enc = _encoded()
  table = np.random.default_rng(5).normal(size=(10, 8)).astype(np.float32)
  emb = _normalize(table[[6]])
  got = np.asarray(inference.embedding_scores(enc, emb))
  tokens, _ = inference.build_query_tokens([[6]])
  want = inference.score_queries(enc, _embed_jnp(table), tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _model_outputs(b=2, n=5, d=8, v=37, seed=0):
  rng = np.random.default_rng(seed)
  z = _normalize(rng.normal(size=(b, n, d))).astype(np.float32)
  scale = rng.uniform(5, 15, (b, n)).astype(np.float32)
  shift = rng.uniform(-5, 0, (b, n)).astype(np.float32)
  table = rng.normal(size=(v, d)).astype(np.float32)
  return z, scale, shift, table


def _enc(z, scale, shift):
  return {"class_embeddings": z, "logit_scale": scale, "logit_shift": shift}


def test_build_query_tokens_pads_and_validates():
  tokens, mask = inference.build_query_tokens([[5, 6], [7], [8, 8]],
                                            max_tokens=3, num_queries=4)
  np.testing.assert_array_equal(tokens,
                                [[5, 6, 0], [7, 0, 0], [8, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(mask, tokens > 0)
  with pytest.raises(ValueError, match="max_tokens"):
    inference.build_query_tokens([[5, 6, 7]], max_tokens=2)
  with pytest.raises(ValueError, match="no tokens"):
    inference.build_query_tokens([[5], []])
  with pytest.raises(ValueError, match="reserved"):
    inference.build_query_tokens([[5, 1]])
  with pytest.raises(ValueError, match="num_queries"):
    inference.build_query_tokens([[5], [6]], num_queries=1)


def test_query_scores_is_a_soft_and():
  p_purple, p_star = 0.9, 0.4
  logit = lambda p: np.log(p / (1 - p))
  # Query 0 = purple star, query 1 = star, query 2 = padding row.
  logits = np.array([[[[logit(p_purple), logit(p_star)],
                       [logit(p_star), 0.0],
                       [3.0, 3.0]]]], np.float32)  # [1, 1, 3, 2]
  mask = np.array([[True, True], [True, False], [False, False]])
  scores = np.asarray(inference.query_scores(logits, mask))[0, 0]
  np.testing.assert_allclose(scores[0], np.sqrt(p_purple * p_star), rtol=1e-5)
  np.testing.assert_allclose(scores[1], p_star, rtol=1e-5)
  assert scores[2] == 0
  # Both tokens are needed: a box that is only purple scores low.
  only_purple = np.array([[[[logit(0.99), logit(0.01)]]]], np.float32)
  assert inference.query_scores(only_purple, mask[:1])[0, 0, 0] < 0.1
  # Per-image masks [B, P, L] broadcast over boxes.
  per_image = inference.query_scores(logits, mask[None])
  np.testing.assert_allclose(per_image[0, 0], scores, rtol=1e-6)


def test_score_queries_matches_dense_token_logits():
  z, scale, shift, table = _model_outputs()
  tokens, mask = inference.build_query_tokens([[2, 9], [30], [4, 5, 6]])
  got = inference.score_queries(_enc(z, scale, shift), _embed_jnp(table),
                                tokens)
  dense = np.asarray(omnidet.token_logits(z, scale, shift, _normalize(table)))
  log_p = np.log(1 / (1 + np.exp(-dense.astype(np.float64))))  # [B, N, V]
  expected = np.stack(
      [np.exp(log_p[..., tokens[i][mask[i]]].mean(-1)) for i in range(3)], -1)
  np.testing.assert_allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("chunk_size,k", [(8, 5), (37, 3), (5, 12)])
def test_top_k_vocab_matches_dense(chunk_size, k):
  z, scale, shift, table = _model_outputs()
  mask = np.ones(37, bool)
  mask[[3, 20]] = False
  fn = jax.jit(functools.partial(inference.top_k_vocab,
                                 embed_tokens=_embed_jnp(table),
                                 vocab_size=37, k=k, chunk_size=chunk_size))
  values, ids = fn(_enc(z, scale, shift), token_mask=mask)
  dense = np.array(omnidet.token_logits(z, scale, shift, _normalize(table)))
  dense[..., [0, 1, 3, 20]] = -np.inf  # Reserved ids and masked tokens.
  order = np.argsort(-dense, axis=-1, kind="stable")[..., :k]
  np.testing.assert_array_equal(ids, order)
  np.testing.assert_allclose(values, np.take_along_axis(dense, order, -1),
                             rtol=1e-5, atol=1e-5)


def test_top_k_vocab_with_fewer_valid_tokens_than_k():
  z, scale, shift, table = _model_outputs(v=6)
  mask = np.array([True, True, True, False, True, False])  # Valid: 2, 4.
  values, ids = inference.top_k_vocab(_enc(z, scale, shift),
                                      _embed_jnp(table), 6, 3, 4, mask)
  assert np.all(np.sort(ids[..., :2], -1) == [2, 4])
  assert np.all(ids[..., 2] == -1) and np.all(np.isneginf(values[..., 2]))


def test_top_k_boxes():
  scores = np.array([[[0.1, 0.9], [0.8, 0.2], [0.5, 0.6]]])  # [1, N=3, P=2]
  boxes = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
  top, top_boxes, idx = inference.top_k_boxes(scores, boxes, 2)
  np.testing.assert_array_equal(idx, [[[1, 2], [0, 2]]])
  np.testing.assert_allclose(top, [[[0.8, 0.5], [0.9, 0.6]]])
  np.testing.assert_array_equal(top_boxes[0, 1, 0], boxes[0, 0])


def _np_nms(boxes, scores, thr):
  """Reference greedy NMS."""
  order = np.argsort(-scores, kind="stable")
  keep = np.zeros(len(scores), bool)
  iou = np.asarray(box_ops.pairwise_box_iou(boxes, boxes))
  for i in order:
    if not any(keep[j] and iou[i, j] > thr for j in range(len(scores))):
      keep[i] = True
  return keep


def test_nms_keep_matches_reference():
  rng = np.random.default_rng(0)
  cxcy = rng.uniform(0.3, 0.7, (2, 3, 20, 2))
  wh = rng.uniform(0.1, 0.3, (2, 3, 20, 2))
  xyxy = np.asarray(box_ops.cxcywh_to_xyxy(
      np.concatenate([cxcy, wh], -1).astype(np.float32)))
  scores = rng.uniform(size=(2, 3, 20)).astype(np.float32)
  keep = np.asarray(jax.jit(inference.nms_keep, static_argnums=2)(
      xyxy, scores, 0.5))
  assert 0 < keep.sum() < keep.size
  for i in range(2):
    for j in range(3):
      np.testing.assert_array_equal(
          keep[i, j], _np_nms(xyxy[i, j], scores[i, j], 0.5))


def test_nms_keep_with_groups_is_nms_per_group():
  rng = np.random.default_rng(1)
  cxcy = rng.uniform(0.3, 0.7, (2, 30, 2))
  wh = rng.uniform(0.1, 0.3, (2, 30, 2))
  xyxy = np.asarray(box_ops.cxcywh_to_xyxy(
      np.concatenate([cxcy, wh], -1).astype(np.float32)))
  scores = rng.uniform(size=(2, 30)).astype(np.float32)
  groups = rng.integers(0, 3, (2, 30)).astype(np.int32)
  keep = np.asarray(inference.nms_keep(xyxy, scores, 0.5, groups=groups))
  for i in range(2):
    for g in range(3):
      sel = groups[i] == g
      np.testing.assert_array_equal(
          keep[i][sel], _np_nms(xyxy[i][sel], scores[i][sel], 0.5))
  # Groups keep more than one NMS over everything.
  assert keep.sum() > np.asarray(inference.nms_keep(xyxy, scores, 0.5)).sum()


def test_top_k_detections_nms_per_query_and_class_agnostic():
  box = [0.5, 0.5, 0.2, 0.2]
  near = [0.51, 0.5, 0.2, 0.2]  # IoU ~0.9 with box.
  far = [0.1, 0.1, 0.1, 0.1]
  boxes = np.array([[box, near, far]], np.float32)  # [1, 3, 4]
  scores = np.array([[[0.9, 0.3], [0.8, 0.7], [0.1, 0.2]]],
                    np.float32)  # [1, N=3, P=2]
  top, _, idx = inference.top_k_detections(scores, boxes, 3)
  np.testing.assert_array_equal(idx, [[[0, 1, 2], [1, 0, 2]]])
  top, _, idx = inference.top_k_detections(scores, boxes, 3,
                                         nms_iou_threshold=0.5)
  # Per query: `near` is suppressed by `box` for query 0, `box` by `near` for
  # query 1; suppressed detections score 0 and come last.
  np.testing.assert_array_equal(idx, [[[0, 2, 1], [1, 2, 0]]])
  np.testing.assert_allclose(top, [[[0.9, 0.1, 0.0], [0.7, 0.2, 0.0]]])
  top, _, idx = inference.top_k_detections(scores, boxes, 3,
                                         nms_iou_threshold=0.5,
                                         class_agnostic=True)
  # Across queries a box keeps only its best query: `box`/query 0 (0.9)
  # suppresses `near` and `box`/query 1; `far`/query 1 (0.2) suppresses
  # `far`/query 0 (0.1).
  np.testing.assert_allclose(top, [[[0.9, 0.0, 0.0], [0.2, 0.0, 0.0]]])
  assert idx[0, 0, 0] == 0 and idx[0, 1, 0] == 2


# ------------------------------------------------- chunked detection path
_CHUNK_QUERIES = [
    queries.Query("a/b", variants=((2, 3), (4,))),
    queries.Query("unknown", variants=()),
    queries.Query("c", variants=((5,),)),
    queries.Query("d", variants=((6, 7, 8),)),
    queries.Query("e/f/g", variants=((9,), (10, 11), (12,))),
]


def _dense_queries(qs, enc, table):
  """The reference ``[B, N, P]``: per-variant `score_queries`, max per query."""
  cols = []
  for q in qs:
    if not q.variants:
      cols.append(np.zeros(enc["pred_boxes"].shape[:2], np.float32))
      continue
    tokens, _ = inference.build_query_tokens(q.variants)
    cols.append(np.asarray(inference.score_queries(
        enc, _embed_jnp(table), tokens)).max(-1))
  return np.stack(cols, -1)


def _chunked(enc, table, qs, chunk_tokens, k, nms=None, fixed_k=None):
  chunks = queries.QueryChunks.build(qs, chunk_tokens=chunk_tokens)
  fn = jax.jit(functools.partial(
      inference.chunked_detect_top_k, embed_tokens=_embed_jnp(table), k=k,
      num_queries=chunks.num_queries, nms_iou_threshold=nms,
      fixed_k=fixed_k))
  out = fn(enc, tokens=chunks.tokens, query_valid=chunks.query_valid)
  return chunks, {name: np.asarray(x) for name, x in out.items()}


def test_chunk_query_scores_equal_dense_scores():
  enc = _encoded()
  table = np.random.default_rng(5).normal(size=(20, 8)).astype(np.float32)
  chunks = queries.QueryChunks.build(_CHUNK_QUERIES, chunk_tokens=1024)
  got = inference.chunk_query_scores(enc, _embed_jnp(table),
                                     chunks.tokens[0], chunks.query_valid[0])
  want = _dense_queries(_CHUNK_QUERIES, enc, table)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(got)[..., 1] == 0)  # The empty query.
  np.testing.assert_allclose(
      got, _union_scores(enc, table, _CHUNK_QUERIES, 3), rtol=1e-5,
      atol=1e-7)


# chunk_tokens 9: one query per step (G = L = 3); 18: 3 chunks of 2, the
# last with a padding query; 1024: one chunk.
@pytest.mark.parametrize("chunk_tokens,nms",
                         [(9, None), (18, None), (18, 0.3), (1024, 0.3)])
def test_chunked_detect_top_k_equals_dense_detect_top_k(chunk_tokens, nms):
  enc = _encoded(b=2, n=6)
  table = np.random.default_rng(6).normal(size=(20, 8)).astype(np.float32)
  dense = _dense_queries(_CHUNK_QUERIES, enc, table)  # [B, N, P]
  k = 6 * len(_CHUNK_QUERIES)  # Every pair: the whole order is checked.
  chunks, got = _chunked(enc, table, _CHUNK_QUERIES, chunk_tokens, k, nms,
                         fixed_k=3)
  if chunk_tokens == 18:
    assert chunks.tokens.shape[:2] == (3, 2)
    assert not chunks.query_valid[-1, -1]
  want = inference.detect_top_k(dense, enc["pred_boxes"], k, nms)
  np.testing.assert_allclose(got["scores"], want[0], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(got["labels"], want[1])
  np.testing.assert_allclose(got["boxes"], want[2])
  assert got["labels"].max() < len(_CHUNK_QUERIES)  # Padding never selected.
  fixed_scores, fixed_boxes, _ = inference.top_k_detections(
      dense, enc["pred_boxes"], 3, nms_iou_threshold=nms)
  np.testing.assert_allclose(got["fixed_scores"], fixed_scores, rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(got["fixed_boxes"], fixed_boxes)
  with pytest.raises(ValueError, match="boxes x queries"):
    _chunked(enc, table, _CHUNK_QUERIES, chunk_tokens, k + 1)


def test_chunked_detect_top_k_breaks_ties_like_the_flat_top_k():
  # Boxes 1 and 4 are the same box; queries 0 and 3 the same token: the four
  # pairs (1, 0), (1, 3), (4, 0), (4, 3) tie exactly. The flat top-k keeps
  # them in the order n * P + p; a merge that let earlier chunks win ties
  # would give (1, 0), (4, 0), (1, 3), (4, 3).
  enc = _encoded(b=1, n=6)
  for name in ("class_embeddings", "logit_scale", "logit_shift",
               "pred_boxes"):
    enc[name][:, 4] = enc[name][:, 1]
  table = np.random.default_rng(7).normal(size=(10, 8)).astype(np.float32)
  qs = [queries.Query(str(t), variants=((t,),)) for t in (2, 3, 4, 2, 5)]
  dense = np.asarray(inference.score_queries(
      enc, _embed_jnp(table), np.array([[2], [3], [4], [2], [5]], np.int32)))
  assert dense[0, 1, 0] == dense[0, 4, 3]  # The tie is exact.
  k = 30
  _, got = _chunked(enc, table, qs, 1, k)  # One query per chunk.
  want = [np.asarray(x) for x in inference.detect_top_k(
      dense, enc["pred_boxes"], k)]
  order = np.lexsort((np.tile(np.arange(5), 6), np.repeat(np.arange(6), 5),
                      -dense[0].ravel()))  # score desc, then n, then p.
  np.testing.assert_array_equal(want[1][0], order % 5)
  np.testing.assert_array_equal(got["labels"], want[1])
  np.testing.assert_allclose(got["boxes"], want[2])
  np.testing.assert_allclose(got["scores"], want[0], rtol=1e-6)


def test_chunked_padding_queries_are_never_selected():
  # Three queries in 2 chunks of 2 (one padding query) and k = N * P: every
  # real pair is taken, even those scoring 0 (the empty query), and none of
  # the padding query's.
  enc = _encoded(b=2, n=4)
  table = np.random.default_rng(8).normal(size=(10, 8)).astype(np.float32)
  qs = [queries.Query("a", ((2,),)), queries.Query("none", ()),
        queries.Query("b", ((3,),))]
  chunks, got = _chunked(enc, table, qs, 2, k=12)
  assert chunks.tokens.shape[:2] == (2, 2)
  for b in range(2):
    assert sorted(got["labels"][b].tolist()) == [0] * 4 + [1] * 4 + [2] * 4
  assert np.all(got["scores"][:, -4:] == 0)  # The empty query's, last.


@pytest.mark.parametrize("nms", [0.0, 0.3])
@pytest.mark.parametrize("fixed_ap", [False, True])
def test_det_evaluator_paths_give_the_same_detections(nms, fixed_ap):
  from omnitrain_jax.evaluation import det_evaluator
  from omnitrain_jax.evaluation import options as options_lib
  enc = _encoded(b=2, n=6, seed=9)
  table = np.random.default_rng(9).normal(size=(20, 8)).astype(np.float32)
  outs = {}
  for limit, want_path in ((1 << 30, "union"), (0, "chunked")):
    opts = options_lib.EvalOptions(max_detections=17, nms_iou=nms,
                                   token_chunk=8, union_max_entries=limit,
                                   fixed_ap_per_image=4)
    path, consts, detect = det_evaluator.query_detector(
        _CHUNK_QUERIES, opts, num_boxes=6, fixed_ap=fixed_ap)
    assert path == want_path
    fn = jax.jit(lambda e, c, detect=detect: detect(e, _embed_jnp(table), c))
    outs[path] = {k: np.asarray(v) for k, v in fn(enc, consts).items()}
  union, chunked = outs["union"], outs["chunked"]
  assert set(union) == set(chunked)
  assert union["scores"].shape == (2, 17)
  np.testing.assert_allclose(chunked["scores"], union["scores"], rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_array_equal(chunked["labels"], union["labels"])
  np.testing.assert_allclose(chunked["boxes"], union["boxes"])
  if fixed_ap:
    np.testing.assert_allclose(chunked["fixed_scores"],
                               union["fixed_scores"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(chunked["fixed_boxes"], union["fixed_boxes"])


def test_fixed_ap_over_too_many_categories_is_refused():
  from omnitrain_jax.evaluation import det_evaluator
  from omnitrain_jax.evaluation import options as options_lib
  opts = options_lib.EvalOptions()  # max_dets_per_cat 10,000.
  det_evaluator._check_fixed_ap_fits("lvis", 1203, opts)  # Fits.
  with pytest.raises(ValueError, match="eval.fixed_ap=none"):
    det_evaluator._check_fixed_ap_fits("huge", 100_000, opts)
  with pytest.raises(ValueError, match="union_max_entries"):
    options_lib.EvalOptions(union_max_entries=-1)
