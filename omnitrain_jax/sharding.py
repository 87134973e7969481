"""The device mesh and how arrays are laid out on it.

One mesh with two axes, ``data`` and ``model`` (``config.mesh``). Model code
names *logical* axes (``batch``, ``embed``, ``mlp``, ``heads``, ``vocab``...);
``config.logical_axis_rules`` maps them to mesh axes, so the same model runs
data-parallel, tensor-parallel over ``model``, or FSDP (parameters' ``embed``
axis sharded over ``data``) by changing the config only.

We build ``jax.sharding.Mesh`` (Auto axis types: the compiler propagates
shardings from the jit boundary and the logical constraints), not
``jax.make_mesh``, which in jax 0.10 defaults to Explicit axis types.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


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


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  """The global batch must split evenly over data-parallel devices and hosts."""
  data = mesh.shape[DATA]
  if global_batch % data:
    raise ValueError(
        f"Global batch size {global_batch} must be divisible by the {data} "
        f"data-parallel devices (mesh {dict(mesh.shape)}); change batch_size "
        "or config.mesh.")
  if global_batch % jax.process_count():
    raise ValueError(
        f"Global batch size {global_batch} must be divisible by the "
        f"{jax.process_count()} processes.")


def host_to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
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


def logical_shardings(logical_specs: Any, mesh: Mesh, rules) -> Any:
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  import flax.linen as nn  # Local: keep this module importable without flax.
  return nn.logical_to_mesh_sharding(logical_specs, mesh, tuple(map(tuple, rules)))
