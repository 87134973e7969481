"""Tests for the greedy longest-match tokenizer."""

import pickle

import pytest

from omnitrain_jax.vocab.tokenizer import Tokenizer
from omnitrain_jax.vocab.vocabulary import Vocabulary


@pytest.fixture(name="tok")
def _tok():
  return Tokenizer(Vocabulary([
      "hot dog", "left", "right", "red", "blue", "green", "circle",
      "toolbox", "handle", "dog", "man", "t-shirt", "traffic light",
      "traffic light pole", "can", "cup of coffee", "person"]))


def _surface(enc):
  return [enc.text[s:e] for s, e in enc.spans]


def test_design_examples(tok):
  enc = tok.encode("the hot dog on the left")
  assert enc.tokens == ["hot dog", "left"]
  assert enc.ids == [tok.vocab.id("hot dog"), tok.vocab.id("left")]
  assert enc.unknown == []
  assert tok.encode("a red toolbox handle").tokens == [
      "red", "toolbox", "handle"]


def test_longest_match_prefers_longer_concepts(tok):
  assert tok.encode("traffic light pole").tokens == ["traffic light pole"]
  assert tok.encode("traffic lights").tokens == ["traffic light"]
  # "toolbox handle" becomes one token once it is a concept.
  tok2 = Tokenizer(Vocabulary(["red", "toolbox", "handle", "toolbox handle"]))
  assert tok2.encode("a red toolbox handle").tokens == [
      "red", "toolbox handle"]


def test_multiword_match_needs_adjacent_words(tok):
  # A comma or a stop word between the words breaks the concept.
  assert tok.encode("hot, dog").tokens == ["dog"]
  assert tok.encode("hot and dog").tokens == ["dog"]
  assert tok.encode("hot dog").tokens == ["hot dog"]
  # Stop words inside a concept are part of it.
  assert tok.encode("a cup of coffee").tokens == ["cup of coffee"]


def test_spans_are_original_surface_forms(tok):
  s = "Two HOT Dogs,  the Man’s T-Shirts — at the Left; Traffic  Lights"
  enc = tok.encode(s)
  assert enc.tokens == ["hot dog", "man", "t-shirt", "left", "traffic light"]
  assert _surface(enc) == ["HOT Dogs", "Man", "T-Shirts", "Left",
                           "Traffic  Lights"]


def test_spans_with_unicode_normalization(tok):
  s = "ＲＥＤ circles and a ﬁne cafe\u0301"
  enc = tok.encode(s)
  assert enc.tokens == ["red", "circle"]
  assert _surface(enc) == ["ＲＥＤ", "circles"]
  assert enc.unknown == ["ﬁne", "cafe\u0301"]
  assert enc.unknown_words == ["fine", "café"]


def test_unknown_words_are_reported_not_dropped(tok):
  enc = tok.encode("two purple circles near the Zebras")
  assert enc.tokens == ["circle"]
  assert enc.unknown == ["purple", "near", "Zebras"]
  assert enc.unknown_words == ["purple", "near", "zebra"]
  s = enc.text
  assert [s[a:b] for a, b in enc.unknown_spans] == enc.unknown
  counts = tok.report_unknown(["purple star", "a purple dog", "zebras"])
  assert counts == {"purple": 2, "star": 1, "zebra": 1}


def test_hyphenated_words_fall_back_to_known_parts(tok):
  enc = tok.encode("blue-green hot-dog")
  assert enc.tokens == ["blue", "green", "hot dog"]
  assert _surface(enc) == ["blue", "green", "hot-dog"]
  # A part that is unknown is reported; no known part: reported whole.
  enc = tok.encode("blue-ish well-known")
  assert enc.tokens == ["blue"]
  assert enc.unknown == ["ish", "well-known"]


def test_concept_beats_stop_word(tok):
  # "can" is a concept here (LVIS has a category "can").
  assert tok.encode("a can of soda").tokens == ["can"]
  assert Tokenizer(Vocabulary(["soda"])).encode("a can of soda").unknown == []


def test_encode_ids_dedup(tok):
  v = tok.vocab
  assert tok.encode_ids("red dog, red dog") == [v.id("red"), v.id("dog")]
  assert tok.encode_ids("red dog, red dog", dedup=False) == [
      v.id("red"), v.id("dog"), v.id("red"), v.id("dog")]
  assert tok.encode_ids("the of and") == []


def test_ids_in_spans_selects_tokens_inside_phrase_spans(tok):
  s = "the man on the left next to a hot dog"
  enc = tok.encode(s)
  man_left = (s.index("man"), s.index("left") + 4)
  assert enc.ids_in_spans([man_left]) == [tok.vocab.id("man"),
                                          tok.vocab.id("left")]
  dog = s.index("hot dog")
  assert enc.ids_in_spans([(0, 7), (dog, dog + 7)]) == [
      tok.vocab.id("man"), tok.vocab.id("hot dog")]
  # Partial overlap with a concept does not count.
  assert enc.ids_in_spans([(dog + 4, dog + 7)]) == []


def test_encode_query(tok):
  enc = tok.encode_query("purple circle")
  assert enc.tokens == ["circle"] and enc.unknown == ["purple"]
  with pytest.raises(ValueError, match="no token in the vocabulary"):
    tok.encode_query("purple zebra")
  with pytest.raises(ValueError, match="only stop words"):
    tok.encode_query("the two of them")


def test_plural_folding_and_irregulars_in_text(tok):
  assert tok.encode("people and men").tokens == ["person", "man"]


def test_tokenizer_pickles(tok):
  tok2 = pickle.loads(pickle.dumps(tok))
  assert tok2.encode("hot dogs").ids == tok.encode("hot dogs").ids
