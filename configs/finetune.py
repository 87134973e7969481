r"""Fine-tune a trained run on your own COCO-format dataset, with replay.

    python -m omnitrain_jax.main --config=configs/finetune.py --workdir=runs/ft \
        --config.init_from=runs/demo \
        --config.data.sources.det.custom.train=/data/mine/train.json \
        --config.data.sources.det.custom.val=/data/mine/val.json \
        --config.data.sources.det.custom.image_dir=/data/mine/train_images \
        --config.data.sources.det.custom.val_image_dir=/data/mine/val_images
    python -m omnitrain_jax.predict --workdir=runs/ft --image=photo.jpg \
        --queries="my new class"

What it does:

* **Your data** is the det source ``custom`` (reader ``coco_instances``: a
  COCO instances JSON, ``file_name`` relative to the image folder; give
  ``val_image_dir`` when the val images live in another folder, else
  ``image_dir`` serves both). Absolute paths, or paths relative to the
  current folder, both work.
* **Start**: ``config.init_from`` (required) is the trained run's workdir, its
  ``checkpoints/`` or one ``checkpoints/STEP``; the model section must be the
  one it trained with (the variant picks it). The parameters are restored;
  the token table is matched **by token string** to this run's vocabulary
  (`omnitrain_jax.vocab_transfer`): the run's own vocabulary is built from
  the sources below (your category names, multi-word names kept as concepts
  unless the file is compositional, plus every word of the replay data), so
  the tokens the trained run knows keep their rows, your new names start
  from the mean of their known words' rows (``red square`` from ``red`` and
  ``square``) or from the mean trained direction (a new word), and the log
  line ``Token table from ...`` counts kept, new and dropped tokens.
* **Replay**: the base run's grounding and caption streams stay in every
  batch (``data.batch.grd`` + ``data.batch.img`` examples of
  ``batch_size``, which follows the sum), so the old vocabulary keeps its
  supervision while detection learns your classes -- fine-tuning on
  detection alone is what makes open-vocabulary detectors forget. The
  default share is the base config's (demo: 12 det + 2 grd + 2 img, 25%
  replay); ``--config.data.batch.grd=0 --config.data.batch.img=0`` turns
  replay off. The base run's det source is kept with ``weight=0``: it is not
  trained on, but it is evaluated, and ``--config.data.sources.det.
  shapes_det.weight=0.5`` (b16: ``coco``/``lvis``) replays it too, mixed with
  yours in the det share.
* **Evaluation** at the end (and every ``eval_every_steps``): your val set
  (``eval/custom/AP``, ``AP50``, ...) plus the original ones (demo:
  ``eval/shapes_det/...`` with the open-vocabulary groups and
  ``eval/shapes_grd/acc@0.5``), in ``WORKDIR/eval/STEP/metrics.json``.

Variants (the base run's config; the model must match ``init_from``'s):

  (default)  ``configs/shapes_demo.py``: the demo's model, ShapesWorld replay.
  ``tiny``   ``configs/shapes_demo.py:tiny`` (tests, seconds).
  ``b16``    ``configs/omnidet_b16.py``: RefCOCOg / Flickr30k / CC12M replay
             under ``data.root``; COCO and LVIS kept for evaluation.

The learning rate is the base's divided by 3 (1000 steps for the demo,
10,000 for b16), with the backbone at 0.1x, as detection fine-tuning
usually does; override ``optimizer.learning_rate``, ``total_steps`` as
needed. None of these values was tuned.
"""

import os
import runpy

import ml_collections

_BASES = {
    None: ("shapes_demo.py", None),
    "tiny": ("shapes_demo.py", "tiny"),
    "b16": ("omnidet_b16.py", None),
}


def _base_config(variant):
  """The base run's config, unlocked (configs/ is not a package)."""
  file, arg = _BASES[variant]
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), file)
  config = runpy.run_path(path)["get_config"](arg)
  config.unlock()
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None/"" (the demo's model), "tiny" or "b16"."""
  variant = arg or None
  if variant not in _BASES:
    raise ValueError(f"Unknown variant {arg!r}; use configs/finetune.py, "
                     "configs/finetune.py:tiny or configs/finetune.py:b16.")
  config = _base_config(variant)
  data = config.data
  # ---------------------------------------------------- your data (det) ---
  base_det = dict(data.sources.det)
  for source in base_det.values():
    source.weight = 0.0  # Evaluated, not trained on (see the docstring).
  det = {"custom": ml_collections.ConfigDict(dict(
      reader="coco_instances", train="", val="", image_dir="",
      val_image_dir="", weight=1.0))}
  det.update(base_det)
  data.sources.det = ml_collections.ConfigDict(det)
  # Multi-word category names of a real dataset are concepts ("fire
  # truck"), unless the file is compositional (ShapesWorld's colour x shape
  # names still split): the builder's per-file rule.
  data.vocab.split_categories = False
  data.vocab.path = ""  # Built from the sources, i.e. old words + yours.
  # ------------------------------------------------------------ replay ---
  # batch_size follows the composition: --config.data.batch.grd=N is enough.
  batch = data.batch
  config.batch_size = (batch.get_ref("det") + batch.get_ref("grd") +
                       batch.get_ref("img"))
  # ----------------------------------------------------------- schedule ---
  config.init_from = ""  # Required: the trained run (see the docstring).
  config.optimizer.learning_rate /= 3
  config.optimizer.backbone_lr_multiplier = 0.1
  if variant == "tiny":
    config.total_steps = 4
    config.checkpoint_every_steps = 2
  elif variant is None:
    config.total_steps = 1000
    config.checkpoint_every_steps = 500
    config.eval_every_steps = 500
    config.log_every_steps = 50
  else:  # b16: a tenth of the base schedule (unverified, no compute here).
    config.total_steps = 10_000
    config.checkpoint_every_steps = 1000
    config.eval_every_steps = 2000
  config.optimizer.warmup_steps = max(min(100, config.total_steps // 10), 1)
  config.lock()
  return config
