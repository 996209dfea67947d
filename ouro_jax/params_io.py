"""Params-only checkpoints of ours, and loading a model from wherever it is (`load_model`).

A params directory holds `ouro_config.json` (`OuroConfig.to_dict()`: the fields that define the
checkpoint) and `params/` (an orbax StandardCheckpointer tree in our stacked layout). `load_model`
accepts every spec `ouro_jax.model_source.resolve_model` does: an HF Ouro directory, a params
checkpoint, a training workdir or one of its steps, a hub id; local or gs://.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from ouro_jax.config import Execution, OuroConfig
from ouro_jax.errors import CheckpointError, ConfigError
from ouro_jax.hf.export import export_hf, has_tokenizer
from ouro_jax.hf.load import load_hf, read_hf_config
from ouro_jax.model import abstract_params
from ouro_jax.model_source import CONFIG_FILE, PARAMS_DIR, STATE_ITEM, ModelSource, resolve_model, training_model_fields
from ouro_jax.paths import Path, as_path, check_bucket

__all__ = ["CONFIG_FILE", "PARAMS_DIR", "export_checkpoint", "load_model", "load_model_config", "load_params",
           "save_params"]
# Execution settings that checkpoints written before the config split stored beside the model fields.
_LEGACY_EXECUTION_FIELDS = ("dtype", "param_dtype", "scan_layers", "scan_steps", "remat_policy")


def save_params(directory: str | os.PathLike, cfg: OuroConfig, params: dict[str, Any]) -> None:
    """Writes a params-only checkpoint for inference or export."""
    directory = as_path(directory)
    check_bucket(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, nn.unbox(params), force=True)
    (directory / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))


def _read_config(directory: Path, execution: Execution | None = None) -> OuroConfig:
    path = directory / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not a params checkpoint of ouro_jax")
    try:
        fields = json.loads(path.read_text())
        fields = {k: v for k, v in fields.items() if k not in _LEGACY_EXECUTION_FIELDS}
        return OuroConfig.from_dict(fields, execution)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{path}: not a valid ouro_jax config ({e})") from None


def _stored_dtype(tree_dir: Path, prefix: tuple[str, ...] = ()) -> str:
    """The dtype the weights were saved in (read from the orbax metadata, no array data)."""
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(tree_dir).item_metadata.tree
    for key in prefix:
        tree = tree[key]
    return str(np.dtype(tree["embed_tokens"].dtype))


def _placed(cfg: OuroConfig, shardings: Any) -> Any:
    """The abstract params of `cfg`, each with its sharding (default: this process's first device)."""
    target = nn.unbox(abstract_params(cfg))
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), target)
    return jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, shardings)


def _restore_error(where: Any, e: Exception) -> CheckpointError:
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return CheckpointError(f"{where}: cannot restore params ({type(e).__name__}: {first_line})")


def load_params(directory: str | os.PathLike, *, param_dtype: str | None = None, shardings: Any = None,
                execution: Execution | None = None) -> tuple[OuroConfig, dict[str, Any]]:
    """Reads a params-only checkpoint -> (config, params).

    param_dtype defaults to the stored dtype; `shardings` (a tree like the params) places each array
    directly, else every array lands on this process's first device (whatever mesh or processes
    saved it); the returned config carries `execution` with that param_dtype.
    """
    directory = as_path(directory)
    params_dir = directory / PARAMS_DIR
    cfg = _read_config(directory, execution)
    try:
        cfg = cfg.with_execution(param_dtype=param_dtype or _stored_dtype(params_dir))
        with ocp.StandardCheckpointer() as checkpointer:
            return cfg, checkpointer.restore(params_dir, _placed(cfg, shardings))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- orbax/TensorStore raise many types for missing or corrupt files
        raise _restore_error(directory, e) from None


def load_train_step(source: ModelSource, *, param_dtype: str | None = None, shardings: Any = None,
                    execution: Execution | None = None) -> tuple[OuroConfig, dict[str, Any]]:
    """The params of one training step (WORKDIR/checkpoints/STEP), without its optimizer state; the
    model fields come from WORKDIR/config.json (the run's config)."""
    fields = training_model_fields(source.workdir)
    try:
        cfg = OuroConfig.from_dict(fields["model"], execution or Execution.from_dict(fields["execution"]))
    except ConfigError as e:
        raise CheckpointError(f"{source.workdir}/config.json: {e}") from None
    state_dir = source.path / STATE_ITEM
    try:
        cfg = cfg.with_execution(param_dtype=param_dtype or _stored_dtype(state_dir, ("params",)))
        target = _placed(cfg, shardings)
        restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), target)
        args = ocp.args.PyTreeRestore(item={"params": target}, restore_args={"params": restore_args},
                                      partial_restore=True)
        with ocp.PyTreeCheckpointer() as checkpointer:
            return cfg, checkpointer.restore(state_dir, args=args)["params"]
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- as load_params
        raise _restore_error(source.describe(), e) from None


_LOADERS = {"params": lambda s, **kw: load_params(s.path, **kw), "hf": lambda s, **kw: load_hf(s.path, **kw),
            "train_step": load_train_step}


def load_model(path: str | os.PathLike | ModelSource, *, param_dtype: str | None = None, shardings: Any = None,
               execution: Execution | None = None) -> tuple[OuroConfig, dict[str, Any]]:
    """Loads the model `path` names (any spec of `resolve_model`, or a resolved ModelSource)."""
    source = path if isinstance(path, ModelSource) else resolve_model(path)
    return _LOADERS[source.kind](source, param_dtype=param_dtype, shardings=shardings, execution=execution)


def load_model_config(path: str | os.PathLike | ModelSource) -> OuroConfig:
    """The OuroConfig of any model spec, without reading weights."""
    source = path if isinstance(path, ModelSource) else resolve_model(path)
    if source.kind == "params":
        return _read_config(source.path)
    if source.kind == "hf":
        return OuroConfig.from_hf_config(read_hf_config(source.path))
    fields = training_model_fields(source.workdir)
    return OuroConfig.from_dict(fields["model"], Execution.from_dict(fields["execution"]))


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> str:
    """Exports any model spec of `load_model` (a params checkpoint, a training step, or an HF Ouro
    directory to re-export) to out_dir.

    kwargs are those of `export_hf`. Re-exporting a released checkpoint gives it our remote code
    and the correct special ids; the tokenizer files of the source directory are copied unless
    `tokenizer=` names others.
    """
    source = resolve_model(checkpoint)
    cfg, params = load_model(source)
    if kwargs.get("tokenizer") is None and has_tokenizer(source.path):
        kwargs["tokenizer"] = os.fspath(source.path)  # an HF source directory's tokenizer travels with it
    return export_hf(out_dir, cfg, params, **kwargs)
