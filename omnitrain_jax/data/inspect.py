r"""Looks at what the input pipeline produces: JSON stats per batch, a PNG grid.

    python -m omnitrain_jax.data.inspect --config=configs/shapes_demo.py:tiny \
        --num_batches=3 --png=/tmp/batch.png

Prints one JSON line per batch::

  {"batch": 0, "streams": {"det": 4, "grd": 2, "img": 2}, "boxes": 21,
   "boxes_per_stream": {...}, "tokens_per_box": 2.1, "caption_tokens": ...,
   "neg_tokens": ..., "candidates_used": ..., "cand_known": ..., "cand_bg": ...,
   "skipped": 0, "skip_visits": 0, "dropped": {...}}

and, with ``--png``, draws the first batch's examples (augmented, as the model
sees them) with their boxes and tokens decoded to words through the
vocabulary. ``--split=val`` inspects the evaluation pipeline of ``--stream``
instead. Config overrides work as everywhere (``--config.data.strict=False``).
``skipped`` counts distinct bad records so far, ``skip_visits`` every time
one was met (once per epoch of its source). Bad data in strict mode, and a
source with no readable record in lenient mode, end it with one ``Error:``
line (exit code 1).
"""

from __future__ import annotations

import json
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image
from PIL import ImageDraw

from omnitrain_jax.data import errors
from omnitrain_jax.data import pipeline
from omnitrain_jax.data import preparation
from omnitrain_jax.data import schema
from omnitrain_jax.data import stats as stats_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 3, "Batches to inspect.")
_PNG = flags.DEFINE_string("png", None, "Write a grid of the first batch here.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "val"],
                           "Training or evaluation pipeline.")
_STREAM = flags.DEFINE_enum("stream", "det", list(schema.STREAMS),
                            "Stream of the eval pipeline (--split=val).")
_TILE = flags.DEFINE_integer("tile", 256, "Tile side in the PNG, pixels.")

_COLORS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0),
           (200, 64, 255), (0, 220, 220), (255, 128, 0), (255, 255, 255)]


def batch_stats(batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """Summary numbers of one batch (JSON-serializable)."""
  streams = batch["stream"]
  mask = batch["box_mask"]
  real = batch["image_id"] >= 0
  out = {
      "streams": {s: int(((streams == i) & real).sum())
                  for i, s in enumerate(schema.STREAMS)},
      "boxes": int(mask.sum()),
      "boxes_per_stream": {s: int(mask[streams == i].sum())
                           for i, s in enumerate(schema.STREAMS)},
      "padding_examples": int((~real).sum()),
  }
  n_tok = (batch["box_tokens"] > 0).sum(-1)[mask]
  out["tokens_per_box"] = round(float(n_tok.mean()), 3) if n_tok.size else 0.0
  for key in ("caption_tokens", "neg_tokens", "no_bg_tokens"):
    out[key] = round(float((batch[key] > 0).sum(-1).mean()), 3)
  if "candidates" in batch:
    out["candidates_used"] = round(float((batch["candidates"] > 0).sum(-1)
                                         .mean()), 3)
    out["cand_known"] = round(float(batch["cand_known"].sum(-1).mean()), 3)
    out["cand_bg"] = round(float(batch["cand_bg"].sum(-1).mean()), 3)
  return out


def _words(vocab, ids) -> str:
  return " ".join(vocab.token(int(t)) for t in ids if t > 0)


def draw_grid(batch: dict[str, np.ndarray], vocab, *, tile: int = 256,
              columns: int = 4) -> Image.Image:
  """The batch's images with boxes and tokens, as one RGB image."""
  b = batch["image"].shape[0]
  rows = -(-b // columns)
  grid = Image.new("RGB", (columns * tile, rows * (tile + 28)), (32, 32, 32))
  for i in range(b):
    im = Image.fromarray(batch["image"][i]).resize((tile, tile),
                                                   Image.NEAREST)
    draw = ImageDraw.Draw(im)
    for j in np.flatnonzero(batch["box_mask"][i]):
      cx, cy, w, h = batch["boxes"][i, j] * tile
      color = _COLORS[int(batch["phrase_ids"][i, j]) % len(_COLORS)]
      draw.rectangle([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                     outline=color, width=2)
      draw.text((cx - w / 2 + 2, cy - h / 2 + 1),
                _words(vocab, batch["box_tokens"][i, j]), fill=color)
    x, y = (i % columns) * tile, (i // columns) * (tile + 28)
    grid.paste(im, (x, y))
    label = (f"{schema.STREAMS[int(batch['stream'][i])]} "
             f"#{int(batch['image_id'][i])}: "
             f"{_words(vocab, batch['caption_tokens'][i])}")
    ImageDraw.Draw(grid).text((x + 2, y + tile + 2), label[:60],
                              fill=(230, 230, 230))
  return grid


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Bad data is one line (DataError names the file and record), with
  # --config.data.strict=False as the way to skip it; --verbosity=1 shows the
  # traceback.
  with errors.exit_on_user_errors(
      (errors.DataError, FileNotFoundError, ValueError),
      lenient="--config.data.strict=False"):
    _inspect(_CONFIG.value.data)


def _inspect(data) -> None:
  stats = stats_lib.PipelineStats()
  info = preparation.prepare_data(data, skips=stats.skips)
  if _SPLIT.value == "train":
    ds = pipeline.make_train_dataset(data, info, process_index=0,
                                     process_count=1, stats=stats)
  else:
    ds = pipeline.make_eval_dataset(data, info, stream=_STREAM.value,
                                    process_index=0, process_count=1,
                                    stats=stats)
  it = iter(ds)
  for i in range(_NUM_BATCHES.value):
    try:
      batch = next(it)
    except StopIteration:
      break
    line = {"batch": i, **batch_stats(batch),
            "skipped": stats.skips.total(),
            "skip_visits": stats.skips.total_visits(),
            "dropped": {k: v for k, v in stats.counts().items()
                        if not k.startswith(("skipped/", "skip_visits/"))}}
    print(json.dumps(line), flush=True)
    if i == 0 and _PNG.value:
      draw_grid(batch, info.vocab, tile=_TILE.value).save(_PNG.value)
  if hasattr(it, "close"):
    it.close()


if __name__ == "__main__":
  app.run(main)
