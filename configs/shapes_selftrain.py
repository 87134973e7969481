r"""ShapesWorld demo + self-training: pseudo-boxes as a second det source.

    python experiments/self_train.py --teacher=TEACHER_RUN \
        --captions=DATA/img_train.json --image_dir=DATA/images \
        --out=runs/pseudo/img_train_pseudo.json
    python -m omnitrain_jax.main \
        --config=configs/shapes_selftrain.py:runs/pseudo/img_train_pseudo.json \
        --workdir=runs/student

The demo config (`configs/shapes_demo.py`) with the pseudo-box file (a COCO
instances file, `experiments/self_train.py`) added to the det stream as
source ``pseudo`` (weight ``data.sources.det.pseudo.weight``, 0.5 here: a
third of the det examples; ShapesWorld's own det source keeps weight 1), its
file names resolved in the generated dataset's image folder. The grd and img
streams stay as they are (OWL-ST, Minderer et al. 2023).
"""

import os
import runpy

import ml_collections

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                     "shapes_demo.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: the pseudo-box file (required)."""
  if not arg:
    raise ValueError("configs/shapes_selftrain.py needs the pseudo-box file: "
                     "--config=configs/shapes_selftrain.py:PSEUDO.json "
                     "(experiments/self_train.py writes it).")
  config = runpy.run_path(_DEMO)["get_config"](None)
  with config.unlocked():
    config.data.sources.det.pseudo = ml_collections.ConfigDict(dict(
        reader="coco_instances", train=os.path.abspath(arg), val="",
        image_dir="images", weight=0.5))
  return config
