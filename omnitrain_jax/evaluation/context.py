"""What every task evaluator receives: the model's functions, not a trainer.

`EvalContext` carries the model (for `encode`, `token_embeddings`, its image
size and number of patches), a ``jit`` that compiles a function of
``(params, batch, consts)`` with the batch sharded over the mesh's ``data``
axis, the run's tokenizer and the options. The task evaluators
(`det_evaluator`, `grd_evaluator`) build their jitted functions from it; the
run loop (`evaluator.Evaluator`) feeds them batches.

`resolve_vocab` is where evaluation and prediction find their vocabulary.
When it is not the one the checkpoint trained with (``WORKDIR/vocab.txt``),
`checkpointing.restore_params(..., vocab=...)` matches the token rows by
token string (`vocab_transfer`: new tokens start from their word pieces).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np

from omnitrain_jax import vocab_transfer
from omnitrain_jax.data import preparation
from omnitrain_jax.evaluation import detections as detections_lib
from omnitrain_jax.evaluation import options as options_lib
from omnitrain_jax.models import omnidet
from omnitrain_jax.vocab import tokenizer as tokenizer_lib
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

# Fields of the example batches the device needs (the rest are labels).
FEED_KEYS = ("image", "image_id", "orig_size", "scale")


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """The model side of an evaluation.

  Attributes:
    model: the `OmniDet`.
    jit: ``fn(params, batch, consts) -> outputs`` -> its jitted version, the
      batch and outputs sharded over ``data``, params on their shardings.
    tokenizer: the run's tokenizer (queries).
    options: ``config.eval``.
  """
  model: omnidet.OmniDet
  jit: Callable[[Callable[..., Any]], Callable[..., Any]]
  tokenizer: tokenizer_lib.Tokenizer
  options: options_lib.EvalOptions

  def encode(self, params, images) -> dict[str, jax.Array]:
    return self.model.apply({"params": params}, images, train=False,
                            method=omnidet.OmniDet.encode)

  def embed_fn(self, params) -> Callable[[jax.Array], jax.Array]:
    """ids -> normalised token rows, for `inference`'s ``embed_tokens``."""
    return lambda ids: self.model.apply(
        {"params": params}, ids, method=omnidet.OmniDet.token_embeddings)

  def canvas_boxes(self, out: dict[str, np.ndarray], boxes: np.ndarray
                   ) -> np.ndarray:
    """Predicted canvas cxcywh -> xyxy pixels of the original images."""
    return detections_lib.canvas_to_original_xyxy(
        boxes, self.model.image_size, out["scale"], out["orig_size"])


def resolve_vocab(workdir: str, config: Any, vocab: str | None = None,
                  default: str | None = None) -> str:
  """The vocabulary file of an evaluation or prediction of a run.

  In order: `vocab` (``--vocab``: e.g. a vocabulary with new class names),
  the run's own ``WORKDIR/vocab.txt`` (the one its checkpoints trained
  with), ``config.data.vocab.path``, `default`, else the one
  `preparation.prepare_data` builds from the config's training annotations
  (cached; this needs the training data or its cache).

  Args:
    workdir: the training run's directory.
    config: the config (``data.vocab.path``, ``data``).
    vocab: an explicit vocabulary file, or None.
    default: the file to use before building one (e.g. the `DataInfo`'s).

  Returns:
    The path of the vocabulary file.

  Raises:
    FileNotFoundError: `vocab` does not exist.
  """
  if vocab and not epath.Path(vocab).exists():
    raise FileNotFoundError(f"--vocab={vocab} does not exist.")
  candidates = [vocab, vocab_transfer.workdir_vocab_path(workdir),
                config.data.vocab.get("path") or None, default]
  for path in candidates:
    if path and epath.Path(path).exists():
      return str(path)
  logging.info("No %s in %s and no data.vocab.path: building the vocabulary "
               "from the config's data (cached).", vocab_transfer.VOCAB_FILE,
               workdir)
  return preparation.prepare_data(config.data).vocab_path


def with_run_vocab(info: preparation.DataInfo, workdir: str, config: Any,
                   vocab: str | None = None) -> preparation.DataInfo:
  """`info` with the vocabulary `resolve_vocab` picks for an evaluation.

  The evaluation binary prepares the config's data (`info`) and then scores
  with the run's own vocabulary (or ``--vocab``), not one rebuilt from
  today's files: build the model with ``len(result.vocab)`` and restore
  with ``checkpointing.restore_params(..., vocab=result.vocab)``.

  Args:
    info: from `preparation.prepare_data(config.data)`.
    workdir: the training run's directory.
    config: the config.
    vocab: ``--vocab``, or None.

  Returns:
    `info` itself when the vocabulary is the same, else a copy with the
    vocabulary, its path and its tokenizer replaced.
  """
  path = resolve_vocab(workdir, config, vocab, default=info.vocab_path)
  if path == info.vocab_path:
    return info
  vocabulary = vocabulary_lib.Vocabulary.load(path)
  if vocabulary.tokens == info.vocab.tokens:
    return info
  logging.info("Vocabulary: %s (%d tokens; the config's data gives %s, %d "
               "tokens).", path, len(vocabulary), info.vocab_path,
               len(info.vocab))
  return dataclasses.replace(info, vocab_path=path, vocab=vocabulary,
                             tokenizer=tokenizer_lib.Tokenizer(vocabulary))


def passthrough(batch) -> dict[str, Any]:
  """The feed fields that come back with the outputs (ids, sizes)."""
  return {key: batch[key] for key in FEED_KEYS if key != "image"}


def write_json(path: epath.Path, obj: Any) -> None:
  """Writes JSON atomically (a reader never sees half a file)."""
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(obj, separators=(",", ":")))
  tmp.replace(path)  # Overwrites (a second evaluation of the same step).


def rounded(x, decimals: int = detections_lib.BOX_DECIMALS) -> list:
  # float64 first: a rounded float32 prints as 32.0099983215332.
  return np.round(np.asarray(x, np.float64), decimals).tolist()
