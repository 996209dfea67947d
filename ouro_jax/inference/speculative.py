"""Self-speculative decoding: the model at `draft_depth` steps drafts k tokens one at a time, then all
`depth` steps verify the k + 1 fed tokens in one chunked pass over the cache (`Ouro.step` on a chunk
of queries) and write their K/V. The longest agreeing prefix is kept, plus the verifier's own next
token, under the rejection rule of speculative sampling, so the output is that of the `select` mode
(greedy: identical tokens; sampling: the same distribution). Only the `full` policy admits a
parallel verification (see `check_speculative`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from ouro_jax.inference import stream as streaming
from ouro_jax.inference.cache import KVCache, step_view, write_chunk
from ouro_jax.inference.decode import StepState, TokenState, decode_one_token
from ouro_jax.inference.sampling import sample_from_probs, speculative_accept, token_probs
from ouro_jax.inference.settings import Inputs, Setup, apply_model, exit_reached, is_stop
from ouro_jax.model import Ouro


def draft(setup: Setup, params, inputs: Inputs, s: TokenState, key: jax.Array):
    """k tokens drafted at `draft_depth` steps, each fed back -> (tokens [B, k], probs [B, k, V], cache, steps)."""
    live = ~s.done

    def one(j, carry):
        cache, token, tokens, probs, steps = carry
        logits, _, ran, cache = decode_one_token(setup, params, inputs, cache, token, s.i + j, live,
                                                 setup.draft_depth, "early", jnp.float32(1.0))
        p = token_probs(logits, inputs.sampling)
        token = sample_from_probs(p, jax.random.fold_in(key, j))
        return cache, token, tokens.at[:, j].set(token), probs.at[:, j].set(p), steps + ran

    k, (batch, vocab) = setup.draft_tokens, (s.token.shape[0], setup.cfg.vocab_size)
    init = (s.cache, s.token, jnp.zeros((batch, k), jnp.int32), jnp.zeros((batch, k, vocab), jnp.float32),
            jnp.int32(0))
    cache, _, tokens, probs, steps = jax.lax.fori_loop(0, k, one, init)
    return tokens, probs, cache, steps


def verify(setup: Setup, params, inputs: Inputs, cache: KVCache, chunk: jax.Array, i: jax.Array, live: jax.Array):
    """All `depth` steps over the fed chunk [B, k+1] at once, its K/V written into every slot
    -> (logits [B, k+1, V] at each position's exit step, exit steps [B, k+1], cache)."""
    bucket, size = inputs.prompt_ids.shape[1], chunk.shape[1]
    index = bucket + i - 1
    slots = jnp.arange(setup.cache_length)
    pad = bucket - inputs.prompt_lengths
    ends = index + jnp.arange(size)                                      # each query's own position
    mask = (slots[None, None, :] >= pad[:, None, None]) & (slots[None, None, :] <= ends[None, :, None])
    positions = (inputs.prompt_lengths + i - 1)[:, None] + jnp.arange(size)[None]
    h = apply_model(setup.cfg, params, chunk, method=Ouro.embed)

    def one_step(t, s: StepState) -> StepState:
        view = step_view(s.cache, "full", t)
        h_new, gate, new_kv = apply_model(setup.cfg, params, s.h, positions, mask[:, None], kv_cache=view,
                                          cache_index=index, method=Ouro.step)
        gates = s.gates.at[t].set(gate)
        active = ~s.exited
        h_out = jnp.where(active[..., None], h_new, s.h_out)
        return StepState(t + 1, h_new, h_out, s.exited | exit_reached(gates, t, setup.depth, inputs.exit_threshold),
                         jnp.where(active, t, s.exit_step), gates, write_chunk(s.cache, "full", new_kv, index, t))

    init = StepState(jnp.int32(0), h, h, jnp.zeros(chunk.shape, bool), jnp.zeros(chunk.shape, jnp.int32),
                     jnp.zeros((setup.depth, *chunk.shape), jnp.float32), cache)
    final = jax.lax.fori_loop(0, setup.depth, one_step, init)
    return apply_model(setup.cfg, params, final.h_out, method=Ouro.logits), final.exit_step, final.cache


def next_chunk(setup: Setup, params, inputs: Inputs, s: TokenState) -> TokenState:
    """One speculative round: draft k tokens, verify them, emit the accepted prefix + one token per row."""
    k, live = setup.draft_tokens, ~s.done
    key_draft, key_accept = jax.random.split(jax.random.fold_in(jax.random.key(inputs.seed), s.i))
    drafts, draft_probs, cache, draft_steps = draft(setup, params, inputs, s, key_draft)
    chunk = jnp.concatenate([s.token[:, None], drafts], axis=1)
    logits, exit_step, cache = verify(setup, params, inputs, cache, chunk, s.i, live)
    accepted, proposal = speculative_accept(drafts, draft_probs, token_probs(logits, inputs.sampling), key_accept)
    n = jnp.min(jnp.where(live, accepted, k))           # one cache index for the batch: the common prefix

    j = jnp.arange(k + 1)[None]
    valid = live[:, None] & (j <= n) & (s.i + j < inputs.max_new_tokens)
    stops = is_stop(proposal, inputs.stop_ids) & valid
    first_stop = jnp.where(stops.any(axis=1), jnp.argmax(stops, axis=1), k + 1)
    valid = valid & (j <= first_stop[:, None])
    tokens = jnp.where(valid, proposal, setup.cfg.pad_token_id)
    if setup.stream:
        io_callback(streaming.emit, None, inputs.stream_id, s.i, tokens, valid,
                    jnp.minimum(n + 1, inputs.max_new_tokens - s.i), ordered=True)
    count = n + 1
    done = s.done | stops.any(axis=1) | (s.i + count >= inputs.max_new_tokens)
    write = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x, s.i, axis=1)
    all_logits = None if s.logits is None else write(s.logits, logits)
    return s._replace(i=s.i + count, done=done, token=jax.lax.dynamic_index_in_dim(tokens, n, axis=1, keepdims=False),
                      cache=cache, tokens=write(s.tokens, tokens),
                      depths=write(s.depths, jnp.where(valid, exit_step + 1, 0)), logits=all_logits,
                      decode_steps=s.decode_steps + draft_steps + setup.depth, rounds=s.rounds + 1,
                      drafted=s.drafted + k * live, accepted=s.accepted + jnp.where(live, accepted, 0))
