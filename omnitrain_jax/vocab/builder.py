"""Builds a `Vocabulary` from category names and texts (no file reading).

The inputs are `AnnotationFile`s: the categories and texts of one annotation
file each. `omnitrain_jax.data.vocab_inputs` reads them from the files (and
`python -m omnitrain_jax.data.build_vocab` is the command line); this module
only counts, so that the vocabulary package needs nothing from the data one.

1. **Inputs.** Instances files give category names (LVIS synonyms too) with
   their box counts; grounding, caption and referring-expression files give
   texts.
2. **Category concepts** (`category_concepts`), per instances file, so in the
   dataset's own terms. Names are cleaned first (`text.clean_category_name`:
   LVIS ``hot_dog`` -> ``hot dog``, sense suffix ``bow_(weapon)`` -> ``bow``;
   Objects365 ``Monitor/TV`` -> the alternatives ``monitor``, ``tv``). A
   one-word name is a concept, and so is a multi-word name (``fire truck``,
   ``ski pole``, ``trash can``: one token each, so a ski-pole box is no
   positive for ``ski``) unless the file's names form a **grid** around it:
   a k-word name is compositional, and split into its content words, when
   every word is *swappable* -- at least `min_partners` (default 2) other
   categories of the file have a name differing from it only at that
   position -- and every two positions' swaps *combine* -- at least
   `min_partners` other categories have a name with both words swapped for
   swappable ones. In a colour x shape dataset ``red circle`` splits
   (``blue circle``, ``green circle``, ``red square``, ``red star``, and
   ``blue square``, ``green star`` combine them). A real label set overlaps
   by accident without combining: LVIS's ``fire truck`` has ``fire alarm``,
   ``fire hose`` and ``pickup truck``, ``tow truck``, but no ``tow hose``,
   so it stays whole, as do COCO's ``hot dog`` and ``traffic light``.
   Position matters (``dog collar`` is no partner of ``hot dog``), and an
   LVIS category's synonyms are not partners of each other (``chain mail``,
   ``ring mail``, ``chain armor``, ``ring armor`` name one category). On the
   real LVIS v1 list with synonyms no name splits (the earlier rule, without
   the combination, split 55, e.g. ``fire truck``, ``tennis ball``, ``life
   jacket``). `split_all` (``--split_categories``) splits every multi-word
   name.
3. **Counts.** A category concept counts its boxes. Captions, referring
   expressions and grounding captions are tokenized against the category
   concepts (longest match, so "hot dogs" counts `hot dog`); matched concepts
   add to their counts, the other non-stop words are counted as candidate
   words. With ``min_bigram_count > 0``, pairs of adjacent candidate words
   become candidate bigram concepts when frequent (``>= min_bigram_count``)
   and collocated (normalized PMI ``>= bigram_min_npmi``, default 0.5: "hot
   dog"-like pairs, not "red circle"-like combinations of frequent words);
   a bigram equal to a split category name is never added.
4. **Assemble**: reserved ids, then every category concept (always kept,
   most frequent first), then candidate words/bigrams by count (ties by
   string), cut to `max_size` tokens in total (reserved included).

Counts go into the file (they drive frequency-based negative sampling).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
import dataclasses
import itertools
import math

import numpy as np

from omnitrain_jax.vocab import text as text_lib
from omnitrain_jax.vocab import tokenizer as tokenizer_lib
from omnitrain_jax.vocab import vocabulary as vocabulary_lib


@dataclasses.dataclass(frozen=True)
class Category:
  """One category of an instances file.

  Attributes:
    name: the raw name ("hot_dog", "bow_(weapon)").
    synonyms: raw synonyms (LVIS), possibly empty.
    num_boxes: annotations of this category in the file.
  """
  name: str
  synonyms: tuple[str, ...] = ()
  num_boxes: int = 0


@dataclasses.dataclass(frozen=True)
class AnnotationFile:
  """What the builder counts from one annotation file.

  Attributes:
    path: the file (for the summary).
    format: its format name, e.g. "coco_instances" (for the summary).
    categories: categories (instances files), else empty.
    texts: captions / expressions (text files), else empty.
  """
  path: str
  format: str
  categories: tuple[Category, ...] = ()
  texts: tuple[str, ...] = ()


# ------------------------------------------------------- category concepts


def category_concepts(names: Iterable[str | Sequence[str]], *,
                      split_all: bool = False,
                      min_partners: int = 2) -> dict[str, list[str]]:
  """Concept tokens of each category name of one dataset (rule: module doc).

  Args:
    names: the dataset's raw category names; an entry may also be a sequence
      of names of *one* category (LVIS: the name and its synonyms), whose
      names are never counted as each other's partners.
    split_all: split every multi-word name into its content words.
    min_partners: how many other categories must share each word at its
      position, and how many must combine the swapped words, for a
      multi-word name to count as compositional.

  Returns:
    Raw name -> its concept tokens (normalized; empty for a name without
    words, e.g. "()").
  """
  groups = [(n,) if isinstance(n, str) else tuple(n) for n in names]
  return _category_concepts(groups, split_all, min_partners)[0]


def _category_concepts(groups, split_all, min_partners):
  """`category_concepts` of name groups (one per category), plus the set of
  normalized names that were split."""
  if min_partners < 1:
    raise ValueError(f"min_partners={min_partners} must be >= 1.")
  variants = {}  # raw name -> its normalized variants (word tuples)
  owners = collections.defaultdict(set)  # word tuple -> its categories
  for g, group in enumerate(groups):
    for n in group:
      if n not in variants:
        variants[n] = [tuple(text_lib.normalize_words(v))
                       for v in text_lib.category_name_variants(n)]
      for words in variants[n]:
        if len(words) > 1:
          owners[words].add(g)
  # (name with one position wildcarded, position) -> the words filling it.
  fills = collections.defaultdict(set)
  for words in owners:
    for i, w in enumerate(words):
      fills[(words[:i] + (None,) + words[i + 1:], i)].add(w)
  out, split = {}, set()
  for g, group in enumerate(groups):
    for n in group:
      if n in out:
        continue
      concepts = []
      for words in variants[n]:
        if not words:
          continue
        content = [w for w in words if not text_lib.is_stop_word(w)]
        if len(words) > 1 and content and (split_all or _is_compositional(
            words, g, owners, fills, min_partners)):
          concepts.extend(content)
          split.add(" ".join(words))
        else:
          concepts.append(" ".join(words))
      out[n] = list(dict.fromkeys(concepts))
  return out, split


def _is_compositional(words: tuple[str, ...], group: int, owners, fills,
                      min_partners: int) -> bool:
  """Whether the multi-word name `words` of category `group` is a grid cell.

  Each position's word must be swappable: at least `min_partners` other
  categories have a name differing from `words` only there ("blue circle",
  "green circle" for "red circle"). And every two positions' swaps must
  combine: at least `min_partners` other categories have a name with both
  words swapped for swappable ones ("blue square", "green star"). Real
  label sets overlap by accident ("fire truck": "fire alarm", "fire hose";
  "pickup truck", "tow truck") but such overlaps do not combine ("tow hose"
  is no category); a colour x shape set does.
  """
  def others(key):
    return any(g != group for g in owners.get(key, ()))

  swaps = []
  for i, w in enumerate(words):
    alts = [v for v in fills[(words[:i] + (None,) + words[i + 1:], i)]
            if v != w and others(words[:i] + (v,) + words[i + 1:])]
    if len(alts) < min_partners:
      return False
    swaps.append(alts)
  for i, j in itertools.combinations(range(len(words)), 2):
    swaps_j, hits = set(swaps[j]), 0
    for u in swaps[i]:
      key = list(words)
      key[i], key[j] = u, None
      # The words that complete "u _" (a C-level set intersection, so large
      # label sets stay fast), then the check that another category owns it.
      for v in fills.get((tuple(key), j), set()) & swaps_j:
        key[j] = v
        hits += others(tuple(key))
      if hits >= min_partners:
        break
    if hits < min_partners:
      return False
  return True


# ----------------------------------------------------------------- counting


def count_text_tokens(
    tokenizer: tokenizer_lib.Tokenizer, texts: Sequence[str], *,
    bigrams: bool = False, fast: bool = True,
) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
  """What `tokenizer.encode` gives over many texts, counted.

  Args:
    tokenizer: the tokenizer (in the builder: over the category concepts).
    texts: the texts.
    bigrams: also count pairs of unknown words adjacent in a text (only blank
      space between them).
    fast: count word by word where that gives the same result (below).

  Returns:
    `(token_counts, unknown_word_counts, bigram_counts)`, keyed by token
    string, normalized unknown word and "word word".

  The fast path gives exactly the counts of tokenizing each text: where no
  multi-word concept can match, a word tokenizes the same wherever it
  occurs, so ASCII texts are split and counted by distinct word in C (one
  `findall` over the joined texts) and each distinct word is tokenized once.
  Texts that hold the first two words of a multi-word concept in a row,
  non-ASCII texts, and every text when counting bigrams, go through the
  tokenizer one by one.
  """
  tok_counts, unk_counts, bigram_counts = (
      collections.Counter(), collections.Counter(), collections.Counter())
  slow = []
  if fast and not bigrams:
    ascii_texts = []
    for t in texts:
      (ascii_texts if t.isascii() else slow).append(t)
    find = text_lib.WORD_RE.findall
    # "Q" separates the texts: a word of its own that no lower-cased text
    # holds, so the word list can be cut back into texts.
    all_words = find(_SEP.join([t.lower() for t in ascii_texts]))
    raw = collections.Counter(all_words)
    raw.pop("Q", None)
    # A multi-word concept can only match where a text holds its first two
    # words in a row: such texts take the slow path. `raw_pairs` are those
    # word pairs as they appear in the texts (before folding).
    fold = text_lib.fold_plural
    seconds = collections.defaultdict(set)  # first word -> second words
    for t in tokenizer.vocab.tokens:
      if " " in t:
        a, b = t.split(" ", 2)[:2]
        seconds[a].add(b)
    second_words = set().union(*seconds.values()) if seconds else set()
    # Fold each distinct word once (there can be millions).
    folded = dict(zip(raw, map(fold, map(_cut_possessive, raw))))
    raw_firsts = collections.defaultdict(list)  # first word -> raw forms
    raw_seconds = collections.defaultdict(list)
    for r, f in folded.items():
      if f in seconds:
        raw_firsts[f].append(r)
      if f in second_words:
        raw_seconds[f].append(r)
    raw_pairs = {(r1, r2) for f1, r1s in raw_firsts.items() for r1 in r1s
                 for f2 in seconds[f1] for r2 in raw_seconds.get(f2, ())}
    if raw_pairs:
      hits = [i for i, p in enumerate(zip(all_words, all_words[1:]))
              if p in raw_pairs]
      if hits:
        seps = np.flatnonzero(np.array(all_words, dtype=object) == "Q")
        for j in np.unique(np.searchsorted(seps, hits)).tolist():
          slow.append(ascii_texts[j])
          raw.subtract(find(ascii_texts[j].lower()))
    index = tokenizer.vocab.index
    for r, c in raw.items():
      if c <= 0:
        continue
      f = folded[r]
      if "-" in f or "'" in f:
        _, _, toks, unknown = tokenizer.tokenize(r)
        for t in toks:
          tok_counts[t] += c
        for u, _ in unknown:
          unk_counts[u] += c
        continue
      if f in index:
        tok_counts[f] += c
      elif not text_lib.is_stop_word(f):
        unk_counts[f] += c
  else:
    slow = texts
  for t in slow:
    _, _, toks, unknown = tokenizer.tokenize(t)
    tok_counts.update(toks)
    unk_counts.update(u for u, _ in unknown)
    if bigrams:
      for (u, (_, e)), (v, (s, _)) in zip(unknown, unknown[1:]):
        if t[e:s].isspace():
          bigram_counts[f"{u} {v}"] += 1
  return tok_counts, unk_counts, bigram_counts


_SEP = "\nQ\n"


def _cut_possessive(word: str) -> str:
  return word[:-2] if word.endswith("'s") else word


# ----------------------------------------------------------------- building


def build_vocabulary(
    files: Sequence[AnnotationFile], *,
    max_size: int, split_categories: bool = False, min_count: int = 1,
    min_partners: int = 2, min_bigram_count: int = 0,
    bigram_min_npmi: float = 0.5, top_k_summary: int = 20,
) -> tuple[vocabulary_lib.Vocabulary, dict]:
  """Builds a vocabulary from annotation files' contents (rules: module doc).

  Args:
    files: the files' categories and texts (read from files by
      `omnitrain_jax.data.vocab_inputs.read_annotations`).
    max_size: the most tokens in total, reserved ids included. Category
      concepts are always kept, even beyond it (the summary says so).
    split_categories: split every multi-word category name.
    min_count: drop caption words seen fewer times.
    min_partners: see `category_concepts`.
    min_bigram_count: add adjacent word pairs seen at least this often
      (and collocated, see `bigram_min_npmi`) as concepts; 0 disables.
    bigram_min_npmi: the normalized PMI a bigram needs, in [-1, 1].
    top_k_summary: how many top tokens the summary lists.

  Returns:
    `(vocabulary, summary)`; the summary is JSON-serializable.
  """
  if max_size <= vocabulary_lib.NUM_RESERVED:
    raise ValueError(f"max_size={max_size} leaves no room for concepts after "
                     f"the {vocabulary_lib.NUM_RESERVED} reserved ids; use a "
                     "larger --max_size.")
  if min_count < 1 or min_bigram_count < 0:
    raise ValueError(f"min_count={min_count} must be >= 1 and "
                     f"min_bigram_count={min_bigram_count} >= 0.")
  files = list(files)

  # Category concepts with box counts, per file.
  cat_counts = collections.Counter()
  split_names, empty_names = set(), []
  for src in files:
    if not src.categories:
      continue
    concepts, split = _category_concepts(
        [(c.name, *c.synonyms) for c in src.categories], split_categories,
        min_partners)
    split_names |= split
    for c in src.categories:
      if not concepts[c.name]:
        empty_names.append(c.name)
      for t in concepts[c.name]:
        cat_counts[t] += c.num_boxes
      for s in c.synonyms:
        for t in concepts[s]:
          cat_counts[t] += 0  # Present, even without boxes of its own.

  # Text counts, tokenized against the category concepts.
  tok = tokenizer_lib.Tokenizer(vocabulary_lib.Vocabulary(sorted(cat_counts)))
  texts = [t for src in files for t in src.texts]
  hits, words, bigrams = count_text_tokens(tok, texts,
                                           bigrams=min_bigram_count > 0)
  cat_counts.update(hits)

  # Candidates: words, then collocated bigrams.
  candidates = {w: n for w, n in words.items() if n >= min_count}
  cut_min_count = len(words) - len(candidates)
  num_bigrams = 0
  if min_bigram_count:
    total = sum(words.values())
    for bg, n in bigrams.items():
      if n < min_bigram_count or bg in split_names or bg in cat_counts:
        continue
      a, b = bg.split(" ")
      p_ab = n / total
      npmi = (math.log(p_ab / (words[a] / total * words[b] / total))
              / -math.log(p_ab) if p_ab < 1 else 1.0)
      if npmi >= bigram_min_npmi:
        candidates[bg] = n
        num_bigrams += 1

  # Most frequent first, ties by string (a stable sort keeps the order of
  # equal keys, also with reverse=True; C-level keys, no lambda).
  cats = sorted(sorted(cat_counts), key=cat_counts.__getitem__, reverse=True)
  ranked = sorted(sorted(candidates), key=candidates.__getitem__,
                  reverse=True)
  room = max(0, max_size - vocabulary_lib.NUM_RESERVED - len(cats))
  kept = ranked[:room]
  tokens = cats + kept
  counts = [cat_counts[t] for t in cats] + [candidates[t] for t in kept]
  vocab = vocabulary_lib.Vocabulary(tokens, counts)

  order = np.argsort(-vocab.counts[vocab.num_reserved:], kind="stable")
  top = [[vocab.tokens[i + vocab.num_reserved],
          int(vocab.counts[i + vocab.num_reserved])]
         for i in order[:top_k_summary]]
  summary = {
      "size": len(vocab),
      "max_size": max_size,
      "reserved": vocab.num_reserved,
      "category_concepts": len(cats),
      "words": sum(1 for t in kept if " " not in t),
      "bigrams": sum(1 for t in kept if " " in t),
      "bigram_candidates": num_bigrams,
      "cut_by_max_size": len(ranked) - len(kept),
      "cut_by_min_count": cut_min_count,
      "categories_over_max_size": len(cats) + vocab.num_reserved > max_size,
      "multiword_concepts": sum(1 for t in tokens if " " in t),
      "max_concept_words": vocab.max_concept_words,
      "split_category_names": sorted(split_names)[:50],
      "num_split_category_names": len(split_names),
      "empty_category_names": empty_names[:50],
      "texts": len(texts),
      "files": [{"path": s.path, "format": s.format,
                 "categories": len(s.categories), "texts": len(s.texts)}
                for s in files],
      "top_tokens": top,
  }
  return vocab, summary
