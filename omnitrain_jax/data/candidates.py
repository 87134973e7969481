"""Per-example candidate tokens: the Q vocabulary ids a batch example is scored on.

The model never builds [B, N, V] logits: each example carries Q token ids and
the head scores its boxes against those Q rows of the token table only
(DESIGN.md section 3). This batch-level transform runs after the three streams
are concatenated, because it samples negatives from the *other* examples.

Per example b, in this order, without duplicates, 0-padded to Q:
  1. positives P_b: its box tokens, then its caption tokens;
  2. known negatives N_b: its ``neg_tokens`` not in P_b;
  3. batch negatives: other examples' positives not in P_b or N_b, in random
     order (hard negatives: real concepts of the same step);
  4. vocabulary negatives: ids drawn by frequency, p(t) ~ count(t)^alpha
     (alpha = 0.75 as word2vec; uniform over non-reserved ids when the
     vocabulary has no counts), until Q is full. ``min_vocab_negatives``
     reserves slots for them so that rare tokens keep being pushed down even
     when the batch alone could fill Q.

Masks (schema.py):
  * ``cand_known``: the token's label is known for a matched box.
    det: P_b | N_b; with ``det_batch_negatives_known`` also the batch and
    vocabulary negatives. The default (False) is the conservative choice: a
    token sampled from another example ("man", "left") may well be visible in
    a COCO image without being a COCO category, so treating it as a negative
    would teach the model to suppress true concepts. Exhaustive datasets
    already list their known negatives in ``neg_tokens``.
    grd / img: P_b | N_b as well (the loss applies its own per-stream rule;
    grounding has no known negatives, captions use all candidates in a
    softmax).
  * ``cand_bg``: a known negative for an *unmatched* det prediction: det
    ``cand_known`` minus the example's ``no_bg_tokens`` (LVIS
    not-exhaustive categories); always False for grd and img (grounding is not
    exhaustive; captions have no boxes).

Positives that do not fit in Q. ``overflow="count"`` (default) keeps the first
Q (box tokens before caption tokens) and counts the rest in
``positives_dropped``: the dropped tokens then get no logit, so their boxes
learn less, and the count in the logs says to raise ``num_candidates``;
``overflow="error"`` raises instead. Known negatives beyond Q are dropped and
counted (``known_negatives_dropped``).

Determinism: the transform is a grain ``RandomMap`` applied to the batched
iterator, whose generator is seeded from the pipeline seed and the step
(element counter) and saved with the iterator state, so a resumed run draws
the same candidates (with worker processes each worker counts its own
batches: the draws depend on the worker count, as the batch order does).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
import threading
from typing import Any

import grain
import numpy as np

from omnitrain_jax.data import schema

_DET = schema.STREAM_IDS["det"]
# Batch key of the pipeline's side channel for counts (see stats.py).
REPORT = "_report"


class CandidateStats:
  """Thread-safe counters of what the candidate sampler had to drop."""

  def __init__(self):
    self._lock = threading.Lock()
    self._counts = collections.Counter()

  def add(self, counts: Mapping[str, int]) -> None:
    with self._lock:
      self._counts.update({k: v for k, v in counts.items() if v})

  def counts(self) -> dict[str, int]:
    with self._lock:
      return dict(self._counts)


def sampling_probs(counts: np.ndarray | None, vocab_size: int, *,
                   alpha: float = 0.75,
                   num_reserved: int = 2) -> np.ndarray:
  """float64 [V] probabilities of drawing each id as a vocabulary negative.

  Args:
    counts: int [V] token frequencies (the vocabulary file's counts), or None.
    vocab_size: V.
    alpha: exponent on the counts (0: uniform over counted tokens).
    num_reserved: ids below this (pad, unk) are never drawn.

  Returns:
    Probabilities summing to 1; uniform over non-reserved ids when `counts` is
    None or all zero.
  """
  if vocab_size <= num_reserved:
    raise ValueError(f"Vocabulary of size {vocab_size} has no tokens besides "
                     f"the {num_reserved} reserved ids.")
  p = np.zeros(vocab_size, np.float64)
  if counts is not None:
    counts = np.asarray(counts, np.float64)
    if counts.shape != (vocab_size,):
      raise ValueError(f"counts has shape {counts.shape}, expected "
                       f"({vocab_size},).")
    p[num_reserved:] = counts[num_reserved:] ** alpha
  if p.sum() <= 0:
    p[num_reserved:] = 1.0
  return p / p.sum()


def _unique_list(ids: list[int]) -> list[int]:
  """Unique ids above the reserved ones, in order of first occurrence."""
  return [t for t in dict.fromkeys(ids) if t > schema.UNK_ID]


class Candidates(grain.transforms.RandomMap):
  """Adds ``candidates``, ``cand_known``, ``cand_bg`` (all [B, Q]) to a batch.

  Args:
    num_candidates: Q.
    probs: float64 [V] vocabulary-negative probabilities (`sampling_probs`).
    min_vocab_negatives: slots kept for vocabulary negatives (when the
      example's positives and known negatives leave room).
    det_batch_negatives_known: count batch/vocabulary negatives as known
      negatives of det examples (see the module docstring; default False).
    overflow: ``"count"`` or ``"error"`` for positives beyond Q.
    stats: optional `CandidateStats` updated with the drop counts.
  """

  def __init__(self, num_candidates: int, probs: np.ndarray, *,
               min_vocab_negatives: int = 0,
               det_batch_negatives_known: bool = False,
               overflow: str = "count", stats: CandidateStats | None = None):
    if overflow not in ("count", "error"):
      raise ValueError(f"overflow={overflow!r}; use 'count' or 'error'.")
    if not 0 <= min_vocab_negatives <= num_candidates:
      raise ValueError(f"min_vocab_negatives={min_vocab_negatives} must be in "
                       f"[0, num_candidates={num_candidates}].")
    self.num_candidates = num_candidates
    self.probs = np.asarray(probs, np.float64)
    self.cdf = np.cumsum(self.probs)
    self.cdf /= self.cdf[-1]
    self.num_drawable = int((self.probs > 0).sum())
    self.min_vocab_negatives = min_vocab_negatives
    self.det_batch_negatives_known = det_batch_negatives_known
    self.overflow = overflow
    self.stats = stats

  def __getstate__(self):
    state = dict(self.__dict__)
    state["stats"] = None  # A lock does not pickle; counts stay per process.
    return state

  def _vocab_negatives(self, rng: np.random.Generator, need: int,
                       exclude: set[int]) -> list[int]:
    """Up to `need` distinct ids drawn by `probs`, none in `exclude`."""
    probs = self.probs
    avail = self.num_drawable - sum(1 for t in exclude if probs[t] > 0)
    need = min(need, avail)
    if need <= 0:
      return []
    got: list[int] = []
    if 4 * need < avail:
      # Rejection sampling by inverse CDF: O(need log V), independent of V,
      # while few of the drawable ids are wanted (the normal case).
      taken = set(exclude)
      for _ in range(4):
        draw = np.searchsorted(self.cdf, rng.random(2 * need + 8),
                               side="right")
        for t in draw.tolist():
          if t not in taken and probs[t] > 0:
            taken.add(t)
            got.append(t)
            if len(got) == need:
              return got
    # Most of what is left is wanted (small vocabularies): exact weighted
    # sampling without replacement (Gumbel top-k) over the rest, O(V).
    p = probs.copy()
    p[list(exclude.union(got))] = 0
    left = np.flatnonzero(p > 0)
    keys = np.log(p[left]) + rng.gumbel(size=left.size)
    return got + left[np.argsort(-keys)][:need - len(got)].tolist()

  def random_map(self, batch: dict[str, np.ndarray],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    q = self.num_candidates
    box_tokens = batch["box_tokens"]  # [B, M, T]
    b_size = box_tokens.shape[0]
    box_mask = batch["box_mask"]  # [B, M]
    streams = batch["stream"]  # [B]
    # Per-example work on Python lists and sets: Q is small (tens to a few
    # hundred), where np.isin/np.unique cost more than they save.
    positives = []
    for b in range(b_size):
      pos = box_tokens[b][box_mask[b]].reshape(-1).tolist()
      pos += batch["caption_tokens"][b].tolist()
      positives.append(_unique_list(pos))
    pool = _unique_list([t for pos in positives for t in pos])

    cands = np.zeros((b_size, q), np.int32)
    known = np.zeros((b_size, q), bool)
    bg = np.zeros((b_size, q), bool)
    dropped = collections.Counter()
    for b in range(b_size):
      pos = positives[b]
      if len(pos) > q:
        if self.overflow == "error":
          raise ValueError(
              f"Example {b} of the batch (stream "
              f"{schema.STREAMS[int(streams[b])]}, image_id "
              f"{int(batch['image_id'][b])}) has {len(pos)} positive tokens "
              f"but num_candidates={q}; raise num_candidates (or lower "
              "max_boxes/max_box_tokens/max_caption_tokens), or set "
              "candidates overflow='count'.")
        dropped["positives_dropped"] += len(pos) - q
        pos = pos[:q]
      used = set(pos)
      neg = [t for t in _unique_list(batch["neg_tokens"][b].tolist())
             if t not in used]
      room = q - len(pos)
      if len(neg) > room:
        dropped["known_negatives_dropped"] += len(neg) - room
        neg = neg[:room]
      used.update(neg)
      row = pos + neg
      room = q - len(row)
      batch_room = room - min(self.min_vocab_negatives, room)
      other = [t for t in pool if t not in used]
      if other and batch_room > 0:
        order = rng.permutation(len(other))[:batch_room]
        other = [other[i] for i in order.tolist()]
        row += other
        used.update(other)
      row += self._vocab_negatives(rng, q - len(row), used)
      cands[b, :len(row)] = row
      is_det = streams[b] == _DET
      n_known = len(row) if is_det and self.det_batch_negatives_known \
          else len(pos) + len(neg)
      known[b, :n_known] = True
      if is_det:
        no_bg = set(batch["no_bg_tokens"][b].tolist())
        no_bg.discard(schema.PAD_ID)
        bg[b, :n_known] = [t not in no_bg for t in row[:n_known]]
    if self.stats is not None:
      self.stats.add(dropped)
    out = dict(batch)
    if REPORT in batch:  # Counted by the pipeline's main process.
      out[REPORT] = {**batch[REPORT], "candidates": dict(dropped)}
    out["candidates"] = cands  # [B, Q]
    out["cand_known"] = known  # [B, Q]
    out["cand_bg"] = bg  # [B, Q]
    return out


def candidates_from_config(config: Any, vocab: Any,
                           stats: CandidateStats | None = None) -> Candidates:
  """Builds `Candidates` from ``config.data`` and a `Vocabulary`."""
  probs = sampling_probs(np.asarray(vocab.counts), len(vocab),
                         alpha=config.candidates.alpha,
                         num_reserved=vocab.num_reserved)
  return Candidates(
      config.spec.num_candidates, probs,
      min_vocab_negatives=config.candidates.min_vocab_negatives,
      det_batch_negatives_known=config.candidates.det_batch_negatives_known,
      overflow=config.candidates.overflow, stats=stats)
