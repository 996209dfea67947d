"""Ouro looped language model (LoopLM) for transformers 5.x.

Written by ouro_jax and copied into every exported checkpoint; it also loads the released Ouro
checkpoints (same tensor names). Load with
`AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)`. Depends on torch and
transformers only.

    h = embed[ids]
    for t in 0..T-1:                      # the same N layers, the same weights, every step
        for l in 0..N-1:                  # sandwich norms around attention and MLP
            h = h + N2(attn(N1(h)));  h = h + N4(mlp(N3(h)))
        h = norm(h)                       # the normed state is the step output and the next input
        gate_logit[t] = early_exit_gate(h);  logits[t] = lm_head(h)

The KV cache holds one slot per (step t, layer l), at index t * N + l. Exit modes of the released
code, by priority: `exit_at_step` > `exit_threshold` (per-token Q-exit, default
`config.early_exit_threshold`) > `use_weighted_exit` > the last step; with `labels`, as released, the
logits are always the exit-pdf-weighted mixture sum_t p(t) logits_t and the loss is its next-token
cross-entropy (not the Stage I objective of training). The exit math mirrors
`ouro_jax/exit.py`: p(t) = sigmoid(z_t) * prod_{j<t} (1 - sigmoid(z_j)), the last step takes the rest.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple

from .configuration_ouro import OuroConfig

# ---- exit distribution (gate logits have the step axis first: [T, ...]) -----------------------------


def exit_pdf(gate_logits: torch.Tensor) -> torch.Tensor:
    """p(t) for every step, `[T, ...]` float32, summing to 1 over the steps (log-space products)."""
    z = gate_logits.float()
    log_survival_before = torch.cat([torch.zeros_like(z[:1]), torch.cumsum(F.logsigmoid(-z[:-1]), 0)], 0)
    log_exit_here = torch.cat([F.logsigmoid(z[:-1]), torch.zeros_like(z[:1])], 0)
    return torch.exp(log_exit_here + log_survival_before)


def exit_cdf(gate_logits: torch.Tensor) -> torch.Tensor:
    """CDF(t) = 1 - prod_{j<=t} (1 - lambda_j) for t < T, exactly 1 at the last step; `[T, ...]`."""
    z = gate_logits.float()
    survival = torch.exp(torch.cumsum(F.logsigmoid(-z[:-1]), 0))
    return torch.cat([1.0 - survival, torch.ones_like(z[:1])], 0)


def q_exit_step(gate_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """0-based Q-exit step per token: the first t with CDF(t) >= threshold (the last step if none)."""
    reached = exit_cdf(gate_logits) >= threshold
    return reached.float().argmax(0)  # argmax returns the first maximum; the last CDF is 1


# ---- layers -------------------------------------------------------------------------------------------


class OuroRMSNorm(nn.Module):
    """g * x / sqrt(mean(x^2) + eps), normalized in float32 and cast back before the gain."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin `[B, 1, S, head_dim]` of rotate-half RoPE for positions `[B, S]`."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates `[B, H, S, head_dim]` in float32 (first half / second half convention)."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Plain attention with a float32 softmax; query [B, H, Sq, hd], key/value [B, KVH, Sk, hd]."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class OuroAttention(nn.Module):
    """Multi-head attention with grouped KV heads and RoPE; K/V go to cache slot `cache_slot`."""

    def __init__(self, config: OuroConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        d, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, d, bias=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, past_key_values: Cache | None = None, cache_slot: int = 0,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings
        query = apply_rotary(self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2), cos, sin)
        key = apply_rotary(self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2), cos, sin)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, cache_slot)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        dropout = self.attention_dropout if self.training else 0.0
        out, weights = attention(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling,
                                 **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class OuroMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: OuroConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OuroDecoderLayer(GradientCheckpointingLayer):
    """Sandwich-norm block: h += N2(attn(N1(h))); h += N4(mlp(N3(h)))."""

    def __init__(self, config: OuroConfig, layer_idx: int):
        super().__init__()
        self.self_attn = OuroAttention(config, layer_idx)
        self.mlp = OuroMLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = OuroRMSNorm(config.hidden_size, eps)
        self.input_layernorm_2 = OuroRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = OuroRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm_2 = OuroRMSNorm(config.hidden_size, eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, past_key_values: Cache | None = None, cache_slot: int = 0,
                **kwargs) -> torch.Tensor:
        attn_out, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                                     past_key_values=past_key_values, cache_slot=cache_slot, **kwargs)
        hidden_states = hidden_states + self.input_layernorm_2(attn_out)
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + self.post_attention_layernorm_2(mlp_out)


# ---- outputs and the KV cache ----------------------------------------------------------------------


@dataclass
class OuroModelOutput(BaseModelOutputWithPast):
    """`last_hidden_state` is the normed state of the last step; per-step fields have the step axis first.

    step_hidden_states: `[T, B, S, d]` normed state after each step. gate_logits: `[T, B, S]` float32.
    """

    step_hidden_states: torch.Tensor | None = None
    gate_logits: torch.Tensor | None = None


@dataclass
class OuroCausalLMOutput(CausalLMOutputWithPast):
    """`logits` follow the exit mode. Per-step fields have the step axis first and cover the kept positions.

    gate_logits / exit_pdf: `[T, B, K]` float32, always. step_hidden_states `[T, B, K, d]` and step_logits
    `[T, B, K, V]` (float32): with `output_steps=True`.
    """

    gate_logits: torch.Tensor | None = None
    exit_pdf: torch.Tensor | None = None
    step_hidden_states: torch.Tensor | None = None
    step_logits: torch.Tensor | None = None


def ensure_cache_slots(cache: Cache, num_slots: int) -> None:
    """Gives `cache` one slot per (step, layer). A cache built from the config (as `generate` does) has one
    slot per layer; it is extended with fresh copies of its first, still empty, slot."""
    if cache.layer_class_to_replicate is not None or len(cache.layers) >= num_slots:
        return  # grows on demand, or large enough
    if not cache.layers:
        raise ValueError("Ouro: the cache has no layers to replicate; pass a DynamicCache() or None")
    if cache.get_seq_length() > 0:
        raise ValueError(f"Ouro: the cache holds tokens in {len(cache.layers)} slots, but this model needs "
                         f"{num_slots} (total_ut_steps x num_hidden_layers); start from an empty cache")
    template = cache.layers[0]
    cache.layers.extend(copy.deepcopy(template) for _ in range(num_slots - len(cache.layers)))


# ---- models ----------------------------------------------------------------------------------------


class OuroPreTrainedModel(PreTrainedModel):
    config: OuroConfig
    config_class = OuroConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OuroDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]


class OuroModel(OuroPreTrainedModel):
    """Embedding, the N shared layers looped `config.total_ut_steps` times, final norm and exit gate."""

    def __init__(self, config: OuroConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(OuroDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = OuroRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, **kwargs) -> OuroModelOutput:
        """attention_mask [B, past + S] (1 = token, 0 = padding), or prepared 4D masks; position_ids [B, S]
        default to cumsum(mask) - 1 (left padding) or the cache offset."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Ouro: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        num_steps, num_layers = self.config.total_ut_steps, self.config.num_hidden_layers
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if past_key_values is not None:
            ensure_cache_slots(past_key_values, num_steps * num_layers)
        seq_len = inputs_embeds.shape[1]
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            else:
                past = past_key_values.get_seq_length() if past_key_values is not None else 0
                position_ids = torch.arange(past, past + seq_len, device=inputs_embeds.device)[None]
        # One mask for every step: all slots hold the same tokens before this call. `generate` passes
        # ready-made masks by layer type when the cache is static.
        if isinstance(attention_mask, dict):
            mask = attention_mask["full_attention"]
        else:
            mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      past_key_values=past_key_values, position_ids=position_ids)
        theta = float((self.config.rope_parameters or {}).get("rope_theta", self.config.default_theta))
        position_embeddings = rotary_cos_sin(position_ids, self.config.head_dim, theta)

        hidden = inputs_embeds
        step_hidden, gate_logits = [], []
        for step in range(num_steps):
            for layer_idx, layer in enumerate(self.layers):
                hidden = layer(hidden, position_embeddings, attention_mask=mask, past_key_values=past_key_values,
                               cache_slot=step * num_layers + layer_idx, **kwargs)
            hidden = self.norm(hidden)
            step_hidden.append(hidden)
            gate = self.early_exit_gate
            gate_logits.append(F.linear(hidden.float(), gate.weight.float(), gate.bias.float())[..., 0])
        return OuroModelOutput(last_hidden_state=hidden, past_key_values=past_key_values,
                               step_hidden_states=torch.stack(step_hidden), gate_logits=torch.stack(gate_logits))


class OuroForCausalLM(OuroPreTrainedModel, GenerationMixin):
    """The looped LM with the shared head and the released exit modes."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # only when tie_word_embeddings

    def __init__(self, config: OuroConfig):
        super().__init__(config)
        self.model = OuroModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of normed hidden states."""
        return self.lm_head(hidden).float()

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                exit_at_step: int | None = None, exit_threshold: float | None = None,
                use_weighted_exit: bool = False, output_steps: bool = False, **kwargs) -> OuroCausalLMOutput:
        """Runs every recurrent step, then picks the logits by exit mode.

        exit_at_step: 0-based step (default `config.early_exit_step` when set). exit_threshold: per-token
        Q-exit at q (default `config.early_exit_threshold`). use_weighted_exit: sum_t p(t) logits_t, used
        only when neither of the two is set (the released default q = 1.0 counts as set: set
        `config.early_exit_threshold = None` for weighted exits). Otherwise the last step. `labels`, as in the
        released code, override the exit mode: the logits are the weighted mixture and the loss its next-token
        cross-entropy. output_steps: also return every step's hidden state and logits.
        """
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden = outputs.step_hidden_states[:, :, keep]                     # [T, B, K, d]
        gate_logits = outputs.gate_logits[:, :, keep]                       # [T, B, K]
        num_steps = hidden.shape[0]
        if exit_at_step is None:
            exit_at_step = getattr(self.config, "early_exit_step", None)
        if exit_threshold is None:
            exit_threshold = self.config.early_exit_threshold
        step_logits = self.head(hidden) if output_steps else None

        if labels is not None:
            step_logits = self.head(hidden) if step_logits is None else step_logits
            logits = (exit_pdf(gate_logits)[..., None] * step_logits).sum(0)
        elif exit_at_step is not None:
            if not 0 <= int(exit_at_step) < num_steps:
                raise ValueError(f"Ouro: exit_at_step must lie in [0, {num_steps}), got {exit_at_step}")
            logits = step_logits[exit_at_step] if step_logits is not None else self.head(hidden[exit_at_step])
        elif exit_threshold is not None:
            step = q_exit_step(gate_logits, float(exit_threshold))           # [B, K]
            if step_logits is not None:
                index = step[None, ..., None].expand(1, *step_logits.shape[1:])
                logits = step_logits.gather(0, index)[0]
            else:
                index = step[None, ..., None].expand(1, *hidden.shape[1:])
                logits = self.head(hidden.gather(0, index)[0])
        elif use_weighted_exit:
            step_logits = self.head(hidden) if step_logits is None else step_logits
            logits = (exit_pdf(gate_logits)[..., None] * step_logits).sum(0)
        else:
            logits = step_logits[-1] if step_logits is not None else self.head(hidden[-1])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return OuroCausalLMOutput(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, gate_logits=gate_logits,
            exit_pdf=exit_pdf(gate_logits), step_hidden_states=hidden if output_steps else None,
            step_logits=step_logits if output_steps else None)


__all__ = ["OuroForCausalLM", "OuroModel", "OuroPreTrainedModel", "exit_cdf", "exit_pdf", "q_exit_step"]
