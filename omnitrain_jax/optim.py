"""The optimizer: AdamW, warmup + cosine, global-norm clipping, two learning rates.

Config fields (``config.optimizer``):
  learning_rate: peak learning rate of the head (and the token table).
  backbone_lr_multiplier: the backbone's peak rate is ``learning_rate *`` this
    (OWL-ViT fine-tunes its image tower at a lower rate than the heads; 0 freezes
    the backbone: its updates become exact zeros and it keeps no Adam moments).
  backbone_regex: a parameter whose path (``a/b/c``) matches this is backbone.
  warmup_steps, total_steps (from ``config.total_steps``), end_lr_factor.
  weight_decay: decoupled (AdamW) decay, applied only to matrices (ndim >= 2)
    whose path does not match ``no_decay_regex`` (position embeddings, the CLS
    token, norms and biases are not decayed: standard ViT practice).
  b1, b2, eps: Adam's moments.
  grad_clip_norm: global-norm clipping of the whole gradient (0 disables).
  token_table_update: ``"sparse"`` (default) or ``"dense"``, how the token
    table (``params["token_embedding"]``, [V, D]) is updated; see below.

The token table. A step scores each example on Q candidate rows of a table of
V rows, V up to hundreds of thousands. ``"dense"`` treats the table as any
other parameter: its gradient is a dense [V, D] array (mostly zeros), and
clipping, AdamW and the non-finite guard sweep the table and both moments every
step, so the step grows with V (benchmarks/vocab_scaling.py measured 5.6x at
V = 500k vs 1k). ``"sparse"`` (the trainer's default) is *lazy* AdamW
(TF-Addons LazyAdam, PyTorch SparseAdam): the step gathers the unique candidate
rows, differentiates with respect to those rows only, clips with the global
norm of the whole gradient (the rows' part included, so clipping is the same
as dense), and applies AdamW to the gathered rows and their gathered moments
(`make_table_optimizer`: ``optax.adamw`` with the head's hyper-parameters and
schedule), scattering rows and moments back into the (donated) table. The rows
a step touches get exactly the dense update. The rows it does not touch are
left as they are: unlike dense AdamW they do not coast on their momentum,
their moments do not decay, and weight decay (when the table decays; the
default ``no_decay_regex`` excludes it) does not shrink them. The bias
correction and the learning rate follow the count of applied steps, as in
dense AdamW.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def backbone_labels(params, backbone_regex: str):
  """A pytree of "backbone" / "head" labels, the structure of `params`."""
  pattern = re.compile(backbone_regex)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "backbone" if pattern.search(_path_str(p)) else "head", params)


def decay_mask(params, no_decay_regex: str):
  """True where AdamW's decoupled weight decay applies."""
  pattern = re.compile(no_decay_regex) if no_decay_regex else None
  def decays(path, x):
    if getattr(x, "ndim", 0) < 2:
      return False
    return not (pattern and pattern.search(_path_str(path)))
  return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(opt_config, total_steps: int, multiplier: float = 1.0):
  """Linear warmup from 0 to the peak, then cosine decay to end_lr_factor * peak."""
  peak = opt_config.learning_rate * multiplier
  warmup = min(int(opt_config.warmup_steps), max(int(total_steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(int(total_steps), warmup + 1),
      end_value=peak * opt_config.end_lr_factor)


TABLE = "token_embedding"  # = models.omnidet.TOKEN_TABLE (no model import here).
TABLE_UPDATES = ("sparse", "dense")


def table_update(opt_config) -> str:
  """``opt_config.token_table_update``, checked (default ``"sparse"``)."""
  mode = opt_config.get("token_table_update", "sparse")
  if mode not in TABLE_UPDATES:
    raise ValueError(f"optimizer.token_table_update={mode!r}; use one of "
                     f"{TABLE_UPDATES}.")
  return mode


def split_table(params):
  """``params -> (the other parameters, the token table)``."""
  rest = {k: v for k, v in params.items() if k != TABLE}
  return rest, params[TABLE]


def clip_by_norm(tree, g_norm, max_norm: float):
  """`optax.clip_by_global_norm`'s arithmetic with a norm computed outside.

  The sparse step's gradient is held in two parts (the table's rows and the
  rest); its global norm covers both, and each leaf is clipped with the very
  ops optax uses, so the sparse and the dense step clip alike. ``max_norm``
  <= 0 returns `tree` unchanged.
  """
  if not max_norm or max_norm <= 0:
    return tree
  trigger = jnp.squeeze(g_norm < max_norm)
  return jax.tree.map(
      lambda t: jax.lax.select(trigger, t,
                               (t / g_norm.astype(t.dtype)) * max_norm), tree)


def make_table_optimizer(opt_config, total_steps: int):
  """AdamW of the token table alone, for the sparse update.

  The same hyper-parameters and schedule as the head's AdamW in
  `make_optimizer`, with weight decay where `decay_mask` would put it, and no
  clipping (the train step clips with the global norm). Its state has the
  table's shape (`optax.tree_map_params` finds the moments to gather rows of).
  """
  decays = bool(decay_mask({TABLE: jax.ShapeDtypeStruct((2, 2), "float32")},
                           opt_config.no_decay_regex)[TABLE])
  return optax.adamw(make_schedule(opt_config, total_steps),
                     b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                     weight_decay=opt_config.weight_decay if decays else 0.0)


def make_optimizer(opt_config, total_steps: int, params, *,
                   clip: bool = True):
  """Builds the optax transformation and the head's schedule (for logging).

  Args:
    opt_config: ``config.optimizer`` (see the module docstring).
    total_steps: the run's length, for the cosine decay.
    params: the parameter pytree (abstract `jax.ShapeDtypeStruct`s are fine);
      only its structure and shapes are read, to build labels and masks. With
      the sparse table update, the parameters without the table.
    clip: include global-norm clipping (the sparse step clips itself).

  Returns:
    ``(tx, schedule)``.
  """
  if opt_config.learning_rate <= 0:
    raise ValueError(f"optimizer.learning_rate must be > 0, got "
                     f"{opt_config.learning_rate}.")
  labels = backbone_labels(params, opt_config.backbone_regex)
  if "backbone" not in jax.tree_util.tree_leaves(labels):
    raise ValueError(
        f"optimizer.backbone_regex={opt_config.backbone_regex!r} matches no "
        "parameter; fix the regex (parameter paths look like "
        f"{_path_str(jax.tree_util.tree_flatten_with_path(params)[0][0][0])!r}).")
  # A callable, not a tree: multi_transform hands each inner optimizer a tree
  # whose other-label leaves are replaced by empty `MaskedNode`s.
  mask = lambda p: decay_mask(p, opt_config.no_decay_regex)  # pylint: disable=unnecessary-lambda-assignment

  def adamw(schedule):
    return optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2,
                       eps=opt_config.eps, weight_decay=opt_config.weight_decay,
                       mask=mask)

  head_schedule = make_schedule(opt_config, total_steps)
  mult = float(opt_config.backbone_lr_multiplier)
  backbone_tx = (optax.set_to_zero() if mult == 0.0 else
                 adamw(make_schedule(opt_config, total_steps, mult)))
  parts = []
  if clip and opt_config.grad_clip_norm and opt_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  parts.append(optax.multi_transform(
      {"backbone": backbone_tx, "head": adamw(head_schedule)}, labels))
  return optax.chain(*parts), head_schedule
