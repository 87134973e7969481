"""Tests for the token-set operations shared by the matching cost and the loss."""

import jax
import jax.numpy as jnp
import numpy as np

from omnitrain_jax.losses import token_ops


def test_candidate_targets():
  cands = jnp.array([[5, 6, 7, 0], [7, 0, 0, 0]])
  box_tokens = jnp.array([[[5, 7], [0, 0]], [[7, 8], [6, 0]]])  # [2, 2, 2]
  got = token_ops.candidate_targets(box_tokens, cands)
  np.testing.assert_array_equal(
      got, [[[1, 0, 1, 0], [0, 0, 0, 0]], [[1, 0, 0, 0], [0, 0, 0, 0]]])
  caption = jnp.array([[6, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(
      token_ops.candidate_targets(caption, cands),
      [[0, 1, 0, 0], [0, 0, 0, 0]])


def test_uniform_over_rows_and_empty_rows():
  got = token_ops.uniform_over(jnp.array([[1, 0, 1, 1], [0, 0, 0, 0]], bool))
  np.testing.assert_allclose(got, [[1 / 3, 0, 1 / 3, 1 / 3], [0, 0, 0, 0]])
  assert got.dtype == jnp.float32


def test_masked_log_softmax_ignores_masked_entries():
  logits = jnp.array([[1.0, 2.0, 1e30, 0.5], [3.0, -jnp.inf, 1.0, 2.0]])
  mask = jnp.array([[1, 1, 0, 1], [0, 0, 0, 0]], bool)  # Row 1 fully masked.
  got = token_ops.masked_log_softmax(logits, mask)
  x = np.array([1.0, 2.0, 0.5])
  np.testing.assert_allclose(got[0, [0, 1, 3]], x - np.log(np.exp(x).sum()),
                             rtol=1e-6)
  assert got[0, 2] == 0 and np.all(got[1] == 0)
  # Neither a huge nor an infinite masked logit reaches the gradient.
  grad = jax.grad(lambda l: token_ops.masked_log_softmax(l, mask).sum())(logits)
  assert np.all(np.isfinite(grad))
  assert grad[0, 2] == 0 and np.all(grad[1] == 0)


def _np_focal(x, t, a, g):
  p = 1 / (1 + np.exp(-x))
  pos = -a * (1 - p)**g * np.log(p)
  neg = -(1 - a) * p**g * np.log(1 - p)
  return np.where(t > 0, pos, neg)


def test_sigmoid_focal_equals_numpy():
  x = np.linspace(-6, 6, 13)
  for t in (0.0, 1.0):
    for a, g in ((0.25, 2.0), (0.3, 0.0)):
      got = token_ops.sigmoid_focal(jnp.asarray(x, jnp.float32),
                                    jnp.full(x.shape, t), a, g)
      np.testing.assert_allclose(got, _np_focal(x, np.full(x.shape, t), a, g),
                                 rtol=1e-5, atol=1e-7)


def test_focal_cost_is_positive_minus_negative_focal_loss():
  x = jnp.linspace(-6.0, 6.0, 13)
  a, g = 0.25, 2.0
  want = (token_ops.sigmoid_focal(x, jnp.ones_like(x), a, g) -
          token_ops.sigmoid_focal(x, jnp.zeros_like(x), a, g))
  np.testing.assert_allclose(token_ops.focal_cost(x, a, g), want, rtol=1e-5,
                             atol=1e-7)
  # Cheaper to call a confident token positive than an unconfident one.
  cost = np.asarray(token_ops.focal_cost(x, a, g))
  assert np.all(np.diff(cost) < 0)


def test_batch_token_set_against_numpy():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 12, (3, 4, 2))  # [B, M, T], 0 = pad
  keep = rng.random((3, 4)) < 0.5
  cands = rng.integers(0, 12, (3, 6))
  cands[:, -1] = 0  # Padding candidates are never in the set.
  want = np.zeros((3, 6), bool)
  kept = set(tokens[keep].ravel().tolist()) - {0}
  for b in range(3):
    for q in range(6):
      want[b, q] = cands[b, q] in kept
  got = token_ops.batch_token_set(jnp.asarray(tokens), jnp.asarray(keep),
                                  jnp.asarray(cands))
  np.testing.assert_array_equal(got, want)
  # Nothing kept: nothing (not even pad 0) is in the set.
  none = token_ops.batch_token_set(jnp.asarray(tokens),
                                   jnp.zeros((3, 4), bool), jnp.asarray(cands))
  assert not np.any(none)
