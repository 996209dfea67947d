"""Optimizer, learning-rate and entropy-weight schedules of training (SPEC 6 recipe).

AdamW with global-norm clipping and no weight decay on norm gains or biases; warmup-stable-decay
learning rates (linear or cosine decay) of `OptimSettings`; a schedule for beta, the weight of the exit entropy.
Gradient accumulation happens inside the train step (step.py), not here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ouro_jax.errors import ConfigError
from ouro_jax.train.settings import LossSettings, OptimSettings

NO_DECAY_LEAVES = frozenset({"scale", "bias"})  # RMSNorm gains and the exit gate's bias


def lr_schedule(optim: OptimSettings, total_steps: int) -> optax.Schedule:
    """Warmup-stable-decay: linear warmup to peak_lr, constant, then a decay ('none' | 'linear' |
    'cosine') over the last `decay_steps` to end_lr. The schedule is a function of the optimizer's update
    count; a stage whose carried optimizer state has counted `optim.schedule_offset` updates before it
    starts its own schedule there (so the stages of a recipe form one continuous schedule)."""
    warmup, decay_steps = optim.warmup_steps, optim.decay_steps if optim.decay != "none" else 0
    if warmup + decay_steps > total_steps:
        raise ConfigError(f"optim.warmup_steps ({warmup}) + optim.decay_steps ({decay_steps}) must fit in "
                          f"the {total_steps} training steps")
    schedules = [optax.linear_schedule(optim.init_lr, optim.peak_lr, max(warmup, 1)),
                 optax.constant_schedule(optim.peak_lr)]
    boundaries = [warmup]
    if decay_steps:
        decay = (optax.linear_schedule(optim.peak_lr, optim.end_lr, decay_steps) if optim.decay == "linear"
                 else optax.cosine_decay_schedule(optim.peak_lr, decay_steps, alpha=optim.end_lr / optim.peak_lr))
        schedules.append(decay)
        boundaries.append(total_steps - decay_steps)
    schedule, offset = optax.join_schedules(schedules, boundaries), optim.schedule_offset
    return schedule if not offset else lambda count: schedule(count - offset)


def beta_schedule(loss: LossSettings) -> optax.Schedule:
    """Entropy weight by step: 'constant' beta; 'step' beta then beta_final from beta_switch_step;
    'linear' from beta at step 0 to beta_final at beta_switch_step (SPEC 3: 0.1, later 0.05)."""
    if loss.beta_schedule == "constant":
        return optax.constant_schedule(loss.beta)
    switch = loss.beta_switch_step
    if loss.beta_schedule == "step":
        return lambda step: jnp.where(step < switch, loss.beta, loss.beta_final).astype(jnp.float32)
    return optax.linear_schedule(loss.beta, loss.beta_final, switch)


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies: every leaf except norm gains ('scale') and biases ('bias')."""
    def decays(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return not (names and names[-1] in NO_DECAY_LEAVES)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: OptimSettings, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW(b1, b2, eps, weight_decay) on the WSD learning rate."""
    adamw = optax.adamw(lr_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=weight_decay_mask)
    if optim.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)
