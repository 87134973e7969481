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
  for bad in ("grd", "det+txt", "det/other"):
    with pytest.raises(ValueError, match="Bad mix"):
      mix(bad, base)


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
