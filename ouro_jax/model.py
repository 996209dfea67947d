"""The Ouro looped language model in Flax Linen (SPEC section 1).

    h = embed[ids]
    for t in 1..T:              # the same N layers, the same weights, every step
        h = final_norm(layers(h))   # the normed state is both the step output and the next input
        gate_logit[t] = exit_gate(h); logits[t] = lm_head(h)

The N layers are an `nn.scan` with stacked parameters (logical axis 'layers'); the T recurrent steps
are an `nn.scan` with broadcast parameters, so one copy of the weights serves every step and the
per-step head work (hidden states, gate, training loss) happens inside the loop body.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ouro_jax import kernels
from ouro_jax.config import OuroConfig
from ouro_jax.matmul import dense

Array = jax.Array
KV = tuple[Array, Array]  # (keys, values), each [..., B, L, num_kv_heads, head_dim]

_REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer: recompute it in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_proj": jax.checkpoint_policies.save_only_these_names(
        "query", "key", "value", "attention_out", "mlp_hidden"),
}


class OuroOutput(NamedTuple):
    """What a forward pass returns; every per-step field has the recurrent-step axis first."""

    gate_logits: Array                 # [T, B, S] float32, before the sigmoid
    hidden_states: Array | None        # [T, B, S, d] normed state after each step
    step_ce: Array | None              # [T, B, S] float32 cross-entropy per step, when targets given
    kv: KV | None                      # [T, N, B, S, KVH, hd] keys/values, when return_kv


def _weight_init(cfg: OuroConfig, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), names)


def default_positions(attention_mask: Array | None, segment_ids: Array | None, shape) -> Array:
    """Position ids: cumsum(mask) - 1 under left padding, per-document offsets under packing."""
    idx = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    if segment_ids is not None:
        starts = jnp.concatenate(
            [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx


def causal_mask(attention_mask: Array | None, segment_ids: Array | None, shape) -> Array:
    """Boolean [B, 1, S, S]: causal, no padded keys (mask 0 or segment 0), no cross-document keys."""
    batch, length = shape
    idx = jnp.arange(length)
    mask = jnp.broadcast_to(idx[:, None] >= idx[None, :], (batch, length, length))
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids != 0)[:, None, :]
    return mask[:, None]


def kernel_segments(attention_mask: Array | None, segment_ids: Array | None, shape) -> Array:
    """int32 [B, S] segment ids for the attention kernels: documents > 0, padding (mask 0 or segment 0) = 0."""
    segments = jnp.ones(shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    return segments if attention_mask is None else segments * (attention_mask != 0)


def on_xla_cpu(run) -> bool:
    """Whether `run` builds for XLA:CPU, where q/k/v and gate/up run as one matmul each from weights
    stacked at compute time (about 8% faster training there; elsewhere the stacked copies only cost memory)."""
    return kernels.resolve_platform(run) == "cpu"


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, rotate-half convention; x [B, S, H, hd], positions [B, S]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, S, hd/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nn.Module):
    """g * x / sqrt(mean(x^2) + eps), normalized in float32 and cast back before the gain."""

    cfg: OuroConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.cfg.weight_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return normed.astype(x.dtype) * scale.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with GQA and RoPE. With a KV cache [B, L, KVH, hd], this chunk sits at
    slots cache_index.. (mask [B, 1, Sq, L] is over slots); returns the output and the chunk's K/V."""

    cfg: OuroConfig

    @nn.compact
    def __call__(self, x, positions, mask, kv_cache: KV | None = None, cache_index=None):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        d, heads, kv_heads, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        def weight(name, axes, shape):
            return self.param(name, _weight_init(cfg, axes), shape, cfg.weight_dtype)

        wq = weight("q_proj", ("embed", "q_heads", "head_dim"), (d, heads, hd))
        wk = weight("k_proj", ("embed", "kv_heads", "head_dim"), (d, kv_heads, hd))
        wv = weight("v_proj", ("embed", "kv_heads", "head_dim"), (d, kv_heads, hd))
        wo = weight("o_proj", ("q_heads", "head_dim", "embed"), (heads, hd, d))
        x = x.astype(dt)
        run = cfg.execution
        if self.is_initializing():   # init only needs shapes: no kernel
            run = dataclasses.replace(run, attention_impl="xla")
        if heads == kv_heads and on_xla_cpu(run):  # one matmul, stacked after the (sharded) head axis
            q, k, v = jnp.unstack(dense(x, jnp.stack([wq, wk, wv], axis=2).astype(dt)), axis=3)
        else:
            q, k, v = (dense(x, w.astype(dt)) for w in (wq, wk, wv))
        q, k, v = checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
        if kv_cache is None:
            dense_mask, segments = mask
            out = kernels.attention(q, k, v, segments, run, mask=dense_mask)
        else:   # the visible cache slots of a row: from its first unmasked slot (left padding) to cache_index
            start = jnp.argmax(mask[:, 0, 0, :], axis=-1).astype(jnp.int32)
            out = kernels.decode_attention(q, kv_cache[0].astype(dt), kv_cache[1].astype(dt), k, v, start,
                                           cache_index, run, mask=mask)
        out = checkpoint_name(out, "attention_out")
        return dense(out, wo.astype(dt), contract=2), (k, v)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: OuroConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        shape_in, shape_out = (cfg.hidden_size, cfg.intermediate_size), (cfg.intermediate_size, cfg.hidden_size)
        w_gate = self.param("gate_proj", _weight_init(cfg, ("embed", "mlp")), shape_in, cfg.weight_dtype)
        w_up = self.param("up_proj", _weight_init(cfg, ("embed", "mlp")), shape_in, cfg.weight_dtype)
        w_down = self.param("down_proj", _weight_init(cfg, ("mlp", "embed")), shape_out, cfg.weight_dtype)
        x = x.astype(dt)
        if on_xla_cpu(cfg.execution):
            gate, up = jnp.unstack(dense(x, jnp.stack([w_gate, w_up], axis=2).astype(dt)), axis=-1)
        else:
            gate, up = dense(x, w_gate.astype(dt)), dense(x, w_up.astype(dt))
        hidden = jax.nn.silu(gate) * up
        hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        hidden = checkpoint_name(hidden, "mlp_hidden")
        return dense(hidden, w_down.astype(dt))


class DecoderLayer(nn.Module):
    """Sandwich-norm block: h += N2(attn(N1(h))); h += N4(mlp(N3(h)))."""

    cfg: OuroConfig
    return_kv: bool = False

    @nn.compact
    def __call__(self, h, positions, mask, kv_cache=None, cache_index=None):
        cfg = self.cfg
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))
        attn_out, kv = Attention(cfg, name="self_attn")(
            RMSNorm(cfg, name="input_layernorm")(h), positions, mask, kv_cache, cache_index)
        h = h + RMSNorm(cfg, name="input_layernorm_2")(attn_out)
        mlp_out = MLP(cfg, name="mlp")(RMSNorm(cfg, name="post_attention_layernorm")(h))
        h = h + RMSNorm(cfg, name="post_attention_layernorm_2")(mlp_out)
        return h, (kv if self.return_kv or kv_cache is not None else None)


class LayerStack(nn.Module):
    """The N shared layers: an `nn.scan` with stacked params (unrolled when `execution.unroll`)."""

    cfg: OuroConfig

    @nn.compact
    def __call__(self, h, positions, mask, kv_cache: KV | None = None, cache_index=None, return_kv=False):
        cfg, run = self.cfg, self.cfg.execution
        layer = DecoderLayer
        if run.remat_policy != "none":
            layer = nn.remat(layer, policy=_REMAT_POLICIES[run.remat_policy], prevent_cse=False)
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_hidden_layers,
                        unroll=cfg.num_hidden_layers if run.unroll else 1,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(cfg, return_kv, name="layers")(h, positions, mask, kv_cache, cache_index)


class ExitGate(nn.Module):
    """gate_logit = w . h + b, in float32: the only bias of the model."""

    cfg: OuroConfig

    @nn.compact
    def __call__(self, h):
        cfg = self.cfg
        w = self.param("kernel", _weight_init(cfg, ("embed", None)), (cfg.hidden_size, 1), cfg.weight_dtype)
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (1,), cfg.weight_dtype)
        return (h.astype(jnp.float32) @ w.astype(jnp.float32) + b.astype(jnp.float32))[..., 0]


class Ouro(nn.Module):
    """The looped LM. `__call__` runs the whole loop; `embed`, `step` and `logits` are its parts."""

    cfg: OuroConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = self.param("embed_tokens", _weight_init(cfg, ("vocab", "embed")),
                                       (cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype)
        self.decoder = LayerStack(cfg)
        self.final_norm = RMSNorm(cfg)
        self.exit_gate = ExitGate(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param("lm_head", _weight_init(cfg, ("embed", "vocab")),
                                      (cfg.hidden_size, cfg.vocab_size), cfg.weight_dtype)

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings [B, S, d] in the compute dtype (no scaling)."""
        return jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.cfg.compute_dtype)

    def head_kernel(self) -> Array:
        """The output projection [d, V] (the transposed embedding when tied)."""
        return self.embed_tokens.T if self.cfg.tie_word_embeddings else self.lm_head

    def logits(self, hidden: Array) -> Array:
        """float32 logits [..., V] of normed hidden states [..., d]."""
        dt = self.cfg.compute_dtype
        return dense(hidden.astype(dt), self.head_kernel().astype(dt), out_dtype=jnp.float32)

    def predict(self, hidden: Array) -> Array:
        """Greedy ids [B, S] int32 of normed hidden states [B, S, d] (`kernels.linear_argmax`: no [B, S, V]
        logits when cross_entropy_impl picks a kernel)."""
        dt = self.cfg.compute_dtype
        return kernels.linear_argmax(hidden.astype(dt), self.head_kernel().astype(dt), self.cfg.execution)

    def step(self, h, positions, mask, kv_cache: KV | None = None, cache_index=None, return_kv=False):
        """One recurrent step: the layer stack, the final norm, the exit gate -> (h, gate_logit, kv).

        With `kv_cache` (keys, values [N, B, L, KVH, hd], read only) the chunk attends to the cache
        slots before `cache_index` and to itself; kv is then the chunk's K/V [N, B, Sq, KVH, hd],
        which the caller writes into its cache at `cache_index`.
        """
        h, kv = self.decoder(h, positions, mask, kv_cache, cache_index, return_kv)
        h = self.final_norm(h)
        return h, self.exit_gate(h), kv

    def __call__(self, input_ids: Array, *, positions: Array | None = None, attention_mask: Array | None = None,
                 segment_ids: Array | None = None, num_steps: int | None = None, targets: Array | None = None,
                 return_hidden: bool = True, return_kv: bool = False, ce_chunk_size: int = 1024) -> OuroOutput:
        """Runs `num_steps` recurrent steps (default total_ut_steps; any number >= 1).

        attention_mask [B, S] (1 = token, 0 = left padding) and segment_ids [B, S] (packed documents,
        0 = padding) shape the causal mask; positions default to the matching per-row offsets.
        With `targets` [B, S] the per-step cross-entropy is computed inside the loop, chunked over
        the sequence, so no [T, B, S, V] array exists.
        """
        chex.assert_rank(input_ids, 2)
        chex.assert_type(input_ids, int)
        chex.assert_equal_shape([input_ids, *(x for x in (positions, attention_mask, segment_ids, targets)
                                              if x is not None)])
        num_steps = self.cfg.total_ut_steps if num_steps is None else int(num_steps)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if positions is None:
            positions = default_positions(attention_mask, segment_ids, input_ids.shape)
        # the xla attention takes the boolean mask, the others segment ids; XLA drops what is unused
        mask = (causal_mask(attention_mask, segment_ids, input_ids.shape),
                kernel_segments(attention_mask, segment_ids, input_ids.shape))
        h = self.embed(input_ids)

        def body(model: Ouro, h, _, positions, mask, targets):
            h, gate_logits, kv = model.step(h, positions, mask, return_kv=return_kv)
            step_ce = None
            if targets is not None:
                head = model.head_kernel().astype(model.cfg.compute_dtype)
                step_ce = kernels.linear_cross_entropy(h, head, targets, model.cfg.execution, chunk_size=ce_chunk_size)
            return h, (gate_logits, h if return_hidden else None, step_ce, kv)

        loop = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=num_steps,
                       unroll=num_steps if self.cfg.execution.unroll else 1)
        _, outputs = loop(self, h, None, positions, mask, targets)
        return OuroOutput(*outputs)


def init_boxed_params(cfg: OuroConfig, rng: Array) -> dict[str, Any]:
    """Randomly initialized parameters, boxed with their logical partitioning (the one model-init call)."""
    return Ouro(cfg).init(rng, jnp.zeros((1, 8), jnp.int32), num_steps=1)["params"]


def init_params(cfg: OuroConfig, rng: Array) -> dict[str, Any]:
    """Randomly initialized parameters (unboxed)."""
    return nn.unbox(init_boxed_params(cfg, rng))


def abstract_params(cfg: OuroConfig) -> dict[str, Any]:
    """Shapes and dtypes of the parameters, with their logical partitioning; nothing is materialized.
    The model init is traced once per config (each call gets its own copy of the tree)."""
    return jax.tree.map(lambda leaf: leaf, _traced_abstract_params(cfg))


@functools.lru_cache(maxsize=32)
def _traced_abstract_params(cfg: OuroConfig) -> dict[str, Any]:
    return jax.eval_shape(functools.partial(init_boxed_params, cfg), jax.random.key(0))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))
