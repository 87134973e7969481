"""Every config loads, is locked, and is consistent; real data fails clearly."""

import pathlib
import runpy

import pytest

from omnitrain_jax import train
from omnitrain_jax.data import preparation

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
VARIANTS = [("shapes_demo.py", None), ("shapes_demo.py", "tiny"),
            ("omnidet_b16.py", None), ("omnidet_b16.py", "shapes"),
            ("finetune.py", None), ("finetune.py", "tiny"),
            ("finetune.py", "b16"),
            ("shapes_selftrain.py", "/tmp/pseudo_boxes.json"),
            ("shapes_oracle.py", "pink")]


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_config_is_locked_and_consistent(name, variant):
  config = runpy.run_path(str(CONFIGS / name))["get_config"](variant)
  train.check_config(config)
  for field in ("total_steps", "batch_size", "checkpoint_every_steps",
                "log_every_steps", "eval_every_steps", "seed"):
    assert field in config
  with pytest.raises(AttributeError):
    config.totl_steps = 3  # A typo must not add a field.


def test_b16_is_the_design_recipe():
  config = runpy.run_path(str(CONFIGS / "omnidet_b16.py"))["get_config"](None)
  assert config.model.variant == "B/16" and config.model.image_size == 768
  assert dict(config.data.batch) == {"det": 128, "grd": 64, "img": 64}
  assert config.batch_size == 256


def test_b16_on_a_fresh_machine_names_the_missing_data(tmp_path):
  config = runpy.run_path(str(CONFIGS / "omnidet_b16.py"))["get_config"](None)
  config.data.root = str(tmp_path)
  with pytest.raises(FileNotFoundError) as info:
    preparation.prepare_data(config.data)
  message = str(info.value)
  assert "instances_train2017.json" in message
  assert "Prepare it" in message


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="Unknown variant"):
    runpy.run_path(str(CONFIGS / "shapes_demo.py"))["get_config"]("huge")


def test_finetune_batch_size_follows_the_replay_share():
  config = runpy.run_path(str(CONFIGS / "finetune.py"))["get_config"](None)
  assert dict(config.data.batch) == {"det": 12, "grd": 2, "img": 2}
  config.data.batch.grd = 4
  config.data.batch.img = 0
  assert config.batch_size == 16
  train.check_config(config)
  assert config.data.sources.det.shapes_det.weight == 0.0  # Evaluated only.
  assert config.data.sources.det.custom.reader == "coco_instances"



def test_oracle_keeps_only_the_named_caption_only_words():
  get = runpy.run_path(str(CONFIGS / "shapes_oracle.py"))["get_config"]
  assert get("pink").data.shapes_world.img_novel_tokens == ("pink",)
  assert get("").data.shapes_world.img_novel_tokens == ()
  demo = runpy.run_path(str(CONFIGS / "shapes_demo.py"))["get_config"](None)
  oracle = get("pink")
  for section in ("model", "loss", "optimizer"):
    assert oracle[section].to_dict() == demo[section].to_dict(), section
