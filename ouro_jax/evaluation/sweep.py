"""Quality vs compute: static exit at each step and Q-exit over thresholds q, for one or more exit gates.

Each point reads every token at one recurrent step (the released selection semantics: per-token
Q-exit is the first step whose exit CDF reaches q). Compute is the realized depth: a token exiting
at step t costs t passes through the N-layer stack, i.e. t * N layer applications; early-exit
generation (`ouro_jax.inference`) runs exactly these steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ouro_jax import validate
from ouro_jax.exit import q_exit_step

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


check_thresholds = validate.thresholds


def _point(setting: float | int, steps: np.ndarray, quality: Callable[[np.ndarray], float], num_layers: int) -> dict:
    depth = float(np.mean(steps + 1))
    return {"setting": setting, "mean_depth": depth, "layer_applications": depth * num_layers,
            "value": float(quality(steps))}


def sweep(gate_logits: Mapping[str, np.ndarray], quality: Callable[[np.ndarray], float], *, metric: str,
          num_layers: int, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
    """Curves {"static": [...], "q_exit:<gate>": [...]} of points (setting, mean_depth, layer_applications, value).

    gate_logits: {gate name: [T, ...]} over the same tokens; quality(steps) scores reading token i at
    the 0-based step steps[i] (an int array of the tokens' shape).
    """
    qs = check_thresholds(thresholds)
    shape = next(iter(gate_logits.values())).shape
    num_steps, tokens = shape[0], shape[1:]
    curves = {"static": [_point(t + 1, np.full(tokens, t, np.int32), quality, num_layers) for t in range(num_steps)]}
    for name, logits in gate_logits.items():
        curves[f"q_exit:{name}"] = [_point(q, np.asarray(q_exit_step(logits, q)), quality, num_layers) for q in qs]
    return {"metric": metric, "num_steps": num_steps, "num_layers": num_layers, "curves": curves}


def ce_quality(step_ce: np.ndarray) -> Callable[[np.ndarray], float]:
    """Mean cross-entropy when token i is read at step steps[i]; step_ce [T, ...]."""
    return lambda steps: float(np.take_along_axis(step_ce, steps[None], axis=0).mean())
