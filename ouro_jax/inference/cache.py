"""The decode KV cache and its policies (SPEC section 5).

Layout: keys and values `[slots, N, B, L, KVH, hd]`. The `full` policy keeps one slot per recurrent
step (the released layout, index t*N + l flattened); the shared policies keep one slot for all steps:

- `full`:    step t reads and writes slot t.
- `last`:    one slot, overwritten at every executed step: it ends up holding a token's last
             executed step's K/V (the "last exited" rule for rows that stop early).
- `first`:   one slot, written by step 0 only; deeper steps see earlier tokens' step-0 K/V.
- `average`: one slot holding the running mean over the executed steps' K/V.

Prefill always computes every step; it stores all of them (`full`) or their reduction (the last, the
first, the mean). During decode at step t every policy attends to its view of earlier tokens plus the
current token's own step-t K/V, which `Ouro.step` attends to beside the cache and returns.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ouro_jax import validate
from ouro_jax.config import OuroConfig

POLICIES = validate.KV_POLICIES


class KVCache(NamedTuple):
    keys: jax.Array    # [slots, N, B, L, KVH, hd]
    values: jax.Array  # [slots, N, B, L, KVH, hd]


def check_policy(policy: str) -> str:
    validate.kv_policy(policy)
    return policy


def num_slots(policy: str, depth: int) -> int:
    """Cache slots per layer: one per recurrent step for `full`, one shared slot otherwise."""
    return depth if check_policy(policy) == "full" else 1


def cache_shape(cfg: OuroConfig, policy: str, depth: int, batch: int, length: int) -> tuple[int, ...]:
    return (num_slots(policy, depth), cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)


def cache_bytes(cfg: OuroConfig, policy: str, depth: int, batch: int, length: int) -> int:
    """Bytes of keys plus values of a cache (compute dtype)."""
    size = 1
    for dim in cache_shape(cfg, policy, depth, batch, length):
        size *= dim
    return 2 * size * cfg.compute_dtype.itemsize


def init_cache(cfg: OuroConfig, policy: str, depth: int, batch: int, length: int) -> KVCache:
    shape = cache_shape(cfg, policy, depth, batch, length)
    return KVCache(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))


def _reduce_steps(policy: str, kv: jax.Array) -> jax.Array:
    """Per-step K/V `[D, N, B, S, KVH, hd]` -> what the policy stores, `[slots, ...]`."""
    if policy == "full":
        return kv
    if policy == "last":
        return kv[-1:]
    if policy == "first":
        return kv[:1]
    return jnp.mean(kv.astype(jnp.float32), axis=0, keepdims=True).astype(kv.dtype)


def write_prefill(cache: KVCache, policy: str, kv: tuple[jax.Array, jax.Array]) -> KVCache:
    """Stores the prompt's per-step K/V (from `Ouro(return_kv=True)`) at cache positions [0, S)."""
    return KVCache(*(jax.lax.dynamic_update_slice_in_dim(c, _reduce_steps(policy, x).astype(c.dtype), 0, axis=3)
                     for c, x in zip(cache, kv)))


def step_view(cache: KVCache, policy: str, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The `(keys, values)` `[N, B, L, KVH, hd]` that recurrent step `step` attends to."""
    slot = step if policy == "full" else 0
    return tuple(jax.lax.dynamic_index_in_dim(c, slot, axis=0, keepdims=False) for c in cache)


def merge_column(policy: str, column: jax.Array, new: jax.Array, step: jax.Array, rows: jax.Array) -> jax.Array:
    """A cache column [slots, N, ...] with a token's step-`step` K/V `new` [1, N, ...] merged in by the
    policy, for the rows where the mask `rows` (broadcast against the column) is True."""
    new = new.astype(column.dtype)
    if policy == "full":
        slots = jnp.arange(column.shape[0]).reshape((-1,) + (1,) * (column.ndim - 1))
        return jnp.where(rows & (slots >= step), new, column)
    if policy == "last":
        return jnp.where(rows, new, column)
    if policy == "first":
        return jnp.where(rows & (step == 0), new, column)
    col32 = column.astype(jnp.float32)  # average: running mean over the executed steps (exact copy at step 0)
    mean = col32 + (new.astype(jnp.float32) - col32) / (step + 1).astype(jnp.float32)
    return jnp.where(rows, jnp.where(step == 0, new, mean.astype(column.dtype)), column)


def write_step(cache: KVCache, policy: str, new_kv: tuple[jax.Array, jax.Array], index: jax.Array,
               step: jax.Array, active: jax.Array) -> KVCache:
    """Merges the current token's step-`step` K/V (`new_kv`, each `[N, B, 1, KVH, hd]` from
    `Ouro.step`) into the persistent cache at position `index`; rows with `active` [B] False are
    left as they are.

    `full` writes slots step..slots-1, so a row that stops after this step leaves its exit step's K/V
    in every deeper slot (a deeper step overwrites its own slot if the row goes on).
    """
    out = []
    for c, new in zip(cache, new_kv):
        column = jax.lax.dynamic_index_in_dim(c, index, axis=3, keepdims=True)   # [slots, N, B, 1, KVH, hd]
        column = merge_column(policy, column, new[None], step, active[None, None, :, None, None, None])
        out.append(jax.lax.dynamic_update_slice_in_dim(c, column, index, axis=3))
    return KVCache(*out)


def write_rows(cache: KVCache, policy: str, new_kv: tuple[jax.Array, jax.Array], rows: jax.Array,
               index: jax.Array, step: jax.Array, active: jax.Array) -> KVCache:
    """`write_step` for cache rows `rows` [m] (distinct), each at its own position `index` [m]:
    `new_kv` each `[N, m, 1, KVH, hd]`; rows with `active` [m] False are left as they are."""
    out = []
    for c, new in zip(cache, new_kv):
        column = c[:, :, rows, index]                                           # [slots, N, m, KVH, hd]
        column = merge_column(policy, column, new[None, :, :, 0], step, active[None, None, :, None, None])
        out.append(c.at[:, :, rows, index].set(column))
    return KVCache(*out)


def write_chunk(cache: KVCache, policy: str, new_kv: tuple[jax.Array, jax.Array], index: jax.Array,
                step: jax.Array) -> KVCache:
    """Stores a chunk's step-`step` K/V (`new_kv`, each `[N, B, S, KVH, hd]`) at positions
    [index, index + S) of slot `step`: the `full` policy's layout, where every step has its own slot
    (speculative verification computes every step of the chunk, so no deeper slot needs a copy)."""
    if policy != "full":
        raise ValueError(f"chunked cache writes need the 'full' policy, got {policy!r}")
    zero = jnp.int32(0)
    return KVCache(*(jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), (step, zero, zero, index, zero, zero))
                     for c, new in zip(cache, new_kv)))
