r"""ShapesWorld demo with fewer caption-only words: the box-supervised ceiling.

    python experiments/ablation.py --config=configs/shapes_oracle.py:pink \
        --out=runs/oracle_hexagon --mixes=det --seeds=0 --per_token

The demo config (`configs/shapes_demo.py`) on a ShapesWorld whose caption-only
words (``img_novel_tokens``) are only those of the argument (comma-separated;
"" for none): the others -- `hexagon` for ``:pink`` -- then have det boxes
like every base word. The validation images are the demo's (ShapesWorld
draws each image from its own seeded generator, whatever the token split),
so a bare-token AP here is the ceiling, at the same length, of the token a
caption loss teaches in the demo.
"""

import os
import runpy

import ml_collections

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                     "shapes_demo.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: the caption-only words to keep, comma-separated."""
  config = runpy.run_path(_DEMO)["get_config"](None)
  words = tuple(w.strip() for w in (arg or "").split(",") if w.strip())
  with config.unlocked():
    config.data.shapes_world.img_novel_tokens = words
  return config
