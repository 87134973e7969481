r"""ShapesWorld demo: det + grd + img in every batch, on generated data.

    python -m omnitrain_jax.main --config=configs/shapes_demo.py --workdir=runs/demo
    python -m omnitrain_jax.main --config=configs/shapes_demo.py:tiny --workdir=/tmp/t
    python -m omnitrain_jax.data.inspect --config=configs/shapes_demo.py:tiny \
        --num_batches=3 --png=/tmp/batch.png

The data is generated on first use into ``data.cache_dir`` (default
``data_cache/`` at the repo root; regenerated when a ShapesWorld parameter
changes) together with a vocabulary built from the training annotations.

Variants: ``None`` (default, 128 px, 16 = 12 det + 2 grd + 2 img) and ``tiny``
(64 px, 40 training images per stream, 4 + 2 + 2; for tests).
"""

import ml_collections

from omnitrain_jax import config_lib
from omnitrain_jax.data import shapes_world


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo config; ``arg``: None/"" (default) or "tiny"."""
  if arg not in (None, "", "tiny"):
    raise ValueError(f"Unknown variant {arg!r}; use configs/shapes_demo.py or "
                     "configs/shapes_demo.py:tiny.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  # --------------------------------------------------------------- data ---
  config.data = config_lib.data_config(tiny=arg == "tiny")
  # ------------------------------------------------------ model / train ---
  tiny = arg == "tiny"
  if tiny:  # Seconds per step on a CPU: a 2-block ViT of width 32.
    model = config_lib.model_config("Ti/16", config.data.spec.image_size,
                                    width=32, depth=2, num_heads=2, mlp_dim=64)
  else:  # A small ViT that learns ShapesWorld on 2 CPU cores in minutes.
    # A convolutional stem (vit.ConvStem): at 1500 steps base AP50 0.117 ->
    # 0.162 (det-only: 0.169 -> 0.266) for ~30% more time per step. The
    # patch stem recognised colours but rarely shapes.
    model = config_lib.model_config("Ti/16", config.data.spec.image_size,
                                    width=128, depth=4, num_heads=4, mlp_dim=512,
                                    stem="conv")
    # Mostly detection: 12 det + 2 grd + 2 img (see the loss weights below).
    config.data.batch = ml_collections.ConfigDict(dict(det=12, grd=2, img=2))
  config_lib.add_training_sections(
      config, total_steps=6 if tiny else 5000,
      batch_size=sum(config.data.batch.values()), model=model)
  # From scratch (no pretrained backbone): the backbone trains at full rate.
  config.optimizer.backbone_lr_multiplier = 1.0
  # Self-training's names: colour and shape words (size and place words are
  # not det labels).
  config.self_train.name_words = (*shapes_world.COLORS, *shapes_world.SHAPES)
  # 1e-3 beat 5e-4 and 2e-3 here (README: "What the demo reaches here").
  config.optimizer.learning_rate = 1e-3
  if tiny:
    config.checkpoint_every_steps = 3
    config.log_every_steps = 1
  else:
    config.eval_every_steps = 1000  # The learning curve, in the logs.
    # Each stream's loss is a mean over its own targets, so a stream with 2
    # examples per batch would weigh as much as one with 12 (and be as noisy
    # as 2 examples). Weighting grd and img down to their share of the batch
    # helped every metric here (1500 steps, conv stem, 12/2/2: base AP50
    # 0.21 at 0.2 vs 0.15 at grd 0.5; patch stem, 8/4/4: 0.117 at 0.5/0.25
    # vs 0.099 at 1/1). grd is halved again below.
    config.loss.img_weight = 0.2
    # Grounding as per-token sigmoid focal (GLIP; loss.grd_token_loss),
    # matched like det, at half the weight: MDETR's uniform-target softmax
    # pushes a phrase word the det stream scores high down towards the
    # phrase's weakest word, against det (gradient cosine det/grd -0.49 on
    # the head). At 5000 steps, seeds 0 / 1: base AP50 0.744 / 0.761 vs
    # 0.675 / 0.685 (softmax at 0.2) and 0.725 / 0.758 det-only; grd-novel
    # 0.559 / 0.634 vs 0.595 / 0.603 (README, "What mixing cost base AP").
    config.loss.grd_token_loss = "focal"
    config.loss.grd_cost_class = 2.0  # det's cost_class
    config.loss.grd_weight = 0.1
    # Caption phrase-region matching (losses/omni_loss.py, "img phrase
    # matching"), after a warm-up of 10% of the steps. At 5000 steps, seeds
    # 0 / 1, with vs without it: img-novel AP50 0.248 / 0.226 vs 0.179 /
    # 0.183, grd-novel 0.491 / 0.499 vs 0.469 / 0.449, base 0.697 / 0.726 vs
    # 0.708 / 0.714; about 10% more time per step (README, "Phrase-region
    # matching").
    config.loss.img_phrase_weight = 2.0
    config.loss.img_phrase_warmup_steps = 500
    # Half the det images colour-jittered, their colour words unlabelled
    # (transforms.AugmentConfig): the box head stops depending on the colours
    # det boxes, so caption-only `pink` objects get boxes. At 5000 steps,
    # seeds 0 / 1, with vs without: img-novel AP50 0.507 / 0.507 vs 0.248 /
    # 0.226, grd-novel 0.595 / 0.603 vs 0.491 / 0.499, base 0.675 / 0.685 vs
    # 0.697 / 0.726 (README, "Colour-jittered boxes").
    config.data.augment.color_jitter_prob = 0.5
    # Self-training in the run (README, "Self-training"): the caption images
    # labelled by the model itself at 60% and 80% of the run (steps 3000,
    # 4000), their caption-filtered boxes a det source from then on.
    config.self_train.steps = (0.6, 0.8)
  config.lock()
  return config
