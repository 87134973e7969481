"""Tests for text normalization."""

import pytest

from omnitrain_jax.vocab import text


@pytest.mark.parametrize("plural,singular", [
    ("circles", "circle"), ("boxes", "box"), ("berries", "berry"),
    ("knives", "knife"), ("people", "person"), ("children", "child"),
    ("men", "man"), ("women", "woman"), ("feet", "foot"), ("teeth", "tooth"),
    ("glasses", "glass"), ("dresses", "dress"), ("buses", "bus"),
    ("gases", "gas"), ("lenses", "lens"), ("horses", "horse"),
    ("houses", "house"), ("benches", "bench"), ("beaches", "beach"),
    ("headaches", "headache"), ("dishes", "dish"), ("tomatoes", "tomato"),
    ("shoes", "shoe"), ("movies", "movie"), ("cookies", "cookie"),
    ("pies", "pie"), ("halves", "half"), ("olives", "olive"),
    ("gloves", "glove"), ("boys", "boy"), ("bananas", "banana"),
    ("photos", "photo"), ("viruses", "virus"), ("fuses", "fuse"),
    ("firemen", "fireman"), ("grandchildren", "grandchild"),
    ("t-shirts", "t-shirt"), ("x-rays", "x-ray"), ("cafés", "café"),
])
def test_fold_plural(plural, singular):
  assert text.fold_plural(plural) == singular
  # Idempotent: a singular is never folded again.
  assert text.fold_plural(singular) == singular


@pytest.mark.parametrize("word", [
    "glass", "bus", "dress", "grass", "lens", "series", "species", "news",
    "this", "is", "was", "gas", "cross", "specimen", "sunglasses", "pants",
    "does", "its", "1990s", "o'clock", "cactus", "iris",
])
def test_fold_plural_exceptions_unchanged(word):
  assert text.fold_plural(word) == word


def test_split_words_lowercases_and_keeps_inner_hyphens_and_spans():
  s = "The man's T-Shirt, (on) the LEFT!"
  words, spans = text.split_words(s)
  assert words == ["the", "man", "t-shirt", "on", "the", "left"]
  assert [s[a:b] for a, b in spans] == ["The", "man", "T-Shirt", "on", "the",
                                        "LEFT"]


def test_split_words_unicode_nfkc_spans_index_original():
  # Full-width letters, a ligature, a curly possessive, a combining accent.
  s = "Ｒｅｄ  ﬁsh’s cafe\u0301_bar"
  words, spans = text.split_words(s)
  assert words == ["red", "fish", "café", "bar"]
  assert [s[a:b] for a, b in spans] == ["Ｒｅｄ", "ﬁsh", "cafe\u0301", "bar"]


def test_underscore_and_punctuation_separate_words():
  assert text.normalize_words("hot_dog/traffic-light, boxes.") == [
      "hot", "dog", "traffic-light", "box"]


def test_stop_words_and_numbers_drop_out():
  assert text.content_words("Two red circles and the 3 blue ones") == [
      "red", "circle", "blue"]
  assert text.content_words("the man on the left") == ["man", "left"]
  for w in ("the", "a", "an", "of", "on", "in", "and", "with", "to", "is",
            "two", "three", "dozen", "42"):
    assert text.is_stop_word(w), w
  # Spatial words are the disambiguation signal: never stop words.
  for w in ("left", "right", "top", "bottom", "behind", "middle", "small"):
    assert not text.is_stop_word(w), w


def test_normalize_concept_keeps_inner_stop_words():
  assert text.normalize_concept("Hot Dogs") == "hot dog"
  assert text.normalize_concept("cup of coffee") == "cup of coffee"


@pytest.mark.parametrize("raw,clean", [
    ("hot_dog", "hot dog"), ("bow_(weapon)", "bow"),
    ("bat_(animal)", "bat"), ("Traffic Light", "Traffic Light"),
    # LVIS v1 category 698, as released (a name and a synonym run together).
    ("monitor_(computer_equipment) computer_monitor",
     "monitor/computer monitor"),
])
def test_clean_category_name(raw, clean):
  assert text.clean_category_name(raw) == clean


def test_category_name_variants_splits_alternatives():
  assert text.category_name_variants("Monitor/TV") == ["Monitor", "TV"]
  assert text.category_name_variants("car_(automobile)") == ["car"]
