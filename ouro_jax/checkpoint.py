"""Params-only checkpoints of ours (orbax) and loading a model from either format.

A params directory holds `ouro_config.json` (the OuroConfig fields) and `params/` (an orbax
StandardCheckpointer tree in our stacked layout). `load_model` also accepts an HF Ouro directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from ouro_jax.config import ConfigError, OuroConfig
from ouro_jax.hf.checkpoint import load_hf
from ouro_jax.hf.safetensors_io import CheckpointError
from ouro_jax.model import abstract_params, stack_layers, unstack_layers

CONFIG_FILE = "ouro_config.json"
PARAMS_DIR = "params"


def config_to_dict(cfg: OuroConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


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


def load_params(directory: str | os.PathLike, shardings: Any = None, **config_overrides) -> tuple[OuroConfig, dict[str, Any]]:
    """Reads a params-only checkpoint -> (config, params); `shardings` places each array directly."""
    directory = os.path.abspath(os.fspath(directory))
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not a params checkpoint of ouro_jax")
    with open(config_path) as f:
        cfg = config_from_dict(json.load(f))
    stored = cfg
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


def load_model(path: str | os.PathLike, **kwargs) -> tuple[OuroConfig, dict[str, Any]]:
    """Loads an HF Ouro directory or a params checkpoint of ours, whichever `path` is."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, CONFIG_FILE)):
        return load_params(path, **kwargs)
    if os.path.exists(os.path.join(path, "config.json")):
        return load_hf(path, **kwargs)
    raise CheckpointError(f"{path}: neither an HF Ouro directory (config.json) nor an ouro_jax params "
                          f"checkpoint ({CONFIG_FILE})")
