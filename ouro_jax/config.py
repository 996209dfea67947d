"""OuroConfig: the shape of a looped language model, its presets, and HF `config.json` I/O."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "save_proj")
KERNEL_IMPLS = ("auto", "xla", "pallas")
EXECUTION_FIELDS = ("attention_impl", "cross_entropy_impl", "kernel_interpret")  # never persisted

# Fields of an HF `config.json` that carry no model-shape information for us (bookkeeping of
# transformers or settings we check separately below).
_HF_IGNORED = frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype",
    "use_cache", "initializer_range", "max_window_layers", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "bos_token_id", "eos_token_id", "pad_token_id",
    "tie_word_embeddings", "attention_dropout", "hidden_act", "layer_types", "sliding_window",
    "use_sliding_window", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias",
})
# HF field name -> OuroConfig field name, for fields copied as they are.
_HF_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size", "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim", "total_ut_steps": "total_ut_steps", "rope_theta": "rope_theta",
    "max_position_embeddings": "max_position_embeddings", "rms_norm_eps": "rms_norm_eps",
    "early_exit_threshold": "early_exit_threshold",
}


class ConfigError(ValueError):
    """An unknown, inconsistent or unsupported model setting."""


@dataclasses.dataclass(frozen=True)
class OuroConfig:
    """Model shape and numerics. Frozen and hashable: usable as a static `jit` argument."""

    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 128
    total_ut_steps: int = 4
    rope_theta: float = 1e6
    max_position_embeddings: int = 65536
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    early_exit_threshold: float | None = 1.0  # default Q-exit threshold; None lets use_weighted_exit act
    # Special ids of the released tokenizer: 0 = <|endoftext|> (pad), 1 = <|im_start|>, 2 = <|im_end|>.
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, softmax and exit math always run in float32
    scan_layers: bool = True  # nn.scan over layers (stacked params) or a Python loop (layers_{i})
    scan_steps: bool = True  # nn.scan over recurrent steps or a Python loop
    remat_policy: str = "none"  # one of REMAT_POLICIES
    # Kernels (execution settings, never persisted): "auto" | "xla" | "pallas", see ouro_jax/kernels.
    attention_impl: str = "auto"       # training / prefill attention and decode attention
    cross_entropy_impl: str = "auto"   # the per-step linear cross-entropy (and the eval step's argmax)
    kernel_interpret: bool = False     # run Pallas kernels in the interpreter (tests on CPU)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "total_ut_steps",
                     "max_position_embeddings"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        for name in ("attention_impl", "cross_entropy_impl"):
            if getattr(self, name) not in KERNEL_IMPLS:
                raise ConfigError(f"{name} must be one of {KERNEL_IMPLS}, got {getattr(self, name)!r}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
        if self.early_exit_threshold is not None and not 0.0 <= self.early_exit_threshold <= 1.0:
            raise ConfigError(f"early_exit_threshold must lie in [0, 1], got {self.early_exit_threshold}")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "OuroConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown OuroConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | os.PathLike, **overrides) -> "OuroConfig":
        """Builds a config from an HF `config.json` (a dict, the file, or its directory)."""
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                hf = json.load(f)
        unknown = sorted(set(hf) - _HF_IGNORED - set(_HF_FIELDS))
        if unknown:
            raise ConfigError(f"unknown field(s) in HF config: {unknown}")
        if hf.get("model_type", "ouro") != "ouro":
            raise ConfigError(f"model_type must be 'ouro', got {hf['model_type']!r}")
        if hf.get("use_sliding_window") or (hf.get("use_sliding_window") is None and hf.get("sliding_window")):
            raise ConfigError(f"sliding_window attention is not supported (sliding_window={hf.get('sliding_window')})")
        layer_types = set(hf.get("layer_types") or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ConfigError(f"layer_types other than 'full_attention' are not supported: {sorted(layer_types)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act must be 'silu', got {hf['hidden_act']!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"{flag}=True is not supported (Ouro has no biases)")
        if hf.get("attention_dropout", 0.0):
            raise ConfigError(f"attention_dropout must be 0, got {hf['attention_dropout']}")
        kwargs = {ours: hf[theirs] for theirs, ours in _HF_FIELDS.items() if theirs in hf}
        rope = hf.get("rope_parameters") or hf.get("rope_scaling")
        if rope:
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (only 'default')")
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
        if "head_dim" not in kwargs and "hidden_size" in kwargs:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs.get("num_attention_heads", cls.num_attention_heads)
        kwargs.setdefault("num_key_value_heads", kwargs.get("num_attention_heads", cls.num_attention_heads))
        kwargs["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
        kwargs["rope_theta"] = float(kwargs.get("rope_theta", cls.rope_theta))
        # The released config names 0 as bos/eos; the tokenizer's real ids are fixed by the vocabulary.
        return cls(**kwargs).replace(**overrides)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict of this model (model_type 'ouro', our remote code)."""
        return {
            "architectures": ["OuroForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig",
                         "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"},
            "model_type": "ouro",
            **{theirs: getattr(self, ours) for theirs, ours in _HF_FIELDS.items()},
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "use_cache": True,
            "dtype": self.param_dtype,
        }


def ouro_1p4b(**overrides) -> OuroConfig:
    """Ouro-1.4B: 24 layers x 4 recurrent steps."""
    return OuroConfig(**overrides)


def ouro_2p6b(**overrides) -> OuroConfig:
    """Ouro-2.6B: 48 layers x 4 recurrent steps."""
    return OuroConfig(num_hidden_layers=48, **overrides)


def tiny(**overrides) -> OuroConfig:
    """A model small enough for unit tests (the shape of the golden reference checkpoint)."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, head_dim=16, total_ut_steps=4,
                rope_theta=10000.0, max_position_embeddings=512)
    return OuroConfig(**{**base, **overrides})


PRESETS = {"ouro_1p4b": ouro_1p4b, "ouro_2p6b": ouro_2p6b, "tiny": tiny}


def preset(name: str, **overrides) -> OuroConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
