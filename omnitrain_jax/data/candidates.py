"""Per-example candidate tokens: the Q vocabulary ids a batch example is scored on.

The model never builds [B, N, V] logits: each example carries Q token ids and
the head scores its boxes against those Q rows of the token table only
(DESIGN.md section 3). Candidates are built per batch, after the three
streams are concatenated, because the batch negatives are the *other*
examples' positives: in training over the *global* batch (all processes'
shares, see "Determinism"), by the trainer; in the single-process tools and
the evaluation pipeline over the process's batch, by the pipeline.

Per example b, in this order, without duplicates, 0-padded to Q:
  1. positives P_b: its box tokens, then its caption tokens;
  2. known negatives N_b: its ``neg_tokens`` not in P_b;
  3. batch negatives: positives of the batch's examples (the pool) not in
     P_b or N_b, drawn uniformly without replacement, in random order (hard
     negatives: real concepts of the same step);
  4. vocabulary negatives: ids drawn by frequency, p(t) ~ count(t)^alpha
     (alpha = 0.75 as word2vec; uniform over non-reserved ids when the
     vocabulary has no counts), until Q is full. ``min_vocab_negatives``
     reserves slots for them so that rare tokens keep being pushed down even
     when the batch alone could fill Q.

Masks (schema.py):
  * ``cand_known``: the token's label is known for a matched box.
    det: P_b | N_b; with ``det_batch_negatives_known`` also the batch and
    vocabulary negatives, except those in the example's ``no_bg_tokens``
    (tokens the image's labels say nothing about: LVIS not-exhaustive
    categories, the colour words of a colour-jittered image). The default
    (False) is the conservative choice: a token sampled from another example
    ("man", "left") may well be visible in a COCO image without being a COCO
    category, so treating it as a negative would teach the model to suppress
    true concepts. Exhaustive datasets already list their known negatives in
    ``neg_tokens``. True is OWL-ViT's practice (the batch's other queries
    as negatives of every image) and the only source of negatives on
    detection boxes for a token no detection dataset names (ShapesWorld's
    caption-only `hexagon`, whose false positives are circles); on
    ShapesWorld it did not lift `hexagon` and cost base AP (README,
    "Caption-only shapes need negatives on det boxes?").
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
counted (``known_negatives_dropped``). Counts are per process (each process
counts its own examples).

Determinism: an example's candidates depend only on the example, on the set
of positives of the batch it is in, and on ``data.seed`` -- not on the
number of processes or devices, the example's position in the batch, the
worker count, or what was drawn before:
  * Identity. The pipeline gives every example a key ``_key`` = int64
    (crc32 of ``split/stream/source``, index) (`example_key`). In training
    the index is the example's position in its source's shuffled, repeated
    sequence *before* the process shard (`transforms.AttachMeta`), so the
    same example has the same key whichever process reads it, and no key
    repeats over a run (the index grows across epochs); in evaluation it is
    the record's index in the validation file.
  * Draws. Each example's batch-negative order and vocabulary negatives come
    from its own counter-based generator (Philox) keyed by (``data.seed``,
    the key). The step is not part of the key: the identity never repeats,
    and without the step the single-process pipeline (inspect, benchmarks)
    yields exactly the candidates the trainer builds.
  * Pool. The batch negatives come from the *sorted* set of the batch's
    positives. The trainer (``train.GlobalCandidates``) makes it the global
    batch's: each process contributes its examples' positive ids
    (`positive_ids`, int32 [B_local, M * T + C], a few KB) to one host
    all-gather per step and calls `Candidates.build` on its share with the
    gathered ids. The pipeline's own `Candidates` map
    (`pipeline.make_train_dataset` with ``with_candidates=True``, the default
    for tools; `make_eval_dataset` with ``with_candidates``) takes the pool
    from the process's batch: the global batch when there is one process.
There is no sampler state: a resumed run rebuilds the same batches, hence the
same candidates.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
import threading
from typing import Any
import zlib

import grain
import numpy as np

from omnitrain_jax.data import schema

_DET = schema.STREAM_IDS["det"]
# Batch key of the pipeline's side channel for counts (see stats.py).
REPORT = "_report"
# Batch key of the example identities the draws are keyed by (int64 [B, 2]).
KEY = "_key"


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


def _rejection_draw(draw: Callable[[int], list[int]], need: int,
                    exclude: set[int],
                    accept: Callable[[int], bool] | None = None) -> list[int]:
  """Up to `need` distinct ids from `draw(n)` (n ids per round, 4 rounds).

  Ids in `exclude`, repeated ones and ones `accept` refuses are skipped; it
  returns as soon as `need` are found (fewer if the 4 rounds run out: the
  caller completes the draw exactly). The random numbers used are those of
  the rounds drawn, `2 * need + 8` ids each.
  """
  taken = set(exclude)
  got: list[int] = []
  for _ in range(4):
    for t in draw(2 * need + 8):
      if t not in taken and (accept is None or accept(t)):
        taken.add(t)
        got.append(t)
        if len(got) == need:
          return got
  return got


def example_key(split: str, stream: str, source: str, index: int
                ) -> np.ndarray:
  """The identity an example's candidate draws are keyed by: int64 [2].

  Args:
    split: ``"train"`` or ``"eval"`` (the two never share draws).
    stream: the example's stream.
    source: the source's name in ``data.sources``.
    index: train: the position in the source's shuffled, repeated sequence
      before the process shard; eval: the record's index in the file.
  """
  tag = zlib.crc32(f"{split}/{stream}/{source}".encode())
  return np.array([tag, index], np.int64)


def positive_ids(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """int32 [B, M * T + C]: each example's positive ids, 0 where padded.

  The real boxes' tokens (box by box), then the caption tokens: what the pool
  of batch negatives is made of, and what the trainer all-gathers.
  """
  box = np.where(batch["box_mask"][..., None], batch["box_tokens"], 0)
  return np.concatenate([box.reshape(box.shape[0], -1),
                         batch["caption_tokens"]], axis=1).astype(np.int32)


def batch_pool(ids: np.ndarray, vocab_size: int | None = None) -> np.ndarray:
  """The sorted unique ids above the reserved ones, of an array of any shape.

  Args:
    ids: token ids (mostly padding, e.g. gathered `positive_ids`).
    vocab_size: V, when known: a [V] bitmap replaces the sort when the ids
      are many for V (a pod's gathered ids: about 2x faster).
  """
  ids = np.asarray(ids).ravel()
  ids = ids[ids > schema.UNK_ID]
  if vocab_size is not None and 16 * ids.size > vocab_size:
    seen = np.zeros(vocab_size, bool)
    seen[ids] = True
    return np.flatnonzero(seen)
  ids = np.sort(ids)
  return ids[np.concatenate([[True], ids[1:] != ids[:-1]])] if ids.size \
      else ids


class Candidates(grain.transforms.Map):
  """Adds ``candidates``, ``cand_known``, ``cand_bg`` (all [B, Q]) to a batch.

  As a grain map it takes the pool of batch negatives from the batch itself;
  `build` takes the (global) pool from the caller. Either way it consumes the
  batch's example keys (``_key``, see the module docstring).

  Args:
    num_candidates: Q.
    probs: float64 [V] vocabulary-negative probabilities (`sampling_probs`).
    seed: the draws' seed (``data.seed``).
    min_vocab_negatives: slots kept for vocabulary negatives (when the
      example's positives and known negatives leave room).
    det_batch_negatives_known: count batch/vocabulary negatives as known
      negatives of det examples (see the module docstring; default False).
    overflow: ``"count"`` or ``"error"`` for positives beyond Q.
    stats: optional `CandidateStats` updated with the drop counts.
  """

  def __init__(self, num_candidates: int, probs: np.ndarray, *,
               seed: int = 0, min_vocab_negatives: int = 0,
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
    self.drawable = self.probs > 0  # [V]
    self.num_drawable = int(self.drawable.sum())
    self.seed = int(seed)
    self.min_vocab_negatives = min_vocab_negatives
    self.det_batch_negatives_known = det_batch_negatives_known
    self.overflow = overflow
    self.stats = stats
    self._tag_keys: dict[int, int] = {}  # crc32 tag -> Philox key word.
    self._local = threading.local()  # A reusable generator per thread.

  def __getstate__(self):
    state = dict(self.__dict__)
    state["stats"] = None  # A lock does not pickle; counts stay per process.
    state["_local"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()

  def _rng(self, key: np.ndarray) -> np.random.Generator:
    """The example's own generator: Philox keyed by (seed, tag) and index.

    One Philox per thread, its key and counter reset per example: 5x
    cheaper than a new generator (~7 vs ~40 us), the same stream.
    """
    tag, index = int(key[0]), int(key[1])
    word = self._tag_keys.get(tag)
    if word is None:
      word = int(np.random.SeedSequence([self.seed, tag]).generate_state(
          1, np.uint64)[0])
      self._tag_keys[tag] = word
    local = self._local
    if not hasattr(local, "rng"):
      local.bits = np.random.Philox(0)
      local.rng = np.random.Generator(local.bits)
    zeros = np.zeros(4, np.uint64)
    local.bits.state = {
        "bit_generator": "Philox",
        "state": {"counter": zeros,
                  "key": np.array([index & 0xFFFF_FFFF_FFFF_FFFF, word],
                                  np.uint64)},
        "buffer": zeros, "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
    return local.rng

  def _batch_negatives(self, rng: np.random.Generator, pool: list[int],
                       pool_set: set[int], need: int,
                       exclude: set[int]) -> list[int]:
    """Up to `need` distinct ids of `pool` not in `exclude`, uniformly."""
    avail = len(pool) - len(pool_set & exclude)
    need = min(need, avail)
    if need <= 0:
      return []
    got: list[int] = []
    if 4 * need < avail:
      # Rejection: O(need), independent of the pool's size (a global batch
      # of a pod holds thousands of distinct positives).
      got = _rejection_draw(
          lambda n: [pool[i] for i in rng.integers(len(pool), size=n).tolist()],
          need, exclude)
      if len(got) == need:
        return got
    # Most of what is left is wanted: a permutation of the rest.
    rest = exclude.union(got)
    other = [t for t in pool if t not in rest]
    order = rng.permutation(len(other))[:need - len(got)]
    return got + [other[i] for i in order.tolist()]

  def _vocab_negatives(self, rng: np.random.Generator, need: int,
                       exclude: set[int]) -> list[int]:
    """Up to `need` distinct ids drawn by `probs`, none in `exclude`."""
    probs = self.probs
    avail = self.num_drawable - int(
        self.drawable[np.fromiter(exclude, np.int64, len(exclude))].sum())
    need = min(need, avail)
    if need <= 0:
      return []
    got: list[int] = []
    if 4 * need < avail:
      # Rejection sampling by inverse CDF: O(need log V), independent of V,
      # while few of the drawable ids are wanted (the normal case).
      got = _rejection_draw(
          lambda n: np.searchsorted(self.cdf, rng.random(n),
                                    side="right").tolist(),
          need, exclude, accept=lambda t: probs[t] > 0)
      if len(got) == need:
        return got
    # Most of what is left is wanted (small vocabularies): exact weighted
    # sampling without replacement (Gumbel top-k) over the rest, O(V).
    p = probs.copy()
    p[list(exclude.union(got))] = 0
    left = np.flatnonzero(p > 0)
    keys = np.log(p[left]) + rng.gumbel(size=left.size)
    return got + left[np.argsort(-keys)][:need - len(got)].tolist()

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return self.build(batch)

  def build(self, batch: Mapping[str, np.ndarray],
            pool: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The batch with its candidate fields, without its example keys.

    Args:
      batch: a batch (`schema.example_shapes` stacked) with ``_key``, int64
        [B, 2] (`example_key`).
      pool: token ids of any shape whose distinct non-reserved values are
        the batch negatives' pool, e.g. the all-gathered `positive_ids` of
        the global batch; default: this batch's positives.

    Returns:
      A new dict: `batch` minus ``_key``, plus ``candidates``,
      ``cand_known``, ``cand_bg`` ([B, Q]).
    """
    if KEY not in batch:
      raise ValueError(
          f"The batch has no example keys ({KEY!r}), which the candidate "
          "draws are keyed by: build it with pipeline.make_train_dataset / "
          "make_eval_dataset, or add candidates.example_key(...) per "
          "example.")
    q = self.num_candidates
    keys = np.asarray(batch[KEY])  # [B, 2]
    ids = positive_ids(batch)  # [B, M * T + C]
    b_size = ids.shape[0]
    streams = batch["stream"]  # [B]
    pool_list = batch_pool(ids if pool is None else pool,
                           len(self.probs)).tolist()
    pool_set = set(pool_list)
    # Per-example work on Python lists and sets: Q is small (tens to a few
    # hundred), where np.isin/np.unique cost more than they save.
    cands = np.zeros((b_size, q), np.int32)
    known = np.zeros((b_size, q), bool)
    bg = np.zeros((b_size, q), bool)
    dropped = collections.Counter()
    for b in range(b_size):
      pos = _unique_list(ids[b].tolist())
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
      rng = self._rng(keys[b])
      other = self._batch_negatives(rng, pool_list, pool_set, batch_room,
                                    used)
      row += other
      used.update(other)
      row += self._vocab_negatives(rng, q - len(row), used)
      cands[b, :len(row)] = row
      is_det = streams[b] == _DET
      n_listed = len(pos) + len(neg)
      known[b, :n_listed] = True
      if is_det:
        no_bg = set(batch["no_bg_tokens"][b].tolist())
        no_bg.discard(schema.PAD_ID)
        if self.det_batch_negatives_known:  # Sampled ones, unless unknown.
          known[b, n_listed:len(row)] = [t not in no_bg
                                         for t in row[n_listed:]]
        bg[b, :len(row)] = known[b, :len(row)] & np.array(
            [t not in no_bg for t in row], bool)
    if self.stats is not None:
      self.stats.add(dropped)
    out = {k: v for k, v in batch.items() if k != KEY}
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
      config.spec.num_candidates, probs, seed=config.seed,
      min_vocab_negatives=config.candidates.min_vocab_negatives,
      det_batch_negatives_known=config.candidates.det_batch_negatives_known,
      overflow=config.candidates.overflow, stats=stats)
