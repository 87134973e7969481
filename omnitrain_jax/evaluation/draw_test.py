"""Tests for drawing."""

import numpy as np

from omnitrain_jax.evaluation import draw


def test_draws_boxes_in_the_query_color_and_keeps_the_size():
  image = np.zeros((40, 90), np.uint8)  # Grayscale in, RGB out.
  out = draw.draw_detections(image, [
      {"box_xyxy": [10, 12, 50, 35], "score": 0.9, "query": "red circle",
       "query_index": 1},
      {"box_xyxy": [-5, -5, 500, 500], "score": 0.2, "query": "x"}])
  assert out.size == (90, 40) and out.mode == "RGB"
  pixels = np.asarray(out)
  # The box's bottom edge is drawn in the palette color of query 1.
  assert tuple(pixels[35, 30]) == draw.PALETTE[1]
  assert draw.draw_detections(image, []).size == (90, 40)
