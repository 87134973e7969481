"""Tests for the grounding metrics."""

import json

import numpy as np
import pytest

from omnitrain_jax.data import readers
from omnitrain_jax.evaluation import grd_evaluator
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
  flickr = grounding.FlickrAccumulator((1, 5, 10))
  for gt in gts:
    flickr.add(grounding.merge_boxes(gt), gt)  # The enclosing box.
  assert grounding.flickr_metrics(flickr) == {
      "R@1_anybox": 0.5, "R@5_anybox": 0.5, "R@10_anybox": 0.5,
      "R@1_mergedbox": 1.0, "R@5_mergedbox": 1.0, "R@10_mergedbox": 1.0,
      "num_phrases": 2.0}


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
  acc = grounding.FlickrAccumulator((1, 5, 10))
  acc.add(ranked, gts)
  acc.add(np.stack([wrong] * 10), gts)
  acc.add_miss()
  m = grounding.flickr_metrics(acc)
  assert {k: v for k, v in m.items() if "anybox" in k} == {
      "R@1_anybox": 0.0, "R@5_anybox": 1 / 3, "R@10_anybox": 1 / 3}
  assert m["num_phrases"] == 3.0


def test_accumulator_validates():
  with pytest.raises(ValueError, match="k values"):
    grounding.GroundingAccumulator(())
  with pytest.raises(ValueError, match="k=1"):
    grounding.refexp_metrics(grounding.GroundingAccumulator((5,)))


def test_merge_boxes_is_the_enclosing_box():
  boxes = np.array([[0, 100, 40, 140], [100, 90, 140, 130]], np.float32)
  np.testing.assert_array_equal(grounding.merge_boxes(boxes),
                                [[0, 90, 140, 140]])
  np.testing.assert_array_equal(grounding.merge_boxes(boxes[:1]), boxes[:1])


def _flickr_file(path):
  """One sentence of a Flickr30k image, shaped like MDETR's separateGT file.

  "A man and a woman walk two dogs past three cats while the man smiles":
  five mentions (tokens_positive_eval, sentence order) of four entities;
  "A man" and "the man" are one entity, so its box carries both spans (as
  MDETR's flickr_combined.py writes tokens_positive), the dogs have two
  boxes, the cats three.
  """
  cap = "A man and a woman walk two dogs past three cats while the man smiles"
  def span(text, start=0):
    i = cap.index(text, start)
    return [i, i + len(text)]
  man, woman, dogs = span("A man"), span("a woman"), span("two dogs")
  cats, man2 = span("three cats"), span("the man")
  image = {"id": 7, "file_name": "1000.jpg", "height": 400, "width": 600,
           "caption": cap, "dataset_name": "flickr",
           "tokens_negative": [[0, len(cap)]], "sentence_id": 2,
           "original_img_id": 1000,
           "tokens_positive_eval": [[man], [woman], [dogs], [cats], [man2]]}
  boxes = {  # xyxy, entity -> boxes
      "man": [[10, 10, 50, 90]], "woman": [[60, 10, 100, 90]],
      "dogs": [[0, 100, 40, 140], [100, 100, 140, 140]],
      "cats": [[200, 0, 240, 40], [260, 0, 300, 40], [320, 0, 360, 40]]}
  spans = {"man": [man, man2], "woman": [woman], "dogs": [dogs],
           "cats": [cats]}
  anns = []
  for entity, bs in boxes.items():
    for x0, y0, x1, y1 in bs:
      anns.append({"id": len(anns) + 1, "image_id": 7, "category_id": 1,
                   "iscrowd": 0, "area": (x1 - x0) * (y1 - y0),
                   "bbox": [x0, y0, x1 - x0, y1 - y0],
                   "tokens_positive": spans[entity]})
  path.write_text(json.dumps({
      "images": [image], "annotations": anns,
      "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}))
  return boxes


def test_flickr_recall_follows_mdetr_flickr_eval(tmp_path):
  path = tmp_path / "final_flickr_separateGT_val.json"
  boxes = _flickr_file(path)
  source = readers.load_mdetr_grounding(path, tmp_path, name="flickr")
  rec = source[0]
  mentions = grd_evaluator._eval_mentions(str(path))[rec["image_id"]]
  # Each mention's ground truth: all boxes of its entity.
  gts = [rec["boxes"][grounding.mention_boxes(m, rec["box_spans"])]
         for m in mentions]
  expected = [boxes[e] for e in ("man", "woman", "dogs", "cats", "man")]
  assert [g.tolist() for g in gts] == expected
  far = [500, 500, 510, 510]
  man, woman = boxes["man"][0], boxes["woman"][0]
  d1 = boxes["dogs"][0]
  dogs_all = grounding.merge_boxes(boxes["dogs"])[0].tolist()  # 0,100,140,140
  cats_all = grounding.merge_boxes(boxes["cats"])[0].tolist()  # 200,0,360,40

  def ranked(*first):
    return np.array(list(first) + [far] * (10 - len(first)), np.float32)

  # Hand-placed rankings; hits by MDETR's rule (IoU >= 0.5, top-k):
  #  mention    ranking              any-box @1/5/10   merged-box @1/5/10
  #  A man      [man, ...]           1 1 1             1 1 1  (one box)
  #  a woman    [far, woman, ...]    0 1 1             0 1 1  (one box)
  #  two dogs   [dog 1, dogs_all]    1 1 1             0 1 1
  #     dog 1 vs merged dogs: IoU 40*40 / (140*40) = 0.29 < 0.5 -> miss @1.
  #  three cats [far, far, cats_all] 0 0 0             0 1 1
  #     cats_all vs each cat: IoU 40*40 / (160*40) = 0.25 -> never any-box.
  #  the man    [woman x5, man]      0 0 1             0 0 1  (rank 6)
  #     the second mention of "man", scored on its own against the man box.
  rankings = [ranked(man), ranked(far, woman), ranked(d1, dogs_all),
              ranked(far, far, cats_all), ranked(*[woman] * 5, man)]
  acc = grounding.FlickrAccumulator((1, 5, 10))
  for r, gt in zip(rankings, gts):
    acc.add(r, gt)
  # any-box: @1 {man, dogs} 2/5, @5 + woman 3/5, @10 + the man 4/5;
  # merged-box: @1 {man} 1/5, @5 + woman, dogs, cats 4/5, @10 all 5/5.
  assert grounding.flickr_metrics(acc) == pytest.approx({
      "R@1_anybox": 0.4, "R@5_anybox": 0.6, "R@10_anybox": 0.8,
      "R@1_mergedbox": 0.2, "R@5_mergedbox": 0.8, "R@10_mergedbox": 1.0,
      "num_phrases": 5.0})


def test_mention_boxes_of_multi_span_mentions():
  # ShapesWorld-style: a mention is one span per descriptive word; its box
  # carries exactly those spans.
  box_spans = [[[4, 9], [10, 16]], [[21, 24], [25, 30]]]
  assert grounding.mention_boxes([[21, 24], [25, 30]], box_spans).tolist() == [1]
  assert grounding.mention_boxes([[4, 9]], box_spans).tolist() == [0]
  assert grounding.mention_boxes([[0, 3]], box_spans).tolist() == []
