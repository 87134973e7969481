"""Tests for the Vocabulary class and its file format."""

import numpy as np
import pytest

from omnitrain_jax.vocab import vocabulary
from omnitrain_jax.vocab.vocabulary import Vocabulary


def _vocab():
  return Vocabulary(["person", "hot dog", "left", "right", "leftmost",
                     "rightmost", "left side", "right side", "left-hand",
                     "right-hand", "left ear", "bright"],
                    counts=np.arange(12) * 10)


def test_reserved_ids_and_lookup():
  v = _vocab()
  assert v.token(vocabulary.PAD_ID) == "<pad>"
  assert v.token(vocabulary.UNK_ID) == "<unk>"
  assert v.id("person") == vocabulary.NUM_RESERVED
  assert v.id("hot dog") == 3
  assert v.id("no such token") == vocabulary.UNK_ID
  assert "hot dog" in v and "hot" not in v
  assert len(v) == 14
  assert v.max_concept_words == 2
  assert v.counts.dtype == np.int64 and v.counts.shape == (14,)
  assert v.counts[:2].tolist() == [0, 0] and v.counts[3] == 10
  np.testing.assert_array_equal(v.ids(["left", "nope"]),
                                [4, vocabulary.UNK_ID])


def test_save_load_round_trip(tmp_path):
  v = _vocab()
  path = tmp_path / "vocab.txt"
  v.save(path)
  lines = path.read_text().splitlines()
  assert lines[:3] == ["<pad>\t0", "<unk>\t0", "person\t0"]
  assert lines[3] == "hot dog\t10"
  w = Vocabulary.load(path)
  assert w.tokens == v.tokens
  np.testing.assert_array_equal(w.counts, v.counts)
  # Saving over an existing file works (atomic replace).
  v.save(path)
  assert Vocabulary.load(path).tokens == v.tokens


def test_load_file_without_reserved_or_counts(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("red\ncircle\t7\nhot dog\n")
  v = Vocabulary.load(path)
  assert v.tokens == ("<pad>", "<unk>", "red", "circle", "hot dog")
  assert v.counts.tolist() == [0, 0, 0, 7, 0]


@pytest.mark.parametrize("content,match", [
    ("red\n\ncircle\n", r"vocab.txt:2: empty token"),
    ("red\t3\ncircle\tmany\n", r"vocab.txt:2: count .many."),
    ("red\ncircle\nred\n", "Duplicate token 'red'"),
    ("red\n<unk>\n", "Duplicate token '<unk>'"),
    ("red  circle\n", "Bad token"),
    ("", "empty"),
])
def test_load_rejects_malformed_files(tmp_path, content, match):
  path = tmp_path / "vocab.txt"
  path.write_text(content)
  with pytest.raises(ValueError, match=match):
    Vocabulary.load(path)


def test_load_missing_file_says_how_to_build(tmp_path):
  with pytest.raises(FileNotFoundError, match="omnitrain_jax.data.build_vocab"):
    Vocabulary.load(tmp_path / "nope.txt")


def test_constructor_validates_counts():
  with pytest.raises(ValueError, match="one count per token"):
    Vocabulary(["a", "b"], counts=[1])
  with pytest.raises(ValueError, match="Negative count"):
    Vocabulary(["red", "blue"], counts=[1, -1])


def test_mirror_map_swaps_left_and_right():
  v = _vocab()
  pairs = {(v.token(a), v.token(b)) for a, b in v.mirror_pairs().tolist()}
  assert pairs == {("left", "right"), ("leftmost", "rightmost"),
                   ("left side", "right side"), ("left-hand", "right-hand")}
  ids = np.array([[v.id("left"), v.id("person"), 0],
                  [v.id("right side"), v.id("left ear"), v.id("bright")]])
  mirrored = v.mirror_ids(ids)
  assert mirrored.shape == ids.shape
  expected = np.array([[v.id("right"), v.id("person"), 0],
                       # "right ear" is absent: "left ear" stays.
                       [v.id("left side"), v.id("left ear"), v.id("bright")]])
  np.testing.assert_array_equal(mirrored, expected)
  # A flip twice is the identity.
  np.testing.assert_array_equal(v.mirror_ids(mirrored), ids)


def test_mirror_map_is_vectorized_at_large_vocabulary():
  tokens = [f"w{i}" for i in range(200_000)] + ["left", "right"]
  v = Vocabulary(tokens)
  m = v.mirror_map()
  assert m.shape == (len(v),) and m.dtype == np.int32
  assert (m != np.arange(len(v))).sum() == 2
  assert v.mirror_ids(np.array([v.id("left")]))[0] == v.id("right")
