"""The HF checkpoint key table, and import of HF Ouro directories into our parameter layout.

HF keeps torch Linear weights as [out, in] with one tensor per layer; we keep kernels as
[in, ...out] with the N layers stacked on a leading axis (`decoder/layers/...`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
from flax import traverse_util

from ouro_jax.config import OuroConfig
from ouro_jax.hf.safetensors_io import CheckpointError, SafetensorsFile
from ouro_jax.model import abstract_params, stack_layers, unstack_layers

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One HF tensor <-> a slice of one of our parameters."""

    hf_key: str
    path: tuple[str, ...]      # our parameter path
    layer: int | None          # index on the stacked layer axis, or None
    in_ndim: int | None        # Linear kernels: how many leading dims of ours form torch's `in`; None = same layout

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.in_ndim is None:
            return ours
        fan_in = int(np.prod(ours.shape[:self.in_ndim]))
        return ours.reshape(fan_in, -1).T

    def from_hf(self, theirs: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
        return theirs.reshape(our_shape) if self.in_ndim is None else theirs.T.reshape(our_shape)

    def hf_shape(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.in_ndim is None:
            return tuple(our_shape)
        return (int(np.prod(our_shape[self.in_ndim:])), int(np.prod(our_shape[:self.in_ndim])))


_LAYER_TENSORS = {  # HF name inside model.layers.{i} -> (our path inside decoder/layers, in_ndim)
    "self_attn.q_proj.weight": (("self_attn", "q_proj"), 1),
    "self_attn.k_proj.weight": (("self_attn", "k_proj"), 1),
    "self_attn.v_proj.weight": (("self_attn", "v_proj"), 1),
    "self_attn.o_proj.weight": (("self_attn", "o_proj"), 2),
    "mlp.gate_proj.weight": (("mlp", "gate_proj"), 1),
    "mlp.up_proj.weight": (("mlp", "up_proj"), 1),
    "mlp.down_proj.weight": (("mlp", "down_proj"), 1),
    "input_layernorm.weight": (("input_layernorm", "scale"), None),
    "input_layernorm_2.weight": (("input_layernorm_2", "scale"), None),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), None),
    "post_attention_layernorm_2.weight": (("post_attention_layernorm_2", "scale"), None),
}


def key_table(cfg: OuroConfig) -> list[TensorMapping]:
    """Every tensor of an HF Ouro checkpoint of this config, in the released order."""
    table = [TensorMapping("model.embed_tokens.weight", ("embed_tokens",), None, None)]
    for i in range(cfg.num_hidden_layers):
        for name, (path, in_ndim) in _LAYER_TENSORS.items():
            table.append(TensorMapping(f"model.layers.{i}.{name}", ("decoder", "layers", *path), i, in_ndim))
    table += [
        TensorMapping("model.norm.weight", ("final_norm", "scale"), None, None),
        TensorMapping("model.early_exit_gate.weight", ("exit_gate", "kernel"), None, 1),
        TensorMapping("model.early_exit_gate.bias", ("exit_gate", "bias"), None, None),
    ]
    if not cfg.tie_word_embeddings:
        table.append(TensorMapping("lm_head.weight", ("lm_head",), None, 1))
    return table


def _param_shapes(cfg: OuroConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    flat = traverse_util.flatten_dict(abstract_params(cfg.replace(scan_layers=True)))
    return {path: tuple(leaf.value.shape if hasattr(leaf, "value") else leaf.shape) for path, leaf in flat.items()}


def _open_tensors(directory: str) -> dict[str, SafetensorsFile]:
    """HF key -> the file holding it, for a single or an index-sharded checkpoint."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: corrupt index ({e!r})") from None
        files = {name: SafetensorsFile(os.path.join(directory, name)) for name in sorted(set(weight_map.values()))}
        located = {key: files[name] for key, name in weight_map.items()}
        for name, file in files.items():
            for key in file.keys():
                if key not in located:
                    raise CheckpointError(f"{file.path}: tensor {key!r} is not listed in {INDEX_FILE}")
        for key, file in located.items():
            if key not in file.keys():
                raise CheckpointError(f"{INDEX_FILE} places {key!r} in {file.path}, which does not hold it")
        return located
    single = os.path.join(directory, SINGLE_FILE)
    if not os.path.exists(single):
        raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
    file = SafetensorsFile(single)
    return {key: file for key in file.keys()}


def load_hf(directory: str | os.PathLike, *, param_dtype: str | None = None, shardings: Any = None,
            **config_overrides) -> tuple[OuroConfig, dict[str, Any]]:
    """Loads an HF Ouro directory -> (config, params in our stacked layout).

    Tensors are read one at a time from memory-mapped files; each parameter is assembled on the
    host once and then placed on device, with `shardings` (a tree like the params) if given.
    param_dtype ('float32' / 'bfloat16') defaults to the checkpoint's dtype.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    with open(os.path.join(directory, "config.json")) as f:
        hf_config = json.load(f)
    if param_dtype is None:
        param_dtype = "bfloat16" if hf_config.get("dtype", hf_config.get("torch_dtype")) == "bfloat16" else "float32"
    cfg = OuroConfig.from_hf_config(hf_config, param_dtype=param_dtype, **config_overrides)
    located = _open_tensors(directory)
    table = key_table(cfg)
    shapes = _param_shapes(cfg)

    problems = []
    expected = {m.hf_key for m in table}
    allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(k for k in located if k not in expected | allowed_extra and not k.endswith(_IGNORED_SUFFIXES))
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
    if problems:
        raise CheckpointError(f"{directory}: checkpoint does not fit the config:\n  " + "\n  ".join(problems))

    dtype = np.dtype(cfg.weight_dtype)
    by_path: dict[tuple[str, ...], list[TensorMapping]] = {}
    for m in table:
        by_path.setdefault(m.path, []).append(m)
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    flat = {}
    for path, mappings in by_path.items():
        host = np.empty(shapes[path], dtype)
        for m in mappings:
            piece = m.from_hf(located[m.hf_key].get(m.hf_key), shapes[path][1:] if m.layer is not None else shapes[path])
            if m.layer is None:
                host[...] = piece
            else:
                host[m.layer] = piece
        flat[path] = jax.device_put(host, flat_shardings.get(path))
        del host
    params = traverse_util.unflatten_dict(flat)
    if not cfg.scan_layers:
        params = unstack_layers(params, cfg.num_hidden_layers)
    return cfg, params


def hf_tensors(cfg: OuroConfig, params: dict[str, Any], dtype: np.dtype | None = None) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(HF key, thunk giving the torch-layout tensor) for every tensor, in the released order.

    Thunks let a writer fetch one tensor at a time from device memory.
    """
    if not cfg.scan_layers:
        params = stack_layers(params, cfg.num_hidden_layers)
    flat = traverse_util.flatten_dict(params)
    for m in key_table(cfg):
        def fetch(m=m):
            value = flat[m.path] if m.layer is None else flat[m.path][m.layer]
            array = m.to_hf(np.asarray(jax.device_get(value)))
            return np.ascontiguousarray(array if dtype is None else array.astype(dtype))
        yield m.hf_key, fetch
