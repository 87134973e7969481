"""Tests for box_ops."""

import jax
import jax.numpy as jnp
import numpy as np

from omnitrain_jax.losses import box_ops


def _np_giou(a, b):
  """Reference IoU/GIoU of one pair of xyxy boxes, written independently."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  area_a = (a[2] - a[0]) * (a[3] - a[1])
  area_b = (b[2] - b[0]) * (b[3] - b[1])
  union = area_a + area_b - inter
  enc = ((max(a[2], b[2]) - min(a[0], b[0])) *
         (max(a[3], b[3]) - min(a[1], b[1])))
  iou = inter / union
  return iou, iou - (enc - union) / enc


def _random_xyxy(rng, shape):
  cxcy = rng.uniform(0.1, 0.9, shape + (2,))
  wh = rng.uniform(0.05, 0.5, shape + (2,))
  return np.concatenate([cxcy - wh / 2, cxcy + wh / 2], -1).astype(np.float32)


def test_conversions_round_trip():
  rng = np.random.default_rng(0)
  cxcywh = rng.uniform(0, 1, (3, 5, 4)).astype(np.float32)
  xyxy = box_ops.cxcywh_to_xyxy(cxcywh)
  np.testing.assert_allclose(xyxy[..., 2] - xyxy[..., 0], cxcywh[..., 2],
                             atol=1e-6)
  np.testing.assert_allclose(box_ops.xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-6)
  np.testing.assert_allclose(
      box_ops.cxcywh_to_xyxy(np.array([0.5, 0.5, 0.2, 0.4])),
      [0.4, 0.3, 0.6, 0.7], atol=1e-6)


def test_pairwise_matches_reference():
  rng = np.random.default_rng(1)
  a = _random_xyxy(rng, (2, 4))
  b = _random_xyxy(rng, (2, 3))
  iou = np.asarray(box_ops.pairwise_box_iou(a, b))
  giou = np.asarray(box_ops.pairwise_generalized_box_iou(a, b))
  assert iou.shape == giou.shape == (2, 4, 3)
  for i in range(2):
    for n in range(4):
      for m in range(3):
        ref_iou, ref_giou = _np_giou(a[i, n], b[i, m])
        np.testing.assert_allclose(iou[i, n, m], ref_iou, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(giou[i, n, m], ref_giou, rtol=1e-5,
                                   atol=1e-6)


def test_identical_and_disjoint_boxes():
  a = jnp.array([[0.1, 0.1, 0.3, 0.3]])
  far = jnp.array([[0.7, 0.7, 0.9, 0.9]])
  assert np.isclose(box_ops.elementwise_generalized_box_iou(a, a)[0], 1.0)
  # Disjoint: IoU 0, GIoU = -(enc - union) / enc = -(0.64 - 0.08) / 0.64.
  assert box_ops.elementwise_box_iou(a, far)[0] == 0.0
  np.testing.assert_allclose(
      box_ops.elementwise_generalized_box_iou(a, far)[0], -0.56 / 0.64,
      rtol=1e-5)


def test_zero_size_and_padding_boxes_are_finite_with_finite_grads():
  zero = jnp.zeros((4,))
  point = jnp.array([0.5, 0.5, 0.5, 0.5])
  line = jnp.array([0.2, 0.5, 0.6, 0.5])
  real = jnp.array([0.2, 0.2, 0.6, 0.6])
  pairs = [(zero, zero), (point, point), (zero, real), (line, line),
           (point, zero), (real, line)]

  def f(a, b):
    return (box_ops.elementwise_generalized_box_iou(a, b) +
            box_ops.elementwise_box_iou(a, b))

  for a, b in pairs:
    value = f(a, b)
    ga, gb = jax.grad(f, argnums=(0, 1))(a, b)
    assert np.isfinite(value), (a, b)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb)), (a, b, ga, gb)
  # Two empty boxes have IoU and GIoU 0, not NaN and not 1.
  assert f(zero, zero) == 0.0


def test_pairwise_with_cxcywh_padding_rows_is_finite():
  boxes = jnp.array([[[0.5, 0.5, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]]])  # [1, 2, 4]

  def total(b):
    xyxy = box_ops.cxcywh_to_xyxy(b)
    return box_ops.pairwise_generalized_box_iou(xyxy, xyxy).sum()

  value, grad = jax.value_and_grad(total)(boxes)
  assert np.isfinite(value)
  assert np.all(np.isfinite(grad))
