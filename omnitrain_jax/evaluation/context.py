"""What every task evaluator receives: the model's functions, not a trainer.

`EvalContext` carries the model (for `encode`, `token_embeddings`, its image
size and number of patches), a ``jit`` that compiles a function of
``(params, batch, consts)`` with the batch sharded over the mesh's ``data``
axis, the run's tokenizer and the options. The task evaluators
(`det_evaluator`, `grd_evaluator`) build their jitted functions from it; the
run loop (`evaluator.Evaluator`) feeds them batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from etils import epath
import jax
import numpy as np

from omnitrain_jax.evaluation import detections as detections_lib
from omnitrain_jax.evaluation import options as options_lib
from omnitrain_jax.models import omnidet
from omnitrain_jax.vocab import tokenizer as tokenizer_lib

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
