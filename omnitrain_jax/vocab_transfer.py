"""Token rows from one vocabulary to another, matched by token string.

A trained run's token table (``params["token_embedding"]``, ``[V, D]``) is
indexed by the ids of *its* vocabulary. A fine-tuning run with more class
names (``config.init_from``), or an evaluation / prediction given another
vocabulary file (``--vocab``), needs the table in the ids of the *new*
vocabulary. `transfer_table` builds it, row by row:

* **Shared tokens** (same string in both vocabularies, the reserved
  ``<pad>``/``<unk>`` included) keep their trained row, bit for bit.
* **New tokens** start from their word pieces. The new token's string is
  tokenized with the *source* vocabulary (`vocab.tokenizer`, greedy longest
  match: ``fire truck`` -> ``fire``, ``truck``; stop words drop out). Each
  known piece contributes its normalised trained row, each unknown word the
  mean direction ``m`` (the normalised mean of the normalised trained rows);
  the row is the normalised mean of these contributions. So a phrase of known
  words (``red square``) starts as the average of its words, a new word
  (``lemon``) starts at ``m`` (the direction every trained concept shares:
  "some object"), and a phrase mixing both (``red lemon``) lies between. The
  model only uses a row's direction (`OmniDet.token_embeddings` normalises),
  but the optimizer sees its length, so every new row is scaled to the
  median norm of the trained rows (the same step size as its neighbours).
  New rows of tokens with the same pieces are equal; training separates them
  (different positives).
* **Dropped tokens** (in the source, not in the target) are reported.

"Trained rows" are the source's concept rows (ids >= 2) with a count > 0 in
the source vocabulary (the annotations it was built from mentioned them);
all concept rows when no count is positive (a hand-written file).

Only numpy and the vocabulary package: the table is mapped on the host
(`checkpointing` restores the source table, calls `transfer_table`, and
places the result on the target's sharding).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os

import numpy as np

from omnitrain_jax.vocab import tokenizer as tokenizer_lib
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

# The copy of its vocabulary a training run keeps in its workdir (train.py
# writes it at every start), so later runs can map its token rows.
VOCAB_FILE = "vocab.txt"
# How many example tokens a report's log line names per list.
NUM_EXAMPLES = 5


def workdir_vocab_path(workdir: str | os.PathLike[str]) -> str:
  """``WORKDIR/vocab.txt``: the vocabulary a run trained with."""
  return os.path.join(os.fspath(workdir), VOCAB_FILE)


@dataclasses.dataclass(frozen=True)
class TransferReport:
  """What `transfer_table` did (reserved tokens are in no list).

  Attributes:
    source_size: V of the source vocabulary (reserved included).
    target_size: V of the target vocabulary.
    kept: number of shared concept tokens (rows copied).
    added: the target's new tokens, in target id order.
    from_pieces: the subset of `added` whose row comes from at least one
      known word piece (the others start at the mean direction).
    dropped: the source's tokens missing from the target, in source id order.
    same_ids: every token has the same id in both (the table is unchanged).
  """
  source_size: int
  target_size: int
  kept: int
  added: tuple[str, ...]
  from_pieces: tuple[str, ...]
  dropped: tuple[str, ...]
  same_ids: bool = False

  def summary(self, num_examples: int = NUM_EXAMPLES) -> str:
    """One log line: counts and the first few tokens of each list."""

    def some(tokens: Sequence[str]) -> str:
      if not tokens:
        return ""
      more = (f", ... {len(tokens) - num_examples} more"
              if len(tokens) > num_examples else "")
      return " (" + ", ".join(repr(t) for t in tokens[:num_examples]) + \
          more + ")"

    return (f"token rows {self.source_size} -> {self.target_size}: "
            f"{self.kept} kept, {len(self.added)} new{some(self.added)} of "
            f"which {len(self.from_pieces)} from their word pieces"
            f"{some(self.from_pieces)}, {len(self.dropped)} dropped"
            f"{some(self.dropped)}")

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _normalize(x: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norm, 1e-12)


def trained_ids(vocab: vocabulary_lib.Vocabulary) -> np.ndarray:
  """The source ids whose rows count as trained (module doc)."""
  ids = np.arange(vocab.num_reserved, len(vocab))
  counted = ids[vocab.counts[vocab.num_reserved:] > 0]
  return counted if counted.size else ids


def word_pieces(token: str, source: tokenizer_lib.Tokenizer
                ) -> tuple[list[int], int]:
  """(source ids of the known pieces, number of unknown words) of a token."""
  ids, _, _, unknown = source.tokenize(token)
  ids = [i for i in ids if i >= vocabulary_lib.NUM_RESERVED]
  return ids, len(unknown)


def transfer_table(source_table: np.ndarray,
                   source_vocab: vocabulary_lib.Vocabulary,
                   target_vocab: vocabulary_lib.Vocabulary
                   ) -> tuple[np.ndarray, TransferReport]:
  """The token table of `target_vocab`, from a table of `source_vocab`.

  Args:
    source_table: float ``[len(source_vocab), D]``, the trained rows.
    source_vocab: the vocabulary the table was trained with.
    target_vocab: the vocabulary of the new table.

  Returns:
    (float ``[len(target_vocab), D]`` of the source's dtype, the report).

  Raises:
    ValueError: the table's rows do not match the source vocabulary.
  """
  source_table = np.asarray(source_table)
  if source_table.ndim != 2 or source_table.shape[0] != len(source_vocab):
    raise ValueError(
        f"The token table has shape {source_table.shape} but the source "
        f"vocabulary has {len(source_vocab)} tokens: the vocabulary file is "
        "not the one this table was trained with (it should be the run's "
        f"{VOCAB_FILE}).")
  reserved = vocabulary_lib.NUM_RESERVED
  dim = source_table.shape[1]
  source_index = source_vocab.index
  target_tokens = target_vocab.tokens
  # Target id -> source id (-1: new). Reserved tokens are always shared.
  source_ids = np.fromiter((source_index.get(t, -1) for t in target_tokens),
                           np.int64, len(target_tokens))
  new = np.nonzero(source_ids < 0)[0]
  table = np.empty((len(target_vocab), dim), source_table.dtype)
  shared = source_ids >= 0
  table[shared] = source_table[source_ids[shared]]
  from_pieces = []
  if new.size:
    trained = source_table[trained_ids(source_vocab)].astype(np.float64)
    if trained.size:
      unit = _normalize(trained)
      mean = _normalize(unit.mean(0))
      norm = float(np.median(np.linalg.norm(trained, axis=-1)))
    else:  # A source without concepts: nothing to learn from.
      mean, norm = np.zeros(dim), 0.0
    tokenizer = tokenizer_lib.Tokenizer(source_vocab)
    for i in new:
      pieces, num_unknown = word_pieces(target_tokens[i], tokenizer)
      if pieces:
        rows = _normalize(source_table[pieces].astype(np.float64))
        row = _normalize(rows.sum(0) + num_unknown * mean)
        from_pieces.append(target_tokens[i])
      else:
        row = mean
      table[i] = (row * norm).astype(source_table.dtype)
  in_target = target_vocab.index
  dropped = tuple(t for t in source_vocab.tokens[reserved:]
                  if t not in in_target)
  same_ids = (len(source_vocab) == len(target_vocab) and
              bool(np.array_equal(source_ids, np.arange(len(source_vocab)))))
  report = TransferReport(
      source_size=len(source_vocab), target_size=len(target_vocab),
      kept=int(shared.sum()) - reserved,
      added=tuple(target_tokens[i] for i in new),
      from_pieces=tuple(from_pieces), dropped=dropped, same_ids=same_ids)
  return table, report
