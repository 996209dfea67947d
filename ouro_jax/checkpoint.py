"""Params-only checkpoints of ours (orbax) and loading a model from either format.

A params directory holds `ouro_config.json` (the OuroConfig fields) and `params/` (an orbax
StandardCheckpointer tree in our stacked layout). `load_model` also accepts an HF Ouro directory.
`TrainCheckpointer` keeps resumable training checkpoints (the whole train state and the data
iterator state) with an orbax CheckpointManager.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from ouro_jax.config import EXECUTION_FIELDS, ConfigError, OuroConfig
from ouro_jax.hf.checkpoint import load_hf
from ouro_jax.hf.safetensors_io import CheckpointError
from ouro_jax.model import abstract_params, stack_layers, unstack_layers

CONFIG_FILE = "ouro_config.json"
PARAMS_DIR = "params"


def config_to_dict(cfg: OuroConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_FIELDS}


def config_from_dict(fields: dict[str, Any]) -> OuroConfig:
    known = {f.name for f in dataclasses.fields(OuroConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown OuroConfig field(s): {unknown}")
    return OuroConfig(**fields)


def save_params(directory: str | os.PathLike, cfg: OuroConfig, params: dict[str, Any]) -> None:
    """Writes a params-only checkpoint (stacked layout) for inference or export."""
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    if not cfg.scan_layers:
        params = stack_layers(params, cfg.num_hidden_layers)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_DIR), nn.unbox(params), force=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config_to_dict(cfg.replace(scan_layers=True)), f, indent=2)


def _read_config(directory: str) -> OuroConfig:
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not a params checkpoint of ouro_jax")
    with open(config_path) as f:
        return config_from_dict(json.load(f))


def load_params(directory: str | os.PathLike, shardings: Any = None, **config_overrides) -> tuple[OuroConfig, dict[str, Any]]:
    """Reads a params-only checkpoint -> (config, params); `shardings` places each array directly."""
    directory = os.path.abspath(os.fspath(directory))
    stored = _read_config(directory)
    cfg = stored
    cfg = cfg.replace(**config_overrides)
    target = nn.unbox(abstract_params(stored))
    if shardings is not None:
        target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(os.path.join(directory, PARAMS_DIR), target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{directory}: cannot restore params ({e})") from e
    if cfg.param_dtype != stored.param_dtype:
        params = jax.tree.map(lambda x: x.astype(cfg.weight_dtype), params)
    if not cfg.scan_layers:
        params = unstack_layers(params, cfg.num_hidden_layers)
    return cfg, params


def _is_ours(path: str) -> bool:
    """True for a params checkpoint of ours, False for an HF Ouro directory; raises for neither."""
    if os.path.exists(os.path.join(path, CONFIG_FILE)):
        return True
    if os.path.exists(os.path.join(path, "config.json")):
        return False
    raise CheckpointError(f"{path}: neither an HF Ouro directory (config.json) nor an ouro_jax params "
                          f"checkpoint ({CONFIG_FILE})")


def load_model(path: str | os.PathLike, **kwargs) -> tuple[OuroConfig, dict[str, Any]]:
    """Loads an HF Ouro directory or a params checkpoint of ours, whichever `path` is."""
    path = os.fspath(path)
    return load_params(path, **kwargs) if _is_ours(path) else load_hf(path, **kwargs)


def load_model_config(path: str | os.PathLike) -> OuroConfig:
    """The OuroConfig of an HF Ouro directory or a params checkpoint of ours, without reading weights."""
    path = os.fspath(path)
    return _read_config(os.path.abspath(path)) if _is_ours(path) else OuroConfig.from_hf_config(path)


# ---- Training checkpoints: the whole train state and the data iterator, resumable ---------------

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
        import grain

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
        import grain

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
        import grain

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
