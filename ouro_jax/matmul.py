"""`dense`: a contraction over a tensor's last axes as one 2-D matmul."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w: jax.Array, contract: int = 1, out_dtype=None) -> jax.Array:
    """x [..., *in] @ w [*in, *out] over the last `contract` axes of x, as one 2-D matmul.

    XLA:CPU runs the backward pass of a 2-D matmul faster than that of the same einsum with more
    axes. The merged axes of `w` keep their first axis major, so a sharded first axis stays sharded.
    """
    lead, size = x.shape[:x.ndim - contract], math.prod(w.shape[:contract])
    out = jnp.matmul(x.reshape(-1, size), w.reshape(size, -1), preferred_element_type=out_dtype)
    return out.reshape(*lead, *w.shape[contract:])
