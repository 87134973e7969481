"""Bipartite matching of predictions to targets (Hungarian, exact, jit-able)."""

from omnitrain_jax.matching.assignment import assignment_matrix
from omnitrain_jax.matching.hungarian import linear_sum_assignment
from omnitrain_jax.matching.hungarian import sharded_linear_sum_assignment

__all__ = ["assignment_matrix", "linear_sum_assignment",
           "sharded_linear_sum_assignment"]
