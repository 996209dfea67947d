"""The HF checkpoint key table: every tensor of an HF Ouro checkpoint and where it lives among our params.

HF keeps torch Linear weights as [out, in] with one tensor per layer; we keep kernels as
[in, ...out] with the N layers stacked on a leading axis (`decoder/layers/...`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from ouro_jax.config import OuroConfig
from ouro_jax.model import abstract_params

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CHECKSUMS_FILE = "ouro_checksums.json"  # SHA-256 of each weights file of an export of ours, checked on load
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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


def param_shapes(cfg: OuroConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our parameter path -> its shape (layer parameters with the stacked layer axis first)."""
    flat = traverse_util.flatten_dict(abstract_params(cfg))
    return {path: tuple(leaf.value.shape if hasattr(leaf, "value") else leaf.shape) for path, leaf in flat.items()}


def hf_tensors(cfg: OuroConfig, params: dict[str, Any],
               dtype: np.dtype | None = None) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(HF key, thunk giving the torch-layout tensor) for every tensor, in the released order.

    Thunks let a writer fetch one tensor at a time from device memory.
    """
    flat = traverse_util.flatten_dict(params)
    for m in key_table(cfg):
        def fetch(m=m):
            value = flat[m.path] if m.layer is None else flat[m.path][m.layer]
            array = m.to_hf(np.asarray(jax.device_get(value)))
            return np.ascontiguousarray(array if dtype is None else array.astype(dtype))
        yield m.hf_key, fetch
