"""The token vocabulary: the model's only "text side".

File format (``vocab.txt``, UTF-8), one token a line, the line index is the id:

    <pad>	0
    <unk>	0
    person	262465
    hot dog	1273
    left	880

* A line is ``token`` or ``token<TAB>count``. ``count`` (a non-negative
  integer, default 0) is the token's frequency in the training annotations;
  the input pipeline samples negative tokens by it.
* Ids 0 (``<pad>``) and 1 (``<unk>``) are reserved (`PAD_ID`, `UNK_ID`,
  which `data.schema` takes from here); concepts start at id 2
  (`NUM_RESERVED`). `save` writes the reserved lines; a hand-written file
  without them gets them prepended on load (then a concept's id is its line
  index + 2).
* Tokens are stored normalized (see `text.normalize_concept`): lower case,
  singular, words joined by one space (``hot dog``, ``t-shirt``). The builder
  writes them so; `Vocabulary` checks only cheap invariants (no tabs, no
  duplicates, no surrounding space), so a hand-edited token such as ``Hot
  Dogs`` would never be matched: run hand-made lists through
  `text.normalize_concept` (or the builder).

Lookup is exact on the stored string; the `tokenizer.Tokenizer` maps free text
to ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import itertools
import os

from etils import epath
import numpy as np

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
RESERVED_TOKENS = (PAD_TOKEN, UNK_TOKEN)
NUM_RESERVED = len(RESERVED_TOKENS)
# The reserved tokens' ids (their line indices).
PAD_ID = 0
UNK_ID = 1
assert RESERVED_TOKENS[PAD_ID] == PAD_TOKEN
assert RESERVED_TOKENS[UNK_ID] == UNK_TOKEN

# Horizontal-flip pairs, word level; hyphen parts are swapped too
# ("left-hand" <-> "right-hand"). Compass words do not flip with an image.
_MIRROR_WORDS = {
    "left": "right", "leftmost": "rightmost", "lefthand": "righthand",
    "leftward": "rightward", "lefthanded": "righthanded",
}
_MIRROR_WORDS.update({v: k for k, v in list(_MIRROR_WORDS.items())})


def _mirror_token(token: str) -> str:
  """`token` with every left/right word swapped (itself if none)."""
  words = token.split(" ")
  out = []
  for w in words:
    if "-" in w:
      w = "-".join(_MIRROR_WORDS.get(p, p) for p in w.split("-"))
    else:
      w = _MIRROR_WORDS.get(w, w)
    out.append(w)
  return " ".join(out)


class Vocabulary:
  """An immutable list of concept tokens with counts.

  Attributes:
    tokens: tuple of all tokens, reserved ones first; `tokens[id]`.
    counts: int64 [V] annotation frequencies (0 for reserved / unknown).
    max_concept_words: most words in one token ("traffic light" has 2), the
      window of the tokenizer's longest match.
  """

  def __init__(self, tokens: Sequence[str],
               counts: Sequence[int] | np.ndarray | None = None):
    """Creates a vocabulary.

    Args:
      tokens: concept tokens, normalized. The reserved tokens are prepended
        unless `tokens` already starts with them.
      counts: one count per entry of `tokens` (same length), or None (zeros).

    Raises:
      ValueError: on duplicates, empty or malformed tokens, reserved tokens
        out of place, or a `counts` of the wrong length / negative.
    """
    tokens = list(tokens)
    if counts is not None:
      counts = np.asarray(counts, dtype=np.int64)
      if counts.shape != (len(tokens),):
        raise ValueError(
            f"counts has shape {counts.shape} but there are {len(tokens)} "
            "tokens; pass one count per token (or counts=None).")
    if tuple(tokens[:NUM_RESERVED]) != RESERVED_TOKENS:
      tokens = list(RESERVED_TOKENS) + tokens
      if counts is not None:
        counts = np.concatenate([np.zeros(NUM_RESERVED, np.int64), counts])
    if counts is None:
      counts = np.zeros(len(tokens), np.int64)
    if counts.size and counts.min() < 0:
      bad = int(np.argmin(counts))
      raise ValueError(f"Negative count {counts[bad]} for token "
                       f"{tokens[bad]!r} (id {bad}); counts must be >= 0.")
    self._index = dict(zip(tokens, range(len(tokens))))
    if len(self._index) != len(tokens):
      seen = set()
      for i, t in enumerate(tokens):
        if t in seen:
          raise ValueError(f"Duplicate token {t!r} at id {i}; each token must "
                           "appear once.")
        seen.add(t)
    for i in range(NUM_RESERVED):
      assert self._index[RESERVED_TOKENS[i]] == i
    self._check_tokens(tokens)
    self.tokens = tuple(tokens)
    self.counts = counts
    self.counts.flags.writeable = False
    self.max_concept_words = 1 + max(
        map(str.count, tokens[NUM_RESERVED:], itertools.repeat(" ")),
        default=0)
    self._mirror_map = None

  @staticmethod
  def _check_tokens(tokens: list[str]) -> None:
    """Cheap format checks (the builder is what writes normalized tokens)."""
    concepts = tokens[NUM_RESERVED:]
    # One pass over the joined text in C; the per-token loop below only runs
    # to name the culprit.
    joined = "\n".join(concepts)
    if (not concepts or (
        "\t" not in joined and "  " not in joined and "\n " not in joined
        and " \n" not in joined and "\n\n" not in joined
        and joined.count("\n") == len(concepts) - 1 and joined[:1].strip()
        and joined[-1:].strip())):
      return
    for i, t in enumerate(concepts, start=NUM_RESERVED):
      if not t or "\t" in t or "\n" in t or t != t.strip() or "  " in t:
        raise ValueError(
            f"Bad token {t!r} at id {i}: tokens must be non-empty, without "
            "tabs, newlines, surrounding or double spaces.")
    raise AssertionError("unreachable: joined check failed but no bad token")

  # ---------------------------------------------------------------- lookup

  def __len__(self) -> int:
    return len(self.tokens)

  def __contains__(self, token: str) -> bool:
    return token in self._index

  def __repr__(self) -> str:
    return f"Vocabulary(size={len(self)}, max_concept_words=" \
           f"{self.max_concept_words})"

  def id(self, token: str) -> int:
    """The id of `token` (exact, normalized string), `UNK_ID` if absent."""
    return self._index.get(token, UNK_ID)

  def ids(self, tokens: Iterable[str]) -> np.ndarray:
    """int32 [n] ids of `tokens` (UNK_ID for absent ones)."""
    get = self._index.get
    return np.array([get(t, UNK_ID) for t in tokens], np.int32)

  def token(self, token_id: int) -> str:
    """The token string of an id (raises IndexError when out of range)."""
    return self.tokens[token_id]

  @property
  def index(self) -> dict[str, int]:
    """The token -> id dict (do not modify)."""
    return self._index

  @property
  def num_reserved(self) -> int:
    return NUM_RESERVED

  # -------------------------------------------------------------- mirroring

  def mirror_pairs(self) -> np.ndarray:
    """int32 [P, 2] pairs (a, b), a < b, of ids swapped by a horizontal flip.

    `left` <-> `right`, `leftmost` <-> `rightmost`, and multi-word or
    hyphenated tokens containing them ("left side" <-> "right side"); a pair
    exists only when both tokens are in the vocabulary. A token whose mirror
    image is absent stays as it is under a flip (and is not listed).
    """
    m = self.mirror_map()
    a = np.nonzero(m != np.arange(len(m)))[0]
    a = a[a < m[a]]
    return np.stack([a, m[a]], axis=1).astype(np.int32)

  def mirror_map(self) -> np.ndarray:
    """int32 [V] id -> id of its horizontal mirror (identity for most ids).

    Built once (a substring filter over the tokens, ~0.1 s at V=500k) and
    cached.
    """
    if self._mirror_map is None:
      m = np.arange(len(self.tokens), dtype=np.int32)
      for i, t in enumerate(self.tokens):
        if "left" in t or "right" in t:
          j = self._index.get(_mirror_token(t))
          if j is not None:
            m[i] = j
      m.flags.writeable = False
      self._mirror_map = m
    return self._mirror_map

  def mirror_ids(self, ids: np.ndarray) -> np.ndarray:
    """Mirrored ids of any-shaped int array `ids` (values in [0, V)).

    Padding (0) maps to itself. One gather: cheap enough for every flipped
    example in the input pipeline.
    """
    return self.mirror_map()[ids]

  # ------------------------------------------------------------------- I/O

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the vocabulary in the file format above (atomic rename).

    Args:
      path: file path (local or any `etils.epath` path, e.g. gs://).
    """
    path = epath.Path(path)
    lines = [f"{t}\t{c}" for t, c in zip(self.tokens, self.counts.tolist())]
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> "Vocabulary":
    """Reads a vocabulary file (format above).

    Args:
      path: file path (local or any `etils.epath` path, e.g. gs://).

    Returns:
      The vocabulary.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a malformed line (named by its line number) or a token
        error from the constructor.
    """
    path = epath.Path(path)
    if not path.exists():
      raise FileNotFoundError(
          f"Vocabulary file {path} does not exist; build one with "
          "`python -m omnitrain_jax.data.build_vocab --out=vocab.txt FILES...`.")
    text = path.read_text(encoding="utf-8")
    if text.endswith("\n"):
      text = text[:-1]
    if not text:
      raise ValueError(f"Vocabulary file {path} is empty; it needs one token "
                       "a line.")
    num_lines = text.count("\n") + 1
    fields = text.replace("\n", "\t").split("\t")
    if len(fields) == 2 * num_lines:
      # Fast path: every line is `token<TAB>count` (as `save` writes it).
      tokens = fields[0::2]
      try:
        counts = np.array(fields[1::2], dtype=np.int64)
      except ValueError:
        counts = None  # The slow path names the bad line.
    if len(fields) != 2 * num_lines or counts is None:
      tokens, counts = cls._parse_lines(path, text.split("\n"))
    try:
      return cls(tokens, counts)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e

  @staticmethod
  def _parse_lines(path, lines: list[str]) -> tuple[list[str], list[int]]:
    """Line-by-line parse with errors that name the line."""
    tokens, counts = [], []
    for lineno, line in enumerate(lines, start=1):
      token, tab, count = line.partition("\t")
      if not token:
        raise ValueError(f"{path}:{lineno}: empty token in line {line!r}; "
                         "remove blank lines (one token a line).")
      tokens.append(token)
      if not tab:
        counts.append(0)
      elif count.isdigit():
        counts.append(int(count))
      else:
        raise ValueError(
            f"{path}:{lineno}: count {count!r} of token {token!r} is not a "
            "non-negative integer; write `token<TAB>count` or just `token`.")
    return tokens, counts
