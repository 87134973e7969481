"""Tests for the device-side scoring functions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnitrain_jax.evaluation import inference
from omnitrain_jax.evaluation import queries
from omnitrain_jax.losses import scoring


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
  tokens, _ = scoring.build_query_tokens(token_lists)
  want = scoring.score_queries(enc["class_embeddings"], enc["logit_scale"],
                               enc["logit_shift"], table, tokens)
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
    want = scoring.score_queries(enc["class_embeddings"][b:b + 1],
                                 enc["logit_scale"][b:b + 1],
                                 enc["logit_shift"][b:b + 1], table, tokens,
                                 mask)[0]
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
  tokens, _ = scoring.build_query_tokens([[6]])
  want = scoring.score_queries(enc["class_embeddings"], enc["logit_scale"],
                               enc["logit_shift"], table, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5)
