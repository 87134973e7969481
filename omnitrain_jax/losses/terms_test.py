"""Tests for the per-stream loss terms, each on its own, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnitrain_jax.losses import terms
from omnitrain_jax.losses import token_ops

B, N, M, Q = 2, 4, 3, 5


def _assign(pairs):
  """{(b, n, m)} -> float32 [B, N, M] 0/1 assignment."""
  a = np.zeros((B, N, M), np.float32)
  for b, n, m in pairs:
    a[b, n, m] = 1
  return jnp.asarray(a)


def _logits(seed=0):
  return 2 * np.random.default_rng(seed).normal(size=(B, N, Q)).astype(
      np.float32)


def _np_log_softmax(x, mask):
  x = np.where(mask, x, -np.inf)
  x = x - x.max(-1, keepdims=True)
  return np.where(mask, x - np.log(np.exp(x).sum(-1, keepdims=True)), 0.0)


def _np_softplus(v):
  return np.logaddexp(0.0, v)


def test_grd_softmax_mask():
  box_targets = np.zeros((B, M, Q), bool)
  box_targets[0, 0, [0, 1]] = box_targets[0, 1, [0, 2]] = True
  valid = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
  np.testing.assert_array_equal(
      terms.grd_softmax_mask(box_targets, valid, "phrases"),
      [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(
      terms.grd_softmax_mask(box_targets, valid, "candidates"), valid)
  with pytest.raises(ValueError, match="phrases"):
    terms.grd_softmax_mask(box_targets, valid, "tokens")


def test_box_losses_on_matched_pairs_only():
  rng = np.random.default_rng(1)
  pred = np.concatenate([rng.uniform(0.3, 0.7, (B, N, 2)),
                         rng.uniform(0.1, 0.3, (B, N, 2))], -1)
  tgt = np.concatenate([rng.uniform(0.3, 0.7, (B, M, 2)),
                        rng.uniform(0.1, 0.3, (B, M, 2))], -1)
  pred[0, 1] = tgt[0, 2]  # A perfect match costs nothing.
  pred, tgt = pred.astype(np.float32), tgt.astype(np.float32)
  assign = _assign([(0, 1, 2), (0, 3, 0), (1, 0, 1)])
  l1, giou = terms.box_losses(jnp.asarray(pred), assign, jnp.asarray(tgt))
  np.testing.assert_allclose(
      l1, [np.abs(pred[0, 3] - tgt[0, 0]).sum(),
           np.abs(pred[1, 0] - tgt[1, 1]).sum()], rtol=1e-6)
  assert giou[0] > 0 and giou[1] > 0
  # The unmatched predictions get no gradient.
  grad = jax.grad(lambda p: sum(terms.box_losses(p, assign, jnp.asarray(tgt))
                                ).sum())(jnp.asarray(pred))
  assert np.all(grad[0, [0, 2]] == 0) and np.all(grad[1, 1:] == 0)
  assert np.all(np.any(grad[0, [3]] != 0, -1))


def test_det_token_loss_weights_by_hand():
  logits = _logits(2)
  assign = _assign([(0, 0, 0), (1, 2, 1)])
  box_targets = np.zeros((B, M, Q), bool)
  box_targets[0, 0, [0, 1]] = True
  box_targets[1, 1, 3] = True
  valid = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
  known = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 1, 1]], bool)
  bg = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 1]], bool)
  a, g = 0.25, 2.0
  got = terms.det_token_loss(jnp.asarray(logits), assign, box_targets,
                             known, bg, valid, focal_alpha=a, focal_gamma=g)
  x = logits.astype(np.float64)
  p = 1 / (1 + np.exp(-x))
  pos_loss = -a * (1 - p)**g * np.log(p)
  neg_loss = -(1 - a) * p**g * np.log(1 - p)
  target = np.zeros((B, N, Q), bool)
  target[0, 0, [0, 1]] = target[1, 2, 3] = True
  matched = np.zeros((B, N), bool)
  matched[0, 0] = matched[1, 2] = True
  weight = np.where(matched[..., None], known[:, None] | target,
                    bg[:, None]) & valid[:, None]
  want = np.where(weight, np.where(target, pos_loss, neg_loss), 0).sum((1, 2))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _grd_case():
  logits = _logits(3)
  assign = _assign([(0, 1, 0), (0, 3, 1)])
  box_targets = np.zeros((B, M, Q), bool)
  box_targets[0, 0, [0, 1]] = box_targets[0, 1, [0, 2]] = True
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
  return logits, assign, box_targets, mask


def test_grd_token_loss_is_cross_entropy_of_matched_predictions():
  logits, assign, box_targets, mask = _grd_case()
  got = terms.grd_token_loss(jnp.asarray(logits), assign, box_targets, mask)
  logp = _np_log_softmax(logits.astype(np.float64), mask[:, None])
  want = -(0.5 * (logp[0, 1, 0] + logp[0, 1, 1]) +
           0.5 * (logp[0, 3, 0] + logp[0, 3, 2]))
  np.testing.assert_allclose(got, [want, 0.0], rtol=1e-5)
  # Unmatched predictions do not matter.
  grad = jax.grad(lambda l: terms.grd_token_loss(
      l, assign, box_targets, mask).sum())(jnp.asarray(logits))
  assert np.all(grad[0, [0, 2]] == 0) and np.all(grad[1] == 0)


def test_grd_per_positive_loss_by_hand():
  logits, assign, box_targets, mask = _grd_case()
  got = terms.grd_token_loss(jnp.asarray(logits), assign, box_targets, mask,
                             form="per_positive")
  x = logits.astype(np.float64)

  def one(n, pos):  # mean over positives of -log(e^s_t / (e^s_t + negs))
    neg = [q for q in range(Q) if mask[0, q] and q not in pos]
    negs = np.exp(x[0, n, neg]).sum()
    return np.mean([-np.log(np.exp(x[0, n, t]) / (np.exp(x[0, n, t]) + negs))
                    for t in pos])

  np.testing.assert_allclose(got, [one(1, [0, 1]) + one(3, [0, 2]), 0.0],
                             rtol=1e-5)


def test_grd_focal_loss_is_det_focal_on_matched_predictions_only():
  logits, assign, box_targets, mask = _grd_case()
  got = terms.grd_token_loss(jnp.asarray(logits), assign, box_targets, mask,
                             form="focal", focal_alpha=0.3, focal_gamma=1.5)
  target = np.zeros((B, N, Q), np.float32)
  target[0, 1, [0, 1]] = target[0, 3, [0, 2]] = 1
  focal = np.asarray(token_ops.sigmoid_focal(jnp.asarray(logits),
                                             jnp.asarray(target), 0.3, 1.5))
  want = focal[0, 1][mask[0]].sum() + focal[0, 3][mask[0]].sum()
  np.testing.assert_allclose(got, [want, 0.0], rtol=1e-5)


def test_grd_softmax_pushes_a_strong_positive_down_per_positive_does_not():
  """The reason for "per_positive": under the uniform-target softmax a
  phrase token the detector already scores high is pushed down towards the
  phrase's weakest token; each-positive-vs-negatives pushes every positive
  up."""
  logits = np.zeros((B, N, Q), np.float32)
  logits[0, 0] = [6.0, -2.0, 0.0, 0.0, 0.0]  # `red` strong, `left` weak.
  assign = _assign([(0, 0, 0)])
  box_targets = np.zeros((B, M, Q), bool)
  box_targets[0, 0, [0, 1]] = True
  mask = np.ones((B, Q), bool)
  grads = {}
  for form in terms.GRD_TOKEN_LOSSES:
    grads[form] = np.asarray(jax.grad(lambda l, f=form: terms.grd_token_loss(
        l, assign, box_targets, mask, form=f).sum())(jnp.asarray(logits)))
  assert grads["softmax"][0, 0, 0] > 0  # descent lowers the strong positive
  for form in ("per_positive", "focal"):
    assert np.all(grads[form][0, 0, [0, 1]] < 0), form  # both go up
    assert np.all(grads[form][0, 0, 2:] > 0), form  # negatives go down
  for form in terms.GRD_TOKEN_LOSSES:  # unmatched predictions: nothing
    assert np.all(grads[form][0, 1:] == 0) and np.all(grads[form][1] == 0)


@pytest.mark.parametrize("form", terms.GRD_TOKEN_LOSSES)
def test_grd_token_loss_is_invariant_to_candidate_order(form):
  logits, assign, box_targets, mask = _grd_case()
  perm = np.array([3, 0, 4, 2, 1])
  a = terms.grd_token_loss(jnp.asarray(logits), assign, box_targets, mask,
                           form=form)
  b = terms.grd_token_loss(jnp.asarray(logits[..., perm]), assign,
                           box_targets[..., perm], mask[:, perm], form=form)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_grd_per_positive_without_negatives_is_zero_and_finite():
  logits, assign, box_targets, _ = _grd_case()
  mask = np.zeros((B, Q), bool)
  mask[0, :3] = True  # only the positives of both matched boxes compete
  box_targets[0, 0, 2] = box_targets[0, 1, 1] = True  # each box: 0, 1, 2
  fn = lambda l: terms.grd_token_loss(l, assign, box_targets, mask,
                                      form="per_positive").sum()
  value, grad = jax.value_and_grad(fn)(jnp.asarray(logits))
  assert value == 0.0 and np.all(np.isfinite(grad)) and np.all(grad == 0)


def test_grd_token_loss_rejects_unknown_form():
  logits, assign, box_targets, mask = _grd_case()
  with pytest.raises(ValueError, match="per_positive"):
    terms.grd_token_loss(jnp.asarray(logits), assign, box_targets, mask,
                         form="sigmoid")


def test_img_image_loss_equals_numpy_cross_entropy():
  image_logits = _logits(4)[:, 0]  # [B, Q]
  caption = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
  valid = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
  got = terms.img_image_loss(jnp.asarray(image_logits), caption, valid)
  logp = _np_log_softmax(image_logits.astype(np.float64), valid)
  np.testing.assert_allclose(got, [-(logp[0, 0] + logp[0, 2]) / 2, 0.0],
                             rtol=1e-5)


@pytest.mark.parametrize("pool", ["logsumexp", "max", "none"])
def test_img_region_loss_by_hand(pool):
  logits = _logits(5)
  caption = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]], bool)
  valid = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
  has_cap = np.array([True, False])  # Example 1: not an img example.
  tau, w = 0.5, 0.3
  got = terms.img_region_loss(jnp.asarray(logits), caption, has_cap, valid,
                              pool=pool, temperature=tau, neg_weight=w)
  s = logits[0].astype(np.float64)  # [N, Q]
  if pool == "none":
    assert got == 0
    return
  if pool == "max":
    pooled = s.max(0)
  else:
    pooled = tau * np.log(np.exp(s / tau).sum(0))
  want = (_np_softplus(-pooled[[0, 2]]).mean() +
          w * _np_softplus(pooled[[1, 3]]).mean())
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_img_region_loss_rejects_unknown_pool():
  with pytest.raises(ValueError, match="logsumexp"):
    terms.img_region_loss(jnp.zeros((B, N, Q)), np.zeros((B, Q), bool),
                          np.zeros(B, bool), np.ones((B, Q), bool),
                          pool="mean", temperature=1.0, neg_weight=1.0)


def test_img_phrase_loss_by_hand():
  logits = _logits(3)
  assign = np.zeros((B, N, 2), np.float32)  # K = 2 instances.
  assign[0, 1, 0] = assign[0, 3, 1] = 1
  inst = np.zeros((B, 2, Q), bool)
  inst[0, 0, [0, 1]] = True  # Instance 0: tokens 0, 1.
  inst[0, 1, [2]] = True  # Instance 1: token 2.
  cap = np.zeros((B, Q), bool)
  cap[0, [0, 1, 2, 3]] = True  # Token 3: in the caption, in no instance.
  cap[1, [0]] = True
  valid = np.ones((B, Q), bool)
  valid[0, 3] = False  # A pad candidate takes no part.
  got = terms.img_phrase_loss(jnp.asarray(logits), jnp.asarray(assign),
                              jnp.asarray(inst), jnp.asarray(cap),
                              jnp.asarray(valid), focal_alpha=0.25,
                              focal_gamma=2.0)

  def focal(x, t):
    return float(token_ops.sigmoid_focal(jnp.float32(x), jnp.float32(t),
                                         0.25, 2.0))
  want0 = (focal(logits[0, 1, 0], 1) + focal(logits[0, 1, 1], 1) +
           focal(logits[0, 1, 2], 0) + focal(logits[0, 3, 2], 1) +
           focal(logits[0, 3, 0], 0) + focal(logits[0, 3, 1], 0))
  np.testing.assert_allclose(got, [want0, 0.0], rtol=1e-5)


def test_img_unmatched_loss_by_hand():
  logits = _logits(4)
  assign = np.zeros((B, N, 2), np.float32)
  assign[0, 1, 0] = assign[1, 2, 1] = 1
  cap = np.zeros((B, Q), bool)
  cap[0, [0, 2, 3]] = True
  cap[1, [1]] = True
  valid = np.ones((B, Q), bool)
  valid[0, 3] = False  # A pad candidate takes no part.

  def loss(explained):
    return terms.img_unmatched_loss(
        jnp.asarray(logits), jnp.asarray(assign), jnp.asarray(cap),
        jnp.asarray(explained), jnp.asarray(valid), focal_alpha=0.25,
        focal_gamma=2.0)

  def focal0(x):
    return float(token_ops.sigmoid_focal(jnp.float32(x), jnp.float32(0),
                                         0.25, 2.0))
  # Example 0: predictions 0, 2, 3 (1 is matched) on caption tokens 0, 2.
  want0 = sum(focal0(logits[0, n, q]) for n in (0, 2, 3) for q in (0, 2))
  np.testing.assert_allclose(loss([True, False]), [want0, 0.0], rtol=1e-5)
  want1 = sum(focal0(logits[1, n, 1]) for n in (0, 1, 3))
  np.testing.assert_allclose(loss([True, True]), [want0, want1], rtol=1e-5)
  # Invariant to the order of the predictions.
  perm = np.array([2, 0, 3, 1])
  got = terms.img_unmatched_loss(
      jnp.asarray(logits[:, perm]), jnp.asarray(assign[:, perm]),
      jnp.asarray(cap), jnp.asarray([True, True]), jnp.asarray(valid),
      focal_alpha=0.25, focal_gamma=2.0)
  np.testing.assert_allclose(got, [want0, want1], rtol=1e-5)
