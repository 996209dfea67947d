"""Exit distribution of the learned gate and the released selection modes (SPEC section 2).

Every function takes gate logits with the recurrent-step axis first, `[T, ...]`, and computes in
float32. p(t) = lambda_t * prod_{j<t} (1 - lambda_j) for t < T, and the last step takes the rest.
"""

from __future__ import annotations

from numbers import Real

import jax
import jax.numpy as jnp

from ouro_jax import validate


def exit_log_pdf(gate_logits: jax.Array) -> jax.Array:
    """log p(t) for t = 1..T, `[T, ...]`; the last step's gate is never used."""
    z = gate_logits.astype(jnp.float32)
    log_continue = jax.nn.log_sigmoid(-z[:-1])                       # log(1 - lambda_t), t < T
    log_survival = jnp.cumsum(log_continue, axis=0)                  # log S_t, t = 1..T-1
    log_survival_before = jnp.concatenate([jnp.zeros_like(z[:1]), log_survival], axis=0)  # log S_{t-1}
    log_exit_here = jnp.concatenate([jax.nn.log_sigmoid(z[:-1]), jnp.zeros_like(z[:1])], axis=0)
    return log_exit_here + log_survival_before


def exit_pdf(gate_logits: jax.Array) -> jax.Array:
    """p(t), `[T, ...]`, summing to 1 over the step axis."""
    return jnp.exp(exit_log_pdf(gate_logits))


def exit_cdf(gate_logits: jax.Array) -> jax.Array:
    """CDF(n) = 1 - S_n for n < T and exactly 1 at the last step, `[T, ...]`."""
    z = gate_logits.astype(jnp.float32)
    survival = jnp.exp(jnp.cumsum(jax.nn.log_sigmoid(-z[:-1]), axis=0))
    return jnp.concatenate([1.0 - survival, jnp.ones_like(z[:1])], axis=0)


def exit_entropy(gate_logits: jax.Array) -> jax.Array:
    """H(p) = -sum_t p(t) log p(t), `[...]`."""
    log_p = exit_log_pdf(gate_logits)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=0)


def q_exit_step(gate_logits: jax.Array, threshold: float | jax.Array, *, float_cdf: bool = False) -> jax.Array:
    """0-based step of the Q-exit rule: the first t with CDF(t) >= q (the last step if none).

    q = 1.0 means full depth: the last step for every token, as in the inference engine. `float_cdf=True`
    is the released rule as computed: the float32 CDF can round to 1.0 before the last step, so q = 1.0
    may exit early there. A concrete q outside [0, 1] (or NaN) raises ConfigError; a traced q is the
    caller's to check.
    """
    if isinstance(threshold, Real):
        threshold = validate.exit_threshold(threshold)
    reached = exit_cdf(gate_logits) >= threshold
    if not float_cdf:
        reached = reached & (jnp.asarray(threshold) < 1.0)
    reached = reached.at[-1].set(True)
    return jnp.argmax(reached, axis=0).astype(jnp.int32)


def select_logits(step_logits: jax.Array, gate_logits: jax.Array, *, exit_at_step: int | None = None,
                  exit_threshold: float | None = None, use_weighted_exit: bool = False,
                  float_cdf: bool = False) -> jax.Array:
    """Logits `[..., V]` from per-step logits `[T, ..., V]` by the released priority.

    exit_at_step (0-based) > exit_threshold (per-token Q-exit) > use_weighted_exit > last step.
    The released models pass their config's `early_exit_threshold` (1.0) as `exit_threshold`
    unless told otherwise, so there `use_weighted_exit` only acts with `exit_threshold=None`.
    exit_threshold=1.0 is the last step (see `q_exit_step`; `float_cdf=True`: the released float rule).
    """
    num_steps = step_logits.shape[0]
    if exit_at_step is not None:
        return step_logits[validate.exit_step(exit_at_step, num_steps)]
    if exit_threshold is not None:
        step = q_exit_step(gate_logits, exit_threshold, float_cdf=float_cdf)
        return jnp.take_along_axis(step_logits, step[None, ..., None], axis=0)[0]
    if use_weighted_exit:
        weights = exit_pdf(gate_logits)[..., None]
        return jnp.sum(weights * step_logits.astype(jnp.float32), axis=0)
    return step_logits[-1]
