"""Prefill: every recurrent step over a left-padded prompt batch at once, filling the decode cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ouro_jax.exit import q_exit_step
from ouro_jax.inference.cache import KVCache, init_cache, write_prefill
from ouro_jax.inference.settings import Inputs, Setup, apply_model
from ouro_jax.model import Ouro


def prefill(setup: Setup, params, inputs: Inputs) -> tuple[KVCache, jax.Array, jax.Array]:
    """Every step over the prompt -> (cache, logits [B, V] of the last position's exit step, exit step [B])."""
    cfg, depth = setup.cfg, setup.depth
    batch, bucket = inputs.prompt_ids.shape
    pad = bucket - inputs.prompt_lengths
    prompt_mask = (jnp.arange(bucket)[None, :] >= pad[:, None]).astype(jnp.int32)
    out = apply_model(cfg, params, inputs.prompt_ids, attention_mask=prompt_mask, num_steps=depth, return_kv=True)
    gates = out.gate_logits[:, :, -1]
    exit_step = jnp.where(inputs.exit_threshold < 1.0, q_exit_step(gates, inputs.exit_threshold), depth - 1)
    h_exit = jnp.take_along_axis(out.hidden_states[:, :, -1], exit_step[None, :, None], axis=0)[0]
    logits = apply_model(cfg, params, h_exit, method=Ouro.logits)
    cache = write_prefill(init_cache(cfg, setup.policy, depth, batch, setup.cache_length), setup.policy, out.kv)
    return cache, logits, exit_step
