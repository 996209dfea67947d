"""Configuration of Ouro looped language models for transformers 5.x.

Written by ouro_jax and copied into every exported checkpoint (remote code: load with
`trust_remote_code=True`). Reads the `config.json` of ouro_jax exports and of the released Ouro
checkpoints alike. Depends on torch/transformers only.
"""

from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig


class OuroConfig(PreTrainedConfig):
    """Shape of an Ouro model: N shared layers applied `total_ut_steps` times, with an exit gate.

    Exit defaults used by `OuroForCausalLM.forward` when the caller passes none: `early_exit_threshold`
    (Q-exit threshold q; the released models use 1.0, i.e. the last step; None = off, which lets
    `use_weighted_exit` act) and, when present, the released attribute `early_exit_step` (0-based).
    """

    model_type = "ouro"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_dropout: float = 0.0
    layer_types: list[str] | None = None
    total_ut_steps: int = 4
    early_exit_threshold: float | None = 1.0
    # <|endoftext|> = 0 pads; <|im_start|> = 1; <|im_end|> = 2 ends a chat turn.
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if kwargs.get("use_sliding_window"):
            raise ValueError(f"Ouro: sliding-window attention is not supported "
                             f"(use_sliding_window=True, sliding_window={kwargs.get('sliding_window')})")
        super().__post_init__(**kwargs)
        self._check()

    def _check(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "total_ut_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Ouro: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Ouro: num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"Ouro: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"Ouro: hidden_act must be 'silu', got {self.hidden_act!r}")
        if set(self.layer_types) != {"full_attention"} or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"Ouro: layer_types must be {self.num_hidden_layers} x 'full_attention', "
                             f"got {self.layer_types}")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"Ouro: only the default RoPE is supported, got rope_type={rope_type!r}")
        if self.early_exit_threshold is not None and not 0.0 <= self.early_exit_threshold <= 1.0:
            raise ValueError(f"Ouro: early_exit_threshold must lie in [0, 1] or be None, "
                             f"got {self.early_exit_threshold}")


__all__ = ["OuroConfig"]
