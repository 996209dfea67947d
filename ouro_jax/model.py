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

import functools
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ouro_jax import kernels
from ouro_jax.config import OuroConfig
from ouro_jax.kernels import cross_entropy as xent_kernel
from ouro_jax.kernels import decode as decode_kernel
from ouro_jax.kernels import flash as flash_kernel
from ouro_jax.losses import chunked_cross_entropy
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


def fused_cross_entropy(cfg: OuroConfig, hidden: Array) -> bool:
    """Whether the head's cross-entropy / argmax over `hidden` [B, S, d] runs the fused kernel."""
    run = cfg.execution
    return uses_kernel("cross_entropy", run.cross_entropy_impl, run, xent_kernel.kernel_reasons(hidden[..., 0].size))


def step_cross_entropy(cfg: OuroConfig, hidden: Array, head: Array, targets: Array, chunk_size: int) -> Array:
    """Per-token CE [B, S] of one step: the fused kernel or the chunked XLA path (cfg.execution.cross_entropy_impl)."""
    run = cfg.execution
    if not fused_cross_entropy(cfg, hidden):
        return chunked_cross_entropy(hidden, head, targets, chunk_size)
    return kernels.linear_cross_entropy(hidden, head, targets, impl=run.cross_entropy_impl,
                                        interpret=run.kernel_interpret)[0]


def on_xla_cpu() -> bool:
    """Whether the mesh in context runs on XLA:CPU, where q/k/v and gate/up run as one matmul each from
    weights stacked at compute time (about 8% faster training there; elsewhere the stacked copies only
    cost memory) and attention masks by an additive bias (see `attend`)."""
    return kernels.mesh_platform() == "cpu"


def uses_kernel(op: str, impl: str, run, reasons) -> bool:
    """Whether `op` runs a Pallas kernel: `impl` on the platform of the mesh in context (see kernels.dispatch)."""
    return kernels.choose(op, impl, kernels.mesh_platform(), run.kernel_interpret, *reasons) is not None


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


ATTENTION_QUERY_BLOCK = 128   # causal attention without a cache: query blocks of >= this many rows
ATTENTION_MAX_BLOCKS = 8      # at most this many query blocks (the graph holds one attention per block)


def attend(q: Array, blocks: list[tuple[Array, Array, Array]]) -> Array:
    """Softmax attention in float32 over one or more key blocks, with grouped KV heads.

    q [B, Sq, H, hd]; each block is (k, v [B, Sk, KVH, hd], mask [B, 1, Sq, Sk]). Decoding passes
    the read-only KV cache and the new chunk as two blocks, so the cache is never copied.
    """
    heads_major = [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask) for k, v, mask in blocks]
    return jnp.swapaxes(attend_heads_major(jnp.swapaxes(q, 1, 2), heads_major), 1, 2)


def attend_heads_major(q: Array, blocks: list[tuple[Array, Array, Array]]) -> Array:
    """`attend` in the heads-major layout: q [B, H, Sq, hd], each k, v [B, KVH, Sk, hd] -> [B, H, Sq, hd].

    Each KV head's queries form one [G * Sq, hd] matrix; on XLA:CPU the mask is an additive bias, and in
    that form a one-block attention (dot, softmax, dot) compiles to one fused kernel (a select there
    splits it; on TPU the select takes less memory). The normalization divides the [.., hd] output, not
    the [.., Sk] probabilities.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads = blocks[0][0].shape[1]
    group = heads // kv_heads
    q = (q * head_dim**-0.5).reshape(batch, kv_heads, group * q_len, head_dim)
    lowest = jnp.finfo(jnp.float32).min

    def masked_scores(k, mask):
        scores = jnp.einsum("bkqd,bktd->bkqt", q, k, preferred_element_type=jnp.float32)
        mask = jnp.tile(mask, (1, 1, group, 1))
        return scores + jnp.where(mask, 0.0, lowest) if on_xla_cpu() else jnp.where(mask, scores, lowest)

    scores = [masked_scores(k, mask) for k, _, mask in blocks]
    peak = jax.lax.stop_gradient(functools.reduce(jnp.maximum, [s.max(axis=-1, keepdims=True) for s in scores]))
    weights = [jnp.exp(s - peak) for s in scores]
    total = sum(w.sum(axis=-1, keepdims=True) for w in weights)                  # [B, KVH, G * Sq, 1]
    out = sum(jnp.einsum("bkqt,bktd->bkqd", w.astype(v.dtype), v) for w, (_, v, _) in zip(weights, blocks))
    return (out / total.astype(out.dtype)).reshape(batch, heads, q_len, head_dim)


def causal_attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """`attend` over a whole causal sequence (q, k, v [B, S, ., hd], mask [B, 1, S, S]), by query blocks:
    the block of rows a..b attends to keys 0..b only, so about half the scores are never computed."""
    length = q.shape[1]
    num = max(1, min(ATTENTION_MAX_BLOCKS, length // ATTENTION_QUERY_BLOCK))
    bounds = [length * i // num for i in range(num + 1)]
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))   # heads-major once, not per block
    out = [attend_heads_major(q[:, :, a:b], [(k[:, :, :b], v[:, :, :b], mask[:, :, a:b, :b])])
           for a, b in zip(bounds, bounds[1:])]
    return jnp.swapaxes(jnp.concatenate(out, axis=2), 1, 2)


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
        if heads == kv_heads and on_xla_cpu():  # one matmul, stacked after the (sharded) head axis
            q, k, v = jnp.unstack(dense(x, jnp.stack([wq, wk, wv], axis=2).astype(dt)), axis=3)
        else:
            q, k, v = (dense(x, w.astype(dt)) for w in (wq, wk, wv))
        q, k, v = checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
        mask, segments = mask if isinstance(mask, tuple) else (mask, None)
        impl, interpret = cfg.execution.attention_impl, cfg.execution.kernel_interpret
        if kv_cache is None and segments is not None and self._kernel("attention", q, k.shape[1]):
            out = kernels.attention(q, k, v, segments, impl=impl, interpret=interpret)
        elif kv_cache is not None and self._kernel("decode", q, kv_cache[0].shape[1]):
            # the visible cache slots of a row: from its first unmasked slot (left padding) to cache_index
            start = jnp.argmax(mask[:, 0, 0, :], axis=-1).astype(jnp.int32)
            out = kernels.decode_attention(q, kv_cache[0].astype(dt), kv_cache[1].astype(dt), k, v, start,
                                           cache_index, impl=impl, interpret=interpret)
        elif kv_cache is None:
            out = causal_attend(q, k, v, mask)
        else:  # cache slots before cache_index, then this chunk (which occupies the following slots)
            cache_k, cache_v = kv_cache
            before = jnp.arange(cache_k.shape[1]) < cache_index
            own = jax.lax.dynamic_slice_in_dim(mask, cache_index, q.shape[1], axis=-1)
            out = attend(q, [(cache_k.astype(dt), cache_v.astype(dt), mask & before), (k, v, own)])
        out = checkpoint_name(out, "attention_out")
        return dense(out, wo.astype(dt), contract=2), (k, v)

    def _kernel(self, op: str, q: Array, key_length: int) -> bool:
        """Whether `op` runs a Pallas kernel here (cfg.execution.attention_impl on the mesh's platform and shapes)."""
        run = self.cfg.execution
        if run.attention_impl == "xla" or self.is_initializing():   # init only needs shapes
            return False
        reasons = (flash_kernel.kernel_reasons(q.shape[1], q.shape[3], q.dtype, run.kernel_interpret)
                   if op == "attention" else decode_kernel.kernel_reasons(key_length, q.shape[3], run.kernel_interpret))
        return uses_kernel(op, run.attention_impl, run, reasons)


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
        if on_xla_cpu():
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
        """Greedy ids [B, S] int32 of normed hidden states [B, S, d]: the fused kernel's argmax when
        cross_entropy_impl picks it (no [B, S, V] logits), else the argmax of `logits`."""
        cfg, head = self.cfg, self.head_kernel().astype(self.cfg.compute_dtype)
        run = cfg.execution
        if not fused_cross_entropy(cfg, hidden):
            return jnp.argmax(self.logits(hidden), axis=-1).astype(jnp.int32)
        targets = jnp.zeros(hidden.shape[:2], jnp.int32)
        return kernels.linear_cross_entropy(hidden.astype(cfg.compute_dtype), head, targets,
                                            impl=run.cross_entropy_impl, interpret=run.kernel_interpret)[1]

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
        mask = causal_mask(attention_mask, segment_ids, input_ids.shape)
        if self.cfg.execution.attention_impl != "xla":   # the kernels take segment ids; XLA drops what is unused
            mask = (mask, kernel_segments(attention_mask, segment_ids, input_ids.shape))
        h = self.embed(input_ids)

        def body(model: Ouro, h, _, positions, mask, targets):
            h, gate_logits, kv = model.step(h, positions, mask, return_kv=return_kv)
            step_ce = None
            if targets is not None:
                step_ce = step_cross_entropy(model.cfg, h, model.head_kernel().astype(model.cfg.compute_dtype),
                                             targets, ce_chunk_size)
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
    """Shapes and dtypes of the parameters, with their logical partitioning; nothing is materialized."""
    return jax.eval_shape(functools.partial(init_boxed_params, cfg), jax.random.key(0))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))
