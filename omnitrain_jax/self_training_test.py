"""Tests of self_training.py's parts (the trainer's use: tests/self_train_test.py)."""

import json

import grain
import pytest

from omnitrain_jax import self_training
from omnitrain_jax.data import preparation
from omnitrain_jax.data import schema
from omnitrain_jax.vocab import tokenizer as tokenizer_lib
from omnitrain_jax.vocab import vocabulary as vocabulary_lib


@pytest.fixture(name="tok")
def _tok():
  return tokenizer_lib.Tokenizer(vocabulary_lib.Vocabulary(
      ["red", "blue", "hexagon", "circle", "large", "dog", "beach"]))


def test_phrase_names_all_tokens_or_name_words_only(tok):
  caption = "two large red hexagons on the beach, a blue circle and a cat"
  # No name words: every known token of a phrase; "a cat" has none.
  assert self_training.phrase_names(tok, caption) == [
      ("large red hexagon", 2), ("beach", 1), ("blue circle", 1)]
  assert self_training.phrase_names(
      tok, caption, {"red", "blue", "hexagon", "circle"}) == [
          ("red hexagon", 2), ("blue circle", 1)]


def test_image_names_take_the_largest_count_over_captions(tok):
  names = self_training.image_names(
      tok, ["two red hexagons", "a red hexagon and a red hexagon",
            "three blue circles", ""], {"red", "blue", "hexagon", "circle"})
  # Caption 2 names "red hexagon" twice (1 + 1): the max is 2, not 2 + 2.
  assert names == {"red hexagon": 2, "blue circle": 3}
  assert self_training.image_names(tok, []) == {}


def _rec(path, caption, image_id, source="caps"):
  return {"image_path": path, "caption": caption, "image_id": image_id,
          "width": 10, "height": 8, "source": source}


def test_caption_images_group_captions_keep_ids_and_subsample(tok):
  recs = [_rec("/d/b.png", "a red hexagon", 7), _rec("/d/a.png", "a dog", 3),
          _rec("/d/b.png", "two red hexagons", 7)]
  ims = self_training.caption_images(recs, tok)
  assert [(im.path, im.image_id, im.names) for im in ims] == [
      ("/d/a.png", 3, {"dog": 1}), ("/d/b.png", 7, {"red hexagon": 2})]
  assert (ims[0].width, ims[0].height) == (10, 8)
  # Two sources with the same ids: the files are numbered 1..N instead.
  clash = recs + [_rec("/e/c.png", "a dog", 3, source="other")]
  assert [im.image_id for im in self_training.caption_images(clash, tok)] == [
      1, 2, 3]
  # A fixed random subset: the same for the same seed, of the asked size.
  many = [_rec(f"/d/{i:03d}.png", "a dog", i) for i in range(50)]
  sub = self_training.caption_images(many, tok, max_images=5, seed=1)
  assert len(sub) == 5
  assert sub == self_training.caption_images(many, tok, max_images=5, seed=1)
  assert sub != self_training.caption_images(many, tok, max_images=5, seed=2)


def test_caption_images_without_a_file_name_the_record(tok):
  rec = _rec(None, "a dog", 12, source="laion_shards")
  with pytest.raises(ValueError, match=r"record 12 of source 'laion_shards'"):
    self_training.caption_images([rec], tok)


def _det(query, score, box):
  return {"query": query, "score": score, "box_xywh": box}


def test_select_by_hand():
  dets = [_det("red hexagon", 0.9, [0, 0, 10, 10]),
          _det("red hexagon", 0.8, [1, 0, 10, 10]),  # Overlaps the first.
          _det("blue circle", 0.4, [50, 50, 10, 10]),
          _det("blue circle", 0.29, [80, 80, 10, 10])]  # Below 0.3.
  kept = self_training.select(dets, {"red hexagon": 2, "blue circle": 2}, 0.3)
  assert [d["score"] for d in kept] == [0.9, 0.4]
  # The order of the detections does not matter.
  assert self_training.select(dets[::-1], {"red hexagon": 2,
                                           "blue circle": 2}, 0.3) == kept
  assert self_training.xywh_iou([0, 0, 10, 10], [5, 0, 10, 10]) == (
      pytest.approx(50 / 150))


def _info(tmp_path):
  spec = schema.Spec(image_size=32)
  vocab = vocabulary_lib.Vocabulary(["red"])
  return preparation.DataInfo(
      root=str(tmp_path), sources={"det": {}, "grd": {}, "img": {}},
      vocab_path="", vocab=vocab, tokenizer=tokenizer_lib.Tokenizer(vocab),
      spec=spec)


def test_with_pseudo_adds_a_det_source_only_when_there_are_boxes(tmp_path):
  info = _info(tmp_path)
  assert self_training.with_pseudo(info, None, 0.5) is info
  empty = tmp_path / "empty.json"
  empty.write_text(json.dumps({"images": [], "annotations": [],
                               "categories": []}))
  assert self_training.with_pseudo(info, str(empty), 0.5) is info
  full = tmp_path / "full.json"
  self_training.write_json(str(full), {"images": [{"id": 1}],
                                       "annotations": [{"id": 1}],
                                       "categories": []})
  # Atomic: no temporary file is left next to it.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.json",
                                                        "full.json"]
  got = self_training.with_pseudo(info, str(full), 0.25)
  spec = got.sources["det"]["pseudo"]
  assert (spec.reader, spec.train, spec.weight) == ("coco_instances",
                                                    str(full), 0.25)
  assert info.sources["det"] == {}  # Not changed in place.


def _build(label_step):
  """A pipeline per labelling step: its items say which one they came from."""
  offset = 0 if label_step is None else 1000 * label_step
  return iter(grain.MapDataset.range(offset, offset + 100).to_iter_dataset())


def test_phased_data_state_names_the_labels_and_the_position():
  data = self_training.PhasedData(_build)
  assert [next(data) for _ in range(3)] == [0, 1, 2]
  data.switch(4)
  assert [next(data) for _ in range(2)] == [4000, 4001]
  state = data.get_state()
  assert isinstance(state, bytes) and json.loads(state)["label_step"] == 4
  after = [next(data) for _ in range(3)]
  resumed = self_training.PhasedData(_build)
  resumed.set_state(state)
  resumed.start_prefetch()
  assert resumed.label_step == 4
  assert [next(resumed) for _ in range(3)] == after == [4002, 4003, 4004]
  # Back to a state before the first labels.
  early = self_training.PhasedData(_build)
  next(early)
  resumed.set_state(early.get_state())
  assert resumed.label_step is None and next(resumed) == 1


def test_phased_data_restores_a_plain_iterators_state():
  """A checkpoint of a run saved before self-training was turned on."""
  plain = _build(None)
  for _ in range(5):
    next(plain)
  data = self_training.PhasedData(_build)
  data.set_state(json.dumps(plain.get_state()).encode())
  assert data.label_step is None and next(data) == 5


def test_resolve_steps_fractions_and_steps():
  assert self_training.resolve_steps((0.6, 0.8), 5000) == [3000, 4000]
  assert self_training.resolve_steps((4000, 0.6, 3000), 5000) == [3000, 4000]
  assert self_training.resolve_steps((0.6,), 10) == [6]
  assert self_training.resolve_steps((), 10) == []
  with pytest.raises(ValueError, match=r"5000 is step 5000, not between 1 "
                     r"and config.total_steps - 1 = 4999"):
    self_training.resolve_steps((5000,), 5000)
  with pytest.raises(ValueError, match="neither a fraction"):
    self_training.resolve_steps((2.5,), 5000)
  with pytest.raises(ValueError, match="neither a fraction"):
    self_training.resolve_steps((0,), 5000)
  # A fraction that rounds to step 0 of a short run.
  with pytest.raises(ValueError, match="is step 0"):
    self_training.resolve_steps((0.01,), 10)
