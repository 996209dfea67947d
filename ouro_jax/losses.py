"""Training objectives (SPEC sections 3-4): Stage I, the last step, Stage II.

All losses take per-step tensors with the recurrent-step axis first, `[T, B, S]`, and compute in
float32; the per-step cross-entropy itself is an op (`kernels.linear_cross_entropy`) the model runs
inside its loop to produce `step_ce`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ouro_jax import validate
from ouro_jax.exit import exit_log_pdf

# ---- Stage I: entropy-regularized expected cross-entropy (SPEC 3) -------------------------------

def stage1_token_loss(step_ce: jax.Array, gate_logits: jax.Array, beta: float | jax.Array) -> jax.Array:
    """sum_t p(t) CE_t - beta H(p) per token, [B, S]; step_ce and gate_logits are [T, B, S].

    Gradients reach the LM through every CE_t (weighted by p) and the gate through p.
    """
    log_p = exit_log_pdf(gate_logits)
    p = jnp.exp(log_p)
    expected_ce = jnp.sum(p * step_ce.astype(jnp.float32), axis=0)
    entropy = -jnp.sum(p * log_p, axis=0)
    return expected_ce - beta * entropy


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` [..., B, S] over the tokens where `mask` [B, S] is nonzero (0 if none)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask, axis=(-2, -1)) / jnp.maximum(jnp.sum(mask), 1.0)


def stage1_loss(step_ce: jax.Array, gate_logits: jax.Array, loss_mask: jax.Array,
                beta: float | jax.Array) -> jax.Array:
    """Stage I objective: the mean of `stage1_token_loss` over valid tokens."""
    return masked_mean(stage1_token_loss(step_ce, gate_logits, beta), loss_mask)


# ---- the plain looped LM: the last step only ----------------------------------------------------

def last_step_token_loss(step_ce: jax.Array) -> jax.Array:
    """CE_T per token, [B, S]: the looped LM without exits (the paper's synthetic runs, dense
    baselines); no gate term, no entropy, so the exit gate gets no gradient."""
    return step_ce[-1].astype(jnp.float32)


# ---- Stage II: focused gate training (SPEC 4) ---------------------------------------------------

def gate_continue_labels(step_ce: jax.Array, k: float = 50.0, gamma: float = 0.005) -> jax.Array:
    """w_t = sigmoid(k (max(0, CE_{t-1} - CE_t) - gamma)) for t = 2..T, [T-1, B, S], detached."""
    ce = jax.lax.stop_gradient(step_ce.astype(jnp.float32))
    improvement = jnp.maximum(ce[:-1] - ce[1:], 0.0)
    return jax.nn.sigmoid(k * (improvement - gamma))


def stage2_token_loss(step_ce: jax.Array, gate_logits: jax.Array, k: float = 50.0,
                      gamma: float = 0.005) -> jax.Array:
    """(1/T) sum_{t>=2} BCE(w_t, 1 - lambda_t) per token, [B, S]; lambda_1 gets no signal.

    BCE = -[w log(1 - lambda) + (1 - w) log lambda], with log(1 - lambda_t) = log_sigmoid(-z_t).
    """
    num_steps = gate_logits.shape[0]
    w = gate_continue_labels(step_ce, k, gamma)
    z = gate_logits[1:].astype(jnp.float32)
    bce = -(w * jax.nn.log_sigmoid(-z) + (1.0 - w) * jax.nn.log_sigmoid(z))
    return jnp.sum(bce, axis=0) / num_steps


def stage2_loss(step_ce: jax.Array, gate_logits: jax.Array, loss_mask: jax.Array, k: float = 50.0,
                gamma: float = 0.005) -> jax.Array:
    """Stage II gate objective: the mean of `stage2_token_loss` over valid tokens."""
    return masked_mean(stage2_token_loss(step_ce, gate_logits, k, gamma), loss_mask)


# ---- the choice of objective (`config.loss.objective`) ------------------------------------------

OBJECTIVES = validate.OBJECTIVES


def objective_token_loss(objective: str, step_ce: jax.Array, gate_logits: jax.Array, *, beta: float | jax.Array,
                         gate_k: float, gate_gamma: float) -> jax.Array:
    """Per-token loss [B, S] of one of OBJECTIVES: "stage1" (sum_t p(t) CE_t - beta H(p)), "last_step"
    (CE_T) or "stage2" (the gate's BCE toward its continue labels)."""
    if objective == "stage1":
        return stage1_token_loss(step_ce, gate_logits, beta)
    if objective == "last_step":
        return last_step_token_loss(step_ce)
    if objective == "stage2":
        return stage2_token_loss(step_ce, gate_logits, gate_k, gate_gamma)
    raise validate.objective(objective)  # an unknown objective raises ConfigError here
