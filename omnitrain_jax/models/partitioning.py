"""Logical axis names used by the model and rules mapping them to a mesh.

Model code names the axes of every parameter and of the activations that
matter for sharding; a *rules* list maps those logical names to the axes of a
`jax.sharding.Mesh` (this project's meshes have axes ``("data", "model")``).
The model never names a mesh axis itself, so one model definition serves pure
data parallelism, FSDP and tensor parallelism by changing the rules only (the
flax ``examples/lm1b`` / t5x convention).

Logical axis vocabulary:

============  ================================================================
name          meaning
============  ================================================================
batch         examples (activations only)
length        tokens of the ViT sequence / position-embedding rows
embed         the residual stream width (ViT ``width``) and the class-
              embedding dimension D of the token table
mlp           hidden units of MLPs (ViT MLP, box-head hidden layers)
heads         attention heads
kv            per-head feature dimension
vocab         rows of the token embedding table
class_embed   output dimension of the class-embedding projection (D)
candidates    the Q candidate tokens of an example (activations only)
box           the 4 box coordinates (box head output)
conv_h/w/in   patch-embedding kernel height, width, input channels
conv_out      output channels of the conv stem's 3x3 layers (not sharded)
============  ================================================================

Rules are tried in order and a mesh axis is used at most once per array
(`flax.linen.logical_to_mesh_axes`), so ``batch`` must come before ``embed`` in
the FSDP rules: an activation ``("batch", "length", "embed")`` then shards its
batch over ``data`` and leaves ``embed`` whole, while a parameter
``("embed", "mlp")`` (no batch axis) shards ``embed`` over ``data``.
A logical name missing from the rules means "replicated".

Activation constraints (`nn.with_logical_constraint` in the model) take effect
only while tracing under both a mesh and rules -- `activation_sharding(mesh,
rules)` -- and are no-ops otherwise (single device, tests).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax

LogicalRules = Sequence[tuple[str, Any]]

# Data parallel over "data" + tensor parallel (Megatron style) over "model":
# MLP hidden units, attention heads and the vocabulary are split over "model";
# the residual stream is replicated. With a mesh of shape (n, 1) this is plain
# data parallelism.
DEFAULT_LOGICAL_RULES: LogicalRules = (
    ("batch", "data"),
    ("length", None),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
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
FSDP_LOGICAL_RULES: LogicalRules = tuple(
    ("embed", "data") if name == "embed" else (name, axis)
    for name, axis in DEFAULT_LOGICAL_RULES)

RULES = {"default": DEFAULT_LOGICAL_RULES, "fsdp": FSDP_LOGICAL_RULES}


def get_rules(name: str) -> LogicalRules:
  """Returns the named rules list ("default" or "fsdp")."""
  if name not in RULES:
    raise ValueError(
        f"Unknown logical rules {name!r}; choose one of {sorted(RULES)}.")
  return RULES[name]


def logical_partition_specs(boxed_tree: Any) -> Any:
  """The logical PartitionSpec of every leaf of a tree of boxed variables.

  Args:
    boxed_tree: variables as returned by `Module.init` (or `jax.eval_shape` of
      it), whose leaves are `nn.LogicallyPartitioned` boxes.

  Returns:
    A tree of `PartitionSpec`s of logical names (a leaf that is not boxed
    gives an empty spec, i.e. replicated).
  """
  return nn.get_partition_spec(boxed_tree)


def mesh_shardings(boxed_tree: Any, mesh: jax.sharding.Mesh,
                   rules: LogicalRules = DEFAULT_LOGICAL_RULES) -> Any:
  """`NamedSharding`s for a tree of boxed variables, for `jax.jit` out_shardings.

  Typical use (abstract state -> shardings -> jitted init)::

    abstract = jax.eval_shape(model.init, rngs, images, candidates, train=False)
    shardings = mesh_shardings(abstract, mesh, FSDP_LOGICAL_RULES)
    variables = jax.jit(init_fn, out_shardings=shardings)(rngs)

  The returned tree has the structure of the *unboxed* variables (the
  `nn.meta.unbox` of `boxed_tree`), which is what `jax.jit` sees when the init
  function unboxes its output.

  Args:
    boxed_tree: variables with `nn.LogicallyPartitioned` leaves.
    mesh: the device mesh.
    rules: logical-to-mesh rules.

  Returns:
    A tree of `jax.sharding.NamedSharding`.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh,
                        rules: LogicalRules = DEFAULT_LOGICAL_RULES
                        ) -> Iterator[None]:
  """Context in which the model's logical activation constraints apply.

  Trace (call or first-call) the jitted step inside it::

    with activation_sharding(mesh, rules):
      state, metrics = train_step(state, batch)

  Args:
    mesh: the device mesh (axis types Auto, e.g. `jax.sharding.Mesh`).
    rules: the same logical rules used for the parameter shardings.

  Yields:
    Nothing; sets the global mesh and flax's logical axis rules.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
