"""Text queries for evaluation and prediction: names and phrases -> token ids.

A query is scored as a soft AND of its tokens (`inference.py`): the box's
score is the geometric mean of its token probabilities. Here the texts become
token ids, with every word the vocabulary lacks *reported*, never dropped in
silence:

* `category_query`: a category name ("hot_dog", "bow_(weapon)",
  "Monitor/TV") is cleaned as the vocabulary builder and the input pipeline
  clean it (`vocab.text.category_name_variants`); each "/" alternative is a
  *variant* and the query's score is the best variant's (OR across variants,
  AND within one). Training gives such a box the tokens of all alternatives,
  so each alternative alone is a fair query.
* `phrase_query`: a grounding phrase given by character spans into a caption
  (MDETR ``tokens_positive``): the tokens lying inside the spans, else those
  overlapping them -- the rule `data.transforms.Tokenize` uses for training
  targets, so evaluation asks with the tokens training taught.
* `text_query`: free text typed by a user (predict).

A query whose words are all unknown (or stop words) has no variant: it scores 0
everywhere and is counted in `QueryReport`, which also counts the unknown
words and logs them once per dataset.

`TokenUnion` turns a shared query set (a dataset's category names, e.g. LVIS's
1203) into the arrays the chunked scorer (`inference.union_query_scores`)
needs: the union of the queries' tokens, so that logits are computed once per
token, never per query or for the whole vocabulary. Its ``[U', R]`` weight
matrix (union tokens x variants) grows as the square of the query set, so a
huge set (100k+ names) uses `QueryChunks` instead: padded per-chunk token
lists for `inference.chunked_detect_top_k`, which never holds more than one
chunk's scores.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
import dataclasses

from absl import logging
import numpy as np

from omnitrain_jax.data import schema
from omnitrain_jax.vocab import text as text_lib
from omnitrain_jax.vocab import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Query:
  """One query: OR over variants, AND over each variant's tokens.

  Attributes:
    text: the text as given (category name, phrase text, user query).
    variants: per variant, its unique token ids (never pad/unk); empty when
      no word of the text is in the vocabulary.
    unknown: normalized words of the text missing from the vocabulary.
    tokens: per variant, the vocabulary strings (for display).
  """
  text: str
  variants: tuple[tuple[int, ...], ...]
  unknown: tuple[str, ...] = ()
  tokens: tuple[tuple[str, ...], ...] = ()

  @property
  def empty(self) -> bool:
    """True when the query has no known token (it scores 0)."""
    return not self.variants

  @property
  def token_ids(self) -> tuple[int, ...]:
    """All token ids of all variants, unique, in order."""
    return tuple(dict.fromkeys(t for v in self.variants for t in v))


def _variant(encoding: tokenizer_lib.Encoding, ids: Iterable[int]
             ) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """Unique ids (pad/unk removed) and their display strings."""
  names = dict(zip(encoding.ids, encoding.tokens))
  ids = tuple(i for i in dict.fromkeys(int(t) for t in ids)
              if i > schema.UNK_ID)
  return ids, tuple(names[i] for i in ids)


def text_query(tokenizer: tokenizer_lib.Tokenizer, text: str) -> Query:
  """A free-text query: all known tokens of `text`, as one variant.

  An underscore joins words as a space does, so a multi-word concept is
  found however a user writes it: "fire truck", "Fire Trucks", "fire-truck"
  and the LVIS spelling "fire_truck" all give the one token `fire truck`
  (the tokenizer itself treats "_" as punctuation, which a multi-word
  concept may not span).
  """
  enc = tokenizer.encode(text.replace("_", " "))  # Same length: same spans.
  ids, tokens = _variant(enc, enc.ids)
  return Query(text=text, variants=(ids,) if ids else (),
               unknown=tuple(enc.unknown_words),
               tokens=(tokens,) if ids else ())


def user_query(tokenizer: tokenizer_lib.Tokenizer, text: str) -> Query:
  """`text_query` for text a person typed: warns about what it leaves out.

  A query without any known word scores 0 and finds nothing; words the
  vocabulary lacks are left out of the score. Both are logged, never silent.
  """
  q = text_query(tokenizer, text)
  if q.empty:
    logging.warning("Query %r has no word in the vocabulary (unknown: %s): "
                    "it scores 0 and finds nothing.", text,
                    list(q.unknown) or "only stop words")
  elif q.unknown:
    logging.warning("Query %r: words not in the vocabulary are left out: %s "
                    "(scored on %s).", text, list(q.unknown),
                    list(q.tokens[0]))
  return q


def category_query(tokenizer: tokenizer_lib.Tokenizer, name: str) -> Query:
  """A category name, cleaned; "/" alternatives are OR-ed variants.

  Args:
    tokenizer: the run's tokenizer.
    name: the name as the annotation file writes it ("hot_dog",
      "bow_(weapon)", "Monitor/TV").

  Returns:
    The `Query`; variants without any known token are left out (their
    unknown words are reported).
  """
  variants, tokens, unknown = [], [], []
  for text in text_lib.category_name_variants(name) or [name]:
    enc = tokenizer.encode(text)
    unknown.extend(enc.unknown_words)
    ids, names = _variant(enc, enc.ids)
    if ids and ids not in variants:
      variants.append(ids)
      tokens.append(names)
  return Query(text=name, variants=tuple(variants),
               unknown=tuple(dict.fromkeys(unknown)), tokens=tuple(tokens))


def _inside(spans: np.ndarray, windows: np.ndarray) -> np.ndarray:
  """bool [n]: span i lies inside one of `windows` ([m, 2] start, end)."""
  if not len(spans) or not len(windows):
    return np.zeros(len(spans), bool)
  s0, s1 = spans[:, None, 0], spans[:, None, 1]
  return ((s0 >= windows[None, :, 0]) & (s1 <= windows[None, :, 1])).any(1)


def phrase_query(encoding: tokenizer_lib.Encoding,
                 spans: Sequence[Sequence[int]]) -> Query:
  """The query of a phrase given as character spans of a tokenized caption.

  Tokens inside the spans are the query; when none lies inside (a multi-word
  token straddling a span edge), the tokens overlapping the spans are --
  the rule of `data.transforms.Tokenize` for grounding targets. Unknown
  words are those inside the spans.

  Args:
    encoding: ``tokenizer.encode(caption)``.
    spans: ``[start, end)`` character spans into the caption; empty means the
      whole caption.

  Returns:
    The `Query` (its text is the spans' text joined by a space).
  """
  caption = encoding.text
  windows = np.asarray(spans, np.int64).reshape(-1, 2)
  if not windows.size:
    windows = np.array([[0, len(caption)]], np.int64)
  ids = np.asarray(encoding.ids, np.int64)
  token_spans = np.asarray(encoding.spans, np.int64).reshape(-1, 2)
  keep = _inside(token_spans, windows)
  if not keep.any() and len(token_spans):
    keep = ((token_spans[:, None, 0] < windows[None, :, 1])
            & (token_spans[:, None, 1] > windows[None, :, 0])).any(1)
  unknown_spans = np.asarray(encoding.unknown_spans, np.int64).reshape(-1, 2)
  unknown = [w for w, k in zip(encoding.unknown_words,
                               _inside(unknown_spans, windows)) if k]
  variant, tokens = _variant(encoding, ids[keep].tolist())
  text = " ".join(caption[a:b] for a, b in windows.tolist())
  return Query(text=text, variants=(variant,) if variant else (),
               unknown=tuple(dict.fromkeys(unknown)),
               tokens=(tokens,) if variant else ())


class QueryReport:
  """Counts unknown words and token-less queries of a dataset; logs once."""

  def __init__(self, name: str):
    self.name = name
    self.num_queries = 0
    self.unknown = collections.Counter()  # word -> queries it occurs in
    self.queries_with_unknown = 0
    self.empty: list[str] = []

  def add(self, query: Query) -> Query:
    self.num_queries += 1
    if query.unknown:
      self.queries_with_unknown += 1
      self.unknown.update(query.unknown)
    if query.empty:
      self.empty.append(query.text)
    return query

  def add_all(self, queries: Iterable[Query]) -> list[Query]:
    return [self.add(q) for q in queries]

  def log(self, max_words: int = 20) -> None:
    """One log line (two when queries are empty); silent when all is known."""
    if self.unknown:
      words = ", ".join(f"{w} ({n})" for w, n in
                        self.unknown.most_common(max_words))
      more = len(self.unknown) - max_words
      logging.warning(
          "%s: %d of %d queries have words not in the vocabulary, scored "
          "without them; %d distinct unknown words (queries using them): %s%s",
          self.name, self.queries_with_unknown, self.num_queries,
          len(self.unknown), words, f" and {more} more" if more > 0 else "")
    if self.empty:
      shown = ", ".join(repr(t) for t in self.empty[:max_words])
      logging.warning(
          "%s: %d queries have no token in the vocabulary and score 0: %s%s",
          self.name, len(self.empty), shown,
          " ..." if len(self.empty) > max_words else "")

  def metrics(self) -> dict[str, float]:
    """Counts for metrics.json."""
    return {"unknown_query_words": float(len(self.unknown)),
            "queries_with_unknown_words": float(self.queries_with_unknown),
            "queries_without_tokens": float(len(self.empty))}

  def to_json(self) -> dict:
    """The full report (queries_<dataset>.json)."""
    return {"num_queries": self.num_queries,
            "queries_with_unknown_words": self.queries_with_unknown,
            "unknown_words": dict(self.unknown.most_common()),
            "queries_without_tokens": self.empty}


@dataclasses.dataclass(frozen=True)
class TokenUnion:
  """A shared query set as arrays for `inference.union_query_scores`.

  Variants are the scoring units (a query with two alternatives has two);
  queries take the best of their variants.

  Attributes:
    token_ids: int32 [U'] the union of the variants' tokens, padded with 0
      to a multiple of the chunk size.
    weights: float32 [U', R] ``1 / len(variant r)`` where token u is in
      variant r, else 0: ``log_sigmoid(logits) @ weights`` is each variant's
      mean token log-probability.
    variant_valid: bool [R]; False only for the padding variant of a query
      set whose queries are all empty.
    groups: int32 [P, G] the variants of each query (indices into R), -1 as
      padding; a query with no variant has all -1 and scores 0.
    chunk_size: tokens per chunk (divides U').
  """
  token_ids: np.ndarray
  weights: np.ndarray
  variant_valid: np.ndarray
  groups: np.ndarray
  chunk_size: int

  @property
  def num_queries(self) -> int:
    return self.groups.shape[0]

  @property
  def trivial_groups(self) -> bool:
    """True when query p is exactly variant p (no alternatives, no empties)."""
    return (self.groups.shape[1] == 1 and
            np.array_equal(self.groups[:, 0], np.arange(len(self.groups))))

  @staticmethod
  def _layout(queries: Sequence[Query], chunk_size: int
              ) -> tuple[list[tuple[int, ...]], list[int], int, int]:
    """(variants, sorted union, chunk, padded union size U')."""
    if not queries:
      raise ValueError("No queries to score; pass at least one query.")
    if chunk_size < 1:
      raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
    variants = [v for q in queries for v in q.variants]
    union = sorted({t for v in variants for t in v})
    # As few chunks as `chunk_size` allows, split evenly: 1289 tokens with
    # chunk_size 1024 become 2 chunks of 645, not 2 of 1024 (37% padding).
    num_chunks = -(-max(len(union), 1) // chunk_size)
    chunk = -(-max(len(union), 1) // num_chunks)
    return variants, union, chunk, num_chunks * chunk

  @classmethod
  def weight_entries(cls, queries: Sequence[Query], chunk_size: int = 1024
                     ) -> int:
    """``U' * R``, the entries of `build`'s ``weights``, without building it.

    The union path's cost grows with it (the host matrix, the device copy and
    the ``[B, N, R]`` sums); `det_evaluator` switches to `QueryChunks` above
    ``eval.union_max_entries``.
    """
    variants, _, _, padded = cls._layout(queries, chunk_size)
    return padded * max(len(variants), 1)

  @classmethod
  def build(cls, queries: Sequence[Query], chunk_size: int = 1024
            ) -> TokenUnion:
    """Arrays for `queries` (at least one query).

    Args:
      queries: the shared queries (e.g. one per category).
      chunk_size: most tokens per logits chunk; memory of the scorer is
        ``[B, N, chunk_size]`` for the logits plus ``[B, N, R]`` for the sums.

    Returns:
      The `TokenUnion`.
    """
    variants, union, chunk, padded = cls._layout(queries, chunk_size)
    token_ids = np.zeros((padded,), np.int32)
    token_ids[:len(union)] = union
    row = {t: i for i, t in enumerate(union)}
    num_variants = max(len(variants), 1)
    weights = np.zeros((padded, num_variants), np.float32)
    for r, v in enumerate(variants):
      for t in v:
        weights[row[t], r] = 1.0 / len(v)
    valid = np.zeros((num_variants,), bool)
    valid[:len(variants)] = True
    width = max(1, max(len(q.variants) for q in queries))
    groups = np.full((len(queries), width), -1, np.int32)
    r = 0
    for p, q in enumerate(queries):
      for g in range(len(q.variants)):
        groups[p, g] = r
        r += 1
    return cls(token_ids=token_ids, weights=weights, variant_valid=valid,
               groups=groups, chunk_size=chunk)


@dataclasses.dataclass(frozen=True)
class QueryChunks:
  """A shared query set as padded chunks for `inference.chunked_detect_top_k`.

  The layout for query sets too large for `TokenUnion` (100k+ names, whose
  ``[U', R]`` weights would be ~U'^2): every query is its variants' padded
  token lists, and the scorer scans the chunks, computing only the chunk's
  logits ``[B, N, Pc * G * L]`` and scores ``[B, N, Pc]`` per step. Chunk c
  holds queries ``c * Pc`` to ``c * Pc + Pc - 1``, in the given order; the
  last chunk is filled with padding queries (`query_valid` False, never
  selected). G and L are the largest variant count and variant length of
  the set, so one query with many alternatives or tokens pads every query
  to its size (memory, not results).

  Attributes:
    tokens: int32 ``[C, Pc, G, L]`` token ids, 0 = pad; a variant of all
      padding scores 0, a query of all padding (no known token) scores 0.
    query_valid: bool ``[C, Pc]``; False for padding queries.
    num_queries: P, the real queries (``<= C * Pc``).
  """
  tokens: np.ndarray
  query_valid: np.ndarray
  num_queries: int

  @property
  def chunk_queries(self) -> int:
    """Pc, queries per scan step."""
    return self.tokens.shape[1]

  @classmethod
  def build(cls, queries: Sequence[Query], chunk_tokens: int = 1024
            ) -> QueryChunks:
    """Arrays for `queries` (at least one).

    Args:
      queries: the shared queries (e.g. one per category).
      chunk_tokens: most query tokens per scan step, ``Pc * G * L`` (at
        least one query per step): the scorer's memory per step is
        ``B * N * chunk_tokens`` logits (plus a ``[B, N * Pc]`` top-k).

    Returns:
      The `QueryChunks`.
    """
    if not queries:
      raise ValueError("No queries to score; pass at least one query.")
    if chunk_tokens < 1:
      raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1.")
    # Unique ids per variant (a repeated token would weigh twice).
    variants = [[list(dict.fromkeys(v)) for v in q.variants] for q in queries]
    g = max(1, max(len(vs) for vs in variants))
    l = max([1] + [len(v) for vs in variants for v in vs])
    p = len(queries)
    per_chunk = min(p, max(1, chunk_tokens // (g * l)))
    # Split evenly, as `TokenUnion` does: the fewest chunks, least padding.
    num_chunks = -(-p // per_chunk)
    per_chunk = -(-p // num_chunks)
    tokens = np.zeros((num_chunks * per_chunk, g, l), np.int32)
    for i, vs in enumerate(variants):
      for j, v in enumerate(vs):
        tokens[i, j, :len(v)] = v
    valid = np.arange(num_chunks * per_chunk) < p
    return cls(tokens=tokens.reshape(num_chunks, per_chunk, g, l),
               query_valid=valid.reshape(num_chunks, per_chunk),
               num_queries=p)


def pad_queries(queries: Sequence[Query], num_queries: int, max_tokens: int
                ) -> np.ndarray:
  """Single-variant queries -> int32 [num_queries, max_tokens], 0 = pad.

  For per-image queries (grounding phrases), which `inference.query_scores`
  scores with a per-image mask. Empty queries stay all padding (score 0).

  Raises:
    ValueError: a query has several variants, more tokens than `max_tokens`,
      or there are more than `num_queries` queries.
  """
  if len(queries) > num_queries:
    raise ValueError(f"{len(queries)} queries but room for {num_queries}.")
  out = np.zeros((num_queries, max_tokens), np.int32)
  for i, q in enumerate(queries):
    if len(q.variants) > 1:
      raise ValueError(f"Query {q.text!r} has {len(q.variants)} variants; "
                       "per-image queries take one.")
    if q.variants:
      ids = q.variants[0]
      if len(ids) > max_tokens:
        raise ValueError(f"Query {q.text!r} has {len(ids)} tokens but "
                         f"max_tokens={max_tokens}.")
      out[i, :len(ids)] = ids
  return out
