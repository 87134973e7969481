"""experiments/false_positives.py on hand-built COCO files."""

import json
import pathlib
import runpy
import subprocess
import sys

import numpy as np
import pytest

import binaries  # tests/binaries.py

TOOL = pathlib.Path(__file__).resolve().parents[1] / "experiments" / (
    "false_positives.py")
FP = runpy.run_path(str(TOOL), run_name="false_positives")


def _gt():
  return {
      "images": [{"id": 1}, {"id": 2}, {"id": 3}],
      "categories": [{"id": 1, "name": "red hexagon"},
                     {"id": 2, "name": "blue circle"},
                     {"id": 3, "name": "pink hexagon"}],
      "annotations": [
          {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10]},
          {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 20, 20]},
          {"id": 4, "image_id": 2, "category_id": 2, "bbox": [30, 0, 10, 10]},
      ]}


def test_iou_matrix_by_hand():
  got = FP["iou_matrix"]([[0, 0, 10, 10]],
                         [[0, 0, 10, 10], [5, 0, 10, 10], [50, 50, 1, 1]])
  np.testing.assert_allclose(got, [[1.0, 50 / 150, 0.0]])


def test_landing_counts_hits_other_objects_and_misses():
  dets = [  # Best first: circle, hexagon, background, pink hexagon (IoU .81).
      {"image_id": 1, "bbox": [21, 20, 10, 10], "score": 0.9},
      {"image_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8},
      {"image_id": 3, "bbox": [0, 0, 5, 5], "score": 0.7},
      {"image_id": 2, "bbox": [0, 0, 18, 18], "score": 0.6},
      {"image_id": 2, "bbox": [30, 0, 10, 10], "score": 0.1},
  ]
  out = FP["landing"](_gt(), dets, "hexagon", top=(1, 2.5))
  assert out["objects"] == 2 and out["detections"] == 5
  assert out["top"]["1"]["counts"] == {"other:circle": 1, "hit": 1}
  five = out["top"]["2.5"]
  assert five["kept"] == 5
  assert five["counts"] == {"hit": 2, "other:circle": 2, "miss": 1}
  assert five["shares"]["hit"] == pytest.approx(0.4)
  # A stricter IoU turns the loose pink box into a miss.
  strict = FP["landing"](_gt(), dets, "hexagon", top=(2.5,), iou=0.9)
  assert strict["top"]["2.5"]["counts"]["hit"] == 1


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match="no category name"):
    FP["landing"](_gt(), [], "star")
  with pytest.raises(ValueError, match="not in --gt's images"):
    FP["landing"](_gt(), [{"image_id": 9, "bbox": [0, 0, 1, 1],
                           "score": 1.0}], "hexagon")


def test_command_line_prints_json(tmp_path):
  gt, dets = tmp_path / "gt.json", tmp_path / "dets.json"
  gt.write_text(json.dumps(_gt()))
  dets.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 10, 10],
                               "score": 1.0}]))
  proc = subprocess.run(
      [sys.executable, str(TOOL), f"--gt={gt}", f"--detections={dets}",
       "--token=hexagon", "--top=1"],
      env=binaries.subprocess_env(), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout)["top"]["1"]["counts"] == {"hit": 1}
