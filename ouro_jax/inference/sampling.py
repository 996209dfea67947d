"""Next-token sampling: greedy, temperature, top-k, top-p, all traced values (no recompilation)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingParams(NamedTuple):
    """temperature 0 = greedy (argmax); top_k 0 = off; top_p 1 = off. Scalars or [] arrays."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> "SamplingParams":
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {top_p}")
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets logits outside the top-k and outside the top-p nucleus to -inf; `logits` [B, V].

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p (the most likely
    token is always kept). Tokens tied with the smallest kept logit are kept too.
    """
    vocab = logits.shape[-1]
    ranked = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)                 # descending
    rank = jnp.arange(vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranked = jnp.where(rank < k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    num_kept = jnp.sum((mass_before < top_p) & (rank < k), axis=-1)        # >= 1: rank 0 has mass_before 0
    smallest_kept = jnp.take_along_axis(ranked, (num_kept - 1)[:, None], axis=-1)
    return jnp.where(logits >= smallest_kept, logits, -jnp.inf)


def sample_tokens(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """Next token ids [B] from float32 logits [B, V]."""
    logits = logits.astype(jnp.float32)

    def sample(logits):
        scaled = logits / params.temperature
        return jax.random.categorical(key, filter_logits(scaled, params.top_k, params.top_p), axis=-1)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1)

    return jax.lax.cond(params.temperature > 0, sample, greedy, logits).astype(jnp.int32)
