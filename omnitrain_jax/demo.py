r"""The demo, end to end: train on ShapesWorld, evaluate, draw novel queries.

    python -m omnitrain_jax.demo --workdir=runs/demo
    python -m omnitrain_jax.demo --workdir=/tmp/d --config=configs/shapes_demo.py:tiny

1. trains `configs/shapes_demo.py` (generating ShapesWorld on first use; an
   interrupted demo resumes from its last checkpoint);
2. the trainer's final evaluation writes the COCO-format detections and the
   metrics to ``WORKDIR/eval/STEP/``;
3. prints the open-vocabulary table: AP on base categories, on categories
   whose token only grounding phrases named (grd-novel), on categories whose
   token only captions named (img-novel), and grounding Acc@0.5;
4. draws predictions for novel text queries on a validation image to
   ``WORKDIR/demo/``, and prints the wall time.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_flags

from omnitrain_jax import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs", "shapes_demo.py"),
    "The demo config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
flags.mark_flags_as_required(["workdir"])

GROUPS = (("base", "base"), ("grd_novel", "grd-novel"),
          ("img_novel", "img-novel"))


def latest_eval(workdir: str) -> tuple[int, dict[str, float]]:
  """The last evaluated step and its metrics.json."""
  eval_dir = epath.Path(workdir) / "eval"
  steps = sorted(int(p.name) for p in eval_dir.iterdir() if p.name.isdigit())
  if not steps:
    raise FileNotFoundError(f"No evaluation in {eval_dir}.")
  return steps[-1], json.loads((eval_dir / str(steps[-1]) / "metrics.json"
                                ).read_text())


def table(metrics: dict[str, float], det: str = "shapes_det",
          grd: str = "shapes_grd") -> list[dict[str, Any]]:
  """Rows of the open-vocabulary table from the evaluation's metrics."""
  rows = []
  for key, label in GROUPS + (("", "all"),):
    suffix = f"_{key}" if key else ""
    rows.append({"categories": label,
                 "AP50": metrics.get(f"eval/{det}/AP50{suffix}"),
                 "AP": metrics.get(f"eval/{det}/AP{suffix}")})
  rows.append({"categories": "grounding Acc@0.5",
               "AP50": metrics.get(f"eval/{grd}/acc@0.5"), "AP": None})
  return rows


def format_table(rows) -> str:
  fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"  # pylint: disable=unnecessary-lambda-assignment
  lines = ["| categories        |  AP50  |   AP   |",
           "|-------------------|--------|--------|"]
  lines += [f"| {r['categories']:<17} | {fmt(r['AP50'])} | {fmt(r['AP'])} |"
            for r in rows]
  return "\n".join(lines)


def pick_novel_image(det_val_json: str, splits: dict[str, Any]
                     ) -> tuple[str, list[str]]:
  """A val image with the most novel objects, and its category names."""
  data = json.loads(epath.Path(det_val_json).read_text())
  names = {c["id"]: c["name"] for c in data["categories"]}
  novel = set(splits["grd_novel_categories"]) | set(splits["img_novel_categories"])
  per_image: dict[int, list[int]] = {}
  for ann in data["annotations"]:
    per_image.setdefault(ann["image_id"], []).append(ann["category_id"])
  best = max(data["images"], key=lambda im: (
      len(novel & set(per_image.get(im["id"], ()))),
      len(set(per_image.get(im["id"], ()))), -im["id"]))
  cats = sorted(set(per_image.get(best["id"], ())),
                key=lambda c: (c not in novel, c))
  return best["file_name"], [names[c] for c in cats]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from omnitrain_jax import train  # pylint: disable=g-import-not-at-top
  from omnitrain_jax.data import shapes_world  # pylint: disable=g-import-not-at-top
  from omnitrain_jax.evaluation import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  runtime.quiet_library_logs()
  start = time.time()
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  train.train_and_evaluate(config, workdir)
  train_secs = time.time() - start
  step, metrics = latest_eval(workdir)
  rows = table(metrics)

  # Novel queries on a validation image.
  from omnitrain_jax.data import preparation  # pylint: disable=g-import-not-at-top
  info = preparation.prepare_data(config.data)
  paths = shapes_world.output_paths(info.root)
  file_name, names = pick_novel_image(paths["det_val"], info.splits)
  image_path = os.path.join(paths["image_root"], file_name)
  predictor = predictor_lib.Predictor.from_workdir(workdir, config=config)
  out_dir = os.path.join(workdir, "demo")
  predictor_lib.predict_files(predictor, [image_path], out_dir, names,
                              threshold=0.2, max_boxes=3)
  wall = time.time() - start
  summary = {"step": step, "table": rows, "picture_queries": names,
             "picture": os.path.join(out_dir, os.path.splitext(
                 os.path.basename(file_name))[0] + ".png"),
             "detections": str(epath.Path(workdir) / "eval" / str(step)),
             "train_and_eval_seconds": train_secs, "wall_seconds": wall}
  (epath.Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
  print(f"\nOmniTrain demo, step {step} (ShapesWorld validation):")
  print(format_table(rows))
  print(f"COCO-format detections and metrics: {summary['detections']}")
  print(f"Predictions for {names}: {summary['picture']}")
  print(f"Wall time: {wall / 60:.1f} min (training + evaluation "
        f"{train_secs / 60:.1f} min)")
  logging.info("Demo summary: %s", summary)


if __name__ == "__main__":
  app.run(main)
