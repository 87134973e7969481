"""Tests for box conversion and COCO results."""

import numpy as np

from omnitrain_jax.evaluation import detections


def test_canvas_to_original_inverts_resize_pad():
  # A 200 x 100 (w x h) image on a 64 canvas: scale 0.32, content 64 x 32.
  s, scale = 64, 64 / 200
  box = np.array([20.0, 10.0, 120.0, 60.0])  # xyxy in original pixels
  canvas = box * scale / s
  cxcywh = np.array([(canvas[0] + canvas[2]) / 2, (canvas[1] + canvas[3]) / 2,
                     canvas[2] - canvas[0], canvas[3] - canvas[1]])
  out = detections.canvas_to_original_xyxy(cxcywh[None, None], s,
                                           np.array([scale]),
                                           np.array([[100, 200]]))
  np.testing.assert_allclose(out[0, 0], box, rtol=1e-5)


def test_boxes_are_clipped_to_the_original_image():
  # A box over the padding (bottom half of the canvas is padding).
  out = detections.canvas_to_original_xyxy(
      np.array([[[0.5, 0.75, 1.2, 0.5]]]), 64, np.array([0.32]),
      np.array([[100, 200]]))
  x0, y0, x1, y1 = out[0, 0]
  assert (x0, x1, y1) == (0.0, 200.0, 100.0) and 0 <= y0 <= 100


def test_xywh_roundtrip():
  b = np.array([[1.0, 2.0, 11.0, 22.0]])
  np.testing.assert_allclose(detections.xyxy_to_xywh(b), [[1, 2, 10, 20]])
  np.testing.assert_allclose(
      detections.xywh_to_xyxy(detections.xyxy_to_xywh(b)), b)


def test_coco_results_skip_padding_and_map_labels():
  res = detections.coco_results(
      image_ids=np.array([7, -1]), scores=np.array([[0.9, 0.1234567],
                                                    [0.5, 0.4]]),
      labels=np.array([[1, 0], [0, 0]]),
      boxes_xyxy=np.array([[[0, 0, 10, 20], [1, 1, 2, 2]]] * 2, np.float32),
      category_ids=[3, 9])
  assert res == [
      {"image_id": 7, "category_id": 9, "bbox": [0.0, 0.0, 10.0, 20.0],
       "score": 0.9},
      {"image_id": 7, "category_id": 3, "bbox": [1.0, 1.0, 1.0, 1.0],
       "score": 0.12346}]
