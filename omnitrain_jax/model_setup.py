"""The one place that turns a config into a model on a mesh.

`create(config, vocab_size=..., spec=...)` builds, in order: the mesh and the
logical rules (`sharding`), the model (`models.omnidet`), the optimizer
(`optim`), the abstract train state (`jax.eval_shape`, nothing allocated), its
shardings from the model's logical axis names, and the jitted init and step.
The trainer, the evaluation and prediction binaries and the benchmarks all
start here; it takes the vocabulary size and the batch spec, not a dataset,
so evaluation and prediction need no training data.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from omnitrain_jax import optim
from omnitrain_jax import sharding
from omnitrain_jax import train_step as train_step_lib
from omnitrain_jax.data import schema
from omnitrain_jax.losses import omni_loss as omni_loss_lib
from omnitrain_jax.models import omnidet


def build_model(config: ml_collections.ConfigDict, vocab_size: int
                ) -> omnidet.OmniDet:
  """``config.model`` with the vocabulary's size -> the `OmniDet` module."""
  model_config = config.model.to_dict()
  model_config["vocab_size"] = vocab_size
  return omnidet.OmniDet.from_config(model_config)


def loss_config(config: ml_collections.ConfigDict) -> omni_loss_lib.LossConfig:
  return omni_loss_lib.LossConfig.from_config(config.loss)


def dummy_batch(spec: schema.Spec) -> dict[str, np.ndarray]:
  """One all-zero example with the batch schema (init needs only shapes)."""
  return {k: np.zeros(shape, dtype) for k, (shape, dtype)
          in schema.batch_shapes(spec, 1).items()}


@dataclasses.dataclass(frozen=True)
class ModelSetup:
  """A model on a mesh, with its optimizer, shardings and jitted functions.

  Attributes:
    mesh: the ``(data, model)`` device mesh.
    rules: the logical axis rules.
    model: the `OmniDet`.
    tx: the optimizer (with the sparse table update: of the parameters
      without the token table).
    table_tx: the token table's optimizer with the sparse table update
      (`optim.make_table_optimizer`), else None.
    schedule: step -> learning rate.
    state_shardings: `train_step.TrainState` of `NamedSharding`s.
    abstract_state: `TrainState` of `jax.ShapeDtypeStruct`s carrying the
      shardings (restore targets).
    init_fn: jitted ``seed -> TrainState`` (sharded).
    train_step: jitted ``(state, batch) -> (state, metrics)``, the state
      donated.
  """
  mesh: jax.sharding.Mesh
  rules: sharding.LogicalRules
  model: omnidet.OmniDet
  tx: optax.GradientTransformation
  schedule: Callable[[Any], Any]
  state_shardings: Any
  abstract_state: Any
  init_fn: Callable[[int], Any]
  train_step: Callable[..., Any]
  table_tx: optax.GradientTransformation | None = None

  @property
  def param_shardings(self) -> Any:
    return self.state_shardings.params

  def jit(self, fn: Callable[..., Any], **jit_kwargs) -> Callable[..., Any]:
    """`jax.jit` of `fn`, traced in this mesh and these rules."""
    return sharding.jit_in_mesh(fn, self.mesh, self.rules, **jit_kwargs)


def create(config: ml_collections.ConfigDict, *, vocab_size: int,
           spec: schema.Spec, devices=None) -> ModelSetup:
  """Mesh, model, optimizer, shardings and the jitted init / step.

  Args:
    config: the full config (``model``, ``optimizer``, ``loss``, ``mesh``,
      ``logical_rules``, ``batch_size``, ``total_steps``).
    vocab_size: rows of the token table (the vocabulary's size).
    spec: the batch spec (`data.preparation.spec_from_config(config.data)`).
    devices: the devices of the mesh (default: all).

  Returns:
    The `ModelSetup`.
  """
  # ------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(config.batch_size, mesh)
  rules = sharding.rules_from_config(config.logical_rules)
  # ------------------------------------------------------- abstract state
  model = build_model(config, vocab_size)
  dummy = dummy_batch(spec)
  boxed = jax.eval_shape(functools.partial(
      train_step_lib.init_variables, model=model, dummy_batch=dummy),
                         jax.random.key(0))
  abstract_params = nn.unbox(boxed)["params"]
  sparse = optim.table_update(config.optimizer) == "sparse"
  table_tx = None
  if sparse:
    tx, schedule = optim.make_optimizer(
        config.optimizer, config.total_steps,
        optim.split_table(abstract_params)[0], clip=False)
    table_tx = optim.make_table_optimizer(config.optimizer,
                                          config.total_steps)
  else:
    tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps,
                                        abstract_params)
  create_state = functools.partial(train_step_lib.create_train_state,
                                   model=model, tx=tx, dummy_batch=dummy,
                                   table_tx=table_tx)
  abstract_state = jax.eval_shape(create_state, jax.random.key(0))
  # ------------------------------------------------------------ shardings
  specs = train_step_lib.state_logical_specs(boxed, tx, abstract_state)
  state_shardings = sharding.logical_shardings(specs, mesh, rules)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_shardings)
  # ----------------------------------------------------------- jitted fns
  init_fn = sharding.jit_in_mesh(
      lambda seed: create_state(jax.random.key(seed)), mesh, rules,
      out_shardings=state_shardings)
  step_fn = train_step_lib.make_train_step(
      model, tx, loss_config(config), schedule, table_tx=table_tx,
      clip_norm=float(config.optimizer.grad_clip_norm or 0.0))
  train_step = sharding.jit_in_mesh(
      step_fn, mesh, rules,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))
  return ModelSetup(mesh=mesh, rules=rules, model=model, tx=tx,
                    schedule=schedule, state_shardings=state_shardings,
                    abstract_state=abstract_state, init_fn=init_fn,
                    train_step=train_step, table_tx=table_tx)
