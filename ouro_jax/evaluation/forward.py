"""One jitted pass over a batch that returns what every evaluation here needs, for all recurrent steps.

`StepForward(cfg, gates=...)(params, batch)` -> numpy arrays:
  step_ce      [T, B, S] cross-entropy of each step's logits (computed inside the loop)
  gate_logits  {name: [T, B, S]}: "model" is the model's own gate; every extra gate (e.g. the trained
               gate of a Stage II checkpoint) is applied to the same hidden states
  predictions  [T, B, S] argmax of each step's logits (only with predictions=True)
Batches follow the data contract (input_ids, targets, segment_ids, positions; loss_mask is not used here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ouro_jax.config import OuroConfig
from ouro_jax.model import Ouro

MODEL_GATE = "model"


def _gate(model: Ouro, hidden: jax.Array) -> jax.Array:
    return model.exit_gate(hidden)


class StepForward:
    """A compiled forward pass over `num_steps` recurrent steps (default: the trained T)."""

    def __init__(self, cfg: OuroConfig, *, gates: Mapping[str, Any] | None = None, predictions: bool = False,
                 num_steps: int | None = None, ce_chunk_size: int = 1024):
        self.cfg, self.num_steps = cfg, num_steps or cfg.total_ut_steps
        self.gates = dict(gates or {})
        if MODEL_GATE in self.gates:
            raise ValueError(f"gate name {MODEL_GATE!r} is reserved for the model's own gate")
        model = Ouro(cfg)

        def forward(params, gates, batch):
            out = model.apply({"params": params}, batch["input_ids"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"], targets=batch["targets"], num_steps=self.num_steps,
                              ce_chunk_size=ce_chunk_size)
            result = {"step_ce": out.step_ce, "gate_logits": {MODEL_GATE: out.gate_logits}}
            for name, gate in gates.items():
                result["gate_logits"][name] = model.apply({"params": {**params, "exit_gate": gate}},
                                                          out.hidden_states, method=_gate)
            if predictions:
                argmax = lambda h: jnp.argmax(model.apply({"params": params}, h, method=Ouro.logits), -1)
                result["predictions"] = jax.lax.map(argmax, out.hidden_states).astype(jnp.int32)
            return result

        self._forward = jax.jit(forward)

    def __call__(self, params, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        keys = ("input_ids", "targets", "segment_ids", "positions")
        return jax.device_get(self._forward(params, self.gates, {k: jnp.asarray(batch[k], jnp.int32) for k in keys}))
