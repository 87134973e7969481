"""Tests for drawing."""

import numpy as np

from omnitrain_jax.evaluation import draw


def test_draws_boxes_in_the_query_color_and_keeps_the_size():
  image = np.zeros((40, 90), np.uint8)  # Grayscale in, RGB out.
  out = draw.draw_detections(image, [
      {"box_xyxy": [10, 12, 50, 35], "score": 0.9, "query": "red circle",
       "query_index": 1},
      {"box_xyxy": [-5, -5, 500, 500], "score": 0.2, "query": "x"}],
      min_side=0)
  assert out.size == (90, 40) and out.mode == "RGB"
  pixels = np.asarray(out)
  # The box's bottom edge is drawn in the palette color of query 1.
  assert tuple(pixels[35, 30]) == draw.PALETTE[1]
  assert draw.draw_detections(image, [], min_side=0).size == (90, 40)


def test_small_images_are_enlarged_with_their_boxes():
  image = np.full((64, 48, 3), 200, np.uint8)
  image[10, 20] = (1, 2, 3)
  out = draw.draw_detections(image, [
      {"box_xyxy": [8, 16, 40, 50], "score": 0.9, "query": "star",
       "query_index": 2}], min_side=512)
  # ceil(512 / 64) = 8: every pixel becomes an 8 x 8 block.
  assert out.size == (48 * 8, 64 * 8)
  pixels = np.asarray(out)
  assert tuple(pixels[10 * 8 + 3, 20 * 8 + 3]) == (1, 2, 3)
  # The box's bottom edge, scaled: y = 50 * 8.
  assert tuple(pixels[50 * 8, 30 * 8]) == draw.PALETTE[2]
  # Large images keep their size.
  assert draw.draw_detections(np.zeros((600, 700), np.uint8), []).size == (
      700, 600)
