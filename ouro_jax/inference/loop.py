"""The compiled generation program: prefill, then a `lax.while_loop` over generated positions.

Shapes depend only on (batch, prompt bucket, cache length, depth, policy, exit mode, draft settings):
other prompts in the bucket, `max_new_tokens`, the sampling settings, q and the seed are traced
values and reuse the compiled program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from ouro_jax.inference import stream as streaming
from ouro_jax.inference.decode import TokenState, next_token
from ouro_jax.inference.prefill import prefill
from ouro_jax.inference.sampling import sample_tokens
from ouro_jax.inference.settings import Inputs, Setup, is_stop
from ouro_jax.inference.speculative import next_chunk


@functools.partial(jax.jit, static_argnames=("setup",))
def generate_program(params, inputs: Inputs, *, setup: Setup) -> TokenState:
    """Generates a whole batch; returns the final loop state (its cache only with `return_cache`)."""
    cfg = setup.cfg
    batch, bucket = inputs.prompt_ids.shape
    width = setup.cache_length - bucket + 1 + setup.draft_tokens   # the most tokens this cache can produce (+ a chunk)
    cache, logits, exit_step = prefill(setup, params, inputs)
    token = sample_tokens(logits, jax.random.fold_in(jax.random.key(inputs.seed), 0), inputs.sampling)
    if setup.stream:
        io_callback(streaming.emit, None, inputs.stream_id, 0, token[:, None], jnp.ones((batch, 1), bool), 1,
                    ordered=True)
    state = TokenState(
        i=jnp.int32(1), done=is_stop(token, inputs.stop_ids) | (inputs.max_new_tokens <= 1), token=token,
        cache=cache, tokens=jnp.full((batch, width), cfg.pad_token_id, jnp.int32).at[:, 0].set(token),
        depths=jnp.zeros((batch, width), jnp.int32).at[:, 0].set(exit_step + 1),
        logits=(jnp.zeros((batch, width, cfg.vocab_size), jnp.float32).at[:, 0].set(logits)
                if setup.return_logits else None),
        decode_steps=jnp.int32(0), rounds=jnp.int32(0), drafted=jnp.zeros(batch, jnp.int32),
        accepted=jnp.zeros(batch, jnp.int32))
    body = next_chunk if setup.draft_tokens else next_token
    state = jax.lax.while_loop(lambda s: jnp.any(~s.done), functools.partial(body, setup, params, inputs), state)
    return state._replace(cache=state.cache if setup.return_cache else None, done=None, token=None)
