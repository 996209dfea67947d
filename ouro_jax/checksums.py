"""Checksums of arrays: `fingerprint` (one uint32 per array, computed on device, never gathering a sharded
array), saved beside training checkpoints and params checkpoints and checked when they are read back, so
flipped bytes never load silently (orbax stores no checksums)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """sum(bits_i * (2 i + 1)) mod 2^32 over the flat index i: any single flipped bit changes it.
    The index comes from iotas, so a sharded array is never gathered."""
    x = jnp.asarray(x)
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[
        x.dtype.itemsize]).astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for axis, size in enumerate(bits.shape):
        index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


_fingerprints = jax.jit(lambda leaves: [_leaf_fingerprint(x) for x in leaves])


def path_name(path) -> str:
    parts = [str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path]
    return "/".join(parts)


def fingerprint(tree: Any) -> dict[str, int]:
    """{array path: uint32 fingerprint} of every array in `tree` (one small device program)."""
    keys, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0]) if jax.tree.leaves(tree) else ((), ())
    values = jax.device_get(_fingerprints(list(leaves)))
    return {path_name(k): int(v) for k, v in zip(keys, values)}
