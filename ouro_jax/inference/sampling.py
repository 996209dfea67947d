"""Next-token sampling: greedy, temperature, top-k, top-p, all traced values (no recompilation)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ouro_jax import validate


class SamplingParams(NamedTuple):
    """temperature 0 = greedy (argmax); top_k 0 = off; top_p 1 = off. Scalars or [] arrays."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> SamplingParams:
        temperature, top_k, top_p = validate.sampling(temperature, top_k, top_p)
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


def token_probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """The distribution `sample_tokens` draws from, float32 [..., V]: one-hot at the argmax when greedy."""
    logits = logits.astype(jnp.float32)
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1])

    def tempered(flat):
        return jax.nn.softmax(filter_logits(flat / params.temperature, params.top_k, params.top_p), axis=-1)

    def one_hot(flat):
        return jax.nn.one_hot(jnp.argmax(flat, axis=-1), shape[-1], dtype=jnp.float32)

    return jax.lax.cond(params.temperature > 0, tempered, one_hot, flat).reshape(shape)


def sample_from_probs(probs: jax.Array, key: jax.Array) -> jax.Array:
    """Token ids [...] drawn from probabilities [..., V] (zeros are never drawn)."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def speculative_accept(draft_tokens: jax.Array, draft_probs: jax.Array, target_probs: jax.Array,
                       key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The rejection rule of speculative sampling: the output is distributed as the target exactly.

    draft_tokens [B, K] were drawn from draft_probs [B, K, V]; target_probs [B, K+1, V] are the
    verifier's distributions at the same positions plus one. Draft j is accepted with probability
    min(1, p(d)/q(d)); at the first rejection the token is drawn from max(0, p - q) normalized, and
    after K acceptances from p itself. Returns (accepted [B], tokens [B, K+1]): tokens[:, :accepted]
    are the accepted drafts and tokens[:, accepted] the drawn one (later entries are meaningless).
    With one-hot distributions (greedy) this accepts exactly the drafts equal to the target's argmax.
    """
    batch, k = draft_tokens.shape
    key_accept, key_fix = jax.random.split(key)
    p_draft = jnp.take_along_axis(target_probs[:, :k], draft_tokens[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(draft_probs, draft_tokens[..., None], axis=-1)[..., 0]
    u = 1.0 - jax.random.uniform(key_accept, (batch, k))                    # (0, 1]: p = 0 never accepts
    accepted = jnp.sum(jnp.cumprod(u * q_draft <= p_draft, axis=1), axis=1).astype(jnp.int32)
    q_padded = jnp.concatenate([draft_probs, jnp.zeros_like(target_probs[:, :1])], axis=1)
    residual = jnp.maximum(target_probs - q_padded, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), target_probs)
    fixes = sample_from_probs(residual, key_fix)                                # [B, K+1]
    drafts = jnp.concatenate([draft_tokens, jnp.zeros_like(draft_tokens[:, :1])], axis=1)
    tokens = jnp.where(jnp.arange(k + 1)[None] < accepted[:, None], drafts, fixes)
    return accepted, tokens
