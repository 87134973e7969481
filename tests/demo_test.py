"""The README's first command, on the tiny config: train -> eval -> table -> picture."""

import json
import pathlib
import subprocess
import sys

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_demo_end_to_end(tmp_path):
  workdir = tmp_path / "demo"
  proc = subprocess.run(
      [sys.executable, "-m", "omnitrain_jax.demo", f"--workdir={workdir}",
       f"--config={REPO / 'configs' / 'shapes_demo.py'}:tiny",
       f"--config.data.cache_dir={tmp_path / 'cache'}"],
      capture_output=True, text=True, timeout=600, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  for label in ("base", "grd-novel", "img-novel", "grounding Acc@0.5",
                "Wall time"):
    assert label in proc.stdout
  summary = json.loads((workdir / "demo" / "summary.json").read_text())
  assert summary["step"] == 6
  rows = {r["categories"]: r for r in summary["table"]}
  assert 0.0 <= rows["base"]["AP50"] <= 1.0
  detections = json.loads(
      (workdir / "eval" / "6" / "detections_shapes_det.json").read_text())
  assert detections and {"image_id", "category_id", "bbox", "score"} <= set(
      detections[0])
  picture = Image.open(summary["picture"])
  assert picture.size[0] > 0 and picture.size[1] > 0
  assert summary["picture_queries"]  # Names of the objects in the picture.
