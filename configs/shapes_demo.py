r"""ShapesWorld demo: det + grd + img in every batch, on generated data.

    python -m omnitrain_jax.main --config=configs/shapes_demo.py --workdir=runs/demo
    python -m omnitrain_jax.main --config=configs/shapes_demo.py:tiny --workdir=/tmp/t
    python -m omnitrain_jax.data.inspect --config=configs/shapes_demo.py:tiny \
        --num_batches=3 --png=/tmp/batch.png

The data is generated on first use into ``data.cache_dir`` (default
``data_cache/`` at the repo root; regenerated when a ShapesWorld parameter
changes) together with a vocabulary built from the training annotations.

Variants: ``None`` (default, 128 px, 16 = 8 det + 4 grd + 4 img) and ``tiny``
(64 px, 40 training images per stream, 4 + 2 + 2; for tests).
"""

import ml_collections

from omnitrain_jax import config_lib


def get_data_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The ``config.data`` section (input pipeline; see data/pipeline.py)."""
  tiny = arg == "tiny"
  data = ml_collections.ConfigDict()
  data.dataset = "shapes_world"  # Or "files": sources under data.root.
  data.root = ""  # "files": folder relative source paths resolve against.
  data.cache_dir = ""  # "": $OMNITRAIN_CACHE, data_cache/, ~/.cache/...
  data.shapes_world = ml_collections.ConfigDict(dict(
      num_images=40 if tiny else 2000,  # Train images per stream.
      num_val_images=12 if tiny else 200,  # Val images per stream.
      image_size=64 if tiny else 128,
      seed=0,
  ))
  # Relative paths resolve against the generated dataset (or data.root).
  data.sources = ml_collections.ConfigDict(dict(
      det=dict(shapes_det=dict(reader="coco_instances",
                               train="det_train.json", val="det_val.json",
                               image_dir="images", weight=1.0)),
      grd=dict(shapes_grd=dict(reader="mdetr_grounding",
                               train="grd_train.json", val="grd_val.json",
                               image_dir="images", weight=1.0)),
      img=dict(shapes_img=dict(reader="coco_captions",
                               train="img_train.json", val="img_val.json",
                               image_dir="images", weight=1.0)),
  ))
  data.vocab = ml_collections.ConfigDict(dict(
      path="",  # "": build from the training annotations (cached).
      max_size=1000,
      # Always split colour-shape names into their tokens: the open-vocabulary
      # split is by token (`star`), so `red star` must not be one concept.
      split_categories=True,
      min_count=1,
  ))
  # Examples of each stream in every global batch (divisible by processes).
  data.batch = ml_collections.ConfigDict(
      dict(det=4, grd=2, img=2) if tiny else dict(det=8, grd=4, img=4))
  data.eval_batch_size = 8 if tiny else 32
  data.spec = ml_collections.ConfigDict(dict(
      image_size=64 if tiny else 128,
      max_boxes=8 if tiny else 16,
      max_box_tokens=4,
      max_caption_tokens=16,
      max_neg_tokens=64,  # ShapesWorld: up to ~20 negative tokens.
      num_candidates=32 if tiny else 64,
  ))
  data.augment = ml_collections.ConfigDict(dict(
      enabled=True,
      crop_prob=0.5,
      crop_min_scale=0.7,
      flip_prob=0.5,
      # ShapesWorld's position words are absolute thirds of the image, which a
      # crop can falsify even when it keeps every referent: no grd crops.
      grd_crop_prob=0.0,
  ))
  data.min_box_size = 1.0  # Canvas pixels; smaller boxes after a crop drop.
  data.candidates = ml_collections.ConfigDict(dict(
      alpha=0.75,  # p(token) ~ count^alpha for vocabulary negatives.
      min_vocab_negatives=4,
      det_batch_negatives_known=False,  # Conservative; see candidates.py.
      overflow="count",  # Or "error" when positives exceed num_candidates.
  ))
  data.strict = True  # False: skip and count bad records.
  data.seed = 0
  # Parallelism per host (benchmarks/input_pipeline.py has measurements):
  # reader threads (GIL-bound at ~650 examples/s) and/or worker processes,
  # each running the whole pipeline and handing over finished batches.
  data.num_threads = 0 if tiny else 4
  data.prefetch_buffer_size = 64  # Examples read ahead per process.
  data.num_workers = 0
  data.per_worker_buffer_size = 2  # Batches buffered per worker.
  data.prefetch_batches = 0 if tiny else 2  # Thread prefetch (no workers).
  return data


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo config; ``arg``: None/"" (default) or "tiny"."""
  if arg not in (None, "", "tiny"):
    raise ValueError(f"Unknown variant {arg!r}; use configs/shapes_demo.py or "
                     "configs/shapes_demo.py:tiny.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  # --------------------------------------------------------------- data ---
  config.data = get_data_config(arg)
  # ------------------------------------------------------ model / train ---
  tiny = arg == "tiny"
  if tiny:  # Seconds per step on a CPU: a 2-block ViT of width 32.
    model = config_lib.model_config("Ti/16", config.data.spec.image_size,
                                    width=32, depth=2, num_heads=2, mlp_dim=64)
  else:  # A small ViT that learns ShapesWorld on 2 CPU cores in minutes.
    model = config_lib.model_config("Ti/16", config.data.spec.image_size,
                                    width=128, depth=4, num_heads=4, mlp_dim=512)
  config_lib.add_training_sections(
      config, total_steps=6 if tiny else 2000,
      batch_size=sum(config.data.batch.values()), model=model)
  # From scratch (no pretrained backbone): the backbone trains at full rate.
  config.optimizer.backbone_lr_multiplier = 1.0
  config.optimizer.learning_rate = 1e-3 if tiny else 5e-4
  if tiny:
    config.checkpoint_every_steps = 3
    config.log_every_steps = 1
  config.lock()
  return config
