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


def _lvis_cap_case():
  """Two categories, two images; image 1 holds 301 detections.

  Category 1 ("a", rare): one box in image 1. Category 2 ("b", frequent):
  one box in image 1 and one in image 2, where "a" is verified absent.
  Results: image 1 has b's true positive (0.99), 299 b false positives
  (0.9 down to 0.87) and a's true positive last (0.1, rank 301); image 2
  has b's true positive (0.95).
  """
  images = [{"id": 1, "width": 1000, "height": 1000,
             "neg_category_ids": [], "not_exhaustive_category_ids": []},
            {"id": 2, "width": 1000, "height": 1000,
             "neg_category_ids": [1], "not_exhaustive_category_ids": []}]
  boxes = [(1, 1, [0, 0, 100, 100]), (1, 2, [200, 200, 100, 100]),
           (2, 2, [0, 0, 50, 50])]
  anns = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": b,
           "area": b[2] * b[3], "iscrowd": 0}
          for i, (im, c, b) in enumerate(boxes)]
  cats = [{"id": 1, "name": "a", "frequency": "r"},
          {"id": 2, "name": "b", "frequency": "f"}]
  gt = {"images": images, "annotations": anns, "categories": cats}
  results = [{"image_id": 1, "category_id": 2, "bbox": [200, 200, 100, 100],
              "score": 0.99}]
  results += [{"image_id": 1, "category_id": 2,
               "bbox": [400 + (i % 20) * 30, 400 + (i // 20) * 30, 20, 20],
               "score": 0.9 - 1e-4 * i} for i in range(299)]
  results += [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100],
               "score": 0.1},
              {"image_id": 2, "category_id": 2, "bbox": [0, 0, 50, 50],
               "score": 0.95}]
  return gt, results


def test_fixed_ap_keeps_what_the_per_image_cap_drops():
  gt, results = _lvis_cap_case()
  # Standard LVIS: image 1 keeps its 300 best, all "b": a's true positive
  # (rank 301) is dropped, so AP_a = 0 (one box, nothing found). "b" finds
  # both boxes before any false positive: AP_b = 1. AP = (0 + 1) / 2 = 0.5,
  # APr = AP_a = 0, APf = AP_b = 1, no common category: APc = -1.
  m = coco_metrics.evaluate_boxes(gt, results, lvis=True)
  assert m["AP"] == pytest.approx(0.5) and m["AP50"] == pytest.approx(0.5)
  assert (m["APr"], m["APf"], m["APc"]) == (pytest.approx(0.0),
                                            pytest.approx(1.0), -1.0)
  # Fixed AP: no per-image cap, 10,000 per category: a's true positive is
  # kept, AP_a = 1, so AP_fixed = 1 and APr_fixed = 1.
  f = coco_metrics.evaluate_fixed_ap(gt, results, lvis=True)
  assert set(f) == set(coco_metrics.fixed_ap_names(lvis=True))
  assert f["AP_fixed"] == pytest.approx(1.0)
  assert f["AP50_fixed"] == pytest.approx(1.0)
  assert (f["APr_fixed"], f["APf_fixed"], f["APc_fixed"]) == (
      pytest.approx(1.0), pytest.approx(1.0), -1.0)
  # The per-category cap: with 1 per category, "b" keeps only its 0.99
  # (image 1): recall 1/2 at precision 1, i.e. 51 of the 101 recall
  # thresholds (0, .01, ..., .5): AP_b = 51/101; AP_a = 1.
  f1 = coco_metrics.evaluate_fixed_ap(gt, results, lvis=True,
                                      max_dets_per_cat=1)
  assert f1["AP_fixed"] == pytest.approx((1 + 51 / 101) / 2)
  assert f1["APf_fixed"] == pytest.approx(51 / 101)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_ap_of_coco_equals_ap_when_nothing_is_capped(backend):
  gt = _gt(num_images=6, num_cats=3, boxes_per_image=4, seed=3)
  results = _perfect(gt)
  results[0] = dict(results[0], score=0.3, bbox=[0, 0, 5, 5])
  m = coco_metrics.evaluate_boxes(gt, results, backend=backend)
  f = coco_metrics.evaluate_fixed_ap(gt, results, backend=backend)
  assert f == {"AP_fixed": pytest.approx(m["AP"]),
               "AP50_fixed": pytest.approx(m["AP50"])}


def test_per_category_top_k_matches_a_full_sort():
  rng = np.random.default_rng(0)
  top = coco_metrics.PerCategoryTopK(num_categories=5, k=7)
  top.min_buffer = 8  # Compact often.
  all_rows = []
  for _ in range(20):
    m = 13
    ids = rng.integers(0, 100, m)
    labels = rng.integers(0, 5, m)
    scores = rng.random(m)
    boxes = rng.random((m, 4)).astype(np.float32)
    top.add(ids, labels, scores, boxes)
    all_rows += list(zip(ids, labels, scores, boxes.tolist()))
  ids, labels, scores, boxes = top.arrays()
  assert len(top) == len(ids) == 5 * 7
  for c in range(5):
    want = sorted((r for r in all_rows if r[1] == c), key=lambda r: -r[2])[:7]
    got = labels == c
    np.testing.assert_allclose(scores[got], [r[2] for r in want])
    assert ids[got].tolist() == [r[0] for r in want]
    np.testing.assert_allclose(boxes[got], [r[3] for r in want], rtol=1e-6)


def test_per_category_top_k_memory_is_bounded():
  top = coco_metrics.PerCategoryTopK(num_categories=3, k=4)
  top.min_buffer = 10
  for step in range(200):
    scores = np.full((30,), 0.5 + 1e-3 * step)  # Ever better candidates.
    top.add(np.full(30, step), np.arange(30) % 3, scores, np.zeros((30, 4)))
    assert top._size <= 2 * top._kept + top.min_buffer + 30
  ids, labels, scores, _ = top.arrays()
  assert len(ids) == 12 and set(ids.tolist()) == {199}  # 10 per category.


def test_lvis_minival_is_lvis_val_on_coco_val2017_images(tmp_path):
  import json
  lvis_val = _gt(num_images=4, num_cats=3, seed=4, lvis=True)
  coco_val = {"images": [{"id": 2}, {"id": 4}, {"id": 9}],
              "annotations": [], "categories": []}
  mini = coco_metrics.lvis_minival(lvis_val, coco_val)
  assert [im["id"] for im in mini["images"]] == [2, 4]
  assert {a["image_id"] for a in mini["annotations"]} == {2, 4}
  assert len(mini["annotations"]) == 2 * 3
  assert mini["categories"] == lvis_val["categories"]
  paths = [tmp_path / n for n in ("lvis_v1_val.json", "instances_val2017.json",
                                  "lvis_v1_minival.json")]
  for p, d in zip(paths, (lvis_val, coco_val)):
    p.write_text(json.dumps(d))
  coco_metrics.main(["minival", *map(str, paths)])
  written = json.loads(paths[2].read_text())
  assert written == json.loads(json.dumps(mini))
  m = coco_metrics.evaluate_boxes(str(paths[2]), _perfect(written), lvis=True)
  assert m["AP"] == pytest.approx(1.0)
