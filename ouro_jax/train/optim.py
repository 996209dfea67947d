"""Optimizer, learning-rate and entropy-weight schedules of training (SPEC 6 recipe).

AdamW with global-norm clipping and no weight decay on norm gains or biases; warmup-stable-decay
learning rates (linear or cosine decay); a schedule for beta, the weight of the exit entropy.
Gradient accumulation happens inside the train step (trainer.py), not here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ouro_jax.errors import ConfigError

DECAY_SHAPES = ("none", "linear", "cosine")
BETA_SCHEDULES = ("constant", "step", "linear")
NO_DECAY_LEAVES = frozenset({"scale", "bias"})  # RMSNorm gains and the exit gate's bias


class OptimConfigError(ConfigError):
    """An inconsistent optimizer or schedule setting."""


MAX_LR = 1.0  # AdamW steps are ~lr per parameter: anything larger destroys the weights in one update


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise OptimConfigError(f"optim.{name} must be a number, got {value!r}") from None
    too_low = x <= low if low_open else x < low
    too_high = x >= high if high_open else x > high
    if not np.isfinite(x) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise OptimConfigError(f"optim.{name} must be finite and in {interval}, got {value!r}")


def check_optim(optim: Any) -> None:
    """Rejects non-finite or out-of-range optimizer settings (a NaN or 1e40 learning rate, b2 >= 1, ...)."""
    for name in ("peak_lr", "init_lr", "end_lr"):
        _number(name, optim[name], 0.0, MAX_LR)
    _number("b1", optim.b1, 0.0, 1.0, high_open=True)
    _number("b2", optim.b2, 0.0, 1.0, high_open=True)
    _number("eps", optim.eps, 0.0, 1.0, low_open=True)
    _number("weight_decay", optim.weight_decay, 0.0, 1e3)
    if optim.clip_norm is not None:
        _number("clip_norm", optim.clip_norm, 0.0, np.inf, low_open=True, high_open=True)


def lr_schedule(optim: Any, total_steps: int) -> optax.Schedule:
    """Warmup-stable-decay: linear warmup to peak_lr, constant, then a decay to end_lr.

    optim: warmup_steps, peak_lr, init_lr, decay ('none' | 'linear' | 'cosine'), decay_steps
    (length of the final decay phase), end_lr.
    """
    if optim.decay not in DECAY_SHAPES:
        raise OptimConfigError(f"optim.decay must be one of {DECAY_SHAPES}, got {optim.decay!r}")
    warmup, decay_steps = int(optim.warmup_steps), int(optim.decay_steps) if optim.decay != "none" else 0
    if warmup < 0 or decay_steps < 0 or warmup + decay_steps > total_steps:
        raise OptimConfigError(f"warmup_steps ({warmup}) + decay_steps ({decay_steps}) must fit in "
                               f"the {total_steps} training steps")
    schedules = [optax.linear_schedule(optim.init_lr, optim.peak_lr, max(warmup, 1)),
                 optax.constant_schedule(optim.peak_lr)]
    boundaries = [warmup]
    if decay_steps:
        decay = (optax.linear_schedule(optim.peak_lr, optim.end_lr, decay_steps) if optim.decay == "linear"
                 else optax.cosine_decay_schedule(optim.peak_lr, decay_steps, alpha=optim.end_lr / optim.peak_lr))
        schedules.append(decay)
        boundaries.append(total_steps - decay_steps)
    return optax.join_schedules(schedules, boundaries)


def beta_schedule(loss: Any) -> optax.Schedule:
    """Entropy weight by step: 'constant' beta; 'step' beta then beta_final from beta_switch_step;
    'linear' from beta at step 0 to beta_final at beta_switch_step (SPEC 3: 0.1, later 0.05)."""
    if loss.beta_schedule not in BETA_SCHEDULES:
        raise OptimConfigError(f"loss.beta_schedule must be one of {BETA_SCHEDULES}, got {loss.beta_schedule!r}")
    if loss.beta_schedule == "constant":
        return optax.constant_schedule(loss.beta)
    switch = int(loss.beta_switch_step)
    if switch < 1:
        raise OptimConfigError(f"loss.beta_switch_step must be >= 1 for a {loss.beta_schedule!r} schedule")
    if loss.beta_schedule == "step":
        return lambda step: jnp.where(step < switch, loss.beta, loss.beta_final).astype(jnp.float32)
    return optax.linear_schedule(loss.beta, loss.beta_final, switch)


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies: every leaf except norm gains ('scale') and biases ('bias')."""
    def decays(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return not (names and names[-1] in NO_DECAY_LEAVES)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: Any, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW(b1, b2, eps, weight_decay) on the WSD learning rate."""
    check_optim(optim)
    adamw = optax.adamw(lr_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=weight_decay_mask)
    if optim.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)
