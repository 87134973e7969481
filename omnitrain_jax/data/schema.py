"""The data contract shared by readers, transforms, the model and the loss.

Two levels:

1. **Records** (what every reader yields; Python dicts, unpadded, original pixels).
   All readers -- COCO, LVIS, RefCOCOg, MDETR grounding, captions, TFDS -- produce
   this one schema so that the transforms never branch on the source format.

   ===================  =========================  ==================================
   key                  type                        meaning
   ===================  =========================  ==================================
   ``stream``           str                         ``"det"``, ``"grd"`` or ``"img"``
   ``source``           str                         dataset name (for messages/eval)
   ``image_id``         int                         id in the source annotation file
   ``image_path``       str | None                  absolute path of the image file
                                                    (None for TFDS records)
   ``image_bytes``      bytes | None                encoded image (TFDS), else None
   ``width``/``height`` int                         original image size in pixels
                                                    (0 = unknown, e.g. JSONL/CSV
                                                    captions: filled at decode)
   ``boxes``            float32 [n, 4]              ``x0, y0, x1, y1`` original pixels
   ``box_texts``        list[str] (n)               det: category name; grd: the text
                                                    of the box's ``tokens_positive``
                                                    spans joined by a space
   ``category_ids``     int32 [n]                   det: category id; grd: -1
   ``phrase_ids``       int32 [n]                   grd: index of the phrase a box
                                                    belongs to (boxes of one phrase
                                                    share tokens); det: 0..n-1
   ``box_spans``        list[list[[s, e]]] (n)      per box, [start, end) character
                                                    spans into ``caption`` (MDETR
                                                    ``tokens_positive``; RefCOCO:
                                                    the whole sentence; det: [])
   ``caption``          str                         grd: the whole expression /
                                                    sentence; img: the caption;
                                                    det: ""
   ``neg_texts``        list[str]                   names known to be absent from the
                                                    image (COCO: every other category;
                                                    LVIS: ``neg_category_ids``)
   ``not_exhaustive_texts``  list[str]              LVIS ``not_exhaustive_category_ids``:
                                                    present but not all boxed, so an
                                                    unmatched prediction is not a
                                                    negative for them
   ===================  =========================  ==================================

2. **Examples** (after the per-stream transforms; numpy, static shapes, one per
   image; a batch stacks them on a leading axis B). Sizes come from `Spec`.

   ===================  ==================  ==========================================
   key                  dtype [shape]        meaning
   ===================  ==================  ==========================================
   ``image``            uint8 [S, S, 3]      resized, padded bottom/right with 0;
                                             normalised on the device, not the host
   ``stream``           int32 []             `STREAM_IDS` (det 0, grd 1, img 2)
   ``image_id``         int32 []             source image id (-1 for padding)
   ``orig_size``        int32 [2]            original (height, width)
   ``scale``            float32 []           original pixels -> canvas pixels factor
                                             (eval maps boxes back with it)
   ``boxes``            float32 [M, 4]       ``cx, cy, w, h`` in [0, 1] of the S x S
                                             canvas (DETR/OWL-ViT convention)
   ``box_mask``         bool [M]             real boxes first, padding after
   ``box_tokens``       int32 [M, T]         the box's positive token ids, 0 = pad
   ``phrase_ids``       int32 [M]            see records; -1 for padding
   ``caption_tokens``   int32 [C]            tokens of ``caption`` (img, grd), 0 = pad
   ``phrase_tokens``    int32 [P, L]         img: the caption's phrases
                                             (`vocab.phrases.chunk`), each its
                                             tokens, 0 = pad; det/grd: all 0
   ``phrase_counts``    int32 [P]            img: objects each phrase names
                                             ("two red circles": 2); 0 = pad
   ``neg_tokens``       int32 [K]            known-negative token ids, 0 = pad
   ``no_bg_tokens``     int32 [K]            tokens an *unmatched* prediction must
                                             not be pushed down on (LVIS not
                                             exhaustive), 0 = pad
   ===================  ==================  ==========================================

   Batch-level fields added after batching by `candidates.py` (they need the whole
   batch, to sample negatives from other examples):

   ===================  ==================  ==========================================
   ``candidates``       int32 [Q]            token ids scored for this example:
                                             positives, known negatives, then batch /
                                             vocabulary negatives; 0 = pad
   ``cand_known``       bool [Q]             the token's label is known for a *matched*
                                             det box (positive if in its box_tokens,
                                             otherwise negative)
   ``cand_bg``          bool [Q]             known negative for an *unmatched* det
                                             prediction
   ===================  ==================  ==========================================

   The model never sees a [B, N, V] tensor: it gathers the Q candidate rows of the
   token table and produces logits [B, N, Q]. Targets in candidate space are
   derived in-graph by comparing ``box_tokens`` with ``candidates``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from omnitrain_jax.vocab import vocabulary

STREAMS = ("det", "grd", "img")
STREAM_IDS = {name: i for i, name in enumerate(STREAMS)}

# Reserved vocabulary ids: the vocabulary owns them; the examples' token
# arrays are padded with PAD_ID.
PAD_ID = vocabulary.PAD_ID
UNK_ID = vocabulary.UNK_ID


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static maxima that fix every example's shapes (jit needs static shapes).

  Attributes:
    image_size: S, the square canvas side in pixels.
    max_boxes: M, boxes per example (extra boxes are dropped, counted).
    max_box_tokens: T, tokens per box.
    max_caption_tokens: C, tokens per caption.
    max_neg_tokens: K, known negative tokens per example.
    num_candidates: Q, candidate tokens per example.
    max_phrases: P, caption phrases per img example (extra ones dropped,
      counted).
    max_phrase_tokens: L, tokens per caption phrase.
  """
  image_size: int = 128
  max_boxes: int = 16
  max_box_tokens: int = 4
  max_caption_tokens: int = 16
  max_neg_tokens: int = 32
  num_candidates: int = 64
  max_phrases: int = 8
  max_phrase_tokens: int = 4


def example_shapes(spec: Spec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shapes and dtypes of one transformed example (without the batch axis)."""
  s, m = spec.image_size, spec.max_boxes
  return {
      "image": ((s, s, 3), np.uint8),
      "stream": ((), np.int32),
      "image_id": ((), np.int32),
      "orig_size": ((2,), np.int32),
      "scale": ((), np.float32),
      "boxes": ((m, 4), np.float32),
      "box_mask": ((m,), np.bool_),
      "box_tokens": ((m, spec.max_box_tokens), np.int32),
      "phrase_ids": ((m,), np.int32),
      "caption_tokens": ((spec.max_caption_tokens,), np.int32),
      "phrase_tokens": ((spec.max_phrases, spec.max_phrase_tokens), np.int32),
      "phrase_counts": ((spec.max_phrases,), np.int32),
      "neg_tokens": ((spec.max_neg_tokens,), np.int32),
      "no_bg_tokens": ((spec.max_neg_tokens,), np.int32),
  }


def batch_shapes(spec: Spec, batch_size: int):
  """Shapes and dtypes of a batch, candidate fields included."""
  out = {k: ((batch_size,) + shp, dt) for k, (shp, dt) in example_shapes(spec).items()}
  q = spec.num_candidates
  out["candidates"] = ((batch_size, q), np.int32)
  out["cand_known"] = ((batch_size, q), np.bool_)
  out["cand_bg"] = ((batch_size, q), np.bool_)
  return out


def empty_example(spec: Spec, stream: str) -> dict[str, np.ndarray]:
  """An all-padding example of `stream` (used for padding and tests)."""
  ex = {k: np.zeros(shp, dt) for k, (shp, dt) in example_shapes(spec).items()}
  ex["stream"] = np.int32(STREAM_IDS[stream])
  ex["image_id"] = np.int32(-1)
  ex["phrase_ids"][:] = -1
  ex["scale"] = np.float32(1.0)
  return ex
