"""A caption -> its noun phrases with counts (for caption phrase matching).

The caption stream's phrase-region matching (`losses/omni_loss.py`, "img
phrase matching") needs a caption's *phrases*, not its token set: "two red
hexagons and a blue circle" pairs `red` with `hexagon` twice and `blue` with
`circle` once, and that binding is what lets a known word (`red`) locate an
unknown one (`hexagon`).

`chunk(text)` is a deliberately simple chunker, meant for captions that list
objects (ShapesWorld's grammar, and most short alt-text / COCO-style
captions):

* The text is cut at separators: punctuation ``, ; : . ! ?``, the
  conjunctions ``and`` / ``or`` / ``with`` / ``while``, and prepositions
  (`SEPARATOR_WORDS`: ``on``, ``in``, ``at``, ``of``, ``near``, ``next to``,
  ``in front of``, ...). "a man with a dog on the beach" -> "a man", "a dog",
  "the beach". What stays between separators is one phrase, verbs included
  ("a man riding a horse" is one phrase): no part-of-speech tagger, so no
  model or data to ship.
* A phrase's count is its first word when that is a count: ``one``..``ten``,
  ``a`` / ``an`` (1), ``a pair of`` is not parsed (1), a digit string (its
  value, capped at `MAX_COUNT`); otherwise 1 ("dogs" says at least one).
* Known limits: a preposition that is part of a name ("cup of coffee") splits
  it; spatial phrases ("on the left") become phrases of their own ("the left")
  -- their tokens are then matched like any other phrase's. Relative clauses
  are kept inside one phrase.

ShapesWorld's captions ("two red circles, a large blue star and a small green
square", `data/shapes_world.py`) chunk exactly into their listed objects.
The phrases' *tokens* are the tokenizer's tokens whose character spans lie in
the phrase's span (`data/transforms.py`, `Tokenize`), so multi-word concepts
and plural folding behave as for the whole caption.
"""

from __future__ import annotations

import dataclasses
import re

MAX_COUNT = 10

COUNT_WORDS = {
    "a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4,
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "both": 2,
}

# Words that end a phrase. Multi-word ones are matched before their parts.
SEPARATOR_WORDS = (
    "in front of", "next to", "on top of", "close to", "out of",
    "and", "or", "with", "while", "plus",
    "on", "in", "at", "of", "near", "by", "under", "over", "above", "below",
    "behind", "beside", "besides", "between", "among", "against", "inside",
    "outside", "onto", "into", "from", "around", "along", "across", "through",
    "toward", "towards", "beneath", "underneath", "atop", "for", "to",
)
_SEP_RE = re.compile(
    r"[,;:.!?]|\b(?:" + "|".join(re.escape(w).replace(r"\ ", r"\s+")
                                  for w in SEPARATOR_WORDS) + r")\b",
    re.IGNORECASE)
_WORD_RE = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")


@dataclasses.dataclass(frozen=True)
class Phrase:
  """One chunk of a caption.

  Attributes:
    start: start character offset into the caption (first word).
    end: end offset (exclusive, last word).
    count: how many objects the phrase names (>= 1).
  """
  start: int
  end: int
  count: int


def _count(word: str) -> int | None:
  word = word.lower()
  if word.isdigit():
    return max(1, min(int(word), MAX_COUNT))
  return COUNT_WORDS.get(word)


def chunk(text: str) -> list[Phrase]:
  """The phrases of `text` in text order (see the module docstring).

  Args:
    text: a caption.

  Returns:
    Phrases with at least one word each; separators and empty pieces are
    dropped.
  """
  out = []
  pos = 0
  pieces = []
  for m in _SEP_RE.finditer(text or ""):
    pieces.append((pos, m.start()))
    pos = m.end()
  pieces.append((pos, len(text or "")))
  for s, e in pieces:
    words = list(_WORD_RE.finditer(text[s:e]))
    if not words:
      continue
    count = _count(words[0].group(0)) or 1
    out.append(Phrase(s + words[0].start(), s + words[-1].end(), count))
  return out
