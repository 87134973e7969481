"""Tests for the vocabulary builder's counting rules (no files: the files are
read by `omnitrain_jax.data.vocab_inputs`, tested there)."""

import pytest

from omnitrain_jax.vocab import builder
from omnitrain_jax.vocab.tokenizer import Tokenizer
from omnitrain_jax.vocab.vocabulary import Vocabulary


def test_category_rule_is_per_dataset_and_positional():
  # "dog collar" shares "dog" with "hot dog" but not at the same position.
  out = builder.category_concepts(
      ["hot dog", "dog collar", "dog bed", "hot sauce", "hot plate", "dog"])
  assert out["hot dog"] == ["hot dog"]
  grid = [f"{z} {c} {s}" for z in ("small", "medium", "large")
          for c in ("red", "blue", "green") for s in ("circle", "square",
                                                      "star")]
  out = builder.category_concepts(grid[:-1])  # Not every cell is needed.
  assert out["small red circle"] == ["small", "red", "circle"]
  # One partner is not enough by default; it is with min_partners=1.
  names = ["red circle", "red square", "blue circle", "blue square"]
  assert builder.category_concepts(names)["red circle"] == ["red circle"]
  assert builder.category_concepts(names, min_partners=1)["red circle"] == [
      "red", "circle"]


def test_builds_from_categories_and_texts():
  files = [
      builder.AnnotationFile("shapes.json", "coco_instances", categories=tuple(
          builder.Category(f"{c} {s}", num_boxes=2)
          for c in ("red", "blue", "green") for s in ("circle", "star",
                                                      "square"))),
      builder.AnnotationFile("lvis.json", "lvis", categories=(
          builder.Category("hot_dog", ("frankfurter",), 1),)),
      builder.AnnotationFile("caps.jsonl", "caption_jsonl",
                             texts=("two red hot dogs", "a kite")),
  ]
  vocab, summary = builder.build_vocabulary(files, max_size=100)
  assert set(vocab.tokens[2:]) == {"red", "blue", "green", "circle", "star",
                                   "square", "hot dog", "frankfurter", "kite"}
  assert vocab.counts[vocab.id("red")] == 3 * 2 + 1
  assert vocab.counts[vocab.id("hot dog")] == 1 + 1
  assert summary["texts"] == 2
  assert [f["format"] for f in summary["files"]] == [
      "coco_instances", "lvis", "caption_jsonl"]
  with pytest.raises(ValueError, match="max_size=2 leaves no room"):
    builder.build_vocabulary(files, max_size=2)


def test_fast_text_counting_equals_tokenizing_every_text():
  tok = Tokenizer(Vocabulary([
      "hot dog", "hot-air balloon", "dog", "red", "circle", "t-shirt",
      "man", "can", "traffic light", "left"]))
  texts = [
      "Two hot dogs and a dog", "hot, dog", "the man's T-shirts on the left",
      "red-hot circles", "a hot-air balloon over traffic lights", "hot tea",
      "blue-ish well-known men", "ＲＥＤ circles’ cafe\u0301", "it can't 7",
      "o'clock rock'n'roll DOGS", "", "hot-dog stand", "Traffic\nlight",
  ] * 3
  fast = builder.count_text_tokens(tok, texts)
  slow = builder.count_text_tokens(tok, texts, fast=False)
  assert fast == slow
  tokens, unknown, _ = fast
  assert tokens["hot dog"] == 2 * 3 and tokens["dog"] == 3 * 3
  assert tokens["traffic light"] == 2 * 3
  assert unknown["tea"] == 3 and unknown["hot"] == 3 * 3


def test_real_compound_names_stay_whole_and_grids_split():
  # Real LVIS v1 names (with synonyms, one group per category): under the
  # earlier rule "fire truck" split, since "fire alarm", "fire hose" and
  # "pickup truck", "tow truck" are names; those overlaps do not combine.
  lvis = [("fire_engine", "fire_truck"), ("fire_alarm", "smoke_alarm"),
          ("fire_hose",), ("fire_extinguisher", "extinguisher"),
          ("pickup_truck",), ("tow_truck",), ("garbage_truck",),
          ("truck",), ("ski",), ("ski_pole",), ("ski_boot",),
          ("ski_parka", "ski_jacket"), ("telephone_pole", "telegraph_pole",
                                        "telegraph_post"), ("pole", "post")]
  out = builder.category_concepts(lvis)
  assert out["fire_truck"] == ["fire truck"]
  assert out["ski_pole"] == ["ski pole"]
  assert out["telephone_pole"] == ["telephone pole"]
  # Synonyms of one category are no partners: chain/ring x mail/armor.
  out = builder.category_concepts(
      [("chain_mail", "ring_mail", "chain_armor", "ring_armor"),
       ("armor",)], min_partners=1)
  assert out["ring_armor"] == ["ring armor"]
  # The same names as separate categories form a grid.
  assert builder.category_concepts(
      ["chain mail", "ring mail", "chain armor", "ring armor"],
      min_partners=1)["ring armor"] == ["ring", "armor"]
  # A full colour x shape grid splits without --split_categories.
  grid = [f"{c} {s}" for c in ("red", "green", "blue")
          for s in ("circle", "square", "star")]
  assert builder.category_concepts(grid)["blue star"] == ["blue", "star"]
  # Swappable words that never combine: a chain, not a grid.
  chain = ["red circle", "red square", "red star", "green circle",
           "blue circle", "black ring"]
  assert builder.category_concepts(chain)["red circle"] == ["red circle"]
