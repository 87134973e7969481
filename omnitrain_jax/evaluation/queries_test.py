"""Tests for evaluation queries."""

import numpy as np
import pytest

from omnitrain_jax.evaluation import queries
from omnitrain_jax.vocab.tokenizer import Tokenizer
from omnitrain_jax.vocab.vocabulary import Vocabulary


@pytest.fixture(name="tok")
def _tok():
  return Tokenizer(Vocabulary([
      "hot dog", "bow", "red", "circle", "star", "monitor", "tv", "left",
      "small", "dog"]))


def _ids(tok, *tokens):
  return tuple(tok.vocab.id(t) for t in tokens)


def test_category_names_are_cleaned_and_split_into_variants(tok):
  q = queries.category_query(tok, "hot_dog")
  assert q.variants == (_ids(tok, "hot dog"),) and not q.unknown
  assert queries.category_query(tok, "bow_(weapon)").variants == (
      _ids(tok, "bow"),)
  q = queries.category_query(tok, "Monitor/TV")
  assert q.variants == (_ids(tok, "monitor"), _ids(tok, "tv"))


def test_unknown_words_are_reported_and_empty_queries_flagged(tok):
  q = queries.category_query(tok, "red zebra")
  assert q.variants == (_ids(tok, "red"),)
  assert q.unknown == ("zebra",) and not q.empty
  q = queries.category_query(tok, "giraffe")
  assert q.empty and q.unknown == ("giraffe",)
  report = queries.QueryReport("test")
  report.add_all([queries.category_query(tok, n)
                  for n in ("red circle", "red zebra", "giraffe", "zebra")])
  assert report.metrics() == {"unknown_query_words": 2.0,
                              "queries_with_unknown_words": 3.0,
                              "queries_without_tokens": 2.0}
  assert report.to_json()["unknown_words"] == {"zebra": 2, "giraffe": 1}
  assert report.to_json()["queries_without_tokens"] == ["giraffe", "zebra"]
  report.log()  # Must not raise.


def test_text_query(tok):
  q = queries.text_query(tok, "the small red circles, please")
  assert q.variants == (_ids(tok, "small", "red", "circle"),)
  assert q.unknown == ("please",)
  assert q.tokens == (("small", "red", "circle"),)


def test_user_query_warns_about_what_it_leaves_out(tok, monkeypatch):
  warnings = []
  monkeypatch.setattr(queries.logging, "warning",
                      lambda msg, *args: warnings.append(msg % args))
  q = queries.user_query(tok, "red zebra")
  assert q == queries.text_query(tok, "red zebra")
  assert queries.user_query(tok, "giraffe").empty
  assert queries.user_query(tok, "red circle").variants
  assert len(warnings) == 2
  assert "left out: ['zebra']" in warnings[0]
  assert "finds nothing" in warnings[1] and "giraffe" in warnings[1]


def test_phrase_query_takes_tokens_inside_the_spans(tok):
  caption = "the small red circle on the left and a star"
  enc = tok.encode(caption)
  a = caption.index("small")
  phrase = queries.phrase_query(enc, [[a, a + 16],
                                      [caption.index("left"),
                                       caption.index("left") + 4]])
  assert phrase.variants == (_ids(tok, "small", "red", "circle", "left"),)
  star = caption.index("star")
  assert queries.phrase_query(enc, [[star, star + 4]]).variants == (
      _ids(tok, "star"),)
  # No spans: the whole caption.
  assert list(queries.phrase_query(enc, []).variants[0]) == enc.unique_ids()
  # A span cutting through "hot dog" falls back to the overlapping token.
  enc = tok.encode("a hot dog")
  assert queries.phrase_query(enc, [[6, 9]]).variants == (
      _ids(tok, "hot dog"),)
  # Unknown words count only inside the spans.
  enc = tok.encode("red zebra and blue circle")
  q = queries.phrase_query(enc, [[0, 9]])
  assert q.unknown == ("zebra",) and q.variants == (_ids(tok, "red"),)


def test_token_union_layout(tok):
  qs = [queries.category_query(tok, n)
        for n in ("red circle", "giraffe", "Monitor/TV", "red star")]
  union = queries.TokenUnion.build(qs, chunk_size=2)
  real = union.token_ids[union.token_ids > 0]
  assert sorted(real.tolist()) == sorted(
      set(_ids(tok, "red", "circle", "monitor", "tv", "star")))
  assert len(union.token_ids) % union.chunk_size == 0
  # Variants: red circle, monitor, tv, red star; giraffe has none.
  np.testing.assert_array_equal(union.groups,
                                [[0, -1], [-1, -1], [1, 2], [3, -1]])
  assert not union.trivial_groups
  np.testing.assert_allclose(union.weights.sum(0), 1.0)
  red = list(union.token_ids).index(tok.vocab.id("red"))
  np.testing.assert_allclose(union.weights[red], [0.5, 0, 0, 0.5])
  simple = queries.TokenUnion.build(qs[:1] + qs[3:], chunk_size=1024)
  assert simple.trivial_groups and simple.chunk_size == 3
  # 5 tokens in chunks of at most 4: two even chunks of 3, not 4 + 4.
  assert union.chunk_size == 2 and len(union.token_ids) == 6
  assert len(queries.TokenUnion.build(qs, chunk_size=4).token_ids) == 6


def test_pad_queries(tok):
  qs = [queries.text_query(tok, "red circle"), queries.text_query(tok, "xyz")]
  out = queries.pad_queries(qs, 3, 2)
  np.testing.assert_array_equal(out, [list(_ids(tok, "red", "circle")),
                                      [0, 0], [0, 0]])
  with pytest.raises(ValueError, match="max_tokens"):
    queries.pad_queries(qs, 3, 1)
  with pytest.raises(ValueError, match="room"):
    queries.pad_queries(qs, 1, 2)


def test_token_union_weight_entries_without_building(tok):
  qs = [queries.category_query(tok, n)
        for n in ("red circle", "Monitor/TV", "giraffe", "star")]
  for chunk in (1, 2, 4, 1024):
    union = queries.TokenUnion.build(qs, chunk_size=chunk)
    assert queries.TokenUnion.weight_entries(qs, chunk) == union.weights.size


def test_query_chunks_layout():
  qs = [queries.Query("a/b", variants=((5, 6), (7,))),
        queries.Query("none", variants=()),
        queries.Query("c", variants=((8, 9, 8),)),  # A repeated token.
        queries.Query("d", variants=((4,),)),
        queries.Query("e", variants=((3,),))]
  # G = 2 variants, L = 2 tokens (after dropping the repeat): 4 tokens a
  # query; 9 tokens a step -> 2 queries a chunk -> 3 chunks, one padding.
  chunks = queries.QueryChunks.build(qs, chunk_tokens=9)
  assert chunks.tokens.shape == (3, 2, 2, 2)
  assert chunks.num_queries == 5 and chunks.chunk_queries == 2
  assert chunks.tokens.shape[1] * 2 * 2 <= 9  # The memory bound.
  flat = chunks.tokens.reshape(6, 2, 2)
  np.testing.assert_array_equal(flat[0], [[5, 6], [7, 0]])
  np.testing.assert_array_equal(flat[1], 0)  # No variant: all padding.
  np.testing.assert_array_equal(flat[2], [[8, 9], [0, 0]])
  np.testing.assert_array_equal(flat[3], [[4, 0], [0, 0]])
  np.testing.assert_array_equal(flat[5], 0)
  np.testing.assert_array_equal(chunks.query_valid.ravel(),
                                [True] * 5 + [False])
  # Split evenly: 5 queries a step at most -> 1 chunk of 5, no padding;
  # fewer tokens than one query -> one query a step.
  assert queries.QueryChunks.build(qs, 1024).tokens.shape == (1, 5, 2, 2)
  assert queries.QueryChunks.build(qs, 1).tokens.shape == (5, 1, 2, 2)
  # 4 queries a step at most: 2 chunks of 3 (not 4 + 1).
  assert queries.QueryChunks.build(qs, 16).tokens.shape == (2, 3, 2, 2)
  with pytest.raises(ValueError, match="at least one query"):
    queries.QueryChunks.build([], 8)
