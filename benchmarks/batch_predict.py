r"""Batch prediction: images/s batched vs one image at a time.

    python benchmarks/batch_predict.py [--num_images=64] [--batches=1,8,32] \
        [--image_size=128] [--out=FILE]

The demo's model (`configs/shapes_demo.py`, randomly initialised: speed does
not depend on the weights) behind the real `evaluation.predictor.Predictor`
and `predict_files` (decode, resize/pad, encode, score, top-k, NMS, JSON and
PNG per image), on ``--num_images`` random 480 x 640 JPEGs with 3 text
queries. Each batch size runs the whole folder once to compile, then is
timed over a second pass, without and with the PNG drawing; the JSON
reports images/s per batch size and the ratio to the first batch size
(batch 1: one image at a time). ``encode_only_images_per_sec``
times the jitted encode alone, so the host's share (decode, drawing, JSON)
is visible.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top
from omnitrain_jax import model_setup  # pylint: disable=g-import-not-at-top
from omnitrain_jax.data import preparation  # pylint: disable=g-import-not-at-top
from omnitrain_jax.evaluation import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
from omnitrain_jax.vocab import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
from omnitrain_jax.vocab import vocabulary as vocabulary_lib  # pylint: disable=g-import-not-at-top

QUERIES = ("red circle", "blue star", "green square")


def make_predictor(image_size: int, seed: int = 0) -> predictor_lib.Predictor:
  """A randomly initialised demo model with a small colour-shape vocabulary."""
  config = common.demo_config(image_size=image_size)
  words = sorted({w for q in QUERIES for w in q.split()} | {"pink", "ring"})
  vocab = vocabulary_lib.Vocabulary(words)
  setup = model_setup.create(config, vocab_size=len(vocab),
                             spec=preparation.spec_from_config(config.data))
  state = setup.init_fn(seed)
  return predictor_lib.Predictor(
      model=setup.model, params=state.params, mesh=setup.mesh,
      param_shardings=setup.param_shardings, rules=setup.rules,
      tokenizer=tokenizer_lib.Tokenizer(vocab))


def write_images(folder: str, n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    path = os.path.join(folder, f"{i:05d}.jpg")
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)).save(
        path, quality=90)
    paths.append(path)
  return paths


def time_batch_size(predictor, paths, out_dir, batch_size: int,
                    draw_png: bool) -> float:
  """Seconds for one pass over `paths`, after a compiling pass."""
  run = lambda: predictor_lib.predict_files(
      predictor, paths, out_dir, QUERIES, batch_size=batch_size,
      draw_png=draw_png, threshold=0.0, max_boxes=5, progress_every_secs=1e9)
  run()
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=64)
  parser.add_argument("--batches", default="1,8,32")
  parser.add_argument("--image_size", type=int, default=128)
  parser.add_argument("--out", default=None, help="Also write the JSON here.")
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  predictor = make_predictor(args.image_size)
  report = {"benchmark": "batch_predict", "environment": common.environment(),
            "num_images": args.num_images, "image_size": args.image_size,
            "devices": jax.device_count(), "results": {}}
  with tempfile.TemporaryDirectory() as tmp:
    os.makedirs(os.path.join(tmp, "in"))
    paths = write_images(os.path.join(tmp, "in"), args.num_images)
    for draw_png in (False, True):
      for b in batches:
        secs = time_batch_size(predictor, paths, os.path.join(tmp, f"out{b}"),
                               b, draw_png)
        report["results"][f"batch_{b}{'_png' if draw_png else ''}"] = {
            "seconds": secs, "images_per_sec": args.num_images / secs}
    images = [predictor.load_image(p) for p in paths[:max(batches)]]
    predictor._encode_images(images)  # Compile.  pylint: disable=protected-access
    start = time.perf_counter()
    jax.block_until_ready(predictor._encode_images(images))  # pylint: disable=protected-access
    report["encode_only_images_per_sec"] = len(images) / (
        time.perf_counter() - start)
  for name, r in report["results"].items():
    base = report["results"][f"batch_{batches[0]}" + (
        "_png" if name.endswith("_png") else "")]["images_per_sec"]
    r["ratio_to_batch_%d" % batches[0]] = r["images_per_sec"] / base
  return common.emit(report, args.out)


if __name__ == "__main__":
  main()
