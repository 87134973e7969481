"""Text normalization shared by the vocabulary builder and the tokenizer.

Both sides of the vocabulary (building it from annotations, tokenizing a query
or a caption) go through the functions here, so a token means the same thing
wherever it came from. The steps, in order:

1. Unicode NFKC (full-width letters, ligatures, compatibility forms), then
   lower case. Curly apostrophes become ``'`` and Unicode hyphens ``-``.
2. Words are runs of letters/digits; an apostrophe or hyphen *between* two
   letters stays inside the word (``t-shirt``, ``o'clock``); everything else
   (punctuation, ``_``, ``/``) separates words. A possessive ``'s`` is cut:
   ``man's`` -> ``man``.
3. Plural folding to the singular by rules plus exception lists
   (`fold_plural`): ``circles`` -> ``circle``, ``boxes`` -> ``box``,
   ``berries`` -> ``berry``, ``knives`` -> ``knife``, ``people`` ->
   ``person``; ``glass``, ``bus``, ``lens``, ``series``, ``news`` stay. A
   wrong fold of a rare word is harmless for matching (build and tokenize fold
   the same way); it only shows in the vocabulary file.
4. Stop words (`STOP_WORDS`: articles, pronouns, auxiliaries, non-spatial
   prepositions, conjunctions, quantifiers) produce no token. Number words
   (``two``, ``three``, ``dozen``) and all-digit words are stop words too:
   counts in captions ("two red circles") are not visual concepts a box can
   carry, and keeping them would make every caption token set depend on
   counting. Spatial words (``left``, ``right``, ``top``, ``behind``,
   ``small``...) are *not* stop words: they are the disambiguation signal of
   referring expressions. A stop word that is itself a vocabulary concept
   (LVIS has a category ``can``) is matched as that concept (see tokenizer).

Every word keeps the character span of its surface form in the *original*
text, so grounding annotations (character spans, MDETR ``tokens_positive``)
can be related to tokens.
"""

from __future__ import annotations

import functools
import re
import unicodedata

# A word: letters/digits, with single inner apostrophes or hyphens. `[^\W_]`
# is "a word character that is not the underscore" (LVIS names use `_` as a
# space).
WORD_RE = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")
# Applied after NFKC: apostrophe and hyphen look-alikes (NFKC keeps them).
_CHAR_MAP = str.maketrans({
    "\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'",
    "\u2010": "-", "\u2011": "-",
})
# A trailing "(sense)" of LVIS names: "bow_(weapon)", "bat_(animal)".
_SENSE_RE = re.compile(r"\s*\([^()]*\)\s*$")
# A "(sense)" followed by more words (a name and a synonym run together).
_INNER_SENSE_RE = re.compile(r"\s*\([^()]*\)\s+(?=\S)")

NUMBER_WORDS = frozenset("""
zero one two three four five six seven eight nine ten eleven twelve thirteen
fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty
sixty seventy eighty ninety hundred hundreds thousand thousands million
millions dozen dozens
""".split())

STOP_WORDS = frozenset("""
a an the this that these those there here
i me my mine myself we us our ours you your yours he him his she her hers it
its itself they them their theirs themselves one ones someone something
who whom whose which what where when while why how whatever
be is are was were been being am has have had having do does did doing done
can could will would shall should may might must let get gets got
isn't aren't wasn't weren't hasn't haven't hadn't don't doesn't didn't can't
cannot couldn't won't wouldn't shouldn't
and or but nor so if then than as because though although also either neither
of on in at to by for from into onto with without within about upon via per
against among amongst across along around through throughout toward towards
some any all each every both no not none other others another such same own
very too just only even still really quite rather almost more most much many
few several lot lots bit kind sort like
""".split()) | NUMBER_WORDS

# Plural folding. Whole-word irregulars.
_IRREGULAR = {
    "people": "person", "men": "man", "women": "woman", "children": "child",
    "feet": "foot", "teeth": "tooth", "geese": "goose", "mice": "mouse",
    "lice": "louse", "oxen": "ox", "knives": "knife", "wives": "wife",
    "lives": "life", "leaves": "leaf", "wolves": "wolf", "halves": "half",
    "shelves": "shelf", "loaves": "loaf", "calves": "calf", "thieves": "thief",
    "scarves": "scarf", "hooves": "hoof", "elves": "elf", "selves": "self",
    "sheaves": "sheaf", "cacti": "cactus", "fungi": "fungus", "octopi":
    "octopus", "indices": "index", "matrices": "matrix", "vertices": "vertex",
    "analyses": "analysis", "crises": "crisis", "theses":
    "thesis",
}
# Irregular endings that are also safe inside compounds ("penknives",
# "housewives", "grandchildren", "policewomen", "eyeteeth").
_IRREGULAR_SUFFIX = (
    ("knives", "knife"), ("wives", "wife"), ("children", "child"),
    ("women", "woman"), ("teeth", "tooth"), ("people", "person"),
    ("leaves", "leaf"),
)
_IRREGULAR_SUFFIX_ENDINGS = tuple(p for p, _ in _IRREGULAR_SUFFIX)
# Never folded: singulars ending in s, plurale tantum, -s nouns.
_INVARIANT = frozenset("""
glass bus dress grass lens series species news this is was gas cross
has his its yes us thus plus always perhaps whereas less unless
mathematics physics politics athletics gymnastics economics aerobics
pants jeans shorts trousers scissors pliers tongs tweezers clothes goggles
binoculars leggings overalls pajamas pyjamas sunglasses eyeglasses
measles mumps diabetes herpes rabies means
chaos cosmos ethos pathos kudos thermos rhinoceros asbestos
canvas atlas alias bias christmas texas vegas overseas iris
""".split())
# Singulars ending in "-ie" whose plural "-ies" must not become "-y".
_IE_SINGULAR = frozenset("""
cookie movie zombie brownie smoothie selfie hippie rookie goalie calorie pixie
hoodie beanie bootie pie tie lie die necktie bowtie genie veggie auntie birdie
sweetie collie magpie prairie lingerie eerie pinkie doggie girlie yuppie
""".split())
# Singulars ending in "-che", whose plural "-ches" only drops the "s"
# (whole words: "beaches" and "peaches" do drop "es").
_CHE_SINGULAR = frozenset("""
ache headache toothache stomachache backache earache heartache bellyache niche
cache avalanche quiche cliche psyche creche attache tranche pastiche douche
microfiche panache mustache moustache
""".split())
# "-oe" singulars (plural "-oes" that only drops "s"; "tomatoes" drops "es").
_OE_SINGULAR = frozenset("""
shoe toe canoe oboe hoe foe floe roe doe sloe throe tiptoe mistletoe horseshoe
snowshoe
""".split())
# "-use" singulars after a consonant ("fuses"), unlike "buses" -> "bus".
_USE_SINGULAR = frozenset("fuse muse excuse ruse recluse abuse use refuse "
                          "accuse amuse".split())
# Singulars ending in "-s" that take "-es" (beyond the "-us" rule).
_ES_AFTER_S = frozenset("gas canvas atlas alias bias iris lens".split())
# Singular nouns ending in "-men" ("specimen", not "speciman").
_MEN_SINGULAR = frozenset("specimen abdomen omen amen regimen stamen acumen "
                          "semen hymen yemen ramen".split())


def is_stop_word(word: str) -> bool:
  """Whether a lower-cased word is a stop word (number words and digits too)."""
  return word in STOP_WORDS or word.isdigit()


@functools.lru_cache(maxsize=1 << 18)
def fold_plural(word: str) -> str:
  """Folds a lower-cased English plural to its singular, by rules.

  Stop words, short words (<= 3 characters), words with digits and the
  exceptions (`_INVARIANT`) are returned unchanged. Hyphenated words fold on
  their last part ("t-shirts" -> "t-shirt").

  Args:
    word: one lower-cased word, as `split_words` returns it.

  Returns:
    The singular form (or `word` itself).
  """
  if word in _IRREGULAR:
    return _IRREGULAR[word]
  if (len(word) <= 3 or word in STOP_WORDS or word in _INVARIANT
      or not word.isalpha()):
    if "-" in word:
      head, _, last = word.rpartition("-")
      folded = fold_plural(last)
      return word if folded == last else f"{head}-{folded}"
    return word
  if word.endswith(_IRREGULAR_SUFFIX_ENDINGS):  # One C call for all.
    for plural, singular in _IRREGULAR_SUFFIX:
      if word.endswith(plural):
        return word[:-len(plural)] + singular
  if word[-1] != "s":
    if word.endswith("men") and not (word in _MEN_SINGULAR
                                     or word.endswith("amen")):
      return word[:-3] + "man"
    return word
  if word.endswith(("ss", "us", "is")):
    return word
  # From here on `word` ends in "s".
  if word.endswith("ies"):
    if len(word) > 4 and word[:-1] not in _IE_SINGULAR:
      return word[:-3] + "y"
    return word[:-1]
  if word.endswith("es"):
    stem = word[:-2]  # "boxes" -> "box"
    if word.endswith(("sses", "xes", "zzes")):
      return stem
    if word.endswith(("ches", "shes")):
      return word[:-1] if word[:-1] in _CHE_SINGULAR else stem
    if word.endswith("oes"):
      return word[:-1] if word[:-1] in _OE_SINGULAR else stem
    if word.endswith("uses"):
      # "buses", "viruses" -> "-us"; "houses", "causes", "fuses" -> "-use".
      if word[:-1] in _USE_SINGULAR or word[-5] in "aeiou":
        return word[:-1]
      return stem
    if word.endswith("ses") and stem in _ES_AFTER_S:
      return stem
    return word[:-1]
  return word[:-1]


def _nfkc_lower_with_offsets(text: str):
  """NFKC + lower case of non-ASCII text, with each output char's source span.

  Normalizes one base character plus its combining marks at a time, so every
  output character can be traced back to the original characters it came from
  (NFKC and lower case may change the length: "ﬁ" -> "fi", "İ" -> "i̇").
  """
  out, starts, ends = [], [], []
  i, n = 0, len(text)
  while i < n:
    j = i + 1
    while j < n and unicodedata.combining(text[j]):
      j += 1
    chunk = unicodedata.normalize("NFKC", text[i:j]).lower().translate(
        _CHAR_MAP)
    out.append(chunk)
    starts.extend([i] * len(chunk))
    ends.extend([j] * len(chunk))
    i = j
  return "".join(out), starts, ends


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
  """Splits text into normalized (unfolded) words and their original spans.

  Args:
    text: any text.

  Returns:
    `(words, spans)`: lower-cased NFKC words (possessive "'s" cut, plurals not
    yet folded) and, for each, `(start, end)` such that `text[start:end]` is
    the word's surface form in the original text.
  """
  if text.isascii():
    # Fast path: NFKC is the identity and lower() keeps offsets; `findall`
    # and `str.find` run in C. A word starts with a letter or digit, so it
    # cannot occur in the non-word characters the regex skipped: the first
    # `find` from the previous end is its own position.
    low = text.lower()
    words = WORD_RE.findall(low)
    spans, pos, find = [], 0, low.find
    for w in words:
      s = find(w, pos)
      pos = s + len(w)
      spans.append((s, pos))
    if "'" in low:
      _cut_possessives(words, spans)
    return words, spans
  norm, starts, ends = _nfkc_lower_with_offsets(text)
  words, spans = [], []
  for m in WORD_RE.finditer(norm):
    w = m.group()
    s, e = m.span()
    if w.endswith("'s"):
      w, e = w[:-2], e - 2
    words.append(w)
    spans.append((starts[s], ends[e - 1]))
  return words, spans


def _cut_possessives(words: list[str], spans: list[tuple[int, int]]) -> None:
  """In place, ASCII text: "man's" -> "man", the span shortened by "'s"."""
  for i, w in enumerate(words):
    if w.endswith("'s"):
      words[i] = w[:-2]
      spans[i] = (spans[i][0], spans[i][1] - 2)


def normalize_word(word: str) -> str:
  """The vocabulary form of one `split_words` word (plural folded)."""
  return fold_plural(word)


def normalize_words(text: str) -> list[str]:
  """Normalized words of `text` (plurals folded, stop words kept)."""
  return [fold_plural(w) for w in split_words(text)[0]]


def content_words(text: str) -> list[str]:
  """Normalized words of `text` without stop words."""
  return [fold_plural(w) for w in split_words(text)[0] if not is_stop_word(w)]


def normalize_concept(text: str) -> str:
  """The vocabulary token for a concept name: "Hot Dogs" -> "hot dog".

  Stop words stay inside a multi-word concept ("cup of coffee") so that the
  tokenizer only matches it where the words are really adjacent.
  """
  return " ".join(normalize_words(text))


def clean_category_name(name: str) -> str:
  """Category name as annotation files give it -> text to tokenize.

  LVIS writes spaces as underscores and disambiguates senses with a suffix:
  "hot_dog" -> "hot dog", "bow_(weapon)" -> "bow"; a sense in the middle
  separates alternatives ("monitor_(computer_equipment) computer_monitor" ->
  "monitor/computer monitor"). The sense is dropped, so
  both LVIS "bow" categories share the token `bow` (a text-free model cannot
  tell the senses apart from a query anyway). Readers and the input pipeline
  should pass category names through this before tokenizing, as the
  vocabulary builder does.

  Args:
    name: a raw category name or synonym.

  Returns:
    The cleaned name (may still hold "/" alternatives, see
    `category_name_variants`).
  """
  name = name.replace("_", " ")
  stripped = _SENSE_RE.sub("", name)
  # A sense inside the name separates two names: LVIS v1's category 698 is
  # "monitor_(computer_equipment) computer_monitor" -> "monitor", "computer
  # monitor" (alternatives, as "/" gives them).
  stripped = "/".join(p.strip() for p in _INNER_SENSE_RE.split(stripped)
                      if p.strip())
  # A name that is only a parenthesis keeps its words.
  return stripped if stripped.strip() else name.strip()


def category_name_variants(name: str) -> list[str]:
  """The alternative names in one category name, cleaned.

  Objects365-style names list alternatives with "/" ("Monitor/TV"); each
  alternative is a separate name for the concept rules of the builder.
  """
  cleaned = clean_category_name(name)
  return [v.strip() for v in cleaned.split("/") if v.strip()]
