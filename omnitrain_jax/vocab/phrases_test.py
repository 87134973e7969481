"""Tests of the caption chunker (`phrases.chunk`)."""

from omnitrain_jax.vocab import phrases


def _chunks(text):
  return [(text[p.start:p.end], p.count) for p in phrases.chunk(text)]


def test_shapes_world_captions_chunk_into_their_objects():
  assert _chunks("two red circles, a large blue star and a small green "
                 "square") == [("two red circles", 2), ("a large blue star", 1),
                               ("a small green square", 1)]
  assert _chunks("three orange crosses") == [("three orange crosses", 3)]
  assert _chunks("an orange cross and two large pink hexagons") == [
      ("an orange cross", 1), ("two large pink hexagons", 2)]


def test_real_captions_split_at_conjunctions_prepositions_and_punctuation():
  assert _chunks("A man with a dog on the beach.") == [
      ("A man", 1), ("a dog", 1), ("the beach", 1)]
  assert _chunks("Three dogs playing in front of 2 cats; sky") == [
      ("Three dogs playing", 3), ("2 cats", 2), ("sky", 1)]
  # "next to" is one separator, not "next" + "to".
  assert _chunks("a laptop next to a cup") == [("a laptop", 1), ("a cup", 1)]
  # Separators are whole words: "band", "within" and "tonic" stay.
  assert _chunks("a band within tonic") == [("a band within tonic", 1)]
  assert _chunks("99 balloons") == [("99 balloons", phrases.MAX_COUNT)]


def test_empty_and_separator_only_texts_have_no_phrases():
  assert phrases.chunk("") == []
  assert phrases.chunk(", and with .") == []
