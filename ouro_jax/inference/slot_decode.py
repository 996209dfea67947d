"""The decode step on a fixed set of slots (see `slots`): one token per live slot, per-row early exit."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ouro_jax.inference.cache import KVCache, step_view, write_rows
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


def _run_rows(setup: SlotSetup, params, cache: KVCache, h, mask, positions, t, rows, valid):
    """Recurrent step `t` for slots `rows` [m] (distinct; only the `valid` ones are written and kept)
    -> (cache, h [B, 1, d], the rows' gates [m])."""
    view = tuple(jnp.take(x, rows, axis=1) for x in step_view(cache, setup.policy, t))
    h_rows, gate, kv = apply_model(setup.cfg, params, h[rows], positions[rows][:, None], mask[rows],
                                   kv_cache=view, cache_index=setup.cache_length - 1, method=Ouro.step)
    cache = write_rows(cache, setup.policy, kv, rows, positions[rows], t, valid)
    h = h.at[rows].set(jnp.where(valid[:, None, None], h_rows, h[rows]))
    return cache, h, gate[:, 0]


def _run_all(setup: SlotSetup, params, cache: KVCache, h, mask, positions, t, active):
    """Recurrent step `t` for every slot in place (no gathered copy of the cache); rows not `active`
    are computed but neither written nor kept."""
    view = step_view(cache, setup.policy, t)
    h_all, gate, kv = apply_model(setup.cfg, params, h, positions[:, None], mask, kv_cache=view,
                                  cache_index=setup.cache_length - 1, method=Ouro.step)
    cache = write_rows(cache, setup.policy, kv, jnp.arange(setup.slots, dtype=jnp.int32), positions, t, active)
    return cache, jnp.where(active[:, None, None], h_all, h), gate[:, 0]


def _layer_step(setup: SlotSetup, params, cache: KVCache, h, mask, positions, active, t):
    """Recurrent step `t` for the rows in `active` [B] -> (cache, h [B, 1, d], gate [B], rows computed).

    Compacting: the active rows (in slot order) run a tile at a time, in a loop over as many tiles as
    they fill; when that would be every slot, all rows run in place."""
    if not setup.compact:
        return (*_run_all(setup, params, cache, h, mask, positions, t, active), jnp.int32(setup.slots))
    size, count = setup.tile, jnp.sum(active).astype(jnp.int32)
    order = jnp.argsort(~active, stable=True).astype(jnp.int32)
    tiles = (count + size - 1) // size

    def tile(k, carry):
        cache, h, gate = carry
        first = k * size
        rows = jax.lax.dynamic_slice_in_dim(order, first, size)
        cache, h, g = _run_rows(setup, params, cache, h, mask, positions, t, rows, first + jnp.arange(size) < count)
        return cache, h, gate.at[rows].set(g)

    def compacted(cache, h):
        return jax.lax.fori_loop(0, tiles, tile, (cache, h, jnp.zeros((setup.slots,), jnp.float32)))

    in_place = tiles * size >= setup.slots          # the tiles would cover every slot
    cache, h, gate = jax.lax.cond(in_place, lambda c, x: _run_all(setup, params, c, x, mask, positions, t, active),
                                  compacted, cache, h)
    return cache, h, gate, jnp.where(in_place, setup.slots, tiles * size).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("setup",), donate_argnames=("cache",))
def decode_step(params, cache: KVCache, batch: SlotBatch, rows: RowSettings, *,
                setup: SlotSetup) -> tuple[KVCache, Sampled, Work]:
    """Feeds one token per live slot and samples the next -> (cache, per-slot `Sampled` [B], work)."""
    cfg, length = setup.cfg, setup.cache_length
    slots = jnp.arange(length)[None]
    mask = ((slots < batch.positions[:, None]) | (slots == length - 1))[:, None, None, :]

    def one_step(s):
        t, h, exited, exit_step, gates, cache, row_steps, live_steps = s
        active = ~exited
        cache, h_new, gate, computed = _layer_step(setup, params, cache, h, mask, batch.positions, active, t)
        gates = gates.at[t].set(gate)
        h = jnp.where(active[:, None, None], h_new, h)
        exit_step = jnp.where(active, t, exit_step)
        exited = exited | exit_reached(gates, t, rows.depth, rows.threshold)
        return (t + 1, h, exited, exit_step, gates, cache, row_steps + computed,
                live_steps + jnp.sum(active).astype(jnp.int32))

    h = apply_model(cfg, params, batch.tokens[:, None], method=Ouro.embed)
    zeros = jnp.zeros((setup.slots,), jnp.int32)
    init = (jnp.int32(0), h, ~batch.live, zeros, jnp.zeros((setup.depth, setup.slots), jnp.float32), cache,
            jnp.int32(0), jnp.int32(0))
    t, h, _, exit_step, _, cache, row_steps, live_steps = jax.lax.while_loop(
        lambda s: (s[0] < setup.depth) & jnp.any(~s[2]), one_step, init)
    logits = apply_model(cfg, params, h[:, 0], method=Ouro.logits)
    return constrain(setup, cache), jax.vmap(sample_row)(logits, rows, exit_step), Work(t, row_steps, live_steps)
