"""OuroConfig: what defines a looped language model's checkpoint; Execution: how it runs.

`OuroConfig.to_dict` / `from_dict` are the one codec of the persisted fields (params checkpoints, the
training config); `from_hf_config` / `to_hf_config` read and write HF `config.json`; presets.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from ouro_jax import validate
from ouro_jax.errors import CheckpointError, ConfigError
from ouro_jax.paths import as_path

REMAT_POLICIES = ("none", "full", "dots", "save_proj")
KERNEL_IMPLS = ("auto", "xla", "reference", "pallas")
PLATFORMS = ("auto", "cpu", "tpu", "gpu")
DTYPES = ("float32", "bfloat16", "float16")
# The fields that fix the parameter shapes: what a run started from a checkpoint takes from it.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "tie_word_embeddings")
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


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` dict of an HF directory (CheckpointError when missing or not JSON): its one reader."""
    path = as_path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no config.json; not an HF Ouro directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _check_types(obj) -> None:
    """Rejects values of the wrong type (a JSON "64" for an int field, say) with a ConfigError."""
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), f.type.split(" | ")
        ok = ((("int" in kind or "float" in kind) and isinstance(value, int) and not isinstance(value, bool))
              or ("float" in kind and isinstance(value, float)) or ("bool" in kind and isinstance(value, bool))
              or ("str" in kind and isinstance(value, str)) or ("None" in kind and value is None))
        if not ok and f.type != "Execution":
            raise ConfigError(f"{type(obj).__name__}.{f.name} must be {f.type}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a model runs (never persisted with a checkpoint): dtypes, rematerialization, loop unrolling."""

    dtype: str = "float32"  # compute dtype; norms, softmax and exit math always run in float32
    param_dtype: str = "float32"  # dtype of the weights held in memory (master weights in training)
    remat_policy: str = "none"  # one of REMAT_POLICIES
    unroll: bool = False  # unroll the layer and step scans: faster on CPU, larger programs (same params)
    # Ops, see ouro_jax/kernels: "auto" (by the platform) | "xla" | "reference" (the test oracle) | "pallas".
    attention_impl: str = "auto"       # training / prefill attention and decode attention
    cross_entropy_impl: str = "auto"   # the per-step linear cross-entropy and the eval step's argmax
    kernel_interpret: bool = False     # run Pallas kernels in the interpreter (tests on CPU)
    platform: str = "auto"             # the platform the ops are laid out for; "auto": the mesh's devices

    def __post_init__(self):
        _check_types(self)
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        for name in ("attention_impl", "cross_entropy_impl"):
            if getattr(self, name) not in KERNEL_IMPLS:
                raise ConfigError(f"{name} must be one of {KERNEL_IMPLS}, got {getattr(self, name)!r}")
        if self.platform not in PLATFORMS:
            raise ConfigError(f"platform must be one of {PLATFORMS}, got {self.platform!r}")

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Execution:
        return _from_fields(cls, fields)


@dataclasses.dataclass(frozen=True)
class OuroConfig:
    """What defines a checkpoint (shapes, vocabulary, steps, RoPE, exit threshold, special ids), plus
    the `execution` settings, which are never persisted. Frozen and hashable: a static `jit` argument."""

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
    execution: Execution = Execution()

    def __post_init__(self):
        _check_types(self)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "total_ut_steps",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.early_exit_threshold is not None:
            validate.exit_threshold(self.early_exit_threshold, "early_exit_threshold")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.execution.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.execution.param_dtype)

    def replace(self, **changes) -> OuroConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown OuroConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def with_execution(self, **changes) -> OuroConfig:
        """This config with some execution settings changed (e.g. dtype="bfloat16")."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(Execution)}
        if unknown:
            raise ConfigError(f"unknown Execution field(s): {sorted(unknown)}")
        return dataclasses.replace(self, execution=dataclasses.replace(self.execution, **changes))

    # ---- the one codec of the persisted fields -------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fields that define the checkpoint (no execution settings): what is saved with one."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "execution"}

    @classmethod
    def from_dict(cls, fields: dict[str, Any], execution: Execution | None = None) -> OuroConfig:
        """Inverse of `to_dict`; unknown or mistyped fields raise ConfigError."""
        if "execution" in fields:
            raise ConfigError("'execution' is not a checkpoint field; pass execution= instead")
        return _from_fields(cls, {**fields, "execution": execution or Execution()})

    # ---- HF config.json ------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | os.PathLike, execution: Execution | None = None) -> OuroConfig:
        """Builds a config from an HF `config.json` (a dict, the file, or its directory)."""
        if not isinstance(hf, dict):
            path = as_path(hf)
            hf = read_hf_config(path.parent if path.name == "config.json" else path)
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
        heads = kwargs.get("num_attention_heads", cls.num_attention_heads)
        if "head_dim" not in kwargs and isinstance(kwargs.get("hidden_size"), int) and isinstance(heads, int):
            kwargs["head_dim"] = kwargs["hidden_size"] // heads
        kwargs.setdefault("num_key_value_heads", heads)
        kwargs["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
        # The released config names 0 as bos/eos; the tokenizer's real ids are fixed by the vocabulary.
        return _from_fields(cls, {**kwargs, "execution": execution or Execution()})

    def to_hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """The HF `config.json` dict of this model (model_type 'ouro', our remote code), weights stored as `dtype`."""
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
            "dtype": dtype,
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


def _from_fields(cls, fields: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {unknown}")
    try:
        return cls(**fields)
    except TypeError as e:  # e.g. a value that cannot be compared with the bounds checked above
        raise ConfigError(f"{cls.__name__}: {e}") from None


def preset(name: str, **overrides) -> OuroConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
