"""Tests for COCO/LVIS AP: known values, and the two backends agree."""

import copy

import numpy as np
import pytest

from omnitrain_jax.evaluation import coco_metrics

BACKENDS = coco_metrics.BACKENDS


def _gt(num_images=4, num_cats=3, boxes_per_image=3, seed=0, lvis=False):
  rng = np.random.default_rng(seed)
  images, anns = [], []
  for i in range(1, num_images + 1):
    images.append({"id": i, "width": 640, "height": 480,
                   "file_name": f"{i}.jpg"})
    for _ in range(boxes_per_image):
      w, h = rng.uniform(10, 200, 2)
      x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
      anns.append({"id": len(anns) + 1, "image_id": i,
                   "category_id": int(rng.integers(1, num_cats + 1)),
                   "bbox": [float(x), float(y), float(w), float(h)],
                   "area": float(w * h), "iscrowd": 0})
  cats = [{"id": c, "name": f"cat{c}"} for c in range(1, num_cats + 1)]
  if lvis:
    for c in cats:
      c["frequency"] = "rcf"[(c["id"] - 1) % 3]
    for im in images:
      present = {a["category_id"] for a in anns if a["image_id"] == im["id"]}
      im["neg_category_ids"] = [c["id"] for c in cats
                                if c["id"] not in present]
      im["not_exhaustive_category_ids"] = []
  return {"images": images, "annotations": anns, "categories": cats}


def _perfect(gt):
  return [{"image_id": a["image_id"], "category_id": a["category_id"],
           "bbox": list(a["bbox"]), "score": 1.0} for a in gt["annotations"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_give_ap_one(backend):
  gt = _gt()
  results = _perfect(gt)
  before = copy.deepcopy(results)
  m = coco_metrics.evaluate_boxes(gt, results, backend=backend)
  assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
  assert m["AP75"] == pytest.approx(1.0)
  assert results == before  # The caller's results are not modified.


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_known_shift_gives_a_known_ap(backend):
  gt = {"images": [{"id": 1, "width": 200, "height": 200}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                         "bbox": [0, 0, 100, 100], "area": 1e4,
                         "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}]}

  def shifted(iou):
    s = 100 * (1 - iou) / (1 + iou)  # x-shift giving this IoU
    return [{"image_id": 1, "category_id": 1, "bbox": [s, 0, 100, 100],
             "score": 0.9}]

  m = coco_metrics.evaluate_boxes(gt, shifted(0.62), backend=backend)
  # Matched at IoU thresholds .50, .55, .60 of the ten: AP = 3/10.
  assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == 0.0
  assert m["AP"] == pytest.approx(0.3)
  m = coco_metrics.evaluate_boxes(gt, shifted(0.4), backend=backend)
  assert m["AP"] == 0.0 and m["AP50"] == 0.0


def test_backends_agree_on_a_random_case():
  gt = _gt(num_images=12, num_cats=5, boxes_per_image=6, seed=1)
  rng = np.random.default_rng(2)
  results = []
  for a in gt["annotations"]:
    for _ in range(3):  # Jittered copies, some with the wrong category.
      x, y, w, h = a["bbox"]
      j = rng.normal(0, 0.15, 4) * [w, h, w, h]
      cat = a["category_id"] if rng.random() < 0.7 else int(
          rng.integers(1, 6))
      results.append({"image_id": a["image_id"], "category_id": cat,
                      "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]),
                               max(1.0, h + j[3])],
                      "score": float(rng.random())})
  groups = {"odd": [1, 3, 5], "even": [2, 4]}
  fast = coco_metrics.evaluate_boxes(gt, results, category_groups=groups,
                                     backend="faster_coco_eval")
  ref = coco_metrics.evaluate_boxes(gt, results, category_groups=groups,
                                    backend="pycocotools")
  assert 0.05 < ref["AP"] < 0.95  # A case that can tell them apart.
  assert fast.keys() == ref.keys()
  for k in ref:
    assert fast[k] == pytest.approx(ref[k], abs=1e-9), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_category_groups_restrict_the_categories(backend):
  gt = _gt(num_images=6, num_cats=4, seed=3)
  results = [r for r in _perfect(gt) if r["category_id"] in (1, 2)]
  m = coco_metrics.evaluate_boxes(
      gt, results, backend=backend,
      category_groups={"seen": [1, 2], "novel": [3, 4], "unknown": [99]})
  assert m["AP_seen"] == pytest.approx(1.0)
  assert m["AP50_novel"] == 0.0
  assert m["AP_unknown"] == -1.0
  assert 0.0 < m["AP"] < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_ids_restrict_the_images(backend):
  gt = _gt(num_images=4)
  results = [r for r in _perfect(gt) if r["image_id"] <= 2]
  full = coco_metrics.evaluate_boxes(gt, results, backend=backend)
  part = coco_metrics.evaluate_boxes(gt, results, backend=backend,
                                     image_ids=[1, 2])
  assert full["AP"] < 1.0 and part["AP"] == pytest.approx(1.0)


def test_no_detections_is_ap_zero():
  for backend in BACKENDS:
    m = coco_metrics.evaluate_boxes(_gt(), [], backend=backend)
    assert m["AP"] == 0.0 and set(m) == set(coco_metrics.metric_names())


def test_lvis_federated_protocol():
  gt = _gt(num_images=6, num_cats=6, seed=4, lvis=True)
  perfect = _perfect(gt)
  m = coco_metrics.evaluate_boxes(gt, perfect, lvis=True)
  assert m["AP"] == pytest.approx(1.0)
  assert {"APr", "APc", "APf"} <= set(m)
  # A confident detection of a category that is neither annotated nor a
  # verified negative in its image is ignored ...
  im = gt["images"][0]
  present = {a["category_id"] for a in gt["annotations"]
             if a["image_id"] == im["id"]}
  absent = [c for c in range(1, 7) if c not in present]
  assert len(absent) >= 2
  im["neg_category_ids"] = absent[1:]  # absent[0]: not verified either way.
  extra = {"image_id": im["id"], "category_id": absent[0],
           "bbox": [0, 0, 50, 50], "score": 1.0}
  m = coco_metrics.evaluate_boxes(gt, perfect + [extra], lvis=True)
  assert m["AP"] == pytest.approx(1.0)
  # ... one of a verified-negative category is a false positive.
  fp = dict(extra, category_id=absent[1])
  m = coco_metrics.evaluate_boxes(gt, perfect + [fp], lvis=True)
  assert m["AP"] < 1.0
  with pytest.raises(ValueError, match="faster_coco_eval"):
    coco_metrics.evaluate_boxes(gt, perfect, lvis=True, backend="pycocotools")


def test_writes_nothing_to_stdout(capsys):
  coco_metrics.evaluate_boxes(_gt(), _perfect(_gt()), backend="pycocotools")
  assert capsys.readouterr().out == ""
