"""Training / prefill attention: causal, packed documents (segment ids), GQA; never an [S, S] array.

q [B, S, H, hd], k / v [B, S, KVH, hd], segment_ids [B, S] int (0 = padding). A query attends to keys
at or before it with the same segment id, so a padding query (segment 0) sees only padding keys: every
row keeps its diagonal and stays finite; rows of real tokens never see padding.

- xla: `xla_attention`, float32 softmax by query blocks (the block of rows a..b sees keys 0..b only),
  the mask an additive bias on XLA:CPU (one fused kernel there) and a select elsewhere.
- reference: `reference_attention`, float32 scores and one softmax (the test oracle).
- TPU: the splash attention kernel shipped in the jax wheel (Mosaic; forward and backward), one MQA
  kernel per KV head so that grouped query heads share K/V without repeating them.
- GPU: the Triton flash attention shipped in the jax wheel (`pallas.ops.gpu.attention.mha`, forward
  and backward); K/V heads are repeated to the query heads (it has no GQA).
Sequences are padded at the end to a block multiple (padding keys lie after every real query).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from ouro_jax.config import Execution
from ouro_jax.kernels.dispatch import REFERENCE, XLA, Limits, choose_for, resolve_platform
from ouro_jax.kernels.sharded import per_device

Array = jax.Array
LANES = 128
MIN_KERNEL_LENGTH = 128        # below this, auto keeps XLA (one block; the kernel does not pay)
HEAD_DIMS = (64, 128, 256)
QUERY_BLOCK = 128              # xla: query blocks of >= this many rows
MAX_QUERY_BLOCKS = 8           # xla: at most this many query blocks (the graph holds one attention per block)


def segment_mask(segment_ids: Array) -> Array:
    """Boolean [B, 1, S, S]: causal, same segment, no padding keys (segment 0)."""
    idx = jnp.arange(segment_ids.shape[1])
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids != 0)[:, None, :]
    return (same & (idx[:, None] >= idx[None, :]))[:, None]


def reference_attention(q, k, v, segment_ids):
    """The XLA reference: float32 scores and softmax over causal, same-segment keys."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    idx = jnp.arange(length)
    mask = (idx[:, None] >= idx[None, :]) & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgqt,btkd->bqkgd", probs.astype(v.dtype), v)
    return out.reshape(batch, length, heads, head_dim)


def attend_heads_major(q: Array, blocks: list[tuple[Array, Array, Array]], platform: str) -> Array:
    """Softmax attention in float32 over one or more key blocks with grouped KV heads, heads-major:
    q [B, H, Sq, hd], each block (k, v [B, KVH, Sk, hd], mask [B, 1, Sq, Sk]) -> [B, H, Sq, hd].

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
        return scores + jnp.where(mask, 0.0, lowest) if platform == "cpu" else jnp.where(mask, scores, lowest)

    scores = [masked_scores(k, mask) for k, _, mask in blocks]
    peak = jax.lax.stop_gradient(functools.reduce(jnp.maximum, [s.max(axis=-1, keepdims=True) for s in scores]))
    weights = [jnp.exp(s - peak) for s in scores]
    total = sum(w.sum(axis=-1, keepdims=True) for w in weights)                  # [B, KVH, G * Sq, 1]
    out = sum(jnp.einsum("bkqt,bktd->bkqd", w.astype(v.dtype), v) for w, (_, v, _) in zip(weights, blocks))
    return (out / total.astype(out.dtype)).reshape(batch, heads, q_len, head_dim)


def attend(q: Array, blocks: list[tuple[Array, Array, Array]], platform: str) -> Array:
    """`attend_heads_major` in the sequence-major layout: q [B, Sq, H, hd], each k, v [B, Sk, KVH, hd]."""
    heads_major = [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask) for k, v, mask in blocks]
    return jnp.swapaxes(attend_heads_major(jnp.swapaxes(q, 1, 2), heads_major, platform), 1, 2)


def query_bounds(length: int, query_block: int = QUERY_BLOCK) -> list[int]:
    """Row bounds of the xla flavor's query blocks over a sequence of `length`."""
    num = max(1, min(MAX_QUERY_BLOCKS, length // query_block))
    return [length * i // num for i in range(num + 1)]


def xla_attention(q: Array, k: Array, v: Array, mask: Array, platform: str, query_block: int = QUERY_BLOCK) -> Array:
    """Causal attention (q, k, v [B, S, ., hd], mask [B, 1, S, S]) by query blocks: the block of rows
    a..b attends to keys 0..b only, so about half the scores are never computed."""
    bounds = query_bounds(q.shape[1], query_block)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))   # heads-major once, not per block
    out = [attend_heads_major(q[:, :, a:b], [(k[:, :, :b], v[:, :, :b], mask[:, :, a:b, :b])], platform)
           for a, b in zip(bounds, bounds[1:])]
    return jnp.swapaxes(jnp.concatenate(out, axis=2), 1, 2)


def _block(length: int, largest: int = 512) -> int:
    return next(b for b in (largest, 256, 128) if b <= largest and length % b == 0)


def _pad_length(x, length: int, axis: int = 1):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


def _splash_kernel(length: int, group: int, interpret: bool):
    block = _block(length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length)) for _ in range(group)])
    # built per trace: a kernel kept across traces would carry its mask tables as stale tracers
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, segment_ids, interpret: bool = False):
    """TPU: splash attention per (batch row, KV head) with its group of query heads."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    padded = -(-length // LANES) * LANES
    kernel = _splash_kernel(padded, group, interpret)
    q = _pad_length(q * jnp.asarray(head_dim**-0.5, q.dtype), padded)
    q = q.reshape(batch, padded, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)   # [B, KVH, G, S, hd]
    k, v = (_pad_length(x, padded).transpose(0, 2, 1, 3) for x in (k, v))              # [B, KVH, S, hd]
    seg = _pad_length(segment_ids.astype(jnp.int32), padded)
    per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head)(q, k, v, splash.SegmentIds(seg, seg))                   # [B, KVH, G, S, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, padded, heads, head_dim)[:, :length]


def gpu_flash_attention(q, k, v, segment_ids, interpret: bool = False):
    """GPU: the Triton flash attention of the jax wheel, K/V heads repeated to the query heads."""
    batch, length, heads, head_dim = q.shape
    group = heads // k.shape[2]
    block = 64
    padded = -(-length // block) * block
    sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block, block_kv_dkv=block,
                                     block_q_dq=block, block_kv_dq=block)
    k, v = (_pad_length(jnp.repeat(x, group, axis=2), padded) for x in (k, v))
    seg = _pad_length(segment_ids.astype(jnp.int32), padded)
    out = gpu_attention.mha(_pad_length(q, padded), k, v, seg, sm_scale=head_dim**-0.5, causal=True,
                            block_sizes=sizes, interpret=interpret)
    return out[:, :length]


def kernel_limits(length: int, head_dim: int, dtype, interpret: bool = False):
    """flavor -> `Limits` for this shape (the interpreter has no tiling limits)."""
    def limits(flavor: str) -> Limits:
        if head_dim not in HEAD_DIMS and not interpret:
            return Limits(f"head_dim {head_dim} not in {HEAD_DIMS}")
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            return Limits(f"dtype {jnp.dtype(dtype).name} (float32 or bfloat16 only)")
        return Limits(not_worth=f"sequence length {length} < {MIN_KERNEL_LENGTH}" if length < MIN_KERNEL_LENGTH
                      else None)
    return limits


def attention(q, k, v, segment_ids, run: Execution, *, mask: Array | None = None):
    """Causal segment attention [B, S, H, hd] by `run.attention_impl`, per device under the mesh in context.

    segment_ids [B, S] (0 = padding); `mask` [B, 1, S, S], the xla flavor's form of the same
    (`segment_mask(segment_ids)` when not given: a caller attending in many layers builds it once)."""
    limits = kernel_limits(q.shape[1], q.shape[3], q.dtype, run.kernel_interpret)
    flavor = choose_for("attention", run.attention_impl, run, limits)
    if flavor == REFERENCE:
        return reference_attention(q, k, v, segment_ids)
    if flavor == XLA:
        return xla_attention(q, k, v, segment_mask(segment_ids) if mask is None else mask, resolve_platform(run))
    kernel = splash_attention if flavor == "tpu" else gpu_flash_attention
    fn = functools.partial(kernel, interpret=run.kernel_interpret)
    return per_device(fn, (q, k, v, segment_ids), ("b.h.", "b.h.", "b.h.", "b."), "b.h.")
