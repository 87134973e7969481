"""The training state and the pure train step (with the NaN/inf guard).

`train_step(state, batch) -> (state, metrics)` is a pure function of arrays (no
I/O); the trainer wraps it in one `jax.jit` with explicit shardings and donates
the state. Non-finite steps are skipped *inside* the step: when the loss or any
gradient is NaN/inf, the parameters and optimizer state are kept unchanged,
``skipped_steps`` counts it, and the metrics say which parameter groups were
non-finite so that the trainer can stop with a message naming them.

The token table has two update rules (``config.optimizer.token_table_update``,
see `optim`): ``"sparse"`` (default) touches only the step's unique candidate
rows -- gathered before the forward pass, differentiated as a [U, D] array,
updated by a lazy AdamW and scattered back -- so that neither the gradient,
the optimizer nor the non-finite guard sweeps the [V, D] table;
``"dense"`` differentiates and updates the whole table as any parameter.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from omnitrain_jax import optim
from omnitrain_jax.losses import omni_loss as omni_loss_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 [], optimizer steps taken (skips included)
  params: Any
  opt_state: Any
  rng: jax.Array             # key data, uint32 [2]; folded with step per step
  skipped_steps: jax.Array   # int32 [], non-finite steps skipped so far
  # The sparse token-table update: the table's AdamW state (moments shaped
  # like the table); None with the dense update (the table is then in
  # `opt_state` with the other parameters).
  table_opt_state: Any = None


def init_variables(rng, model: nn.Module, dummy_batch):
  """``model.init`` on a (small) dummy batch; leaves stay logically boxed."""
  return model.init({"params": rng, "dropout": rng}, dummy_batch["image"],
                    dummy_batch["candidates"], train=False)


def create_train_state(rng, model: nn.Module, tx: optax.GradientTransformation,
                       dummy_batch, table_tx: optax.GradientTransformation
                       | None = None) -> TrainState:
  """Initializes unboxed params and the optimizer state.

  Shapes only depend on the model, so `dummy_batch` can hold one example.
  The logical axes of every leaf come from `state_logical_specs`. With
  `table_tx` (the sparse table update) `tx` covers the parameters without
  the token table and `table_tx` the table.
  """
  init_rng, state_rng = jax.random.split(rng)
  params = nn.unbox(init_variables(init_rng, model, dummy_batch)["params"])
  if table_tx is None:
    opt_state, table_opt_state = tx.init(params), None
  else:
    rest, table = optim.split_table(params)
    opt_state, table_opt_state = tx.init(rest), table_tx.init(table)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=opt_state, rng=jax.random.key_data(state_rng),
                    skipped_steps=jnp.zeros((), jnp.int32),
                    table_opt_state=table_opt_state)


def state_logical_specs(boxed_variables, tx: optax.GradientTransformation,
                        abstract_state: TrainState) -> TrainState:
  """Logical PartitionSpecs for every leaf of the train state.

  Parameters take the axis names the model gave them (`boxed_variables`: the
  abstract output of `init_variables`, boxes kept); optimizer moments take
  their parameter's names (`optax.tree_map_params`); counters are replicated.
  """
  P = jax.sharding.PartitionSpec
  param_specs = nn.get_partition_spec(boxed_variables)["params"]
  # multi_transform (two learning rates) keeps empty `MaskedNode`s where the
  # other label's parameters are; they stay as they are.
  masked = optax.transforms.MaskedNode
  table_opt_specs = None
  opt_param_specs = param_specs
  if abstract_state.table_opt_state is not None:
    opt_param_specs, table_spec = optim.split_table(param_specs)
    table_opt_specs = table_state_map(
        lambda _: table_spec, lambda _: P(), abstract_state.table_opt_state,
        abstract_state.params[optim.TABLE].shape)
  opt_specs = optax.tree_map_params(
      tx, lambda x, spec: x if isinstance(x, masked) else spec,
      abstract_state.opt_state, opt_param_specs,
      transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, (P, masked)))
  return TrainState(step=P(), params=param_specs, opt_state=opt_specs, rng=P(),
                    skipped_steps=P(), table_opt_state=table_opt_specs)


def table_state_map(per_row: Callable[..., Any], other: Callable[..., Any],
                    table_state, table_shape, *more):
  """Maps the table's optimizer state: `per_row` on the leaves shaped like
  the table (Adam's moments), `other` on the rest (counts). `more` are
  trees of the same structure whose leaves are passed along."""
  return jax.tree.map(
      lambda x, *m: per_row(x, *m) if tuple(x.shape) == tuple(table_shape)
      else other(x, *m), table_state, *more)


def _group_finite(tree) -> dict[str, jax.Array]:
  """Per top-level parameter group: are all its values finite?"""
  out = {}
  for name, sub in tree.items():
    leaves = jax.tree.leaves(sub)
    out[name] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
  return out


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               model: nn.Module, tx: optax.GradientTransformation,
               loss_config, schedule: Callable[[jax.Array], jax.Array]):
  """One optimizer step on one global batch (the dense table update).

  Pure; jit it with shardings.
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params):
    outputs = model.apply({"params": params}, batch["image"], batch["candidates"],
                          train=True, rngs={"dropout": rng})
    return omni_loss_lib.omni_loss(outputs, batch, loss_config,
                                   step=state.step)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  group_ok = _group_finite(grads)
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack(list(group_ok.values())))

  def apply_update(_):
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), new_opt_state

  # A cond, not a `jnp.where` over every leaf: the skip costs nothing and the
  # step compiles ~3x faster (benchmarks/train_step.py measured both).
  new_params, new_opt_state = jax.lax.cond(
      finite, apply_update, lambda _: (state.params, state.opt_state), None)
  new_state = state.replace(
      step=state.step + 1, params=new_params, opt_state=new_opt_state,
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
  metrics = _step_metrics(metrics, loss, optax.global_norm(grads), finite,
                          group_ok, schedule(state.step))
  return new_state, metrics


def unique_rows(candidates: jax.Array, vocab_size: int):
  """The step's table rows: ``(ids [U], local [B, Q])``.

  ``ids`` are the unique candidate ids, padding id 0 first, then (when fewer
  than U) 0 again as filler; U = min(1 + B * Q, V) bounds the count
  statically. ``local[b, q]`` is the position of ``candidates[b, q]`` in
  ``ids``, so padding stays 0.
  """
  flat = jnp.concatenate([jnp.zeros((1,), candidates.dtype),
                          candidates.reshape(-1)])
  size = min(flat.shape[0], vocab_size)
  ids, inverse = jnp.unique(flat, size=size, fill_value=0,
                            return_inverse=True)
  local = inverse.reshape(-1)[1:].reshape(candidates.shape)
  return ids, local.astype(candidates.dtype)


def sparse_train_step(state: TrainState, batch: dict[str, jax.Array], *,
                      model: nn.Module, tx: optax.GradientTransformation,
                      table_tx: optax.GradientTransformation, loss_config,
                      schedule: Callable[[jax.Array], jax.Array],
                      clip_norm: float):
  """`train_step` with the sparse (lazy AdamW) token-table update.

  `tx` updates the parameters without the table (no clipping in it); the
  table's rows go through `table_tx` (see `optim.make_table_optimizer`).
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  rest, table = optim.split_table(state.params)
  vocab_size = table.shape[0]
  ids, local = unique_rows(batch["candidates"], vocab_size)
  rows = jnp.take(table, ids, axis=0)  # [U, D]
  # The same model with a table of U rows, applied to batch-local ids: the
  # gradient w.r.t. the rows is [U, D], never [V, D]. The loss reads
  # `batch`'s original ids (box and caption tokens against the candidates).
  row_model = model.clone(vocab_size=ids.shape[0])

  def loss_fn(rest, rows):
    outputs = row_model.apply({"params": {**rest, optim.TABLE: rows}},
                              batch["image"], local, train=True,
                              rngs={"dropout": rng})
    return omni_loss_lib.omni_loss(outputs, batch, loss_config,
                                   step=state.step)

  (loss, metrics), (g_rest, g_rows) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(rest, rows)
  grads = {**g_rest, optim.TABLE: g_rows}
  group_ok = _group_finite(grads)
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack(list(group_ok.values())))
  g_norm = optax.global_norm(grads)
  g_rest, g_rows = optim.clip_by_norm((g_rest, g_rows), g_norm, clip_norm)

  def apply_update(_):
    updates, new_opt_state = tx.update(g_rest, state.opt_state, rest)
    return optax.apply_updates(rest, updates), new_opt_state

  new_rest, new_opt_state = jax.lax.cond(
      finite, apply_update, lambda _: (rest, state.opt_state), None)

  # Lazy AdamW: the rows and their moments are gathered, updated by the
  # table's optax AdamW and written back; the counts advance only when the
  # step is applied. Padding (id 0), the filler and a skipped step write
  # nothing (index V is out of bounds: dropped). [U, D] work, not [V, D].
  shape = table.shape
  row_state = table_state_map(lambda m: jnp.take(m, ids, axis=0),
                              lambda c: c, state.table_opt_state, shape)
  updates, new_row_state = table_tx.update(g_rows, row_state, rows)
  new_rows = optax.apply_updates(rows, updates)
  write = jnp.where((ids > 0) & finite, ids, vocab_size)
  new_table = table.at[write].set(new_rows, mode="drop")
  new_table_opt = table_state_map(
      lambda full, part: full.at[write].set(part, mode="drop"),
      lambda old, new: jnp.where(finite, new, old),
      state.table_opt_state, shape, new_row_state)

  new_state = state.replace(
      step=state.step + 1, params={**new_rest, optim.TABLE: new_table},
      opt_state=new_opt_state, table_opt_state=new_table_opt,
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
  metrics = _step_metrics(metrics, loss, g_norm, finite, group_ok,
                          schedule(state.step))
  metrics["table_rows_updated"] = jnp.sum(ids > 0).astype(jnp.float32)
  return new_state, metrics


def _step_metrics(metrics, loss, g_norm, finite, group_ok, learning_rate):
  metrics = dict(metrics)
  metrics["grad_norm"] = g_norm
  metrics["learning_rate"] = learning_rate
  metrics["nonfinite"] = (~finite).astype(jnp.float32)
  metrics["nonfinite_loss"] = (~jnp.isfinite(loss)).astype(jnp.float32)
  for name, ok in group_ok.items():
    metrics[f"nonfinite_grad/{name}"] = (~ok).astype(jnp.float32)
  return metrics


def make_train_step(model, tx, loss_config, schedule, *, table_tx=None,
                    clip_norm: float = 0.0):
  """The train step: dense, or sparse when `table_tx` is given."""
  if table_tx is None:
    return functools.partial(train_step, model=model, tx=tx,
                             loss_config=loss_config, schedule=schedule)
  return functools.partial(sparse_train_step, model=model, tx=tx,
                           table_tx=table_tx, loss_config=loss_config,
                           schedule=schedule, clip_norm=clip_norm)
