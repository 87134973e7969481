"""The device mesh, the logical-axis rules, and jitting inside them.

One mesh with two axes, ``data`` and ``model`` (``config.mesh``). Model code
names *logical* axes (`omnitrain_jax.models.axes`: ``batch``, ``embed``,
``mlp``, ``heads``, ``vocab``, ...); ``config.logical_rules`` maps them to
mesh axes -- a list of ``(logical, mesh axis or None)`` pairs, as flax's lm1b
config does, or the name of a preset (``"default"``, ``"fsdp"``) -- so the
same model runs data-parallel, tensor-parallel over ``model``, or FSDP
(parameters' ``embed`` axis sharded over ``data``) by changing the config
only.

Rules are tried in order and a mesh axis is used at most once per array
(`flax.linen.logical_to_mesh_axes`), so ``batch`` must come before ``embed`` in
the FSDP rules: an activation ``("batch", "length", "embed")`` then shards its
batch over ``data`` and leaves ``embed`` whole, while a parameter
``("embed", "mlp")`` (no batch axis) shards ``embed`` over ``data``. A logical
name missing from the rules means "replicated".

The model's activation constraints take effect only while a function traces
under both a mesh and the rules (`activation_sharding`); `jit_in_mesh` is the
one wrapper that calls a jitted function so (the trainer's step, evaluation,
prediction).

We build ``jax.sharding.Mesh`` (Auto axis types: the compiler propagates
shardings from the jit boundary and the logical constraints), not
``jax.make_mesh``, which in jax 0.10 defaults to Explicit axis types.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from omnitrain_jax.models import axes

DATA, MODEL = "data", "model"

LogicalRules = tuple[tuple[str, Any], ...]

# Data parallel over "data" + tensor parallel (Megatron style) over "model":
# MLP hidden units, attention heads and the vocabulary are split over "model";
# the residual stream is replicated. With a mesh of shape (n, 1) this is plain
# data parallelism.
DEFAULT_RULES: LogicalRules = (
    ("batch", DATA),
    ("length", None),
    ("embed", None),
    ("mlp", MODEL),
    ("heads", MODEL),
    ("kv", None),
    ("vocab", MODEL),
    ("class_embed", None),
    ("candidates", None),
    ("box", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", None),
)

# As DEFAULT plus FSDP/ZeRO-3: every parameter with an ``embed`` axis (all the
# large ones) is also sharded over "data", so parameters and optimizer state
# take 1/(data*model) of the memory per device. XLA all-gathers a weight right
# before its use. Activations keep ``batch`` on "data" (rule order, above).
FSDP_RULES: LogicalRules = tuple(
    ("embed", DATA) if name == "embed" else (name, axis)
    for name, axis in DEFAULT_RULES)

PRESETS = {"default": DEFAULT_RULES, "fsdp": FSDP_RULES}


# ----------------------------------------------------------------------------
# Rules.


def rules_from_config(value: str | Sequence[Sequence[Any]]) -> LogicalRules:
  """``config.logical_rules`` -> a tuple of ``(logical, mesh axis)`` pairs.

  Args:
    value: a preset name (`PRESETS`) or a list of pairs; a mesh axis is
      ``"data"``, ``"model"``, a list of them, or None (replicated).

  Returns:
    The validated rules.
  """
  if isinstance(value, str):
    if value not in PRESETS:
      raise ValueError(f"Unknown logical rules {value!r}; choose one of "
                       f"{sorted(PRESETS)} or give a list of (logical, mesh "
                       "axis) pairs.")
    return PRESETS[value]
  rules = []
  for pair in value:
    if isinstance(pair, str) or len(pair) != 2:
      raise ValueError(f"config.logical_rules entry {pair!r} must be a "
                       "(logical axis, mesh axis or None) pair.")
    name, axis = pair
    if name not in axes.LOGICAL_AXES:
      raise ValueError(f"config.logical_rules names {name!r}, not a logical "
                       f"axis of the model; those are {axes.LOGICAL_AXES}.")
    mesh_axes = axis if isinstance(axis, (list, tuple)) else (axis,)
    for a in mesh_axes:
      if a not in (DATA, MODEL, None):
        raise ValueError(f"config.logical_rules maps {name!r} to {a!r}; mesh "
                         f"axes are {DATA!r} and {MODEL!r} (or None).")
    rules.append((str(name), tuple(axis) if isinstance(axis, list) else axis))
  return tuple(rules)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
  """Context in which the model's logical activation constraints apply.

  Trace (call or first-call) a jitted function inside it; `jit_in_mesh` does
  this for you. (`jax.set_mesh` cannot be entered inside a jitted function.)

  Args:
    mesh: the device mesh (axis types Auto, e.g. `make_mesh`).
    rules: the same logical rules used for the parameter shardings.

  Yields:
    Nothing; sets the global mesh and flax's logical axis rules.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def jit_in_mesh(fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules,
                **jit_kwargs) -> Callable[..., Any]:
  """`jax.jit(fn, **jit_kwargs)`, called inside the mesh and the rules.

  Args:
    fn: the function to jit.
    mesh: the device mesh.
    rules: logical axis rules.
    **jit_kwargs: `jax.jit` arguments (shardings, donation, static args).

  Returns:
    A callable with `fn`'s signature.
  """
  jitted = jax.jit(fn, **jit_kwargs)
  rules = tuple(map(tuple, rules))

  @functools.wraps(jitted)  # `call.__wrapped__` is the jitted function.
  def call(*args, **kwargs):
    with activation_sharding(mesh, rules):
      return jitted(*args, **kwargs)

  return call


def logical_shardings(logical_specs: Any, mesh: Mesh,
                      rules: LogicalRules) -> Any:
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh,
                                     tuple(map(tuple, rules)))


# ----------------------------------------------------------------------------
# The mesh and the batch.


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A ``(data, model)`` mesh over all devices.

  Args:
    mesh_config: has ``data`` and ``model`` sizes; one of them may be -1,
      meaning "all remaining devices".
    devices: defaults to ``jax.devices()``.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  data, model = int(mesh_config.data), int(mesh_config.model)
  if data == -1 and model == -1:
    raise ValueError("config.mesh: at most one of data/model may be -1.")
  if data == -1:
    data = n // max(model, 1)
  if model == -1:
    model = n // max(data, 1)
  if data * model != n:
    raise ValueError(
        f"config.mesh data={mesh_config.data} x model={mesh_config.model} does "
        f"not cover the {n} devices ({jax.devices()[0].platform}); set "
        f"config.mesh.data=-1 to use all remaining devices.")
  try:
    # Physical-topology-aware order on TPU/GPU; a plain reshape elsewhere.
    grid = mesh_utils.create_device_mesh((data, model), devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(data, model)
  return Mesh(grid, (DATA, MODEL))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``, the rest replicated."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size"
                     ) -> None:
  """The global batch must split evenly over data-parallel devices and hosts.

  Args:
    global_batch: the global batch size.
    mesh: the device mesh.
    what: the config field that sets it, for the error message.
  """
  data = mesh.shape[DATA]
  if global_batch % data:
    raise ValueError(
        f"Global batch size {global_batch} must be divisible by the {data} "
        f"data-parallel devices (mesh {dict(mesh.shape)}); change {what} "
        "or config.mesh.")
  if global_batch % jax.process_count():
    raise ValueError(
        f"Global batch size {global_batch} must be divisible by the "
        f"{jax.process_count()} processes; change {what}.")


def host_to_global(local_batch: dict[str, np.ndarray], mesh: Mesh
                   ) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays.

  Every process passes its own ``global_batch / process_count`` examples; the
  result is one global `jax.Array` per key, split over ``data``.
  """
  sharding = batch_sharding(mesh)
  nproc = jax.process_count()

  def put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * nproc,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, local_batch)
