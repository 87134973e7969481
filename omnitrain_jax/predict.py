r"""Prediction: images + text (or image) queries -> boxes as JSON and PNG.

    python -m omnitrain_jax.predict --workdir=runs/demo --image=photo.jpg \
        --queries="red circle,blue star" [--out=DIR] [--threshold=0.1]
    python -m omnitrain_jax.predict --workdir=runs/demo --image=photos/ \
        --query_image=example.jpg --query_box=40,30,80,60
    python -m omnitrain_jax.predict --workdir=runs/demo --image=a.png \
        --queries="star" --describe=5     # + the 5 best tokens of each box
    python -m omnitrain_jax.predict --workdir=runs/demo --image=val2017/ \
        --categories_from=instances_val2017.json --batch_size=16

Model and vocabulary. The params of the latest finished checkpoint (or
``--checkpoint_step``) are restored onto the config's mesh; the config is
``--config`` or else the run's own ``WORKDIR/config.json``. The vocabulary
is, in order: ``--vocab``, ``WORKDIR/vocab.txt``, ``config.data.vocab.path``,
and else the one `preparation.prepare_data` builds from the config's training
annotations (cached; this needs the training data or its cache). A
vocabulary other than the run's ``WORKDIR/vocab.txt`` (``--vocab`` with new
class names) is matched to the checkpoint's token rows by token string:
shared tokens keep their trained rows, new ones start from the mean of their
known word pieces' rows (else the mean trained direction), dropped ones are
logged (`omnitrain_jax.vocab_transfer`).

Images. Any size and format that `data/images.py` decodes (JPEG with EXIF
rotation, PNG incl. grayscale and RGBA, BMP, TIFF, WebP, GIF); the longest
side is resized to the model's image size and padded, exactly as in
evaluation (`data.transforms.ResizePad`), and boxes are mapped back to the
pixels of the (EXIF-rotated) image.

Queries.

* Text (``--queries``, comma-separated): tokenized with the run's
  vocabulary; a box's score is the geometric mean of its token
  probabilities (soft AND: "purple star" needs both). Unknown words are
  reported (log and JSON) and left out; a query with no known token scores 0
  and yields no box.
* Image-guided (``--query_image`` + ``--query_box=x,y,w,h`` in that image's
  pixels; OWL-ViT's one-shot detection): the query image's predicted box
  with the best IoU with the given box lends its class embedding as the
  query; other boxes are scored against it with their own logit scale and
  shift (``sigmoid(scale * <z, q> + shift)``), like a one-token text query.

The library is `omnitrain_jax.evaluation.predictor` (`Predictor`); this
module is only the binary.

Output, per image, in ``--out`` (default ``WORKDIR/predict``):

* ``<stem>.json``: ``{"image", "width", "height", "step", "queries": [...],
  "detections": [{"query", "query_index", "score", "box_xyxy": [x0, y0, x1,
  y1], "box_xywh": [x, y, w, h]}, ...]}``, boxes in pixels of the image as
  displayed, best first; with ``--describe=K`` each detection also has
  ``top_tokens`` (``[[token, probability], ...]``, chunked full-vocabulary
  top-k);
* ``<stem>.png`` (unless ``--nopng``): the image with the boxes and "query score" labels (an
  image under 512 px is drawn enlarged by an integer factor, so the labels
  do not hide the objects; the JSON stays in original pixels).

* ``detections.json`` (with ``--categories_from=FILE``, whose category
  names are then the text queries): every kept box as a COCO result
  (``image_id`` of the file's image with the same file name, else the
  image's position in the list; ``category_id``; ``bbox``; ``score``);
* ``skipped.json``: the images that could not be read (each reported in
  the log; the others are predicted).

Images are predicted ``--batch_size`` at a time, split over the devices of
the mesh's data axis, with progress (images, images/s, ETA) on the console.

Per query the ``--max_boxes`` best boxes above ``--threshold`` are kept,
after greedy NMS per query at IoU ``--nms_iou`` (0 disables it; one-to-one
trained models rarely need it, but it keeps pictures of weak models legible).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from omnitrain_jax import runtime
from omnitrain_jax.data import errors as data_errors
from omnitrain_jax.evaluation import predictor as predictor_lib


# Flags are defined only when this module runs as the program.
def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Config file (default: WORKDIR/config.json).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  flags.DEFINE_integer("checkpoint_step", None,
                       "Checkpoint step (default: the latest finished).")
  flags.DEFINE_string("image", None, "An image file, a folder of images, or "
                      "a .txt file listing images (one path a line).")
  flags.DEFINE_list("queries", [], "Comma-separated text queries.")
  flags.DEFINE_string("categories_from", None,
                      "A COCO/LVIS instances file: its category names are "
                      "the queries, and detections.json holds COCO results.")
  flags.DEFINE_integer("batch_size", 8, "Images per device batch.")
  flags.DEFINE_bool("png", True, "Also draw <stem>.png per image.")
  flags.DEFINE_string("query_image", None, "Image of an example object.")
  flags.DEFINE_string("query_box", None,
                      "x,y,w,h of the example object in --query_image.")
  flags.DEFINE_string("out", None, "Output folder (default WORKDIR/predict).")
  flags.DEFINE_float("threshold", 0.1, "Minimum score of a kept box.")
  flags.DEFINE_integer("max_boxes", 20, "Boxes kept per query.")
  flags.DEFINE_float("nms_iou", 0.5, "Per-query NMS IoU; 0 disables.")
  flags.DEFINE_integer("describe", 0,
                       "List the K most likely tokens of every kept box.")
  flags.DEFINE_string("vocab", None, "Vocabulary file (default: see doc).")
  flags.mark_flags_as_required(["workdir", "image"])


def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  runtime.quiet_library_logs()
  if bool(f.query_image) != bool(f.query_box):
    raise app.UsageError("--query_image and --query_box go together.")
  categories = (predictor_lib.coco_categories(f.categories_from)
                if f.categories_from else None)
  texts = [q.strip() for q in f.queries if q.strip()]
  if categories is not None:
    texts += [name for name in categories[0] if name not in texts]
  if not texts and not f.query_image:
    raise app.UsageError("Pass --queries (comma-separated words), "
                         "--categories_from and/or --query_image/--query_box.")
  paths = predictor_lib.list_images(f.image)
  predictor = predictor_lib.Predictor.from_workdir(
      f.workdir, config=f.config, step=f.checkpoint_step, vocab=f.vocab)
  image_queries = []
  if f.query_image:
    image_queries.append(predictor.image_query(
        f.query_image, predictor_lib.parse_box(f.query_box)))
  predictor_lib.predict_files(
      predictor, paths, f.out or os.path.join(f.workdir, "predict"),
      texts, image_queries, batch_size=f.batch_size, categories=categories,
      draw_png=f.png,
      max_boxes=f.max_boxes, threshold=f.threshold, nms_iou=f.nms_iou,
      describe=f.describe)

def _main(argv: Sequence[str]) -> None:
  """`main`, with user-facing errors as one line (``--verbosity=1``: the
  traceback). predict has no lenient mode (unreadable --image files are
  skipped and listed in skipped.json already)."""
  from omnitrain_jax import checkpointing  # pylint: disable=g-import-not-at-top
  with data_errors.exit_on_user_errors(
      (*runtime.USER_ERRORS, checkpointing.CheckpointError), lenient=None,
      instead="Replace or fix the named file, or leave it out."):
    main(argv)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_main)
