"""The non-data config sections shared by every training config.

A config file (``configs/*.py``) calls `add_training_sections(config, ...)`
after setting ``config.data``, then overrides what it needs. Declared once,
here, so that the trainer's fields are not a schema copied into each file.

Fields the tools rely on: ``total_steps``, ``batch_size`` (global, equal to the
sum of ``data.batch``), ``checkpoint_every_steps``, ``log_every_steps``,
``eval_every_steps``, ``seed``.
"""

from __future__ import annotations

import dataclasses
import json

from etils import epath
import ml_collections

from omnitrain_jax import sharding
from omnitrain_jax.data import transforms
from omnitrain_jax.evaluation import options as eval_options
from omnitrain_jax.losses import omni_loss

CONFIG_FILE = "config.json"


def data_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """``config.data`` (input pipeline, see data/pipeline.py) on ShapesWorld.

  Configs for real data start from it and replace ``dataset``, ``sources``,
  ``batch`` and ``spec``.
  """
  data = ml_collections.ConfigDict()
  data.dataset = "shapes_world"  # Or "files": sources under data.root.
  data.root = ""  # "files": folder relative source paths resolve against.
  data.cache_dir = ""  # "": $OMNITRAIN_CACHE, data_cache/, ~/.cache/...
  data.shapes_world = ml_collections.ConfigDict(dict(
      num_images=40 if tiny else 2000,  # Train images per stream.
      num_val_images=12 if tiny else 200,  # Val images per stream.
      image_size=64 if tiny else 128,
      seed=0,
      # > 0: img captions leave out objects (real captions are partial).
      caption_drop_fraction=0.0,
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
      max_box_tokens=6,  # "small red circle on the left": 4-5 tokens.
      max_caption_tokens=16,
      max_neg_tokens=64,  # ShapesWorld: up to ~20 negative tokens.
      num_candidates=32 if tiny else 64,
      # Caption phrases (img, for loss.img_phrase_weight): ShapesWorld lists
      # up to 6 objects, "two large pink hexagons" has 3 tokens.
      max_phrases=8,
      max_phrase_tokens=4,
  ))
  data.augment = ml_collections.ConfigDict(dict(
      enabled=True,
      crop_prob=0.5,
      crop_min_scale=0.7,
      flip_prob=0.5,
      # ShapesWorld's position words are absolute thirds of the image, which a
      # crop can falsify even when it keeps every referent: no grd crops.
      grd_crop_prob=0.0,
      # Colour jitter of det examples; their colour words (color_words in
      # the vocabulary) then get no label from them (transforms.AugmentConfig).
      color_jitter_prob=0.0,
      color_jitter_hue=0.5,  # Any hue.
      color_jitter_saturation=(0.4, 1.2),
      color_jitter_value=(0.7, 1.3),
      color_words=list(transforms.COLOR_WORDS),
  ))
  data.min_box_size = 1.0  # Canvas pixels; smaller boxes after a crop drop.
  data.candidates = ml_collections.ConfigDict(dict(
      alpha=0.75,  # p(token) ~ count^alpha for vocabulary negatives.
      min_vocab_negatives=4,
      det_batch_negatives_known=False,  # Conservative; see candidates.py.
      overflow="count",  # Or "error" when positives exceed num_candidates.
  ))
  data.strict = True  # False: skip and count bad records.
  # COCO/LVIS det train images that are RefCOCO/+/g evaluation images (COCO
  # train2014 = part of train2017): "drop" (safe), "report" or "off".
  data.eval_overlap = "drop"
  # Lenient mode: this many skipped records in a row (at most 2N - 1 for a
  # source of N records, a whole pass) end the run with an error instead of
  # looping over a source that has no readable record.
  data.max_consecutive_skips = 1000
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


def model_config(variant: str = "B/16", image_size: int = 768, **overrides):
  """``config.model`` (fields of `omnitrain_jax.models.omnidet.OmniDet`)."""
  model = ml_collections.ConfigDict(dict(
      variant=variant,
      image_size=image_size,
      class_embed_dim=ml_collections.FieldReference(None, field_type=int),
      dtype="float32",  # "bfloat16" on TPU/GPU: compute dtype, params stay f32.
      remat=False,
      remat_policy="nothing_saveable",
      stem="patch",  # "conv": stride-2 3x3 convolutions (from scratch only).
      dropout=0.0,
      droppath=0.0,
      width=ml_collections.FieldReference(None, field_type=int),
      depth=ml_collections.FieldReference(None, field_type=int),
      num_heads=ml_collections.FieldReference(None, field_type=int),
      mlp_dim=ml_collections.FieldReference(None, field_type=int),
      prior_prob=0.01,
      init_logit_scale=10.0,
  ))
  model.update(overrides)
  return model


def add_training_sections(config: ml_collections.ConfigDict, *,
                          total_steps: int, batch_size: int,
                          model: ml_collections.ConfigDict) -> None:
  """Adds model, loss, optimizer, mesh and loop fields to `config`."""
  config.model = model
  config.total_steps = total_steps
  config.batch_size = batch_size
  config.seed = config.get("seed", 0)

  # One loss, three matching rules: every field of `LossConfig`, with its
  # defaults (and where they come from) declared once, in losses/omni_loss.py.
  config.loss = ml_collections.ConfigDict(
      dataclasses.asdict(omni_loss.LossConfig()))

  # AdamW + warmup/cosine (omnitrain_jax/optim.py). OWL-ViT fine-tunes its
  # image tower at a lower rate than the heads; big_vision ViT recipes clip
  # the global gradient norm at 1.
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-4,
      backbone_lr_multiplier=0.1,
      backbone_regex=r"^backbone/",
      warmup_steps=min(1000, max(total_steps // 20, 1)),
      end_lr_factor=0.0,
      weight_decay=0.05,
      # The token table is used through normalized rows only: no decay.
      no_decay_regex=r"(pos_embedding|cls|norm|bias|scale|token_embedding)",
      b1=0.9, b2=0.999, eps=1e-8,
      grad_clip_norm=1.0,
      # "sparse": lazy AdamW on the step's candidate rows of the token
      # table only (flat in V); "dense": the whole table every step.
      token_table_update="sparse",
  ))

  # Device mesh: data x model (omnitrain_jax/sharding.py); -1 = the rest.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  # Logical axis -> mesh axis pairs (omnitrain_jax/sharding.py), or a preset
  # name: --config.logical_rules=fsdp also shards parameters over "data".
  config.logical_rules = ml_collections.FieldReference(
      sharding.DEFAULT_RULES, field_type=object)

  config.init_from = ""  # Another run's workdir/checkpoint: params only.
  # A big_vision / AugReg ViT .npz for the backbone of a run from scratch
  # (models/pretrained.py; position embeddings are resized).
  config.backbone_npz = ""
  config.checkpoint_every_steps = max(total_steps // 10, 1)
  config.keep_checkpoints = 3
  config.log_every_steps = max(min(50, total_steps // 10), 1)
  config.eval_every_steps = 0  # 0: evaluate only at the end.
  # Evaluation (omnitrain_jax/evaluation/options.py): every field of
  # `EvalOptions`, with its defaults declared there. max_batches=None: whole
  # val sets.
  eval_fields = dataclasses.asdict(eval_options.EvalOptions())
  eval_fields["max_batches"] = ml_collections.FieldReference(None, field_type=int)
  config.eval = ml_collections.ConfigDict(eval_fields)
  config.max_consecutive_nonfinite = 5
  # Self-training (OWL-ST; omnitrain_jax/self_training.py): at each of
  # `steps` (values below 1: fractions of total_steps, so (0.6, 0.8) labels
  # at 60% and 80% of any run length) the run labels the caption images
  # with its current model
  # (caption-filtered boxes scoring >= threshold) and mixes them into the
  # det stream as source "pseudo" (weight against the det sources' weights).
  # name_words: the tokens a phrase's name keeps (empty: all); source: the
  # img source to label (empty: all); max_images: a fixed random subset (0:
  # all images). () = off.
  config.self_train = ml_collections.ConfigDict(dict(
      steps=(), threshold=0.3, weight=0.5, name_words=(), source="",
      max_images=0, batch_size=32))
  # After SIGTERM, how long a wait for the input pipeline may go on before the
  # run stops without saving (a stalled source); see train.py "Stops".
  config.stop_grace_secs = 5.0
  config.profile_steps = ()  # (start, stop) to trace with jax.profiler.


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved as ``WORKDIR/config.json``."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} does not exist: pass --config=CONFIG (the training config "
        "file), or point --workdir at a training run's directory.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))
