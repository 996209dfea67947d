"""Resumable training checkpoints: the whole train state, the data iterator state and a fingerprint
of the state (orbax, async).

orbax stores no checksums: `fingerprint` (one uint32 per array, computed on device) is saved beside
each step and checked on restore, so flipped bytes do not restore silently.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from ouro_jax import paths
from ouro_jax.checksums import fingerprint, path_name
from ouro_jax.errors import CheckpointError, OuroError
from ouro_jax.train.step import all_finite

UNRESTORABLE_SUFFIX = ".unrestorable"
ORBAX_COMMIT_FILE = "commit_success.txt"  # what marks a finalized step on object stores (no atomic rename there)


class NonFiniteParamsError(OuroError, RuntimeError):
    """Parameters holding NaN or Inf: such a state is never checkpointed."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint that reads fine but does not fit the run's config (other shapes or dtypes)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose restored arrays do not match the fingerprint saved with them."""


_all_finite = jax.jit(all_finite)


class _IteratorSnapshot:
    """The state of a data iterator captured when a save is requested (an async save must not
    read the live iterator later, when it has moved on). Written by grain's CheckpointHandler."""

    def __init__(self, iterator):
        state = iterator.get_state()
        self._state = json.dumps(state, indent=4).encode() if isinstance(state, dict) else bytes(state)

    def get_state(self) -> bytes:
        return self._state


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    return {path_name(p): (tuple(x.shape), str(np.dtype(x.dtype)))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _mismatch(stored: Any, expected: Any) -> str | None:
    """The first few differences between a checkpoint's array metadata and the expected state, or None."""
    have, want = _shapes(stored), _shapes(expected)
    problems = [f"{k}: checkpoint {have[k][0]} {have[k][1]}, config {want[k][0]} {want[k][1]}"
                for k in want if k in have and have[k] != want[k]]
    problems += [f"{k}: not in the checkpoint" for k in want if k not in have]
    problems += [f"{k}: only in the checkpoint" for k in have if k not in want]
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def restore_train_state(step_dir: paths.PathLike, abstract_state: Any) -> tuple[str | None, Any]:
    """(None, state) of the training step `step_dir` (WORKDIR/checkpoints/STEP) read as `abstract_state`
    (shapes, dtypes, shardings), read-only; (the first differences, None) when it does not fit."""
    state_dir = paths.as_path(step_dir) / "state"
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(state_dir)
        stored = getattr(stored, "item_metadata", stored)
        problem = _mismatch(getattr(stored, "tree", stored), abstract_state)
        if problem:
            return problem, None
        return None, checkpointer.restore(state_dir, abstract_state)


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


class TrainCheckpointer:
    """orbax CheckpointManager of a training run: `state` (any pytree, e.g. TrainState), `data`
    (the grain iterator state) and `fingerprint` (of the state), saved asynchronously every
    `save_every` steps, the newest `keep` kept.

    `restore_latest` takes the newest step that restores. A step that does not fit the expected
    state (other shapes or dtypes) raises CheckpointMismatchError. A step that cannot be restored while an
    older one can (or whose arrays fail their fingerprint) is moved aside to `STEP.unrestorable`, so
    the run can save that step again and it holds no keep slot; when no step restores, CheckpointError.
    States with non-finite parameters are refused.
    """

    def __init__(self, directory: paths.PathLike, *, save_every: int, keep: int | None = 3,
                 async_save: bool = True, verify: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory, self.verify = paths.as_path(directory), verify
        policies = ocp.checkpoint_managers
        every_n = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_every),
                                          policies.PreemptionCheckpointingPolicy()])  # no extra save at step 1
        options = ocp.CheckpointManagerOptions(save_decision_policy=every_n, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "fingerprint": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False) -> bool:
        """Starts saving `state` (and the iterator's current state) as `step` when due or forced."""
        if not force and not self._manager.should_save(step):
            return False
        params = getattr(state, "params", state)
        if not bool(_all_finite(params)):
            raise NonFiniteParamsError(f"refusing to checkpoint step {step}: the parameters hold NaN or Inf")
        items = {"state": ocp.args.StandardSave(state)}
        if self.verify:
            items["fingerprint"] = ocp.args.JsonSave(fingerprint(state))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def _check_fits(self, step: int, abstract_state: Any) -> None:
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 -- unreadable metadata: the restore will say what is wrong
            return
        problem = None if stored is None else _mismatch(getattr(stored, "tree", stored), abstract_state)
        if problem:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} does not fit the config: {problem}. Fix the config "
                "(see WORKDIR/config.json for the one it was trained with), or pass "
                "--config.train.restart_incompatible=True to start over (the old run is moved aside, not deleted)")

    def _restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        saved = (self.directory / str(step) / "fingerprint").is_dir()
        if self.verify and saved:
            items["fingerprint"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if self.verify and saved:
            actual, expected = fingerprint(restored["state"]), restored["fingerprint"]
            bad = [k for k in expected if actual.get(k) != expected[k]]
            if bad:
                raise CorruptCheckpointError(f"arrays {bad[:3]} do not match the fingerprint saved with them "
                                             "(flipped bytes)")
        return restored["state"]

    def restore_latest(self, abstract_state: Any, data_iterator: Any = None) -> tuple[int, Any] | None:
        """(step, state) of the newest restorable step, the iterator set to its saved state; None if
        there is no step. `abstract_state` gives shapes, dtypes and shardings of the result."""
        failed: list[tuple[int, BaseException]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            self._check_fits(step, abstract_state)
            try:
                state = self._restore(step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001 -- orbax/TensorStore/grain raise many types for bad files
                print(f"[checkpoint] skipping step {step} in {self.directory}: not restorable ({_first_line(e)})",
                      flush=True)
                failed.append((step, e))
                continue
            self._move_aside([s for s, _ in failed])
            return step, state
        self._move_aside([s for s, e in failed if isinstance(e, CorruptCheckpointError)])
        if len(failed) > len([e for _, e in failed if isinstance(e, CorruptCheckpointError)]):
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores (step {failed[0][0]}: {_first_line(failed[0][1])}); "
                "pass --config.train.restart_incompatible=True to start over (the old run is moved aside, not deleted)")
        return None

    def _move_aside(self, steps: list[int]) -> None:
        """Renames unrestorable steps to STEP.unrestorable (kept for inspection, out of the step list)."""
        if not steps or jax.process_index() != 0:
            return
        for step in steps:
            source = self.directory / str(step)
            target, n = source.with_name(source.name + UNRESTORABLE_SUFFIX), 1
            while paths.exists(target):
                target, n = source.with_name(f"{source.name}{UNRESTORABLE_SUFFIX}-{n}"), n + 1
            paths.move_tree(source, target, ORBAX_COMMIT_FILE)
            print(f"[checkpoint] moved unrestorable step {step} aside to {target}", flush=True)
        self._manager.reload()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until every pending async save is finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        # orbax's close() does not wait for the clean-up of unfinished saves it starts on opening: a process
        # that exits right after (an error before the first save) would end that thread with a traceback.
        getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self._manager.close()
