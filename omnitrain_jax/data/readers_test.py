"""Tests for the annotation readers: every format, every field, bad input."""

import copy
import io
import json
import os
import pickle
import tarfile

import grain
import numpy as np
import PIL.Image
import pytest

from omnitrain_jax.data import formats
from omnitrain_jax.data import images
from omnitrain_jax.data import readers
from omnitrain_jax.data import transforms
from omnitrain_jax.data import vocab_inputs
from omnitrain_jax.data.errors import DataError, SkipCounter
from omnitrain_jax.evaluation import queries
from omnitrain_jax.vocab import tokenizer as tokenizer_lib

RECORD_KEYS = {
    "stream", "source", "image_id", "image_path", "image_bytes", "width",
    "height", "boxes", "box_texts", "category_ids", "phrase_ids", "caption",
    "neg_texts", "not_exhaustive_texts", "box_spans"}


def check_schema(rec):
  """Asserts the record schema of schema.py (+ box_spans)."""
  assert set(rec) == RECORD_KEYS
  n = len(rec["boxes"])
  assert rec["stream"] in ("det", "grd", "img")
  assert isinstance(rec["image_id"], int)
  assert isinstance(rec["width"], int) and isinstance(rec["height"], int)
  assert rec["boxes"].dtype == np.float32 and rec["boxes"].shape == (n, 4)
  assert rec["category_ids"].dtype == np.int32
  assert rec["category_ids"].shape == (n,)
  assert rec["phrase_ids"].dtype == np.int32 and rec["phrase_ids"].shape == (n,)
  assert len(rec["box_texts"]) == n and len(rec["box_spans"]) == n
  assert all(isinstance(t, str) and t for t in rec["box_texts"])
  assert isinstance(rec["caption"], str)
  assert rec["image_bytes"] is None and os.path.isabs(rec["image_path"])
  if n and rec["width"]:
    b = rec["boxes"]
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert (b >= 0).all() and (b[:, 2] <= rec["width"]).all()
    assert (b[:, 3] <= rec["height"]).all()


def _write_image(path, w, h):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.new("RGB", (w, h), (10, 200, 30)).save(path)


def _write_json(path, data):
  with open(path, "w") as f:
    json.dump(data, f)
  return str(path)


# ----------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------


def coco_data():
  return {
      "images": [
          {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
          {"id": 2, "file_name": "b.png", "width": 20, "height": 20},
      ],
      "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"},
                     {"id": 7, "name": "traffic light"},
                     {"id": 9, "name": "dog"}],
      "annotations": [
          {"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 5],
           "iscrowd": 0},
          {"id": 11, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]},
          {"id": 12, "image_id": 1, "category_id": 9, "bbox": [0, 0, 40, 30],
           "iscrowd": 1},
      ],
  }


@pytest.fixture
def coco_dir(tmp_path):
  _write_image(tmp_path / "img" / "a.jpg", 40, 30)
  _write_image(tmp_path / "img" / "b.png", 20, 20)
  return tmp_path


def _load_coco(tmp_path, data, **kw):
  path = _write_json(tmp_path / "instances.json", data)
  return readers.load_coco_instances(path, tmp_path / "img", **kw)


def test_coco_every_field(coco_dir):
  src = _load_coco(coco_dir, coco_data())
  assert (src.name, src.stream, len(src), src.num_skipped) == ("coco", "det",
                                                                2, 0)
  assert src.category_names == {1: "person", 3: "car", 7: "traffic light",
                                9: "dog"}
  assert src.category_frequency is None
  rec = src[0]
  check_schema(rec)
  assert rec["source"] == "coco" and rec["image_id"] == 1
  assert rec["image_path"] == str(coco_dir / "img" / "a.jpg")
  assert (rec["width"], rec["height"]) == (40, 30)
  np.testing.assert_array_equal(rec["boxes"], [[1, 2, 11, 7], [5, 5, 25, 25]])
  assert rec["box_texts"] == ["car", "person"]
  assert rec["category_ids"].tolist() == [3, 1]
  assert rec["phrase_ids"].tolist() == [0, 1]
  assert rec["caption"] == ""
  # "dog" is a crowd region: present, so not a negative.
  assert rec["neg_texts"] == ["traffic light"]
  assert rec["not_exhaustive_texts"] == [] and rec["box_spans"] == [[], []]
  empty = src[1]
  check_schema(empty)
  assert empty["image_id"] == 2 and len(empty["boxes"]) == 0
  assert empty["neg_texts"] == ["person", "car", "traffic light", "dog"]
  assert src[-1]["image_id"] == 2
  with pytest.raises(IndexError):
    src[2]
  # The decoder accepts the record as is.
  assert images.load_image(rec).shape == (30, 40, 3)


def test_coco_skip_empty_and_records_are_copies(coco_dir):
  src = _load_coco(coco_dir, coco_data(), skip_empty=True)
  assert len(src) == 1 and src.num_boxes == 2
  rec = src[0]
  rec["boxes"][:] = -1
  assert (src[0]["boxes"] >= 0).all()


def test_coco_small_overflow_is_clipped(coco_dir):
  data = coco_data()
  # Overflows the 40x30 image by 0.9 px right and 0.5 px up: within 1 px + 1%.
  data["annotations"][0]["bbox"] = [30, -0.5, 10.9, 10]
  src = _load_coco(coco_dir, data)
  np.testing.assert_allclose(src[0]["boxes"][0], [30, 0, 40, 9.5])
  assert src.num_skipped == 0


def test_grain_and_pickle(coco_dir):
  src = _load_coco(coco_dir, coco_data())
  ds = grain.MapDataset.source(src)
  assert len(ds) == 2 and ds[1]["image_id"] == 2
  again = pickle.loads(pickle.dumps(src))
  assert again[0]["box_texts"] == src[0]["box_texts"]
  np.testing.assert_array_equal(again[0]["boxes"], src[0]["boxes"])
  assert isinstance(again.skipped, SkipCounter)


def _ann_case(case):
  """(mutate(data), reason, record substring) of a bad COCO annotation."""
  def set_bbox(v):
    def f(d):
      d["annotations"][0]["bbox"] = v
    return f
  def set_key(k, v):
    def f(d):
      d["annotations"][0][k] = v
    return f
  def drop_key(k):
    def f(d):
      del d["annotations"][0][k]
    return f
  return {
      "nan": (set_bbox([float("nan"), 2, 10, 5]), "non-finite box"),
      "zero_size": (set_bbox([1, 2, 0, 5]), "empty box"),
      "negative_size": (set_bbox([1, 2, 10, -5]), "empty box"),
      "outside": (set_bbox([35, 2, 20, 5]), "box outside image"),
      "far_outside": (set_bbox([100, 100, 5, 5]), "box outside image"),
      "malformed_box": (set_bbox([1, 2, 3]), "malformed box"),
      "unknown_category": (set_key("category_id", 99), "unknown category id"),
      "unknown_image": (set_key("image_id", 99), "unknown image id"),
      "missing_bbox": (drop_key("bbox"), "missing required key"),
  }[case]


BOX_CASES = ["nan", "zero_size", "negative_size", "outside", "far_outside",
             "malformed_box", "unknown_category", "unknown_image",
             "missing_bbox"]


# Zero/negative size is degenerate geometry: dropped and counted in strict mode
# too (test_coco_zero_area_box_dropped_in_strict_mode).
STRICT_BOX_CASES = [c for c in BOX_CASES
                    if c not in ("zero_size", "negative_size")]


@pytest.mark.parametrize("case", STRICT_BOX_CASES)
def test_coco_bad_box_strict_raises(coco_dir, case):
  data = coco_data()
  mutate, reason = _ann_case(case)
  mutate(data)
  with pytest.raises(DataError, match=reason) as e:
    _load_coco(coco_dir, data)
  msg = str(e.value)
  assert "instances.json" in msg and "annotation id 10" in msg
  assert "Fix:" in msg and "strict=False" in msg


@pytest.mark.parametrize("case", BOX_CASES)
def test_coco_bad_box_lenient_skips_only_the_box(coco_dir, case):
  data = coco_data()
  mutate, reason = _ann_case(case)
  mutate(data)
  counter = SkipCounter()
  src = _load_coco(coco_dir, data, strict=False, counter=counter)
  assert src.num_skipped == 1 and src.skipped is counter
  assert counter.counts() == {f"coco/{reason}": 1}
  rec = src[0]
  check_schema(rec)
  assert rec["box_texts"] == ["person"] and len(src) == 2
  if case in ("nan", "zero_size", "negative_size", "outside", "far_outside",
              "malformed_box"):
    # The car is still in the image: it must not become a negative.
    assert "car" not in rec["neg_texts"]


def coco_release_data():
  """A COCO train2017-shaped file (every key of the release) holding the real
  zero-area annotation 918."""
  return {
      "info": {"description": "COCO 2017 Dataset", "version": "1.0",
               "year": 2017},
      "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/",
                    "id": 1, "name": "Attribution-NonCommercial-ShareAlike "
                    "License"}],
      "images": [
          {"license": 1, "file_name": "000000200365.jpg",
           "coco_url": "http://images.cocodataset.org/train2017/"
                       "000000200365.jpg", "height": 480, "width": 640,
           "date_captured": "2013-11-18 02:53:27",
           "flickr_url": "http://farm8.staticflickr.com/x.jpg",
           "id": 200365},
      ],
      "annotations": [
          {"segmentation": [[296.65, 388.33, 296.65, 388.33, 297.68, 388.33,
                             297.68, 388.33]], "area": 0.0, "iscrowd": 0,
           "image_id": 200365, "bbox": [296.65, 388.33, 1.03, 0.0],
           "category_id": 58, "id": 918},
          {"segmentation": [[239.97, 260.24, 222.04, 270.49, 199.84, 253.41]],
           "area": 2765.15, "iscrowd": 0, "image_id": 200365,
           "bbox": [199.84, 200.46, 77.71, 70.88], "category_id": 58,
           "id": 156},
      ],
      "categories": [{"supercategory": "food", "id": 58, "name": "hot dog"},
                     {"supercategory": "person", "id": 1, "name": "person"}],
  }


def test_coco_zero_area_box_dropped_in_strict_mode(tmp_path, monkeypatch):
  warnings = []
  monkeypatch.setattr(readers.logging, "warning",
                      lambda msg, *args: warnings.append(msg % args))
  for strict in (True, False):
    warnings.clear()
    counter = SkipCounter()
    path = _write_json(tmp_path / "instances_train2017.json",
                       coco_release_data())
    src = readers.load_coco_instances(path, tmp_path / "train2017",
                                      strict=strict, counter=counter)
    assert len(src) == 1 and src.num_skipped == 1
    assert counter.counts() == {"coco/empty box": 1}
    assert "annotation id 918" in counter.report()
    rec = src[0]
    check_schema(rec)
    np.testing.assert_allclose(rec["boxes"], [[199.84, 200.46, 277.55,
                                               271.34]], rtol=1e-6)
    # The dropped hot dog is still in the image: not a negative.
    assert rec["box_texts"] == ["hot dog"] and rec["neg_texts"] == ["person"]
    assert len(warnings) == 1, warnings
    assert "instances_train2017.json" in warnings[0]
    assert "dropped 1 box" in warnings[0] and "918" in warnings[0]
  # Negative size is dropped the same way.
  data = coco_release_data()
  data["annotations"][0]["bbox"] = [296.65, 388.33, -1.0, 4.0]
  src = readers.load_coco_instances(
      _write_json(tmp_path / "neg.json", data), tmp_path)
  assert len(src[0]["boxes"]) == 1 and src.num_skipped == 1


def test_coco_nan_box_still_fatal_in_strict_mode(tmp_path):
  data = coco_release_data()
  data["annotations"].append(
      {"segmentation": [], "area": 1.0, "iscrowd": 0, "image_id": 200365,
       "bbox": [10.0, float("nan"), 5.0, 5.0], "category_id": 1, "id": 919})
  path = _write_json(tmp_path / "instances_train2017.json", data)
  with pytest.raises(DataError, match="non-finite box") as e:
    readers.load_coco_instances(path, tmp_path)
  assert "annotation id 919" in e.value.record
  assert "instances_train2017.json" in str(e.value)
  # Structural errors stay fatal too, beside the dropped zero-area box.
  data = coco_release_data()
  data["annotations"][1]["category_id"] = 999
  with pytest.raises(DataError, match="unknown category id"):
    readers.load_coco_instances(
        _write_json(tmp_path / "cat.json", data), tmp_path)
  counter = SkipCounter()
  src = readers.load_coco_instances(path, tmp_path, strict=False,
                                    counter=counter)
  assert counter.counts() == {"coco/empty box": 1, "coco/non-finite box": 1}
  assert src[0]["box_texts"] == ["hot dog"]


def _image_case(case):
  def f(d):
    im = d["images"][0]
    if case == "missing_width":
      del im["width"]
    elif case == "zero_height":
      im["height"] = 0
    elif case == "missing_file_name":
      del im["file_name"]
    elif case == "missing_id":
      del im["id"]
  return f


IMAGE_CASES = {"missing_width": "missing required key",
               "zero_height": "bad image size",
               "missing_file_name": "missing required key",
               "missing_id": "missing required key"}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_coco_bad_image_entry_both_modes(coco_dir, case):
  data = coco_data()
  _image_case(case)(data)
  with pytest.raises(DataError, match=IMAGE_CASES[case]) as e:
    _load_coco(coco_dir, data)
  assert "image" in e.value.record
  counter = SkipCounter()
  src = _load_coco(coco_dir, data, strict=False, counter=counter)
  assert len(src) == 1 and src[0]["image_id"] == 2
  if case == "missing_id":  # Its boxes now point at an unknown image.
    assert counter.total() == 4  # The entry and its 3 annotations.
  else:  # The image's boxes go with it without extra noise.
    assert counter.total() == 1 and src.num_skipped == 1


def test_malformed_json_names_line_and_column(coco_dir):
  path = coco_dir / "instances.json"
  path.write_text('{"images": [\n  {"id": 1,, }\n]}')
  for strict in (True, False):
    with pytest.raises(DataError, match="not valid JSON") as e:
      readers.load_coco_instances(path, coco_dir, strict=strict)
    assert e.value.record == "line 2 column 12"
    assert str(path) in str(e.value)


def test_missing_file_and_top_level_key(coco_dir):
  with pytest.raises(DataError, match="missing annotation file"):
    readers.load_coco_instances(coco_dir / "nope.json", coco_dir)
  data = coco_data()
  del data["categories"]
  with pytest.raises(DataError, match="missing required key: 'categories'"):
    _load_coco(coco_dir, data, strict=False)


# ----------------------------------------------------------------------------
# LVIS
# ----------------------------------------------------------------------------


def lvis_data():
  return {
      "images": [
          {"id": 5, "coco_url": "http://images.cocodataset.org/train2017/"
                                "000000000005.jpg", "width": 40, "height": 30,
           "neg_category_ids": [3], "not_exhaustive_category_ids": [2]},
          {"id": 6, "coco_url": "http://images.cocodataset.org/val2017/x.jpg",
           "file_name": "other/6.jpg", "width": 20, "height": 20,
           "neg_category_ids": [], "not_exhaustive_category_ids": []},
      ],
      "categories": [
          {"id": 1, "name": "hot_dog", "frequency": "c"},
          {"id": 2, "name": "bow_(weapon)", "frequency": "r"},
          {"id": 3, "name": "cat", "frequency": "f"},
      ],
      "annotations": [
          {"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 4, 4]},
          {"id": 2, "image_id": 5, "category_id": 2, "bbox": [1, 1, 4, 4]},
          {"id": 3, "image_id": 6, "category_id": 3, "bbox": [2, 2, 4, 4]},
      ],
  }


def test_lvis_every_field(tmp_path):
  path = _write_json(tmp_path / "lvis.json", lvis_data())
  src = readers.load_lvis(path, tmp_path / "coco")
  assert src.category_names == {1: "hot dog", 2: "bow (weapon)", 3: "cat"}
  assert src.category_frequency == {1: "c", 2: "r", 3: "f"}
  rec = src[0]
  check_schema(rec)
  assert rec["image_path"] == str(tmp_path / "coco" / "train2017" /
                                  "000000000005.jpg")
  assert rec["box_texts"] == ["hot dog", "bow (weapon)"]
  assert rec["category_ids"].tolist() == [1, 2]
  assert rec["neg_texts"] == ["cat"]
  assert rec["not_exhaustive_texts"] == ["bow (weapon)"]
  np.testing.assert_array_equal(rec["boxes"], [[0, 0, 4, 4], [1, 1, 5, 5]])
  rec = src[1]
  check_schema(rec)
  # An explicit file_name wins over coco_url.
  assert rec["image_path"] == str(tmp_path / "coco" / "other" / "6.jpg")
  assert rec["neg_texts"] == [] and rec["not_exhaustive_texts"] == []


def test_lvis_bad_negative_list_both_modes(tmp_path):
  data = lvis_data()
  data["images"][0]["neg_category_ids"] = [3, 77]
  path = _write_json(tmp_path / "lvis.json", data)
  with pytest.raises(DataError, match="unknown category id.*77") as e:
    readers.load_lvis(path, tmp_path)
  assert e.value.record == "image id 5"
  src = readers.load_lvis(path, tmp_path, strict=False)
  assert len(src) == 1 and src[0]["image_id"] == 6 and src.num_skipped == 1


def test_lvis_zero_size_box_dropped_in_strict_mode(tmp_path):
  data = lvis_data()
  data["annotations"][1]["bbox"] = [1.5, 1.0, 0.0, 2.25]
  data["annotations"][1]["area"] = 0.0
  path = _write_json(tmp_path / "lvis.json", data)
  counter = SkipCounter()
  src = readers.load_lvis(path, tmp_path, counter=counter)
  assert counter.counts() == {"lvis/empty box": 1} and src.num_skipped == 1
  rec = src[0]
  assert rec["box_texts"] == ["hot dog"]
  assert rec["neg_texts"] == ["cat"]  # bow is still present: not negative.
  data["annotations"][1]["bbox"] = [1.5, 1.0, "2", 2.25]
  with pytest.raises(DataError, match="malformed box"):
    readers.load_lvis(_write_json(tmp_path / "bad.json", data), tmp_path)


def test_coco_file_given_to_lvis_reader_says_so(coco_dir):
  path = _write_json(coco_dir / "instances.json", coco_data())
  with pytest.raises(DataError, match="load_coco_instances"):
    readers.load_lvis(path, coco_dir)


LVIS_SAMPLE = os.path.join(os.path.dirname(__file__), "testdata",
                           "lvis_v1_categories_sample.json")


def test_lvis_compound_names_are_one_token_from_file_to_query(tmp_path):
  """Real LVIS v1 categories (181 of 1203, every field as released): the
  multi-word names stay one concept in the vocabulary, in the box tokens and
  in a typed query."""
  with open(LVIS_SAMPLE) as f:
    data = json.load(f)
  assert set(data["categories"][0]) == {
      "id", "name", "synonyms", "synset", "def", "frequency", "image_count",
      "instance_count"}
  by_name = {c["name"]: c["id"] for c in data["categories"]}
  ids = [by_name[n] for n in ("ski_pole", "fire_engine", "trash_can",
                              "tennis_ball", "bow_(weapon)")]
  data["images"] = [{
      "id": 9, "coco_url": "http://images.cocodataset.org/train2017/"
                           "000000000009.jpg", "width": 64, "height": 48,
      "license": 1, "flickr_url": "", "date_captured": "",
      "neg_category_ids": [by_name["ski"], by_name["life_jacket"]],
      "not_exhaustive_category_ids": [by_name["police_cruiser"]]}]
  data["annotations"] = [
      {"id": k + 1, "image_id": 9, "category_id": c, "area": 20.0,
       "segmentation": [], "bbox": [2.0 + k, 3.0, 5.0, 4.0]}
      for k, c in enumerate(ids)]
  path = _write_json(tmp_path / "lvis_v1_train.json", data)

  vocab, summary = vocab_inputs.build_from_files([path], max_size=10_000)
  assert summary["num_split_category_names"] == 0
  for concept in ("fire engine", "fire truck", "ski pole", "trash can",
                  "garbage can", "tennis ball", "life jacket", "police car",
                  "computer monitor", "bow", "ski"):
    assert concept in vocab.index, concept
  tok = tokenizer_lib.Tokenizer(vocab)

  rec = readers.load_lvis(path, tmp_path)[0]
  out = transforms.Tokenize(tok).apply(rec)
  assert [[vocab.tokens[i] for i in t] for t in out["box_tokens"]] == [
      ["ski pole"], ["fire engine"], ["trash can"], ["tennis ball"], ["bow"]]
  # An absent ski / life jacket is a negative for its own token only.
  assert sorted(vocab.tokens[i] for i in out["neg_tokens"]) == [
      "life jacket", "ski"]
  assert [vocab.tokens[i] for i in out["no_bg_tokens"]] == ["police cruiser"]

  for typed, token in (("fire truck", "fire truck"),
                       ("Fire Trucks", "fire truck"),
                       ("fire-truck", "fire truck"),
                       ("trash_can", "trash can"), ("ski pole", "ski pole")):
    q = queries.user_query(tok, typed)
    assert q.tokens == ((token,),) and not q.unknown, typed
  assert queries.category_query(tok, "ski_pole").tokens == (("ski pole",),)


# ----------------------------------------------------------------------------
# RefCOCO(g): refs pickle + instances.json
# ----------------------------------------------------------------------------


def refcoco_files(tmp_path, refs=None, protocol=2):
  instances = {
      "images": [{"id": 100, "file_name": "COCO_train2014_100.jpg",
                  "width": 40, "height": 30}],
      "annotations": [
          {"id": 1000, "image_id": 100, "category_id": 1,
           "bbox": [2, 3, 10, 12]},
          {"id": 1001, "image_id": 100, "category_id": 1,
           "bbox": [20, 3, 10, 12]},
      ],
      "categories": [{"id": 1, "name": "person"}],
  }
  if refs is None:
    refs = [
        {"ref_id": 0, "ann_id": 1000, "image_id": 100, "split": "train",
         "category_id": 1, "file_name": "COCO_train2014_100_1000.jpg",
         "sentences": [{"raw": "The man on the left ", "sent": "the man on "
                        "the left", "sent_id": 0},
                       {"raw": "left guy", "sent": "left guy", "sent_id": 1}]},
        {"ref_id": 1, "ann_id": 1001, "image_id": 100, "split": "val",
         "category_id": 1, "sentences": [{"raw": "right man", "sent_id": 2}]},
    ]
  refs_path = tmp_path / "refs(umd).p"
  with open(refs_path, "wb") as f:
    pickle.dump(refs, f, protocol=protocol)
  inst_path = _write_json(tmp_path / "instances.json", instances)
  return refs_path, inst_path


def test_refcoco_every_field(tmp_path):
  refs_path, inst_path = refcoco_files(tmp_path)
  src = readers.load_refcoco(refs_path, inst_path, tmp_path / "train2014",
                             split="train")
  assert (src.name, src.stream, len(src)) == ("refcocog", "grd", 2)
  rec = src[0]
  check_schema(rec)
  assert rec["image_id"] == 100
  assert rec["image_path"] == str(tmp_path / "train2014" /
                                  "COCO_train2014_100.jpg")
  np.testing.assert_array_equal(rec["boxes"], [[2, 3, 12, 15]])
  assert rec["caption"] == "The man on the left"
  assert rec["box_texts"] == ["The man on the left"]
  assert rec["box_spans"] == [[[0, 19]]]
  assert rec["category_ids"].tolist() == [-1]
  assert rec["phrase_ids"].tolist() == [0]
  assert rec["neg_texts"] == [] and rec["not_exhaustive_texts"] == []
  assert src[1]["caption"] == "left guy"
  val = readers.load_refcoco(refs_path, inst_path, tmp_path, split="val")
  assert len(val) == 1 and val[0]["caption"] == "right man"
  sent = readers.load_refcoco(refs_path, inst_path, tmp_path, split="train",
                              text_key="sent")
  assert sent[0]["caption"] == "the man on the left"


def test_refcoco_unknown_split(tmp_path):
  refs_path, inst_path = refcoco_files(tmp_path)
  with pytest.raises(ValueError, match=r"\['train', 'val'\]"):
    readers.load_refcoco(refs_path, inst_path, tmp_path, split="testA")


@pytest.mark.parametrize("case", ["unknown_ann", "empty_sentence",
                                  "non_text_sentence", "box_outside"])
def test_refcoco_bad_input_both_modes(tmp_path, case):
  refs_path, inst_path = refcoco_files(tmp_path)
  with open(refs_path, "rb") as f:
    refs = pickle.load(f)
  reason = {"unknown_ann": "unknown annotation id",
            "empty_sentence": "bad caption", "non_text_sentence": "bad caption",
            "box_outside": "box outside image"}[case]
  if case == "unknown_ann":
    refs[0]["ann_id"] = 5
  elif case == "empty_sentence":
    refs[0]["sentences"][1]["raw"] = "   "
  elif case == "non_text_sentence":
    refs[0]["sentences"][1]["raw"] = 42
  else:
    data = json.loads(open(inst_path).read())
    data["annotations"][0]["bbox"] = [30, 3, 30, 12]
    _write_json(inst_path, data)
  refs_path, _ = refcoco_files(tmp_path, refs) if case != "box_outside" else (
      refs_path, None)
  with pytest.raises(DataError, match=reason) as e:
    readers.load_refcoco(refs_path, inst_path, tmp_path, split="train")
  assert "ref_id 0" in e.value.record
  src = readers.load_refcoco(refs_path, inst_path, tmp_path, split="train",
                             strict=False)
  assert src.num_skipped == 1
  if case in ("empty_sentence", "non_text_sentence"):
    assert [r["caption"] for r in src] == ["The man on the left"]
  else:  # A bad ref drops all its sentences.
    assert len(src) == 0


def test_refcoco_pickle_with_code_is_refused(tmp_path):
  _, inst_path = refcoco_files(tmp_path)
  bad = tmp_path / "evil.p"
  with open(bad, "wb") as f:
    pickle.dump([{"split": "train", "x": os.getcwd}], f, protocol=2)
  with pytest.raises(DataError, match="refusing to load"):
    readers.load_refcoco(bad, inst_path, tmp_path, split="train")


# ----------------------------------------------------------------------------
# MDETR grounding JSON
# ----------------------------------------------------------------------------

CAPTION = "a red circle left of two green squares and a tiny star"


def mdetr_data():
  def span(text):
    s = CAPTION.index(text)
    return [s, s + len(text)]
  return {
      "images": [
          {"id": 0, "file_name": "0.jpg", "width": 40, "height": 30,
           "caption": CAPTION, "dataset_name": "flickr", "original_id": 77,
           "tokens_negative": [[0, 1]]},
          {"id": 1, "file_name": "1.jpg", "width": 40, "height": 30,
           "caption": "the dog"},
      ],
      "annotations": [
          {"id": 1, "image_id": 0, "bbox": [1, 1, 5, 5], "category_id": 1,
           "tokens_positive": [span("red circle")]},
          {"id": 2, "image_id": 0, "bbox": [10, 1, 5, 5], "category_id": 1,
           "tokens_positive": [span("two green squares")]},
          {"id": 3, "image_id": 0, "bbox": [20, 1, 5, 5], "category_id": 1,
           "tokens_positive": [span("two green squares")]},
          {"id": 4, "image_id": 0, "bbox": [30, 1, 5, 5], "category_id": 1,
           "tokens_positive": [span("tiny"), span("star")]},
          {"id": 5, "image_id": 1, "bbox": [0, 0, 40, 30], "category_id": 1,
           "tokens_positive": [[4, 7]]},
      ],
  }


def _load_mdetr(tmp_path, data, **kw):
  path = _write_json(tmp_path / "final_flickr_train.json", data)
  return readers.load_mdetr_grounding(path, tmp_path / "flickr", **kw)


def test_mdetr_every_field(tmp_path):
  src = _load_mdetr(tmp_path, mdetr_data(), name="flickr")
  assert (src.name, src.stream, len(src)) == ("flickr", "grd", 2)
  rec = src[0]
  check_schema(rec)
  assert rec["image_id"] == 0 and rec["caption"] == CAPTION
  assert rec["image_path"] == str(tmp_path / "flickr" / "0.jpg")
  assert rec["box_texts"] == ["red circle", "two green squares",
                              "two green squares", "tiny star"]
  assert rec["phrase_ids"].tolist() == [0, 1, 1, 2]
  assert rec["category_ids"].tolist() == [-1] * 4
  assert rec["box_spans"][3] == [[45, 49], [50, 54]]
  np.testing.assert_array_equal(rec["boxes"][1], [10, 1, 15, 6])
  assert rec["neg_texts"] == [] and rec["not_exhaustive_texts"] == []
  rec = src[1]
  check_schema(rec)
  assert rec["box_texts"] == ["dog"] and rec["phrase_ids"].tolist() == [0]


def test_mdetr_explicit_phrase_ids_win(tmp_path):
  data = mdetr_data()
  for a, pid in zip(data["annotations"][:4], [17, 3, 17, 3]):
    a["phrase_ids"] = pid
  rec = _load_mdetr(tmp_path, data)[0]
  assert rec["phrase_ids"].tolist() == [0, 1, 0, 1]


MDETR_CASES = {
    "span_past_end": ("bad text span", "annotation id 1"),
    "span_reversed": ("bad text span", "annotation id 1"),
    "span_not_a_pair": ("bad text span", "annotation id 1"),
    "box_outside": ("box outside image", "annotation id 1"),
    "missing_tokens_positive": ("missing required key", "annotation id 1"),
    "empty_caption": ("bad caption", "image id 0"),
    "non_text_caption": ("bad caption", "image id 0"),
}


@pytest.mark.parametrize("case", sorted(MDETR_CASES))
def test_mdetr_bad_input_both_modes(tmp_path, case):
  data = mdetr_data()
  a, im = data["annotations"][0], data["images"][0]
  if case == "span_past_end":
    a["tokens_positive"] = [[50, 99]]
  elif case == "span_reversed":
    a["tokens_positive"] = [[5, 2]]
  elif case == "span_not_a_pair":
    a["tokens_positive"] = [[2, 5, 7]]
  elif case == "box_outside":
    a["bbox"] = [-20, 1, 5, 5]
  elif case == "missing_tokens_positive":
    del a["tokens_positive"]
  elif case == "empty_caption":
    im["caption"] = ""
  else:
    im["caption"] = ["a", "list"]
  reason, record = MDETR_CASES[case]
  with pytest.raises(DataError, match=reason) as e:
    _load_mdetr(tmp_path, copy.deepcopy(data))
  assert record in e.value.record and "final_flickr_train.json" in str(e.value)
  src = _load_mdetr(tmp_path, data, strict=False)
  assert src.num_skipped == 1
  if case.endswith("caption"):  # The whole record goes.
    assert len(src) == 1 and src[0]["image_id"] == 1
  else:  # Only the box goes.
    assert src[0]["box_texts"][0] == "two green squares"
    assert src[0]["phrase_ids"].tolist() == [0, 0, 1]


def flickr_release_data():
  """Shaped as MDETR's final_flickr_separateGT_train.json: sizes as strings
  (from the Flickr30k XML via xmltodict), every key of the release."""
  caption = "A man in a blue shirt is playing a guitar ."
  return {
      "images": [
          {"file_name": "1000092795.jpg", "height": "500", "width": "333",
           "id": 0, "caption": caption, "dataset_name": "flickr",
           "tokens_negative": [[0, 1], [2, 5], [6, 8], [9, 10], [11, 15],
                               [16, 21]],
           "sentence_id": 0, "original_img_id": 1000092795,
           "tokens_positive_eval": [[[0, 5]], [[9, 21]], [[33, 41]]]},
          {"file_name": "10002456.jpg", "height": "375", "width": "500",
           "id": 1, "caption": "Two dogs run .", "dataset_name": "flickr",
           "tokens_negative": [[0, 3]], "sentence_id": 1,
           "original_img_id": 10002456,
           "tokens_positive_eval": [[[0, 8]]]},
      ],
      "annotations": [
          {"area": 20100, "iscrowd": 0, "category_id": 1,
           "bbox": [52, 70, 201, 100], "image_id": 0, "id": 0,
           "tokens_positive": [[0, 5]], "phrase_ids": 126891},
          {"area": 2310, "iscrowd": 0, "category_id": 1,
           "bbox": [110, 80, 70, 33], "image_id": 0, "id": 1,
           "tokens_positive": [[9, 21]], "phrase_ids": 126892},
          {"area": 9000, "iscrowd": 0, "category_id": 1,
           "bbox": [120, 300, 180, 50], "image_id": 0, "id": 2,
           "tokens_positive": [[33, 41]], "phrase_ids": 126893},
          # Overflows the 333 px wide image by 2 px: clipped.
          {"area": 9000, "iscrowd": 0, "category_id": 1,
           "bbox": [155, 100, 180, 50], "image_id": 0, "id": 3,
           "tokens_positive": [[33, 41]], "phrase_ids": 126893},
          {"area": 4000, "iscrowd": 0, "category_id": 1,
           "bbox": [10, 20, 100, 40], "image_id": 1, "id": 4,
           "tokens_positive": [[0, 8]], "phrase_ids": 5},
      ],
      "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
  }


def test_mdetr_flickr_as_released_string_sizes(tmp_path):
  path = _write_json(tmp_path / "final_flickr_separateGT_train.json",
                     flickr_release_data())
  src = readers.load_mdetr_grounding(path, tmp_path / "flickr30k",
                                     name="flickr")
  assert len(src) == 2 and src.num_skipped == 0
  rec = src[0]
  check_schema(rec)
  assert (rec["width"], rec["height"]) == (333, 500)
  assert rec["box_texts"] == ["A man", "a blue shirt", "a guitar",
                              "a guitar"]
  assert rec["phrase_ids"].tolist() == [0, 1, 2, 2]
  np.testing.assert_array_equal(rec["boxes"][3], [155, 100, 333, 150])
  assert (src[1]["width"], src[1]["height"]) == (500, 375)


@pytest.mark.parametrize("size", ["abc", "", "12.5", "-3", "0", None, [500]])
def test_mdetr_flickr_bad_string_size_both_modes(tmp_path, size):
  data = flickr_release_data()
  data["images"][0]["height"] = size
  path = _write_json(tmp_path / "final_flickr_separateGT_val.json", data)
  with pytest.raises(DataError, match="bad image size") as e:
    readers.load_mdetr_grounding(path, tmp_path)
  assert e.value.record == "image id 0"
  assert "final_flickr_separateGT_val.json" in str(e.value)
  assert "strict=False" in str(e.value)
  src = readers.load_mdetr_grounding(path, tmp_path, strict=False)
  # The entry goes, and its 4 boxes with it without extra noise.
  assert len(src) == 1 and src[0]["image_id"] == 1 and src.num_skipped == 1


@pytest.mark.parametrize("strict", [True, False])
def test_mdetr_flickr_empty_tokens_positive_dropped_and_counted(
    tmp_path, strict, monkeypatch):
  # MDETR's releases hold boxes no caption words describe: dropped in both
  # modes (no token to learn), counted, one warning per file.
  data = flickr_release_data()
  data["annotations"][1]["tokens_positive"] = []
  data["annotations"][4]["tokens_positive"] = []
  path = _write_json(tmp_path / "final_flickr_separateGT_train.json", data)
  warnings = []
  monkeypatch.setattr(readers.logging, "warning",
                      lambda msg, *a: warnings.append(msg % a))
  counter = SkipCounter()
  src = readers.load_mdetr_grounding(path, tmp_path, strict=strict,
                                     counter=counter, name="flickr")
  assert counter.counts() == {"flickr/empty text span": 2}
  assert src.num_skipped == 2 and len(src) == 2
  assert src[0]["box_texts"] == ["A man", "a guitar", "a guitar"]
  assert src[0]["phrase_ids"].tolist() == [0, 1, 1]
  assert len(src[1]["boxes"]) == 0
  assert len(warnings) == 1 and "dropped 2 box(es)" in warnings[0]
  assert "first: annotation id 1" in warnings[0]


def test_mdetr_malformed_tokens_positive_still_fatal(tmp_path):
  data = flickr_release_data()
  data["annotations"][1]["tokens_positive"] = [[9]]
  path = _write_json(tmp_path / "final_flickr_separateGT_train.json", data)
  with pytest.raises(DataError, match="bad text span") as e:
    readers.load_mdetr_grounding(path, tmp_path)
  assert "annotation id 1" in e.value.record and "strict=False" in str(e.value)
  counter = SkipCounter()
  src = readers.load_mdetr_grounding(path, tmp_path, strict=False,
                                     counter=counter)
  assert counter.counts() == {"mdetr/bad text span": 1}
  assert src[0]["box_texts"] == ["A man", "a guitar", "a guitar"]


def test_coco_reader_keeps_string_sizes_fatal(coco_dir):
  data = coco_data()
  data["images"][0]["width"] = "40"
  with pytest.raises(DataError, match="bad image size"):
    _load_coco(coco_dir, data)


def test_mdetr_gqa_vg_box_few_px_outside_is_clipped(tmp_path):
  # final_mixed_train.json (GoldG): Visual Genome boxes overflow by pixels.
  data = {
      "images": [
          {"file_name": "2354786.jpg", "height": 600, "width": 800, "id": 7,
           "caption": "the clock on the tower", "dataset_name": "gqa",
           "tokens_negative": [[0, 3]], "data_source": "vg",
           "original_img_id": 2354786}],
      "annotations": [
          {"area": 4600.0, "iscrowd": 0, "category_id": 1,
           "bbox": [750.0, -3.0, 53.0, 90.0], "image_id": 7, "id": 70,
           "tokens_positive": [[4, 9]]},
          {"area": 9000.0, "iscrowd": 0, "category_id": 1,
           "bbox": [700.0, 500.0, 100.0, 104.0], "image_id": 7, "id": 71,
           "tokens_positive": [[17, 22]]}],
      "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
  }
  path = _write_json(tmp_path / "final_mixed_train.json", data)
  src = readers.load_mdetr_grounding(path, tmp_path)
  assert src.num_skipped == 0
  np.testing.assert_array_equal(src[0]["boxes"], [[750, 0, 800, 87],
                                                  [700, 500, 800, 600]])
  assert src[0]["box_texts"] == ["clock", "tower"]


def test_mdetr_refexp_iscrowd_accepted(tmp_path):
  caption = "the woman in the red coat"
  data = {
      "images": [
          {"file_name": "COCO_train2014_000000581857.jpg", "height": 640,
           "width": 427, "id": 0, "original_id": 581857, "caption": caption,
           "dataset_name": "refcocog", "tokens_negative": [[0, 25]]}],
      "annotations": [
          {"area": 24041.5, "iscrowd": 0, "image_id": 0, "category_id": 1,
           "id": 0, "bbox": [103.93, 299.99, 134.22, 177.42],
           "tokens_positive": [[0, 25]]}],
      "categories": [{"supercategory": "person", "id": 1, "name": "person"}],
  }
  path = _write_json(tmp_path / "final_refcocog_train.json", data)
  src = readers.load_mdetr_grounding(path, tmp_path)
  assert len(src) == 1 and src.num_skipped == 0
  assert src[0]["box_texts"] == [caption] and len(src[0]["boxes"]) == 1


def test_mdetr_skip_empty(tmp_path):
  data = mdetr_data()
  data["annotations"] = data["annotations"][:4]
  assert len(_load_mdetr(tmp_path, data)) == 2
  src = _load_mdetr(tmp_path, data, skip_empty=True)
  assert len(src) == 1 and src[0]["image_id"] == 0
  assert len(src[0]["boxes"]) == 4


# ----------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------


def test_coco_captions_every_field_and_bad_caption(tmp_path):
  data = {
      "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                 {"id": 2, "file_name": "b.jpg", "width": 20, "height": 10}],
      "annotations": [{"id": 7, "image_id": 1, "caption": "A dog. "},
                      {"id": 8, "image_id": 2, "caption": "Two cats"},
                      {"id": 9, "image_id": 1, "caption": "A brown dog"}],
  }
  path = _write_json(tmp_path / "captions.json", data)
  src = readers.load_coco_captions(path, tmp_path / "img")
  assert (src.name, src.stream, len(src)) == ("coco_captions", "img", 3)
  rec = src[2]
  check_schema(rec)
  assert rec["caption"] == "A brown dog" and rec["image_id"] == 1
  assert (rec["width"], rec["height"]) == (40, 30)
  assert rec["image_path"] == str(tmp_path / "img" / "a.jpg")
  assert rec["box_texts"] == [] and rec["neg_texts"] == []
  assert src[0]["caption"] == "A dog."
  data["annotations"][1]["caption"] = ""
  path = _write_json(tmp_path / "captions.json", data)
  with pytest.raises(DataError, match="bad caption") as e:
    readers.load_coco_captions(path, tmp_path)
  assert e.value.record == "annotation id 8"
  src = readers.load_coco_captions(path, tmp_path, strict=False)
  assert [r["caption"] for r in src] == ["A dog.", "A brown dog"]


def test_caption_jsonl_every_field(tmp_path):
  lines = [
      json.dumps({"image": "imgs/a.jpg", "caption": "a cat"}),
      "",
      json.dumps({"image": "/abs/b.jpg", "caption": "a dog", "image_id": 9,
                  "width": 64, "height": 48}),
  ]
  path = tmp_path / "data" / "caps.jsonl"
  path.parent.mkdir()
  path.write_text("\n".join(lines) + "\n")
  src = readers.load_caption_jsonl(path)
  assert len(src) == 2
  rec = src[0]
  check_schema(rec)
  assert rec["image_path"] == str(tmp_path / "data" / "imgs" / "a.jpg")
  assert rec["image_id"] == 1 and (rec["width"], rec["height"]) == (0, 0)
  assert rec["caption"] == "a cat" and rec["boxes"].shape == (0, 4)
  rec = src[1]
  assert rec["image_path"] == "/abs/b.jpg" and rec["image_id"] == 9
  assert (rec["width"], rec["height"]) == (64, 48)
  rooted = readers.load_caption_jsonl(path, image_dir=tmp_path / "root")
  assert rooted[0]["image_path"] == str(tmp_path / "root" / "imgs" / "a.jpg")


@pytest.mark.parametrize("case,reason", [
    ("bad_json", "not valid JSON"), ("missing_key", "missing required key"),
    ("non_text", "bad caption"), ("empty", "bad caption"),
    ("not_object", "malformed line")])
def test_caption_jsonl_bad_line_both_modes(tmp_path, case, reason):
  bad = {"bad_json": '{"image": "a.jpg", "caption": }',
         "missing_key": '{"image": "a.jpg"}',
         "non_text": '{"image": "a.jpg", "caption": 123}',
         "empty": '{"image": "a.jpg", "caption": "  "}',
         "not_object": '["a.jpg", "cap"]'}[case]
  path = tmp_path / "caps.jsonl"
  path.write_text('{"image": "b.jpg", "caption": "ok"}\n' + bad + "\n")
  with pytest.raises(DataError, match=reason) as e:
    readers.load_caption_jsonl(path)
  assert e.value.record.startswith("line 2")
  if case == "bad_json":
    assert e.value.record == "line 2 column 31"
  src = readers.load_caption_jsonl(path, strict=False)
  assert len(src) == 1 and src[0]["caption"] == "ok" and src.num_skipped == 1


def test_caption_csv_every_field_and_bad_rows(tmp_path):
  path = tmp_path / "caps.csv"
  path.write_text('path,caption\nimgs/a.jpg,"a cat, sleeping"\n'
                  'b.jpg,\nc.jpg,a dog\n')
  with pytest.raises(DataError, match="bad caption") as e:
    readers.load_caption_csv(path)
  assert e.value.record == "line 3"
  counter = SkipCounter()
  src = readers.load_caption_csv(path, strict=False, counter=counter,
                                 name="cc")
  assert len(src) == 2 and counter.counts() == {"cc/bad caption": 1}
  rec = src[0]
  check_schema(rec)
  assert rec["caption"] == "a cat, sleeping" and rec["source"] == "cc"
  assert rec["image_path"] == str(tmp_path / "imgs" / "a.jpg")
  assert rec["image_id"] == 2 and src[1]["image_id"] == 4


def test_caption_csv_header_required(tmp_path):
  path = tmp_path / "caps.csv"
  path.write_text("a.jpg,a cat\n")
  with pytest.raises(DataError, match="missing required key: column 'path'"):
    readers.load_caption_csv(path, strict=False)
  path.write_text("file,text\na.jpg,a cat\n")
  src = readers.load_caption_csv(path, image_column="file",
                                 caption_column="text")
  assert src[0]["caption"] == "a cat"


def test_check_boxes_codes():
  boxes, codes = readers.check_boxes(
      [[0, 0, 10, 10], [np.inf, 0, 1, 1], [5, 5, 5, 9], [-3, 0, 5, 5],
       [100.2, 0, 100.8, 5], [-0.5, -0.5, 100.9, 50.9]], 100, 50)
  assert codes.tolist() == [0, 1, 2, 3, 3, 0]
  np.testing.assert_array_equal(boxes[5], [0, 0, 100, 50])


# ----------------------------------------------------------------------------
# WebDataset tar shards (img2dataset output)
# ----------------------------------------------------------------------------


def _jpeg_bytes(w, h, color=(200, 30, 10)):
  buf = io.BytesIO()
  PIL.Image.new("RGB", (w, h), color).save(buf, format="JPEG")
  return buf.getvalue()


def _img2dataset_meta(key, caption, w, h):
  # The fields img2dataset writes in KEY.json (webdataset output format).
  return {"url": f"https://example.com/{key}.jpg", "caption": caption,
          "key": key, "status": "success", "error_message": None,
          "width": w, "height": h, "original_width": 2 * w,
          "original_height": 2 * h, "exif": "{}", "sha256": "0" * 64}


def write_shard(path, samples):
  """samples: (key, {ext: bytes | dict | str}) in member order."""
  with tarfile.open(path, "w") as tar:
    for key, members in samples:
      for ext, value in members.items():
        if isinstance(value, dict):
          value = json.dumps(value).encode()
        elif isinstance(value, str):
          value = value.encode()
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(value)
        tar.addfile(info, io.BytesIO(value))
  return str(path)


def _good_sample(key, caption, w=32, h=24):
  return (key, {"jpg": _jpeg_bytes(w, h), "txt": caption,
                "json": _img2dataset_meta(key, caption, w, h)})


@pytest.fixture
def shards(tmp_path):
  d = tmp_path / "laion"
  d.mkdir()
  write_shard(d / "00000.tar", [_good_sample("000000000", "a red kite"),
                                _good_sample("000000001", "Two dogs ")])
  write_shard(d / "00001.tar", [_good_sample("000010000", "a hot dog", 40,
                                             20)])
  return d


def test_webdataset_every_field(shards):
  src = readers.load_webdataset(str(shards / "{00000..00001}.tar"),
                                name="laion")
  assert (src.name, src.stream, len(src)) == ("laion", "img", 3)
  assert src.shards == (str(shards / "00000.tar"), str(shards / "00001.tar"))
  rec = src[1]
  assert set(rec) == RECORD_KEYS
  assert rec["image_id"] == 1 and rec["caption"] == "Two dogs"
  assert rec["image_path"] == str(shards / "00000.tar" / "000000001.jpg")
  assert (rec["width"], rec["height"]) == (32, 24)
  assert len(rec["boxes"]) == 0 and rec["box_texts"] == []
  image = images.decode_record(rec)["image"]
  assert image.shape == (24, 32, 3) and image.dtype == np.uint8
  rec = src[2]
  assert rec["image_id"] == 10000 and rec["caption"] == "a hot dog"
  assert (rec["width"], rec["height"]) == (40, 20)
  # A glob gives the same records; pickles for grain's workers.
  again = readers.load_webdataset(str(shards / "*.tar"))
  assert [r["caption"] for r in again] == [r["caption"] for r in src]
  assert pickle.loads(pickle.dumps(src))[0]["caption"] == "a red kite"


def test_webdataset_caption_from_json_and_unnumbered_keys(tmp_path):
  path = write_shard(tmp_path / "s.tar", [
      ("dir/img-a", {"jpg": _jpeg_bytes(8, 8), "json": _img2dataset_meta(
          "a", "caption only in json", 8, 8)}),
      ("dir/img-b", {"png": _jpeg_bytes(8, 8), "txt": "no json"})])
  src = readers.load_webdataset(path)
  assert [r["caption"] for r in src] == ["caption only in json", "no json"]
  assert [r["image_id"] for r in src] == [0, 1]
  assert src[1]["image_path"].endswith("s.tar/dir/img-b.png")
  assert (src[1]["width"], src[1]["height"]) == (0, 0)  # Unknown.


WEBDATASET_CASES = {
    "missing_caption": (lambda: {"jpg": _jpeg_bytes(8, 8)},
                        "missing caption"),
    "json_without_caption": (lambda: {"jpg": _jpeg_bytes(8, 8), "json": {
        "url": "u", "status": "success"}}, "missing caption"),
    "empty_caption": (lambda: {"jpg": _jpeg_bytes(8, 8), "txt": "  \n"},
                      "bad caption"),
    "not_utf8": (lambda: {"jpg": _jpeg_bytes(8, 8), "txt": b"\xff\xfe"},
                 "bad caption"),
    "missing_image": (lambda: {"txt": "a cat", "json": {"caption": "a cat"}},
                      "missing image"),
}


@pytest.mark.parametrize("case", sorted(WEBDATASET_CASES))
def test_webdataset_bad_sample_both_modes(tmp_path, case):
  members, reason = WEBDATASET_CASES[case]
  path = write_shard(tmp_path / "00007.tar", [
      _good_sample("000070000", "a red kite"), ("000070001", members()),
      _good_sample("000070002", "a blue kite")])
  with pytest.raises(DataError, match=reason) as e:
    readers.load_webdataset(path)
  assert e.value.file == path and e.value.record == "key '000070001'"
  assert "strict=False" in str(e.value)
  counter = SkipCounter()
  src = readers.load_webdataset(path, strict=False, counter=counter,
                                name="cc12m")
  assert [r["caption"] for r in src] == ["a red kite", "a blue kite"]
  assert counter.counts() == {f"cc12m/{reason}": 1} and src.num_skipped == 1


def test_webdataset_undecodable_image_names_shard_and_key(tmp_path):
  path = write_shard(tmp_path / "00003.tar", [
      ("000030000", {"jpg": b"\xff\xd8 not a jpeg", "txt": "a kite"})])
  rec = readers.load_webdataset(path)[0]
  with pytest.raises(DataError) as e:
    images.decode_record(rec)
  assert e.value.file == os.path.join(path, "000030000.jpg")


def test_webdataset_missing_and_truncated_shards(tmp_path):
  good = write_shard(tmp_path / "00000.tar", [
      _good_sample(f"{k:09d}", f"kite {k}") for k in range(3)])
  with open(good, "rb") as f:
    data = f.read()
  # Cut inside the last sample's image: the first two samples survive.
  cut = data.index(b"000000002.jpg") + 512 + 100
  with open(tmp_path / "00001.tar", "wb") as f:
    f.write(data[:cut])
  pattern = str(tmp_path / "{00000..00002}.tar")  # 00002.tar is missing.
  with pytest.raises(DataError, match="truncated") as e:
    readers.load_webdataset(pattern)
  assert e.value.file == str(tmp_path / "00001.tar")
  counter = SkipCounter()
  src = readers.load_webdataset(pattern, strict=False, counter=counter,
                                name="w")
  assert len(src) == 3 + 2
  assert counter.counts() == {"w/truncated or corrupt tar": 1,
                              "w/missing shard": 1}
  with pytest.raises(DataError, match="no shard matches"):
    readers.load_webdataset(str(tmp_path / "nope" / "*.tar"))


def test_webdataset_shard_is_sniffed_and_feeds_the_vocabulary(shards,
                                                              tmp_path):
  path = str(shards / "00000.tar")
  assert formats.sniff_format(path) == "webdataset"
  renamed = tmp_path / "shard-without-suffix"
  with open(path, "rb") as f, open(renamed, "wb") as g:
    g.write(f.read())
  assert formats.sniff_format(renamed) == "webdataset"
  got = vocab_inputs.read_annotations(path)
  assert got.format == "webdataset"
  assert got.texts == ("a red kite", "Two dogs")


def test_webdataset_pax_and_long_names_and_not_a_tar(tmp_path):
  # Extension headers (a pax record for a non-ASCII name, a GNU long name)
  # go through the tarfile module; the records are the same.
  long_key = "d" * 120 + "/000000005"
  for fmt, key in ((tarfile.PAX_FORMAT, "caf\u00e9-000000004"),
                   (tarfile.GNU_FORMAT, long_key)):
    path = tmp_path / f"{fmt}.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
      for ext, value in (("jpg", _jpeg_bytes(8, 8)), ("txt", b"a kite")):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(value)
        tar.addfile(info, io.BytesIO(value))
    src = readers.load_webdataset(str(path))
    assert len(src) == 1 and src[0]["caption"] == "a kite"
    assert src[0]["image_path"] == f"{path}/{key}.jpg"
    assert images.decode_record(src[0])["image"].shape == (8, 8, 3)
  garbage = tmp_path / "00009.tar"
  garbage.write_bytes(b"<html>not found</html>" * 40)
  with pytest.raises(DataError, match="not a tar file"):
    readers.load_webdataset(str(garbage))
  counter = SkipCounter()
  src = readers.load_webdataset(str(tmp_path / "*.tar"), strict=False,
                                counter=counter, name="w")
  assert len(src) == 2 and counter.counts() == {"w/not a tar file": 1}
