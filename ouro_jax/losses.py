"""Training objectives (SPEC sections 3-4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_size: int = 1024) -> jax.Array:
    """Per-token cross-entropy [B, S] (float32) of logits = hidden @ head, chunk by chunk over S.

    Each chunk's logits are recomputed in the backward pass (`jax.checkpoint`), so neither the
    forward nor the backward pass holds more than [B, chunk_size, V] logits. Targets outside
    [0, V) (e.g. -1 for "no target") give a finite, meaningless value: mask them out.
    """
    batch, length, width = hidden.shape
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(jnp.clip(targets, 0, head.shape[1] - 1), ((0, 0), (0, pad)))
    hidden = hidden.reshape(batch, num_chunks, chunk, width).swapaxes(0, 1)
    targets = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_ce(args):
        h, t = args
        logits = jnp.einsum("bcd,dv->bcv", h, head, preferred_element_type=jnp.float32)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - target_logit

    ce = jax.lax.map(chunk_ce, (hidden, targets))
    return ce.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]
