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
the same candidates.
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


def _unique_keep_order(ids: np.ndarray) -> np.ndarray:
  ids = ids[ids > schema.UNK_ID]
  if ids.size <= 1:
    return ids
  _, first = np.unique(ids, return_index=True)
  return ids[np.sort(first)]


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
                       exclude: np.ndarray) -> np.ndarray:
    """Up to `need` distinct ids by `probs`, none in `exclude`."""
    if need <= 0:
      return np.zeros((0,), np.int32)
    got = np.zeros((0,), np.int64)
    # Rejection sampling by inverse CDF: O(need log V), independent of V,
    # while the vocabulary is much larger than Q (the normal case).
    for _ in range(4):
      draw = np.searchsorted(self.cdf, rng.random(2 * need + 8), side="right")
      draw = np.minimum(draw, len(self.cdf) - 1)
      draw = np.concatenate([got, draw])
      _, first = np.unique(draw, return_index=True)
      draw = draw[np.sort(first)]
      draw = draw[~np.isin(draw, exclude)]
      got = draw[:need]
      if got.size == need:
        return got.astype(np.int32)
    # A small vocabulary (or heavy exclusion): exact weighted sampling without
    # replacement over what is left (Gumbel top-k), O(V).
    p = self.probs.copy()
    p[exclude[exclude < len(p)]] = 0
    p[got] = 0
    left = np.flatnonzero(p > 0)
    rest = need - got.size
    if left.size:
      keys = np.log(p[left]) + rng.gumbel(size=left.size)
      order = left[np.argsort(-keys)][:rest]
      got = np.concatenate([got, order])
    return got.astype(np.int32)

  def random_map(self, batch: dict[str, np.ndarray],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    q = self.num_candidates
    box_tokens = batch["box_tokens"]  # [B, M, T]
    b_size = box_tokens.shape[0]
    box_mask = batch["box_mask"]  # [B, M]
    streams = batch["stream"]  # [B]
    positives = []
    for b in range(b_size):
      pos = np.concatenate([box_tokens[b][box_mask[b]].reshape(-1),
                            batch["caption_tokens"][b]])
      positives.append(_unique_keep_order(pos))
    pool = _unique_keep_order(np.concatenate(positives + [np.zeros(0, np.int32)]))

    cands = np.zeros((b_size, q), np.int32)
    known = np.zeros((b_size, q), bool)
    bg = np.zeros((b_size, q), bool)
    dropped = collections.Counter()
    for b in range(b_size):
      pos = positives[b]
      if pos.size > q:
        if self.overflow == "error":
          raise ValueError(
              f"Example {b} of the batch (stream "
              f"{schema.STREAMS[int(streams[b])]}, image_id "
              f"{int(batch['image_id'][b])}) has {pos.size} positive tokens "
              f"but num_candidates={q}; raise num_candidates (or lower "
              "max_boxes/max_box_tokens/max_caption_tokens), or set "
              "candidates overflow='count'.")
        dropped["positives_dropped"] += pos.size - q
        pos = pos[:q]
      neg = _unique_keep_order(batch["neg_tokens"][b])
      neg = neg[~np.isin(neg, pos)]
      room = q - pos.size
      if neg.size > room:
        dropped["known_negatives_dropped"] += neg.size - room
        neg = neg[:room]
      used = np.concatenate([pos, neg]).astype(np.int32)
      room = q - used.size
      batch_room = max(0, room - min(self.min_vocab_negatives, room))
      other = pool[~np.isin(pool, used)]
      if other.size > batch_room:
        other = rng.permutation(other)[:batch_room]
      elif other.size:
        other = rng.permutation(other)
      used = np.concatenate([used, other.astype(np.int32)])
      vocab_neg = self._vocab_negatives(rng, q - used.size, used)
      row = np.concatenate([used, vocab_neg])
      cands[b, :row.size] = row
      n_known = pos.size + neg.size
      if streams[b] == _DET and self.det_batch_negatives_known:
        n_known = row.size
      known[b, :n_known] = True
      if streams[b] == _DET:
        bg[b] = known[b] & ~np.isin(cands[b], batch["no_bg_tokens"][b][
            batch["no_bg_tokens"][b] > 0])
    if self.stats is not None:
      self.stats.add(dropped)
    out = dict(batch)
    out["candidates"] = cands
    out["cand_known"] = known
    out["cand_bg"] = bg
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
