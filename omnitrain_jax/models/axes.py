"""The logical axis names the model gives its parameters and activations.

Model code names the axes of every parameter (`nn.with_logical_partitioning`)
and of the activations that matter for sharding (`nn.with_logical_constraint`)
with the names below, never a mesh axis. `omnitrain_jax.sharding` maps them
onto the mesh with a rules list from the config (``config.logical_rules``),
so one model definition serves pure data parallelism, FSDP and tensor
parallelism (the flax ``examples/lm1b`` / t5x convention).

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
"""

LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "vocab",
                "class_embed", "candidates", "box", "conv_h", "conv_w",
                "conv_in", "conv_out")
