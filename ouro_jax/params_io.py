"""Params-only checkpoints of ours, and loading a model from wherever it is (`load_model`).

A params directory holds `ouro_config.json` (`OuroConfig.to_dict()`: the fields that define the
checkpoint) and `params/` (an orbax StandardCheckpointer tree in our stacked layout). `load_model`
accepts every spec `ouro_jax.model_source.resolve_model` does: an HF Ouro directory, a params
checkpoint, a training workdir or one of its steps, a hub id; local or gs://.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ouro_jax.checksums import fingerprint, path_name
from ouro_jax.config import Execution, OuroConfig
from ouro_jax.errors import CheckpointError, ConfigError
from ouro_jax.hf.export import export_hf, has_tokenizer
from ouro_jax.hf.load import load_hf
from ouro_jax.model import abstract_params
from ouro_jax.model_source import CONFIG_FILE, PARAMS_DIR, STATE_ITEM, ModelSource, resolve_model, training_model_fields
from ouro_jax.paths import (
    Path,
    as_path,
    check_bucket,
    check_output,
    is_local,
    remove_leftovers,
    replace_tree,
)

__all__ = ["CONFIG_FILE", "PARAMS_DIR", "export_checkpoint", "load_model", "load_model_config", "load_params",
           "save_params"]
CHECKSUM_FILE = "fingerprint.json"  # checksums.fingerprint of the saved params (checkpoints before it have none)
# Execution settings, which checkpoints written before the config split stored beside the model fields.
_EXECUTION_FIELDS = frozenset(f.name for f in dataclasses.fields(Execution))


def save_params(directory: str | os.PathLike, cfg: OuroConfig, params: dict[str, Any]) -> None:
    """Writes a params-only checkpoint for inference or export, atomically: the new one is complete in a
    temporary directory beside `directory` before it replaces an old one."""
    directory = as_path(directory)
    check_bucket(directory)
    primary = jax.process_index() == 0  # every process writes its shards; the first one publishes
    suffix = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))  # one for all processes
    tmp = directory.parent / f".{directory.name}.tmp-{suffix:08x}"
    if primary:
        directory.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(directory, CONFIG_FILE, "params export")
        tmp.mkdir()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, nn.unbox(params), force=True)
        if primary:
            (tmp / CHECKSUM_FILE).write_text(json.dumps(fingerprint(params), indent=1))
            (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))  # last: marks it complete
            if is_local(tmp):
                os.chmod(tmp, 0o755)
            replace_tree(tmp, directory, CONFIG_FILE)
    except BaseException:  # a kill or a full disk: the previous params stay as they were
        if primary:
            tmp.rmtree(missing_ok=True)
        raise


def _read_config(directory: Path, execution: Execution | None = None) -> OuroConfig:
    path = directory / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not a params checkpoint of ouro_jax")
    try:
        fields = json.loads(path.read_text())
        fields = {k: v for k, v in fields.items() if k not in _EXECUTION_FIELDS}
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
        stored_dtype = _stored_dtype(params_dir)
        cfg = cfg.with_execution(param_dtype=param_dtype or stored_dtype)
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(params_dir, _placed(cfg, shardings))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- orbax/TensorStore raise many types for missing or corrupt files
        raise _restore_error(directory, e) from None
    _verify(directory, params, sums=cfg.execution.param_dtype == stored_dtype)
    return cfg, params


def _verify(directory: Path, params: dict[str, Any], sums: bool) -> None:
    """Refuses params that hold NaN / Inf or (`sums`: read in their stored dtype) differ from the checksums
    saved with them (flipped bytes)."""
    stored = directory / CHECKSUM_FILE
    if sums and stored.exists():
        expected, actual = json.loads(stored.read_text()), fingerprint(params)
        bad = [k for k in expected if actual.get(k) != expected[k]]
        if bad:
            raise CheckpointError(f"{directory}: params {bad[:3]} do not match their saved checksums (corrupt)")
    finite = jax.tree.map(lambda x: bool(jnp.isfinite(x).all()), params)
    bad = [path_name(k) for k, ok in jax.tree_util.tree_flatten_with_path(finite)[0] if not ok]
    if bad:
        raise CheckpointError(f"{directory}: params {bad[:3]} hold NaN or infinite values")


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
        return OuroConfig.from_hf_config(source.path)
    fields = training_model_fields(source.workdir)
    return OuroConfig.from_dict(fields["model"], Execution.from_dict(fields["execution"]))


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> str:
    """Exports any model spec of `load_model` (a params checkpoint, a training step, or an HF Ouro
    directory to re-export) to out_dir.

    kwargs are those of `export_hf`. Re-exporting a released checkpoint gives it our remote code
    and the correct special ids; the tokenizer files of the source directory are copied unless
    `tokenizer=` names others.
    """
    check_output(out_dir, kind="an HF export", marker="config.json", sources=(checkpoint,),
                 overwrite=bool(kwargs.get("overwrite")))
    source = resolve_model(checkpoint)
    cfg, params = load_model(source)
    kwargs["sources"] = (checkpoint,)
    if kwargs.get("tokenizer") is None and has_tokenizer(source.path):
        kwargs["tokenizer"] = os.fspath(source.path)  # an HF source directory's tokenizer travels with it
    return export_hf(out_dir, cfg, params, **kwargs)
