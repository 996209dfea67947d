"""Import of HF Ouro directories (`config.json` + safetensors, single or index-sharded) into our params."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ouro_jax.config import Execution, OuroConfig, read_hf_config
from ouro_jax.errors import CheckpointError
from ouro_jax.hf.keys import (
    CHECKSUMS_FILE,
    IGNORED_SUFFIXES,
    INDEX_FILE,
    SINGLE_FILE,
    TensorMapping,
    key_table,
    param_shapes,
)
from ouro_jax.hf.safetensors_io import SafetensorsFile
from ouro_jax.paths import Path, as_path, sha256_file


def _verify_checksums(directory: Path) -> None:
    """Checks the weights files against the SHA-256 an export of ours stored beside them (if it did)."""
    path = directory / CHECKSUMS_FILE
    if not path.exists():
        return
    try:
        expected = dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    for name, digest in expected.items():
        if (directory / name).exists() and sha256_file(directory / name) != digest:
            raise CheckpointError(f"{directory / name}: does not match its SHA-256 in {CHECKSUMS_FILE} (corrupt)")


def _open_tensors(directory: Path) -> dict[str, SafetensorsFile]:
    """HF key -> the file holding it, for a single or an index-sharded checkpoint."""
    index_path = directory / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: corrupt index ({e!r})") from None
        files = {name: SafetensorsFile(directory / name) for name in sorted(set(weight_map.values()))}
        located = {key: files[name] for key, name in weight_map.items()}
        for file in files.values():
            for key in file.keys():
                if key not in located:
                    raise CheckpointError(f"{file.path}: tensor {key!r} is not listed in {INDEX_FILE}")
        for key, file in located.items():
            if key not in file.keys():
                raise CheckpointError(f"{INDEX_FILE} places {key!r} in {file.path}, which does not hold it")
        return located
    single = directory / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
    file = SafetensorsFile(single)
    return {key: file for key in file.keys()}


def _check_tensors(directory: Path, cfg: OuroConfig, located: dict[str, SafetensorsFile]) -> None:
    """Refuses missing or unexpected keys, wrong shapes and weights that are not floating point."""
    table, shapes = key_table(cfg), param_shapes(cfg)
    problems = []
    expected = {m.hf_key for m in table}
    allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(k for k in located if k not in expected | allowed_extra and not k.endswith(IGNORED_SUFFIXES))
    missing = sorted(expected - set(located))
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    for m in table:
        if m.hf_key in located:
            our_shape = shapes[m.path][1:] if m.layer is not None else shapes[m.path]
            got, want = located[m.hf_key].shape(m.hf_key), m.hf_shape(our_shape)
            if got != want:
                problems.append(f"{m.hf_key}: shape {got}, expected {want}")
            stored = located[m.hf_key].dtype(m.hf_key)
            if not jnp.issubdtype(stored, jnp.floating):
                problems.append(f"{m.hf_key}: stored as {stored}, expected floating-point weights")
    if problems:
        raise CheckpointError(f"{directory}: checkpoint does not fit the config: " + "; ".join(problems))


def load_hf(directory: str | os.PathLike, *, param_dtype: str | None = None, shardings: Any = None,
            execution: Execution | None = None) -> tuple[OuroConfig, dict[str, Any]]:
    """Loads an HF Ouro directory -> (config, params in our stacked layout).

    Tensors are read one at a time from memory-mapped files; each parameter is assembled on the
    host once and then placed on device, with `shardings` (a tree like the params) if given.
    param_dtype ('float32' / 'bfloat16') defaults to the checkpoint's dtype; the returned config
    carries `execution` (default settings if None) with that param_dtype.
    """
    directory = as_path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    hf_config = read_hf_config(directory)
    if param_dtype is None:
        param_dtype = "bfloat16" if hf_config.get("dtype", hf_config.get("torch_dtype")) == "bfloat16" else "float32"
    cfg = OuroConfig.from_hf_config(hf_config, execution).with_execution(param_dtype=param_dtype)
    _verify_checksums(directory)
    located = _open_tensors(directory)
    _check_tensors(directory, cfg, located)
    table, shapes = key_table(cfg), param_shapes(cfg)
    dtype = np.dtype(cfg.weight_dtype)
    by_path: dict[tuple[str, ...], list[TensorMapping]] = {}
    for m in table:
        by_path.setdefault(m.path, []).append(m)
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    flat = {}
    for path, mappings in by_path.items():
        host = np.empty(shapes[path], dtype)
        for m in mappings:
            our_shape = shapes[path][1:] if m.layer is not None else shapes[path]
            piece = m.from_hf(located[m.hf_key].get(m.hf_key), our_shape)
            if m.layer is None:
                host[...] = piece
            else:
                host[m.layer] = piece
        if not np.isfinite(host).all():
            raise CheckpointError(f"{directory}: weights {'.'.join(path)} hold NaN or infinite values")
        flat[path] = jax.device_put(host, flat_shardings.get(path))
        del host
    params = traverse_util.unflatten_dict(flat)
    return cfg, params
