"""The decode step on a fixed set of slots (see `slots`): one token per live slot, per-row early exit."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ouro_jax.inference.cache import KVCache, merge_column, step_view
from ouro_jax.inference.settings import apply_model, exit_reached
from ouro_jax.inference.slots import RowSettings, Sampled, SlotSetup, constrain, sample_row
from ouro_jax.model import Ouro


class SlotBatch(NamedTuple):
    """The host's view of the slots before a decode step, [B] each."""

    tokens: jax.Array     # int32: the token fed now
    positions: jax.Array  # int32: its position (the row's cache length so far)
    live: jax.Array       # bool: the slot holds a request that is decoding


class Work(NamedTuple):
    """What a decode step computed."""

    steps: jax.Array       # [] recurrent steps run (until every live row had exited)
    row_steps: jax.Array   # [] rows run summed over the steps (whole tiles, padding included)
    live_steps: jax.Array  # [] rows that had not exited, summed over the steps (the least possible)


# On one device (or slots not split over devices) the decode step reads and writes the cache a row at a time
# (`by_row`: dynamic slices in a loop), not by gathers and scatters over rows: on TPU those made XLA copy the
# whole cache into another layout (Ouro-2.6B at 64 slots x 4K needed 2.5x its cache in temporaries; see
# README "Serve"). With the slots split over devices a slice at a traced row would gather the whole cache
# onto every device, so there the gathers stay.


def _read_columns(cache: jax.Array, positions: jax.Array, by_row: bool) -> jax.Array:
    """Each row's K/V at its position: [slots, N, B, L, KVH, hd] -> [slots, N, B, KVH, hd]."""
    slots, n, rows, _, heads, dim = cache.shape
    if not by_row:
        return cache[:, :, jnp.arange(rows), positions]

    def one(b, column):
        cell = jax.lax.dynamic_slice(cache, (0, 0, b, positions[b], 0, 0), (slots, n, 1, 1, heads, dim))
        return jax.lax.dynamic_update_slice_in_dim(column, cell[:, :, :, 0], b, axis=2)
    return jax.lax.fori_loop(0, rows, one, jnp.zeros((slots, n, rows, heads, dim), cache.dtype))


def _write_columns(cache: jax.Array, column: jax.Array, positions: jax.Array, by_row: bool) -> jax.Array:
    """`_read_columns` inverted: each row's column written in place at its position."""
    if not by_row:
        return cache.at[:, :, jnp.arange(cache.shape[2]), positions].set(column)

    def one(b, cache):
        cell = jax.lax.dynamic_slice_in_dim(column, b, 1, axis=2)[:, :, :, None]
        return jax.lax.dynamic_update_slice(cache, cell, (0, 0, b, positions[b], 0, 0))
    return jax.lax.fori_loop(0, cache.shape[2], one, cache)


def _take_rows(view: jax.Array, rows: jax.Array, by_row: bool) -> jax.Array:
    """Rows `rows` [m] of a cache view [N, B, L, KVH, hd]."""
    if not by_row:
        return jnp.take(view, rows, axis=1)

    def one(i, out):
        row = jax.lax.dynamic_slice_in_dim(view, rows[i], 1, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(out, row, i, axis=1)
    return jax.lax.fori_loop(0, rows.shape[0], one, jnp.zeros((view.shape[0], rows.shape[0], *view.shape[2:]),
                                                                view.dtype))


def _run_rows(setup: SlotSetup, params, view, h, mask, positions, rows):
    """One recurrent step of slots `rows` [m] on their gathered cache `view` -> (h [m, 1, d], gate [m, 1],
    their K/V [N, m, 1, KVH, hd] each)."""
    view = tuple(_take_rows(x, rows, not setup.rows_sharded) for x in view)
    return apply_model(setup.cfg, params, h[rows], positions[rows][:, None], mask[rows], kv_cache=view,
                       cache_index=setup.cache_length - 1, method=Ouro.step)


def _layer_step(setup: SlotSetup, params, cache: KVCache, column: KVCache, h, mask, positions, active, t):
    """Recurrent step `t` for the rows in `active` [B] -> (column, h [B, 1, d], gate [B], rows computed).

    `column` holds each slot's K/V at its fed position ([slots, N, B, KVH, hd] each), which no step of
    this token reads from the cache (the mask hides it; `Ouro.step` attends to the token's own K/V):
    the step merges into it, and `decode_step` writes it into the cache once, after the last step, so
    the cache is only read in the loops and the compiler needs no copy of it.
    Compacting: the active rows (in slot order) run a tile at a time, in a loop over as many tiles as
    they fill; when that would be every slot, all rows run in place."""
    view = step_view(cache, setup.policy, t)

    def every(h):
        return apply_model(setup.cfg, params, h, positions[:, None], mask, kv_cache=view,
                           cache_index=setup.cache_length - 1, method=Ouro.step)

    size, count = setup.tile, jnp.sum(active).astype(jnp.int32)
    order = jnp.argsort(~active, stable=True).astype(jnp.int32)
    tiles = (count + size - 1) // size

    def tile(k, carry):
        h_new, gate, kv = carry
        rows = jax.lax.dynamic_slice_in_dim(order, k * size, size)
        h_rows, g, kv_rows = _run_rows(setup, params, view, h, mask, positions, rows)
        return (h_new.at[rows].set(h_rows), gate.at[rows].set(g),
                tuple(x.at[:, rows].set(y) for x, y in zip(kv, kv_rows)))

    def compacted(h):
        kv = tuple(jnp.zeros((x.shape[0], setup.slots, 1, *x.shape[3:]), x.dtype) for x in view)
        return jax.lax.fori_loop(0, tiles, tile, (h, jnp.zeros((setup.slots, 1), jnp.float32), kv))

    in_place = (tiles * size >= setup.slots) | (not setup.compact)   # the tiles would cover every slot
    h, gate, kv = every(h) if not setup.compact else jax.lax.cond(in_place, every, compacted, h)
    column = KVCache(*(merge_column(setup.policy, c, new[None, :, :, 0], t, active[None, None, :, None, None])
                       for c, new in zip(column, kv)))
    return column, h, gate[:, 0], jnp.where(in_place, setup.slots, tiles * size).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("setup",), donate_argnames=("cache",))
def decode_step(params, cache: KVCache, batch: SlotBatch, rows: RowSettings, *,
                setup: SlotSetup) -> tuple[KVCache, Sampled, Work]:
    """Feeds one token per live slot and samples the next -> (cache, per-slot `Sampled` [B], work)."""
    cfg, length = setup.cfg, setup.cache_length
    slots = jnp.arange(length)[None]
    mask = ((slots < batch.positions[:, None]) | (slots == length - 1))[:, None, None, :]

    def one_step(s):
        t, h, exited, exit_step, gates, column, row_steps, live_steps = s
        active = ~exited
        column, h_new, gate, computed = _layer_step(setup, params, cache, column, h, mask, batch.positions, active, t)
        gates = gates.at[t].set(gate)
        h = jnp.where(active[:, None, None], h_new, h)
        exit_step = jnp.where(active, t, exit_step)
        exited = exited | exit_reached(gates, t, rows.depth, rows.threshold)
        return (t + 1, h, exited, exit_step, gates, column, row_steps + computed,
                live_steps + jnp.sum(active).astype(jnp.int32))

    h = apply_model(cfg, params, batch.tokens[:, None], method=Ouro.embed)
    zeros = jnp.zeros((setup.slots,), jnp.int32)
    by_row = not setup.rows_sharded
    column = KVCache(*(_read_columns(c, batch.positions, by_row) for c in cache))
    init = (jnp.int32(0), h, ~batch.live, zeros, jnp.zeros((setup.depth, setup.slots), jnp.float32), column,
            jnp.int32(0), jnp.int32(0))
    t, h, _, exit_step, _, column, row_steps, live_steps = jax.lax.while_loop(
        lambda s: (s[0] < setup.depth) & jnp.any(~s[2]), one_step, init)
    cache = KVCache(*(_write_columns(c, col, batch.positions, by_row) for c, col in zip(cache, column)))
    logits = apply_model(cfg, params, h[:, 0], method=Ouro.logits)
    return constrain(setup, cache), jax.vmap(sample_row)(logits, rows, exit_step), Work(t, row_steps, live_steps)
