"""Text -> vocabulary tokens by greedy longest match, with character spans.

"the hot dog on the left" -> [`hot dog` (4, 11), `left` (19, 23)]

Algorithm (`Tokenizer.encode`), after `text.split_words` and plural folding:

* At each word, try the longest concept that starts there (up to the longest
  concept that starts with this word, so a word that begins no multi-word
  concept costs one dict lookup). A multi-word concept matches only when its
  words are separated by white space or hyphens in the original text ("hot,
  dog" is not `hot dog`).
* A word with no concept: a stop word is dropped silently (by design, see
  `text`); a hyphenated word is matched part by part when any part is known
  ("blue-green" -> `blue`, `green`; "hot-dog" -> `hot dog`), else it is
  unknown as a whole; any other word is *unknown*: it gives no id but is
  reported in `Encoding.unknown`, and `Tokenizer.report_unknown` aggregates
  them over many texts, so nothing is dropped silently.
* A concept wins over the stop-word rule: if the vocabulary holds `can` (an
  LVIS category), "can" always tokenizes to it.

Spans index the original, un-normalized text: `text[start:end]` is the
matched surface form ("Hot Dogs" for `hot dog`). Grounding annotations give
character spans of a box's phrase (MDETR ``tokens_positive``); the box's
tokens are `Encoding.ids_in_spans(those spans)`.

A `Tokenizer` is read-only after construction, thread-safe and picklable (grain
worker processes).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
import dataclasses

from absl import logging

from omnitrain_jax.vocab import text as text_lib
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

Span = tuple[int, int]
_STOP_WORDS = text_lib.STOP_WORDS  # = text_lib.is_stop_word, inlined.
_DROP_HYPHENS = str.maketrans("", "", "-\u2010\u2011")


@dataclasses.dataclass(frozen=True)
class Encoding:
  """The tokens of one text.

  Attributes:
    text: the original text.
    ids: token ids in text order (repeats kept; see `unique_ids`).
    spans: `(start, end)` per id: `text[start:end]` is its surface form.
    tokens: the vocabulary string per id (for display).
    unknown: surface forms of words that are neither stop words nor in the
      vocabulary, in text order.
    unknown_spans: `(start, end)` per unknown word.
    unknown_words: the normalized form per unknown word (what a vocabulary
      would need to contain).
  """
  text: str
  ids: list[int]
  spans: list[Span]
  tokens: list[str]
  unknown: list[str]
  unknown_spans: list[Span]
  unknown_words: list[str]

  def unique_ids(self) -> list[int]:
    """`ids` without repeats, first occurrence order."""
    return list(dict.fromkeys(self.ids))

  def ids_in_spans(self, char_spans: Iterable[Sequence[int]]) -> list[int]:
    """Ids (unique, text order) of the tokens lying inside any of the spans.

    A token is inside `(a, b)` when `a <= start and end <= b`. This is how a
    grounding box gets its tokens from its phrase's character spans (MDETR
    ``tokens_positive``); a token that only partly overlaps (the span covers
    "dog" of the concept "hot dog") is not inside.

    Args:
      char_spans: `(start, end)` character spans into `self.text`.

    Returns:
      The ids, deduplicated, in text order.
    """
    char_spans = [(int(a), int(b)) for a, b in char_spans]
    out = {}
    for tid, (s, e) in zip(self.ids, self.spans):
      for a, b in char_spans:
        if a <= s and e <= b:
          out[tid] = None
          break
    return list(out)


class Tokenizer:
  """Greedy longest-match tokenizer over a `Vocabulary` (see module doc)."""

  def __init__(self, vocab: vocabulary_lib.Vocabulary):
    """Creates a tokenizer.

    Args:
      vocab: the vocabulary; its tokens must be normalized (as the builder
        writes them).
    """
    self._vocab = vocab
    self._index = vocab.index
    # First word -> the most words of a concept starting with it; only words
    # that begin a multi-word concept are keys.
    max_words = {}
    for t in vocab.tokens[vocab.num_reserved:]:
      if " " in t:
        first, n = t.split(" ", 1)[0], t.count(" ") + 1
        if n > max_words.get(first, 1):
          max_words[first] = n
    self._max_words = max_words

  @property
  def vocab(self) -> vocabulary_lib.Vocabulary:
    return self._vocab

  @property
  def multiword_starts(self) -> frozenset[str]:
    """The first words of the multi-word concepts."""
    return frozenset(self._max_words)

  def encode(self, text: str) -> Encoding:
    """Tokenizes `text` (see the module doc for the rules).

    Args:
      text: any text: a category name, a referring expression, a caption,
        a query.

    Returns:
      The `Encoding`: ids with spans into `text`, and the unknown words.
    """
    ids, id_spans, tokens, unknown = self.tokenize(text)
    if unknown:
      unknown_spans = [span for _, span in unknown]
      return Encoding(text, ids, id_spans, tokens,
                      [text[s:e] for s, e in unknown_spans], unknown_spans,
                      [w for w, _ in unknown])
    return Encoding(text, ids, id_spans, tokens, [], [], [])

  def tokenize(self, text: str) -> tuple[list[int], list[Span], list[str],
                                         list[tuple[str, Span]]]:
    """`encode` as plain lists, for hot loops (the vocabulary builder).

    Args:
      text: any text.

    Returns:
      `(ids, spans, tokens, unknown)`; `unknown` holds `(normalized word,
      span)` pairs.
    """
    words, spans = text_lib.split_words(text)
    fold = text_lib.fold_plural
    words = [fold(w) for w in words]
    ids, id_spans, tokens, unknown = [], [], [], []
    self._match(text, words, spans, ids, id_spans, tokens, unknown)
    return ids, id_spans, tokens, unknown

  def _match(self, text, words, spans, ids, id_spans, tokens, unknown,
             top_level=True) -> bool:
    """Greedy longest match; appends to the output lists.

    Returns:
      Whether any token matched (for the hyphenated-word fallback).
    """
    index, max_words = self._index, self._max_words
    matched_any = False
    i, n = 0, len(words)
    while i < n:
      w = words[i]
      k = 1
      tid = None
      k_max = max_words.get(w)
      if k_max is not None:
        # Longest multi-word concept first; not across a gap that is more
        # than blanks and hyphens ("hot, dog" is not `hot dog`).
        k_max = min(k_max, n - i)
        for k in range(2, k_max + 1):
          gap = text[spans[i + k - 2][1]:spans[i + k - 1][0]]
          if gap.translate(_DROP_HYPHENS).strip():
            k_max = k - 1
            break
        for k in range(k_max, 1, -1):
          tid = index.get(" ".join(words[i:i + k]))
          if tid is not None:
            break
        else:
          k = 1
      if tid is None:
        tid = index.get(w)
      if tid is not None:
        ids.append(tid)
        if k == 1:
          id_spans.append(spans[i])
          tokens.append(w)
        else:
          id_spans.append((spans[i][0], spans[i + k - 1][1]))
          tokens.append(" ".join(words[i:i + k]))
        matched_any = True
        i += k
        continue
      if not (w in _STOP_WORDS or w.isdigit()):
        if top_level and "-" in w and self._match_parts(
            text, w, spans[i], ids, id_spans, tokens, unknown):
          matched_any = True
        else:
          unknown.append((w, spans[i]))
      i += 1
    return matched_any

  def _match_parts(self, text, word, span, ids, id_spans, tokens,
                   unknown) -> bool:
    """Matches the parts of a hyphenated word; False (no output) if none."""
    parts = [text_lib.fold_plural(p) for p in word.split("-")]
    # Spans of the parts, from the original surface form (NFKC may change
    # lengths, so they cannot come from the normalized word).
    surface = text[span[0]:span[1]].replace("\u2010", "-").replace(
        "\u2011", "-")
    surface_parts = surface.split("-")
    if len(surface_parts) != len(parts):
      return False  # Normalization changed the hyphenation: keep it whole.
    part_spans, start = [], span[0]
    for sp in surface_parts:
      part_spans.append((start, start + len(sp)))
      start += len(sp) + 1
    sub_ids, sub_spans, sub_tokens, sub_unknown = [], [], [], []
    if not self._match(text, parts, part_spans, sub_ids, sub_spans,
                       sub_tokens, sub_unknown, top_level=False):
      return False
    ids.extend(sub_ids)
    id_spans.extend(sub_spans)
    tokens.extend(sub_tokens)
    unknown.extend(sub_unknown)
    return True

  def encode_ids(self, text: str, *, dedup: bool = True) -> list[int]:
    """Token ids of `text`; unique in first-occurrence order when `dedup`."""
    ids = self.tokenize(text)[0]
    return list(dict.fromkeys(ids)) if dedup else ids

  def encode_query(self, text: str) -> Encoding:
    """Tokenizes a user query; warns on unknown words, fails on no token.

    For predict/evaluate: a query word that is not in the vocabulary cannot be
    scored, and the user must hear about it.

    Args:
      text: the query, e.g. "purple star".

    Returns:
      The encoding (with at least one id).

    Raises:
      ValueError: when no word of the query is in the vocabulary.
    """
    enc = self.encode(text)
    if not enc.ids:
      raise ValueError(
          f"Query {text!r} has no token in the vocabulary (unknown words: "
          f"{enc.unknown or 'none, only stop words'}). Use words from the "
          "vocabulary file, or rebuild it with annotations that contain them.")
    if enc.unknown:
      logging.warning(
          "Query %r: words not in the vocabulary are ignored: %s (scored on "
          "%s).", text, enc.unknown, enc.tokens)
    return enc

  def report_unknown(self, texts: Iterable[str]) -> collections.Counter:
    """Counts the unknown words over many texts.

    Args:
      texts: texts to tokenize.

    Returns:
      A Counter from the normalized unknown word to its number of
      occurrences; `.most_common()` lists the words to add first.
    """
    counter = collections.Counter()
    for t in texts:
      counter.update(self.encode(t).unknown_words)
    return counter
