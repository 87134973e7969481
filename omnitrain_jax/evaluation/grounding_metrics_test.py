"""Tests for the grounding metrics."""

import numpy as np
import pytest

from omnitrain_jax.evaluation import grounding_metrics as grounding


def test_box_iou_known_values():
  a = np.array([[0, 0, 10, 10]], np.float32)
  b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30],
                [0, 0, 0, 0]], np.float32)
  np.testing.assert_allclose(grounding.box_iou(a, b)[0],
                             [1.0, 50 / 150, 0.0, 0.0])


def test_perfect_predictions_score_one():
  acc = grounding.GroundingAccumulator((1, 5, 10))
  gts = [np.array([[10, 10, 50, 40]]), np.array([[0, 0, 5, 5], [60, 60, 90,
                                                                  80]])]
  for gt in gts:
    acc.add(gt[:1], gt)
  assert grounding.refexp_metrics(acc)["acc@0.5"] == 1.0
  assert grounding.flickr_metrics(acc) == {"R@1": 1.0, "R@5": 1.0,
                                           "R@10": 1.0, "num_phrases": 2.0}


def test_box_shifted_to_iou_0_4_is_a_miss_and_0_6_a_hit():
  gt = np.array([[0, 0, 100, 100]], np.float32)
  # Shift by s along x: IoU = (100 - s) / (100 + s); 0.4 at s = 300 / 7.
  s = 300 / 7
  shifted = gt + np.array([s, 0, s, 0], np.float32)
  assert grounding.box_iou(shifted, gt)[0, 0] == pytest.approx(0.4, abs=1e-5)
  acc = grounding.GroundingAccumulator((1,))
  acc.add(shifted, gt)
  assert grounding.refexp_metrics(acc)["acc@0.5"] == 0.0
  s = 25.0  # IoU 0.6.
  acc.add(gt + np.array([s, 0, s, 0], np.float32), gt)
  assert grounding.refexp_metrics(acc)["acc@0.5"] == 0.5


def test_recall_at_k_any_box_protocol():
  gts = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
  wrong = np.array([200, 200, 210, 210], np.float32)
  # The second ground-truth box is found at rank 3 (0-based 2).
  ranked = np.stack([wrong, wrong, gts[1], wrong, wrong, wrong])
  assert grounding.phrase_hits(ranked, gts, (1, 2, 3, 5)) == {
      1: False, 2: False, 3: True, 5: True}
  acc = grounding.GroundingAccumulator((1, 5, 10))
  acc.add(ranked, gts)
  acc.add(np.stack([wrong] * 10), gts)
  acc.add_miss()
  m = grounding.flickr_metrics(acc)
  assert m == {"R@1": 0.0, "R@5": 1 / 3, "R@10": 1 / 3, "num_phrases": 3.0}


def test_accumulator_validates():
  with pytest.raises(ValueError, match="k values"):
    grounding.GroundingAccumulator(())
  with pytest.raises(ValueError, match="k=1"):
    grounding.refexp_metrics(grounding.GroundingAccumulator((5,)))
