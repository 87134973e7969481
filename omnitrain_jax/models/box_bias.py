"""The per-patch box prior added to the box head's output (as OWL-ViT).

Every output patch token predicts one box. Adding, before the sigmoid, the
inverse-sigmoid of the patch's own centre and of a one-patch size makes the
head predict an *offset* from the patch, so a freshly initialised head already
tiles the image with one small box per patch, and predictions stay tied to
their patch (which the matcher and the region losses rely on).

Unlike scenic's OWL-ViT, whose prior uses the bottom-right corner of each patch
(``arange(1, n + 1) / n``), this uses the true centre ``(j + 0.5) / n``.
"""

from __future__ import annotations

import numpy as np


def inverse_sigmoid(x: np.ndarray, eps: float = 1e-4) -> np.ndarray:
  """logit(x), with x clipped to [eps, 1 - eps] so it stays finite."""
  x = np.clip(x, eps, 1.0 - eps)
  return np.log(x) - np.log1p(-x)


def box_bias(grid_h: int, grid_w: int | None = None) -> np.ndarray:
  """Inverse-sigmoid box prior for a ``grid_h x grid_w`` patch grid.

  Args:
    grid_h: patch rows.
    grid_w: patch columns (default: `grid_h`).

  Returns:
    float32 ``[grid_h * grid_w, 4]``: logit of ``(cx, cy, w, h)`` in [0, 1]
    canvas coordinates, patches in row-major order (patch ``n = i * grid_w +
    j`` lies in row i, column j, as the ViT's flattened patch tokens).
  """
  grid_w = grid_h if grid_w is None else grid_w
  if grid_h <= 0 or grid_w <= 0:
    raise ValueError(f"grid must be positive; got {grid_h} x {grid_w}.")
  cy, cx = np.meshgrid((np.arange(grid_h) + 0.5) / grid_h,
                       (np.arange(grid_w) + 0.5) / grid_w, indexing="ij")
  centre = np.stack([cx.ravel(), cy.ravel()], axis=-1)  # [N, 2]
  size = np.broadcast_to([1.0 / grid_w, 1.0 / grid_h], centre.shape)
  boxes = np.concatenate([centre, size], axis=-1)  # [N, 4]
  return inverse_sigmoid(boxes).astype(np.float32)
