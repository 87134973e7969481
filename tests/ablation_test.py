"""The ablation driver's pieces that need no training."""

import json
import pathlib
import runpy

import pytest

ABLATION = runpy.run_path(
    str(pathlib.Path(__file__).resolve().parents[1] / "experiments" /
        "ablation.py"), run_name="ablation")


def test_mix_overrides_keep_the_det_share_and_add_streams():
  mix = ABLATION["mix_overrides"]
  base = {"det": 8, "grd": 4, "img": 4}
  assert mix("det", base) == ["--config.data.batch.det=8",
                              "--config.data.batch.grd=0",
                              "--config.data.batch.img=0",
                              "--config.batch_size=8"]
  out = mix("det+grd+img/no_region", base)
  assert "--config.batch_size=16" in out
  assert "--config.loss.img_region_weight=0" in out
  assert mix("det+img/no_phrase", base)[-2:] == [
      "--config.batch_size=12", "--config.loss.img_phrase_weight=0"]
  assert mix("det+grd+img/partial", base)[-1] == (
      "--config.data.shapes_world.caption_drop_fraction=0.5")
  assert mix("det+grd+img/maxsize", base)[-3:] == [
      "--config.loss.img_phrase_weight=0",
      "--config.loss.img_maxsize_weight=2",
      "--config.loss.img_maxsize_warmup_steps=500"]
  for bad in ("grd", "det+txt", "det/other"):
    with pytest.raises(ValueError, match="Bad mix"):
      mix(bad, base)


def test_data_overrides_reach_the_base_config():
  """The bare-token val files must come from the data the runs train on."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  apply = ABLATION["apply_data_overrides"]
  config = ml_collections.ConfigDict({
      "data": {"shapes_world": {"seed": 0, "caption_drop_fraction": 0.0},
               "augment": {"enabled": True}},
      "loss": {"grd_weight": 0.5}})
  applied = apply(config, ["data.shapes_world.seed=7", "loss.grd_weight=0.1",
                           "data.shapes_world.caption_drop_fraction=1",
                           "data.augment.enabled=False"])
  assert applied == ["data.shapes_world.seed",
                     "data.shapes_world.caption_drop_fraction",
                     "data.augment.enabled"]
  assert config.data.shapes_world.seed == 7
  assert config.data.shapes_world.caption_drop_fraction == 1.0
  assert config.data.augment.enabled is False
  assert config.loss.grd_weight == 0.5  # Not data: only the runs get it.
  with pytest.raises(ValueError, match="no field data.shapes_world.sede"):
    apply(config, ["data.shapes_world.sede=1"])
  with pytest.raises(ValueError, match="of type int"):
    apply(config, ["data.shapes_world.seed=abc"])
  with pytest.raises(ValueError, match="KEY=VALUE"):
    apply(config, ["data.shapes_world.seed"])


def test_token_dataset_boxes_every_object_with_the_token(tmp_path):
  det_val = tmp_path / "det_val.json"
  det_val.write_text(json.dumps({
      "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
      "categories": [{"id": 1, "name": "red star"},
                     {"id": 2, "name": "blue star"},
                     {"id": 3, "name": "pink circle"}],
      "annotations": [
          {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]},
          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [3, 3, 2, 2]},
          {"id": 3, "image_id": 1, "category_id": 3, "bbox": [6, 6, 2, 2]}]}))
  out = ABLATION["token_dataset"](str(det_val), ["star", "pink"],
                                  str(tmp_path / "tokens.json"))
  data = json.loads(pathlib.Path(out).read_text())
  assert [c["name"] for c in data["categories"]] == ["star", "pink"]
  by_cat = {}
  for a in data["annotations"]:
    by_cat.setdefault(a["category_id"], []).append(a["bbox"])
  assert by_cat == {1: [[0, 0, 2, 2], [3, 3, 2, 2]], 2: [[6, 6, 2, 2]]}
  assert len({a["id"] for a in data["annotations"]}) == 3


def test_core_groups_are_disjoint_and_cover_the_cores():
  import os
  groups = ABLATION["core_groups"](2)
  assert len(groups) == 2
  if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
    assert not groups[0] & groups[1]
    assert groups[0] | groups[1] == set(os.sched_getaffinity(0))
  assert ABLATION["core_groups"](1) == [None]


def test_two_mixes_end_to_end_two_at_a_time(tmp_path):
  """The one command, on the tiny config: JSON, table and plot."""
  import subprocess
  import sys
  repo = pathlib.Path(__file__).resolve().parents[1]
  out = tmp_path / "ablation"
  proc = subprocess.run(
      [sys.executable, str(repo / "experiments" / "ablation.py"),
       f"--out={out}", "--mixes=det,det+grd", "--seeds=0", "--jobs=2",
       "--per_token",
       f"--config={repo / 'configs' / 'shapes_demo.py'}:tiny",
       f"--cache_dir={tmp_path / 'cache'}"],
      capture_output=True, text=True, timeout=900, cwd=str(repo))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "ablation.json").read_text())
  assert [(r["mix"], r["seed"]) for r in result["runs"]] == [("det", 0),
                                                             ("det+grd", 0)]
  for r in result["runs"]:
    for key in ("base_AP50", "grd_novel_AP50", "grounding_acc50",
                "grd_token_AP50", "img_token_AP50"):
      assert r[key] is not None and 0.0 <= r[key] <= 1.0, (r["mix"], key)
    # --per_token: each novel token of the ShapesWorld splits alone.
    bare = sorted(k for k in r if k.startswith("bare_"))
    assert bare == ["bare_hexagon_AP50", "bare_pink_AP50",
                    "bare_purple_AP50", "bare_star_AP50"], bare
    assert all(0.0 <= r[k] <= 1.0 for k in bare), r
  table = (out / "ablation.md").read_text()
  assert "| det+grd |" in table
  assert "bare_hexagon_AP50 |" in table.splitlines()[0]
  assert (out / "ablation.png").stat().st_size > 1000
