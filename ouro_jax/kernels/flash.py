"""Training / prefill attention: causal, packed documents (segment ids), GQA; never an [S, S] array.

q [B, S, H, hd], k / v [B, S, KVH, hd], segment_ids [B, S] int (0 = padding). A query attends to keys
at or before it with the same segment id, so a padding query (segment 0) sees only padding keys: every
row keeps its diagonal and stays finite; rows of real tokens never see padding.

- XLA: `reference_attention`, float32 scores and softmax (materializes [B, H, S, S]).
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

from ouro_jax.kernels.dispatch import choose, mesh_platform
from ouro_jax.kernels.sharded import per_device

LANES = 128
MIN_KERNEL_LENGTH = 128        # below this, auto keeps XLA (one block; the kernel does not pay)
HEAD_DIMS = (64, 128, 256)


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


def kernel_reasons(length: int, head_dim: int, dtype, interpret: bool = False):
    """(cannot_run, not_worth) of `dispatch.choose` for this shape (the interpreter has no tiling limits)."""
    def cannot_run(flavor: str) -> str | None:
        if head_dim not in HEAD_DIMS and not interpret:
            return f"head_dim {head_dim} not in {HEAD_DIMS}"
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            return f"dtype {jnp.dtype(dtype).name} (float32 or bfloat16 only)"
        return None

    def not_worth(flavor: str) -> str | None:
        return f"sequence length {length} < {MIN_KERNEL_LENGTH}" if length < MIN_KERNEL_LENGTH else None
    return cannot_run, not_worth


def attention(q, k, v, segment_ids, *, impl: str = "auto", platform: str | None = None, interpret: bool = False):
    """Causal segment attention [B, S, H, hd] by `impl` ("auto" | "xla" | "pallas"), per device under
    the mesh in context. platform: the mesh's (default: the mesh in context)."""
    platform = platform or mesh_platform()
    flavor = choose("attention", impl, platform, interpret, *kernel_reasons(q.shape[1], q.shape[3], q.dtype, interpret))
    if flavor is None:
        return reference_attention(q, k, v, segment_ids)
    kernel = splash_attention if flavor == "tpu" else gpu_flash_attention
    fn = functools.partial(kernel, interpret=interpret)
    return per_device(fn, (q, k, v, segment_ids), ("b.h.", "b.h.", "b.h.", "b."), "b.h.")
