"""Tests for reading annotation files into the vocabulary builder."""

import json
import pickle

import pytest

from omnitrain_jax.data import vocab_inputs
from omnitrain_jax.data.errors import DataError
from omnitrain_jax.vocab.tokenizer import Tokenizer

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "star")
COCO_NAMES = ("person", "dog", "bear", "hot dog", "traffic light",
              "teddy bear", "baseball bat", "baseball glove", "wine glass")


def _write_json(path, obj):
  path.write_text(json.dumps(obj))
  return path


def _instances(path, names, boxes_per_category=1, **extra):
  cats = [dict(id=i + 1, name=n, **extra) for i, n in enumerate(names)]
  anns = [dict(id=len(cats) * k + i, image_id=1, category_id=i + 1,
               bbox=[0, 0, 5, 5])
          for k in range(boxes_per_category) for i in range(len(cats))]
  return _write_json(path, {"images": [{"id": 1, "file_name": "a.jpg"}],
                            "annotations": anns, "categories": cats})


def _shapes(tmp_path):
  return _instances(tmp_path / "shapes.json",
                    [f"{c} {s}" for c in COLORS for s in SHAPES])


def _coco(tmp_path):
  return _instances(tmp_path / "coco.json", COCO_NAMES, boxes_per_category=2)


def test_colour_shape_categories_split_into_words(tmp_path):
  vocab, summary = vocab_inputs.build_from_files([_shapes(tmp_path)],
                                                  max_size=100)
  concepts = set(vocab.tokens[2:])
  assert concepts == set(COLORS) | set(SHAPES)
  assert summary["num_split_category_names"] == len(COLORS) * len(SHAPES)
  # Each colour and shape counts the boxes of every category it is part of.
  assert vocab.counts[vocab.id("red")] == len(SHAPES)
  assert vocab.counts[vocab.id("circle")] == len(COLORS)
  tok = Tokenizer(vocab)
  assert tok.encode("two red circles").tokens == ["red", "circle"]


def test_coco_multiword_names_stay_whole(tmp_path):
  vocab, summary = vocab_inputs.build_from_files([_coco(tmp_path)],
                                                  max_size=100)
  assert set(vocab.tokens[2:]) == set(COCO_NAMES)
  assert summary["num_split_category_names"] == 0
  assert vocab.counts[vocab.id("hot dog")] == 2
  assert Tokenizer(vocab).encode("the hot dog on the left").tokens == [
      "hot dog"]


def test_split_categories_forces_splitting(tmp_path):
  vocab, _ = vocab_inputs.build_from_files([_coco(tmp_path)], max_size=100,
                                      split_categories=True)
  assert "hot dog" not in vocab
  assert {"hot", "dog", "traffic", "light", "teddy"} <= set(vocab.tokens)


def test_lvis_names_synonyms_and_senses(tmp_path):
  cats = [
      {"id": 1, "name": "hot_dog", "synonyms": ["hot_dog", "frankfurter"],
       "frequency": "c"},
      {"id": 2, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)"],
       "frequency": "r"},
      {"id": 3, "name": "bow_(decorative_ribbons)", "synonyms": ["bow"],
       "frequency": "f"},
      {"id": 4, "name": "can", "synonyms": ["can", "tin_can"],
       "frequency": "f"},
  ]
  path = _write_json(tmp_path / "lvis.json", {
      "images": [{"id": 1, "neg_category_ids": [], "height": 9, "width": 9}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 3,
                       "bbox": [0, 0, 1, 1]}],
      "categories": cats})
  src = vocab_inputs.read_annotations(path)
  assert src.format == "lvis"
  vocab, _ = vocab_inputs.build_from_files([src], max_size=100)
  assert set(vocab.tokens[2:]) == {"hot dog", "frankfurter", "bow", "can",
                                   "tin can"}
  assert vocab.counts[vocab.id("bow")] == 1


def test_reads_every_format(tmp_path):
  mdetr = _write_json(tmp_path / "final_flickr_train.json", {
      "images": [{"id": 1, "file_name": "a.jpg", "caption": "A man in a hat",
                  "tokens_positive_eval": [[[2, 5]]]}],
      "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1],
                       "tokens_positive": [[2, 5]], "category_id": 1}],
      "categories": [{"id": 1, "name": "object"}]})
  caps = _write_json(tmp_path / "captions.json", {
      "images": [{"id": 1}],
      "annotations": [{"id": 1, "image_id": 1, "caption": "A cat sleeping"}]})
  jsonl = tmp_path / "laion.jsonl"
  jsonl.write_text('{"image": "a.jpg", "caption": "purple stars"}\n'
                   '{"image": "b.jpg", "caption": "a hexagon"}\n')
  csv_path = tmp_path / "caps.csv"
  csv_path.write_text('path,caption\na.jpg,"a pink ring, left"\n')
  refs = tmp_path / "refs(umd).p"
  refs.write_bytes(pickle.dumps([
      {"ref_id": 0, "category_id": 1, "sentences": [
          {"sent": "the man on the left", "raw": "The man on the left."},
          {"sent": "left guy", "raw": "left guy"}]}], protocol=2))
  got = {p.name: vocab_inputs.read_annotations(p)
         for p in (mdetr, caps, jsonl, csv_path, refs, _coco(tmp_path))}
  assert got[mdetr.name].format == "mdetr_grounding"
  assert got[mdetr.name].texts == ("A man in a hat",)
  assert got[caps.name].format == "coco_captions"
  assert got[jsonl.name].format == "caption_jsonl"
  assert got[jsonl.name].texts == ("purple stars", "a hexagon")
  assert got[csv_path.name].format == "caption_csv"
  assert got[refs.name].format == "refcoco"
  assert got[refs.name].texts == ("the man on the left", "left guy")
  assert got["coco.json"].format == "coco_instances"
  assert [c.num_boxes for c in got["coco.json"].categories] == [2] * len(
      COCO_NAMES)

  vocab, summary = vocab_inputs.build_from_files(list(got.values()),
                                                  max_size=100)
  assert {"man", "hat", "cat", "sleeping", "purple", "star", "hexagon",
          "pink", "ring", "left", "guy"} <= set(vocab.tokens)
  assert vocab.counts[vocab.id("left")] == 3
  # The MDETR dummy category "object" is not a concept.
  assert "object" not in vocab
  assert summary["texts"] == 7


@pytest.mark.parametrize("content,match", [
    ('{"info": {}}', "unrecognized keys"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1}]}',
     "no 'name'"),
    ('{"caption": "a"}\n{"image": "b.jpg"}\n', "line 2"),
    ("path,text\na.jpg,hello\n", "no 'caption' column"),
    ('{"broken": ', "not valid JSON"),
])
def test_unrecognized_or_malformed_files_name_the_problem(tmp_path, content,
                                                          match):
  path = tmp_path / "bad.json"
  path.write_text(content)
  with pytest.raises(DataError, match=match) as e:
    vocab_inputs.read_annotations(path)
  assert str(path) in str(e.value)


def test_max_size_caps_words_but_keeps_categories(tmp_path):
  caps = _write_json(tmp_path / "caps.json", {"annotations": [
      {"id": i, "image_id": 1, "caption": c} for i, c in enumerate(
          ["zebra zebra zebra giraffe giraffe kite", "zebra giraffe",
           "a hot dog"])]})
  vocab, summary = vocab_inputs.build_from_files(
      [_coco(tmp_path), caps], max_size=2 + len(COCO_NAMES) + 1)
  assert set(COCO_NAMES) <= set(vocab.tokens)
  # Only the most frequent caption word fits.
  assert "zebra" in vocab and "giraffe" not in vocab and "kite" not in vocab
  assert summary["cut_by_max_size"] == 2
  assert vocab.counts[vocab.id("hot dog")] == 2 + 1  # boxes + caption
  # Categories are kept even when they alone exceed max_size.
  vocab, summary = vocab_inputs.build_from_files([_coco(tmp_path), caps],
                                                  max_size=4)
  assert len(vocab) == 2 + len(COCO_NAMES)
  assert summary["categories_over_max_size"]


def test_min_count_and_bigrams(tmp_path):
  texts = (["a hot dog stand"] * 4 + ["red circle", "red square",
                                       "blue circle"] * 3
           + ["a dog", "a stand", "hot tea"])
  caps = _write_json(tmp_path / "c.json", [{"caption": t} for t in texts])
  shapes = _shapes(tmp_path)
  vocab, summary = vocab_inputs.build_from_files([caps], max_size=100,
                                                  min_count=3)
  assert "hot dog" not in vocab and "hot" in vocab and "tea" not in vocab
  assert summary["cut_by_min_count"] == 1
  vocab, _ = vocab_inputs.build_from_files([caps, shapes], max_size=100,
                                            min_bigram_count=3)
  # A frequent collocation becomes a concept; a split category name and a
  # combination of frequent words do not.
  assert "hot dog" in vocab
  assert "red circle" not in vocab and "blue circle" not in vocab
  assert Tokenizer(vocab).encode("hot dogs").tokens == ["hot dog"]


def test_lenient_mode_skips_and_counts_captions_that_are_numbers(tmp_path):
  from omnitrain_jax.data import errors  # pylint: disable=g-import-not-at-top
  grd = tmp_path / "final_grd.json"
  grd.write_text(json.dumps({
      "images": [{"id": 1, "file_name": "a.jpg", "caption": "a red star",
                  "height": 10, "width": 10},
                 {"id": 2, "file_name": "b.jpg", "caption": 12,
                  "height": 10, "width": 10}],
      "annotations": [], "categories": []}))
  caps = tmp_path / "captions.json"
  caps.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                              "annotations": [{"image_id": 1, "id": 1,
                                               "caption": 3.5}]}))
  for path in (grd, caps):  # Strict (the default): an error naming it.
    with pytest.raises(errors.DataError, match="bad caption"):
      vocab_inputs.build_from_files([path], max_size=100)
  counter = errors.SkipCounter()
  vocab, summary = vocab_inputs.build_from_files(
      [grd, caps], max_size=100, strict=False, counter=counter)
  assert "star" in vocab.tokens
  assert summary["skipped"] == {"vocabulary/bad caption": 2}
  assert counter.counts() == {"vocabulary/bad caption": 2}
  assert "images[1] (id 2)" in counter.report()
