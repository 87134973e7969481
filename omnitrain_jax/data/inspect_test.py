"""Tests of the inspect CLI (run as a subprocess, as a user would)."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from omnitrain_jax.data import inspect as inspect_lib
from omnitrain_jax.data import schema

_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_batch_stats_counts_streams_and_boxes():
  spec = schema.Spec(image_size=8, max_boxes=2, max_box_tokens=2)
  exs = [schema.empty_example(spec, s) for s in ("det", "det", "img")]
  exs[0]["box_mask"][:2] = True
  exs[0]["box_tokens"][0] = [5, 6]
  exs[0]["box_tokens"][1] = [7, 0]
  exs[0]["image_id"] = exs[1]["image_id"] = exs[2]["image_id"] = np.int32(1)
  batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
  s = inspect_lib.batch_stats(batch)
  assert s["streams"] == {"det": 2, "grd": 0, "img": 1}
  assert s["boxes"] == 2 and s["boxes_per_stream"]["det"] == 2
  assert s["tokens_per_box"] == 1.5


def test_cli_prints_json_lines_and_draws_png(tmp_path):
  png = tmp_path / "grid.png"
  out = subprocess.run(
      [sys.executable, "-m", "omnitrain_jax.data.inspect",
       f"--config={_REPO}/configs/shapes_demo.py:tiny",
       f"--config.data.cache_dir={tmp_path / 'cache'}",
       "--num_batches=2", f"--png={png}", "--tile=64"],
      cwd=_REPO, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(l) for l in out.stdout.splitlines()
           if l.startswith("{")]
  assert [l["batch"] for l in lines] == [0, 1]
  for l in lines:
    assert l["streams"] == {"det": 4, "grd": 2, "img": 2}
    assert l["boxes"] > 0 and l["candidates_used"] > 0
  im = Image.open(png)
  assert im.size == (4 * 64, 2 * (64 + 28))
