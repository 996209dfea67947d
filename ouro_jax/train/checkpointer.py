"""Resumable training checkpoints: the whole train state and the data iterator state (orbax, async)."""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class NonFiniteParamsError(RuntimeError):
    """Parameters holding NaN or Inf: such a state is never checkpointed."""


class _IteratorSnapshot:
    """The state of a data iterator captured when a save is requested (an async save must not
    read the live iterator later, when it has moved on). Written by grain's CheckpointHandler."""

    def __init__(self, iterator):
        state = iterator.get_state()
        self._state = json.dumps(state, indent=4).encode() if isinstance(state, dict) else bytes(state)

    def get_state(self) -> bytes:
        return self._state


@jax.jit
def _finite(tree) -> jax.Array:
    return jax.tree.reduce(lambda ok, x: ok & jax.numpy.isfinite(x).all(), tree, jax.numpy.bool_(True))


def _all_finite(tree) -> bool:
    return bool(_finite(tree))


class TrainCheckpointer:
    """orbax CheckpointManager of a training run: `state` (any pytree, e.g. TrainState) and `data`
    (the grain iterator state), saved asynchronously every `save_every` steps, the newest `keep` kept.

    `restore_latest` takes the newest step that restores; a half-written or foreign step directory
    is reported and skipped. States with non-finite parameters are refused.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int | None = 3,
                 async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = os.fspath(directory)
        policies = ocp.checkpoint_managers
        every_n = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_every),
                                          policies.PreemptionCheckpointingPolicy()])  # no extra save at step 1
        options = ocp.CheckpointManagerOptions(save_decision_policy=every_n, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False) -> bool:
        """Starts saving `state` (and the iterator's current state) as `step` when due or forced."""
        if not force and not self._manager.should_save(step):
            return False
        params = getattr(state, "params", state)
        if not _all_finite(params):
            raise NonFiniteParamsError(f"refusing to checkpoint step {step}: the parameters hold NaN or Inf")
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, abstract_state: Any, data_iterator: Any = None) -> tuple[int, Any] | None:
        """(step, state) of the newest restorable step, the iterator set to its saved state; None if
        there is none. `abstract_state` gives shapes, dtypes and shardings of the result."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 -- any unreadable step is skipped, loudly
                print(f"[checkpoint] skipping step {step} in {self.directory}: not restorable "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)
                continue
            return step, restored["state"]
        return None

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until every pending async save is finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
