"""Tests for the matching cost, on its own and against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from omnitrain_jax.data import schema
from omnitrain_jax.losses import matching_cost
from omnitrain_jax.losses import token_ops

DET, GRD, IMG = (schema.STREAM_IDS[s] for s in ("det", "grd", "img"))
WEIGHTS = dict(cost_class=2.0, grd_cost_class=1.0, cost_l1=5.0, cost_giou=2.0,
               focal_alpha=0.25, focal_gamma=2.0)


def _inputs(seed=0, b=3, n=5, m=3, q=6):
  rng = np.random.default_rng(seed)
  cxcy = rng.uniform(0.2, 0.8, (b, n + m, 2))
  wh = rng.uniform(0.05, 0.4, (b, n + m, 2))
  boxes = np.concatenate([cxcy, wh], -1).astype(np.float32)
  tgt_mask = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]][:b], bool)
  targets = rng.random((b, m, q)) < 0.4
  targets[:, :, 0] = True  # Every box has a token.
  targets &= tgt_mask[..., None]
  return dict(
      tgt_dist=token_ops.uniform_over(targets),
      pred_logits=jnp.asarray(2 * rng.normal(size=(b, n, q)), jnp.float32),
      tgt_boxes=jnp.asarray(boxes[:, n:] * tgt_mask[..., None]),
      pred_boxes=jnp.asarray(boxes[:, :n]), tgt_mask=jnp.asarray(tgt_mask),
      stream=jnp.array([DET, GRD, IMG][:b], jnp.int32),
      grd_softmax_mask=jnp.ones((b, q), bool))


def _xyxy(b):
  return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2],
                        -1)


def _np_giou(p, t):
  """Pairwise GIoU of xyxy boxes, p [N, 4], t [M, 4] (positive areas)."""
  p, t = p[:, None], t[None]
  lt, rb = np.maximum(p[..., :2], t[..., :2]), np.minimum(p[..., 2:], t[..., 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  area = lambda x: np.prod(x[..., 2:] - x[..., :2], -1)
  union = area(p) + area(t) - inter
  hull = np.prod(np.maximum(p[..., 2:], t[..., 2:]) -
                 np.minimum(p[..., :2], t[..., :2]), -1)
  return inter / union - (hull - union) / hull


def test_box_cost_equals_numpy():
  x = _inputs()
  got = matching_cost.box_cost(x["pred_boxes"], x["tgt_boxes"], cost_l1=5.0,
                               cost_giou=2.0)
  p, t = np.asarray(x["pred_boxes"], np.float64), np.asarray(x["tgt_boxes"])
  for b in range(2):  # Examples with real targets.
    k = int(x["tgt_mask"][b].sum())
    l1 = np.abs(p[b][:, None] - t[b, :k][None]).sum(-1)
    want = 5 * l1 - 2 * _np_giou(_xyxy(p[b]), _xyxy(t[b, :k]))
    np.testing.assert_allclose(got[b, :, :k], want, rtol=1e-5, atol=1e-6)


def test_det_class_cost_is_mean_focal_cost_over_box_tokens():
  x = _inputs()
  got = matching_cost.det_class_cost(x["pred_logits"], x["tgt_dist"],
                                     focal_alpha=0.25, focal_gamma=2.0)
  per_token = np.asarray(token_ops.focal_cost(x["pred_logits"], 0.25, 2.0))
  dist = np.asarray(x["tgt_dist"])
  for b, j in ((0, 0), (0, 1), (1, 2)):
    tokens = dist[b, j] > 0
    np.testing.assert_allclose(got[b, :, j], per_token[b][:, tokens].mean(-1),
                               rtol=1e-5)


def test_grd_class_cost_is_token_cross_entropy_over_the_softmax_mask():
  x = _inputs()
  mask = np.ones((3, 6), bool)
  mask[1, 4:] = False  # Two candidates outside the grounding softmax.
  got = matching_cost.grd_class_cost(x["pred_logits"], x["tgt_dist"],
                                     jnp.asarray(mask))
  logits = np.asarray(x["pred_logits"], np.float64)[1][:, :4]  # [N, 4]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  dist = np.asarray(x["tgt_dist"])[1][:, :4]  # [M, 4]
  np.testing.assert_allclose(got[1], -(logp @ dist.T), rtol=1e-5)


def test_compute_cost_picks_the_stream_cost_and_zeroes_padding():
  x = _inputs()
  cost, num_cols = matching_cost.compute_cost(**x, **WEIGHTS)
  assert cost.shape == (3, 5, 3)
  np.testing.assert_array_equal(num_cols, [2, 3, 0])  # img: nothing to match.
  assert num_cols.dtype == jnp.int32
  boxes = matching_cost.box_cost(x["pred_boxes"], x["tgt_boxes"], cost_l1=5.0,
                                 cost_giou=2.0)
  det = matching_cost.det_class_cost(x["pred_logits"], x["tgt_dist"],
                                     focal_alpha=0.25, focal_gamma=2.0)
  grd = matching_cost.grd_class_cost(x["pred_logits"], x["tgt_dist"],
                                     x["grd_softmax_mask"])
  np.testing.assert_allclose(cost[0, :, :2], 2 * det[0, :, :2] +
                             boxes[0, :, :2], rtol=1e-6)
  np.testing.assert_allclose(cost[1], grd[1] + boxes[1], rtol=1e-6)
  assert np.all(cost[0, :, 2] == 0) and np.all(cost[2] == 0)
  # The "per_positive" grd loss keeps the cross-entropy cost; "focal" gets
  # the det focal cost (times grd_cost_class, here 1); det rows unchanged.
  per_pos, _ = matching_cost.compute_cost(**x, **WEIGHTS,
                                          grd_form="per_positive")
  np.testing.assert_array_equal(per_pos, cost)
  focal, _ = matching_cost.compute_cost(**x, **WEIGHTS, grd_form="focal")
  np.testing.assert_allclose(focal[1], det[1] + boxes[1], rtol=1e-6)
  np.testing.assert_array_equal(focal[0], cost[0])


def test_compute_cost_prefers_the_right_box_and_tokens():
  x = _inputs()
  # Prediction j sits on target j and is confident on its tokens only.
  tgt = np.asarray(x["tgt_boxes"])
  pred = np.asarray(x["pred_boxes"]).copy()
  pred[:, 2:5] = tgt
  dist = np.asarray(x["tgt_dist"])
  logits = np.full((3, 5, 6), -4.0, np.float32)
  logits[:, 2:5] = np.where(dist > 0, 4.0, -4.0)
  x.update(pred_boxes=jnp.asarray(pred), pred_logits=jnp.asarray(logits))
  cost, num_cols = matching_cost.compute_cost(**x, **WEIGHTS)
  for b in range(2):
    k = int(num_cols[b])
    rows, cols = scipy.optimize.linear_sum_assignment(np.asarray(cost[b, :, :k]))
    np.testing.assert_array_equal(rows[np.argsort(cols)], 2 + np.arange(k))


def test_compute_cost_is_not_differentiated():
  x = _inputs()

  def total(pred_logits, pred_boxes):
    cost, _ = matching_cost.compute_cost(
        **dict(x, pred_logits=pred_logits, pred_boxes=pred_boxes), **WEIGHTS)
    return cost.sum()

  grads = jax.grad(total, argnums=(0, 1))(x["pred_logits"], x["pred_boxes"])
  assert all(np.all(g == 0) for g in grads)


def test_phrase_instances_lay_out_counts_phrase_by_phrase():
  ok = jnp.array([[True, False, True, True], [False] * 4])
  counts = jnp.array([[2, 5, 1, 3], [1, 1, 0, 0]])
  index, num = matching_cost.phrase_instances(ok, counts, 5)
  np.testing.assert_array_equal(num, [5, 0])  # 2 + 1 + 3 capped at 5.
  np.testing.assert_array_equal(index[0], [0, 0, 2, 3, 3])
  assert np.all((np.asarray(index) >= 0) & (np.asarray(index) < 4))


def test_phrase_cost_by_hand():
  logits = np.array([[[2.0, -1.0, 0.5], [-3.0, 1.0, 3.0]]], np.float32)
  p = 1 / (1 + np.exp(-logits))  # [1, N=2, Q=3]
  trusted = np.array([[[1, 1, 0]]], bool)  # [1, K=1, Q]: tokens 0 and 1.
  conflict = np.array([[[0, 0, 1]]], bool)  # token 2.
  want_prob = np.sqrt(p[0, :, 0] * p[0, :, 1])
  for form, want in (("sum", -want_prob + 0.5 * p[0, :, 2]),
                     ("product", -want_prob * (1 - p[0, :, 2])**0.5)):
    cost, prob = matching_cost.phrase_cost(
        jnp.asarray(logits), jnp.asarray(trusted), jnp.asarray(conflict),
        conflict_weight=0.5, form=form)
    np.testing.assert_allclose(prob[0, :, 0], want_prob, rtol=1e-5)
    np.testing.assert_allclose(cost[0, :, 0], want, rtol=1e-5, err_msg=form)
  # Not differentiated.
  g = jax.grad(lambda x: matching_cost.phrase_cost(
      x, jnp.asarray(trusted), jnp.asarray(conflict),
      conflict_weight=0.5)[0].sum())(jnp.asarray(logits))
  assert not np.any(g)
