"""Decoding one token per row over the cache: its recurrent steps (early exit or exact selection) and
one generated position of a left-padded batch."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from ouro_jax.inference import stream as streaming
from ouro_jax.inference.cache import KVCache, step_view, write_step
from ouro_jax.inference.sampling import sample_tokens
from ouro_jax.inference.settings import Inputs, Setup, apply_model, exit_reached, is_stop
from ouro_jax.model import Ouro


class StepState(NamedTuple):
    """The loop state over one token's recurrent steps."""

    step: jax.Array       # [] int32
    h: jax.Array          # [B, S, d] running hidden state
    h_out: jax.Array      # [B, S, d] hidden state of the exit step (frozen once a row has exited)
    exited: jax.Array     # [B, S] bool
    exit_step: jax.Array  # [B, S] int32, 0-based
    gates: jax.Array      # [D, B, S] float32 gate logits so far
    cache: KVCache


class TokenState(NamedTuple):
    """The loop state over generated positions."""

    i: jax.Array             # [] int32: tokens emitted per row so far
    done: jax.Array          # [B] bool
    token: jax.Array         # [B] int32: the last emitted token, fed next
    cache: KVCache
    tokens: jax.Array        # [B, G'] int32
    depths: jax.Array        # [B, G'] int32
    logits: jax.Array | None  # [B, G', V] float32 when return_logits
    decode_steps: jax.Array  # [] int32
    rounds: jax.Array        # [] int32 speculative rounds
    drafted: jax.Array       # [B] int32 draft tokens proposed to each row
    accepted: jax.Array      # [B] int32 of those, accepted by the row's own verification


def run_steps(setup: Setup, params, cache: KVCache, h: jax.Array, positions: jax.Array, mask: jax.Array,
              index: jax.Array, live: jax.Array, threshold: jax.Array, depth: int,
              exit_mode: str) -> tuple[StepState, jax.Array]:
    """Recurrent steps of one fed token per row (h [B, 1, d], mask [B, 1, 1, L]) at cache `index`.

    `early` stops when every live row has exited; `select` runs all `depth` steps and keeps the
    exit step's hidden state. Returns the final state and the number of steps run.
    """
    batch = h.shape[0]

    def running(s: StepState):
        return (s.step < depth) & jnp.any(~s.exited) if exit_mode == "early" else s.step < depth

    def one_step(s: StepState) -> StepState:
        view = step_view(s.cache, setup.policy, s.step)
        h_new, gate, new_kv = apply_model(setup.cfg, params, s.h, positions, mask, kv_cache=view, cache_index=index,
                                          method=Ouro.step)
        gates = s.gates.at[s.step].set(gate)
        reached = exit_reached(gates, s.step, depth, threshold)
        active = ~s.exited                                 # rows still selecting their exit step
        writing = active[:, 0] if exit_mode == "early" else live
        cache = write_step(s.cache, setup.policy, new_kv, index, s.step, writing)
        h_out = jnp.where(active[..., None], h_new, s.h_out)
        h = h_out if exit_mode == "early" else h_new
        exit_step = jnp.where(active, s.step, s.exit_step)
        return StepState(s.step + 1, h, h_out, s.exited | reached, exit_step, gates, cache)

    exited = jnp.broadcast_to(~live[:, None], h.shape[:2])
    init = StepState(jnp.int32(0), h, h, exited, jnp.zeros(h.shape[:2], jnp.int32),
                     jnp.zeros((depth, batch, h.shape[1]), jnp.float32), cache)
    final = jax.lax.while_loop(running, one_step, init)
    return final, final.step


def decode_one_token(setup: Setup, params, inputs: Inputs, cache: KVCache, token: jax.Array, i: jax.Array,
                     live: jax.Array, depth: int, exit_mode: str, threshold: jax.Array):
    """Feeds `token` [B] (the i-th generated, i >= 1) -> (logits [B, V], exit step [B], steps run, cache)."""
    bucket = inputs.prompt_ids.shape[1]
    index = bucket + i - 1                                      # cache position of the token fed now
    slots = jnp.arange(setup.cache_length)
    pad = bucket - inputs.prompt_lengths
    mask = ((slots[None, :] >= pad[:, None]) & (slots[None, :] <= index))[:, None, None, :]
    h = apply_model(setup.cfg, params, token[:, None], method=Ouro.embed)
    final, steps = run_steps(setup, params, cache, h, (inputs.prompt_lengths + i - 1)[:, None], mask, index, live,
                             threshold, depth, exit_mode)
    logits = apply_model(setup.cfg, params, final.h_out[:, 0], method=Ouro.logits)
    return logits, final.exit_step[:, 0], steps, final.cache


def next_token(setup: Setup, params, inputs: Inputs, s: TokenState) -> TokenState:
    """One generated position for every row (no speculation)."""
    live = ~s.done
    logits, exit_step, steps, cache = decode_one_token(setup, params, inputs, s.cache, s.token, s.i, live,
                                                       setup.depth, setup.exit_mode, inputs.exit_threshold)
    key = jax.random.fold_in(jax.random.key(inputs.seed), s.i)
    token = jnp.where(live, sample_tokens(logits, key, inputs.sampling), setup.cfg.pad_token_id)
    if setup.stream:
        io_callback(streaming.emit, None, inputs.stream_id, s.i, token[:, None], live[:, None], 1, ordered=True)
    all_logits = None if s.logits is None else s.logits.at[:, s.i].set(logits)
    done = s.done | is_stop(token, inputs.stop_ids) | (s.i + 1 >= inputs.max_new_tokens)
    return s._replace(i=s.i + 1, done=done, token=token, cache=cache, tokens=s.tokens.at[:, s.i].set(token),
                      depths=s.depths.at[:, s.i].set(jnp.where(live, exit_step + 1, 0)), logits=all_logits,
                      decode_steps=s.decode_steps + steps)
