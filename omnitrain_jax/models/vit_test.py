"""Tests for vit.py and box_bias.py."""

import jax
import numpy as np
import pytest

from omnitrain_jax.models import box_bias
from omnitrain_jax.models import vit


def test_decode_variant():
  assert vit.decode_variant("B/16") == dict(
      width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16)
  assert vit.decode_variant("L/32")["depth"] == 24
  assert vit.decode_variant("Ti/16")["num_heads"] == 3
  assert vit.decode_variant("B/8")["patch_size"] == 8
  for bad in ("B", "B/12", "X/16", "B/16x"):
    with pytest.raises(ValueError, match="Unknown ViT variant"):
      vit.decode_variant(bad)


def test_grid_size():
  assert vit.grid_size(768, 16) == 48
  assert vit.grid_size(768, 32) == 24
  with pytest.raises(ValueError, match="multiple of the patch size 16"):
    vit.grid_size(770, 16)


def test_resize_posemb_keeps_cls_row_and_resizes_grid():
  rng = np.random.default_rng(0)
  grid = rng.normal(size=(1, 9, 5)).astype(np.float32)  # 3 x 3
  cls_row = rng.normal(size=(1, 1, 5)).astype(np.float32)
  with_cls = np.concatenate([cls_row, grid], axis=1)

  out = vit.resize_posemb(with_cls, 6)
  assert out.shape == (1, 37, 5) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, :1], cls_row)
  expected = jax.image.resize(grid.reshape(3, 3, 5), (6, 6, 5), "bilinear")
  np.testing.assert_allclose(out[0, 1:], np.reshape(expected, (36, 5)),
                             rtol=1e-6)
  # Without a CLS row (big_vision layout) the grid part is the same.
  np.testing.assert_allclose(vit.resize_posemb(grid, (6, 6)), out[:, 1:])
  # [L, D] input, identity size, constant grids stay constant.
  np.testing.assert_array_equal(vit.resize_posemb(grid[0], 3), grid[0])
  const = np.ones((1, 16, 2), np.float32)
  np.testing.assert_allclose(vit.resize_posemb(const, 7), 1.0, rtol=1e-6)
  # Non-square target grid.
  assert vit.resize_posemb(grid, (2, 5)).shape == (1, 10, 5)


def test_resize_posemb_errors():
  with pytest.raises(ValueError, match="Cannot infer"):
    vit.resize_posemb(np.zeros((1, 7, 4)), 4)
  with pytest.raises(ValueError, match="does not fit grid"):
    vit.resize_posemb(np.zeros((1, 12, 4)), 4, old_grid=(2, 2))
  np.testing.assert_array_equal(
      vit.resize_posemb(np.zeros((1, 12, 4)), (3, 4), old_grid=(3, 4)),
      np.zeros((1, 12, 4)))


def test_box_bias_is_patch_centre_and_size():
  bias = box_bias.box_bias(2, 4)
  assert bias.shape == (8, 4) and bias.dtype == np.float32
  boxes = 1 / (1 + np.exp(-bias))
  # Patch n = row * 4 + col.
  np.testing.assert_allclose(boxes[5], [1.5 / 4, 1.5 / 2, 0.25, 0.5],
                             rtol=1e-5)
  np.testing.assert_allclose(boxes[3], [3.5 / 4, 0.5 / 2, 0.25, 0.5],
                             rtol=1e-5)
