"""Box conversions and (generalized) IoU, safe on zero-size and padding boxes.

Boxes are ``cx, cy, w, h`` in [0, 1] (the DETR / OWL-ViT convention of the batch
schema) or ``x0, y0, x1, y1``. Every function works on arrays of any leading
shape; the `pairwise_*` variants take ``[..., N, 4]`` and ``[..., M, 4]`` and
return ``[..., N, M]``, the `elementwise_*` ones take two broadcastable
``[..., 4]`` arrays and return ``[...]``.

Padding boxes are all zeros, so unions and enclosing areas of zero occur in
every batch. Divisions use the "double where" form: the denominator is replaced
by 1 where it is 0 *before* dividing, and the quotient by 0 after, so neither the
value nor the gradient (which XLA computes for both `where` branches) is ever
NaN or inf. An ``eps`` added to the denominator would avoid the NaN too but
bias every IoU slightly; the double where is exact where the IoU is defined.
"""

from __future__ import annotations

import jax.numpy as jnp


def cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
  """``cx, cy, w, h`` -> ``x0, y0, x1, y1``; shape ``[..., 4]`` kept."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h],
                   axis=-1)


def xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
  """``x0, y0, x1, y1`` -> ``cx, cy, w, h``; shape ``[..., 4]`` kept."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([0.5 * (x0 + x1), 0.5 * (y0 + y1), x1 - x0, y1 - y0],
                   axis=-1)


def _safe_div(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  """num / den, 0 where den == 0, with finite gradients everywhere."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _area(xyxy: jnp.ndarray) -> jnp.ndarray:
  # Inverted (x1 < x0) boxes count as empty rather than negative area.
  wh = jnp.maximum(xyxy[..., 2:] - xyxy[..., :2], 0.0)
  return wh[..., 0] * wh[..., 1]


def _iou_terms(a: jnp.ndarray, b: jnp.ndarray):
  """(iou, union, enclosing area) of broadcastable xyxy boxes ``[..., 4]``."""
  lt = jnp.maximum(a[..., :2], b[..., :2])
  rb = jnp.minimum(a[..., 2:], b[..., 2:])
  inter_wh = jnp.maximum(rb - lt, 0.0)
  inter = inter_wh[..., 0] * inter_wh[..., 1]
  union = _area(a) + _area(b) - inter
  iou = _safe_div(inter, union)
  enc_lt = jnp.minimum(a[..., :2], b[..., :2])
  enc_rb = jnp.maximum(a[..., 2:], b[..., 2:])
  enc_wh = jnp.maximum(enc_rb - enc_lt, 0.0)
  enclosing = enc_wh[..., 0] * enc_wh[..., 1]
  return iou, union, enclosing


def elementwise_box_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """IoU of broadcastable xyxy boxes ``[..., 4]`` -> ``[...]``.

  Two empty boxes have IoU 0 (not NaN).
  """
  return _iou_terms(a, b)[0]


def elementwise_generalized_box_iou(a: jnp.ndarray,
                                    b: jnp.ndarray) -> jnp.ndarray:
  """Generalized IoU (Rezatofighi et al., 2019) of xyxy boxes -> ``[...]``.

  GIoU = IoU - (enclosing - union) / enclosing, in [-1, 1]. When the enclosing
  box is empty (both boxes degenerate at one point) the penalty is taken as 0,
  so GIoU = IoU = 0.

  Args:
    a: ``[..., 4]`` boxes ``x0, y0, x1, y1``.
    b: ``[..., 4]`` boxes, broadcastable against `a`.

  Returns:
    ``[...]`` GIoU values.
  """
  iou, union, enclosing = _iou_terms(a, b)
  return iou - _safe_div(enclosing - union, enclosing)


def pairwise_box_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """IoU of every pair: xyxy ``[..., N, 4]`` x ``[..., M, 4]`` -> ``[..., N, M]``."""
  return elementwise_box_iou(a[..., :, None, :], b[..., None, :, :])


def pairwise_generalized_box_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """GIoU of every pair: xyxy ``[..., N, 4]`` x ``[..., M, 4]`` -> ``[..., N, M]``."""
  return elementwise_generalized_box_iou(a[..., :, None, :], b[..., None, :, :])
