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

import ml_collections

from omnitrain_jax.losses import omni_loss


def model_config(variant: str = "B/16", image_size: int = 768, **overrides):
  """``config.model`` (fields of `omnitrain_jax.models.omnidet.OmniDet`)."""
  model = ml_collections.ConfigDict(dict(
      variant=variant,
      image_size=image_size,
      class_embed_dim=ml_collections.FieldReference(None, field_type=int),
      dtype="float32",  # "bfloat16" on TPU/GPU: compute dtype, params stay f32.
      remat=False,
      remat_policy="nothing_saveable",
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
      no_decay_regex=r"(pos_embedding|cls|norm|bias|scale)",
      b1=0.9, b2=0.999, eps=1e-8,
      grad_clip_norm=1.0,
  ))

  # Device mesh: data x model (omnitrain_jax/sharding.py); -1 = the rest.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  config.logical_rules = "default"  # Or "fsdp" (models/partitioning.py).

  config.init_from = ""  # Another run's workdir/checkpoint: params only.
  config.checkpoint_every_steps = max(total_steps // 10, 1)
  config.keep_checkpoints = 3
  config.log_every_steps = max(min(50, total_steps // 10), 1)
  config.eval_every_steps = 0  # 0: evaluate only at the end.
  config.eval_max_batches = ml_collections.FieldReference(None, field_type=int)
  config.max_consecutive_nonfinite = 5
  config.profile_steps = ()  # (start, stop) to trace with jax.profiler.
